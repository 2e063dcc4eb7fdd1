"""Speed ratios and the GPU check, each measured in one run (README: "Speed", "GPU check").

    python bench.py                        # ratios on the tiny model (out/tiny-qwen2.5-vl), or --model_path=...
    python bench.py configs/bench_gpu.py   # GPU check: Qwen2.5-VL-7B built from its config, random bf16 weights

Ratios: one T-GRPO step our way (one generate call for all rows, each clip encoded once) against the official
code's (two model.generate calls, the second for p~ only; pixels repeated per row in every forward): rollout
tokens/s and step seconds, same prompts and sampling, no row stopping early.
"""
import importlib.util
import sys
import time
import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
import common as C
import data
import model as M

model_path = "out/tiny-qwen2.5-vl"  # any Qwen2.5-VL folder (ratios)
gpu_check = False                   # True: the GPU check on Qwen2.5-VL-7B's architecture, random weights
small = False                       # the GPU check with 2 narrow layers a tower (same vocab and ids): its CPU test
num_generations = 8                 # G rows see the prompt's clip (random frames) in order
num_contrast = 4                    # G~ rows see it shuffled
frames = 16                         # frames in the clip
height = 112                        # frame size in pixels, multiples of 28
width = 112
new_tokens = 32                     # generated per row
repeats = 3                         # timings are the best of this many
peak_tflops = 989.0                 # dense bf16 peak of the GPU (H100 and H200 SXM), for MFU
hbm_tb_s = 3.35                     # its memory bandwidth (H100 SXM; H200: 4.8), for the decode bound
C.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [])


def config_7b(small):
    """Qwen2.5-VL-7B-Instruct's architecture (its config.json); small: 2 narrow layers a tower, same vocab and ids
    (head widths stay 128, as mrope_section needs, and 80)."""
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2)
    if small:
        text |= dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1)
        vision |= dict(depth=2, hidden_size=160, intermediate_size=256, num_heads=2, out_hidden_size=256,
                       fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


def timed(fn, runs=1):
    """(fn's result, seconds until the GPU is done with it): the fastest of `runs` runs."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        best = min(best, time.perf_counter() - t0)
    return out, best


def prompt_batch(config, device):
    """One prompt (a clip of random frames, 60 question tokens) for G rows, shuffled for G~ rows: the first G rows
    are the ordered ones."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    clips = [data.make_clip(video, 2.0), data.make_clip(data.contrast_frames(video, rng), 2.0)]
    n = clips[0].num_tokens
    ids = [config.vision_start_token_id, *[config.video_token_id] * n, config.vision_end_token_id]
    prompt = (ids + rng.integers(100, 400, 60).tolist(), [0] + [2] * n + [0] * 61)  # ids clear of special ones
    return M.collate_prompts([prompt] * (num_generations + num_contrast), clips, [0] * num_generations +
                             [1] * num_contrast, 0, config.vision_config.tokens_per_second, device)


def hf_inputs(batch, ids):
    """transformers' forward inputs for prompt + completion ids, the official code's way: the pixels once per row."""
    clips, dev, T = [batch.clips[c] for c in batch.row_clip], batch.input_ids.device, ids.shape[1]
    return dict(input_ids=torch.cat([batch.input_ids, ids], 1), attention_mask=torch.cat([batch.attention_mask,
                torch.ones_like(ids)], 1), mm_token_type_ids=torch.cat([batch.mm_types, torch.zeros_like(ids)], 1),
                pixel_values_videos=torch.cat([c.pixel_values for c in clips]).to(dev),
                video_grid_thw=torch.tensor([c.grid_thw for c in clips], device=dev),
                second_per_grid_ts=torch.tensor([c.second_per_grid for c in clips], device=dev))


def hf_logprobs(net, batch, ids, mask):
    """Completion log-probs from transformers' forward at our M-RoPE positions."""
    positions = (batch.next_pos[:, None] + torch.arange(ids.shape[1], device=ids.device)).expand(3, -1, -1)
    positions = torch.cat([batch.position_ids, positions], 2)
    logits = net(**hf_inputs(batch, ids), position_ids=positions).logits[:, batch.input_ids.shape[1] - 1:-1].float()
    return logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)


def ratios(device):
    net, ref = (M.load_model(model_path, device)[0] for _ in range(2))
    batch = prompt_batch(net.config, device)
    ordered, shuffled = list(range(num_generations)), list(range(num_generations, len(batch.row_clip)))
    pads = [net.config.video_token_id, net.config.image_token_id]  # transformers would count a sampled one as media
    hf_generate = lambda b: net.generate(**hf_inputs(b, b.input_ids[:, :0]), max_new_tokens=new_tokens, top_k=0,
                                         min_new_tokens=new_tokens, do_sample=True, pad_token_id=0,
                                         suppress_tokens=pads)[:, b.input_ids.shape[1]:]

    def step(official):
        """Rollouts, then reference and policy log-probs of the ordered rows and a backward; returns rollout s."""
        sub = batch.select(ordered)
        if official:
            (ids, _), rollout_s = timed(lambda: (hf_generate(sub), hf_generate(batch.select(shuffled))))
            mask, logprobs = torch.ones_like(ids), hf_logprobs
        else:
            (ids, mask), rollout_s = timed(lambda: M.generate(net, batch, new_tokens, [], 0,
                                                              generator=torch.Generator(device).manual_seed(0)))
            ids, mask, logprobs = ids[ordered], mask[ordered], M.completion_logprobs
        with torch.no_grad():
            ref_logp = logprobs(ref, sub, ids, mask)
        logp = logprobs(net, sub, ids, mask)
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        ((torch.randn(len(ordered), 1, device=device) * logp + 0.04 * kl) * mask).sum().backward()
        net.zero_grad(set_to_none=True)
        return rollout_s
    (r_ours, t_ours), (r_official, t_official) = (np.min([timed(lambda: step(o)) for _ in range(repeats)], 0)
                                                  for o in (False, True))
    tokens = len(batch.row_clip) * new_tokens
    print(f"rollout  ours {tokens / r_ours:7.1f} tok/s   official way {tokens / r_official:7.1f} tok/s   "
          f"speed ratio {r_official / r_ours:.2f}x (goal >= 1.0x)")
    print(f"step     ours {t_ours:7.3f} s       official way {t_official:7.3f} s       "
          f"time ratio {t_ours / t_official:.2f}x (goal <= 0.5x)")


def check_gpu(device):
    """One rollout (prefill s; decode ms/token against reading every text weight from HBM once a token); log-prob +
    backward of the ordered rows (gradient checkpointing; each attention kernel installed): s, MFU, peak memory;
    the vision-once log-probs against transformers' forward with pixels per row (max |diff|)."""
    torch.manual_seed(0)
    with torch.device(device):  # bf16 on GPU; fp32 on CPU, whose bf16 matmuls crawl
        net = Qwen2_5_VLForConditionalGeneration._from_config(config_7b(small), dtype=torch.bfloat16 if device
                                                              == "cuda" else torch.float32)
    batch, ordered = prompt_batch(net.config, device), list(range(num_generations))
    text = sum(p.numel() for n, p in net.named_parameters() if "visual" not in n and "embed_tokens" not in n)
    vision = sum(p.numel() for p in net.model.visual.parameters())
    generate = lambda n: timed(lambda: M.generate(net, batch, n, [], 0, generator=torch.Generator(device)), repeats)
    (_, first), ((ids, mask), total) = generate(1), generate(new_tokens)  # prefill + one decode step; all tokens
    decode = (total - first) / (new_tokens - 1)
    print(f"{text / 1e9:.2f} B text + {vision / 1e9:.2f} B vision parameters on {device}, {len(mask)} rows of "
          f"{batch.input_ids.shape[1]} prompt tokens: prefill {first - decode:.3f} s, decode {decode * 1e3:.1f} "
          f"ms/token, HBM bound {text * 2 / (hbm_tb_s * 1e12) * 1e3:.1f} ms/token")
    sub, ids, mask = batch.select(ordered), ids[ordered], mask[ordered]
    net.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patches = sum(sub.clips[c].pixel_values.shape[0] for c in set(sub.row_clip))  # each clip encoded once
    flops = 6 * (text * len(ordered) * (sub.input_ids.shape[1] + ids.shape[1]) + vision * patches)  # no recompute
    for attn in ["sdpa"] + ["flash_attention_2"] * bool(importlib.util.find_spec("flash_attn")):
        net.set_attn_implementation(attn)
        torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
        _, s = timed(lambda: (M.completion_logprobs(net, sub, ids, mask).sum().backward(), net.zero_grad()), repeats)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
        print(f"{attn}: log-prob + backward of {len(ordered)} rows {s:.2f} s, MFU "
              f"{flops / s / (peak_tflops * 1e12):.1%}, peak memory {peak:.1f} GB")
    with torch.no_grad():
        diff = (M.completion_logprobs(net.eval(), sub, ids, mask) - hf_logprobs(net, sub, ids, mask)).abs() * mask
    print(f"vision once vs pixels per row: max |diff| of log-probs {diff.max().item():.3g}")


if __name__ == "__main__":
    (check_gpu if gpu_check else ratios)("cuda" if torch.cuda.is_available() else "cpu")
