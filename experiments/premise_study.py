"""
When does DiffExp help? The premise study (experiments.md, section 8), as pre-registered there: DDPO and AlignProp
on the toy world's sparsity dial (toy.py; the premise measured before any training in section 7), DiffExp against
the baseline at each level, the two strategies alone and AlignProp with random truncation at the sparse end (8.1);
GRPO, DiffExp against the baseline at the dial's two ends (8.3).

    python experiments/premise_study.py pilot      # the pilots (seeds the study does not use): set the budgets
    python experiments/premise_study.py run        # every study run, two at a time on one thread each (resumable)
    python experiments/premise_study.py run --only ddpo-sparse
    python experiments/premise_study.py analyse    # tables (markdown) and the figure, on the seeds every arm finished
    python experiments/premise_study.py analyse --pilot   # the same for the pilot's runs (runs/premise-study/pilot-*)
    python experiments/premise_study.py list       # the runs and their commands, done or not
    python experiments/premise_study.py status     # per trainer x level: seeds complete, runs and hours left
    python experiments/premise_study.py record     # the record of runs finished before it was kept (see below)

Runs go to runs/premise-study/{pilot,study}/{trainer}-{level}-{arm}-s{seed}/, a log file beside each. As each run
finishes, its record is written to experiments/premise-study/{pilot,study}/{run}/: its config.json, the
metrics.jsonl keys the analysis reads, the CPU and torch that recorded it with the run's time (machine.json) and its
final policy's statistics (final_stats.json, written last), a few KB. The record is committed with the study.
`status` and `analyse` read only the record, so the tables and figures can be rebuilt and checked without the run
folders (about 20 hours of this study on two CPU cores), and runs made in several sittings or on several machines
add up. `analyse` writes runs/premise-study/analysis.json, runs/premise-study/tables.md, a labelled grid of every
arm's final plain policy per trainer x level (runs/premise-study/grid-*.png, the first seed; only where those runs'
checkpoints are on disk) and, once every trainer x level is read, docs/premise-study.png and
docs/premise-speedup.png.
"""

import json
import os
import platform
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_study  # noqa: E402  (running runs two at a time, final-policy statistics)

OUT = os.path.join(ROOT, "runs", "premise-study")
RECORD = os.path.join(ROOT, "experiments", "premise-study")
SUCCESS = "toy-dial-success"
TRAINERS = ("ddpo", "alignprop", "grpo")
LEVELS = ("dense", "medium", "sparse")
# GRPO, the third trainer (experiments.md 8.3, pre-registered after 8.1 and before its own runs): the dial's ends
LEVELS_OF = {"ddpo": LEVELS, "alignprop": LEVELS, "grpo": ("dense", "sparse")}
# the reward each trainer trains on at each level: the policy-gradient trainers' sparse end is the binary success
REWARD = ({(trainer, level): f"toy-dial-{level}" for trainer in TRAINERS for level in LEVELS}
          | {("ddpo", "sparse"): SUCCESS, ("grpo", "sparse"): SUCCESS})
# Budgets in epochs (the presets' epochs: DDPO 256 reward queries, AlignProp 16), divisible by 4 so that
# exploration (progress = epoch / epochs < 3/4) lasts exactly 3/4 of the queries. Set from the pilot
# (experiments.md 8.2) before any study run: the pilots' budgets (DDPO 2,048 queries, AlignProp 768).
EPOCHS = {"ddpo": 8, "alignprop": 48, "grpo": 16}  # GRPO: from its pilot (experiments.md 8.3)
PILOT_EPOCHS = {"ddpo": 8, "alignprop": 48, "grpo": 16}  # GRPO's toy preset: 128 queries per epoch
EVAL_EVERY = {"ddpo": 1, "alignprop": 4, "grpo": 1}
# every run: the plain policy on 96 samples per evaluation (12 prompts x 8 seeds), scored with the success
# reward too (plain_toy-dial-success_mean), at each level
COMMON = ["--eval.samples-per-prompt", "8", "--eval.rewards", SUCCESS]
ARMS = {"diffexp": [], "baseline": ["--no-diffexp"]}
SPARSE_ARMS = {"cfg-only": ["--explore.no-prompt-weighting"], "weighting-only": ["--explore.no-cfg-schedule"]}
RANDOM_K = ["--truncation", "uniform", "--k-min", "1", "--k-max", "10"]  # AlignProp's randomized truncation
SEEDS = {"dense": tuple(range(20, 25)), "medium": tuple(range(20, 25)), "sparse": tuple(range(20, 30))}
GRPO_SEEDS = tuple(range(20, 25))  # 5 per arm at both ends


def seeds_of(trainer: str, level: str) -> tuple:
    return GRPO_SEEDS if trainer == "grpo" else SEEDS[level]
PILOT_SEED = 90
LABEL = {"ddpo": "DDPO", "alignprop": "AlignProp", "grpo": "GRPO"}


@dataclass(frozen=True)
class Run:
    phase: str  # pilot | study
    trainer: str
    level: str
    arm: str
    seed: int
    flags: tuple

    @property
    def name(self):
        return f"{self.trainer}-{self.level}-{self.arm}-s{self.seed}"

    @property
    def folder(self):
        return os.path.join(OUT, self.phase, self.name)

    @property
    def record(self):
        return os.path.join(RECORD, self.phase, self.name)

    def command(self):
        epochs = (PILOT_EPOCHS if self.phase == "pilot" else EPOCHS)[self.trainer]
        return [sys.executable, os.path.join(ROOT, f"train_{self.trainer}.py"), "toy", "--seed", str(self.seed),
                "--reward.name", REWARD[self.trainer, self.level], "--num-epochs", str(epochs),
                "--eval.every", str(EVAL_EVERY[self.trainer]), *COMMON, *self.flags,
                "--run-dir", self.folder, "--resume", "auto"]


def arms(trainer: str, level: str) -> dict[str, list[str]]:
    """The arms of one trainer x level; the baseline last."""
    out = {"diffexp": ARMS["diffexp"]}
    if level == "sparse" and trainer != "grpo":
        out |= SPARSE_ARMS
        if trainer == "alignprop":
            out |= {"diffexp-random-k": RANDOM_K, "baseline-random-k": ["--no-diffexp", *RANDOM_K]}
    return out | {"baseline": ARMS["baseline"]}


def pilot_runs() -> list[Run]:
    """The baseline at every level and DiffExp at the sparse end, both trainers, one seed the study does not use."""
    runs = []
    for level, arm in [(level, "baseline") for level in LEVELS] + [("sparse", "diffexp")]:
        runs += [Run("pilot", trainer, level, arm, PILOT_SEED, tuple(ARMS[arm])) for trainer in TRAINERS
                 if level in LEVELS_OF[trainer]]
    return runs


def study_runs() -> list[Run]:
    """Seed-major: an interrupted study has every arm of a level at the same number of seeds."""
    runs = []
    for seed in sorted(set(s for seeds in SEEDS.values() for s in seeds)):
        for trainer in TRAINERS:
            for level in LEVELS_OF[trainer]:
                if seed in seeds_of(trainer, level):
                    runs += [Run("study", trainer, level, arm, seed, tuple(flags))
                             for arm, flags in arms(trainer, level).items()]
    return runs


# -----------------------------------------------------------------------------
# The record: what the analysis reads of a finished run

# the metrics.jsonl keys the analysis reads (the curves, the advantage-signal share, the rollouts' reward, whether
# an epoch explored), the epoch included so that a record is recognised as finished as its run folder is
KEEP = ("epoch", "reward_queries", "exploring", "reward_mean", "signal_share", "plain_reward_mean",
        f"plain_{SUCCESS}_mean", "heldout_reward_mean")


def recorded(run: Run) -> bool:
    """Whether the run's record is complete: final_stats.json is written last, after a finished run."""
    return os.path.isfile(os.path.join(run.record, "final_stats.json"))


def record(run: Run):
    """Writes the record of a finished run (each file atomically, final_stats.json last)."""
    import scaffold
    if not toy_study.finished(run):
        raise SystemExit(f"record: {run.folder} is not a finished run (its last epoch is not in metrics.jsonl); "
                         f"finish it first with `python {sys.argv[0]} run`.")
    stats = toy_study.final_policy_stats(run)  # the final checkpoint's samples: seeds 1000.., plain prompts
    os.makedirs(run.record, exist_ok=True)
    with open(os.path.join(run.folder, "config.json")) as f:  # its paths relative to the repository
        config = json.loads(f.read().replace(json.dumps(ROOT + os.sep)[1:-1], ""))
    toy_study.write_atomic(os.path.join(run.record, "config.json"), json.dumps(config, indent=1) + "\n")
    metrics = scaffold.read_metrics(os.path.join(run.folder, "metrics.jsonl"))
    toy_study.write_atomic(os.path.join(run.record, "metrics.jsonl"),
               "".join(json.dumps({k: m[k] for k in KEEP if k in m}) + "\n" for m in metrics))
    # where it was recorded: floating point differs across CPUs (vector instruction sets), and a DDPO run
    # drifts apart from its twin on another CPU after a few epochs (experiments.md 8.1); and its run time
    import torch
    times = os.path.join(OUT, "run" if run.phase == "study" else "pilot", "times.json")
    seconds = json.load(open(times)).get(run.name) if os.path.isfile(times) else None
    machine = {"machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "torch": torch.__version__, "seconds": seconds}
    toy_study.write_atomic(os.path.join(run.record, "machine.json"), json.dumps(machine, indent=1) + "\n")
    toy_study.write_atomic(os.path.join(run.record, "final_stats.json"), json.dumps(stats, indent=1) + "\n")


def record_finished(runs: list[Run]):
    """Records those of `runs` that have finished and have no record yet."""
    for r in runs:
        if toy_study.finished(r) and not recorded(r):
            record(r)
            print("recorded", r.name, flush=True)


def run_and_record(todo: list[Run], out: str):
    """The runs `todo` two at a time (resuming any that have a checkpoint), each recorded as it finishes; a run
    already finished is only recorded."""
    record_finished(todo)
    toy_study.run_many([r for r in todo if not recorded(r)], out, after=record)


def status():
    """Per trainer x level: the seeds every arm has finished, and the runs left with the hours they need at
    the median time of the trainer's finished runs, pilot and study (two at a time; a resumed run's time is
    only its last part's)."""
    runs = study_runs()
    # each finished run's seconds, pilot and study: run_many's on this disk, else the record's
    machine = {r.name: os.path.join(r.record, "machine.json") for r in pilot_runs() + runs}
    times = {name: json.load(open(path))["seconds"] for name, path in machine.items() if os.path.isfile(path)}
    for phase in ("pilot", "run"):
        path = os.path.join(OUT, phase, "times.json")
        times |= json.load(open(path)) if os.path.isfile(path) else {}
    times = [(k, v) for k, v in times.items() if v is not None]
    hours = 0.0
    for trainer in TRAINERS:
        took = sorted(v for k, v in times if k.startswith(trainer + "-"))
        median = took[len(took) // 2] if took else 20 * 60
        for level in LEVELS_OF[trainer]:
            mine = [r for r in runs if (r.trainer, r.level) == (trainer, level)]
            left = [r for r in mine if not recorded(r)]
            hours += len(left) * median / 3600 / 2
            print(f"{trainer}-{level}: seeds complete {complete_seeds(trainer, level, runs)} of "
                  f"{list(seeds_of(trainer, level))}; {len(left)} of {len(mine)} runs left")
    print(f"about {hours:.1f} h left, two at a time")


# -----------------------------------------------------------------------------
# Analysis

def primary_metric(level: str) -> str:
    """The plain policy's reward at the dense and medium levels; its success rate at the sparse end."""
    return f"plain_{SUCCESS}_mean" if level == "sparse" else "plain_reward_mean"


# The sparse end's threshold, fixed before the study (experiments.md 8.2): the success rate of the world's own
# images (3.74%, section 7), i.e. 4 of the 96 evaluation samples; the 90%-of-the-baseline's-gain rule of the
# other levels is undefined where the baseline does not learn
SPARSE_THRESHOLD = 0.04


def complete_seeds(trainer: str, level: str, runs: list[Run]) -> list[int]:
    mine = [r for r in runs if (r.trainer, r.level) == (trainer, level)]
    return sorted(s for s in {r.seed for r in mine} if all(recorded(r) for r in mine if r.seed == s))


def group_spec(runs: list[Run], arm: str, seeds: list[int]) -> str:
    return f"{arm}=" + ",".join(r.record for r in runs if r.arm == arm and r.seed in seeds)


def analyse(phase: str = "study"):
    """The tables and figure of the study (or of the pilot: phase 'pilot', into OUT/pilot-*)."""
    import torch
    import compare
    torch.set_num_threads(2)
    runs, results, out = (study_runs() if phase == "study" else pilot_runs()), {}, "" if phase == "study" else "pilot-"
    for trainer in TRAINERS:
        for level in LEVELS_OF[trainer]:
            key, seeds = f"{trainer}-{level}", complete_seeds(trainer, level, runs)
            mine = [r for r in runs if (r.trainer, r.level) == (trainer, level)]
            if not seeds or (phase == "study" and seeds != list(seeds_of(trainer, level))):
                # the reading rule: a trainer x level is read once every arm has finished every registered seed
                print(f"{key}: {len(seeds)} of {len(seeds_of(trainer, level))} seeds finished by every arm; left out")
                continue
            present = [arm for arm in arms(trainer, level) if any(r.arm == arm for r in mine)]
            groups = [group_spec(mine, arm, seeds) for arm in present]
            result = {"seeds": seeds}
            for metric in dict.fromkeys((primary_metric(level), "plain_reward_mean", f"plain_{SUCCESS}_mean",
                                         "heldout_reward_mean", "reward_mean")):
                extra = ["--threshold", str(SPARSE_THRESHOLD)] if level == "sparse" and "success" in metric else []
                result[metric] = compare.main(["--groups", *groups, "--metric", metric, *extra, "--title", key,
                                               "--out", os.path.join(OUT, f"{out}{key}-{metric}.png")])
            if trainer != "alignprop":
                result["signal_share"] = {arm: mean_key(mine, arm, seeds, "signal_share") for arm in present}
            if trainer == "grpo":  # 8.3: the rollouts' own reward (success rate at the sparse end), by mode
                result["rollout_reward"] = {arm: mean_key(mine, arm, seeds, "reward_mean") for arm in present}
            result["final"] = {arm: final_stats([r for r in mine if r.arm == arm and r.seed in seeds]) for arm in present}
            first = [r for arm in present for r in mine if r.arm == arm and r.seed == seeds[0]]
            if all(toy_study.finished(r) for r in first):  # the grid samples the checkpoints: only where they are
                final_grid(first, level, os.path.join(OUT, f"{out}grid-{key}-s{seeds[0]}.png"))
            else:
                print(f"{key}: no grid (the run folders of seed {seeds[0]} are not on this disk)")
            results[key] = result
    with open(os.path.join(OUT, f"{out}analysis.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    text = tables(results)
    with open(os.path.join(OUT, f"{out}tables.md"), "w") as f:
        f.write(text)
    print(text)
    if phase == "pilot":
        figure(results, os.path.join(OUT, "pilot.png"))
        return
    # the README's figures once every trainer x level is read; until then beside the tables
    where = os.path.join(ROOT, "docs") if len(results) == sum(map(len, LEVELS_OF.values())) else OUT
    figure(results, os.path.join(where, "premise-study.png"))
    speedup_figure(results, os.path.join(where, "premise-speedup.png"))


def mean_key(runs: list[Run], arm: str, seeds: list[int], key: str) -> dict:
    """Per run, the mean of `key` over the exploring epochs and over the rest (the advantage-signal share, the
    rollouts' reward)."""
    import scaffold
    out = {"exploring": [], "plain": []}
    for r in runs:
        if r.arm == arm and r.seed in seeds:
            records = [m for m in scaffold.read_metrics(os.path.join(r.record, "metrics.jsonl")) if key in m]
            for mode in out:
                values = [m[key] for m in records if m["exploring"] == (mode == "exploring")]
                if values:
                    out[mode].append(sum(values) / len(values))
    return out


def final_stats(runs: list[Run]) -> dict:
    stats = [json.load(open(os.path.join(r.record, "final_stats.json"))) for r in runs]
    return {k: [s[k] for s in stats] for k in stats[0]} if stats else {}


def final_grid(runs: list[Run], level: str, path: str):
    """The final plain policy of each run (the arms of one seed), one row each: every training prompt's first
    sample (seed 1000, the final statistics' first), labelled with the level's primary reward."""
    import torch
    import plots
    import rewards
    name = SUCCESS if level == "sparse" else f"toy-dial-{level}"
    reward = rewards.make_reward(name)
    images, labels = [], []
    for r in runs:
        x, texts = toy_study.final_samples(r, per_prompt=1)
        images.append(x)
        labels += plots.grid_labels(texts, reward(x, texts), "success" if level == "sparse" else "r")
    plots.save_grid(torch.cat(images), path, nrow=len(images[0]), labels=labels, row_labels=[r.arm for r in runs],
                    title=f"{LABEL[runs[0].trainer]}, {level}, seed {runs[0].seed}: the final plain policy")


def fmt_ci(value, ci) -> str:
    return "-" if value is None else f"{value:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]"


def tables(results: dict) -> str:
    out = []
    for key, r in results.items():
        level = key.split("-")[1]
        p = r[primary_metric(level)]
        rule = (f"threshold {p['threshold']:.3g}: a success rate fixed in advance" if level == "sparse" else
                f"threshold {p['threshold']:.4g} = r0 {p['r0']:.4g} + 0.9 x (r_final {p['r_final']:.4g} - r0) of "
                "the baseline's mean curve" if p["threshold"] is not None else "the baseline did not improve: no threshold")
        out += [f"### {key}", "", f"Seeds {', '.join(map(str, r['seeds']))}. Primary: {primary_metric(level)}; {rule}.", "",
                "| arm | queries to threshold, per seed | not reached | speedup, paired [95% CI] | AUC difference vs "
                "baseline, paired [95% CI] | final (primary) | final success rate | final held-out reward | "
                "layout entropy (end) | alignment (end) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, g in p["groups"].items():
            per_seed = ", ".join(f"{q:.0f}" for q in g["queries_to_threshold_per_run"] or [])
            auc = "-" if g.get("auc_diff_paired") is None else (
                f"{g['auc_diff_paired']:+.3g} [{g['auc_diff_paired_ci95'][0]:+.3g}, {g['auc_diff_paired_ci95'][1]:+.3g}]")
            success = r[f"plain_{SUCCESS}_mean"]["groups"][arm]
            held = r["heldout_reward_mean"]["groups"][arm]
            f = r["final"].get(arm, {})
            cells = [toy_study.mean_sd(f[k]) if f else "-" for k in ("layout_entropy", "alignment")]
            out.append(f"| {arm} | {per_seed} | {g['not_reached']} | {fmt_ci(g.get('speedup_paired'), g.get('speedup_paired_ci95'))} "
                       f"| {auc} | {g['final_mean']:.3g} ± {g['final_std']:.2g} | {success['final_mean']:.3g} ± "
                       f"{success['final_std']:.2g} | {held['final_mean']:.3g} ± {held['final_std']:.2g} | " + " | ".join(cells) + " |")
        if "signal_share" in r:
            out += ["", "The advantage-signal share (prompt groups whose rewards are not all equal), mean over seeds: "
                    + "; ".join(f"{arm} {share_text(v)}" for arm, v in r["signal_share"].items())]
        if "rollout_reward" in r:
            out += ["", "The rollouts' own mean reward (the success rate at the sparse end), mean over seeds: "
                    + "; ".join(f"{arm} {share_text(v, '.3f')}" for arm, v in r["rollout_reward"].items())]
        out.append("")
    return "\n".join(out)


def share_text(v: dict, fmt: str = ".1%") -> str:
    parts = [f"{mode} {sum(x) / len(x):{fmt}}" for mode, x in v.items() if x]
    return ", ".join(parts) or "-"


def figure(results: dict, path: str):
    """The primary curve, trainers x levels: every arm's mean over seeds against reward queries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import compare
    fig, axes = plt.subplots(len(TRAINERS), len(LEVELS), figsize=(13, 3.5 * len(TRAINERS)), dpi=100, squeeze=False)
    for i, trainer in enumerate(TRAINERS):
        for j, level in enumerate(LEVELS):
            ax, key = axes[i][j], f"{trainer}-{level}"
            metric = primary_metric(level)
            if level not in LEVELS_OF[trainer]:
                ax.axis("off")
                continue
            for arm, g in (results[key][metric]["groups"].items() if key in results else ()):
                curves = compare.group_curves(g["runs"], metric, "none", 1)
                ax.plot(curves["grid"], curves["mean"], label=f"{arm} ({len(g['runs'])})",
                        linewidth=2 if arm in ("diffexp", "baseline") else 1)
            toy_study.finish_axes(ax, f"{LABEL[trainer]}, {level}",
                                  "plain policy's success rate" if level == "sparse" else "plain policy's reward")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def speedup_figure(results: dict, path: str):
    """The answer in one figure: DiffExp's paired speedup over the baseline (95% interval) at each level of
    the dial, one line per trainer; 1 = no difference. A level whose baseline never reached the threshold
    shows a lower bound (an open marker); one where no run of either arm reached it, a cross at 1 (no
    speedup can be measured there)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.lines
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for k, trainer in enumerate(TRAINERS):
        xs, ys, lo, hi, censored, neither = [], [], [], [], [], []
        for j, level in enumerate(LEVELS):
            r = results.get(f"{trainer}-{level}")
            g = r[primary_metric(level)]["groups"].get("diffexp") if r else None
            if g is None or g.get("speedup_paired") is None:
                continue
            x = j + 0.06 * (k - (len(TRAINERS) - 1) / 2)
            groups = r[primary_metric(level)]["groups"]
            if all(groups[arm]["not_reached"] == len(groups[arm]["runs"]) for arm in ("diffexp", "baseline")):
                neither.append(x)
                continue
            xs.append(x)
            ys.append(g["speedup_paired"])
            lo.append(g["speedup_paired"] - g["speedup_paired_ci95"][0])
            hi.append(g["speedup_paired_ci95"][1] - g["speedup_paired"])
            censored.append(r[primary_metric(level)]["groups"]["baseline"]["not_reached"] > 0)
        label = LABEL[trainer]
        line = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.scatter(neither, [1.0] * len(neither), marker="x", s=60, color=line[0].get_color(), zorder=3)
        ax.scatter([x for x, c in zip(xs, censored) if c], [y for y, c in zip(ys, censored) if c], s=80,
                   facecolors="white", edgecolors=line[0].get_color(), zorder=3)
    ax.axhline(1, color="gray", ls="--", lw=0.8)
    ax.set_xticks(range(len(LEVELS)), [f"{level}" for level in LEVELS])
    ax.set_xlabel("the reward's sparsity (the dial's level)")
    ax.set_ylabel("DiffExp's speedup, paired by seed (95% CI)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + [
        matplotlib.lines.Line2D([], [], ls="", marker="o", mfc="white", mec="gray",
                                label="baseline censored: lower bound"),
        matplotlib.lines.Line2D([], [], ls="", marker="x", color="gray", label="neither arm reached the threshold")]
    ax.legend(handles=handles, fontsize=8)
    ax.set_xlim(-0.3, len(LEVELS) - 0.7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    only = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--only" else ""
    if what in ("pilot", "run"):
        todo = pilot_runs() if what == "pilot" else study_runs()
        todo = [r for r in todo if not recorded(r) and (not only or f"{r.trainer}-{r.level}" == only)]
        run_and_record(todo, os.path.join(OUT, what))
    elif what == "record":
        record_finished(pilot_runs() + study_runs())
    elif what == "analyse":
        analyse("pilot" if "--pilot" in sys.argv else "study")
    elif what == "list":
        for r in pilot_runs() + study_runs():
            print("done" if recorded(r) else "todo", " ".join(r.command()[1:]))
    elif what == "status":
        status()
    else:
        raise SystemExit(f"usage: python {sys.argv[0]} pilot | run [--only TRAINER-LEVEL] | analyse [--pilot] | list "
                         "| status | record")
