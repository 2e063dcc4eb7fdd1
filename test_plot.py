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
    # two seeds 4 points apart: a sample std of 2.83
    assert lines[3].startswith(f"| GRPO (temporal=False) (2) | 54.0 ± 2.8 [{error:.1f}] |"), lines[3]


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


def test_differences_give_points_and_pooled_seed_stds_against_grpo(tmp_path):
    for seed, accuracy in enumerate((0.50, 0.52, 0.54)):
        write_run(tmp_path, f"grpo_seed{seed}", accuracy, 30)
    for seed, accuracy in enumerate((0.54, 0.56, 0.58)):
        write_run(tmp_path, f"tgrpo_seed{seed}", accuracy, 30)
    rows = {line.split(" (")[0]: line for line in plot.differences(tmp_path).splitlines()[2:]}
    # both methods' seeds have sample std 2.0 points: +4.0 points is +2.0 pooled stds; the gap
    # (ordered - 0.4) moves with the accuracy; write_run logs bonus_granted_mixed 0.6, no credit
    expected = "| T-GRPO (paper eq. 2-3) (3) | +4.0 | +2.0 | +4.0 | +2.0 | nan | 0.600 | 0.000 | nan |"
    assert rows["| T-GRPO"] == expected
    assert rows["| GRPO"].startswith("| GRPO (temporal=False) (3) | +0.0 | +0.0 |")


def test_in_seed_stds_is_undefined_below_two_seeds():
    import numpy as np
    difference, stds = plot.in_seed_stds(np.array([55.0]), np.array([50.0, 52.0]))
    assert difference == 4.0 and math.isnan(stds)


def test_checkpoint_table_lists_every_checkpoints_eval_by_run_and_step(tmp_path):
    write_run(tmp_path, "grpo_seed0", 0.52, 30)
    for step, accuracy in ((300, 0.51), (1200, 0.55)):
        folder = tmp_path / "grpo_seed0" / f"eval_{step:06d}"
        folder.mkdir()
        (folder / "summary.json").write_text((tmp_path / "grpo_seed0" / "eval" / "summary.json")
                                             .read_text().replace("0.52", str(accuracy)))
    write_run(tmp_path, "sft", 0.5, 0)
    lines = plot.checkpoint_table(tmp_path).splitlines()
    assert lines[2:] == ["| sft | start | 50.0 | +10.0 | 50.0 |",
                         "| grpo_seed0 | 300 | 51.0 | +12.0 | 50.0 |",
                         "| grpo_seed0 | 1,200 | 55.0 | +12.0 | 50.0 |"]
    assert plot.checkpoint_table(tmp_path / "grpo_seed0" / "eval") == ""


def test_seeds_table_gives_each_runs_value_and_a_dash_where_none_is(tmp_path):
    write_run(tmp_path, "grpo_seed0", 0.52, 30)
    write_run(tmp_path, "grpo_seed2", 0.55, 30)
    write_run(tmp_path, "tgrpo_seed0", 0.5, 30)
    lines = plot.seeds_table(tmp_path).splitlines()
    assert lines[0] == "| method | seed 0 | seed 2 |"
    assert lines[2:] == ["| GRPO (temporal=False) | 52.0 (+12.0) | 55.0 (+15.0) |",
                         "| T-GRPO (paper eq. 2-3) | 50.0 (+10.0) | - |"]


def test_families_table_averages_each_family_over_seeds(tmp_path):
    for seed, order in enumerate((0.6, 0.8)):
        write_run(tmp_path, f"grpo_seed{seed}", 0.5, 30)
        path = tmp_path / f"grpo_seed{seed}" / "eval" / "summary.json"
        summary = json.loads(path.read_text())
        groups = summary["benchmarks"]["eval"]["groups"]
        groups["family=order"] = dict(videos=200, ordered=order, shuffled=0.3, gap=order - 0.3)
        groups["family=ocr"] = dict(videos=200, ordered=0.9, shuffled=0.5, gap=0.4)
        path.write_text(json.dumps(summary))
    lines = plot.families_table(tmp_path).splitlines()
    assert lines[0] == "| model | ocr | order |"
    assert lines[2:] == ["| GRPO (temporal=False) (2) | 90.0 | 70.0 |"]
