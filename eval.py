"""Evaluate a checkpoint on Video-R1-format eval JSONs (the paper's six benchmarks come in that format) and, by
default, on the synthetic task's eval set.

    python eval.py                                              # out/tgrpo on out/synthetic/eval.json
    python eval.py --model_path=out/sft --shuffled=True         # + the temporal-reliance diagnostic
    python eval.py --model_path=ckpt --data=eval_vsibench.json,eval_mvbench.json --max_frames=32
    torchrun --nproc_per_node 8 eval.py --data=...              # batches split over ranks; the same result

Metrics (SPEC): accuracy (reward == 1) for multiple choice and numerical, mean relative accuracy for regression,
the reward itself (1 - WER, ROUGE) for OCR and free-form. With --shuffled=True each video question is also answered
on its frames shuffled: a model that uses frame order loses accuracy there (the gap), one that ignores it does not.

Every answer is appended to out_dir/results.rank{R}.jsonl when its batch finishes, so a killed run restarts where it
stopped. A sample whose media cannot be read, or whose batch runs out of memory, is a result too: failed, with the
reason, scoring 0 in every mean; nothing is dropped. Where this departs from the official eval: a response without
<answer> tags answers "" (the official eval scores the whole response then), and decoding is greedy by default.
"""
import glob
import json
import math
import os
import sys
import time
import numpy as np
import torch
import data as D
import model as M
import rewards

# ----------------------------------------------------------------------------- config
model_path = "out/tgrpo"             # an HF folder, or a run folder whose `latest` names its newest checkpoint
data = "out/synthetic/eval.json"     # comma-separated eval JSONs; each file's stem names its benchmark
media_root = ""                      # "" -> each JSON's folder; record paths are relative to it
out_dir = "out/eval"                 # results.rank{R}.jsonl (resumable), run.json, summary.json, table.md
fps = 2.0                            # inference frame sampling (SPEC), kept apart from training's settings
min_frames = 4
max_frames = 16                      # the paper reports 16, 32 and 64
min_pixels = 4 * 28 * 28
max_pixels = 256 * 28 * 28           # SPEC inference: 256*28*28 pixels per frame (training: 128*28*28)
temperature = 0.0                    # 0: greedy; the paper's 0.01 / top-p 0.001 is greedy in effect; official eval 0.1
top_p = 1.0
max_new_tokens = 256                 # paper scale: 1024, as the official eval
batch_size = 8                       # prompts (ordered and shuffled) per generate call
seed = 0                             # the shuffled frame order of each record, and sampling when temperature > 0
shuffled = False                     # also answer each video question on its frames shuffled (temporal reliance)
# -----------------------------------------------------------------------------
config = M.configure({k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))},
                     sys.argv[1:] if __name__ == "__main__" else [])
globals().update(config)
LIMITS = dict(fps=fps, min_frames=min_frames, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
GROUP_FIELDS = ("data_source", "category", "family", "temporal")  # record fields the table breaks a benchmark down by


def _number(x):
    """float of a number or a numeric string ("1,200" too); None when it is not a finite number."""
    try:
        value = float(str(x).replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def mean_relative_accuracy(pred, gt):
    """VSI-Bench's MRA: the share of thresholds t in {0.50, 0.55, ..., 0.95} with |pred - gt| / |gt| < 1 - t.
    A non-numeric, nan or inf prediction scores 0; a ground truth that is not a finite number is an error. gt == 0
    has no relative error: an exact 0 scores 1 and anything else 0 (as rewards.accuracy_reward's regression)."""
    p, g = _number(pred), _number(gt)
    if g is None:
        raise ValueError(f"ground truth {gt!r} is not a finite number")
    if p is None:
        return 0.0
    if g == 0:
        return float(p == 0)
    error = abs(p - g) / abs(g)
    # 1 - t as k/20: then 1 - 0.90 is exactly the double nearest 0.1, so an error of 10% fails t = 0.90 and passes 0.85
    return sum(error < k / 20 for k in range(1, 11)) / 10


def score(response, record):
    """SPEC's eval metric of one response, in [0, 1]."""
    kind = record["problem_type"]
    if kind == "regression":
        return mean_relative_accuracy(rewards.extract_answer(response), rewards.extract_answer(record["solution"]))
    reward = rewards.accuracy_reward(response, record["solution"], kind)
    return float(reward == 1.0) if kind in ("multiple choice", "numerical") else reward


def key(result):
    return result["benchmark"], result["index"], result["shuffled"]


def item_key(item):
    name, record, twin = item
    return name, record["index"], twin


def new_result(name, record, twin):
    """A sample's result before it is answered: failed samples keep score 0 and say why in `failed`."""
    return {"benchmark": name, "index": record["index"], "shuffled": twin, "data_type": record["data_type"],
            "problem_type": record["problem_type"], **{f: record[f] for f in GROUP_FIELDS if f in record},
            "response": None, "answer": None, "score": 0.0, "failed": None}


def is_out_of_memory(err):
    """CUDA raises torch.OutOfMemoryError; the CPU allocator a plain RuntimeError that says so."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def run_batch(net, tokenizer, items, generator, device):
    """Answer items [(benchmark, record, shuffled?)], one result each. Media are loaded per record before batching,
    so a bad clip fails only its own samples; a generate that runs out of memory fails the batch's samples."""
    results = [new_result(*item) for item in items]
    loaded, prompts, clips, rows = {}, [], [], []
    for i, (name, record, twin) in enumerate(items):
        if (name, record["index"]) not in loaded:
            # the shuffled order is seeded per record, so it does not depend on the batching or the rank
            rng = np.random.default_rng([seed, record["index"]]) if shuffled else None
            try:
                loaded[name, record["index"]] = D.load_example(record, tokenizer, LIMITS, rng, "shuffle")
            except D.DataError as err:
                loaded[name, record["index"]] = err
        example = loaded[name, record["index"]]
        if isinstance(example, D.DataError):
            results[i]["failed"] = str(example)
            continue
        prompt, clip, shuffled_clip = example
        prompts.append(prompt)
        clips.append(shuffled_clip if twin else clip)
        rows.append(i)
    if not rows:
        return results
    tokens_per_second = M.unwrap(net).config.vision_config.tokens_per_second
    batch = M.collate_prompts(prompts, clips, list(range(len(clips))), tokenizer.pad_token_id, tokens_per_second, device)
    try:
        ids, mask = M.generate(net, batch, max_new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                               temperature, top_p, generator)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        for i in rows:
            results[i]["failed"] = f"out of memory generating a batch of {len(rows)}: {str(err).splitlines()[0][:200]}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return results
    # past its stop a row holds pad, a special token that decoding skips (ids * mask would make it id 0: "!" in Qwen)
    texts = tokenizer.batch_decode(ids.masked_fill(mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    for i, text in zip(rows, texts):
        results[i].update(response=text, answer=rewards.extract_answer(text), score=score(text, items[i][1]))
    return results


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
            raise ValueError(f"{path} line {n} is not a result ({err}): only the last line may be cut by a crash") from err
    return results


def all_results():
    """Every rank's results; a restart with another number of ranks reads the old ranks' files too."""
    return [r for path in sorted(glob.glob(os.path.join(out_dir, "results.rank*.jsonl"))) for r in read_results(path)]


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def check_settings(settings):
    """Resume only a run of the same settings, so answers of another checkpoint or frame count never mix in."""
    path = os.path.join(out_dir, "run.json")
    if M.RANK == 0 and not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(path, json.dumps(settings, indent=1))
    M.barrier()
    with open(path) as f:
        stored = json.load(f)
    if stored != settings:
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        raise ValueError(f"{out_dir} holds results of other settings (stored, now): {changed}; use another out_dir")


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
    summary = {"settings": settings, "samples": len(results), "failed": sum(r["failed"] is not None for r in results),
               "failures": [{**dict(zip(("benchmark", "index", "shuffled"), key(r))), "reason": r["failed"]}
                            for r in results if r["failed"] is not None], "benchmarks": {}}
    for name, path in paths.items():
        rows = [r for r in results if r["benchmark"] == name]
        groups, seen = {}, {frozenset([frozenset(r["index"] for r in rows)])}  # a field that splits nothing adds nothing
        for field in GROUP_FIELDS:
            by_value = {}
            for r in rows:
                if field in r:
                    label = ("temporal" if r[field] else "control") if field == "temporal" else f"{field}={r[field]}"
                    by_value.setdefault(label, []).append(r)
            partition = frozenset(frozenset(r["index"] for r in rs) for rs in by_value.values())
            if partition not in seen:  # family often repeats data_source's grouping: show it once
                seen.add(partition)
                groups |= {label: metrics(by_value[label]) for label in sorted(by_value)}
        summary["benchmarks"][name] = {"json": path, "all": metrics(rows), "groups": groups}
    return summary


def table(summary):
    s = summary["settings"]
    decoding = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top_p {s['top_p']}"
    cols = ["benchmark", "group", "records", "failed", "score %"] + (["videos", "ordered %", "shuffled %", "gap"] if s["shuffled"] else [])
    pct = lambda x, fmt=".1f": "-" if x is None else format(100 * x, fmt)
    lines = [f"checkpoint: {s['checkpoint']}",
             f"{s['min_frames']}-{s['max_frames']} frames at {s['fps']} fps, {s['min_pixels']}-{s['max_pixels']} pixels per "
             f"frame, {decoding}, max_new_tokens {s['max_new_tokens']}",
             f"{summary['failed']} of {summary['samples']} samples failed; a failed sample scores 0 in every mean "
             f"(reasons in summary.json)"]
    if s["shuffled"]:
        lines.append("ordered / shuffled: the video records answered on frames in order / shuffled; gap in points")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, bench in summary["benchmarks"].items():
        for group, m in [("all", bench["all"]), *bench["groups"].items()]:
            cells = [name, group, m["records"], m["failed"], pct(m["score"])]
            if s["shuffled"]:
                cells += [m["videos"], pct(m["ordered"]), pct(m["shuffled"]), pct(m["gap"], "+.1f")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    device = M.setup_distributed()
    checkpoint = M.latest_checkpoint(model_path) or model_path
    paths, benchmarks = {}, {}
    for path in data.split(","):
        name = os.path.splitext(os.path.basename(path))[0]
        if name in paths:
            raise ValueError(f"{paths[name]} and {path} would both be benchmark {name!r}")
        paths[name], benchmarks[name] = path, D.load_records(path, media_root or None)[0]
    settings = {"checkpoint": checkpoint, **{k: v for k, v in config.items() if k != "out_dir"}}
    check_settings(settings)
    net, tokenizer = M.load_model(checkpoint, device)
    net.eval()
    # a fixed list of batches, dealt out to ranks: every sample is answered in the same batch whatever the number of
    # ranks or restarts, so padding cannot change a greedy answer and the result equals the 1-process one
    items = [(name, record, twin) for name, records in benchmarks.items() for record in records
             for twin in ((False, True) if shuffled and record["data_type"] == "video" else (False,))]
    batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    own = os.path.join(out_dir, f"results.rank{M.RANK}.jsonl")
    if os.path.exists(own):
        read_results(own, repair=True)
    done = {key(r) for r in all_results()}
    M.print0(f"eval {checkpoint}: {len(items)} samples of {', '.join(paths)} in {len(batches)} batches on {M.WORLD} "
             f"rank(s), {len(done)} done before")
    with open(own, "a") as log:
        for j in range(M.RANK, len(batches), M.WORLD):
            todo = [item for item in batches[j] if item_key(item) not in done]
            if not todo:
                continue
            t0 = time.time()
            generator = torch.Generator(device).manual_seed(int(np.random.default_rng([seed, j]).integers(2**62)))
            results = run_batch(net, tokenizer, batches[j], generator, device)  # whole, as in an uninterrupted run
            log.write("".join(json.dumps(r) + "\n" for r in results if key(r) not in done))
            log.flush()
            os.fsync(log.fileno())
            M.print0(f"batch {j + 1}/{len(batches)}: {len(todo)} samples, {time.time() - t0:.1f} s")
    M.barrier()
    if M.RANK == 0:
        merged = {key(r): r for r in all_results()}
        missing = [item_key(item) for item in items if item_key(item) not in merged]
        if missing:
            raise RuntimeError(f"{len(missing)} samples have no result in {out_dir}, e.g. {missing[:3]}")
        summary = summarize([merged[item_key(item)] for item in items], paths, settings)
        write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
        text = table(summary)
        write_atomic(os.path.join(out_dir, "table.md"), text)
        print(text, flush=True)
    M.finish()
