"""What GRPO's groups look like from a checkpoint, before any training: per family (or any record
field) of a Video-R1 JSON, G sampled responses per prompt on the clip in order, scored with
rewards.accuracy_reward as tgrpo.py scores them.

    python groups.py --model_path=out/sft1000 --data=out/synthetic_big/eval.json
    python groups.py --model_path=ckpt --data=Video-R1-260k.json --group_by=problem_type

A group's advantages are zero unless its responses differ in reward, so RL learns only from mixed
groups (some responses correct, some not). And a mixed group teaches the model to look at the clip
only where WHICH response is correct depends on the clip: a model that guesses makes mixed groups
too, whose advantages reward a guess. Per group of records it prints (RESULTS.md, "What RL learns
from"):
  sampled  mean accuracy of the sampled responses (tgrpo.py's training accuracy)
  other    their mean accuracy against the answer of another record of the same group: what the
           responses score where the clip is not theirs; sampled - other is what the clip adds (with
           its standard error over the prompts)
  mixed    share of prompts whose group has some but not all responses correct (accuracy >= 0.5)
  rescue   share of prompts with some responses right but fewer than half: where RL can turn a
           mostly wrong answer right
"""
import collections
import sys
from typing import NamedTuple

import numpy as np
import torch

import common
# the config key `data` below (the JSON) takes the module's own name, as in eval.py
import data as video_data
import lifecycle
import model
import rewards

# ----------------------------------------------------------------------------- config
model_path = "out/sft"               # an HF folder, or a run folder with `latest`
data = "out/synthetic/eval.json"     # a Video-R1 JSON (an eval set keeps RL's records unseen)
media_root = ""                      # "" -> the JSON's folder
group_by = "family"                  # the record field that splits the table (synthetic: family)
per_group = 48                       # prompts per group: the first videos of each group
num_generations = 8                  # G, as tgrpo.py
temperature = 0.7                    # as the rollouts being studied (compare.sh: 0.7)
top_p = 1.0
max_new_tokens = 96                  # as compare.sh's rollouts
prompts_per_call = 4                 # prompts per generate call (G rows each)
fps = 2.0                            # frame sampling and sizes: tgrpo.py's (training) values
min_frames = 4
max_frames = 16
min_pixels = 4 * 28 * 28
max_pixels = 128 * 28 * 28
total_pixels = 0
max_prompt_tokens = 1024
seed = 0                             # the sampling and the choice of each record's other record
threads = 1                          # CPU threads (0: torch's choice)
attn = common.ATTN
# data.PROMPT_STYLES: "" -> the one the checkpoint was trained with, else "reasoning"
prompt_style = ""
# record the decode step as a CUDA graph on a GPU (model.generate); False: it runs eager there
cuda_graph = True
# -----------------------------------------------------------------------------
config = common.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [],
                          choices=dict(attn=model.ATTENTION,
                                       prompt_style=("", *video_data.PROMPT_STYLES)))
config["skip_bad"] = False  # a bad record stops the measurement: its counts would be off


class GroupStats(NamedTuple):
    """One group's figures (the module docstring says what each means), as shares in [0, 1]."""
    prompts: int
    sampled: float
    other: float
    clip_error: float  # the standard error of sampled - other over the prompts
    mixed: float
    rescue: float


def other_records(records, rng):
    """For each record, another record of the same list, drawn as one random cycle through all of
    them (so none is its own other)."""
    order = rng.permutation(len(records))
    other = {}
    for k, index in enumerate(order):
        other[index] = records[order[(k + 1) % len(records)]]
    return [other[index] for index in range(len(records))]


def prompt_stats(texts, record, other):
    """(sampled, other, mixed, rescue) of one prompt's G responses."""
    problem_type = record["problem_type"]
    accuracy = np.array([rewards.accuracy_reward(t, record["solution"], problem_type)
                         for t in texts])  # [G]
    accuracy_other = np.array([rewards.accuracy_reward(t, other["solution"], problem_type)
                               for t in texts])  # [G]
    correct = [rewards.is_correct(a) for a in accuracy]
    mixed = 0 < sum(correct) < len(correct)
    rescue = 0 < sum(correct) < len(correct) / 2
    return accuracy.mean(), accuracy_other.mean(), float(mixed), float(rescue)


def sample(policy, tokenizer, records, generator):
    """G sampled responses per record on its ordered clip: a list of G texts per record."""
    loader = video_data.loader_of(tokenizer, config, policy.config)
    examples = video_data.load_batch(loader, records).examples
    encoded = []
    row_clip = []
    for i, example in enumerate(examples):
        for _ in range(num_generations):
            encoded.append(example.prompt)
            row_clip.append(i)
    clips = [example.clip for example in examples]
    pad_id = tokenizer.pad_token_id
    batch = model.collate_prompts(encoded, clips, pad_id, policy.config, policy.device, row_clip)
    ids, _ = model.generate(policy, batch, max_new_tokens, model.stop_ids(tokenizer), pad_id,
                            temperature, top_p, generator, cuda_graph=cuda_graph)  # [B * G, T]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [texts[i * num_generations:(i + 1) * num_generations] for i in range(len(records))]


def measure(policy, tokenizer, records):
    """{group: GroupStats} over the first per_group videos of each value of group_by."""
    groups = collections.defaultdict(list)
    for record in records:
        if group_by not in record:
            raise ValueError(f"{record['json']}: record {record['index']} (problem_id "
                             f"{record.get('problem_id')}) has no field {group_by!r}; "
                             f"--group_by=problem_type works for any Video-R1 JSON")
        if record["data_type"] == "video":
            groups[record[group_by]].append(record)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(policy.device).manual_seed(seed)
    table = {}
    for name in sorted(groups, key=str):
        chosen = groups[name][:per_group]
        others = other_records(chosen, rng)
        per_prompt = []
        for start in range(0, len(chosen), prompts_per_call):
            call = chosen[start:start + prompts_per_call]
            texts = sample(policy, tokenizer, call, generator)
            for k, record in enumerate(call):
                per_prompt.append(prompt_stats(texts[k], record, others[start + k]))
        per_prompt = np.array(per_prompt)  # [prompts, 4]: sampled, other, mixed, rescue
        sampled, other, mixed, rescue = per_prompt.mean(0).tolist()
        clip_part = per_prompt[:, 0] - per_prompt[:, 1]  # [prompts]
        clip_error = 0.0
        if len(chosen) > 1:
            clip_error = float(clip_part.std(ddof=1) / np.sqrt(len(chosen)))
        table[name] = GroupStats(len(chosen), sampled, other, clip_error, mixed, rescue)
    return table


def format_table(table):
    """The table as markdown, in percent."""
    header = "| prompts | sampled % | other % | sampled - other | mixed % | rescue % |"
    lines = [f"| {group_by} {header}", "|---|---|---|---|---|---|---|"]
    for name, stats in table.items():
        lines.append(f"| {name} | {stats.prompts} | {100 * stats.sampled:.1f} | "
                     f"{100 * stats.other:.1f} | {100 * (stats.sampled - stats.other):+.1f} "
                     f"± {100 * stats.clip_error:.1f} | "
                     f"{100 * stats.mixed:.0f} | {100 * stats.rescue:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    device = common.setup_distributed(threads, seed)
    path = common.latest_checkpoint(model_path) or model_path
    lifecycle.resolve_prompt_style(config, path)
    policy, tokenizer = lifecycle.load_model(path, device, attn=attn)
    policy.eval()
    records, _ = video_data.load_records(data, media_root or None)
    print(f"{path} on {data}: G={num_generations}, temperature {temperature}, "
          f"{max_new_tokens} new tokens, prompt {config['prompt_style']}, "
          f"the first {per_group} videos of each {group_by}")
    with torch.no_grad():
        table = measure(policy, tokenizer, records)
    print(format_table(table))
