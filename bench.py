"""Speed, our way against the official code's, in one run (README: "Speed", "GPU check"); --memory=True instead: peak
RSS of one T-GRPO step, full fine-tuning against LoRA (README: "Fewer GPUs").

    python bench.py                        # the tiny model (out/tiny-qwen2.5-vl), or --model_path=...
    python bench.py configs/bench_gpu.py   # one GPU: Qwen2.5-VL-7B built from its config, random bf16 weights

G ordered + G~ shuffled rows of a random clip: rollouts of new_tokens each (none stops) in one generate call, each clip
encoded once, against the official two model.generate calls with the pixels repeated per row; then the log-prob +
backward pass of the G ordered rows both ways.
"""
import copy
import multiprocessing
import resource
import sys
import time
import numpy as np
import torch
from peft import get_peft_model
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
import common as C
import data
import lifecycle
import model as M
import tgrpo

model_path = "out/tiny-qwen2.5-vl"  # any Qwen2.5-VL folder
random_7b = ""                      # "full": Qwen2.5-VL-7B, random weights; "small": a narrow one (CPU test, memory)
num_generations = 8                 # G rows see the clip in order
num_contrast = 4                    # G~ rows see it shuffled
frames = 16                         # frames in the clip
height = 112                        # frame size in pixels, multiples of 28
width = 112
new_tokens = 32                     # generated per row
grad_ckpt = False                   # gradient checkpointing in the log-prob + backward pass (paper scale)
repeats = 3                         # timings are the best of this many
peak_tflops = 989.0                 # dense bf16 peak of the GPU (H100 and H200 SXM), for MFU
hbm_tb_s = 3.35                     # its memory bandwidth (H100 SXM; H200: 4.8), for the decode bound
memory = False                      # True: memory_peak() with full fine-tuning and with LoRA, in forked processes
C.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [], choices=dict(random_7b=("", "full", "small")))

def config_7b(small):
    """Qwen2.5-VL-7B-Instruct's architecture (its config.json); small: 4 text layers of width 512 and 2 vision blocks,
    same vocab and ids (head widths stay 128, as mrope_section needs, and 80)."""
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2)
    if small:
        text |= dict(hidden_size=512, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
        vision |= dict(depth=2, hidden_size=160, intermediate_size=256, num_heads=2, out_hidden_size=512,
                       fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)

def timed(fn):
    """(fn's last result, seconds until the GPU is done with it: the fastest of `repeats` runs)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        best = min(best, time.perf_counter() - t0)
    return out, best

def prompt_batch(config, device):
    """G + G~ rows of one prompt (the clip, 60 question tokens clear of special ids); the first G are ordered."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    clips = [data.make_clip(video, 2.0), data.make_clip(data.contrast_frames(video, rng), 2.0)]
    n = clips[0].num_tokens
    ids = [config.vision_start_token_id, *[config.video_token_id] * n, config.vision_end_token_id]
    prompt = (ids + rng.integers(100, 400, 60).tolist(), [0] + [2] * n + [0] * 61)
    return M.collate_prompts([prompt] * (num_generations + num_contrast), clips, 0, config, device,
                             [0] * num_generations + [1] * num_contrast)

def hf_inputs(batch, ids):
    """transformers' inputs for prompt + completion ids, the official code's way: the pixels once per row."""
    clips, dev = [batch.clips[c] for c in batch.row_clip], batch.input_ids.device
    return dict(input_ids=torch.cat([batch.input_ids, ids], 1), attention_mask=torch.cat([batch.attention_mask,
                torch.ones_like(ids)], 1), mm_token_type_ids=torch.cat([batch.mm_types, torch.zeros_like(ids)], 1),
                pixel_values_videos=torch.cat([c.pixel_values for c in clips]).to(dev),
                video_grid_thw=torch.tensor([c.grid_thw for c in clips], device=dev),
                second_per_grid_ts=torch.tensor([c.second_per_grid for c in clips], device=dev))

def hf_logprobs(net, batch, ids, mask):
    """Completion log-probs from transformers' forward (all logits at once) at our M-RoPE positions."""
    positions = (batch.next_pos[:, None] + torch.arange(ids.shape[1], device=ids.device)).expand(3, -1, -1)
    positions = torch.cat([batch.position_ids, positions], 2)
    logits = net(**hf_inputs(batch, ids), position_ids=positions).logits[:, batch.input_ids.shape[1] - 1:-1].float()
    return logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)

def memory_peak(lora):
    """Peak RSS (MB) of a process through one T-GRPO step on CPU, a rollout and tgrpo.train_step (reference, loss,
    backward, AdamW update), on config_7b's small model; LoRA: rank 16, tgrpo's targets."""
    config, G = config_7b(True), num_generations
    torch.manual_seed(0)
    net = Qwen2_5_VLForConditionalGeneration._from_config(config)
    net = get_peft_model(net, lifecycle.lora_config(dict(tgrpo.config, lora_rank=16))) if lora else net
    ref = net if lora else copy.deepcopy(net)  # LoRA: the policy, its adapters off (train_step)
    batch = prompt_batch(config, "cpu")
    ids, mask = M.generate(net.eval(), batch, new_tokens, [], 0, generator=torch.Generator().manual_seed(0))
    tgrpo.train_step(C.Optimizer(net.train(), 1e-5, 0.01, 1.0), net, ref, batch.select(range(G)), ids[:G], mask[:G],
                     torch.randn(G, generator=torch.Generator().manual_seed(0)), 1e-5)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

if __name__ == "__main__":
    if memory:  # each in a process forked before any model exists
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        full, lora = [multiprocessing.get_context("fork").Pool(1).apply(memory_peak, (lora,)) for lora in (False, True)]
        sys.exit(print(f"peak RSS of one T-GRPO step: full {full:.0f} MB, LoRA {lora:.0f} MB, {lora / full:.2f}x; "
                       f"less the {start:.0f} MB before the model: {(lora - start) / (full - start):.2f}x"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if random_7b:
        torch.manual_seed(0)
        with torch.device(device):  # bf16 on GPU; fp32 on CPU, whose bf16 matmuls crawl
            net = Qwen2_5_VLForConditionalGeneration._from_config(config_7b(random_7b == "small"), dtype=torch.bfloat16
                                                                  if device == "cuda" else torch.float32)
    else:
        net = lifecycle.load_model(model_path, device)[0]
    batch, G = prompt_batch(net.config, device), num_generations
    sub, pads = batch.select(range(G)), [net.config.video_token_id, net.config.image_token_id]  # not media if sampled
    text = sum(p.numel() for n, p in net.named_parameters() if "visual" not in n and "embed_tokens" not in n)
    vision = sum(p.numel() for p in net.model.visual.parameters())
    ours = lambda n: M.generate(net, batch, n, [], 0, generator=torch.Generator(device).manual_seed(0))
    hf = lambda b: net.generate(**hf_inputs(b, b.input_ids[:, :0]), max_new_tokens=new_tokens, top_k=0,
                                min_new_tokens=new_tokens, do_sample=True, pad_token_id=0, suppress_tokens=pads)
    (_, first), ((ids, mask), t_ours) = timed(lambda: ours(1)), timed(lambda: ours(new_tokens))
    _, t_hf = timed(lambda: (hf(sub), hf(batch.select(range(G, len(batch.row_clip))))))
    decode, tokens = (t_ours - first) / (new_tokens - 1), len(batch.row_clip) * new_tokens
    print(f"{text / 1e6:.1f} M text + {vision / 1e6:.1f} M vision parameters on {device}, {len(batch.row_clip)} rows "
          f"of {batch.input_ids.shape[1]} prompt tokens ({batch.clips[0].num_tokens} vision) + {new_tokens} new")
    print(f"rollout  ours {tokens / t_ours:.1f} tok/s, official way {tokens / t_hf:.1f} tok/s: ratio "
          f"{t_hf / t_ours:.2f}x (goal >= 1.0x); ours: prefill {first - decode:.3f} s, decode {decode * 1e3:.2f} "
          f"ms/token (HBM bound {text * net.dtype.itemsize / (hbm_tb_s * 1e12) * 1e3:.2f})")
    ids, mask = ids[:G], mask[:G]
    if grad_ckpt:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flops = 6 * (text * G * (sub.input_ids.shape[1] + ids.shape[1]) + vision * sub.clips[0].pixel_values.shape[0])
    for attn in dict.fromkeys(["sdpa", C.ATTN]):  # and flash-attention where it is installed
        net.train().set_attn_implementation(attn)
        seconds, line = {}, f"loss     {attn}, log-prob + backward of {G} rows:"
        for way, logprobs in (("ours", M.completion_logprobs), ("official way", hf_logprobs)):
            torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
            _, seconds[way] = timed(lambda: ((logprobs(net, sub, ids, mask) * mask).sum().backward(), net.zero_grad()))
            peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
            line += f" {way} {seconds[way]:.3f} s (MFU {flops / seconds[way] / peak_tflops / 1e12:.1%}, {peak:.1f} GB),"
        print(f"{line} ratio {seconds['ours'] / seconds['official way']:.2f}x; with the rollouts "
              f"{(t_ours + seconds['ours']) / (t_hf + seconds['official way']):.2f}x (goal <= 0.5x)")
    with torch.no_grad():
        diff = (M.completion_logprobs(net.eval(), sub, ids, mask) - hf_logprobs(net, sub, ids, mask)).abs() * mask
    print(f"vision once vs pixels per row: max |diff| of log-probs {diff.max().item():.3g}")
