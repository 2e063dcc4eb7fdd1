"""SFT cold start: teach Qwen2.5-VL the <think>...</think><answer>...</answer> format on chain-of-thought data.

    python sft.py                                               # tiny model, synthetic task, CPU, minutes
    python sft.py --max_steps=50 --batch_size=4                 # any config value from the command line
    torchrun --nproc_per_node 8 sft.py configs/sft_paper.py     # Qwen2.5-VL-7B, Video-R1-COT-165k, ZeRO-2

Departures from the official code (loss on the answer tokens only, the real fps in the temporal positions, images
and videos mixed in any batch size): DETAILS.md, "Paper vs official code".
"""
import os
import sys
import time
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
import common as C
import data
import lifecycle
import model as M
import synthetic

# ----------------------------------------------------------------------------- config
model_path = "out/tiny-qwen2.5-vl"   # HF folder to start from; the tiny model is written here on first use
data_dir = "out/synthetic"           # the built-in synthetic task, generated here on first use
train_json = ""                      # "" -> data_dir/sft.json; records need process + solution
media_root = ""                      # "" -> the JSON's folder; record paths are relative to it
val_records = 64                     # the last N records of train_json are held out for the validation loss
out_dir = "out/sft"                  # checkpoints (step_N/, latest) and metrics.jsonl
seed = 0                             # data order and everything random derives from (seed, step, rank)
max_steps = 1500                     # ~5 min on 2 CPU cores; the tiny model needs ~800 steps to use the frames
batch_size = 8                       # prompts per device per micro-step
grad_accum = 1                       # micro-steps per optimizer step
lr = 2e-3                            # peak learning rate (paper scale: 1e-6 to 1e-5)
warmup_steps = 20                    # linear warmup, then cosine to min_lr_ratio * lr
min_lr_ratio = 0.1
weight_decay = 0.01                  # the paper's
grad_clip = 5.0                      # the paper's max grad norm
max_target_tokens = 768              # the paper's: longer targets are truncated (counted in the log)
max_prompt_tokens = 1024             # a longer prompt is a bad record (synthetic prompts: <= 250; paper scale 16384)
fps = 2.0                            # frame sampling: fps, frame count limits, per-frame pixel limits
min_frames = 4
max_frames = 16
min_pixels = 4 * 28 * 28
max_pixels = 128 * 28 * 28
skip_bad = False                     # True: a bad record, clip or prompt is skipped and counted, not fatal
eval_interval = 100                  # validation loss every N steps
ckpt_interval = 500                  # checkpoint every N steps (and at the end)
log_interval = 50
resume = False                       # continue bit-exactly from out_dir/latest
keep_checkpoints = 0                 # the newest N checkpoints keep optimizer state; 0: all do
keep_weights = True                  # older checkpoints keep their HF weights (False: deleted)
run_steps = 0                        # stop this process after N steps (0: run to max_steps); resume continues
threads = 1                          # CPU threads; 1 repeats bit for bit on any CPU count (0: torch's choice)
attn = C.ATTN                        # "flash_attention_2" where flash_attn is installed, else "sdpa"
grad_ckpt = False                    # gradient checkpointing (paper scale)
lora_rank = 0                        # > 0: train LoRA adapters of this rank (peft), base frozen; 0: full fine-tuning
lora_alpha = 32                      # adapter scale alpha / rank
lora_dropout = 0.0                   # > 0 draws masks from the global RNG, which checkpoints omit: resume not bit-exact
lora_targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # name suffixes, language model only
lora_merger = False                  # LoRA: also train the vision merger (the vision tower stays frozen)
deepspeed = ""                       # a DeepSpeed json (configs/ds_zero2.json) to use ZeRO; "" = plain torch
# -----------------------------------------------------------------------------
config = C.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [], choices=dict(attn=M.ATTENTION))

def make_batch(model, records, tokenizer, device):
    """Prompts with their media, and the SFT targets (plain text, then <|im_end|>) as completions; a bad example is
    skipped and counted under skip_bad. Returns (batch, target ids, target mask, skipped, truncated)."""
    examples, skipped = data.load_examples(records, tokenizer, config)
    if not examples:  # every record failed: a placeholder row keeps this rank's collectives in step, at zero loss
        return *lifecycle.placeholder_batch(model, device), skipped, 0
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    targets = [torch.tensor(data.encode_plain(tokenizer, data.sft_target(r)) + [end]) for r, *_ in examples]
    truncated = sum(len(t) > max_target_tokens for t in targets)
    targets = [t[:max_target_tokens] for t in targets]
    ids = pad_sequence(targets, batch_first=True, padding_value=tokenizer.pad_token_id)
    mask = pad_sequence([torch.ones_like(t) for t in targets], batch_first=True)
    prompts, clips = [prompt for _, prompt, _, _ in examples], [clip for _, _, clip, _ in examples]
    batch = M.collate_prompts(prompts, clips, tokenizer.pad_token_id, M.unwrap(model).config, device)
    return batch, ids.to(device), mask.to(device), skipped, truncated

def sft_loss(model, batch, target_ids, target_mask):
    """Mean negative log-likelihood over target tokens only: prompt positions never enter the loss."""
    logprobs = M.completion_logprobs(model, batch, target_ids, target_mask)   # (B, T)
    return -(logprobs * target_mask).sum() / target_mask.sum().clamp(min=1)

@torch.no_grad()
def validation_loss(model, val, tokenizer, device):
    totals = torch.zeros(3, device=device)  # (sum of token NLL, token count, skipped) over this rank's shard
    for start in range(C.RANK * batch_size, len(val), batch_size * C.WORLD):
        batch, ids, mask, skipped, _ = make_batch(model, val[start:start + batch_size], tokenizer, device)
        totals[2] += skipped
        totals[:2] += torch.stack([-(M.completion_logprobs(model, batch, ids, mask) * mask).sum(), mask.sum()])
    if C.WORLD > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1]).item(), int(totals[2])

if __name__ == "__main__":
    device = C.setup_distributed(threads, seed)
    # the default run needs no download: the synthetic task and the tiny model are built locally once
    if C.RANK == 0 and data_dir == "out/synthetic" and not os.path.exists(os.path.join(data_dir, "sft.json")):
        synthetic.generate(data_dir, seed=seed)
    if C.RANK == 0 and model_path == "out/tiny-qwen2.5-vl":
        records, _ = data.load_records(os.path.join(data_dir, "sft.json"))
        synthetic.ensure_tiny_model(model_path, [data.question_text(r) + data.sft_target(r) for r in records])
    C.barrier()
    path = train_json or os.path.join(data_dir, "sft.json")
    records, bad = data.load_records(path, media_root or None, skip_bad, required=("process",))
    if len(records) <= val_records:
        raise data.DataError(f"{path}: {len(records)} usable records, too few to hold out val_records={val_records}")
    train, val = records[:-val_records], records[-val_records:]
    model, tokenizer, opt, start = lifecycle.start_training(config, model_path, device)
    C.print0(f"{len(train)} train / {len(val)} val records ({bad} bad skipped), "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, start at step {start}")
    log = C.open_log(os.path.join(out_dir, "metrics.jsonl"), start)
    model.train()
    stop, skipped_total = min(max_steps, start + run_steps) if run_steps else max_steps, 0
    for step in range(start, stop):
        t0, lr_now = time.time(), C.cosine_lr(step, lr, warmup_steps, max_steps, min_lr_ratio)
        losses, skipped, truncated, tokens = [], 0, 0, 0
        for micro in range(grad_accum):
            position = ((step * grad_accum + micro) * C.WORLD + C.RANK) * batch_size  # in the endless record stream
            records_now = data.epoch_slice(train, position, batch_size, seed)
            batch, ids, mask, n_skip, n_trunc = make_batch(model, records_now, tokenizer, device)
            skipped, truncated = skipped + n_skip, truncated + n_trunc
            loss = sft_loss(model, batch, ids, mask)
            opt.backward(loss / grad_accum, last=micro == grad_accum - 1)
            losses += [loss.item()] if mask.any() else []
            tokens += int(mask.sum())
        grad_norm = opt.step(lr_now)
        counts = {"target_tokens": tokens, "skipped": skipped, "truncated": truncated}
        counts = {k: round(n) for k, n in C.mean_over_ranks(counts, device, sums=counts).items()}  # sums over ranks
        skipped_total += counts["skipped"]
        metrics = {"step": step + 1, "loss": float(np.mean(losses)) if losses else float("nan"), "lr": lr_now,
                   "grad_norm": grad_norm, **counts, "skipped_at_load": bad, "step_time": time.time() - t0}
        if (step + 1) % eval_interval == 0 or step + 1 == max_steps:
            model.eval()
            metrics["val_loss"], metrics["val_skipped"] = validation_loss(model, val, tokenizer, device)
            model.train()
        C.log_metrics(log, metrics, (step + 1) % log_interval == 0 or "val_loss" in metrics)
        if (step + 1) % ckpt_interval == 0 or step + 1 == stop:
            C.print0("checkpoint:", lifecycle.save_checkpoint(out_dir, step + 1, tokenizer, opt, config))
    C.print0(f"done: steps {start + 1}-{stop}; skipped {bad} bad records at load, {skipped_total} examples in steps")
    C.finish()
