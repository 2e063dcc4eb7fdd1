"""SFT cold start: teach Qwen2.5-VL the <think>...</think><answer>...</answer> format on
chain-of-thought data.

    python sft.py                                # tiny model, synthetic task, CPU, minutes
    python sft.py --max_steps=50 --batch_size=4  # any config value from the command line
    # Qwen2.5-VL-7B on Video-R1-COT-165k under ZeRO-2:
    torchrun --nproc_per_node 8 sft.py configs/sft_paper.py

Departures from the official code (loss on the answer tokens only, the real fps in the temporal
positions, images and videos mixed in any batch size): DETAILS.md, "Paper vs official code".
"""
import os
import sys
import time
from typing import NamedTuple
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
import common
import data
import lifecycle
import model
import prefetch
import synthetic

# config: config files (configs/sft_paper.py) and --key=value override any value
# HF folder to start from; the tiny model is written here on first use
model_path = "out/tiny-qwen2.5-vl"
data_dir = "out/synthetic"    # the built-in synthetic task, generated here on first use
train_json = ""               # "" -> data_dir/sft.json; records need process + solution
media_root = ""               # "" -> the JSON's folder; record paths are relative to it
# the last N records of train_json are held out for the validation loss
val_records = 64
out_dir = "out/sft"           # checkpoints (step_N/, latest) and metrics.jsonl
seed = 0                      # data order and everything random derives from (seed, step, rank)
# ~5 min on 2 CPU cores; the tiny model needs ~800 steps to use the frames
max_steps = 1500
batch_size = 8                # prompts per device per micro-step
grad_accum = 1                # micro-steps per optimizer step
lr = 2e-3                     # peak learning rate (paper scale: 1e-6 to 1e-5)
warmup_steps = 20             # linear warmup, then cosine to min_lr_ratio * lr
min_lr_ratio = 0.1
weight_decay = 0.01           # the paper's
grad_clip = 5.0               # the paper's max grad norm
max_target_tokens = 768       # the paper's: longer targets are truncated (counted in the log)
# a longer prompt is a bad record (synthetic prompts: <= 250; paper scale 16384)
max_prompt_tokens = 1024
# data.PROMPT_STYLES: "reasoning" (Video-R1's template) or "short" (one line); "" -> model_path's
# own (the tiny model's: "short"), else "reasoning"; checkpoints keep it (config.json)
prompt_style = ""
fps = 2.0                     # frame sampling: fps, frame count limits, per-frame pixel limits
min_frames = 4
max_frames = 16
min_pixels = 4 * 28 * 28
max_pixels = 128 * 28 * 28
total_pixels = 0              # the clip's pixel budget (Qwen3-VL's qwen-vl-utils rule); 0: none
skip_bad = False              # True: a bad record, clip or prompt is skipped and counted, not fatal
# processes that load the next micro-batches' media while this one computes (prefetch.py); 0: the
# step loads its own
data_workers = 0
data_timeout = prefetch.TIMEOUT  # seconds without a worker's result before it counts as hung
eval_interval = 100           # validation loss every N steps
ckpt_interval = 500           # checkpoint every N steps (and at the end)
log_interval = 50
wandb_log = False             # True: the metrics also go to Weights & Biases (pip install wandb)
wandb_project = "video-r1-nano"
wandb_run_name = "sft"
resume = False                # continue bit-exactly from out_dir/latest
keep_checkpoints = 0          # the newest N checkpoints keep optimizer state; 0: all do
keep_weights = True           # older checkpoints keep their HF weights (False: deleted)
# stop this process after N steps (0: run to max_steps); resume continues
run_steps = 0
# CPU threads; 1 repeats bit for bit on any CPU count (0: torch's choice)
threads = 1
attn = common.ATTN            # "flash_attention_2" where flash_attn is installed, else "sdpa"
grad_ckpt = False             # gradient checkpointing (paper scale)
# > 0: train LoRA adapters of this rank (peft), base frozen; 0: full fine-tuning
lora_rank = 0
lora_alpha = 32               # adapter scale alpha / rank
# > 0 draws masks from the global RNG, which checkpoints omit: resume not bit-exact
lora_dropout = 0.0
# name suffixes, language model only
lora_targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
lora_merger = False           # LoRA: also train the vision merger (the vision tower stays frozen)
# a DeepSpeed json (configs/ds_zero2.json) to use ZeRO; "" = plain torch
deepspeed = ""
# seconds a collective waits for a late rank before the run fails: 3x the longest legitimate
# wait, the ranks' at the barrier while rank 0 writes a merged 7B checkpoint (reads the 16.6 GB
# base, writes 16.6 GB: ~5 min at 100 MB/s). torch's default: gloo 30 min, NCCL 10
dist_timeout = 900
# a resume keeps these (common.check_resume): the data stream, the start, the state's form
RUN_KEYS = ("model_path", "data_dir", "train_json", "media_root", "val_records", "seed",
            "batch_size", "grad_accum", "prompt_style", "deepspeed", "lora_rank", "lora_alpha",
            "lora_dropout", "lora_targets", "lora_merger")

argv = sys.argv[1:] if __name__ == "__main__" else []  # imported (the tests): the defaults
choices = dict(attn=model.ATTENTION, prompt_style=("", *data.PROMPT_STYLES))
config = common.configure(globals(), argv, choices)


class SFTBatch(NamedTuple):
    """make_batch's prompts and targets, and what it counted on the way."""
    prompts: model.PromptBatch  # left-padded, with their clips
    target_ids: torch.Tensor    # (B, T) the targets as completions, right-padded
    target_mask: torch.Tensor   # (B, T) 1 on target tokens
    skipped: int                # bad examples skipped (skip_bad)
    truncated: int              # targets cut at max_target_tokens


def make_batch(net, records, tokenizer, device):
    """Prompts with their media, and the SFT targets (plain text, then <|im_end|>) as completions;
    a bad example is skipped and counted under skip_bad."""
    loader = data.loader_of(tokenizer, config, model.unwrap(net).config)
    loaded = data.load_batch(loader, records)
    return collate(net, loaded, tokenizer, device)


def collate(net, loaded, tokenizer, device):
    """make_batch's batch of data.load_batch's examples (loaded here, or ahead by a data
    worker)."""
    examples = loaded.examples
    if not examples:
        # every record failed: a placeholder row keeps this rank's collectives in step, at zero loss
        prompts, ids, mask = lifecycle.placeholder_batch(net, device)
        return SFTBatch(prompts, ids, mask, loaded.skipped, 0)

    # the targets: special tokens in the text stay plain text; only the appended <|im_end|> ends it
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    targets = []
    for record, *_ in examples:
        text_ids = data.encode_plain(tokenizer, data.sft_target(record))
        targets.append(torch.tensor(text_ids + [end]))
    truncated = sum(len(t) > max_target_tokens for t in targets)
    targets = [t[:max_target_tokens] for t in targets]
    ids = pad_sequence(targets, batch_first=True, padding_value=tokenizer.pad_token_id)  # (B, T)
    mask = pad_sequence([torch.ones_like(t) for t in targets], batch_first=True)  # (B, T)

    # the prompts with their clips
    prompts = [example.prompt for example in examples]
    clips = [example.clip for example in examples]
    model_config = model.unwrap(net).config
    batch = model.collate_prompts(prompts, clips, tokenizer.pad_token_id, model_config, device)
    return SFTBatch(batch, ids.to(device), mask.to(device), loaded.skipped, truncated)


def micro_batch_jobs(train, consumed, start, stop):
    """prefetch.Jobs loading every micro-step's records of steps start..stop-1 on this rank: the
    next batch_size records of the endless record stream, each."""
    for step in range(start, stop):
        for micro in range(grad_accum):
            position = common.stream_position(consumed, step - start, batch_size, micro,
                                              grad_accum)
            records = data.epoch_slice(train, position, batch_size, seed)
            yield prefetch.Job(data.load_batch, (records,), records)


def sft_loss(net, batch, target_ids, target_mask):
    """Mean negative log-likelihood over target tokens only: prompt positions never enter the
    loss."""
    logprobs = model.completion_logprobs(net, batch, target_ids, target_mask)  # (B, T)
    return -(logprobs * target_mask).sum() / target_mask.sum().clamp(min=1)


@torch.no_grad()
def validation_loss(net, val, tokenizer, device):
    """Mean token NLL over the held-out records, each rank taking every WORLD-th batch, and how
    many examples were skipped."""
    # (sum of token NLL, token count, skipped) over this rank's shard
    totals = torch.zeros(3, device=device)
    for start in range(common.RANK * batch_size, len(val), batch_size * common.WORLD):
        b = make_batch(net, val[start:start + batch_size], tokenizer, device)
        totals[2] += b.skipped
        logprobs = model.completion_logprobs(net, b.prompts, b.target_ids, b.target_mask)  # (B, T)
        nll = -(logprobs * b.target_mask).sum()
        totals[:2] += torch.stack([nll, b.target_mask.sum()])
    if common.WORLD > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1]).item(), int(totals[2])


if __name__ == "__main__":
    device = common.setup_distributed(threads, seed, dist_timeout)

    # the default run needs no download: the synthetic task and the tiny model are built here once
    default_data = data_dir == "out/synthetic"
    if common.RANK == 0 and default_data and not os.path.exists(os.path.join(data_dir, "sft.json")):
        synthetic.generate(data_dir, seed=seed)
    if common.RANK == 0 and model_path == "out/tiny-qwen2.5-vl":
        records, _ = data.load_records(os.path.join(data_dir, "sft.json"))
        texts = [data.question_text(r) + data.sft_target(r) for r in records]
        synthetic.ensure_tiny_model(model_path, texts)
    common.barrier()

    # the records, checked before any model loads; the last val_records are held out
    path = train_json or os.path.join(data_dir, "sft.json")
    records, bad = data.load_records(path, media_root or None, skip_bad, required=("process",))
    if len(records) <= val_records:
        raise data.DataError(f"{path}: {len(records)} usable records, "
                             f"too few to hold out val_records={val_records}")
    train = records[:-val_records]
    val = records[-val_records:]

    # the model and optimizer, from out_dir/latest under resume, trained on the prompt it asks for
    lifecycle.resolve_prompt_style(config, model_path)
    net, tokenizer, opt, start, consumed = lifecycle.start_training(config, model_path, device,
                                                                    RUN_KEYS)
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    common.print0(f"{len(train)} train / {len(val)} val records ({bad} bad skipped), "
                  f"{millions:.2f} M params, prompt {config['prompt_style']}, "
                  f"start at step {start}")
    log = common.open_log(os.path.join(out_dir, "metrics.jsonl"), start)
    wandb = common.open_wandb(config)  # None unless wandb_log (rank 0)
    net.train()
    stop = max_steps
    if run_steps:
        stop = min(max_steps, start + run_steps)
    skipped_total = 0
    # the micro-steps' records, loaded ahead by data_workers processes (0: each when its turn comes)
    loader = data.loader_of(tokenizer, config, model.unwrap(net).config)
    jobs = micro_batch_jobs(train, consumed, start, stop)
    loads = prefetch.Prefetcher(jobs, loader, data_workers, data_timeout)
    for step in range(start, stop):
        t0 = time.time()
        lr_now = common.cosine_lr(step, lr, warmup_steps, max_steps, min_lr_ratio)
        losses = []
        skipped = 0
        truncated = 0
        tokens = 0
        for micro in range(grad_accum):
            # data: the next batch_size records of this rank in the endless record stream
            b = collate(net, next(loads), tokenizer, device)
            skipped += b.skipped
            truncated += b.truncated

            # forward backward: gradients add up over the micro-steps
            loss = sft_loss(net, b.prompts, b.target_ids, b.target_mask)
            opt.backward(loss / grad_accum, last=micro == grad_accum - 1)
            if b.target_mask.any():  # a placeholder row's zero loss is no loss to report
                losses.append(loss.item())
            tokens += int(b.target_mask.sum())

        # update
        grad_norm = opt.step(lr_now)

        # timing and logging: the counts are summed over ranks
        counts = {"target_tokens": tokens, "skipped": skipped, "truncated": truncated}
        sums = common.mean_over_ranks(counts, device, sums=counts)
        counts = {k: round(n) for k, n in sums.items()}
        skipped_total += counts["skipped"]
        mean_loss = float("nan")  # every micro-step was a placeholder
        if losses:
            mean_loss = float(np.mean(losses))
        metrics = {"step": step + 1, "loss": mean_loss, "lr": lr_now, "grad_norm": grad_norm,
                   **counts, "skipped_at_load": bad, "step_time": time.time() - t0}

        # validation, into the same log line
        if (step + 1) % eval_interval == 0 or step + 1 == max_steps:
            net.eval()
            val_loss, val_skipped = validation_loss(net, val, tokenizer, device)
            metrics["val_loss"] = val_loss
            metrics["val_skipped"] = val_skipped
            net.train()
        show = (step + 1) % log_interval == 0 or "val_loss" in metrics
        common.log_metrics(log, metrics, show, wandb)

        # checkpoint
        if (step + 1) % ckpt_interval == 0 or step + 1 == stop:
            # the records all ranks consumed so far: where a resume continues, on any rank count
            consumed_now = common.stream_position(consumed, step + 1 - start, batch_size,
                                                  grad_accum=grad_accum, rank=0)
            folder = lifecycle.save_checkpoint(out_dir, step + 1, tokenizer, opt, config,
                                               consumed_now)
            common.print0("checkpoint:", folder)

    loads.close()
    common.print0(f"done: steps {start + 1}-{stop}; skipped {bad} bad records at load, "
                  f"{skipped_total} examples in steps")
    common.finish()
