"""Evaluate a checkpoint on Video-R1-format eval JSONs (the paper's six benchmarks come in that format); by default on
the synthetic task's eval set, with each problem type's metric (DETAILS.md, "Eval metrics"). --shuffled=True also
answers each video question on its frames shuffled: a model that uses frame order scores lower there (the gap).

    python eval.py                                                # out/tgrpo on out/synthetic/eval.json
    python eval.py --model_path=out/sft --shuffled=True
    torchrun --nproc_per_node 8 eval.py --model_path=ckpt --data=eval_vsibench.json,eval_mvbench.json --max_frames=32

Answers are appended to out_dir/results.rank{R}.jsonl batch by batch: a killed run restarts where it stopped. No
skip_bad: a sample whose media, prompt length or batch memory fail scores 0, with its reason; a bad field stops the run.
"""
import glob
import json
import os
import sys
from decimal import Decimal
import numpy as np
import torch
from tqdm import tqdm
import common as C
import data as D
import lifecycle
import model as M
import rewards

# ----------------------------------------------------------------------------- config
model_path = "out/tgrpo"             # an HF folder, or a run folder whose `latest` names its newest checkpoint
data = "out/synthetic/eval.json"     # comma-separated eval JSONs; each file's stem names its benchmark
media_root = ""                      # "" -> each JSON's folder; record paths are relative to it
out_dir = "out/eval"                 # results.rank{R}.jsonl (resumable), run.json, summary.json, table.md
fps = 2.0                            # inference frame sampling, kept apart from training's settings
min_frames = 4
max_frames = 16                      # the paper reports 16, 32 and 64
min_pixels = 4 * 28 * 28
max_pixels = 256 * 28 * 28           # the paper's inference: 256*28*28 pixels per frame (training: 128*28*28)
temperature = 0.0                    # 0: greedy; the paper's 0.01 / top-p 0.001 is greedy in effect; official eval 0.1
top_p = 1.0
max_new_tokens = 256                 # paper scale: 1024, as the official eval
max_prompt_tokens = 16384            # a longer prompt fails its sample alone (64 frames x 256*28*28 px: 8k tokens)
batch_size = 8                       # prompts (ordered and shuffled) per generate call
seed = 0                             # the shuffled frame order of each record, and sampling when temperature > 0
threads = 1                          # CPU threads; 1 repeats bit for bit on any CPU count (0: torch's choice)
attn = C.ATTN                        # "flash_attention_2" where flash_attn is installed, else "sdpa"
shuffled = False                     # also answer each video question on its frames shuffled (temporal reliance)
# -----------------------------------------------------------------------------
config = C.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [], choices=dict(attn=M.ATTENTION))
GROUP_FIELDS = ("data_source", "category", "family", "temporal")  # record fields the table breaks a benchmark down by

def _number(x):
    """A number or numeric string ("1,200" too) as the exact Decimal of its shortest repr, so that 0.9 against 1 is
    10% off as written (binary floats make it 9.99...%); None for anything else, nan and inf included."""
    value = rewards.to_number(str(x))
    return None if value is None else Decimal(repr(value))

def mean_relative_accuracy(pred, gt):
    """VSI-Bench's MRA: the share of thresholds t in {0.50, 0.55, ..., 0.95} with |pred - gt| / |gt| < 1 - t (gt == 0:
    1 for an exact 0, else 0). A prediction that is not a finite number scores 0; a ground truth like that, an error."""
    p, g = _number(pred), _number(gt)
    if g is None:
        raise ValueError(f"ground truth {gt!r} is not a finite number")
    if p is None:
        return 0.0
    if g == 0:
        return float(p == 0)
    error = abs(p - g) / abs(g)
    return sum(error < Decimal(k) / 20 for k in range(1, 11)) / 10  # 1 - t = k/20 for t = 0.95, ..., 0.50

def score(response, record):
    """The eval metric of one response, in [0, 1] (DETAILS.md, "Eval metrics")."""
    kind = record["problem_type"]
    if kind == "regression":
        return mean_relative_accuracy(rewards.extract_answer(response), rewards.extract_answer(record["solution"]))
    reward = rewards.accuracy_reward(response, record["solution"], kind)
    return float(reward == 1.0) if kind in ("multiple choice", "numerical") else reward

def key(result):
    return result["benchmark"], result["index"], result["shuffled"]

def run_batch(model, tokenizer, items, generator, device):
    """One result per item (k, record), k = (benchmark, record index, shuffled?); a failed one scores 0 with its
    reason. A bad clip fails its own samples only (media load per record); running out of memory, the batch's."""
    results = {k: {"benchmark": k[0], "index": k[1], "shuffled": k[2], "data_type": record["data_type"],
                   "problem_type": record["problem_type"], **{f: record[f] for f in GROUP_FIELDS if f in record},
                   "response": None, "answer": None, "score": 0.0, "failed": None} for k, record in items}
    loaded, answered = {}, []
    for k, record in items:
        if k[:2] not in loaded:  # a record's ordered and shuffled samples share one decode; the shuffled order is
            rng = np.random.default_rng([seed, k[1]]) if shuffled else None  # seeded per record, not per batch or rank
            try:
                loaded[k[:2]] = D.load_example(record, tokenizer, config, rng)
            except D.DataError as err:
                loaded[k[:2]] = err
        if isinstance(loaded[k[:2]], D.DataError):
            results[k]["failed"] = str(loaded[k[:2]])
            continue
        prompt, clip, shuffled_clip = loaded[k[:2]]
        answered.append((k, record, prompt, shuffled_clip if k[2] else clip))
    if answered:
        keys, records, prompts, clips = zip(*answered)
        batch = M.collate_prompts(prompts, clips, tokenizer.pad_token_id, M.unwrap(model).config, device)
        try:
            ids, mask = M.generate(model, batch, max_new_tokens, M.stop_ids(tokenizer), tokenizer.pad_token_id,
                                   temperature, top_p, generator)
        except RuntimeError as err:  # CUDA's torch.OutOfMemoryError, or the CPU allocator's RuntimeError; others rise
            if not (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)):
                raise
            for k in keys:
                results[k]["failed"] = f"out of memory in a batch of {len(keys)}: {str(err).splitlines()[0][:200]}"
            return list(results.values())
        # past its stop a row holds pad, a special token that decoding skips (never ids * mask: id 0 is "!" in Qwen)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        for k, record, text in zip(keys, records, texts):
            results[k].update(response=text, answer=rewards.extract_answer(text), score=score(text, record))
    return list(results.values())

def read_results(path, repair=False):
    """The results in one file. Batches are appended whole and flushed, so a crash can only cut the LAST line: it is
    dropped (and with repair=True cut from the file, so appending goes on cleanly); any other bad line is an error."""
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
            raise ValueError(f"{path} line {n} is not a result ({err}); only a last line is cut by a crash") from err
    return results

def all_results():
    """Every rank's results; a restart with another number of ranks reads the old ranks' files too."""
    return [r for path in sorted(glob.glob(os.path.join(out_dir, "results.rank*.jsonl"))) for r in read_results(path)]

def metrics(rows):
    """Scores of one group: `score` over its records answered in order; failed samples count 0 in every mean."""
    mean = lambda rs: sum(r["score"] for r in rs) / len(rs) if rs else None
    ordered = [r for r in rows if not r["shuffled"]]
    out = {"records": len(ordered), "failed": sum(r["failed"] is not None for r in rows), "score": mean(ordered)}
    if shuffled:  # ordered and shuffled over the same video records; images have no shuffled answer
        videos = [r for r in ordered if r["data_type"] == "video"]
        out |= {"videos": len(videos), "ordered": mean(videos), "shuffled": mean([r for r in rows if r["shuffled"]])}
        out["gap"] = out["ordered"] - out["shuffled"] if videos else None
    return out

def summarize(results, paths, settings):
    bad = [r for r in results if r["failed"] is not None]
    summary = {"settings": settings, "samples": len(results), "failed": len(bad), "failures": bad, "benchmarks": {}}
    for name, path in paths.items():
        rows = [r for r in results if r["benchmark"] == name]
        groups = {}
        for field in GROUP_FIELDS:
            split = {}
            for r in (r for r in rows if field in r):
                label = ("temporal" if r[field] else "control") if field == "temporal" else f"{field}={r[field]}"
                split.setdefault(label, []).append(r)
            if len(split) > 1:  # a field with one value for all splits nothing
                groups |= {label: metrics(split[label]) for label in sorted(split)}
        summary["benchmarks"][name] = {"json": path, "all": metrics(rows), "groups": groups}
    return summary

def table(summary):
    s, pct = summary["settings"], lambda x, fmt=".1f": "-" if x is None else format(100 * x, fmt)
    decoding = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top_p {s['top_p']}"
    cols = ["benchmark", "group", "records", "failed", "score %"]
    cols += ["videos", "ordered %", "shuffled %", "gap"] * s["shuffled"]
    lines = [f"checkpoint {s['checkpoint']}: {s['min_frames']}-{s['max_frames']} frames at {s['fps']} fps, "
             f"{s['min_pixels']}-{s['max_pixels']} pixels per frame, {decoding}, max_new_tokens {s['max_new_tokens']}",
             f"{summary['failed']} of {summary['samples']} samples failed (reasons in summary.json); "
             "a failed sample scores 0"]
    lines += ["ordered / shuffled: video records answered on frames in order / shuffled; gap in points"] * s["shuffled"]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, bench in summary["benchmarks"].items():
        for group, m in [("all", bench["all"]), *bench["groups"].items()]:
            cells = [name, group, m["records"], m["failed"], pct(m["score"])]
            if s["shuffled"]:
                cells += [m["videos"], pct(m["ordered"]), pct(m["shuffled"]), pct(m["gap"], "+.1f")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    device = C.setup_distributed(threads, seed)
    checkpoint = C.latest_checkpoint(model_path) or model_path
    paths = {os.path.splitext(os.path.basename(path))[0]: path for path in data.split(",")}
    if len(paths) < len(data.split(",")):
        raise ValueError(f"two eval JSONs share a file name, which names the benchmark: {data}")
    # a fixed list of batches dealt out to ranks: each sample is answered in the same batch whatever the number of
    # ranks or restarts, so padding cannot change a greedy answer, and N ranks give the 1-process result
    items = [((name, record["index"], twin), record) for name, path in paths.items()
             for record in D.load_records(path, media_root or None)[0]
             for twin in ((False, True) if shuffled and record["data_type"] == "video" else (False,))]
    batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    model, tokenizer = lifecycle.load_model(checkpoint, device, attn=attn)  # before run.json: a wrong path must not stick
    model.eval()
    settings = {"checkpoint": checkpoint, **{k: v for k, v in config.items() if k != "out_dir"}}
    # resume only a run of the same settings, so answers of another checkpoint or frame count never mix in
    run_json = os.path.join(out_dir, "run.json")
    if C.RANK == 0 and not os.path.exists(run_json):
        os.makedirs(out_dir, exist_ok=True)
        C.write_atomic(run_json, json.dumps(settings, indent=1))
    C.barrier()
    with open(run_json) as f:
        stored = json.load(f)
    if stored != settings:
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        raise ValueError(f"{out_dir} holds results of other settings (stored, now): {changed}; use another out_dir")
    own = os.path.join(out_dir, f"results.rank{C.RANK}.jsonl")
    if os.path.exists(own):
        read_results(own, repair=True)
    done = {key(r) for r in all_results()}
    todo = [j for j in range(C.RANK, len(batches), C.WORLD) if not all(k in done for k, _ in batches[j])]
    C.print0(f"eval {checkpoint}: {len(items)} samples in {len(batches)} batches on {C.WORLD} rank(s), "
             f"{len(done)} done before")
    with open(own, "a") as log:
        for j in tqdm(todo, desc="eval batches (rank 0)", disable=C.RANK != 0, mininterval=10):
            seed_j = int(np.random.default_rng([seed, j]).integers(2**C.SEED_BITS))
            results = run_batch(model, tokenizer, batches[j], torch.Generator(device).manual_seed(seed_j), device)
            log.write("".join(json.dumps(r) + "\n" for r in results if key(r) not in done))  # whole batches only
            log.flush()
            os.fsync(log.fileno())
    C.barrier()
    if C.RANK == 0:
        merged = {key(r): r for r in all_results()}
        summary = summarize([merged[k] for k, _ in items], paths, settings)  # a KeyError names a lost sample
        C.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
        C.write_atomic(os.path.join(out_dir, "table.md"), table(summary))
        print(table(summary), flush=True)
    C.finish()
