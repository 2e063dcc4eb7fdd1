"""eval.py: MRA by hand, resume after a crash mid-file, failure accounting, the shuffled diagnostic, 2 ranks == 1."""
import json
import os
import shutil
import pytest
import torch
import lifecycle
import data
import eval as E
import model as M
from conftest import run_eval


def results_by_key(out_dir):
    rows = [r for name in os.listdir(out_dir) if name.startswith("results.rank")
            for r in E.read_results(os.path.join(out_dir, name))]
    by_key = {E.key(r): r for r in rows}
    assert len(by_key) == len(rows), "a sample was answered twice"
    return by_key


def test_mean_relative_accuracy_by_hand():
    assert E.mean_relative_accuracy(100, 100) == 1.0
    # 10% off: |e| = 0.10 < 1 - t holds for t = 0.50 ... 0.85 (8 thresholds), not for 0.90 (0.10 < 0.10) or 0.95
    for pred, gt in [(110, 100), (90, 100), ("0.9", "1"), (0.9, 1), (1.1, 1), ("1,100", "1,000"), (-110, -100),
                     ("-90", -100)]:
        assert E.mean_relative_accuracy(pred, gt) == 0.8, (pred, gt)
    assert E.mean_relative_accuracy(150, 100) == 0.0      # 0.5 < 1 - 0.50 fails: none pass
    assert E.mean_relative_accuracy(149, 100) == 0.1      # only t = 0.50
    assert E.mean_relative_accuracy(105, 100) == 0.9      # 0.05 < 0.05 fails at t = 0.95 only
    assert E.mean_relative_accuracy(104.9, 100) == 1.0
    assert E.mean_relative_accuracy(-100, 100) == 0.0     # the wrong sign is 200% off
    for bad in ["nan", "inf", "-inf", "abc", "", "1e999", float("nan"), None]:
        assert E.mean_relative_accuracy(bad, 3) == 0.0, bad
    assert E.mean_relative_accuracy(0, 0) == 1.0 and E.mean_relative_accuracy("0.0", "0") == 1.0
    assert E.mean_relative_accuracy(1e-9, 0) == 0.0       # gt == 0: only the exact answer counts
    with pytest.raises(ValueError, match="ground truth"):
        E.mean_relative_accuracy(3, "three")


def test_read_results_tolerates_only_a_cut_last_line(tmp_path):
    path = str(tmp_path / "results.rank0.jsonl")
    rows = [{"benchmark": "b", "index": i, "shuffled": False} for i in range(3)]
    lines = [json.dumps(r) + "\n" for r in rows]
    with open(path, "w") as f:
        f.write(lines[0] + lines[1] + lines[2][:9])
    assert E.read_results(path) == rows[:2]
    assert open(path).read().endswith(lines[2][:9])        # reading alone leaves the file
    assert E.read_results(path, repair=True) == rows[:2]
    assert open(path).read() == lines[0] + lines[1]        # the cut line is gone, so appends start on a clean line
    with open(path, "w") as f:
        f.write(lines[0] + lines[1][:9] + "\n" + lines[2])  # a cut line in the middle is corruption, not a crash
    with pytest.raises(ValueError, match="line 2"):
        E.read_results(path)


def test_summary_counts_failures_as_zero_and_the_gap(monkeypatch):
    monkeypatch.setattr(E, "shuffled", True)
    def row(index, twin, score, family, temporal, data_type="video", failed=None):
        return {"benchmark": "b", "index": index, "shuffled": twin, "data_type": data_type, "problem_type": "numerical",
                "data_source": "s", "family": family, "temporal": temporal, "score": score, "failed": failed}
    results = [row(0, False, 1.0, "order", True), row(0, True, 0.0, "order", True),
               row(1, False, 1.0, "size", True), row(1, True, 1.0, "size", True),
               row(2, False, 0.0, "colour", False, failed="x.mp4: video file not found"),
               row(2, True, 0.0, "colour", False, failed="x.mp4: video file not found"),
               row(3, False, 1.0, "count", False, "image")]
    settings = dict(checkpoint="c", min_frames=4, max_frames=16, fps=2.0, min_pixels=1, max_pixels=2, temperature=0.0,
                    top_p=1.0, max_new_tokens=8, shuffled=True)
    summary = E.summarize(results, {"b": "b.json"}, settings)
    assert summary["samples"] == 7 and summary["failed"] == 2 and [f["index"] for f in summary["failures"]] == [2, 2]
    b = summary["benchmarks"]["b"]
    assert b["all"] == pytest.approx({"records": 4, "failed": 2, "score": 0.75, "videos": 3, "ordered": 2 / 3,
                                      "shuffled": 1 / 3, "gap": 1 / 3})
    assert b["groups"]["temporal"] == {"records": 2, "failed": 0, "score": 1.0, "videos": 2, "ordered": 1.0,
                                       "shuffled": 0.5, "gap": 0.5}
    assert b["groups"]["control"] == {"records": 2, "failed": 2, "score": 0.5, "videos": 1, "ordered": 0.0,
                                      "shuffled": 0.0, "gap": 0.0}
    assert b["groups"]["family=count"]["videos"] == 0 and b["groups"]["family=count"]["gap"] is None
    assert "data_source=s" not in b["groups"]  # one data_source for all: it splits nothing
    text = E.table(summary)
    assert "2 of 7 samples failed" in text and "| b | control | 2 | 2 | 50.0 | 1 | 0.0 | 0.0 | +0.0 |" in text
    assert "| b | all | 4 | 2 | 75.0 | 3 | 66.7 | 33.3 | +33.3 |" in text
    assert "| b | family=count | 1 | 0 | 100.0 | 0 | - | - | - |" in text


VSI_TASKS = ["object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
             "object_rel_distance", "object_rel_direction_easy", "object_rel_direction_medium",
             "object_rel_direction_hard", "route_planning", "obj_appearance_order"]


def test_groups_are_the_benchmarks_own_breakdowns_never_one_per_record():
    """VSI-Bench by task (10), VideoMME by duration (3); MMVU's data_source, a YouTube URL per video, splits nothing
    (298 one-record rows), nor does any field of more than MAX_GROUPS values."""
    def row(benchmark, index, score, **fields):
        return {"benchmark": benchmark, "index": index, "shuffled": False, "data_type": "video",
                "problem_type": "multiple choice", "score": score, "failed": None, **fields}
    vsi = [row("vsibench", i, float(i % 3 == 0), original_question_type=VSI_TASKS[i % 10],
               data_source=["arkitscenes", "scannet", "scannetpp"][i % 3]) for i in range(40)]
    videomme = [row("videomme", i, float(i < 3), duration=["short", "medium", "long"][i % 3],
                    data_source=f"https://www.youtube.com/watch?v=v{i // 3}") for i in range(9)]
    mmvu = [row("mmvu", i, 1.0, data_source=f"https://www.youtube.com/watch?v=m{i}") for i in range(298)]
    many = [row("many", i, 1.0, category=f"c{i % (E.MAX_GROUPS + 1)}") for i in range(26)]
    paths = {name: f"eval_{name}.json" for name in ("vsibench", "videomme", "mmvu", "many")}
    settings = dict(checkpoint="c", min_frames=4, max_frames=16, fps=2.0, min_pixels=1, max_pixels=2, temperature=0.0,
                    top_p=1.0, max_new_tokens=8, shuffled=False)
    benchmarks = E.summarize(vsi + videomme + mmvu + many, paths, settings)["benchmarks"]
    assert list(benchmarks["vsibench"]["groups"]) == [f"original_question_type={t}" for t in sorted(VSI_TASKS)]
    assert benchmarks["vsibench"]["groups"]["original_question_type=object_counting"] == {
        "records": 4, "failed": 0, "score": 0.5}  # records 0, 10, 20, 30: scores 1, 0, 0, 1
    assert list(benchmarks["videomme"]["groups"]) == ["duration=long", "duration=medium", "duration=short"]
    assert benchmarks["videomme"]["groups"]["duration=short"] == {"records": 3, "failed": 0, "score": 1 / 3}
    assert benchmarks["mmvu"]["groups"] == {} and benchmarks["many"]["groups"] == {}
    assert benchmarks["mmvu"]["all"] == {"records": 298, "failed": 0, "score": 1.0}
    lines = E.table({"settings": settings, "samples": 373, "failed": 0, "benchmarks": benchmarks}).splitlines()
    assert "| benchmark | group | records | failed | score % |" in lines
    assert "| videomme | duration=short | 3 | 0 | 33.3 |" in lines and "| mmvu | all | 298 | 0 | 100.0 |" in lines
    assert len([line for line in lines if line.startswith("| ")]) == 1 + (1 + 10) + (1 + 3) + 1 + 1


def test_frame_records_count_as_videos_in_the_shuffled_diagnostic(monkeypatch):
    monkeypatch.setattr(E, "shuffled", True)
    rows = [{"benchmark": "mvbench", "index": 0, "shuffled": twin, "data_type": data_type, "problem_type": "numerical",
             "score": score, "failed": None} for data_type, twin, score in
            [("frame", False, 1.0), ("frame", True, 0.0), ("video", False, 1.0), ("video", True, 1.0)]]
    assert E.metrics(rows) == {"records": 2, "failed": 0, "score": 1.0, "videos": 2, "ordered": 1.0,
                               "shuffled": 0.5, "gap": 0.5}


@pytest.mark.slow
def test_resume_after_a_crash_mid_file(toy, shuffled_run, tmp_path):
    full_dir, full, _ = shuffled_run
    lines = open(full_dir / "results.rank0.jsonl").read().splitlines(keepends=True)
    k = 10  # batches of 4: two whole batches, half of the third, and a half-written line
    shutil.copy(full_dir / "run.json", tmp_path / "run.json")
    (tmp_path / "results.rank0.jsonl").write_text("".join(lines[:k]) + lines[k][:len(lines[k]) // 2])
    resumed, stdout = run_eval(toy, tmp_path, "--shuffled=True")
    assert f"{k} done before" in stdout
    assert resumed == full                                  # every metric, count and setting
    assert results_by_key(tmp_path) == results_by_key(full_dir)
    assert open(tmp_path / "results.rank0.jsonl").read().startswith("".join(lines[:k]))
    # results of other settings never mix in: the run refuses the folder
    refused = run_eval(toy, tmp_path, "--shuffled=True", "--max_frames=8", check=False)
    assert refused.returncode != 0 and "other settings" in refused.stderr


@pytest.mark.slow
def test_a_missing_clip_or_long_prompt_is_a_counted_failure_alone(toy, tmp_path):
    data_dir, _ = toy
    records = json.load(open(os.path.join(data_dir, "eval.json")))[:6]
    bad = next(i for i, r in enumerate(records) if r["data_type"] == "video")
    records[bad]["path"] = "./videos/missing.mp4"
    records[bad + 1]["problem"] = "Which colour comes first? " * 400  # over max_prompt_tokens: fails, its batch not
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(records))
    summary, stdout = run_eval(toy, tmp_path / "out", f"--data={bench}", f"--media_root={data_dir}",
                               "--max_prompt_tokens=1024")
    assert summary["samples"] == 6 and summary["failed"] == 2
    missing, long = summary["failures"]
    named = f"{bench} record {bad} (problem_id {records[bad]['problem_id']}): "
    assert missing["index"] == bad and named in missing["failed"]
    assert "missing.mp4" in missing["failed"] and "not found" in missing["failed"]
    assert long["index"] == bad + 1 and "tokens exceeds max_prompt_tokens=1024" in long["failed"]
    results = results_by_key(tmp_path / "out")
    answered = [r for k, r in results.items() if k[1] not in (bad, bad + 1)]
    assert all(r["response"] is not None and r["failed"] is None for r in answered)
    whole = summary["benchmarks"]["bench"]["all"]
    assert whole["records"] == 6 and whole["failed"] == 2   # in the denominator, as 0
    assert whole["score"] == pytest.approx(sum(r["score"] for r in results.values()) / 6)
    assert "2 of 6 samples failed" in stdout and "| bench | all | 6 | 2 |" in stdout
    records[bad]["solution"], records[bad]["problem_type"] = "<answer>nan</answer>", "regression"
    bench.write_text(json.dumps(records))  # a ground truth no answer can match: refused at load, named
    refused = run_eval(toy, tmp_path / "nan", f"--data={bench}", f"--media_root={data_dir}", check=False)
    assert refused.returncode != 0
    assert (f"{bench} record {bad} (problem_id {records[bad]['problem_id']}): 'solution' answer 'nan' is not a finite "
            "number") in refused.stderr


def test_out_of_memory_fails_its_batch_and_other_errors_rise(toy, monkeypatch):
    data_dir, model_path = toy
    net, tok = lifecycle.load_model(model_path, "cpu")
    records = data.load_records(os.path.join(data_dir, "eval.json"))[0][:3]
    items = [(("b", r["index"], False), r) for r in records]
    for err in [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")]:
        monkeypatch.setattr(M, "generate", lambda *a, err=err, **k: (_ for _ in ()).throw(err))
        results = E.run_batch(net, tok, items, None, "cpu")
        assert [r["index"] for r in results] == [r["index"] for r in records]
        assert all("out of memory in a batch of 3" in r["failed"] and r["score"] == 0.0 for r in results)
    shapes = RuntimeError("shapes cannot be multiplied")
    monkeypatch.setattr(M, "generate", lambda *a, **k: (_ for _ in ()).throw(shapes))
    with pytest.raises(RuntimeError, match="shapes"):
        E.run_batch(net, tok, items, None, "cpu")


@pytest.mark.slow
def test_shuffled_diagnostic_per_family(toy, shuffled_run):
    full_dir, summary, stdout = shuffled_run
    records = json.load(open(os.path.join(toy[0], "eval.json")))
    results = results_by_key(full_dir)
    videos = [i for i, r in enumerate(records) if r["data_type"] == "video"]
    assert sorted(k[1] for k in results if k[2]) == videos  # one shuffled answer per video, none for images
    groups = summary["benchmarks"]["eval"]["groups"]
    for family in ("temporal", "control"):
        m = groups[family]
        assert m["ordered"] - m["shuffled"] == pytest.approx(m["gap"])
        assert f"| eval | {family} | {m['records']} | 0 |" in stdout
    assert groups["control"]["videos"] < groups["control"]["records"]  # control images have no shuffled twin
    assert groups["temporal"]["videos"] == groups["temporal"]["records"]
    assert "| benchmark | group | records | failed | score % | videos | ordered % | shuffled % | gap |" in stdout
    assert open(full_dir / "table.md").read() in stdout


@pytest.mark.slow
def test_two_ranks_equal_one(toy, shuffled_run, tmp_path):
    full_dir, full, _ = shuffled_run
    split, _ = run_eval(toy, tmp_path, "--shuffled=True", nproc=2)
    assert split == full
    assert os.path.getsize(tmp_path / "results.rank0.jsonl") and os.path.getsize(tmp_path / "results.rank1.jsonl")
    assert results_by_key(tmp_path) == results_by_key(full_dir)  # identical responses, sample by sample


@pytest.mark.slow
def test_a_lora_adapter_folder_answers_as_its_merged_checkpoint(toy, tmp_path):
    """--model_path=step_N/adapter loads the base its adapter_config.json names, with the adapter merged in: the
    same answers as step_N itself, and other answers than the base."""
    import common as C
    data_dir, model_path = toy
    lora = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets="q_proj,v_proj,down_proj", lora_merger=False)
    net, tok = lifecycle.load_model(model_path, "cpu", lora=lifecycle.lora_config(lora))
    g = torch.Generator().manual_seed(0)
    for p in (p for p in net.parameters() if p.requires_grad):  # lora_B starts at 0: make the adapter do something
        p.data += 0.5 * torch.randn(p.shape, generator=g)
    step = lifecycle.save_checkpoint(str(tmp_path / "run"), 1, tok, C.Optimizer(net, 1e-3, 0.0, 1.0), lora, 0)
    answers = {}
    for name, path in (("adapter", os.path.join(step, lifecycle.ADAPTER)), ("merged", step), ("base", model_path)):
        summary, _ = run_eval((data_dir, path), tmp_path / name)
        assert summary["settings"]["checkpoint"] == path
        answers[name] = {k: r["response"] for k, r in results_by_key(tmp_path / name).items()}
    assert answers["adapter"] == answers["merged"] != answers["base"]
