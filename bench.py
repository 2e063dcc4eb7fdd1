"""Speed, our way against the official code's, in one run (RESULTS.md: "How fast?", "The GPU
check"); --memory=True instead: peak RSS of one T-GRPO step, full fine-tuning against LoRA
(RESULTS.md: "How much memory?").

    python bench.py                        # the tiny model (out/tiny-qwen2.5-vl) or --model_path
    python bench.py configs/bench_gpu.py   # one GPU: Qwen2.5-VL-7B from its config, random bf16
    python bench.py configs/bench_gpu.py configs/bench_gpu_qwen3.py   # the same, Qwen3-VL-8B

G ordered + G~ shuffled rows of a random clip: rollouts of new_tokens each (none stops) in one
generate call, each clip encoded once, against the official two model.generate calls with the
pixels repeated per row; then the log-prob + backward pass of the G ordered rows both ways.
"""
import copy
import multiprocessing
import resource
import sys
import time
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import torch
from peft import get_peft_model
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig

import common
import data
import family
import lifecycle
import model
import tgrpo

model_path = "out/tiny-qwen2.5-vl"  # any Qwen2.5-VL folder
# "full": Qwen2.5-VL-7B, random weights; "small": a narrow one (CPU test, memory); "qwen3_8b",
# "qwen3_small": the same for Qwen3-VL-8B
random_7b = ""
num_generations = 8                 # G rows see the clip in order
num_contrast = 4                    # G~ rows see it shuffled
frames = 16                         # frames in the clip
height = 112                        # frame size in pixels, multiples of 28 (Qwen3-VL: 32)
width = 112
new_tokens = 32                     # generated per row
grad_ckpt = False                   # gradient checkpointing in the loss pass (paper scale)
repeats = 3                         # timings are the best of this many
peak_tflops = 989.0                 # dense bf16 peak of the GPU (H100 and H200 SXM), for MFU
# its memory bandwidth (H100 SXM; H200: 4.8), for the decode bound
hbm_tb_s = 3.35
# True: memory_peak() with full fine-tuning and with LoRA, in forked processes
memory = False
common.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [],
                 choices=dict(random_7b=("", "full", "small", "qwen3_8b", "qwen3_small")))


class Timed(NamedTuple):
    result: Any     # what the timed function returned on its last run
    seconds: float  # the fastest run, until the GPU was done


def config_7b(small):
    """Qwen2.5-VL-7B-Instruct's architecture (its config.json); small: 4 text layers of width 512
    and 2 vision blocks, same vocab and ids (head widths stay 128, as mrope_section needs, and
    80)."""
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
                  tokens_per_second=2)
    if small:
        text |= dict(hidden_size=512, intermediate_size=2752, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2)
        vision |= dict(depth=2, hidden_size=160, intermediate_size=256, num_heads=2,
                       out_hidden_size=512, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                            video_token_id=151656, vision_start_token_id=151652,
                            vision_end_token_id=151653, tie_word_embeddings=False)


def config_qwen3_8b(small):
    """Qwen3-VL-8B-Instruct's architecture (its config.json); small: as config_7b's (4 text layers
    of width 512, 2 vision blocks, DeepStack after both), same vocab and ids."""
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
            "mrope_interleaved": True}
    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=262144, rms_norm_eps=1e-6, rope_parameters=rope)
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  out_hidden_size=4096, patch_size=16, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24])
    if small:
        text |= dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2)
        vision |= dict(depth=2, hidden_size=160, intermediate_size=256, num_heads=2,
                       out_hidden_size=512, deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                         video_token_id=151656, vision_start_token_id=151652,
                         vision_end_token_id=151653, tie_word_embeddings=False)


def random_config(name):
    """The config of a random_7b value."""
    if name.startswith("qwen3"):
        return config_qwen3_8b(name == "qwen3_small")
    return config_7b(name == "small")


def timed(fn):
    """fn's last result and the fastest of `repeats` runs, each until the GPU is done with it."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        # kernels run asynchronously: wait for them, or the clock stops at their launch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return Timed(out, best)


class RolloutTimes(NamedTuple):
    """Our rollouts of new_tokens rows (none stops) and where their time goes."""
    result: tuple      # (ids, mask) of the new_tokens call
    seconds: float     # the new_tokens call
    prefill: float     # the prompts' forward
    decode: float      # one decode step (all rows)
    setup: float       # the rest of a call: the cache, and on a GPU the CUDA graph's capture


def rollout_times(net, batch, compile_step=False):
    """Our rollouts timed from calls of 1, 2 and new_tokens new tokens: a decode step is the
    difference of the last two over new_tokens - 2 steps, so the per-call set-up stays out of it."""
    def ours(n):
        generator = torch.Generator(batch.input_ids.device).manual_seed(0)
        return model.generate(net, batch, n, [], 0, generator=generator,
                              compile_step=compile_step)

    one = timed(lambda: ours(1)).seconds
    two = timed(lambda: ours(2)).seconds
    full = timed(lambda: ours(new_tokens))
    decode = (full.seconds - two) / (new_tokens - 2)
    prefill = one - decode
    setup = two - one - decode
    return RolloutTimes(full.result, full.seconds, prefill, decode, setup)


def prompt_batch(config, device):
    """G + G~ rows of one prompt (the clip, 60 question tokens clear of special ids); the first G
    are ordered. Qwen3-VL: a block per temporal patch, after its timestamp (6 text tokens, their
    ids arbitrary: no tokenizer here)."""
    rng = np.random.default_rng(0)
    fam = family.of(config)
    video = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    times = np.arange(frames) / 2.0  # (frames,) sampled at 2 fps
    ordered = data.make_clip(video, 2.0, times, fam)
    shuffled = data.make_clip(data.contrast_frames(video, rng), 2.0, times, fam)

    # <vision_start>, n video pads, <vision_end> (per patch after its timestamp), then the
    # question; mm types: 2 on video pads
    blocks = 1
    stamp = []
    if fam.timestamps:
        blocks = ordered.grid_thw[0]
        stamp = rng.integers(100, 400, 6).tolist()
    n = ordered.num_tokens // blocks
    block = [*stamp, config.vision_start_token_id, *repeat(config.video_token_id, n),
             config.vision_end_token_id]
    block_types = [*repeat(0, len(stamp) + 1), *repeat(2, n), 0]
    question = rng.integers(100, 400, 60).tolist()
    prompt = (block * blocks + question, block_types * blocks + [0] * 60)

    # rows 0..G-1 show clip 0 (in order), the G~ after them clip 1 (shuffled)
    rows = num_generations + num_contrast
    row_clip = [*repeat(0, num_generations), *repeat(1, num_contrast)]
    return model.collate_prompts(list(repeat(prompt, rows)), [ordered, shuffled], 0, config,
                                 device, row_clip)


def hf_inputs(batch, ids):
    """transformers' inputs for prompt + completion ids, the official code's way: the pixels once
    per row."""
    clips = [batch.clips[c] for c in batch.row_clip]
    dev = batch.input_ids.device
    # Qwen2.5-VL's temporal spacing; Qwen3-VL's time is in the prompt's text (its clips' timestamps)
    spacing = {}
    if clips[0].timestamps is None:
        seconds = [c.second_per_grid for c in clips]
        spacing = dict(second_per_grid_ts=torch.tensor(seconds, device=dev))
    return dict(
        input_ids=torch.cat([batch.input_ids, ids], 1),  # (B, P + T)
        attention_mask=torch.cat([batch.attention_mask, torch.ones_like(ids)], 1),
        mm_token_type_ids=torch.cat([batch.mm_types, torch.zeros_like(ids)], 1),
        # (B * patches, patch dim): every row's copy of its clip
        pixel_values_videos=torch.cat([c.pixel_values for c in clips]).to(dev),
        video_grid_thw=torch.tensor([c.grid_thw for c in clips], device=dev),  # (B, 3)
        **spacing,
    )


def hf_logprobs(net, batch, ids, mask):
    """Completion log-probs from transformers' forward (all logits at once) at our M-RoPE
    positions."""
    T = ids.shape[1]
    P = batch.input_ids.shape[1]
    completion_pos = batch.next_pos[:, None] + torch.arange(T, device=ids.device)  # (B, T)
    completion_pos = completion_pos.expand(3, -1, -1)  # (3, B, T): t, h and w alike for text
    positions = torch.cat([batch.position_ids, completion_pos], 2)  # (3, B, P + T)
    out = net(**hf_inputs(batch, ids), position_ids=positions)
    # the logits at P - 1 ... P + T - 2 predict the T completion tokens
    logits = out.logits[:, P - 1:-1].float()  # (B, T, V)
    return logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, T)


def memory_peak(lora):
    """Peak RSS (MB) of a process through one T-GRPO step on CPU, a rollout and tgrpo.train_step
    (reference, loss, backward, AdamW update), on config_7b's small model; LoRA: rank 16, tgrpo's
    targets."""
    config = config_7b(True)
    G = num_generations
    torch.manual_seed(0)
    net = Qwen2_5_VLForConditionalGeneration._from_config(config)
    if lora:
        net = get_peft_model(net, lifecycle.lora_config(dict(tgrpo.config, lora_rank=16)))
        # the reference is the policy with its adapters off (train_step)
        ref = net
    else:
        ref = copy.deepcopy(net)
    batch = prompt_batch(config, "cpu")

    # one rollout, then one update on the G ordered rows
    generator = torch.Generator().manual_seed(0)
    ids, mask = model.generate(net.eval(), batch, new_tokens, [], 0, generator=generator)
    optimizer = common.Optimizer(net.train(), 1e-5, 0.01, 1.0)
    advantages = torch.randn(G, generator=torch.Generator().manual_seed(0))  # (G,)
    tgrpo.train_step(optimizer, net, ref, batch.select(range(G)), ids[:G], mask[:G], advantages,
                     1e-5)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    if memory:
        # each in a process forked before any model exists
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fork = multiprocessing.get_context("fork")
        full = fork.Pool(1).apply(memory_peak, (False,))
        lora = fork.Pool(1).apply(memory_peak, (True,))
        ratio = lora / full
        ratio_over_start = (lora - start) / (full - start)
        print(f"peak RSS of one T-GRPO step: full {full:.0f} MB, LoRA {lora:.0f} MB, {ratio:.2f}x; "
              f"less the {start:.0f} MB before the model: {ratio_over_start:.2f}x")
        sys.exit()

    # the model: a checkpoint, or the 7B architecture with random weights
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if random_7b:
        torch.manual_seed(0)
        # bf16 on GPU; fp32 on CPU, whose bf16 matmuls crawl
        dtype = torch.float32
        if device == "cuda":
            dtype = torch.bfloat16
        config = random_config(random_7b)
        with torch.device(device):
            net = family.of(config).model_class._from_config(config, dtype=dtype)
    else:
        net = lifecycle.load_model(model_path, device)[0]
    batch = prompt_batch(net.config, device)
    G = num_generations
    rows = len(batch.row_clip)
    sub = batch.select(range(G))
    # media pads are not text: the official way must not sample them
    pads = [net.config.video_token_id, net.config.image_token_id]
    # the parameters each text token goes through (the embedding is a lookup, not a matmul)
    text = sum(p.numel() for name, p in net.named_parameters()
               if "visual" not in name and "embed_tokens" not in name)
    vision = sum(p.numel() for p in net.model.visual.parameters())

    # rollouts: ours in one generate call against the official way's two; none stops early
    def hf(b):
        inputs = hf_inputs(b, b.input_ids[:, :0])
        return net.generate(**inputs, max_new_tokens=new_tokens, top_k=0,
                            min_new_tokens=new_tokens, do_sample=True, pad_token_id=0,
                            suppress_tokens=pads)

    rollout = rollout_times(net, batch)
    ids, mask = rollout.result
    t_ours = rollout.seconds
    t_hf = timed(lambda: (hf(sub), hf(batch.select(range(G, rows))))).seconds
    tokens = rows * new_tokens
    # seconds per token to read the text weights once
    hbm_bound = text * net.dtype.itemsize / (hbm_tb_s * 1e12)
    print(f"{text / 1e6:.1f} M text + {vision / 1e6:.1f} M vision parameters on {device}, "
          f"{rows} rows of {batch.input_ids.shape[1]} prompt tokens "
          f"({batch.clips[0].num_tokens} vision) + {new_tokens} new")
    print(f"rollout  ours {tokens / t_ours:.1f} tok/s, official way {tokens / t_hf:.1f} tok/s: "
          f"ratio {t_hf / t_ours:.2f}x (goal >= 1.0x); ours: prefill {rollout.prefill:.3f} s, "
          f"decode {rollout.decode * 1e3:.2f} ms/token (HBM bound {hbm_bound * 1e3:.2f}), "
          f"set-up {rollout.setup:.3f} s a call (on a GPU the CUDA graph's capture)")

    # loss: the log-prob + backward pass of the G ordered rows, both ways
    ids = ids[:G]
    mask = mask[:G]
    if grad_ckpt:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # 6 flops per parameter and token (forward + backward); vision tokens are its patches
    text_tokens = G * (sub.input_ids.shape[1] + ids.shape[1])
    flops = 6 * (text * text_tokens + vision * sub.clips[0].pixel_values.shape[0])

    def loss_pass(logprobs):
        (logprobs(net, sub, ids, mask) * mask).sum().backward()
        net.zero_grad()

    # sdpa, and flash-attention where it is installed
    for attn in dict.fromkeys(["sdpa", common.ATTN]):
        net.train().set_attn_implementation(attn)
        seconds = {}
        line = f"loss     {attn}, log-prob + backward of {G} rows:"
        for way, logprobs in (("ours", model.completion_logprobs), ("official way", hf_logprobs)):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds[way] = timed(lambda: loss_pass(logprobs)).seconds
            peak = float("nan")
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated() / 1e9
            mfu = flops / seconds[way] / peak_tflops / 1e12
            line += f" {way} {seconds[way]:.3f} s (MFU {mfu:.1%}, {peak:.1f} GB),"
        ratio = seconds["ours"] / seconds["official way"]
        with_rollouts = (t_ours + seconds["ours"]) / (t_hf + seconds["official way"])
        print(f"{line} ratio {ratio:.2f}x; with the rollouts {with_rollouts:.2f}x (goal <= 0.5x)")

    # check: encoding each clip once gives the log-probs of the pixels repeated per row
    with torch.no_grad():
        ours_logprobs = model.completion_logprobs(net.eval(), sub, ids, mask)
        diff = (ours_logprobs - hf_logprobs(net, sub, ids, mask)).abs() * mask
    print(f"vision once vs pixels per row: max |diff| of log-probs {diff.max().item():.3g}")

    # decode from LoRA rank 64's merged copies (as many bytes as the weights: the same bound), and
    # on a GPU the compiled step
    lora = get_peft_model(net.eval(), lifecycle.lora_config(dict(tgrpo.config, lora_rank=64)))
    merge = timed(lambda: model.decode_weights(lora)).seconds
    lora_decode = rollout_times(lora, batch).decode
    line = f"decode   LoRA rank 64 {lora_decode * 1e3:.2f} ms/token (merging {merge:.3f} s a call)"
    if device == "cuda":
        net = lora.unload()  # the adapters out again
        start = time.perf_counter()
        model.generate(net, batch, 2, [], 0, compile_step=True)  # the first call compiles
        first_call = time.perf_counter() - start
        compiled = rollout_times(net, batch, compile_step=True)
        line += (f"; full weights, compiled step {compiled.decode * 1e3:.2f} ms/token (capture "
                 f"{compiled.setup:.3f} s a call, the first call {first_call:.1f} s)")
    print(f"{line}; HBM bound {hbm_bound * 1e3:.2f} ms/token")
