"""Everything the scripts share: loading Qwen2.5-VL, M-RoPE positions, vision-once forward, KV-cache generation,
per-token log-probs, atomic checkpoints, the configurator and distributed set-up."""
import ast
import contextlib
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
import numpy as np
import torch
import torch.distributed as dist
import transformers
from transformers import (AutoTokenizer, DynamicCache, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)

transformers.utils.logging.disable_progress_bar()  # one line per step is the log; no bars

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TINY_VOCAB = 512  # the synthetic task's text needs few merges; a small vocab keeps the tiny model at ~0.7 M params

# ----------------------------------------------------------------------------- the built-in tiny model

def build_tokenizer(texts, vocab_size=TINY_VOCAB):
    """A byte-level BPE tokenizer trained on `texts`, carrying Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])


def tiny_config(tokenizer):
    """A Qwen2.5-VL of the released architecture, only small: 2 text layers of width 128, a 2-block vision tower."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    # tokens_per_second 2 as in the 7B checkpoint, so temporal spacing behaves as at paper scale
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                  fullatt_block_indexes=[1], window_size=112, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def ensure_tiny_model(path, texts, seed=0):
    """Write the tiny model + tokenizer to `path` once, so every script loads it like a real checkpoint folder."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer))
    tmp = path.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)


def load_model(path, device, grad_ckpt=False, attn="sdpa", dtype=None):
    """Qwen2.5-VL from a local folder: bf16 on GPU, fp32 on CPU unless told; never runs remote code."""
    if not os.path.isfile(os.path.join(path, "config.json")):  # else transformers would ask the hub for it by name
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json); models load from local folders only")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                               trust_remote_code=False).to(device)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer

def stop_ids(tokenizer):
    """A turn ends at <|im_end|>; Qwen2.5-VL-Instruct's generation config also stops at <|endoftext|>."""
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

# ----------------------------------------------------------------------------- M-RoPE positions, by hand

def mrope_positions(mm_types, clip, tokens_per_second):
    """(3, L) positions of one unpadded prompt with at most one vision block, by the rule the released checkpoints
    were trained with: vision tokens get (start + t*tokens_per_second*second_per_grid, start + row, start + col);
    text after the block resumes at the block's largest position + 1. transformers 5.24's get_rope_index resumes at
    start + max(h, w)/2 instead (NOTES.md), which overlaps a long video's temporal positions."""
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

# ----------------------------------------------------------------------------- batches, vision once, forward

def unwrap(model):
    """The Qwen2.5-VL module inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


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
                           self.position_ids[:, index], self.next_pos[index], self.clips, [self.row_clip[b] for b in rows])


def collate_prompts(encoded, clips, row_clip, pad_id, tokens_per_second, device="cpu"):
    """encoded[b] = (ids, mm_types) of row b, as data.encode_prompt returns them."""
    B, P = len(encoded), max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P, dtype=torch.long)
    mm_types = torch.zeros(B, P, dtype=torch.long)
    position_ids = torch.zeros(3, B, P, dtype=torch.long)
    for b, (ids, types) in enumerate(encoded):
        n = len(ids)
        clip = clips[row_clip[b]] if row_clip[b] is not None else None
        input_ids[b, P - n:], mm_types[b, P - n:], attention_mask[b, P - n:] = torch.tensor(ids), torch.tensor(types), 1
        position_ids[:, b, P - n:] = mrope_positions(types, clip, tokens_per_second)
    next_pos = position_ids.amax(dim=(0, 2)) + 1
    to = lambda x: x.to(device)
    return PromptBatch(to(input_ids), to(attention_mask), to(mm_types), to(position_ids), to(next_pos), clips, row_clip)


def encode_vision(model, clips):
    """Run the vision tower once over the given clips (one call for all); returns per-clip merged features."""
    visual = unwrap(model).model.visual
    device = next(visual.parameters()).device
    pixels = torch.cat([c.pixel_values for c in clips]).to(device, visual.dtype)
    grids = torch.tensor([c.grid_thw for c in clips], device=device)
    return visual(pixels, grid_thw=grids).pooler_output.split([c.num_tokens for c in clips])


def embed_prompts(model, batch):
    """Token embeddings with each distinct clip's features scattered into every row that shows it. Indexing the
    shared features per row lets autograd sum the rows' gradients into one encoding: the same gradients as if
    each row had encoded its own copy, at 1/rows the vision cost."""
    embeds = unwrap(model).model.get_input_embeddings()(batch.input_ids)
    used = sorted({c for c in batch.row_clip if c is not None})
    if not used:
        return embeds
    features = dict(zip(used, encode_vision(model, [batch.clips[c] for c in used])))
    per_row = torch.cat([features[c] for c in batch.row_clip if c is not None]).to(embeds.dtype)
    vision_mask = (batch.mm_types != 0).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(vision_mask, per_row)


def hidden_states(model, embeds, position_ids, attention_mask, cache=None):
    """The language model on embeddings with explicit 3-D positions; logits are left to the caller, so that only
    completion positions ever pay for the (vocab-sized) head."""
    lm = unwrap(model).model.language_model
    return lm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
              use_cache=cache is not None).last_hidden_state


def completion_logprobs(model, batch, completion_ids, completion_mask):
    """(B, T) log-probs of each completion token given its prompt, in one forward over prompt + completion."""
    B, T = completion_ids.shape
    P = batch.input_ids.shape[1]
    embed_tokens = unwrap(model).model.get_input_embeddings()
    embeds = torch.cat([embed_prompts(model, batch), embed_tokens(completion_ids)], dim=1)  # (B, P+T, D)
    completion_pos = (batch.next_pos[:, None] + torch.arange(T, device=completion_ids.device)).expand(3, B, T)
    positions = torch.cat([batch.position_ids, completion_pos], dim=2)                    # (3, B, P+T)
    mask = torch.cat([batch.attention_mask, completion_mask.long()], dim=1)
    hidden = hidden_states(model, embeds, positions, mask)[:, P - 1:-1]                    # (B, T, D) predicts token t
    logits = unwrap(model).lm_head(hidden).float()                                          # (B, T, V)
    return logits.gather(-1, completion_ids[..., None]).squeeze(-1) - logits.logsumexp(-1)

# ----------------------------------------------------------------------------- generation with a KV cache

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
    position = batch.next_pos.clone()
    stop = torch.tensor(stop_ids, device=position.device)
    done = torch.zeros(B, dtype=torch.bool, device=position.device)
    tokens = []
    for _ in range(max_new_tokens):
        token = sample_token(inner.lm_head(last).float(), temperature, top_p, generator).masked_fill(done, pad_id)
        tokens.append(token)
        done |= torch.isin(token, stop)
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        text_pos = position.view(1, B, 1).expand(3, B, 1)  # after the prompt all three M-RoPE rows advance together
        last = hidden_states(model, inner.model.get_input_embeddings()(token[:, None]), text_pos, mask, cache)[:, -1]
        position += 1
    ids = torch.stack(tokens, dim=1)
    is_stop = torch.isin(ids, stop).long()
    return ids, ((is_stop.cumsum(1) - is_stop) == 0).long()

# ----------------------------------------------------------------------------- configurator (nanoGPT's, strict)

def configure(config, argv):
    """Apply overrides to a script's config block: config files (python assignments, e.g. configs/tgrpo_paper.py)
    and --key=value, in order. An unknown key or a value of another type is an error, never a silent new name."""
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string
            overrides = {key: value}
        else:
            overrides = {}
            with open(arg) as f:
                exec(f.read(), {}, overrides)
        for key, value in overrides.items():
            if key not in config:
                raise ValueError(f"unknown config key {key!r} (from {arg})")
            old = config[key]
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if old is not None and type(value) is not type(old):
                raise TypeError(f"config {key}: expected {type(old).__name__}, got {value!r} (from {arg})")
            config[key] = value
    return config

# ----------------------------------------------------------------------------- distributed, one code path

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def print0(*args, **kwargs):
    if RANK == 0:
        print(*args, **kwargs, flush=True)


def setup_distributed():
    """torchrun's environment switches distributed mode on (any number of nodes); returns the device to use."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if WORLD > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return "cpu"


def finish():
    """End a worker: gloo sometimes aborts at interpreter exit after all work is done (NOTES.md), so leave at once."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)


def read_deepspeed_config(path):
    """A DeepSpeed json with what the scripts decide themselves filled in: one micro-batch per step (the scripts
    accumulate by hand) and bf16 exactly when on GPU."""
    with open(path) as f:
        ds = json.load(f)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    ds.setdefault("bf16", {})["enabled"] = torch.cuda.is_available()
    return ds


class Optimizer:
    """AdamW behind one interface for 1 process, N processes (gradients averaged by hand) and DeepSpeed ZeRO
    (from a json config; a torch optimizer as its client optimizer, so no C++ ops are built)."""

    def __init__(self, model, lr, weight_decay, grad_clip, betas=(0.9, 0.999), deepspeed_config=""):
        self.grad_clip, self.engine = grad_clip, None
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
        self.model = model
        if deepspeed_config:
            import deepspeed
            ds = read_deepspeed_config(deepspeed_config) | {"gradient_clipping": grad_clip}
            self.engine, self.opt, _, _ = deepspeed.initialize(model=model, optimizer=self.opt, config=ds)
            self.model = self.engine

    def backward(self, loss):
        if self.engine:
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self, lr):
        """Average gradients over ranks, clip, step at `lr`; returns the gradient norm before clipping."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.engine:
            self.engine.step()
            return float(self.engine.get_global_grad_norm() or 0.0)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if WORLD > 1:  # every rank reduces every parameter, so a rank whose batch left one unused cannot hang
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm.item()

def cosine_lr(step, lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

def is_zero3(model):
    return hasattr(model, "zero_optimization_stage") and model.zero_optimization_stage() == 3


def gathered_for_generation(model):
    """Under ZeRO-3 gather the full weights once for a whole rollout phase, not once per token per layer."""
    if is_zero3(model):
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(model.module.parameters()))
    return contextlib.nullcontext()


def frozen_reference(path, device, deepspeed_config="", attn="sdpa"):
    """The KL reference: a frozen copy of the starting policy (bf16 on GPU). Under ZeRO-3 it is partitioned like
    the policy (DeepSpeed runs stage 3 without an optimizer); under ZeRO-2 a replica per GPU is small enough."""
    ref, _ = load_model(path, device, attn=attn)
    ref.requires_grad_(False).eval()
    if deepspeed_config:
        ds = read_deepspeed_config(deepspeed_config)
        if ds.get("zero_optimization", {}).get("stage") == 3:
            import deepspeed
            ref = deepspeed.initialize(model=ref, config=ds)[0]
    return ref

# ----------------------------------------------------------------------------- checkpoints, atomic

def rng_state():
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"])  # tensors load with weights_only
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    state["numpy"]["state"]["key"] = state["numpy"]["state"]["key"].numpy()
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out_dir, step, model, tokenizer, optimizer, config, extra=None):
    """Write out_dir/step_N: an HF folder (safetensors, config, tokenizer) that from_pretrained loads, the
    optimizer/DeepSpeed state, each rank's RNG states and the run config. It is built under a temporary name and
    renamed into place, and `latest` is replaced atomically after it, so a kill at any moment leaves the last good
    checkpoint whole."""
    check_in_sync(optimizer.model)
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if RANK == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if optimizer.engine:  # every rank writes its own ZeRO partition; rank 0 the gathered 16-bit HF weights
        optimizer.engine.save_checkpoint(tmp, tag="deepspeed")
        zero3 = optimizer.engine.zero_optimization_stage() == 3
        state_dict = optimizer.engine._zero3_consolidated_16bit_state_dict() if zero3 else None  # all ranks take part
    else:
        state_dict = None
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{RANK}.pt"))
    if RANK == 0:
        unwrap(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if not optimizer.engine:
            torch.save(optimizer.opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump({"step": step, "config": config, **(extra or {})}, f, indent=1)
    barrier()  # every rank's files are in place before the folder is renamed
    if RANK == 0:
        if os.path.exists(final):  # a rerun of the same step: the old one stays whole until the new one is in place
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    barrier()
    return final


def check_in_sync(model):
    """Raise if the ranks' weights have drifted apart (compared by a position-weighted checksum)."""
    if WORLD == 1:
        return
    with gathered_for_generation(model), torch.no_grad():
        params = list(unwrap(model).parameters())
        checksum = sum(p.double().sum() * (i + 1) for i, p in enumerate(params)).reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(WORLD)]
    dist.all_gather(sums, checksum)
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"ranks out of sync: weight checksums {[s.item() for s in sums]}")


def latest_checkpoint(out_dir):
    path = os.path.join(out_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return os.path.join(out_dir, f.read().strip())


def load_training_state(ckpt, optimizer):
    """Restore optimizer/DeepSpeed state and this rank's RNG states (weights come through load_model(ckpt));
    returns run.json. Everything is read with weights_only=True."""
    if optimizer.engine:
        optimizer.engine.load_checkpoint(ckpt, tag="deepspeed", load_module_strict=True)
    else:
        optimizer.opt.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True))
    set_rng_state(torch.load(os.path.join(ckpt, f"rng_rank{RANK}.pt"), weights_only=True))
    with open(os.path.join(ckpt, "run.json")) as f:
        return json.load(f)


def barrier():
    if dist.is_initialized():
        dist.barrier()
