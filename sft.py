"""SFT cold start: teach Qwen2.5-VL the <think>...</think><answer>...</answer> format on chain-of-thought data.

    python sft.py                                               # tiny model, synthetic task, CPU, minutes
    python sft.py --max_steps=50 --batch_size=4                 # any config value from the command line
    torchrun --nproc_per_node 8 sft.py configs/sft_paper.py     # Qwen2.5-VL-7B, Video-R1-COT-165k, ZeRO-2
    torchrun --nnodes 2 --node_rank $R --master_addr $HOST --nproc_per_node 8 sft.py configs/sft_paper.py

Where this departs from the official code: the loss covers the assistant tokens only (the official SFT also trains
on the prompt); the sampling fps reaches the model's temporal positions (it does not there); a batch may mix images
and videos of any count per device.
"""
import json
import math
import os
import sys
import time
import numpy as np
import torch
import data
import model as M

# ----------------------------------------------------------------------------- config
model_path = "out/tiny-qwen2.5-vl"   # HF folder to start from; the tiny model is written here on first use
data_dir = "out/synthetic"           # the built-in synthetic task, generated here on first use
train_json = ""                      # "" -> data_dir/sft.json; records need process + solution
media_root = ""                      # "" -> the JSON's folder; record paths are relative to it
val_records = 64                     # the last N records of train_json are held out for the validation loss
out_dir = "out/sft"                  # checkpoints (step_N/, latest) and metrics.jsonl
seed = 0                             # data order and everything random derives from (seed, step, rank)
max_steps = 1500                     # optimizer steps (~3.5 min on 2 CPU cores; the tiny model needs ~800 to start using the frames)
batch_size = 8                       # prompts per device per micro-step
grad_accum = 1                       # micro-steps per optimizer step
lr = 2e-3                            # peak learning rate (paper scale: 1e-6 to 1e-5)
warmup_steps = 20                    # linear warmup, then cosine to min_lr_ratio * lr
min_lr_ratio = 0.1
weight_decay = 0.01                  # SPEC
grad_clip = 5.0                      # SPEC: max grad norm
max_target_tokens = 768              # SPEC: longer targets are truncated (counted in the log)
fps = 2.0                            # frame sampling (SPEC): fps, frame count limits, per-frame pixel limits
min_frames = 4
max_frames = 16
min_pixels = 4 * 28 * 28
max_pixels = 128 * 28 * 28
skip_bad = False                     # True: a bad record or undecodable clip is skipped and counted, not fatal
eval_interval = 100                  # validation loss every N steps
ckpt_interval = 500                  # checkpoint every N steps (and at the end)
log_interval = 50
resume = False                       # continue bit-exactly from out_dir/latest
run_steps = 0                        # stop this process after N steps (0: run to max_steps); resume continues
attn = "sdpa"                        # attention kernel: "sdpa", or "flash_attention_2" where installed
grad_ckpt = False                    # gradient checkpointing (paper scale)
deepspeed = ""                       # a DeepSpeed json (configs/ds_zero2.json) to use ZeRO; "" = plain torch
# -----------------------------------------------------------------------------
config = M.configure({k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))},
                     sys.argv[1:] if __name__ == "__main__" else [])
globals().update(config)
LIMITS = dict(fps=fps, min_frames=min_frames, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)


def ensure_default_inputs():
    """The default run needs no download: the synthetic task and the tiny model are built locally once."""
    if M.RANK == 0 and data_dir == "out/synthetic" and not os.path.exists(os.path.join(data_dir, "sft.json")):
        import synthetic
        synthetic.generate(data_dir, seed=seed)
    if M.RANK == 0 and model_path == "out/tiny-qwen2.5-vl":
        records, _ = data.load_records(os.path.join(data_dir, "sft.json"))
        M.ensure_tiny_model(model_path, [data.question_text(r) + data.sft_target(r) for r in records])
    M.barrier()


def make_batch(net, records, tokenizer, device):
    """Prompts with their media, and the SFT targets as completions; a record whose media fail is skipped and
    counted only when skip_bad is set. Returns (batch, target ids, target mask, skipped, truncated) or Nones."""
    examples, skipped = data.load_examples(records, tokenizer, LIMITS, skip_bad)
    prompts = [prompt for _, prompt, _, _ in examples]
    clips = [clip for _, _, clip, _ in examples]
    targets = [tokenizer(data.sft_target(r) + "<|im_end|>", add_special_tokens=False).input_ids for r, *_ in examples]
    if not prompts:
        return None, None, None, skipped, 0
    truncated = sum(len(t) > max_target_tokens for t in targets)
    targets = [t[:max_target_tokens] for t in targets]
    T = max(len(t) for t in targets)
    ids = torch.full((len(targets), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(targets), T, dtype=torch.long)
    for i, t in enumerate(targets):
        ids[i, :len(t)], mask[i, :len(t)] = torch.tensor(t), 1
    tps = M.unwrap(net).config.vision_config.tokens_per_second
    batch = M.collate_prompts(prompts, clips, list(range(len(clips))), tokenizer.pad_token_id, tps, device)
    return batch, ids.to(device), mask.to(device), skipped, truncated


def sft_loss(net, batch, target_ids, target_mask):
    """Mean negative log-likelihood over target tokens only: prompt positions never enter the loss."""
    logprobs = M.completion_logprobs(net, batch, target_ids, target_mask)   # (B, T)
    return -(logprobs * target_mask).sum() / target_mask.sum()


@torch.no_grad()
def validation_loss(net, val, tokenizer, device):
    totals = torch.zeros(2, device=device)  # (sum of token NLL, token count) over this rank's shard
    for start in range(M.RANK * batch_size, len(val), batch_size * M.WORLD):
        batch, ids, mask, _, _ = make_batch(net, val[start:start + batch_size], tokenizer, device)
        if batch is not None:
            totals += torch.stack([-(M.completion_logprobs(net, batch, ids, mask) * mask).sum(), mask.sum()])
    if M.WORLD > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1]).item()


if __name__ == "__main__":
    device = M.setup_distributed()
    torch.manual_seed(seed + M.RANK)
    ensure_default_inputs()
    records, bad = data.load_records(train_json or os.path.join(data_dir, "sft.json"), media_root or None, skip_bad)
    assert len(records) > val_records, f"{len(records)} records: too few to hold out {val_records} for validation"
    train, val = records[:-val_records], records[-val_records:]
    ckpt = M.latest_checkpoint(out_dir) if resume else None
    on_gpu = torch.device(device).type == "cuda"
    # fp32 master weights: DeepSpeed keeps them itself under bf16; plain torch trains fp32 under bf16 autocast
    net, tokenizer = M.load_model(ckpt or model_path, device, grad_ckpt, attn,
                                  dtype=torch.bfloat16 if (on_gpu and deepspeed) else torch.float32)
    opt = M.Optimizer(net, lr, weight_decay, grad_clip, deepspeed_config=deepspeed)
    start = M.load_training_state(ckpt, opt)["step"] if ckpt else 0
    M.print0(f"{len(train)} train / {len(val)} val records ({bad} bad skipped), {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M params, "
             f"start at step {start}")
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "metrics.jsonl"), "a") if M.RANK == 0 else None
    net.train()
    for step in range(start, min(max_steps, start + run_steps) if run_steps else max_steps):
        t0, lr_now = time.time(), M.cosine_lr(step, lr, warmup_steps, max_steps, min_lr_ratio)
        losses, skipped, truncated, tokens = [], 0, 0, 0
        for micro in range(grad_accum):
            position = ((step * grad_accum + micro) * M.WORLD + M.RANK) * batch_size  # in the endless record stream
            records_now = data.epoch_slice(train, position, batch_size, seed)
            batch, ids, mask, n_skip, n_trunc = make_batch(net, records_now, tokenizer, device)
            skipped, truncated = skipped + n_skip, truncated + n_trunc
            if batch is None:
                continue
            with torch.autocast("cuda", torch.bfloat16, enabled=on_gpu):
                loss = sft_loss(opt.model, batch, ids, mask)
            opt.backward(loss / grad_accum)
            losses.append(loss.item())
            tokens += int(mask.sum())
        grad_norm = opt.step(lr_now)
        metrics = {"step": step + 1, "loss": float(np.mean(losses)) if losses else math.nan, "lr": lr_now, "grad_norm": grad_norm,
                   "target_tokens": tokens, "skipped": skipped, "truncated": truncated, "step_time": time.time() - t0}
        if (step + 1) % eval_interval == 0 or step + 1 == max_steps:
            net.eval()
            metrics["val_loss"] = validation_loss(opt.model, val, tokenizer, device)
            net.train()
        if log:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
        if (step + 1) % log_interval == 0 or "val_loss" in metrics:
            M.print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if (step + 1) % ckpt_interval == 0 or step + 1 == max_steps or step + 1 == start + run_steps:
            M.print0("checkpoint:", M.save_checkpoint(out_dir, step + 1, net, tokenizer, opt, config))
    M.finish()
