"""
Compare training runs from their metrics.jsonl alone (no model is loaded): reward against reward queries
per group of runs (mean and band over seeds), and sample efficiency against a baseline group.

    python compare.py --groups 'tuned=runs/alignprop-toy-*' --metric plain_reward_mean --out runs/compare.png
    python compare.py --groups 'diffexp=runs/ddpo-aes-s*' 'baseline=runs/ddpo-aes-base-s*'

Each --groups entry is LABEL=RUN[,RUN...], a RUN a run folder or a glob pattern (quote it). A folder that a
pattern matches but that holds no metrics (a run that failed before it logged a record) is skipped with
one line naming it; a folder named outright must have its metrics.jsonl.

compare writes OUT (a PNG; default runs/compare.png) and OUT with .json: per group the final reward (mean
± std over runs) and the reward queries needed to reach a fraction of the baseline's improvement, with the
speedup and its bootstrap 95% interval over runs (see sample_efficiency), and each run's area under its
curve (its mean level over the queries it spent: `auc_*`). Where a group and the baseline hold runs of the
same seeds (the seed in each run's config.json), the speedup and the difference in area are also given
paired by seed, with their intervals (the paired_* keys), unless --no-paired.

Sections: reading runs | curves | sample efficiency | the plot and the command.
"""

import glob
import json
import os
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import common
import scaffold
from common import ConfigError, print0


@dataclass(frozen=True)
class CompareConfig:
    """Plot reward against reward queries per group of runs (mean and band over seeds) and measure sample
    efficiency."""
    # LABEL=RUN[,RUN...] per group; a RUN is a run folder or a glob pattern (quote it: 'runs/ddpo-aes-s*')
    groups: tuple[str, ...]
    baseline: str | None = None  # label of the baseline group; default: the last group
    fraction: float = 0.9  # threshold = r0 + fraction * (r_final - r0) of the baseline's mean curve
    threshold: float | None = None  # an absolute threshold instead (e.g. a success rate), fixed in advance
    metric: str = "reward_mean"  # metrics.jsonl key on the y axis (records without it are skipped)
    smooth: Literal["none", "ema", "ma"] = "none"  # per-run smoothing before averaging and thresholding
    smooth_window: int = 5  # moving-average window in records; EMA with alpha = 2 / (window + 1)
    band: Literal["std", "minmax"] = "std"  # band around each group's mean curve: ±std or min..max over runs
    out: str = os.path.join("runs", "compare.png")  # the plot; the summary goes to the same name with .json
    title: str = ""
    paired: bool = True  # also the speedup paired by seed, where a group and the baseline share seeds


# -----------------------------------------------------------------------------
# Reading runs: run folders from --groups, each run's curve and config


def has_metrics(run: str) -> bool:
    """Whether a run folder holds a metrics.jsonl with at least one record."""
    path = os.path.join(run, "metrics.jsonl")
    return os.path.isfile(path) and len(scaffold.read_metrics(path)) > 0


def parse_groups(specs: tuple[str, ...]) -> dict[str, list[str]]:
    """('diffexp=runs/a*,runs/b', ...) -> {'diffexp': [run folders]}; globs expanded to the folders they
    match (a log file beside the run folders, runs/a-s0.log, is skipped), in sorted order. A matched folder
    without metrics (missing or empty metrics.jsonl: a failed run) is skipped, printing one line; a pattern
    left with no folder fails naming it. A folder named outright is kept as it is (read_curve checks it)."""
    groups = {}
    for spec in specs:
        label, sep, patterns = spec.partition("=")
        if not sep or not label or not patterns:
            raise ConfigError(f"--groups {spec!r}: expected LABEL=RUN[,RUN...] "
                              "(e.g. 'diffexp=runs/ddpo-s*').")
        if label in groups:
            raise ConfigError(f"--groups: label {label!r} appears twice.")
        runs = []
        for pattern in patterns.split(","):
            if not glob.has_magic(pattern):
                runs.append(pattern)
                continue
            found = sorted(filter(os.path.isdir, glob.glob(pattern)))
            runs += common.usable_matches(f"--groups {label}", pattern, found, has_metrics, "run folder",
                                          "metrics.jsonl records")
        groups[label] = runs
    if not groups:
        raise ConfigError("--groups: give at least one LABEL=RUN[,RUN...].")
    return groups


def read_curve(run: str, metric: str = "reward_mean") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (reward_queries, metric) of one run's metrics.jsonl, float64, sorted by queries."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"--groups: run {run} has no metrics.jsonl ({path} does not exist).")
    records = [r for r in scaffold.read_metrics(path) if r.get(metric) is not None and "reward_queries" in r]
    if not records:
        raise ConfigError(f"--groups: {path} has no records with 'reward_queries' and '{metric}' (--metric).")
    x = torch.tensor([r["reward_queries"] for r in records], dtype=torch.float64)
    y = torch.tensor([r[metric] for r in records], dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    return x[order], y[order]


def run_config(run: str) -> dict | None:
    """The trainer's config.json of a run folder, or None when it has none."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_seeds(runs: list[str]) -> list[int | None]:
    """The --seed of each run (its config.json), None where it has none."""
    return [common.config_value(run_config(run), "seed") for run in runs]


# -----------------------------------------------------------------------------
# Curves: smoothing, a common query grid, the crossing of a threshold


def smooth_curve(y: torch.Tensor, kind: str, window: int) -> torch.Tensor:
    """Causal smoothing (a point sees only earlier ones, so crossings are not pulled earlier):
    'ema' with alpha = 2 / (window + 1) started at y[0], 'ma' the mean of the last `window` points."""
    if kind == "none" or window <= 1:
        return y
    out = torch.empty_like(y)
    if kind == "ema":
        alpha, s = 2 / (window + 1), y[0]
        for k, v in enumerate(y):
            s = s + alpha * (v - s) if k else v
            out[k] = s
    else:
        for k in range(len(y)):
            out[k] = y[max(0, k - window + 1): k + 1].mean()
    return out


def interp(x_new: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (x, y) at x_new, which lies within [x[0], x[-1]]."""
    if len(x) == 1:
        return y.expand(len(x_new)).clone()
    k = torch.searchsorted(x, x_new, right=True).clamp(1, len(x) - 1)
    x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
    w = torch.where(x1 > x0, (x_new - x0) / (x1 - x0), torch.zeros_like(x_new))
    return y0 + w.clamp(0, 1) * (y1 - y0)


def queries_to_reach(x: torch.Tensor, y: torch.Tensor, threshold: float) -> float | None:
    """The first reward-query count at which the curve reaches `threshold`, linearly interpolated between
    the two records around the crossing; None when it never does."""
    above = (y >= threshold).nonzero()
    if len(above) == 0:
        return None
    k = above[0].item()
    if k == 0:
        return x[0].item()
    x0, x1, y0, y1 = x[k - 1].item(), x[k].item(), y[k - 1].item(), y[k].item()
    return x0 + (threshold - y0) / (y1 - y0) * (x1 - x0)


def group_curves(runs: list[str], metric: str, smooth: str, window: int) -> dict:
    """Each run's (smoothed) curve, and their mean / std / min / max on a common query grid: the union of
    the runs' query counts within the range that every run covers (no extrapolation)."""
    curves = [read_curve(run, metric) for run in runs]
    curves = [(x, y, smooth_curve(y, smooth, window)) for x, y in curves]
    lo, hi = max(x[0] for x, _, _ in curves), min(x[-1] for x, _, _ in curves)
    if lo > hi:
        raise ConfigError(f"--groups: the runs {runs} share no range of reward queries; "
                          "they cannot be averaged.")
    grid = torch.unique(torch.cat([x for x, _, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    ys = torch.stack([interp(grid, x, s) for x, _, s in curves])  # (runs, grid)
    finals = torch.tensor([y[-1].item() for _, y, _ in curves], dtype=torch.float64)  # raw last records
    return dict(runs=runs, curves=curves, grid=grid, mean=ys.mean(0),
                std=ys.std(0) if len(runs) > 1 else torch.zeros_like(grid), min=ys.min(0).values,
                max=ys.max(0).values, first=sum(y[0].item() for _, y, _ in curves) / len(curves),
                final_mean=finals.mean().item(), final_std=finals.std().item() if len(runs) > 1 else 0.0)


# -----------------------------------------------------------------------------
# Sample efficiency: queries to a threshold, the speedup, bootstrap intervals over seeds


def bootstrap_ratio(a: list[float], b: list[float], n: int = 10_000,
                    seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) and its 95% percentile-bootstrap interval: both samples resampled with replacement,
    independently (the runs of two arms are independent), n times."""
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    ia, ib = torch.randint(len(a), (n, len(a)), generator=g), torch.randint(len(b), (n, len(b)), generator=g)
    ratios = a_t[ia].mean(1) / b_t[ib].mean(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return (a_t.mean() / b_t.mean()).item(), lo, hi


def paired_bootstrap(a: list[float], b: list[float], statistic, n: int = 10_000,
                     seed: int = 0) -> tuple[float, float, float]:
    """statistic(mean of a, mean of b) for paired values (a[i], b[i]: one seed in two arms, which shared its
    prompts and noise) and its 95% percentile-bootstrap interval: the seeds resampled with replacement, each
    drawn seed bringing both of its values, n times. What the seeds share cancels, so the interval is
    narrower than an unpaired one when the arms' values move together from seed to seed."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap: {len(a)} and {len(b)} values; pairs need equal numbers.")
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    idx = torch.randint(len(a), (n, len(a)), generator=torch.Generator().manual_seed(seed))
    values = statistic(a_t[idx].mean(1), b_t[idx].mean(1))
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return statistic(a_t.mean(), b_t.mean()).item(), lo, hi


def paired_bootstrap_ratio(a: list[float], b: list[float], n: int = 10_000,
                           seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) for paired values, with its paired bootstrap interval (paired_bootstrap)."""
    return paired_bootstrap(a, b, lambda x, y: x / y, n, seed)


def paired_bootstrap_diff(a: list[float], b: list[float], n: int = 10_000,
                          seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) = mean(a - b) for paired values, with its paired bootstrap interval."""
    return paired_bootstrap(a, b, lambda x, y: x - y, n, seed)


def area(x: torch.Tensor, y: torch.Tensor) -> float:
    """The curve's mean level over the queries it spans: the trapezoid area under y(x) / (x_last - x_first);
    a single record is its own value."""
    if len(x) < 2:
        return y[0].item()
    return (torch.trapezoid(y.double(), x.double()) / (x[-1] - x[0]).double()).item()


def shared_seeds(a: list[int | None], b: list[int | None]) -> list[int]:
    """The seeds that two groups' runs both hold, sorted; none where a run's seed is unknown or a seed
    repeats within a group (runs could not be matched one to one)."""
    if None in a or None in b or len(set(a)) != len(a) or len(set(b)) != len(b):
        return []
    return sorted(set(a) & set(b))


def sample_efficiency(groups: dict[str, dict], baseline: str, fraction: float,
                      seeds: dict[str, list] | None = None, threshold: float | None = None) -> dict:
    """Reward queries each group needs to reach threshold = r0 + fraction * (r_final - r0), where r0 is the
    baseline's first-record reward (mean over its runs) and r_final the last point of the baseline's mean
    curve. Measuring the improvement over r0, not a fraction of r_final itself, keeps the definition
    meaningful for negative rewards (JPEG compressibility) and for offsets (aesthetic starts near 5).
    Queries are read off each group's mean curve (speedup = baseline queries / group queries) and off each
    run's own curve. Per run, a run that never reaches the threshold counts at its last record's queries
    (a lower bound: it needs at least that many; counted in `not_reached`). `speedup_per_run` = mean over
    the baseline's runs / mean over the group's runs, with a bootstrap 95% interval over runs (seeds).
    Undefined (None) when the baseline did not improve. An absolute `threshold` replaces the rule (and is
    used whether or not the baseline improved): a level fixed in advance, e.g. a success rate.
    Per group also `auc_per_run` (each run's raw curve's mean level, area), `auc_mean`, `auc_std`.
    With `seeds` ({label: each run's seed}), also per group: `paired_seeds` (the seeds it shares with the
    baseline), `speedup_paired` (the same ratio over those seeds) and `speedup_paired_ci95` (the paired
    bootstrap over them), and `auc_diff_paired` / `auc_diff_paired_ci95` (group minus baseline, paired);
    all None with fewer than 2 shared seeds."""
    base = groups[baseline]
    r0, r_final = base["first"], base["mean"][-1].item()
    if threshold is None:
        threshold = r0 + fraction * (r_final - r0) if r_final > r0 else None
    base_q = queries_to_reach(base["grid"], base["mean"], threshold) if threshold is not None else None
    summary = {"baseline": baseline, "fraction": fraction, "r0": r0, "r_final": r_final,
               "threshold": threshold, "groups": {}}
    aucs = {label: [area(x, y) for x, y, _ in g["curves"]] for label, g in groups.items()}

    def per_run(g):  # (queries per run, censored at the budget; how many never reached the threshold)
        qs = [queries_to_reach(x, s, threshold) for x, _, s in g["curves"]]
        return [q if q is not None else x[-1].item() for q, (x, _, _) in zip(qs, g["curves"])], qs.count(None)
    base_runs = per_run(base)[0] if threshold is not None else None
    for label, g in groups.items():
        q = queries_to_reach(g["grid"], g["mean"], threshold) if threshold is not None else None
        runs_q, missed = per_run(g) if threshold is not None else (None, None)
        ratio = bootstrap_ratio(base_runs, runs_q) if threshold is not None and min(runs_q) > 0 else None
        summary["groups"][label] = {
            "runs": g["runs"], "final_mean": g["final_mean"], "final_std": g["final_std"],
            "queries_to_threshold": q, "queries_to_threshold_per_run": runs_q, "not_reached": missed,
            "speedup": base_q / q if q and base_q else None,
            "speedup_per_run": ratio[0] if ratio else None,
            "speedup_ci95": list(ratio[1:]) if ratio else None,
            "auc_per_run": aucs[label], "auc_mean": sum(aucs[label]) / len(aucs[label]),
            "auc_std": torch.tensor(aucs[label]).std().item() if len(aucs[label]) > 1 else 0.0}
        if seeds is not None:
            paired = shared_seeds(seeds[label], seeds[baseline])
            ratio, diff = None, None
            if len(paired) >= 2:
                mine, theirs = dict(zip(seeds[label], aucs[label])), dict(zip(seeds[baseline], aucs[baseline]))
                diff = paired_bootstrap_diff([mine[s] for s in paired], [theirs[s] for s in paired])
            if threshold is not None and len(paired) >= 2:
                mine, theirs = dict(zip(seeds[label], runs_q)), dict(zip(seeds[baseline], base_runs))
                if min(mine[s] for s in paired) > 0:
                    ratio = paired_bootstrap_ratio([theirs[s] for s in paired], [mine[s] for s in paired])
            summary["groups"][label].update(
                paired_seeds=paired, speedup_paired=ratio[0] if ratio else None,
                speedup_paired_ci95=list(ratio[1:]) if ratio else None,
                auc_diff_paired=diff[0] if diff else None, auc_diff_paired_ci95=list(diff[1:]) if diff else None)
    return summary


# -----------------------------------------------------------------------------
# The plot, the JSON, the table and the command line


def plot_groups(groups: dict[str, dict], summary: dict, cfg: CompareConfig, ylabel: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for label, g in groups.items():
        lo, hi = (g["mean"] - g["std"], g["mean"] + g["std"]) if cfg.band == "std" else (g["min"], g["max"])
        n = len(g["runs"])
        line, = ax.plot(g["grid"], g["mean"], label=f"{label} ({n} run{'s' * (n > 1)})")
        ax.fill_between(g["grid"], lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        q = summary["groups"][label]["queries_to_threshold"]
        if q is not None:
            ax.plot([q], [summary["threshold"]], "o", color=line.get_color(), ms=5)
    if summary["threshold"] is not None:
        ax.axhline(summary["threshold"], color="gray", ls="--", lw=0.8,
                   label="threshold" if cfg.threshold is not None else f"{cfg.fraction:g} of {summary['baseline']}'s improvement")
    ax.set_xlabel("reward queries (generated training samples)")
    ax.set_ylabel(ylabel + (f" ({cfg.smooth}, window {cfg.smooth_window})" if cfg.smooth != "none" else ""))
    ax.set_title(cfg.title or f"mean over runs, band: {'±std' if cfg.band == 'std' else 'min-max'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cfg.out)
    plt.close(fig)


def print_table(summary: dict, cfg: CompareConfig):
    """The threshold, one row per group, and the paired speedups where some group has one."""
    baseline = summary["baseline"]
    smoothing = f", curves smoothed ({cfg.smooth}, window {cfg.smooth_window})" \
        if cfg.smooth != "none" else ""
    if cfg.threshold is not None:
        print0(f"threshold {cfg.threshold:g} (--threshold){smoothing}")
    elif summary["threshold"] is None:
        print0(f"baseline {baseline} did not improve on its first record ({summary['r0']:.4g} -> "
               f"{summary['r_final']:.4g}): queries-to-threshold is undefined.")
    else:
        print0(f"threshold {summary['threshold']:.4g} = r0 {summary['r0']:.4g} + {cfg.fraction:g} x (r_final "
               f"{summary['r_final']:.4g} - r0), from baseline {baseline}{smoothing}")
    print0(f"{'group':<16} {'runs':>4}  {'final ' + cfg.metric:<24} {'queries to threshold':>20} "
           f"{'speedup':>8}  {'per run: mean queries (not reached)':>36} {'speedup, 95% CI over runs':>28}")
    for label, s in summary["groups"].items():
        q = "not reached" if s["queries_to_threshold"] is None else f"{s['queries_to_threshold']:.0f}"
        speed = "-" if s["speedup"] is None else f"{s['speedup']:.2f}x"
        runs_q = s["queries_to_threshold_per_run"]
        per_run = "-" if runs_q is None else f"{sum(runs_q) / len(runs_q):.0f} ({s['not_reached']})"
        ci = "-" if s["speedup_per_run"] is None else \
            f"{s['speedup_per_run']:.2f}x [{s['speedup_ci95'][0]:.2f}, {s['speedup_ci95'][1]:.2f}]"
        print0(f"{label:<16} {len(s['runs']):>4}  {s['final_mean']:<.4g} ± {s['final_std']:<15.3g} {q:>20} "
               f"{speed:>8}  {per_run:>36} {ci:>28}")
    if any(s.get("auc_diff_paired") is not None for s in summary["groups"].values()):
        print0(f"paired by seed with {baseline}'s runs, 95% CI over the shared seeds: the speedup; the "
               f"difference in area (mean level of {cfg.metric} over the queries)")
        for label, s in summary["groups"].items():
            lo, hi = s["speedup_paired_ci95"] or (None, None)
            ci = "-" if s["speedup_paired"] is None else f"{s['speedup_paired']:.2f}x [{lo:.2f}, {hi:.2f}]"
            d = s["auc_diff_paired"]
            auc = "-" if d is None else f"{d:+.4g} [{s['auc_diff_paired_ci95'][0]:+.4g}, {s['auc_diff_paired_ci95'][1]:+.4g}]"
            print0(f"{label:<16} {len(s['paired_seeds']):>4} shared seeds  {ci:>24}  {auc}")


def compare(cfg: CompareConfig) -> dict:
    runs = parse_groups(cfg.groups)
    baseline = cfg.baseline or list(runs)[-1]
    if baseline not in runs:
        raise ConfigError(f"--baseline {baseline}: not one of the group labels {list(runs)}.")
    if not 0 < cfg.fraction <= 1:
        raise ConfigError(f"--fraction {cfg.fraction}: must lie in (0, 1].")
    groups = {label: group_curves(r, cfg.metric, cfg.smooth, cfg.smooth_window) for label, r in runs.items()}
    seeds = {label: run_seeds(r) for label, r in runs.items()} if cfg.paired else None
    summary = sample_efficiency(groups, baseline, cfg.fraction, seeds, cfg.threshold)
    summary.update(metric=cfg.metric, smooth=cfg.smooth, smooth_window=cfg.smooth_window)

    # the reward's name for the y axis, when all runs were trained on the same one
    configs = [run_config(run) for run in sum(runs.values(), [])]
    names = {common.config_value(c, "reward.name") for c in configs if c is not None}
    ylabel = f"{cfg.metric} ({names.pop()})" if len(names) == 1 and None not in names else cfg.metric
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    plot_groups(groups, summary, cfg, ylabel)
    with open(os.path.splitext(cfg.out)[0] + ".json", "w") as f:
        json.dump(common.jsonable(summary), f, indent=1)
    print_table(summary, cfg)
    print0(f"wrote {cfg.out} and {os.path.splitext(cfg.out)[0]}.json")
    return summary


def cli(args=None) -> CompareConfig:
    return tyro.cli(CompareConfig, args=args, description=__doc__.split("\n\n")[0].strip())


def main(args=None, cfg=None) -> dict:
    return compare(cfg or cli(args))


if __name__ == "__main__":
    scaffold.run_cli(lambda cfg: main(cfg=cfg), cli)
