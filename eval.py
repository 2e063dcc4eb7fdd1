"""Evaluate a checkpoint on Video-R1-format eval JSONs (the paper's six benchmarks come in that
format); by default on the synthetic task's eval set, with each problem type's metric (DETAILS.md,
"Eval metrics"). --shuffled=True also answers each video question on its frames shuffled: a model
that uses frame order scores lower there (the gap).

    python eval.py                        # out/tgrpo on out/synthetic/eval.json
    python eval.py --model_path=out/sft --shuffled=True
    torchrun --nproc_per_node 8 eval.py --model_path=ckpt \
        --data=eval_vsibench.json,eval_mvbench.json --max_frames=32

Answers are appended to out_dir/results.rank{R}.jsonl batch by batch: a killed run restarts where
it stopped. No skip_bad: a sample whose media, prompt length or batch memory fail scores 0, with
its reason; a bad field stops the run.
"""
import glob
import json
import os
import sys
from decimal import Decimal

import numpy as np
import torch
from tqdm import tqdm

import common
# the config key `data` below (the eval JSONs, a public CLI flag) takes the module's own name
import data as video_data
import lifecycle
import model
import prefetch
import rewards

# ----------------------------------------------------------------------------- config
# an HF folder, or a run folder whose `latest` names its newest checkpoint
model_path = "out/tgrpo"
# comma-separated eval JSONs; each file's stem names its benchmark
data = "out/synthetic/eval.json"
# "" -> each JSON's folder; record paths are relative to it
media_root = ""
# results.rank{R}.jsonl (resumable), run.json, summary.json, table.md
out_dir = "out/eval"
fps = 2.0                            # inference frame sampling, kept apart from training's settings
min_frames = 4
max_frames = 16                      # the paper reports 16, 32 and 64
min_pixels = 4 * 28 * 28
# the paper's inference: 256*28*28 pixels per frame (training: 128*28*28)
max_pixels = 256 * 28 * 28
total_pixels = 0                     # the clip's pixel budget (Qwen3-VL's qwen-vl-utils); 0: none
# 0: greedy; the paper's 0.01 / top-p 0.001 is greedy in effect; official eval 0.1
temperature = 0.0
top_p = 1.0
max_new_tokens = 256                 # paper scale: 1024, as the official eval
# a longer prompt fails its sample alone (64 frames x 256*28*28 px: 8k tokens)
max_prompt_tokens = 16384
batch_size = 8                       # prompts (ordered and shuffled) per generate call
# the shuffled frame order of each record, and sampling when temperature > 0
seed = 0
# CPU threads; 1 repeats bit for bit on any CPU count (0: torch's choice)
threads = 1
# "flash_attention_2" where flash_attn is installed, else "sdpa"
attn = common.ATTN
# data.PROMPT_STYLES: "" -> the one the checkpoint was trained with, else "reasoning"
prompt_style = ""
# also answer each video question on its frames shuffled (temporal reliance)
shuffled = False
# seconds a collective waits for a late rank before the run fails (why 900: sft.py)
dist_timeout = 900
# Qwen3-VL's timestamps of a shuffled clip: "ordered" or "shuffled" with the frames (as tgrpo.py)
contrast_timestamps = "ordered"
# processes that load the next batches' media while this one is answered (prefetch.py); 0: each
# batch loads its own
data_workers = 0
data_timeout = prefetch.TIMEOUT  # seconds without a worker's result before it counts as hung
# record the decode step as a CUDA graph on a GPU (model.generate); False: it runs eager there
cuda_graph = True
# -----------------------------------------------------------------------------
config = common.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [],
                          choices=dict(attn=model.ATTENTION,
                                       prompt_style=("", *video_data.PROMPT_STYLES),
                                       contrast_timestamps=video_data.CONTRAST_TIMESTAMPS))
# record fields the table breaks a benchmark down by: the benchmarks' own breakdowns (VSI-Bench's
# tasks, VideoMME's video lengths, the synthetic task's families); not data_source, which in MMVU
# and VideoMMMU names each record's YouTube video
GROUP_FIELDS = ("original_question_type", "duration", "category", "family", "temporal")
# a field splits a benchmark only into 2 to MAX_GROUPS groups: more values name records rather than
# kinds of question, and hundreds of one-record rows would bury the breakdown (VSI-Bench has 10)
MAX_GROUPS = 12


def _number(x):
    """A number or numeric string ("1,200" too) as the exact Decimal of its shortest repr, so that
    0.9 against 1 is 10% off as written (binary floats make it 9.99...%); None for anything else,
    nan and inf included."""
    value = rewards.to_number(str(x))
    if value is None:
        return None
    return Decimal(repr(value))


def mean_relative_accuracy(pred, gt):
    """VSI-Bench's MRA: the share of thresholds t in {0.50, 0.55, ..., 0.95} with
    |pred - gt| / |gt| < 1 - t (gt == 0: 1 for an exact 0, else 0). A prediction that is not a
    finite number scores 0; a ground truth like that, an error."""
    p = _number(pred)
    g = _number(gt)
    if g is None:
        raise ValueError(f"ground truth {gt!r} is not a finite number")
    if p is None:
        return 0.0
    if g == 0:
        return float(p == 0)
    error = abs(p - g) / abs(g)
    # 1 - t = k/20 for t = 0.95, ..., 0.50
    return sum(error < Decimal(k) / 20 for k in range(1, 11)) / 10


def score(response, record):
    """The eval metric of one response, in [0, 1] (DETAILS.md, "Eval metrics")."""
    kind = record["problem_type"]
    if kind == "regression":
        predicted = rewards.extract_answer(response)
        truth = rewards.extract_answer(record["solution"])
        return mean_relative_accuracy(predicted, truth)
    reward = rewards.accuracy_reward(response, record["solution"], kind)
    # these two are right or wrong (accuracy); OCR and free-form keep their partial credit
    if kind in ("multiple choice", "numerical"):
        return float(reward == 1.0)
    return reward


def key(result):
    """A result's sample: (benchmark, record index, shuffled?), as run_batch's items name it."""
    return result["benchmark"], result["index"], result["shuffled"]


def empty_result(k, record):
    """Sample k's result before it is answered: no response, scored 0."""
    benchmark, index, is_shuffled = k
    groups = {field: record[field] for field in GROUP_FIELDS if field in record}
    return {
        "benchmark": benchmark,
        "index": index,
        "shuffled": is_shuffled,
        "data_type": record["data_type"],
        "problem_type": record["problem_type"],
        **groups,
        "response": None,
        "answer": None,
        "score": 0.0,
        "failed": None,
    }


def batch_records(items):
    """{(benchmark, record index): record} of a batch's items, each record once: its ordered and
    shuffled samples share one decode."""
    records = {}
    for (benchmark, index, _), record in items:
        records.setdefault((benchmark, index), record)
    return records


def batch_job(items):
    """The prefetch.Job loading a batch's records: each one's (prompt, clip, shuffled clip, its
    prompt), or the DataError that fails its samples (data.load_each)."""
    records = batch_records(items)
    rngs = []
    for _, index in records:
        rng = None
        if shuffled:
            # seeded per record, not per batch or rank: any split of the work shuffles alike
            rng = np.random.default_rng([seed, index])
        rngs.append(rng)
    return prefetch.Job(video_data.load_each, (list(records.values()), rngs),
                        list(records.values()))


def is_out_of_memory(err):
    """CUDA raises torch.OutOfMemoryError; the CPU allocator, a plain RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def run_batch(net, tokenizer, items, generator, device):
    """answer_batch of items, loaded here (the main loop's batches are loaded ahead)."""
    loader = video_data.loader_of(tokenizer, config, model.unwrap(net).config)
    job = batch_job(items)
    return answer_batch(net, tokenizer, items, job.load(loader, *job.args), generator, device)


def answer_batch(net, tokenizer, items, loaded, generator, device):
    """One result per item (k, record), k = (benchmark, record index, shuffled?), of the batch's
    `loaded` records (batch_job's); a failed one scores 0 with its reason. A bad clip fails its
    own samples only (media load per record); running out of memory, the batch's."""
    results = {k: empty_result(k, record) for k, record in items}

    # media: a record's ordered and shuffled samples share one decode
    examples = dict(zip(batch_records(items), loaded))
    answered = []
    for k, record in items:
        benchmark, index, is_shuffled = k
        example = examples[benchmark, index]
        if isinstance(example, video_data.DataError):
            results[k]["failed"] = str(example)
            continue
        prompt, clip, shuffled_clip, shuffled_prompt = example
        if is_shuffled:
            clip = shuffled_clip
            prompt = shuffled_prompt
        answered.append((k, record, prompt, clip))
    if not answered:
        return list(results.values())

    # one generate call for the batch; running out of memory fails the batch, other errors rise
    keys, records, prompts, clips = zip(*answered)
    model_config = model.unwrap(net).config
    batch = model.collate_prompts(prompts, clips, tokenizer.pad_token_id, model_config, device)
    try:
        ids, mask = model.generate(net, batch, max_new_tokens, model.stop_ids(tokenizer),
                                   tokenizer.pad_token_id, temperature, top_p, generator,
                                   cuda_graph=cuda_graph)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        first_line = str(err).splitlines()[0][:200]
        for k in keys:
            results[k]["failed"] = f"out of memory in a batch of {len(keys)}: {first_line}"
        return list(results.values())

    # decode and score. Past its stop a row holds pad, a special token that decoding skips
    # (never ids * mask: id 0 is "!" in Qwen)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    for k, record, text in zip(keys, records, texts):
        answer = rewards.extract_answer(text)
        results[k].update(response=text, answer=answer, score=score(text, record))
    return list(results.values())


def read_results(path, repair=False):
    """The results in one file. Batches are appended whole and flushed, so a crash can only cut
    the LAST line: it is dropped (and with repair=True cut from the file, so appending goes on
    cleanly); any other bad line is an error."""
    with open(path, "rb") as f:
        raw = f.read()
    end = raw.rfind(b"\n") + 1
    if repair and end < len(raw):
        os.truncate(path, end)
    results = []
    for n, line in enumerate(raw[:end].decode().splitlines(), 1):
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError as err:
            message = f"{path} line {n} is not a result ({err}); only a last line is cut by a crash"
            raise ValueError(message) from err
    return results


def all_results():
    """Every rank's results; a restart with another number of ranks reads the old ranks' files
    too."""
    paths = sorted(glob.glob(os.path.join(out_dir, "results.rank*.jsonl")))
    return [r for path in paths for r in read_results(path)]


def mean_score(rows):
    """The rows' mean score; None for no rows."""
    if not rows:
        return None
    return sum(r["score"] for r in rows) / len(rows)


def metrics(rows):
    """Scores of one group: `score` over its records answered in order; failed samples count 0
    in every mean."""
    ordered = [r for r in rows if not r["shuffled"]]
    out = {
        "records": len(ordered),
        "failed": sum(r["failed"] is not None for r in rows),
        "score": mean_score(ordered),
    }
    if not shuffled:
        return out

    # ordered and shuffled over the same video records; images have no shuffled answer
    # "frame" records (MVBench's TVQA) are videos too
    videos = [r for r in ordered if r["data_type"] != "image"]
    twins = [r for r in rows if r["shuffled"]]
    out["videos"] = len(videos)
    out["ordered"] = mean_score(videos)
    out["shuffled"] = mean_score(twins)
    out["gap"] = None
    if videos:
        out["gap"] = out["ordered"] - out["shuffled"]
    return out


def group_label(field, value):
    """A group's name in the table: "temporal" / "control" by the temporal flag, else
    field=value."""
    if field != "temporal":
        return f"{field}={value}"
    if value:
        return "temporal"
    return "control"


def breakdown(rows):
    """Metrics of each group of a benchmark's rows: one per value of each GROUP_FIELDS field."""
    groups = {}
    for field in GROUP_FIELDS:
        split = {}
        for r in rows:
            if field in r:
                split.setdefault(group_label(field, r[field]), []).append(r)
        # one value for all splits nothing; more than MAX_GROUPS name records (see MAX_GROUPS)
        if 2 <= len(split) <= MAX_GROUPS:
            for label in sorted(split):
                groups[label] = metrics(split[label])
    return groups


def summarize(results, paths, settings):
    """summary.json: the settings, the failures whole, and each benchmark's metrics, overall and
    by group."""
    bad = [r for r in results if r["failed"] is not None]
    summary = {
        "settings": settings,
        "samples": len(results),
        "failed": len(bad),
        "failures": bad,
        "benchmarks": {},
    }
    for name, path in paths.items():
        rows = [r for r in results if r["benchmark"] == name]
        summary["benchmarks"][name] = {
            "json": path,
            "all": metrics(rows),
            "groups": breakdown(rows),
        }
    return summary


def percent(x, fmt=".1f"):
    if x is None:
        return "-"
    return format(100 * x, fmt)


def table(summary):
    """table.md: a header of the settings, then one row per benchmark and group."""
    s = summary["settings"]
    if s["temperature"] == 0:
        decoding = "greedy"
    else:
        decoding = f"temperature {s['temperature']}, top_p {s['top_p']}"
    cols = ["benchmark", "group", "records", "failed", "score %"]
    if s["shuffled"]:
        cols += ["videos", "ordered %", "shuffled %", "gap"]

    # the header: what the numbers were measured with, and how failures count
    frames = f"{s['min_frames']}-{s['max_frames']} frames at {s['fps']} fps"
    pixels = f"{s['min_pixels']}-{s['max_pixels']} pixels per frame"
    tokens = f"max_new_tokens {s['max_new_tokens']}"
    failed = f"{summary['failed']} of {summary['samples']} samples failed"
    lines = [
        f"checkpoint {s['checkpoint']}: {frames}, {pixels}, {decoding}, {tokens}",
        f"{failed} (reasons in summary.json); a failed sample scores 0",
    ]
    if s["shuffled"]:
        lines.append("ordered / shuffled: video records answered on frames in order / shuffled;"
                     " gap in points")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    # the rows
    for name, bench in summary["benchmarks"].items():
        for group, m in [("all", bench["all"]), *bench["groups"].items()]:
            cells = [name, group, m["records"], m["failed"], percent(m["score"])]
            if s["shuffled"]:
                gap = percent(m["gap"], "+.1f")
                cells += [m["videos"], percent(m["ordered"]), percent(m["shuffled"]), gap]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def shuffle_flags(record):
    """The shuffled? flags a record is answered with: a video ("frame" records too) twice under
    --shuffled=True."""
    if shuffled and record["data_type"] != "image":
        return (False, True)
    return (False,)


if __name__ == "__main__":
    device = common.setup_distributed(threads, seed, dist_timeout)
    checkpoint = common.latest_checkpoint(model_path) or model_path
    json_paths = data.split(",")
    paths = {os.path.splitext(os.path.basename(path))[0]: path for path in json_paths}
    if len(paths) < len(json_paths):
        raise ValueError(f"two eval JSONs share a file name, which names the benchmark: {data}")

    # a fixed list of batches dealt out to ranks: each sample is answered in the same batch
    # whatever the number of ranks or restarts, so padding cannot change a greedy answer, and
    # N ranks give the 1-process result
    items = [
        ((name, record["index"], twin), record)
        for name, path in paths.items()
        for record in video_data.load_records(path, media_root or None)[0]
        for twin in shuffle_flags(record)
    ]
    batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    # loaded before run.json is written: a wrong path must not stick
    net, tokenizer = lifecycle.load_model(checkpoint, device, attn=attn)
    net.eval()
    # the prompt the checkpoint was trained on, unless told otherwise; run.json keeps it
    lifecycle.resolve_prompt_style(config, checkpoint)

    # resume only a run of the same settings, so answers of another checkpoint or frame count
    # never mix in (where the results go, and how the work waits or is loaded, change no answer)
    unkept = ("out_dir", "dist_timeout", "data_workers", "data_timeout")
    kept = {k: v for k, v in config.items() if k not in unkept}
    settings = {"checkpoint": checkpoint, **kept}
    run_json = os.path.join(out_dir, "run.json")
    if common.RANK == 0 and not os.path.exists(run_json):
        os.makedirs(out_dir, exist_ok=True)
        common.write_atomic(run_json, json.dumps(settings, indent=1))
    common.barrier()
    with open(run_json) as f:
        stored = json.load(f)
    if stored != settings:
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        raise ValueError(f"{out_dir} holds results of other settings (stored, now): {changed}; "
                         "use another out_dir")
    own = os.path.join(out_dir, f"results.rank{common.RANK}.jsonl")
    if os.path.exists(own):
        read_results(own, repair=True)
    done = {key(r) for r in all_results()}
    mine = range(common.RANK, len(batches), common.WORLD)
    todo = [j for j in mine if not all(k in done for k, _ in batches[j])]
    common.print0(f"eval {checkpoint}: {len(items)} samples in {len(batches)} batches on "
                  f"{common.WORLD} rank(s), {len(done)} done before")

    # answer batch by batch, each loaded ahead by data_workers processes (0: when its turn comes);
    # each batch's sampling seed depends on its number alone
    loader = video_data.loader_of(tokenizer, config, net.config)
    jobs = (batch_job(batches[j]) for j in todo)
    loads = prefetch.Prefetcher(jobs, loader, data_workers, data_timeout)
    with open(own, "a") as log, loads:
        progress = tqdm(todo, desc="eval batches (rank 0)", disable=common.RANK != 0,
                        mininterval=10)
        for j in progress:
            seed_j = int(np.random.default_rng([seed, j]).integers(2**common.SEED_BITS))
            generator = torch.Generator(device).manual_seed(seed_j)
            results = answer_batch(net, tokenizer, batches[j], next(loads), generator, device)
            # whole batches only, so a crash can cut the last line alone
            log.write("".join(json.dumps(r) + "\n" for r in results if key(r) not in done))
            log.flush()
            os.fsync(log.fileno())
    common.barrier()

    # rank 0 merges every rank's results into the summary and the table
    if common.RANK == 0:
        merged = {key(r): r for r in all_results()}
        # a KeyError names a lost sample
        summary = summarize([merged[k] for k, _ in items], paths, settings)
        common.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
        common.write_atomic(os.path.join(out_dir, "table.md"), table(summary))
        print(table(summary), flush=True)
    common.finish()
