"""Media decoded ahead (data_workers, prefetch.py): wall times of eval.py and sft.py runs on
records of a real clip, with 0 and with 2 data workers, alternated, and checks that both give the
same results (DETAILS.md, "Media decoding ahead (data_workers)").

    python bench_prefetch.py                      # ../shared/video1.mp4, 64 records
    python bench_prefetch.py --video=clip.mp4 --records=128 --repeats=2

eval: the paper's inference frames (64 at most, 256*28*28 pixels each), batches of 8; sft: its
training frames (16 at most, 128*28*28 pixels). The model is the tiny one, whose vision tower
on the CPU takes several seconds a clip at 64 frames (more than the clip's decode); on a GPU the
decode is the CPU's whole share (DETAILS.md). Each run is a fresh process: its wall time includes
the start.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import common
import data
import synthetic

video = "../shared/video1.mp4"  # any video file; every record shows it
records = 64                    # eval records (and sft.py's: the last 8 held out for validation)
workers = 2                     # data_workers of the prefetching runs
repeats = 1                     # runs of each setting, alternated: 0, N, 0, N, ...
eval_max_frames = 64            # the paper's eval: 16, 32 or 64 frames of 256*28*28 pixels
eval_max_pixels = 256 * 28 * 28
eval_new_tokens = 32            # generated per sample (the tiny model's answers are noise anyway)
# sft.py steps of 4 records, 16 frames of 128*28*28 pixels (a prompt of about 1,160 tokens)
sft_steps = 8
out_dir = ""                    # where the records and runs go; "" -> a temporary folder
common.configure(globals(), sys.argv[1:] if __name__ == "__main__" else [])
HERE = os.path.dirname(os.path.abspath(__file__))


def write_records(folder):
    """`records` multiple-choice records of the clip (with a chain of thought for sft.py), and the
    tiny model built from their text. Returns (records JSON, model folder)."""
    path = os.path.abspath(os.path.join(HERE, video))
    rows = []
    for i in range(records):
        rows.append({"problem": f"Question {i}: where does the clip happen?",
                     "options": ["A. indoors", "B. outdoors"],
                     "solution": "<answer>A</answer>", "process": "<think>Let me think.</think>",
                     "path": path, "data_type": "video", "problem_type": "multiple choice"})
    json_path = os.path.join(folder, "clip.json")
    with open(json_path, "w") as f:
        json.dump(rows, f)
    loaded, _ = data.load_records(json_path)
    texts = [data.question_text(r) + data.sft_target(r) for r in loaded]
    model_path = os.path.join(folder, "tiny")
    synthetic.ensure_tiny_model(model_path, texts)
    return json_path, model_path


def run(script, *args) -> float:
    """Wall seconds of one run of `script`, which must succeed."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, script, *args], cwd=HERE, capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return seconds


def alternated(folder, script, args):
    """{data_workers: [wall seconds]} of `repeats` runs with 0 and `workers` workers,
    alternated; run r of n workers writes folder/w{n}_{r}."""
    seconds = {0: [], workers: []}
    for r in range(repeats):
        for n in seconds:
            out = os.path.join(folder, f"w{n}_{r}")
            seconds[n].append(run(script, *args, f"--out_dir={out}", f"--data_workers={n}"))
    return seconds


def same_files(folder, name) -> bool:
    """Whether every run's `name` holds the same bytes."""
    contents = set()
    for run_dir in os.listdir(folder):
        with open(os.path.join(folder, run_dir, name), "rb") as f:
            contents.add(f.read())
    return len(contents) == 1


def logged_without_timings(path) -> list:
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in m.items() if k != "step_time"} for m in lines]


def report(what, seconds):
    """One line: the mean wall time of each setting and their ratio."""
    mean = {n: sum(s) / len(s) for n, s in seconds.items()}
    runs = []
    for n, s in seconds.items():
        runs.append(f"{n} workers " + " ".join(f"{x:.1f}" for x in s))
    runs = ", ".join(runs)
    print(f"{what}: wall {mean[0]:.1f} s with 0 workers, {mean[workers]:.1f} s with {workers}: "
          f"ratio {mean[workers] / mean[0]:.2f}x (runs: {runs})", flush=True)


if __name__ == "__main__":
    folder = out_dir or tempfile.mkdtemp(prefix="bench_prefetch_")
    json_path, model_path = write_records(folder)
    print(f"{records} records of {video}, {os.cpu_count()} CPU cores; runs in {folder}", flush=True)

    # eval.py, the paper's inference frames
    eval_dir = os.path.join(folder, "eval")
    eval_args = [f"--model_path={model_path}", f"--data={json_path}",
                 f"--max_frames={eval_max_frames}", f"--max_pixels={eval_max_pixels}",
                 f"--max_new_tokens={eval_new_tokens}", "--batch_size=8"]
    seconds = alternated(eval_dir, "eval.py", eval_args)
    report(f"eval.py, {eval_max_frames} frames of {eval_max_pixels} px", seconds)
    print(f"eval results files byte-identical: {same_files(eval_dir, 'results.rank0.jsonl')}")

    # sft.py, the paper's training frames
    sft_dir = os.path.join(folder, "sft")
    sft_args = [f"--model_path={model_path}", f"--data_dir={folder}", f"--train_json={json_path}",
                "--val_records=8", f"--max_steps={sft_steps}", "--batch_size=4",
                "--max_prompt_tokens=2048",
                "--eval_interval=1000", "--log_interval=1000"]
    seconds = alternated(sft_dir, "sft.py", sft_args)
    report(f"sft.py, {sft_steps} steps of 4 clips of 16 frames", seconds)
    logs = [logged_without_timings(os.path.join(sft_dir, d, "metrics.jsonl"))
            for d in sorted(os.listdir(sft_dir))]
    same = all(log == logs[0] for log in logs)
    print(f"sft losses, grad norms and counts bit for bit equal: {same} "
          f"(losses {[m['loss'] for m in logs[0]]})")
