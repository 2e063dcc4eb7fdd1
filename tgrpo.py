"""T-GRPO (Video-R1, eq. 1-4): GRPO whose reward pays a bonus when the policy answers better on frames in order
than on the same frames shuffled, so that it learns to rely on temporal order.

    python tgrpo.py                                  # tiny SFT model (out/sft), synthetic RL set, CPU, minutes
    python tgrpo.py --temporal=False                 # plain GRPO: the paper's ablation
    torchrun --nproc_per_node 8 tgrpo.py configs/tgrpo_paper.py     # Qwen2.5-VL-7B, Video-R1-260k, ZeRO-3

One step, per prompt q of the batch (images and videos mixed):
  roll out G responses o_i on the ordered clip and G~ on the shuffled clip (videos only), all rows of the batch in
  ONE generate call, each distinct clip encoded once;
  r_i  = accuracy_i + format_i (+ length bonus)
  p, p~ = share of correct ordered / shuffled responses;  r_t = alpha if p >= mu * p~ else 0          (eq. 1)
  R_i  = r_i + r_t if o_i is correct else r_i                                                          (eq. 2)
  A_i  = (R_i - mean R) / (std R + eps) over the G ordered responses                                   (eq. 3)
  J    = mean_tokens[ min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) - beta * KL_k3(pi || pi_ref) ]  (eq. 4)
Contrast (shuffled) responses only measure p~; they never enter the loss.

Departures, each a config value or fixed, with the official code's choices: DETAILS.md, "Paper vs official code".
Eq. 4 runs per token, as GRPO/TRL and the official code do: the paper's one ratio per sequence, a product of
hundreds, would saturate the clip on long responses. With 0/1 accuracies and one format reward per group eq. 3's std
division cancels the bonus (tulerfeng/Video-R1 #51): bonus_to="advantage" or scale_rewards=False lets it act (README).
"""
import contextlib
import os
import sys
import time
import numpy as np
import torch
import common as C
import data
import lifecycle
import model as M
import rewards

# ----------------------------------------------------------------------------- config
init_from = "out/sft"                # SFT checkpoint: a step_N folder or a run folder with `latest`
data_dir = "out/synthetic"           # the built-in synthetic task (python synthetic.py out/synthetic)
train_json = ""                      # "" -> data_dir/rl.json
media_root = ""                      # "" -> the JSON's folder
out_dir = "out/tgrpo"
seed = 0                             # all randomness of step s on rank r derives from (seed, s, r)
max_steps = 120                      # ~2 min on 2 CPU cores for the default run
batch_size = 4                       # prompts per device per step
num_generations = 8                  # G: ordered rollouts per prompt (paper: 8); a group of 1 has no advantage
num_contrast = 4                     # G~: contrast rollouts per video prompt (paper: G/2); 0: none
temporal = True                      # False: plain GRPO, no temporal reward (the contrast rollouts still measure p~)
temporal_rule = "paper"              # "paper" or "official" (rewards.temporal_bonus)
alpha = 0.3                          # temporal reward (eq. 1)
mu = 1.0                             # p >= mu * p~ (paper 1.0, official 0.8)
correct_threshold = 0.5              # accuracy counted as correct, by both bonuses (paper >= 0.5, official > 0.1)
bonus_to = "reward"                  # where r_t goes: "reward" (eq. 2, paper) or "advantage" (added to A_i)
scale_rewards = True                 # eq. 3 divides by the group's std; False: A_i = R_i - mean R (Dr. GRPO)
length_bonus = False                 # the paper's +0.2 for correct responses of 320-512 tokens
length_rule = "paper"                # "official": only when >= 2 responses of the group are correct
beta = 0.04                          # KL weight (paper)
epsilon = 0.2                        # PPO clip range
num_iterations = 1                   # updates per rollout batch; > 1 makes the clip act
loss_norm = "sequence"               # "sequence" (official) or "token"
max_new_tokens = 64                  # paper scale: 768
max_prompt_tokens = 1024             # a longer prompt is a bad record (synthetic prompts: <= 250; paper scale 16384)
temperature = 1.0                    # rollout sampling
top_p = 1.0
lr = 5e-5                            # paper scale: 1e-6
warmup_steps = 0
min_lr_ratio = 1.0                   # 1.0: constant lr after warmup
weight_decay = 0.01
grad_clip = 5.0
fps = 2.0                            # frame sampling and pixel limits (the paper's training values at paper scale)
min_frames = 4
max_frames = 16
min_pixels = 4 * 28 * 28
max_pixels = 128 * 28 * 28
skip_bad = False                     # True: a bad record, clip or prompt is skipped and counted
log_interval = 1
sample_interval = 10                 # print and save a few episodes every N steps
ckpt_interval = 60
resume = False
keep_checkpoints = 0                 # the newest N checkpoints keep optimizer state; 0: all do
keep_weights = True                  # older checkpoints keep their HF weights (False: deleted)
run_steps = 0                        # stop this process after N steps (0: to max_steps)
threads = 1                          # CPU threads; 1 repeats bit for bit on any CPU count (0: torch's choice)
attn = C.ATTN                        # "flash_attention_2" where flash_attn is installed, else "sdpa"
grad_ckpt = False
lora_rank = 0                        # > 0: train LoRA adapters of this rank (peft), base frozen; 0: full fine-tuning
lora_alpha = 32                      # adapter scale alpha / rank
lora_dropout = 0.0                   # > 0 draws masks from the global RNG, which checkpoints omit: resume not bit-exact
lora_targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # name suffixes, language model only
lora_merger = False                  # LoRA: also train the vision merger (the vision tower stays frozen)
deepspeed = ""                       # configs/ds_zero3.json at paper scale
# -----------------------------------------------------------------------------
config = C.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [], choices=dict(
    temporal_rule=tuple(rewards.RULES), length_rule=tuple(rewards.RULES), bonus_to=rewards.BONUS_TO,
    loss_norm=("sequence", "token"), attn=M.ATTENTION, batch_size=range(1, 2**16), num_generations=range(2, 2**16)))
KL_LOG_RATIO_CLAMP = 10.0            # official: one token's log pi_ref/pi beyond +-10 would make k3 overflow

def rollout(policy, records, tokenizer, step, device):
    """Generate G ordered rollouts per prompt and G~ contrast ones per video prompt, in one batched call.
    Returns the examples kept, the rows (prompt index, is_contrast), the prompt batch and the completions."""
    rng = np.random.default_rng([seed, step, C.RANK])
    examples, skipped = data.load_examples(records, tokenizer, config, rng if num_contrast else None)
    clips, encoded, row_clip, rows = [], [], [], []
    for i, (_, prompt, clip, contrast_clip) in enumerate(examples):
        for this_clip, n, is_contrast in ((clip, num_generations, False), (contrast_clip, num_contrast, True)):
            if this_clip is not None:  # a contrast clip exists only for a video, and only when num_contrast > 0
                clips.append(this_clip)
                encoded += [prompt] * n
                row_clip += [len(clips) - 1] * n
                rows += [(i, is_contrast)] * n
    if not examples:
        return examples, rows, None, None, None, skipped
    batch = M.collate_prompts(encoded, clips, tokenizer.pad_token_id, M.unwrap(policy).config, device, row_clip)
    generator = torch.Generator(device).manual_seed(int(rng.integers(2**C.SEED_BITS)))
    ids, mask = M.generate(policy, batch, max_new_tokens, M.stop_ids(tokenizer), tokenizer.pad_token_id,
                           temperature, top_p, generator)
    return examples, rows, batch, ids, mask, skipped

def ordered_rows(rows):
    """Indices of the ordered rows, the only ones the loss and the logged rewards see (contrast rows measure p~)."""
    return [b for b, (_, is_contrast) in enumerate(rows) if not is_contrast]

def score(examples, rows, texts, lengths):
    """Per row: the accuracy (contrast rows too), and the reward R_i and advantage A_i of ordered rows, one group per
    prompt; and the step's statistics, the temporal ones over video prompts (all empty without rollouts)."""
    accuracy = np.array([rewards.accuracy_reward(texts[b], examples[i][0]["solution"], examples[i][0]["problem_type"])
                         for b, (i, _) in enumerate(rows)])
    fmt = np.array([rewards.format_reward(text) for text in texts])
    length, bonus, total, advantages = (np.zeros(len(rows)) for _ in range(4))
    stats = {k: [] for k in ("p", "p_contrast", "bonus_granted", "advantage_change")} | {"response_length": lengths}
    for i, (_, _, _, contrast_clip) in enumerate(examples):
        group = [b for b, row in enumerate(rows) if row == (i, False)]
        if length_bonus:
            length[group] = rewards.length_bonus(accuracy[group], [lengths[b] for b in group], length_rule,
                                                 threshold=correct_threshold)
        if contrast_clip is not None and num_contrast:  # a video with contrast rollouts: the temporal reward
            contrast_rows = [b for b, row in enumerate(rows) if row == (i, True)]
            paid, p, p_contrast, granted = rewards.temporal_bonus(accuracy[group], accuracy[contrast_rows],
                                                                  temporal_rule, alpha, mu, correct_threshold)
            bonus[group] = paid if temporal else 0.0  # plain GRPO: p and p~ are measured, for comparison, not paid
            stats["p"].append(p)
            stats["p_contrast"].append(p_contrast)
            stats["bonus_granted"].append(float(granted))
        base = accuracy[group] + fmt[group] + length[group]
        advantages[group], change = rewards.advantages(base, bonus[group], bonus_to, scale_rewards)
        total[group] = base + bonus[group]  # R_i of eq. 2, logged the same way wherever the bonus goes
        stats["advantage_change"].append(change)
    ordered = ordered_rows(rows)
    for key, values in (("accuracy", accuracy), ("format", fmt), ("length_bonus", length), ("temporal_bonus", bonus),
                        ("reward", total)):
        stats[key] = values[ordered].tolist()
    return accuracy, total, advantages, stats

def tgrpo_loss(logp, old_logp, ref_logp, advantages, mask):
    """Eq. 4 as a loss to minimise. logp, old_logp, ref_logp, mask: (N, T); advantages: (N,)."""
    ratio = torch.exp(logp - old_logp)                                             # (N, T) pi / pi_old
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    surrogate = torch.min(ratio * advantages[:, None], clipped * advantages[:, None])  # (N, T)
    log_ref_ratio = torch.clamp(ref_logp - logp, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # (N, T) log pi_ref/pi
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1                              # (N, T) k3, >= 0
    per_token = -(surrogate - beta * kl)                                           # (N, T)
    if loss_norm == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    # a token is clipped when the clip bound, not the ratio, sets the surrogate (no gradient flows there)
    is_clipped = (ratio * advantages[:, None] > clipped * advantages[:, None]).float()
    tokens = mask.sum().clamp(min=1)
    return loss, {"kl": ((kl * mask).sum() / tokens).item(),
                  "clip_fraction": ((is_clipped * mask).sum() / tokens).item()}

def train_step(opt, policy, ref, batch, ids, mask, advantages, lr_now):
    """num_iterations updates on one set of rollouts; returns the last one's loss statistics and grad norm. Policy,
    old policy and reference share one precision (M.autocast): the first ratio is 1, the KL to equal weights 0."""
    with torch.no_grad():
        with M.lora_of(ref).disable_adapter() if ref is policy else contextlib.nullcontext():  # LoRA: no copy
            ref_logp = M.completion_logprobs(ref, batch, ids, mask) if beta else None
        old_logp = M.completion_logprobs(policy, batch, ids, mask) if num_iterations > 1 else None
    for _ in range(num_iterations):
        logp = M.completion_logprobs(policy, batch, ids, mask)
        # one update per rollout: pi_old == pi, so the ratio is exactly 1 (value) with the policy gradient (grad)
        loss, stats = tgrpo_loss(logp, logp.detach() if old_logp is None else old_logp,
                                 logp.detach() if ref_logp is None else ref_logp, advantages, mask.float())
        opt.backward(loss)
        grad_norm = opt.step(lr_now)
    return {"loss": loss.item(), **stats, "grad_norm": grad_norm}

if __name__ == "__main__":
    device = C.setup_distributed(threads, seed)
    train, bad = data.load_records(train_json or os.path.join(data_dir, "rl.json"), media_root or None, skip_bad)
    init = C.latest_checkpoint(init_from) or init_from
    policy, tokenizer, opt, start = lifecycle.start_training(config, init, device)
    # the KL reference: with LoRA the policy itself, adapters disabled (train_step); else a frozen copy of the start
    ref = (policy if lora_rank else lifecycle.frozen_reference(init, policy, deepspeed, attn)) if beta else None
    C.print0(f"T-GRPO from {init}: {len(train)} prompts ({bad} bad skipped), temporal={temporal} "
             f"rule={temporal_rule}, G={num_generations} G~={num_contrast}, start at step {start}")
    log, samples = (C.open_log(os.path.join(out_dir, name), start) for name in ("metrics.jsonl", "samples.jsonl"))
    stop, skipped_total = min(max_steps, start + run_steps) if run_steps else max_steps, 0
    for step in range(start, stop):
        t0, lr_now = time.time(), C.cosine_lr(step, lr, warmup_steps, max_steps, min_lr_ratio)
        policy.eval()
        records_now = data.epoch_slice(train, (step * C.WORLD + C.RANK) * batch_size, batch_size, seed)
        with C.generation_phase(policy):  # entered by every rank, even one whose clips all failed
            examples, rows, batch, ids, mask, skipped = rollout(policy, records_now, tokenizer, step, device)
        rollout_time = time.time() - t0
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True) if examples else []  # past a stop: pad
        lengths = mask.sum(1).tolist() if examples else []
        accuracy, reward_per_row, advantages, stats = score(examples, rows, texts, lengths)
        policy.train()
        if examples:  # the ordered rows only (the loss never sees contrast ones), their prompts sharing clips
            keep = ordered_rows(rows)
            sub, sub_ids, sub_mask = batch.select(keep), ids[keep], mask[keep]
            advantages = torch.tensor(advantages[keep], dtype=torch.float32, device=device)
        else:  # every clip of this rank failed: a placeholder row keeps its collectives in step, at zero loss
            (sub, sub_ids, sub_mask), advantages = lifecycle.placeholder_batch(policy, device), torch.zeros(1, device=device)
        update = train_step(opt, policy, ref, sub, sub_ids, sub_mask, advantages, lr_now)
        update = {k: v if examples or k == "grad_norm" else float("nan") for k, v in update.items()}
        local = {k: float(np.mean(v)) if len(v) else float("nan") for k, v in stats.items()}
        local |= {**update, "skipped": float(skipped), "rollout_tokens_per_s": float(sum(lengths)) / rollout_time}
        metrics = {"step": step + 1, **C.mean_over_ranks(local, device, sums=("skipped", "rollout_tokens_per_s")),
                   "lr": lr_now, "step_time": time.time() - t0, "skipped_at_load": bad}
        skipped_total += metrics["skipped"]
        if torch.cuda.is_available():  # this rank's peak so far, to check a memory plan against (README)
            metrics["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        C.log_metrics(log, metrics, (step + 1) % log_interval == 0)
        if log and (step + 1) % sample_interval == 0 and examples:
            for b in (0, len(rows) - 1):  # an ordered and (for a video) a contrast episode
                record = examples[rows[b][0]][0]
                C.log_metrics(samples, {"step": step + 1, "problem": record["problem"], "solution": record["solution"],
                                        "contrast": rows[b][1], "response": texts[b], "accuracy": float(accuracy[b]),
                                        "reward": None if rows[b][1] else float(reward_per_row[b])}, True)
        if (step + 1) % ckpt_interval == 0 or step + 1 == stop:
            C.print0("checkpoint:", lifecycle.save_checkpoint(out_dir, step + 1, tokenizer, opt, config))
    C.print0(f"done: steps {start + 1}-{stop}; skipped {bad} bad records at load, {skipped_total:g} examples in steps")
    C.finish()
