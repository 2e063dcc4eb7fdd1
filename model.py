"""The forward pass of Qwen2.5-VL as the scripts use it: M-RoPE positions by hand, prompt batches, the vision
tower run once per distinct clip, KV-cache generation and per-token log-probs. Loading and saving a model:
lifecycle.py."""
from dataclasses import dataclass
import torch
import transformers
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

transformers.utils.logging.disable_progress_bar()  # one line per step is the log; no bars
ATTENTION = ("sdpa", "eager", "flash_attention_2")  # the attention kernels the scripts' `attn` may name

def stop_ids(tokenizer):
    """A turn ends at <|im_end|>; Qwen2.5-VL-Instruct's generation config also stops at <|endoftext|>."""
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

def mrope_positions(mm_types, clip, tokens_per_second):
    """(3, L) positions of an unpadded prompt with one vision block at most, as the released checkpoints learnt: vision
    (start + t*tokens_per_second*second_per_grid, start + row, start + col), text after it its max + 1 (DETAILS.md)."""
    L = len(mm_types)
    pos = torch.arange(L).expand(3, L).clone()
    vision = torch.tensor(mm_types).nonzero().flatten()
    if len(vision) == 0:
        return pos
    start, end = vision[0].item(), vision[-1].item() + 1
    assert end - start == len(vision) == clip.num_tokens, "one contiguous vision block per prompt, sized to its clip"
    t, h, w = clip.grid_thw[0], clip.grid_thw[1] // 2, clip.grid_thw[2] // 2
    # float32 product floored, exactly as Qwen's code computes it; images have no temporal spacing
    step = torch.tensor(clip.second_per_grid if clip.is_video else 0.0, dtype=torch.float32) * tokens_per_second
    grid = torch.meshgrid((torch.arange(t) * step).long(), torch.arange(h), torch.arange(w), indexing="ij")
    block = torch.stack(grid).reshape(3, -1) + start
    pos[:, start:end] = block
    pos[:, end:] = block.max() + 1 + torch.arange(L - end)
    return pos

def lora_of(model):
    """The peft wrapper of a LoRA run (inside a DeepSpeed engine or not), else None."""
    return inner if isinstance(inner := getattr(model, "module", model), PeftModel) else None

def unwrap(model):
    """The Qwen2.5-VL module inside a DeepSpeed engine and a peft wrapper (peft's adapters live in its layers)."""
    return lora_of(model).get_base_model() if lora_of(model) else getattr(model, "module", model)

@dataclass
class PromptBatch:
    """Left-padded prompts; row b shows clips[row_clip[b]] (None: text only). Rows may share a clip."""
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
        return PromptBatch(self.input_ids[index], self.attention_mask[index], self.mm_types[index],
                           self.position_ids[:, index], self.next_pos[index], self.clips,
                           [self.row_clip[b] for b in rows])

def collate_prompts(encoded, clips, pad_id, config, device="cpu", row_clip=None):
    """Row b: encoded[b] = (ids, mm_types), as data.encode_prompt gives them, shows clips[row_clip[b]] (or clips[b])."""
    B, P = len(encoded), max(len(ids) for ids, _ in encoded)
    row_clip = list(range(B)) if row_clip is None else row_clip
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P, dtype=torch.long)
    mm_types = torch.zeros(B, P, dtype=torch.long)
    position_ids = torch.zeros(3, B, P, dtype=torch.long)
    for b, (ids, types) in enumerate(encoded):
        n = len(ids)
        clip = clips[row_clip[b]] if row_clip[b] is not None else None
        input_ids[b, P - n:], mm_types[b, P - n:], attention_mask[b, P - n:] = torch.tensor(ids), torch.tensor(types), 1
        position_ids[:, b, P - n:] = mrope_positions(types, clip, config.vision_config.tokens_per_second)
    next_pos = position_ids.amax(dim=(0, 2)) + 1
    to = lambda x: x.to(device)
    return PromptBatch(to(input_ids), to(attention_mask), to(mm_types), to(position_ids), to(next_pos), clips, row_clip)

def embed_prompts(model, batch):
    """Token embeddings with each distinct clip encoded once (one vision tower call) and scattered into every row that
    shows it: autograd sums the rows' gradients into that encoding, as if each row had its own, at 1/rows the cost."""
    embeds = unwrap(model).model.get_input_embeddings()(batch.input_ids)
    clips = {c: batch.clips[c] for c in sorted(set(batch.row_clip) - {None})}
    if not clips:
        return embeds
    visual = unwrap(model).model.visual
    pixels = torch.cat([clip.pixel_values for clip in clips.values()]).to(embeds.device, visual.dtype)
    grids = torch.tensor([clip.grid_thw for clip in clips.values()], device=embeds.device)
    encoded = visual(pixels, grid_thw=grids).pooler_output.split([clip.num_tokens for clip in clips.values()])
    features = dict(zip(clips, encoded))
    per_row = torch.cat([features[c] for c in batch.row_clip if c is not None]).to(embeds.dtype)
    vision_mask = (batch.mm_types != 0).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(vision_mask, per_row)

def hidden_states(model, embeds, position_ids, attention_mask, cache=None):
    """The language model on embeddings with explicit 3-D positions; no head: only completion positions pay for it."""
    lm = unwrap(model).model.language_model
    return lm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
              use_cache=cache is not None).last_hidden_state

def autocast(device):
    """The one precision regime of every log-prob pass (policy, old policy, reference, SFT): bf16 autocast on GPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=torch.device(device).type == "cuda")

def completion_logprobs(model, batch, completion_ids, completion_mask, slices=8):
    """(B, T) log-probs of each completion token given its prompt, in one forward over prompt + completion. The head
    and log-softmax run on `slices` slices of the tokens (8 rows x 768 at paper scale: a row each), recomputed in
    backward, so vocab-wide fp32 logits exist for one at a time; a fixed count: under ZeRO-3 each is a collective."""
    B, T = completion_ids.shape
    inner = unwrap(model)

    def logprobs(h, ids):  # (n, D), (n,) -> (n,)
        logits = inner.lm_head(h).float()
        return logits.gather(-1, ids[:, None]).squeeze(-1) - logits.logsumexp(-1)
    with autocast(completion_ids.device):
        embeds = torch.cat([embed_prompts(model, batch), inner.model.get_input_embeddings()(completion_ids)], dim=1)
        completion_pos = (batch.next_pos[:, None] + torch.arange(T, device=completion_ids.device)).expand(3, B, T)
        positions = torch.cat([batch.position_ids, completion_pos], dim=2)                    # (3, B, P+T)
        mask = torch.cat([batch.attention_mask, completion_mask.long()], dim=1)
        hidden = hidden_states(model, embeds, positions, mask)[:, -T - 1:-1].reshape(B * T, -1)  # b*T + t predicts t
        pieces = zip(hidden.tensor_split(slices), completion_ids.flatten().tensor_split(slices))
        # no metadata check of recomputed tensors: ZeRO-3 frees a frozen (LoRA) head weight again once it is used
        return torch.cat([checkpoint(logprobs, h, ids, use_reentrant=False, determinism_check="none")
                          for h, ids in pieces]).view(B, T)

def sample_token(logits, temperature, top_p, generator):
    """temperature 0 is greedy; otherwise nucleus sampling from the smallest set of tokens with mass >= top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

@torch.no_grad()
def generate(model, batch, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0, generator=None):
    """Batched prefill, then one token per step from the KV cache; a row stops at its first stop token.
    Returns completion ids (B, T) padded with pad_id, and a mask (B, T) of the tokens up to and including the stop."""
    inner = unwrap(model)
    B = batch.input_ids.shape[0]
    cache = DynamicCache(config=inner.config)
    mask = batch.attention_mask
    last = hidden_states(model, embed_prompts(model, batch), batch.position_ids, mask, cache)[:, -1]
    stop = torch.tensor(stop_ids, device=mask.device)
    done = torch.zeros(B, dtype=torch.bool, device=mask.device)
    tokens = []
    for step in range(max_new_tokens):
        token = sample_token(inner.lm_head(last).float(), temperature, top_p, generator).masked_fill(done, pad_id)
        tokens.append(token)
        done |= torch.isin(token, stop)
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        text_pos = (batch.next_pos + step).view(1, B, 1).expand(3, B, 1)  # all three M-RoPE rows advance together
        last = hidden_states(model, inner.model.get_input_embeddings()(token[:, None]), text_pos, mask, cache)[:, -1]
    ids = torch.stack(tokens, dim=1)
    is_stop = torch.isin(ids, stop).long()
    return ids, ((is_stop.cumsum(1) - is_stop) == 0).long()
