"""The forward pass of Qwen2.5-VL and Qwen3-VL as the scripts use it: prompt batches with M-RoPE
positions by hand (family.py: what differs between the two), the vision tower run once per
distinct clip (with Qwen3-VL's DeepStack features), generation from a static KV cache (a CUDA
graph on GPU) and per-token log-probs.

Loading and saving a model: lifecycle.py."""
import math
from dataclasses import dataclass
from typing import NamedTuple
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
import family

# one line per step is the log; no bars
transformers.utils.logging.disable_progress_bar()

# the attention kernels the scripts' `attn` may name
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def stop_ids(tokenizer):
    """The ids that end a completion.

    A turn ends at <|im_end|>; Qwen2.5-VL-Instruct's generation config also stops at
    <|endoftext|>."""
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


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
    positions = family.of(config).positions
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
        position_ids[:, b, P - n:] = positions(types, clip, config)  # (3, n)

    # a clip makes positions jump, so a row goes on from its own largest position, not from P
    next_pos = position_ids.amax(dim=(0, 2)) + 1  # (B,)
    return PromptBatch(input_ids=input_ids.to(device),
                       attention_mask=attention_mask.to(device),
                       mm_types=mm_types.to(device),
                       position_ids=position_ids.to(device),
                       next_pos=next_pos.to(device),
                       clips=clips,
                       row_clip=row_clip)


class SharedPrompts(NamedTuple):
    """The distinct prompts of a batch: T-GRPO's G rows of a prompt show the same ids and clip."""
    first: list            # the first row of each distinct prompt, in row order
    of_row: torch.Tensor   # (B,) each row's prompt, an index into `first`


def shared_prompts(batch):
    """Which rows of `batch` repeat a prompt (the same ids and clip, so the same mask, media types
    and positions): the prefill and the log-prob pass run such a prompt once."""
    first = []
    index = {}
    of_row = []
    for b, ids in enumerate(batch.input_ids.tolist()):
        prompt = (batch.row_clip[b], tuple(ids))
        if prompt not in index:
            index[prompt] = len(first)
            first.append(b)
        of_row.append(index[prompt])
    return SharedPrompts(first, torch.tensor(of_row, device=batch.input_ids.device))


@dataclass
class Embedded:
    """embed_prompts' result: the prompts' embeddings, and Qwen3-VL's DeepStack features."""
    embeds: torch.Tensor        # (B, P, D) the vision pads replaced by their clip's features
    deepstack: list | None      # per early language layer (vision pads, D), in row order; or None
    vision_mask: torch.Tensor   # (B, P) True on the vision pads

    def extended(self, T):
        """(B, P+T) the vision mask over prompt + T completion tokens (text: False)."""
        B = self.vision_mask.shape[0]
        text = self.vision_mask.new_zeros(B, T)  # (B, T)
        return torch.cat([self.vision_mask, text], dim=1)


def embed_prompts(model, batch):
    """The prompts' token embeddings, the vision pads replaced by their clip's features (and,
    Qwen3-VL, the DeepStack features of those pads for the first language layers).

    Each distinct clip is encoded once (one vision tower call) and scattered into every row that
    shows it: autograd sums the rows' gradients into that encoding, as if each row had its own,
    at 1/rows the cost. DeepStack's features are scattered alike."""
    embeds = unwrap(model).model.get_input_embeddings()(batch.input_ids)  # (B, P, D)
    vision_mask = batch.mm_types != 0  # (B, P)
    shown = sorted(set(batch.row_clip) - {None})
    clips = {c: batch.clips[c] for c in shown}
    if not clips:
        return Embedded(embeds, None, vision_mask)

    # the vision tower once over the distinct clips' patches, then split back clip by clip
    visual = unwrap(model).model.visual
    pixels = torch.cat([clip.pixel_values for clip in clips.values()])  # (patches, patch_dim)
    pixels = pixels.to(embeds.device, visual.dtype)
    grids = [clip.grid_thw for clip in clips.values()]
    grids = torch.tensor(grids, device=embeds.device)  # (clips, 3)
    output = visual(pixels, grid_thw=grids)
    sizes = [clip.num_tokens for clip in clips.values()]

    def per_row(encoded):  # (clip tokens, D) -> (vision pads, D): a shared clip is repeated
        features = dict(zip(clips, encoded.split(sizes)))
        return torch.cat([features[c] for c in batch.row_clip if c is not None]).to(embeds.dtype)

    # the vision pads in row order take their row's clip encoding
    expanded = vision_mask.unsqueeze(-1).expand_as(embeds)  # (B, P, D)
    embeds = embeds.masked_scatter(expanded, per_row(output.pooler_output))
    deepstack = None
    if family.of(unwrap(model).config).deepstack:
        deepstack = [per_row(features) for features in output.deepstack_features]
    return Embedded(embeds, deepstack, vision_mask)


def hidden_states(model, embeds, position_ids, attention_mask, cache=None, deepstack=None,
                  vision_mask=None):
    """The language model on embeddings with explicit 3-D positions; Qwen3-VL's DeepStack
    features (a list of (vision pads, D)) are added at `vision_mask` (B, L) after its first
    len(deepstack) layers.

    No head: only the positions whose logits are needed (the completion's) pay for it."""
    lm = unwrap(model).model.language_model
    extra = {}
    if deepstack is not None:
        extra = dict(visual_pos_masks=vision_mask, deepstack_visual_embeds=deepstack)
    output = lm(inputs_embeds=embeds,
                position_ids=position_ids,
                attention_mask=attention_mask,
                cache=cache,
                use_cache=cache is not None,
                **extra)
    return output.last_hidden_state


def autocast(device):
    """bf16 autocast on GPU, off on CPU.

    The one precision regime of every log-prob pass: policy, old policy, reference, SFT."""
    on_gpu = torch.device(device).type == "cuda"
    return torch.autocast("cuda", torch.bfloat16, enabled=on_gpu)


def completion_logprobs(model, batch, completion_ids, completion_mask, slices=8,
                        share_prompts=False):
    """(B, T) log-probs of each completion token given its prompt.

    share_prompts=True (T-GRPO, whose G responses to a prompt share it) runs each distinct prompt
    once: a prompt pass fills a KV cache, each row takes its prompt's keys and values, and a
    completion pass runs the rows' completions over them; the gradients of the G rows meet in the
    one prompt pass. With the toy's short prompts that is about half the tokens of a pass over
    prompt + completion per row (at paper scale, a 2,000-token clip and 8 rows, over two thirds
    fewer). The caller chooses, not the data: under ZeRO-3 every module call is a collective, so
    every rank must run the same passes, a rank on a placeholder batch too. False (SFT, whose rows
    share nothing), or gradient checkpointing (transformers' checkpointed layers drop the cache):
    one pass over prompt + completion per row. The head and log-softmax run on `slices` slices of
    the tokens (8 rows x 768 at paper scale: a row each), recomputed in backward, so vocab-wide
    fp32 logits exist for one slice at a time. The count is fixed because under ZeRO-3 each slice
    is a collective."""
    B, T = completion_ids.shape
    inner = unwrap(model)

    def logprobs(h, ids):  # (n, D), (n,) -> (n,)
        logits = inner.lm_head(h).float()  # (n, V) fp32
        chosen = logits.gather(-1, ids[:, None]).squeeze(-1)  # (n,)
        return chosen - logits.logsumexp(-1)

    lm = inner.model.language_model
    checkpointed = lm.gradient_checkpointing and lm.training and torch.is_grad_enabled()
    with autocast(completion_ids.device):
        if share_prompts and not checkpointed:
            hidden = shared_prompt_hidden(model, batch, shared_prompts(batch), completion_ids,
                                          completion_mask)  # (B, T, D)
        else:
            hidden = one_pass_hidden(model, batch, completion_ids, completion_mask)  # (B, T, D)
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


def completion_positions(batch, T):
    """(3, B, T) a completion's M-RoPE positions: it is text, so it counts on from each row's next
    position in all three rows."""
    offsets = torch.arange(T, device=batch.next_pos.device)  # (T,)
    return (batch.next_pos[:, None] + offsets).expand(3, -1, T)  # (3, B, T)


def one_pass_hidden(model, batch, completion_ids, completion_mask):
    """(B, T, D) the hidden states that predict each completion token, from one forward per row
    over its prompt (its clip included), then its completion."""
    T = completion_ids.shape[1]
    prompt = embed_prompts(model, batch)
    completion_embeds = unwrap(model).model.get_input_embeddings()(completion_ids)  # (B, T, D)
    embeds = torch.cat([prompt.embeds, completion_embeds], dim=1)  # (B, P+T, D)
    positions = torch.cat([batch.position_ids, completion_positions(batch, T)], dim=2)
    mask = torch.cat([batch.attention_mask, completion_mask.long()], dim=1)  # (B, P+T)
    hidden = hidden_states(model, embeds, positions, mask, None, prompt.deepstack,
                           prompt.extended(T))  # (B, P+T, D)
    # the one-token shift: the hidden state at position t predicts token t+1, so the
    # completion's T tokens are predicted by the T positions ending one before the last
    return hidden[:, -T - 1:-1]  # (B, T, D)


def shared_prompt_hidden(model, batch, shared, completion_ids, completion_mask):
    """(B, T, D) as one_pass_hidden, with each distinct prompt run once (shared_prompts)."""
    inner = unwrap(model)
    # the prompt pass: one row per distinct prompt fills the cache
    prompts = batch.select(shared.first)
    prompt = embed_prompts(model, prompts)
    cache = DynamicCache(config=inner.config)
    prompt_hidden = hidden_states(model, prompt.embeds, prompts.position_ids,
                                  prompts.attention_mask, cache, prompt.deepstack,
                                  prompt.vision_mask)  # (U, P, D)
    # each row's copy of its prompt's keys and values (indexing: its gradient flows back)
    cache.batch_select_indices(shared.of_row)

    # the completion pass over the rows' copies; its tokens are text (no DeepStack features)
    T = completion_ids.shape[1]
    completion_embeds = inner.model.get_input_embeddings()(completion_ids)  # (B, T, D)
    mask = torch.cat([batch.attention_mask, completion_mask.long()], dim=1)  # (B, P+T)
    completion_hidden = hidden_states(model, completion_embeds, completion_positions(batch, T),
                                      mask, cache)  # (B, T, D)
    # token 0 is predicted by the prompt's last position, token t by completion position t-1
    first = prompt_hidden[shared.of_row, -1:]  # (B, 1, D)
    return torch.cat([first, completion_hidden[:, :-1]], dim=1)  # (B, T, D)


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


# The KV cache holds prompt + max_new_tokens positions rounded up to a multiple of this, so few
# shapes occur (a compiled step is reused across calls of one bucket)
CACHE_BUCKET = 256
# On a GPU whether every row has stopped is asked once every this many tokens: the answer is a
# device-to-host copy, which waits for every queued step
STOP_EVERY_GPU = 16


def linear_weights(linear):
    """(weight, bias) of a Linear as decode applies it.

    A peft LoRA layer's active adapters are merged into a copy of its base weight, in the base's
    dtype, rounded once (as peft's merge rounds): W + scale * B @ A. Merging in place and
    unmerging would change the training weights' bits (DETAILS.md, "Library traps")."""
    if not isinstance(linear, LoraLayer):
        return linear.weight, linear.bias
    base = linear.get_base_layer()
    if linear.disable_adapters or linear.merged:
        return base.weight, base.bias
    weight = base.weight.clone()  # (out, in)
    for adapter in linear.active_adapters:
        if adapter not in linear.lora_A:
            continue
        assert not linear.use_dora[adapter], "DoRA adapters are not merged here"
        weight += linear.get_delta_weight(adapter)  # (out, in)
    return weight, base.bias


def decode_weights(model):
    """The language model's weights for Decoder.step: the module's own tensors (under ZeRO-3 the
    ones gathered for the rollout phase), LoRA adapters merged into copies (linear_weights)."""
    inner = unwrap(model)
    lm = inner.model.language_model
    layers = []
    for layer in lm.layers:
        attn = layer.self_attn
        mlp = layer.mlp
        projections = dict(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
                           gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj)
        weights = {name: linear_weights(linear) for name, linear in projections.items()}
        weights["input_norm"] = layer.input_layernorm.weight
        weights["post_norm"] = layer.post_attention_layernorm.weight
        # Qwen3's attention normalises q and k per head
        if family.of(inner.config).qk_norm:
            weights["q_norm"] = attn.q_norm.weight
            weights["k_norm"] = attn.k_norm.weight
        layers.append(weights)
    head, _ = linear_weights(inner.lm_head)
    return dict(embed=lm.embed_tokens.weight, layers=layers, norm=lm.norm.weight, head=head)


def rms_norm(x, weight, eps):
    """Qwen's RMSNorm as its module computes it (fp32 inside), so decode rounds as the forward."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x):
    """RoPE's rotation of the two halves of the head dimension: (x1, x2) -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder:
    """The decode step: one token per row through the language model, from a KV cache allocated
    once at its final size and written in place, with static shapes throughout.

    Hand-written over the module's weights (decode_weights) rather than transformers' StaticCache
    run through the language model: LoRA decodes from merged copies of the weights without
    touching the modules (peft's layers would run the unmerged adapters, about twice slower), no
    mask is built per token, and every operation is in sight of a CUDA graph and torch.compile.
    The step reads its inputs from tensors that `advance` updates in place: the token, its
    position, the cache column it writes and the attention mask. A generated token is text, so
    its three M-RoPE rows are equal and the rotation is plain 1-D RoPE: decode has no vision logic.
    The cache holds P + max_new_tokens columns rounded up to CACHE_BUCKET; the prompt's keys and
    values come from the prefill, transformers' forward (`fill`)."""

    def __init__(self, model, batch, max_new_tokens):
        lm = unwrap(model).model.language_model
        config = lm.config
        # Qwen3-VL's text config has no sliding window at all
        sliding = getattr(config, "use_sliding_window", False)
        plain = config.rope_parameters["rope_type"] == "default" and not sliding
        assert plain, "decode knows default RoPE and full attention only"
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        # Qwen3's head width is its own setting; Qwen2.5's follows from the width
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.inv_freq = lm.rotary_emb.inv_freq  # (head_dim / 2,) fp32
        self.rope_scale = lm.rotary_emb.attention_scaling
        self.weights = decode_weights(model)

        B, P = batch.input_ids.shape
        device = batch.input_ids.device
        self.length = math.ceil((P + max_new_tokens) / CACHE_BUCKET) * CACHE_BUCKET
        self.keys = []  # per layer (B, Hkv, L, hd), made by `fill`
        self.values = []  # per layer (B, Hkv, L, hd)

        # the step's inputs; `advance` moves them on to the token it feeds
        self.token = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        self.position = batch.next_pos - 1  # (B,)
        self.index = torch.full((1,), P - 1, device=device)  # (1,) the cache column, one for all
        # True: attend. The columns past the token fed are False, so a row of the whole length
        # attends to its prompt and its tokens so far only
        self.mask = torch.zeros(B, self.length, dtype=torch.bool, device=device)  # (B, L)
        self.mask[:, :P] = batch.attention_mask.bool()

    def fill(self, cache):
        """The cache, from the prefill's (a DynamicCache), which this empties: layer by layer the
        prompt's keys and values are copied into a buffer of the full length and dropped, so the
        two caches never exist whole at once."""
        while cache.layers:
            layer = cache.layers.pop(0)
            B, heads, P, head_dim = layer.keys.shape
            keys = layer.keys.new_zeros(B, heads, self.length, head_dim)  # (B, Hkv, L, hd)
            values = layer.values.new_zeros(B, heads, self.length, head_dim)  # (B, Hkv, L, hd)
            keys[:, :, :P] = layer.keys
            values[:, :, :P] = layer.values
            self.keys.append(keys)
            self.values.append(values)

    def advance(self, token):
        """Make `token` (B,) the next step's input, one position and one cache column further."""
        self.token.copy_(token)
        self.position += 1
        self.index += 1
        self.mask.index_fill_(1, self.index, True)

    def step(self):
        """(B, V) fp32 logits of the token after self.token; its keys and values go into the
        cache at self.index. The same operations as transformers' forward, in the same order."""
        w = self.weights
        x = F.embedding(self.token, w["embed"])[:, None]  # (B, 1, D)

        # the rotation of this position, shared by the layers
        freqs = self.position[:, None].float() * self.inv_freq  # (B, hd / 2)
        cos = freqs.cos() * self.rope_scale  # (B, hd / 2)
        sin = freqs.sin() * self.rope_scale  # (B, hd / 2)
        cos = torch.cat((cos, cos), dim=-1).to(x.dtype)[:, None, None]  # (B, 1, 1, hd)
        sin = torch.cat((sin, sin), dim=-1).to(x.dtype)[:, None, None]  # (B, 1, 1, hd)

        for i, layer in enumerate(w["layers"]):
            h = rms_norm(x, layer["input_norm"], self.eps)  # (B, 1, D)
            x = x + self.attention(i, layer, h, cos, sin)  # (B, 1, D)
            h = rms_norm(x, layer["post_norm"], self.eps)  # (B, 1, D)
            gate = F.silu(F.linear(h, *layer["gate"]))  # (B, 1, F)
            up = F.linear(h, *layer["up"])  # (B, 1, F)
            x = x + F.linear(gate * up, *layer["down"])  # (B, 1, D)
        x = rms_norm(x, w["norm"], self.eps)  # (B, 1, D)
        return F.linear(x[:, 0], w["head"]).float()  # (B, V)

    def attention(self, i, layer, h, cos, sin):
        """Layer i's attention of the new token over the cache, its own keys and values written
        first."""
        B = h.shape[0]
        q = F.linear(h, *layer["q"]).view(B, 1, self.heads, self.head_dim)  # (B, 1, H, hd)
        k = F.linear(h, *layer["k"]).view(B, 1, self.kv_heads, self.head_dim)  # (B, 1, Hkv, hd)
        v = F.linear(h, *layer["v"]).view(B, 1, self.kv_heads, self.head_dim)  # (B, 1, Hkv, hd)
        if "q_norm" in layer:
            q = rms_norm(q, layer["q_norm"], self.eps)  # (B, 1, H, hd)
            k = rms_norm(k, layer["k_norm"], self.eps)  # (B, 1, Hkv, hd)
        q = q.transpose(1, 2)  # (B, H, 1, hd)
        k = k.transpose(1, 2)  # (B, Hkv, 1, hd)
        v = v.transpose(1, 2)  # (B, Hkv, 1, hd)
        q = q * cos + rotate_half(q) * sin  # (B, H, 1, hd)
        k = k * cos + rotate_half(k) * sin  # (B, Hkv, 1, hd)
        self.keys[i].index_copy_(2, self.index, k)  # (B, Hkv, L, hd)
        self.values[i].index_copy_(2, self.index, v)  # (B, Hkv, L, hd)

        # grouped-query attention as transformers does it for one query token: the query heads of
        # a key/value head become its queries, so the cache is read as it is, not repeated
        q = q.reshape(B, self.kv_heads, -1, self.head_dim)  # (B, Hkv, H / Hkv, hd)
        mask = self.mask[:, None, None]  # (B, 1, 1, L) shared by all heads
        out = F.scaled_dot_product_attention(q, self.keys[i], self.values[i], attn_mask=mask,
                                             scale=self.head_dim ** -0.5)  # (B, Hkv, H / Hkv, hd)
        out = out.reshape(B, self.heads, 1, self.head_dim).transpose(1, 2)  # (B, 1, H, hd)
        return F.linear(out.reshape(B, 1, -1), *layer["o"])  # (B, 1, D)


def record_graph(fn):
    """fn recorded as a CUDA graph; returns a function that replays it and returns its output.

    fn runs once first, on a side stream, so that lazy initialisations (cuBLAS workspaces, a
    compile) happen outside the capture. The graph holds the addresses fn read and wrote at
    capture: its weights, cache and inputs must stay where they are while it is replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


@torch.no_grad()
def generate(model, batch, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0,
             generator=None, stop_every=None, compile_step=False, cuda_graph=True):
    """Batched prefill, then one token per step from a static KV cache (Decoder).

    A row stops at its first stop token. Returns completion ids (B, T) padded with pad_id, and a
    mask (B, T) of the tokens up to and including the stop; T is the longest completion.

    On a GPU the decode step is recorded as a CUDA graph at the first decoded token and replayed
    for every later one (record_graph); on CPU it runs eager. The graph is recorded by hand, once a
    call, rather than by torch.compile(mode="reduce-overhead"): a graph reads its tensors at the
    addresses they had at capture, and the decode weights move between calls. LoRA's merged
    copies are made per call; under ZeRO-3, common.generation_phase gathers the partitioned
    weights into fresh memory each rollout phase, and the step, built and recorded inside the
    phase, reads those. Recording once per call keeps that rule in plain sight, where
    reduce-overhead would re-record (or not) by its own rules; copying each phase's weights into
    fixed buffers instead would cost a second copy of them (16.6 GB at 7B). What a recording
    costs on a GPU (a warm-up step and the capture) is not measured yet: bench.py prints it.
    `compile_step` compiles the step (torch.compile, fullgraph) before it is recorded: its
    elementwise operations fused, at a compile per batch size and cache length. cuda_graph=False
    (the scripts' config value, for a GPU where the capture fails) runs the same step eager there.

    Whether every row has stopped is asked every `stop_every` tokens (None: 16 on a GPU, where
    each answer waits for the queued steps; every token on CPU, where asking is free); the steps
    past the longest completion are cut off, so the result is that of stopping at once."""
    inner = unwrap(model)
    B = batch.input_ids.shape[0]
    device = batch.attention_mask.device
    on_gpu = device.type == "cuda"
    if stop_every is None:
        stop_every = 1
        if on_gpu:
            stop_every = STOP_EVERY_GPU

    # 1. prefill the prompts: one forward over the distinct prompts fills a KV cache, copied into
    # the decoder's. Left padding puts every row's last prompt token in the last column, whose
    # hidden state predicts token 1.
    # Rows that share a prompt (a T-GRPO group) prefill it once and take copies of its cache.
    shared = shared_prompts(batch)
    prompts = batch.select(shared.first)
    cache = DynamicCache(config=inner.config)
    prompt = embed_prompts(model, prompts)
    hidden = hidden_states(model, prompt.embeds, prompts.position_ids, prompts.attention_mask,
                           cache, prompt.deepstack, prompt.vision_mask)  # (U, P, D)
    logits = inner.lm_head(hidden[:, -1]).float()[shared.of_row]  # (B, V)
    del hidden
    cache.batch_select_indices(shared.of_row)  # (B, Hkv, P, hd) per layer
    decoder = Decoder(model, batch, max_new_tokens)
    decoder.fill(cache)
    step = decoder.step
    if compile_step:
        step = torch.compile(step, fullgraph=True, dynamic=False)

    # 2. decode one token a step from the KV cache: only the new token runs through the model,
    # attending to the cached keys and values of all before it. The rows step together, so a row
    # that has stopped keeps stepping but emits pad_id, until every row has stopped.
    stop = torch.tensor(stop_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    ids = torch.full((B, max_new_tokens), pad_id, device=device)  # (B, max_new_tokens)
    for t in range(max_new_tokens):
        token = sample_token(logits, temperature, top_p, generator)  # (B,)
        token = token.masked_fill(done, pad_id)  # (B,)
        ids[:, t] = token
        done |= torch.isin(token, stop)
        if t + 1 == max_new_tokens:
            break
        if (t + 1) % stop_every == 0 and done.all():
            break
        decoder.advance(token)
        # captured at the first step, once the step's inputs hold real values: the capture's
        # warm-up run writes this token's keys and values, as the replays will again
        if on_gpu and cuda_graph and t == 0:
            step = record_graph(step)
        logits = step()  # (B, V)

    # 3. the mask of tokens up to the stop: a token counts while no stop token came before it,
    # so the stop itself counts (the policy learns to end its turn) and the pads after it don't.
    # Steps run past the last stop (asked every stop_every) are cut: T is the longest completion.
    ids = ids[:, :t + 1]  # (B, steps run)
    is_stop = torch.isin(ids, stop).long()  # (B, steps run)
    stops_before = is_stop.cumsum(1) - is_stop  # (B, steps run)
    completion_mask = (stops_before == 0).long()  # (B, steps run)
    T = completion_mask.sum(1).max().item()
    return ids[:, :T], completion_mask[:, :T]
