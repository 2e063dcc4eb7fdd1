"""The forward pass of Qwen2.5-VL as the scripts use it: M-RoPE positions by hand, prompt batches,
the vision tower run once per distinct clip, KV-cache generation and per-token log-probs.

Loading and saving a model: lifecycle.py."""
from dataclasses import dataclass
import torch
import transformers
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

# one line per step is the log; no bars
transformers.utils.logging.disable_progress_bar()

# the attention kernels the scripts' `attn` may name
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def stop_ids(tokenizer):
    """The ids that end a completion.

    A turn ends at <|im_end|>; Qwen2.5-VL-Instruct's generation config also stops at
    <|endoftext|>."""
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def mrope_positions(mm_types, clip, tokens_per_second):
    """(3, L) positions of an unpadded prompt with one vision block at most, as the released
    checkpoints learnt them (DETAILS.md).

    The three rows are time, height and width. Text counts on in all three together. The vision
    token at (t, row, col) of its clip's grid sits at
    (start + t * tokens_per_second * second_per_grid, start + row, start + col),
    and the text after the block continues from the block's largest position + 1."""
    L = len(mm_types)
    pos = torch.arange(L).expand(3, L).clone()  # (3, L) all text: 0, 1, 2, ... in each row
    vision = torch.tensor(mm_types).nonzero().flatten()  # (V,) where the vision pads are
    if len(vision) == 0:
        return pos
    start = vision[0].item()
    end = vision[-1].item() + 1
    sized = end - start == len(vision) == clip.num_tokens
    assert sized, "one contiguous vision block per prompt, sized to its clip"

    # the grid in the language model's tokens: the merger joins 2x2 patches into one token
    t = clip.grid_thw[0]
    h = clip.grid_thw[1] // 2
    w = clip.grid_thw[2] // 2

    # time: a float32 product floored, exactly as Qwen's code computes it (and the checkpoints
    # learnt); images have no temporal spacing
    seconds = 0.0
    if clip.is_video:
        seconds = clip.second_per_grid
    step = torch.tensor(seconds, dtype=torch.float32) * tokens_per_second  # () float32
    frame_pos = (torch.arange(t) * step).long()  # (t,)
    rows = torch.arange(h)  # (h,)
    cols = torch.arange(w)  # (w,)
    grid = torch.meshgrid(frame_pos, rows, cols, indexing="ij")  # 3 x (t, h, w)
    block = torch.stack(grid).reshape(3, -1) + start  # (3, V)
    pos[:, start:end] = block
    pos[:, end:] = block.max() + 1 + torch.arange(L - end)  # (3, L - end)
    return pos


def lora_of(model):
    """The peft wrapper of a LoRA run (inside a DeepSpeed engine or not), else None."""
    inner = getattr(model, "module", model)
    if isinstance(inner, PeftModel):
        return inner
    return None


def unwrap(model):
    """The Qwen2.5-VL module inside a DeepSpeed engine and a peft wrapper.

    peft's adapters live in its layers, so the forward below runs them too."""
    lora = lora_of(model)
    if lora:
        return lora.get_base_model()
    return getattr(model, "module", model)


@dataclass
class PromptBatch:
    """Left-padded prompts; row b shows clips[row_clip[b]] (None: text only).

    Rows may share a clip (a T-GRPO group's rollouts all show one video)."""
    input_ids: torch.Tensor       # (B, P)
    attention_mask: torch.Tensor  # (B, P) 1 on real tokens
    mm_types: torch.Tensor        # (B, P) 0 text, 1 image pad, 2 video pad
    position_ids: torch.Tensor    # (3, B, P) M-RoPE, pads at 0
    next_pos: torch.Tensor        # (B,) position of the first generated token
    clips: list
    row_clip: list

    def select(self, rows):
        """The given rows only; they keep pointing at the same clips."""
        index = torch.tensor(rows, device=self.input_ids.device)
        return PromptBatch(input_ids=self.input_ids[index],
                           attention_mask=self.attention_mask[index],
                           mm_types=self.mm_types[index],
                           position_ids=self.position_ids[:, index],
                           next_pos=self.next_pos[index],
                           clips=self.clips,
                           row_clip=[self.row_clip[b] for b in rows])


def collate_prompts(encoded, clips, pad_id, config, device="cpu", row_clip=None):
    """A PromptBatch on `device` from tokenized prompts.

    Row b: encoded[b] = (ids, mm_types), as data.encode_prompt gives them, shows
    clips[row_clip[b]] (or clips[b])."""
    B = len(encoded)
    P = max(len(ids) for ids, _ in encoded)
    if row_clip is None:
        row_clip = list(range(B))
    tokens_per_second = config.vision_config.tokens_per_second
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros(B, P, dtype=torch.long)  # (B, P)
    mm_types = torch.zeros(B, P, dtype=torch.long)  # (B, P)
    position_ids = torch.zeros(3, B, P, dtype=torch.long)  # (3, B, P)

    # left padding: every prompt ends in the last column, so one decode step serves all rows
    for b, (ids, types) in enumerate(encoded):
        n = len(ids)
        clip = None
        if row_clip[b] is not None:
            clip = clips[row_clip[b]]
        input_ids[b, P - n:] = torch.tensor(ids)  # (n,)
        mm_types[b, P - n:] = torch.tensor(types)  # (n,)
        attention_mask[b, P - n:] = 1
        position_ids[:, b, P - n:] = mrope_positions(types, clip, tokens_per_second)  # (3, n)

    # a clip makes positions jump, so a row goes on from its own largest position, not from P
    next_pos = position_ids.amax(dim=(0, 2)) + 1  # (B,)
    return PromptBatch(input_ids=input_ids.to(device),
                       attention_mask=attention_mask.to(device),
                       mm_types=mm_types.to(device),
                       position_ids=position_ids.to(device),
                       next_pos=next_pos.to(device),
                       clips=clips,
                       row_clip=row_clip)


def embed_prompts(model, batch):
    """(B, P, D) token embeddings, the vision pads replaced by their clip's features.

    Each distinct clip is encoded once (one vision tower call) and scattered into every row that
    shows it: autograd sums the rows' gradients into that encoding, as if each row had its own,
    at 1/rows the cost."""
    embeds = unwrap(model).model.get_input_embeddings()(batch.input_ids)  # (B, P, D)
    shown = sorted(set(batch.row_clip) - {None})
    clips = {c: batch.clips[c] for c in shown}
    if not clips:
        return embeds

    # the vision tower once over the distinct clips' patches, then split back clip by clip
    visual = unwrap(model).model.visual
    pixels = torch.cat([clip.pixel_values for clip in clips.values()])  # (patches, patch_dim)
    pixels = pixels.to(embeds.device, visual.dtype)
    grids = [clip.grid_thw for clip in clips.values()]
    grids = torch.tensor(grids, device=embeds.device)  # (clips, 3)
    encoded = visual(pixels, grid_thw=grids).pooler_output  # (clip tokens, D)
    encoded = encoded.split([clip.num_tokens for clip in clips.values()])
    features = dict(zip(clips, encoded))

    # the vision pads in row order take their row's clip encoding; a shared clip is repeated
    per_row = [features[c] for c in batch.row_clip if c is not None]
    per_row = torch.cat(per_row).to(embeds.dtype)  # (vision pads, D)
    vision_mask = (batch.mm_types != 0).unsqueeze(-1).expand_as(embeds)  # (B, P, D)
    return embeds.masked_scatter(vision_mask, per_row)


def hidden_states(model, embeds, position_ids, attention_mask, cache=None):
    """The language model on embeddings with explicit 3-D positions.

    No head: only the positions whose logits are needed (the completion's) pay for it."""
    lm = unwrap(model).model.language_model
    output = lm(inputs_embeds=embeds,
                position_ids=position_ids,
                attention_mask=attention_mask,
                cache=cache,
                use_cache=cache is not None)
    return output.last_hidden_state


def autocast(device):
    """bf16 autocast on GPU, off on CPU.

    The one precision regime of every log-prob pass: policy, old policy, reference, SFT."""
    on_gpu = torch.device(device).type == "cuda"
    return torch.autocast("cuda", torch.bfloat16, enabled=on_gpu)


def completion_logprobs(model, batch, completion_ids, completion_mask, slices=8):
    """(B, T) log-probs of each completion token given its prompt.

    One forward runs over prompt + completion. The head and log-softmax run on `slices` slices
    of the tokens (8 rows x 768 at paper scale: a row each), recomputed in backward, so
    vocab-wide fp32 logits exist for one slice at a time. The count is fixed because under
    ZeRO-3 each slice is a collective."""
    B, T = completion_ids.shape
    inner = unwrap(model)

    def logprobs(h, ids):  # (n, D), (n,) -> (n,)
        logits = inner.lm_head(h).float()  # (n, V) fp32
        chosen = logits.gather(-1, ids[:, None]).squeeze(-1)  # (n,)
        return chosen - logits.logsumexp(-1)

    with autocast(completion_ids.device):
        # one sequence a row: the prompt (its clip included), then the completion
        prompt_embeds = embed_prompts(model, batch)  # (B, P, D)
        completion_embeds = inner.model.get_input_embeddings()(completion_ids)  # (B, T, D)
        embeds = torch.cat([prompt_embeds, completion_embeds], dim=1)  # (B, P+T, D)

        # the completion is text: it counts on from each row's next position in all three rows
        offsets = torch.arange(T, device=completion_ids.device)  # (T,)
        completion_pos = (batch.next_pos[:, None] + offsets).expand(3, B, T)  # (3, B, T)
        positions = torch.cat([batch.position_ids, completion_pos], dim=2)  # (3, B, P+T)
        mask = torch.cat([batch.attention_mask, completion_mask.long()], dim=1)  # (B, P+T)
        hidden = hidden_states(model, embeds, positions, mask)  # (B, P+T, D)

        # the one-token shift: the hidden state at position t predicts token t+1, so the
        # completion's T tokens are predicted by the T positions ending one before the last
        hidden = hidden[:, -T - 1:-1]  # (B, T, D)
        hidden = hidden.reshape(B * T, -1)  # (B*T, D) row b*T + t predicts completion_ids[b, t]
        targets = completion_ids.flatten()  # (B*T,)

        # the head slice by slice; no metadata check of recomputed tensors: ZeRO-3 frees a
        # frozen (LoRA) head weight again once it is used
        pieces = zip(hidden.tensor_split(slices), targets.tensor_split(slices))
        logps = []
        for h, ids in pieces:
            logp = checkpoint(logprobs, h, ids, use_reentrant=False, determinism_check="none")
            logps.append(logp)  # (n,)
        return torch.cat(logps).view(B, T)  # (B, T)


def sample_token(logits, temperature, top_p, generator):
    """(B,) tokens from (B, V) logits.

    temperature 0 is greedy; otherwise nucleus sampling from the smallest set of tokens with
    mass >= top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V), (B, V)
        # a token is outside once the mass before it exceeds top_p: the top token always stays
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # (B, V)
        kept = sorted_probs.masked_fill(outside, 0.0)  # (B, V)
        # back to vocabulary order; multinomial does not need the mass to sum to 1
        probs = torch.zeros_like(probs).scatter(-1, order, kept)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model, batch, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0,
             generator=None):
    """Batched prefill, then one token per step from the KV cache.

    A row stops at its first stop token. Returns completion ids (B, T) padded with pad_id, and a
    mask (B, T) of the tokens up to and including the stop."""
    inner = unwrap(model)
    embed_tokens = inner.model.get_input_embeddings()
    B = batch.input_ids.shape[0]
    device = batch.attention_mask.device

    # 1. prefill the prompts: one forward over all rows fills the KV cache. Left padding puts
    # every row's last prompt token in the last column, whose hidden state predicts token 1.
    cache = DynamicCache(config=inner.config)
    mask = batch.attention_mask  # (B, P), grows by a column a step
    prompt_embeds = embed_prompts(model, batch)  # (B, P, D)
    hidden = hidden_states(model, prompt_embeds, batch.position_ids, mask, cache)  # (B, P, D)
    last = hidden[:, -1]  # (B, D)

    # 2. decode one token a step from the KV cache: only the new token runs through the model,
    # attending to the cached keys and values of all before it. The rows step together, so a row
    # that has stopped keeps stepping but emits pad_id; the loop ends once every row has stopped.
    stop = torch.tensor(stop_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    tokens = []
    for step in range(max_new_tokens):
        logits = inner.lm_head(last).float()  # (B, V)
        token = sample_token(logits, temperature, top_p, generator)  # (B,)
        token = token.masked_fill(done, pad_id)  # (B,)
        tokens.append(token)
        done |= torch.isin(token, stop)
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, P + step + 1)
        # the new token is text: all three M-RoPE rows advance together
        text_pos = (batch.next_pos + step).view(1, B, 1).expand(3, B, 1)  # (3, B, 1)
        token_embeds = embed_tokens(token[:, None])  # (B, 1, D)
        last = hidden_states(model, token_embeds, text_pos, mask, cache)[:, -1]  # (B, D)

    # 3. the mask of tokens up to the stop: a token counts while no stop token came before it,
    # so the stop itself counts (the policy learns to end its turn) and the pads after it don't
    ids = torch.stack(tokens, dim=1)  # (B, T)
    is_stop = torch.isin(ids, stop).long()  # (B, T)
    stops_before = is_stop.cumsum(1) - is_stop  # (B, T)
    return ids, (stops_before == 0).long()
