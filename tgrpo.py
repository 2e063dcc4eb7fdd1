"""T-GRPO (Video-R1, eq. 1-4): GRPO whose reward pays a bonus when the policy answers better on
frames in order than on the same frames shuffled, so that it learns to rely on temporal order.

    python tgrpo.py                   # tiny SFT model (out/sft), synthetic RL set, CPU, minutes
    python tgrpo.py --temporal=False  # plain GRPO: the paper's ablation
    # Qwen2.5-VL-7B, Video-R1-260k, ZeRO-3:
    torchrun --nproc_per_node 8 tgrpo.py configs/tgrpo_paper.py

One step, per prompt q of the batch (images and videos mixed):
  roll out G responses o_i on the ordered clip and G~ on the shuffled clip (videos only), all rows
  of the batch in ONE generate call, each distinct clip encoded once;
  r_i   = accuracy_i + format_i (+ length bonus)
  p, p~ = share of correct ordered / shuffled responses
  r_t   = alpha if p >= mu * p~ else 0                                                (eq. 1)
          (strict_contrast: p > mu * p~; temporal_credit: r_t scaled per response, below)
  R_i   = r_i + r_t if o_i is correct else r_i                                        (eq. 2)
  A_i   = (R_i - mean R) / (std R + eps) over the G ordered responses                 (eq. 3)
  J     = mean_tokens[ min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i)
                       - beta * KL_k3(pi || pi_ref) ]                                 (eq. 4)
Contrast (shuffled) responses only measure p~; they never enter the loss.

Departures, each a config value or fixed, with the official code's choices: DETAILS.md, "Paper vs
official code". Eq. 4 runs per token, as GRPO/TRL and the official code do: the paper's one ratio
per sequence, a product of hundreds, would saturate the clip on long responses. With 0/1
accuracies and one format reward per group eq. 3's std division cancels the bonus
(tulerfeng/Video-R1 #51): bonus_to="advantage" or scale_rewards=False lets it act (DETAILS.md).
"""
import contextlib
import os
import sys
import time
from typing import NamedTuple
import numpy as np
import torch
import common
import data
import lifecycle
import model
import prefetch
import rewards

# ----------------------------------------------------------------------------- config
init_from = "out/sft"       # SFT checkpoint: a step_N folder or a run folder with `latest`
data_dir = "out/synthetic"  # the built-in synthetic task (python synthetic.py out/synthetic)
train_json = ""             # "" -> data_dir/rl.json
media_root = ""             # "" -> the JSON's folder
out_dir = "out/tgrpo"
seed = 0                    # all randomness of step s on rank r derives from (seed, s, r)
max_steps = 120             # ~2 min on 2 CPU cores for the default run
batch_size = 4              # prompts per device per step
# G: ordered rollouts per prompt (paper: 8); a group of 1 has no advantage
num_generations = 8
num_contrast = 4            # G~: contrast rollouts per video prompt (paper: G/2); 0: none
# Qwen3-VL's timestamps in a contrast prompt: "ordered" (the frames shuffled under them) or
# "shuffled" with the frames (DETAILS.md, "The contrast with timestamps in the text")
contrast_timestamps = "ordered"
# False: plain GRPO, no temporal reward (the contrast rollouts still measure p~)
temporal = True
temporal_rule = "paper"     # "paper" or "official" (rewards.temporal_bonus)
alpha = 0.3                 # temporal reward (eq. 1)
mu = 1.0                    # p >= mu * p~ (paper 1.0, official 0.8)
# True: r_t only when p > mu * p~; the paper's >= also pays groups as good shuffled (p = p~ = 0 too)
strict_contrast = False
# True: each correct ordered response's r_t times its credit, clip(mean_t[log pi(o | ordered)
# - log pi(o | shuffled)], 0, 1): the responses that used the order (one more no-grad pass)
temporal_credit = False
# accuracy counted as correct, by both bonuses (paper >= 0.5, official > 0.1)
correct_threshold = 0.5
bonus_to = "reward"         # where r_t goes: "reward" (eq. 2, paper) or "advantage" (added to A_i)
scale_rewards = True        # eq. 3 divides by the group's std; False: A_i = R_i - mean R (Dr. GRPO)
length_bonus = False        # the paper's +0.2 for correct responses of 320-512 tokens
length_rule = "paper"       # "official": only when >= 2 responses of the group are correct
# True: groups whose responses all earn the same reward (zero advantages: they teach nothing) are
# dropped from the update, as DAPO, EasyR1 and OneThinker do (no resampling); logged as
# groups_dropped. A rank left without rows trains on a placeholder at zero loss
filter_groups = False
beta = 0.04                 # KL weight (paper); 0: no reference model and no reference pass
epsilon = 0.2               # PPO clip range
num_iterations = 1          # updates per rollout batch; > 1 makes the clip act
loss_norm = "sequence"      # "sequence" (official) or "token"
# rollout length: the toy's longest answers (describe, change_time) take 65-73 tokens, and a cut
# one scores 0 (RESULTS.md); paper scale: 768
max_new_tokens = 96
# a longer prompt is a bad record (synthetic prompts: <= 250; paper scale 16384)
max_prompt_tokens = 1024
# data.PROMPT_STYLES: "" -> the one init_from was trained with (sft.py saves it), else "reasoning"
prompt_style = ""
# rollout sampling, the toy's recipe (RESULTS.md); the paper's 1.0 at paper scale. The loss's
# log-probs stay at temperature 1 (DETAILS.md)
temperature = 0.7
top_p = 1.0
lr = 5e-5                   # paper scale: 1e-6
warmup_steps = 0
min_lr_ratio = 1.0          # 1.0: constant lr after warmup
weight_decay = 0.01
grad_clip = 5.0
# frame sampling and pixel limits (the paper's training values at paper scale)
fps = 2.0
min_frames = 4
max_frames = 16
min_pixels = 4 * 28 * 28
max_pixels = 128 * 28 * 28
total_pixels = 0            # the clip's pixel budget (Qwen3-VL's qwen-vl-utils rule); 0: none
skip_bad = False            # True: a bad record, clip or prompt is skipped and counted
# processes that load the next steps' media and contrast clips while this one computes
# (prefetch.py); 0: the step loads its own
data_workers = 0
data_timeout = prefetch.TIMEOUT  # seconds without a worker's result before it counts as hung
# record the decode step as a CUDA graph on a GPU (model.generate); False: it runs eager there
cuda_graph = True
log_interval = 1
wandb_log = False           # True: the metrics also go to Weights & Biases (pip install wandb)
wandb_project = "video-r1-nano"
wandb_run_name = "tgrpo"
sample_interval = 10        # print and save a few episodes every N steps
ckpt_interval = 60
resume = False
keep_checkpoints = 0        # the newest N checkpoints keep optimizer state; 0: all do
keep_weights = True         # older checkpoints keep their HF weights (False: deleted)
run_steps = 0               # stop this process after N steps (0: to max_steps)
# CPU threads; 1 repeats bit for bit on any CPU count (0: torch's choice)
threads = 1
attn = common.ATTN          # "flash_attention_2" where flash_attn is installed, else "sdpa"
grad_ckpt = False
# > 0: train LoRA adapters of this rank (peft), base frozen; 0: full fine-tuning
lora_rank = 0
lora_alpha = 32             # adapter scale alpha / rank
# > 0 draws masks from the global RNG, which checkpoints omit: resume not bit-exact
lora_dropout = 0.0
# name suffixes, language model only
lora_targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
lora_merger = False         # LoRA: also train the vision merger (the vision tower stays frozen)
deepspeed = ""              # configs/ds_zero3.json at paper scale
# seconds a collective waits for a late rank before the run fails (why 900: sft.py)
dist_timeout = 900
# -----------------------------------------------------------------------------
# a resume keeps these (common.check_resume): the data stream, the start (the KL reference) and
# the form of the saved state
RUN_KEYS = ("init_from", "data_dir", "train_json", "media_root", "seed", "batch_size",
            "num_generations", "num_contrast", "prompt_style", "deepspeed",
            "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_merger")
# config files and --key=value from the command line (a test or bench.py importing this: defaults)
argv = sys.argv[1:] if __name__ == "__main__" else []
choices = dict(temporal_rule=tuple(rewards.RULES),
               length_rule=tuple(rewards.RULES),
               bonus_to=rewards.BONUS_TO,
               contrast_timestamps=data.CONTRAST_TIMESTAMPS,
               loss_norm=("sequence", "token"),
               attn=model.ATTENTION,
               prompt_style=("", *data.PROMPT_STYLES),
               batch_size=range(1, 2**16),
               num_generations=range(2, 2**16))
config = common.configure(globals(), argv, choices)
if temporal_credit and deepspeed:
    # its extra forward runs outside the engine, where ZeRO-3's weights are partitioned
    raise ValueError("temporal_credit runs without DeepSpeed only")
# official: one token's log pi_ref/pi beyond +-10 would make k3 overflow
KL_LOG_RATIO_CLAMP = 10.0


class Row(NamedTuple):
    """One rollout row: a response to examples[prompt], on its ordered or shuffled clip."""
    prompt: int     # the index of its example in the step's list
    contrast: bool  # True: the shuffled clip, a row that only measures p~


class Rollout(NamedTuple):
    """One step's rollouts on this rank: every row of every prompt in one batch."""
    examples: list       # data.Example per record loaded
    rows: list           # Row per response: G per prompt, then G~ per video prompt
    batch: model.PromptBatch | None  # one prompt per row (None without examples)
    ids: torch.Tensor    # (B, T) completion ids, padded after a row's stop token
    mask: torch.Tensor   # (B, T) 1 on the tokens up to and including the stop
    skipped: int         # records that skip_bad skipped


def step_job(records, step):
    """The prefetch.Job loading a step's records on this rank. The step's random draws, in order:
    the contrast shuffles (where the job runs), then the sampling generator's seed (rollout_of,
    from the generator the job hands back)."""
    rng = np.random.default_rng([seed, step, common.RANK])
    return prefetch.Job(data.load_batch, (records, rng, num_contrast > 0), records)


def step_jobs(train, consumed, start, stop):
    """step_job of every step start..stop-1: the next batch_size records of the record stream."""
    for step in range(start, stop):
        first = common.stream_position(consumed, step - start, batch_size)
        records = data.epoch_slice(train, first, batch_size, seed)
        yield step_job(records, step)


def rollout(policy, records, tokenizer, step, device):
    """rollout_of the records, loaded here (the training loop's are loaded ahead)."""
    loader = data.loader_of(tokenizer, config, model.unwrap(policy).config)
    job = step_job(records, step)
    return rollout_of(policy, job.load(loader, *job.args), tokenizer, device)


def rollout_of(policy, loaded, tokenizer, device):
    """G ordered responses per prompt and G~ contrast ones per video prompt, in one generate
    call, of a step's data.load_batch."""
    examples, skipped, rng = loaded

    # the rows: G see the clip in order, G~ the shuffled one; a clip is encoded once for its rows
    clips = []
    encoded = []
    row_clip = []
    rows = []
    for i, example in enumerate(examples):
        views = ((example.clip, example.prompt, num_generations, False),
                 (example.contrast_clip, example.contrast_prompt, num_contrast, True))
        for clip, prompt, n, contrast in views:
            # a contrast clip exists only for a video, and only when num_contrast > 0
            if clip is None:
                continue
            clips.append(clip)
            for _ in range(n):
                encoded.append(prompt)
                row_clip.append(len(clips) - 1)
                rows.append(Row(i, contrast))
    # every record of this rank failed: no rows (update_batch gives the placeholder)
    if not examples:
        no_tokens = torch.zeros(0, 0, dtype=torch.long, device=device)  # (0, 0)
        return Rollout(examples, rows, None, no_tokens, no_tokens, skipped)

    # one generate call for all rows
    net_config = model.unwrap(policy).config
    pad_id = tokenizer.pad_token_id
    batch = model.collate_prompts(encoded, clips, pad_id, net_config, device, row_clip)
    generator = torch.Generator(device).manual_seed(int(rng.integers(2**common.SEED_BITS)))
    stop_ids = model.stop_ids(tokenizer)
    ids, mask = model.generate(policy, batch, max_new_tokens, stop_ids, pad_id, temperature,
                               top_p, generator, cuda_graph=cuda_graph)  # (B, T) each
    return Rollout(examples, rows, batch, ids, mask, skipped)


def logprobs(net, batch, ids, mask):
    """(N, T) the completion log-probs of a step's rows, each distinct prompt run once (a group's
    rows share it): model.completion_logprobs with share_prompts, the same passes on every rank."""
    return model.completion_logprobs(net, batch, ids, mask, share_prompts=True)


def response_credit(policy, out):
    """(B,) the response-level temporal credit (rewards.temporal_credit) of every ordered row of a
    video with contrast rows; 0 for contrast rows and images. One no-grad log-prob pass of those
    responses, on their own prompt rows and on a contrast row's prompt of the same video: its
    shuffled clip, and under Qwen3-VL its own timestamps (contrast_timestamps)."""
    credit = np.zeros(len(out.rows))
    # each video prompt's contrast prompt: the prompt row of one of its contrast rows
    contrast_row = {}
    for b, row in enumerate(out.rows):
        if row.contrast:
            contrast_row[row.prompt] = b
    chosen = [b for b, row in enumerate(out.rows)
              if not row.contrast and row.prompt in contrast_row]
    if not chosen:
        return credit

    # the chosen responses twice: first after their own prompts, then after the contrast prompts
    n = len(chosen)
    on_shuffled = [contrast_row[out.rows[b].prompt] for b in chosen]
    both = out.batch.select(chosen + on_shuffled)
    ids = out.ids[chosen + chosen]  # (2n, T)
    mask = out.mask[chosen + chosen]  # (2n, T)
    with torch.no_grad():
        logp = logprobs(policy, both, ids, mask).float().cpu()  # (2n, T)
    credit[chosen] = rewards.temporal_credit(logp[:n].numpy(), logp[n:].numpy(),
                                             mask[:n].float().cpu().numpy())
    return credit


def ordered_rows(rows):
    """Indices of the ordered rows, the only ones the loss and the logged rewards see (contrast rows
    measure p~)."""
    return [b for b, row in enumerate(rows) if not row.contrast]


class Scores(NamedTuple):
    """score's results. Per row (B,): a contrast row has an accuracy (for p~) and zeros elsewhere.
    Per group: the temporal ones for each video prompt with contrast rows, in prompt order."""
    accuracy: np.ndarray        # (B,) accuracy_i
    format: np.ndarray          # (B,) format_i
    length_bonus: np.ndarray    # (B,) the length bonus, when length_bonus is on
    temporal_bonus: np.ndarray  # (B,) r_t as paid (eq. 2); 0 in plain GRPO
    reward: np.ndarray          # (B,) R_i (eq. 2), wherever bonus_to sends r_t
    advantages: np.ndarray      # (B,) A_i (eq. 3)
    p: list                     # per video group: the share of correct ordered responses
    p_contrast: list            # per video group: the share of correct shuffled ones, p~
    bonus_granted: list         # per video group: 1.0 where eq. 1 grants r_t, else 0.0
    # bonus_granted of the video groups where a bonus can matter: some, not all, responses correct
    bonus_granted_mixed: list
    credit: list                # per ordered row of a video group: its credit (temporal_credit)
    advantage_change: list      # per prompt: the mean |A_i - A_i without r_t| (rewards.advantages)
    uniform: list               # per prompt: 1.0 where its advantages are all 0, else 0.0


def score(examples, rows, texts, lengths, credit=None):
    """The rewards R_i and advantages A_i of the ordered rows, one group per prompt (eq. 1-3).
    credit: (B,) response_credit's, which scales each row's r_t (temporal_credit), or None."""
    accuracy = []
    for b, row in enumerate(rows):
        record = examples[row.prompt].record
        row_accuracy = rewards.accuracy_reward(texts[b], record["solution"], record["problem_type"])
        accuracy.append(row_accuracy)
    accuracy = np.array(accuracy)  # (B,)
    fmt = np.array([rewards.format_reward(text) for text in texts])  # (B,)
    length = np.zeros(len(rows))
    bonus = np.zeros(len(rows))
    total = np.zeros(len(rows))
    advantages = np.zeros(len(rows))
    p = []
    p_contrast = []
    bonus_granted = []
    bonus_granted_mixed = []
    credits = []
    advantage_change = []
    uniform = []
    for i, example in enumerate(examples):
        group = [b for b, row in enumerate(rows) if row == Row(i, False)]
        if length_bonus:
            group_lengths = [lengths[b] for b in group]
            length[group] = rewards.length_bonus(accuracy[group], group_lengths, length_rule,
                                                 threshold=correct_threshold)

        # a video with contrast rollouts: the temporal reward r_t (eq. 1)
        if example.contrast_clip is not None and num_contrast:
            contrast_rows = [b for b, row in enumerate(rows) if row == Row(i, True)]
            paid, p_i, p_contrast_i, granted = rewards.temporal_bonus(
                accuracy[group], accuracy[contrast_rows],
                temporal_rule, alpha, mu, correct_threshold, strict_contrast)
            if credit is not None:
                paid = np.asarray(paid) * credit[group]
                credits.extend(credit[group].tolist())
            if temporal:  # plain GRPO measures p and p~, for comparison, but pays nothing
                bonus[group] = paid
            p.append(p_i)
            p_contrast.append(p_contrast_i)
            bonus_granted.append(float(granted))
            # where all or none are correct, a bonus on the correct ones changes no advantage
            correct = [rewards.is_correct(a, correct_threshold, temporal_rule)
                       for a in accuracy[group]]
            if 0 < sum(correct) < len(group):
                bonus_granted_mixed.append(float(granted))

        # the group's advantages (eq. 2-3), the bonus on the reward or on the advantage (bonus_to)
        base = accuracy[group] + fmt[group] + length[group]
        group_advantages, change = rewards.advantages(base, bonus[group], bonus_to, scale_rewards)
        advantages[group] = group_advantages
        # R_i of eq. 2, logged the same way wherever the bonus goes
        total[group] = base + bonus[group]
        advantage_change.append(change)
        no_advantage = rewards.carries_no_advantage(total[group], bonus[group], bonus_to)
        uniform.append(float(no_advantage))
    return Scores(accuracy, fmt, length, bonus, total, advantages, p, p_contrast, bonus_granted,
                  bonus_granted_mixed, credits, advantage_change, uniform)


class UpdateBatch(NamedTuple):
    """What one update trains on."""
    batch: model.PromptBatch   # N prompts
    ids: torch.Tensor          # (N, T) completion ids
    mask: torch.Tensor         # (N, T) 1 on the tokens the loss counts
    advantages: torch.Tensor   # (N,) A_i
    placeholder: bool          # True: no response of this rank, a placeholder row at zero loss


def update_batch(policy, out, scores, device):
    """The ordered rows of a rollout, with their advantages A_i: the loss never sees a contrast row;
    under filter_groups, neither a row of a group whose advantages are all zero (scores.uniform).

    A rank whose records all failed has no rows. It trains on a placeholder row instead, at zero
    advantage and zero loss, so that its collectives (the gradient average, ZeRO's gathers) stay in
    step with the other ranks'; `placeholder` tells the log that its loss measures nothing."""
    keep = ordered_rows(out.rows)
    if filter_groups:
        keep = [b for b in keep if not scores.uniform[out.rows[b].prompt]]
    if not keep:
        batch, ids, mask = lifecycle.placeholder_batch(policy, device)
        return UpdateBatch(batch, ids, mask, torch.zeros(1, device=device), placeholder=True)
    advantages = torch.tensor(scores.advantages[keep], dtype=torch.float32, device=device)  # (N,)
    return UpdateBatch(out.batch.select(keep), out.ids[keep], out.mask[keep], advantages,
                       placeholder=False)


def tgrpo_loss(logp, old_logp, ref_logp, advantages, mask):
    """Eq. 4 as a loss to minimise. logp, old_logp, ref_logp, mask: (N, T); advantages: (N,)."""
    adv = advantages[:, None]  # (N, 1): one per response, for each of its tokens

    # the clipped surrogate, per token
    ratio = torch.exp(logp - old_logp)  # (N, T) pi / pi_old
    unclipped = ratio * adv  # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv  # (N, T)
    surrogate = torch.min(unclipped, clipped)  # (N, T)

    # the KL penalty: Schulman's k3 estimator of KL(pi || pi_ref), >= 0
    log_ref_ratio = ref_logp - logp  # (N, T) log pi_ref / pi
    log_ref_ratio = torch.clamp(log_ref_ratio, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (N, T)

    # the mean over a response's tokens, then over responses ("sequence"); or over all tokens
    per_token = -(surrogate - beta * kl)  # (N, T)
    masked = per_token * mask  # (N, T)
    if loss_norm == "sequence":
        response_lengths = mask.sum(1).clamp(min=1)  # (N,)
        loss = (masked.sum(1) / response_lengths).mean()
    else:
        loss = masked.sum() / mask.sum().clamp(min=1)

    # a token is clipped when the clip bound, not the ratio, sets the surrogate (no gradient there)
    is_clipped = (unclipped > clipped).float()  # (N, T)
    tokens = mask.sum().clamp(min=1)
    mean_kl = (kl * mask).sum() / tokens
    clip_fraction = (is_clipped * mask).sum() / tokens
    # mean -log pi of the sampled tokens: the policy's entropy, estimated, at temperature 1
    neg_logp = -(logp.detach() * mask).sum() / tokens
    stats = {"kl": mean_kl.item(),
             "clip_fraction": clip_fraction.item(),
             "neg_logp": neg_logp.item()}
    return loss, stats


def train_step(opt, policy, ref, batch, ids, mask, advantages, lr_now):
    """num_iterations updates on one set of rollouts; returns the last one's loss statistics and
    grad norm. Policy, old policy and reference share one precision (model.autocast): the first
    ratio is 1, the KL to equal weights 0."""
    # the reference pi_ref. Under LoRA it is the same model with its adapters off: no second copy
    ref_logp = None
    if beta:
        adapters_off = contextlib.nullcontext()
        if ref is policy:
            adapters_off = model.lora_of(ref).disable_adapter()
        with torch.no_grad(), adapters_off:
            ref_logp = logprobs(ref, batch, ids, mask)  # (N, T)

    # pi_old, the policy that generated the rollouts, as it was before this step's updates
    old_logp = None
    if num_iterations > 1:
        with torch.no_grad():
            old_logp = logprobs(policy, batch, ids, mask)  # (N, T)

    for _ in range(num_iterations):
        logp = logprobs(policy, batch, ids, mask)  # (N, T)
        # one update per rollout: pi_old == pi, and pi_old = logp.detach() makes the ratio exactly 1
        # in value while the policy gradient flows through logp
        old = old_logp
        if old is None:
            old = logp.detach()
        # beta = 0: no reference; pi itself stands in, at a KL of 0
        reference = ref_logp
        if reference is None:
            reference = logp.detach()
        loss, stats = tgrpo_loss(logp, old, reference, advantages, mask.float())
        opt.backward(loss)
        grad_norm = opt.step(lr_now)
    return {"loss": loss.item(), **stats, "grad_norm": grad_norm}


def step_stats(scores, rows, lengths):
    """A step's statistics on this rank, as lists to average: the reward terms of the ordered rows,
    the temporal measurements per video group, the advantage change per prompt, the response lengths
    (contrast rows too). Every list is empty on a rank without rollouts."""
    ordered = ordered_rows(rows)
    stats = {"p": scores.p,
             "groups_uniform": scores.uniform,
             "p_contrast": scores.p_contrast,
             "bonus_granted": scores.bonus_granted,
             "bonus_granted_mixed": scores.bonus_granted_mixed,
             "credit": scores.credit,
             "advantage_change": scores.advantage_change,
             "response_length": lengths}
    for key in ("accuracy", "format", "length_bonus", "temporal_bonus", "reward"):
        stats[key] = getattr(scores, key)[ordered].tolist()
    return stats


def mean(values):
    """A rank's mean of one statistic; NaN when it has no values (a step without a video prompt
    has no p), which mean_over_ranks leaves out."""
    if not len(values):
        return float("nan")
    return float(np.mean(values))


def log_samples(samples, step, out, texts, scores):
    """The first episode (ordered) and the last (for a video, a contrast one) of a rank's step."""
    indices = list(range(len(out.rows)))
    for b in indices[:1] + indices[-1:]:  # none on a rank without rollouts
        row = out.rows[b]
        record = out.examples[row.prompt].record
        reward = None  # a contrast response has no reward of its own: it only measures p~
        if not row.contrast:
            reward = float(scores.reward[b])
        episode = {"step": step,
                   "problem": record["problem"],
                   "solution": record["solution"],
                   "contrast": row.contrast,
                   "response": texts[b],
                   "accuracy": float(scores.accuracy[b]),
                   "reward": reward}
        common.log_metrics(samples, episode, True)


if __name__ == "__main__":
    device = common.setup_distributed(threads, seed, dist_timeout)
    rl_json = train_json or os.path.join(data_dir, "rl.json")
    train, bad = data.load_records(rl_json, media_root or None, skip_bad)
    init = common.latest_checkpoint(init_from) or init_from
    # run.json keeps the checkpoint `latest` named at the start: a resume starts from (and keeps
    # the KL reference of) that one, not the one `latest` names by then (an SFT run went on)
    config["init_from"] = init
    lifecycle.resolve_prompt_style(config, init)
    # consumed: records all ranks have read before `start` (the stream position, on any rank count)
    started = lifecycle.start_training(config, init, device, RUN_KEYS)
    policy, tokenizer, opt, start, consumed = started
    # the KL reference: under LoRA the policy itself, adapters off (train_step); else a frozen copy
    ref = None
    if beta and lora_rank:
        ref = policy
    elif beta:
        ref = lifecycle.frozen_reference(init, policy, deepspeed, attn)
    common.print0(f"T-GRPO from {init}: {len(train)} prompts ({bad} bad skipped), "
                  f"temporal={temporal} rule={temporal_rule}, "
                  f"G={num_generations} G~={num_contrast}, prompt {config['prompt_style']}, "
                  f"start at step {start}")
    log = common.open_log(os.path.join(out_dir, "metrics.jsonl"), start)
    samples = common.open_log(os.path.join(out_dir, "samples.jsonl"), start)
    wandb = common.open_wandb(config)  # None unless wandb_log (rank 0)
    stop = max_steps
    if run_steps:
        stop = min(max_steps, start + run_steps)
    skipped_total = 0
    # the steps' records, loaded ahead by data_workers processes (0: each when its turn comes)
    loader = data.loader_of(tokenizer, config, model.unwrap(policy).config)
    loads = prefetch.Prefetcher(step_jobs(train, consumed, start, stop), loader, data_workers,
                                data_timeout)

    for step in range(start, stop):
        t0 = time.time()
        lr_now = common.cosine_lr(step, lr, warmup_steps, max_steps, min_lr_ratio)

        # rollout: G ordered (and G~ shuffled) responses per prompt of this rank's share of the data
        policy.eval()
        loaded = next(loads)
        # every rank enters the generation phase, even one whose clips all failed
        with common.generation_phase(policy):
            out = rollout_of(policy, loaded, tokenizer, device)
        rollout_time = time.time() - t0
        texts = tokenizer.batch_decode(out.ids, skip_special_tokens=True)  # past a stop: pad
        lengths = out.mask.sum(1).tolist()

        # the response-level temporal credit: one no-grad pass more (temporal_credit)
        t_credit = time.time()
        credit = None
        if temporal_credit:
            credit = response_credit(policy, out)
        credit_time = time.time() - t_credit

        # score: rewards and advantages, one group per prompt
        scores = score(out.examples, out.rows, texts, lengths, credit)

        # select the ordered rows, their prompts sharing clips (a rank without data: a placeholder)
        chosen = update_batch(policy, out, scores, device)

        # update
        policy.train()
        update = train_step(opt, policy, ref,
                            chosen.batch, chosen.ids, chosen.mask, chosen.advantages, lr_now)

        # log: this rank's means, averaged over ranks (the counts summed)
        # a placeholder's loss measures nothing; grad_norm does (taken after the ranks' average)
        if chosen.placeholder:
            update = {key: float("nan") for key in update} | {"grad_norm": update["grad_norm"]}
        local = {key: mean(values) for key, values in step_stats(scores, out.rows, lengths).items()}
        local |= update
        local["skipped"] = float(out.skipped)
        # the groups left out of this update (filter_groups), counted over ranks
        local["groups_dropped"] = 0.0
        if filter_groups:
            local["groups_dropped"] = float(sum(scores.uniform))
        local["rollout_tokens_per_s"] = float(sum(lengths)) / rollout_time
        local["credit_time"] = credit_time
        summed = ("skipped", "rollout_tokens_per_s", "groups_dropped")
        metrics = {"step": step + 1, **common.mean_over_ranks(local, device, sums=summed)}
        metrics["lr"] = lr_now
        metrics["step_time"] = time.time() - t0
        metrics["skipped_at_load"] = bad
        skipped_total += metrics["skipped"]
        # this rank's peak so far, to check a memory plan against (RESULTS.md)
        if torch.cuda.is_available():
            metrics["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        common.log_metrics(log, metrics, (step + 1) % log_interval == 0, wandb)
        if log and (step + 1) % sample_interval == 0:
            log_samples(samples, step + 1, out, texts, scores)

        # checkpoint
        if (step + 1) % ckpt_interval == 0 or step + 1 == stop:
            # the records all ranks have read through this step: where a resume goes on
            consumed_now = common.stream_position(consumed, step + 1 - start, batch_size, rank=0)
            folder = lifecycle.save_checkpoint(out_dir, step + 1, tokenizer, opt, config,
                                               consumed_now)
            common.print0("checkpoint:", folder)

    loads.close()
    common.print0(f"done: steps {start + 1}-{stop}; skipped {bad} bad records at load, "
                  f"{skipped_total:g} examples in steps")
    common.finish()
