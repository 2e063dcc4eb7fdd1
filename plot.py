"""Curves and the result table of compare.sh: T-GRPO and its variants against plain GRPO, mean +-
std over seeds. `python plot.py out/compare` draws the CURVES into curves.png there and prints a
markdown table of eval accuracy."""
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


def table(root):
    """A markdown table of eval accuracy (ROWS), mean +- std over seeds, SFT's start first; the
    ordered and shuffled cells add [the binomial error of one eval] of that many videos."""
    header = "| model | " + " | ".join(f"{family} {metric} %" for family, metric in ROWS) + " |"
    lines = [header, "|---" * (len(ROWS) + 1) + "|"]
    for method, label in [("sft", "SFT (start)"), *methods(root).items()]:
        if method == "sft":
            pattern = "sft/eval/summary.json"
        else:
            pattern = f"{method}_seed*/eval/summary.json"
        summaries = sorted(Path(root).glob(pattern))
        groups = [json.load(open(p))["benchmarks"]["eval"]["groups"] for p in summaries]
        if not groups:  # runs without an eval yet
            continue
        cells = []
        for family, metric in ROWS:
            values = 100 * np.array([g[family][metric] for g in groups])
            if metric == "gap":
                cells.append(f"{values.mean():+.1f} ± {values.std():.1f}")
                continue
            error = 100 * binomial_error(values.mean() / 100, groups[0][family]["videos"])
            cells.append(f"{values.mean():.1f} ± {values.std():.1f} [{error:.1f}]")
        lines.append(f"| {label} ({len(groups)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    root = "out/compare"
    if len(sys.argv) > 1:
        root = sys.argv[1]
    plot(root)
    print(table(root))
    print("mean ± std over seeds; [ ]: the binomial standard error of one eval of that many videos")
    print(f"curves: {Path(root) / 'curves.png'}")
