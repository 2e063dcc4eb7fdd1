"""Speed, as ratios measured in one run on the same model and data (README: "Speed").

    python bench.py                        # the tiny model (out/tiny-qwen2.5-vl) on synthetic clips
    python bench.py --model_path=/path/to/Qwen2.5-VL-7B-Instruct --frames=16 --size=448   (GPU)

1. Rollout: model.generate() from transformers against our KV-cache generator, same prompts, same number of new
   tokens (no early stop), same sampling: tokens/s and the ratio.
2. One T-GRPO step (rollouts, policy + reference log-probs, backward) done our way (each clip encoded once,
   ordered + shuffled rows in one generate call) against the official code's way (pixels repeated per row in every
   forward, ordered and shuffled rollouts as two generate calls): seconds per step and the ratio.
"""
import sys
import time
import numpy as np
import torch
import common as C
import data
import model as M

model_path = "out/tiny-qwen2.5-vl"  # any Qwen2.5-VL folder
prompts = 2                         # video prompts per step
num_generations = 8                 # G ordered rows per prompt
num_contrast = 4                    # G~ contrast rows per prompt
frames = 16                         # frames per clip
size = 112                          # clip side in pixels (multiple of 28)
new_tokens = 32                     # generated per row, no early stop
repeats = 3                         # timings are the best of this many
C.configure(globals(), sys.argv[1:])


def best_time(fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def hf_inputs(batch):
    """What the official code hands transformers: one copy of the pixels per row."""
    clips = [batch.clips[c] for c in batch.row_clip]
    dev = batch.input_ids.device
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, mm_token_type_ids=batch.mm_types,
                pixel_values_videos=torch.cat([c.pixel_values for c in clips]).to(dev),
                video_grid_thw=torch.tensor([c.grid_thw for c in clips], device=dev),
                second_per_grid_ts=torch.tensor([c.second_per_grid for c in clips], device=dev))


def hf_logprobs(net, batch, ids, mask):
    inputs = hf_inputs(batch)
    P = batch.input_ids.shape[1]
    inputs.update(input_ids=torch.cat([batch.input_ids, ids], 1), attention_mask=torch.cat([batch.attention_mask, mask], 1),
                  mm_token_type_ids=torch.cat([batch.mm_types, torch.zeros_like(ids)], 1))
    logits = net(**inputs).logits[:, P - 1:-1].float()
    return logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)


def loss_and_backward(logp, ref_logp, mask):
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    loss = ((-(torch.exp(logp - logp.detach()) * torch.randn(logp.shape[0], 1, device=logp.device)) + 0.04 * kl) * mask).sum() / mask.sum()
    loss.backward()


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, tok = M.load_model(model_path, device)
    ref, _ = M.load_model(model_path, device)
    tps = net.config.vision_config.tokens_per_second
    rng = np.random.default_rng(0)
    record = {"problem": "Which way does the object move?", "problem_type": "multiple choice", "options": ["A. left", "B. right"]}
    clips, encoded, row_clip = [], [], []
    for p in range(prompts):
        frames_np = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
        clips += [data.make_clip(frames_np, 2.0), data.make_clip(data.contrast_frames(frames_np, rng), 2.0)]
        prompt = data.encode_prompt(tok, record, clips[-1], max_tokens=2**20)
        for clip_index, n in ((len(clips) - 2, num_generations), (len(clips) - 1, num_contrast)):
            encoded += [prompt] * n
            row_clip += [clip_index] * n
    batch = M.collate_prompts(encoded, clips, row_clip, tok.pad_token_id, tps, device)
    ordered = [b for b, c in enumerate(row_clip) if c % 2 == 0]
    shuffled = [b for b, c in enumerate(row_clip) if c % 2 == 1]
    rows = len(row_clip)
    sample = dict(temperature=1.0, top_p=1.0)
    vision_pads = tok.convert_tokens_to_ids([data.VIDEO_PAD, data.IMAGE_PAD])
    print(f"{model_path} on {device}: {prompts} prompts x ({num_generations} + {num_contrast}) rows, {frames} frames of "
          f"{size}x{size} ({clips[0].num_tokens} vision tokens per clip), {new_tokens} new tokens per row")

    def ours_generate(b=batch):
        return M.generate(net, b, new_tokens, [], tok.pad_token_id, generator=torch.Generator(device).manual_seed(0), **sample)

    def hf_generate(b=batch):
        # an untrained model may sample a <|video_pad|>, which transformers would then count as a media token
        out = net.generate(**hf_inputs(b), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                           pad_token_id=tok.pad_token_id, suppress_tokens=vision_pads, **sample)
        return out[:, b.input_ids.shape[1]:]

    with torch.no_grad():
        t_ours, t_hf = best_time(ours_generate), best_time(hf_generate)
    tokens = rows * new_tokens
    print(f"rollout  ours {tokens / t_ours:9.1f} tok/s   model.generate {tokens / t_hf:9.1f} tok/s   "
          f"speed ratio ours/generate {t_hf / t_ours:.2f}x (goal >= 1.0x)")

    def step_ours():
        ids, mask = ours_generate()
        sub, sub_ids, sub_mask = batch.select(ordered), ids[ordered], mask[ordered]
        with torch.no_grad():
            ref_logp = M.completion_logprobs(ref, sub, sub_ids, sub_mask)
        loss_and_backward(M.completion_logprobs(net, sub, sub_ids, sub_mask), ref_logp, sub_mask)
        net.zero_grad(set_to_none=True)

    def step_official():
        with torch.no_grad():
            sub = batch.select(ordered)
            ids = hf_generate(sub)
            hf_generate(batch.select(shuffled))  # the second generate call, for p~
            mask = torch.ones_like(ids)
            ref_logp = hf_logprobs(ref, sub, ids, mask)
        loss_and_backward(hf_logprobs(net, sub, ids, mask), ref_logp, mask)
        net.zero_grad(set_to_none=True)

    t_ours, t_official = best_time(step_ours), best_time(step_official)
    print(f"step     ours {t_ours:7.3f} s        official way {t_official:7.3f} s        "
          f"time ratio ours/official {t_ours / t_official:.2f}x (goal <= 0.5x)")
