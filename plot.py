"""Curves and the result tables of compare.sh: T-GRPO and its variants against plain GRPO, mean +-
std over seeds. `python plot.py out/compare` draws the CURVES into curves.png there and prints
markdown tables: eval accuracy, each method against GRPO, each seed, each family, each
checkpoint."""
import gzip
import json
import sys
from pathlib import Path
import numpy as np
import matplotlib
matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt

METHODS = {
    "grpo": "GRPO (temporal=False)",
    "tgrpo": "T-GRPO (paper eq. 2-3)",
    "tgrpo_adv": "T-GRPO, bonus_to=advantage",
    "tgrpo_noscale": "T-GRPO, scale_rewards=False",
    "grpo_noscale": "GRPO, scale_rewards=False",
    "tgrpo_strict": "T-GRPO, strict_contrast=True",
    "tgrpo_credit": "T-GRPO, temporal_credit=True",
}
CURVES = [("accuracy", "training accuracy (ordered rollouts)"),
          ("format", "format reward (0: no closed <answer>, e.g. cut)"),
          ("reward", "total reward (T-GRPO's includes the bonus)"),
          ("bonus_granted_mixed", "grant rate where a bonus can matter\n(some, not all, correct; "
                                  "paid by T-GRPO only)"),
          ("p_gap", "p - p~ (ordered minus shuffled correct)"),
          ("advantage_change", "mean |advantage change| the bonus made"),
          ("kl", "KL(pi || pi_ref), k3 per token"),
          ("neg_logp", "mean -log pi of sampled tokens (entropy)"),
          ("response_length", "response length (tokens)")]
SMOOTH = 20  # steps in the moving average: one step sees only a few prompts
# the table's columns: eval accuracy of each family kind on ordered and shuffled frames, and the gap
ROWS = [(family, metric)
        for family in ("temporal", "control")
        for metric in ("ordered", "shuffled", "gap")]
# what the temporal bonus did in training, each run's mean over its steps (GRPO measures them too,
# from its shuffled rollouts, but pays no bonus)
BONUS_STATS = [("bonus_granted", "bonus granted"),
               ("bonus_granted_mixed", "granted where mixed"),
               ("advantage_change", "mean abs advantage change"),
               ("credit", "credit")]

def read_log(path):
    """The lines of a metrics.jsonl, or of a metrics.jsonl.gz (compare.sh's RESULTS copies), as
    dicts."""
    opener = open
    if path.suffix == ".gz":
        opener = gzip.open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f]


def run_logs(root, method):
    """Each seed's log of `method` under root: metrics.jsonl, or the .gz of a results folder."""
    return sorted(Path(root).glob(f"{method}_seed*/metrics.jsonl*"))


def curve(path, key):
    """The SMOOTH-step moving average of one metric in a metrics.jsonl ("p_gap": p - p~)."""
    rows = read_log(path)
    if key == "p_gap":
        values = [r["p"] - r["p_contrast"] for r in rows]
    else:
        # a key older logs lack: NaN
        values = [r.get(key, float("nan")) for r in rows]
    values = np.array(values, dtype=float)
    # NaN (a step without a video prompt) is left out of its window's mean
    window = np.ones(SMOOTH)
    sums = np.convolve(np.nan_to_num(values), window, "valid")
    counts = np.convolve(~np.isnan(values), window, "valid")
    with np.errstate(invalid="ignore"):  # a window without values: NaN
        return sums / counts

def methods(root):
    """Run names (the part before _seed) found under root: tgrpo, grpo, and any variant such as
    tgrpo_mu1.5."""
    names = {p.name.rsplit("_seed", 1)[0] for p in Path(root).glob("*_seed*") if p.is_dir()}
    # the known ones first, in METHODS' order
    ordered = [m for m in METHODS if m in names] + sorted(names - set(METHODS))
    return {name: METHODS.get(name, name) for name in ordered}

def plot(root):
    """Each method's CURVES, mean +- std over its seeds, into root/curves.png."""
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    for method, label in methods(root).items():
        paths = run_logs(root, method)
        # a run still in its first SMOOTH steps has no point yet: drawn once it has
        short = [p for p in paths if len(read_log(p)) < SMOOTH]
        for p in short:
            print(f"not drawn yet: {p} (fewer than {SMOOTH} steps)")
        paths = [p for p in paths if p not in short]
        if not paths:
            continue
        for ax, (key, title) in zip(axes.flat, CURVES):
            runs = [curve(p, key) for p in paths]
            # cut to the shortest run
            shortest = min(map(len, runs))
            runs = np.array([r[:shortest] for r in runs])
            steps = np.arange(runs.shape[1]) + SMOOTH
            mean = runs.mean(0)
            std = runs.std(0)
            ax.plot(steps, mean, label=f"{label}, {len(paths)} seeds")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(f"step ({SMOOTH}-step moving average)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(root) / "curves.png", dpi=110)

def binomial_error(p, n):
    """The standard error of a mean of n scores in [0, 1] with mean p: sqrt(p (1 - p) / n), exact
    for 0/1 scores and an upper bound for partial ones (OCR, free-form, regression)."""
    return np.sqrt(p * (1 - p) / n)


def eval_groups(path):
    """The per-group results (temporal, control, family=...) of one eval summary.json."""
    with open(path) as f:
        return json.load(f)["benchmarks"]["eval"]["groups"]


def final_evals(root, method):
    """Each seed's final eval of `method` (the SFT start's for "sft"), as eval_groups."""
    pattern = f"{method}_seed*/eval/summary.json"
    if method == "sft":
        pattern = "sft/eval/summary.json"
    return [eval_groups(p) for p in sorted(Path(root).glob(pattern))]


def table(root):
    """A markdown table of eval accuracy (ROWS), mean +- sample std over seeds, SFT's start first;
    the ordered and shuffled cells add [the binomial error of one eval] of that many videos."""
    header = "| model | " + " | ".join(f"{family} {metric} %" for family, metric in ROWS) + " |"
    lines = [header, "|---" * (len(ROWS) + 1) + "|"]
    for method, label in [("sft", "SFT (start)"), *methods(root).items()]:
        groups = final_evals(root, method)
        if not groups:  # runs without an eval yet
            continue
        cells = []
        for family, metric in ROWS:
            values = percent(groups, family, metric)
            std = seed_std(values)
            if metric == "gap":
                cells.append(f"{values.mean():+.1f} ± {std:.1f}")
                continue
            error = 100 * binomial_error(values.mean() / 100, groups[0][family]["videos"])
            cells.append(f"{values.mean():.1f} ± {std:.1f} [{error:.1f}]")
        lines.append(f"| {label} ({len(groups)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def percent(groups, family, metric):
    """One eval metric of each seed (eval_groups), in percent: [seeds]."""
    return 100 * np.array([g[family][metric] for g in groups])


def seed_std(values):
    """The sample std over seeds (ddof 1), 0 for a single run (the start)."""
    if len(values) < 2:
        return 0.0
    return float(values.std(ddof=1))


def in_seed_stds(values, baseline):
    """mean(values) - mean(baseline), and that difference in units of the two methods' pooled
    sample std over seeds (NaN below 2 seeds each, or where both stds are 0)."""
    difference = values.mean() - baseline.mean()
    if min(len(values), len(baseline)) < 2:
        return difference, float("nan")
    pooled = np.sqrt((values.var(ddof=1) + baseline.var(ddof=1)) / 2)
    if pooled == 0:
        return difference, float("nan")
    return difference, difference / pooled


def run_mean(path, key):
    """The mean of one metric over all steps of a run's log, NaN (a step without it) left out."""
    values = np.array([row.get(key, float("nan")) for row in read_log(path)], dtype=float)
    if np.isnan(values).all():
        return float("nan")
    return float(np.nanmean(values))


def differences(root):
    """A markdown table of each method against plain GRPO: the difference of the mean temporal
    accuracy and of the temporal ordered-shuffled gap, in points and in pooled seed stds, and
    what the bonus did in training (BONUS_STATS: each run's mean over its steps, mean over
    seeds)."""
    base = final_evals(root, "grpo")
    if not base:
        return f"(no grpo runs with an eval under {root})"
    base_accuracy = percent(base, "temporal", "ordered")
    base_gap = percent(base, "temporal", "gap")
    header = ("| method (seeds) | temporal ordered %, minus GRPO | in seed stds "
              "| temporal gap %, minus GRPO | in seed stds | "
              + " | ".join(label for _, label in BONUS_STATS) + " |")
    lines = [header, "|---" * (5 + len(BONUS_STATS)) + "|"]
    for method, label in methods(root).items():
        groups = final_evals(root, method)
        if not groups:
            continue
        accuracy = percent(groups, "temporal", "ordered")
        gap = percent(groups, "temporal", "gap")
        accuracy_difference, accuracy_stds = in_seed_stds(accuracy, base_accuracy)
        gap_difference, gap_stds = in_seed_stds(gap, base_gap)
        logs = run_logs(root, method)
        stats = [np.mean([run_mean(p, key) for p in logs]) for key, _ in BONUS_STATS]
        cells = [f"{accuracy_difference:+.1f}", f"{accuracy_stds:+.1f}",
                 f"{gap_difference:+.1f}", f"{gap_stds:+.1f}"] + [f"{v:.3f}" for v in stats]
        lines.append(f"| {label} ({len(groups)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(root):
    """A markdown table of each seed's final temporal ordered accuracy (and gap), by method: the
    values behind the table's mean ± std."""
    seeds = sorted({int(p.parent.parent.name.rsplit("_seed", 1)[1])
                    for p in Path(root).glob("*_seed*/eval/summary.json")})
    lines = ["| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "|---" * (len(seeds) + 1) + "|"]
    for method, label in methods(root).items():
        cells = []
        for seed in seeds:
            path = Path(root) / f"{method}_seed{seed}" / "eval" / "summary.json"
            cell = "-"  # not run yet, or without an eval
            if path.exists():
                temporal = eval_groups(path)["temporal"]
                cell = f"{100 * temporal['ordered']:.1f} ({100 * temporal['gap']:+.1f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def families_table(root):
    """A markdown table of each family's ordered accuracy in percent, mean over seeds, by method
    (the SFT start first): where a method gains or loses."""
    rows = []  # (label, eval_groups of each seed) of every model with an eval
    for method, label in [("sft", "SFT (start)"), *methods(root).items()]:
        groups = final_evals(root, method)
        if groups:
            rows.append((label, groups))
    if not rows:
        return f"(no evals under {root})"
    families = sorted(name for name in rows[0][1][0] if name.startswith("family="))
    lines = ["| model | " + " | ".join(name.split("=")[1] for name in families) + " |",
             "|---" * (len(families) + 1) + "|"]
    for label, groups in rows:
        cells = [f"{percent(groups, name, 'ordered').mean():.1f}" for name in families]
        lines.append(f"| {label} ({len(groups)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checkpoint_table(root):
    """A markdown table of every per-checkpoint eval under root (run/eval_N/summary.json, as the
    lever studies keep them), after the starts' evals: temporal ordered and gap, control ordered,
    by run and step ("" where no run has one)."""
    checkpoints = sorted(Path(root).glob("*/eval_*/summary.json"))
    if not checkpoints:
        return ""
    # the starts first: folders with a final eval that are no method's seed (sft/, sft500/)
    starts = [p for p in sorted(Path(root).glob("*/eval/summary.json"))
              if "_seed" not in p.parent.parent.name]
    lines = ["| run | step | temporal ordered % | temporal gap % | control ordered % |",
             "|---|---|---|---|---|"]
    for path in starts + checkpoints:
        groups = eval_groups(path)
        step = "start"
        if path.parent.name != "eval":
            step = f"{int(path.parent.name.split('_')[1]):,}"
        temporal, control = groups["temporal"], groups["control"]
        lines.append(f"| {path.parent.parent.name} | {step} | {100 * temporal['ordered']:.1f} "
                     f"| {100 * temporal['gap']:+.1f} | {100 * control['ordered']:.1f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    root = "out/compare"
    if len(sys.argv) > 1:
        root = sys.argv[1]
    plot(root)
    print(table(root))
    print("mean ± sample std over seeds; [ ]: the binomial error of one eval of that many videos")
    print()
    print(differences(root))
    print("seed stds: the difference over the pooled sample std of the two methods' seeds")
    print()
    print(seeds_table(root))
    print("temporal ordered % (gap) of each run")
    print()
    print(families_table(root))
    print("ordered % by family, mean over seeds")
    checkpoints = checkpoint_table(root)
    if checkpoints:
        print()
        print(checkpoints)
    print(f"curves: {Path(root) / 'curves.png'}")
