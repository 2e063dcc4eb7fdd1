"""plot.py: compare.sh's table (mean +- std over seeds, the binomial error of one eval) and its curves."""
import json
import math
import plot


def write_run(root, name, temporal_ordered, steps):
    """A run folder as compare.sh leaves it: metrics.jsonl of `steps` steps and eval/summary.json."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    groups = {"temporal": dict(videos=1400, ordered=temporal_ordered, shuffled=0.4, gap=temporal_ordered - 0.4),
              "control": dict(videos=300, ordered=0.5, shuffled=0.5, gap=0.0)}
    summary = {"benchmarks": {"eval": {"groups": groups}}}
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    row = dict(accuracy=0.5, format=1.0, reward=1.5, bonus_granted_mixed=0.6, p=0.5, p_contrast=0.4,
               advantage_change=0.0, kl=0.01, neg_logp=0.1, response_length=50)
    lines = [json.dumps(dict(row, step=s + 1)) for s in range(steps)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_table_gives_mean_std_and_the_binomial_error(tmp_path):
    write_run(tmp_path, "sft", 0.5, 0)
    write_run(tmp_path, "grpo_seed0", 0.52, 30)
    write_run(tmp_path, "grpo_seed1", 0.56, 30)
    lines = plot.table(tmp_path).splitlines()
    assert lines[2].startswith("| SFT (start) (1) | 50.0 ± 0.0 [1.3] |")
    error = 100 * math.sqrt(0.54 * 0.46 / 1400)  # 1.33: the mean's binomial error over 1,400 videos
    assert lines[3].startswith(f"| GRPO (temporal=False) (2) | 54.0 ± 2.0 [{error:.1f}] |"), lines[3]


def test_curves_leave_out_a_run_still_in_its_first_steps(tmp_path, capsys):
    write_run(tmp_path, "grpo_seed0", 0.52, 30)
    write_run(tmp_path, "tgrpo_seed0", 0.5, plot.SMOOTH - 1)
    plot.plot(tmp_path)
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert f"not drawn yet: {tmp_path / 'tgrpo_seed0' / 'metrics.jsonl'}" in capsys.readouterr().out


def test_a_results_folder_of_gzipped_logs_draws_as_the_runs_do(tmp_path):
    """compare.sh's RESULTS keep metrics.jsonl.gz: the same curves and table as the run folders."""
    import gzip
    import shutil
    runs, results = tmp_path / "runs", tmp_path / "results"
    write_run(runs, "grpo_seed0", 0.52, 30)
    (results / "grpo_seed0" / "eval").mkdir(parents=True)
    shutil.copy(runs / "grpo_seed0" / "eval" / "summary.json", results / "grpo_seed0" / "eval" / "summary.json")
    log = (runs / "grpo_seed0" / "metrics.jsonl").read_bytes()
    with gzip.open(results / "grpo_seed0" / "metrics.jsonl.gz", "wb") as dst:
        dst.write(log)
    gz = plot.run_logs(results, "grpo")
    assert [p.name for p in gz] == ["metrics.jsonl.gz"]
    assert (plot.curve(gz[0], "kl") == plot.curve(plot.run_logs(runs, "grpo")[0], "kl")).all()
    assert plot.table(results) == plot.table(runs)
