"""
The toy-world study of DiffExp's sample efficiency (experiments.md, section 6), as pre-registered there:
for each trainer x task, DiffExp (the preset's defaults) against the baseline (--no-diffexp), 5 seeds each,
the same reward-query budget; on the aesthetic task (toy) with AlignProp also five ablation arms. The primary
curve is the plain policy's reward (plain_reward_mean: fixed seeds, plain prompts, w_high) against the
reward queries spent in training.

    python experiments/toy_study.py run                 # every run, two at a time on one thread each (resumable)
    python experiments/toy_study.py run --only alignprop-toy-aesthetic
    python experiments/toy_study.py analyse             # tables (markdown), the figure, final diversity
    python experiments/toy_study.py final-stats         # (optional) the final policies' statistics of the runs
                                                        # finished so far, cached in each run folder for analyse
    python experiments/toy_study.py run --followup      # the follow-up of section 6.6: AlignProp x toy, three arms,
    python experiments/toy_study.py analyse --followup  # ten new seeds (5-14); tables in runs/study/followup.md

Runs go to runs/study/{trainer}-{task}-{arm}-s{seed}/ with a log file beside each; run times to
runs/study/times.json. `analyse` writes runs/study/analysis.json, runs/study/tables.md and
docs/toy-study.png.
"""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "runs", "study")
SEEDS = (0, 1, 2, 3, 4)
TASKS = ("toy", "toy-classifier")  # the presets: the aesthetic analogue (toy-aesthetic) and prompt fidelity
TRAINERS = ("alignprop", "ddpo")
ARMS = {"diffexp": [], "baseline": ["--no-diffexp"]}
ABLATIONS = {  # AlignProp x toy only. t900 / t700: the paper's thresholds mapped to the toy schedule (toy_pretrain.py)
    "cfg-only": ["--explore.no-prompt-weighting"],
    "weighting-only": ["--explore.no-cfg-schedule"],
    "t900": ["--explore.t-thres", "650"],
    "t700": ["--explore.t-thres", "495"],
    "wlow0": ["--explore.w-low", "0"],
}

# The follow-up (experiments.md 6.6, pre-registered after 6.5): AlignProp x toy, prompt weighting alone and
# DiffExp against the baseline on ten new seeds
FOLLOWUP_SEEDS = tuple(range(5, 15))
FOLLOWUP_ARMS = {"weighting-only": ABLATIONS["weighting-only"], "diffexp": ARMS["diffexp"], "baseline": ARMS["baseline"]}


@dataclass(frozen=True)
class Run:
    trainer: str
    task: str
    arm: str
    seed: int
    flags: tuple

    @property
    def name(self):
        return f"{self.trainer}-{self.task}-{self.arm}-s{self.seed}"

    @property
    def folder(self):
        return os.path.join(OUT, self.name)

    def command(self):
        return [sys.executable, os.path.join(ROOT, f"train_{self.trainer}.py"), self.task, "--seed", str(self.seed),
                *self.flags, "--run-dir", self.folder, "--resume", "auto"]


def all_runs(followup: bool = False) -> list[Run]:
    if followup:
        return [Run("alignprop", "toy", arm, seed, tuple(flags)) for seed in FOLLOWUP_SEEDS for arm, flags in FOLLOWUP_ARMS.items()]
    runs = []
    for seed in SEEDS:  # seed-major: an interrupted study has every arm at the same number of seeds
        for trainer in TRAINERS:
            for task in TASKS:
                arms = ARMS | (ABLATIONS if (trainer, task) == ("alignprop", "toy") else {})
                runs += [Run(trainer, task, arm, seed, tuple(flags)) for arm, flags in arms.items()]
    return runs


def finished(run: Run) -> bool:
    path = os.path.join(run.folder, "config.json")
    metrics = os.path.join(run.folder, "metrics.jsonl")
    if not (os.path.isfile(path) and os.path.isfile(metrics)):
        return False
    epochs = json.load(open(path))["num_epochs"]
    return any(json.loads(line).get("epoch") == epochs - 1 for line in open(metrics) if line.strip())


def execute(run) -> float:
    """One run (anything with .folder and .command()) on one thread, its output appended to FOLDER.log."""
    os.makedirs(os.path.dirname(run.folder), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.time()
    with open(run.folder + ".log", "a") as log:
        subprocess.run(run.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def write_atomic(path: str, text: str):
    """Writes `text` to `path` through a temporary file, so the file is either whole or as it was."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def run_many(todo: list, out: str, after=None):
    """The runs `todo`, two at a time, in order; each run's seconds in OUT/times.json; then after(run), if given
    (one run at a time)."""
    times_path = os.path.join(out, "times.json")
    os.makedirs(out, exist_ok=True)
    times = json.load(open(times_path)) if os.path.isfile(times_path) else {}
    print(f"{len(todo)} runs to do, two at a time", flush=True)
    start = time.time()

    done, lock = [], threading.Lock()

    def one(run):
        seconds = execute(run)
        with lock:  # one run's bookkeeping at a time: its seconds in times.json, then after(run)
            times[run.name] = seconds
            write_atomic(times_path, json.dumps(times, indent=1))
            if after is not None:
                after(run)
        done.append(run.name)
        print(f"{time.strftime('%H:%M:%S')} done {run.name} in {seconds / 60:.1f} min ({len(done)} of {len(todo)}; "
              f"{(time.time() - start) / 3600:.2f} h so far)", flush=True)
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(one, r) for r in todo]:
            future.result()
    print(f"all done in {(time.time() - start) / 3600:.2f} h", flush=True)


def run_all(only: str = "", followup: bool = False):
    run_many([r for r in all_runs(followup) if not finished(r) and (not only or f"{r.trainer}-{r.task}" == only)], OUT)


# -----------------------------------------------------------------------------
# Analysis

def final_policy_stats(run: Run, per_prompt: int = 8) -> dict:
    """The final policy's samples on the training prompts (fixed seeds, plain prompts, w_high): prompt
    fidelity, the spread of the unspecified attributes (collapse is hacking) and both toy rewards."""
    import scaffold
    import toy
    weights = os.path.join(scaffold.latest_checkpoint(run.folder), "pytorch_lora_weights.safetensors")
    cache = os.path.join(run.folder, "final_stats.json")  # computed once per final checkpoint
    cached = json.load(open(cache)) if os.path.isfile(cache) else {}
    if cached.get("weights") == weights:
        return cached["stats"]
    stats = toy.describe(*final_samples(run, per_prompt))
    write_atomic(cache, json.dumps({"weights": weights, "stats": stats}))
    return stats


def final_samples(run: Run, per_prompt: int):
    """The final policy's plain samples on the run's training prompts: seeds 1000.., plain prompts, its own
    sampler and w_high. -> images (N, 3, H, W), their prompt texts (prompt-major)."""
    import torch
    import scaffold
    import diffusion
    import evaluate
    weights = os.path.join(scaffold.latest_checkpoint(run.folder), "pytorch_lora_weights.safetensors")
    cfg = json.load(open(os.path.join(run.folder, "config.json")))
    models = diffusion.load_models(cfg["model"])
    prompts = diffusion.load_prompts(cfg["prompts"])
    images, texts = [], []
    with evaluate.lora_applied(models.unet, weights):
        for idx, batch in evaluate.sample_batches(models, prompts, per_prompt, cfg["sample"]["num_steps"], cfg["sample"]["eta"],
                                                  cfg["sample"]["guidance_scale"], seed=1000, batch_size=48):
            images.append(batch)
            texts += [prompts[i].text for i in idx]
    return torch.cat(images), texts


def complete_seeds(trainer: str, task: str, runs: list[Run] | None = None) -> list[int]:
    """The seeds at which every arm of trainer x task has finished: the only runs analysed, so that the arms
    are compared on the same seeds (an interrupted study leaves some arms one seed ahead)."""
    runs = [r for r in (all_runs() if runs is None else runs) if (r.trainer, r.task) == (trainer, task)]
    return sorted(s for s in {r.seed for r in runs} if all(finished(r) for r in runs if r.seed == s))


def group_spec(trainer: str, task: str, arm: str, seeds: list[int]) -> str:
    """'arm=folder,folder,...': the arm's runs at these seeds, for compare.py."""
    return f"{arm}=" + ",".join(Run(trainer, task, arm, s, ()).folder for s in seeds)


def compare_arms(trainer: str, task: str, arms: list[str], runs: list[Run], key: str, plots: str) -> dict | None:
    """One trainer x task on the seeds at which every arm of `runs` finished: compare.py on the arms (the
    baseline last) on the three curves, and the final policies' statistics. None when no seed is complete.
    The pre-registered measure is the unpaired interval, so compare's paired one is left out (--no-paired)."""
    import compare
    seeds = complete_seeds(trainer, task, runs)
    if not seeds:
        print(f"{key}: no seed has finished every arm yet; left out")
        return None
    groups = [group_spec(trainer, task, arm, seeds) for arm in [a for a in arms if a != "baseline"] + ["baseline"]]
    summary = {"seeds": seeds}
    for metric in ("plain_reward_mean", "reward_mean", "heldout_reward_mean"):
        summary[metric] = compare.main(["--groups", *groups, "--metric", metric, "--no-paired",
                                        "--out", os.path.join(OUT, f"{plots}-{metric}.png"), "--title", key])
    finals = {}
    for arm in arms:
        stats = [final_policy_stats(r) for r in runs if (r.trainer, r.task, r.arm) == (trainer, task, arm) and r.seed in seeds]
        finals[arm] = {k: [s[k] for s in stats] for k in stats[0]} if stats else {}
    return {"compare": summary, "final": finals}


def write_results(results: dict, json_name: str, tables_name: str):
    """The results in runs/study/{json_name} and their markdown tables in runs/study/{tables_name} (printed too)."""
    with open(os.path.join(OUT, json_name), "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(os.path.join(OUT, tables_name), "w") as f:
        f.write(tables(results))
    print(tables(results))


def analyse():
    import torch
    torch.set_num_threads(2)
    runs = all_runs()
    results = {}
    for trainer in TRAINERS:
        for task in TASKS:
            key = f"{trainer}-{task}"
            arms = ARMS | (ABLATIONS if (trainer, task) == ("alignprop", "toy") else {})
            result = compare_arms(trainer, task, list(arms), runs, key, plots=key)
            if result:
                results[key] = result
    write_results(results, "analysis.json", "tables.md")
    figure(os.path.join(ROOT, "docs", "toy-study.png"))


def analyse_followup():
    """Section 6.6: the ten new seeds alone (primary), then pooled with the study's seeds 0-4 (secondary)."""
    import torch
    torch.set_num_threads(2)
    new = all_runs(followup=True)
    old = [r for r in all_runs() if (r.trainer, r.task, r.arm) in {("alignprop", "toy", a) for a in FOLLOWUP_ARMS}]
    results = {}
    for key, runs, plots in (("alignprop-toy, seeds 5-14 (primary)", new, "followup-5-14"),
                             ("alignprop-toy, seeds 0-14 pooled (secondary)", old + new, "followup-0-14")):
        result = compare_arms("alignprop", "toy", list(FOLLOWUP_ARMS), runs, key, plots)
        if result:
            results[key] = result
    write_results(results, "followup.json", "followup.md")


def mean_sd(values):
    import statistics
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{values[0]:.3g}"


def tables(results: dict) -> str:
    out = []
    for key, r in results.items():
        primary = r["compare"]["plain_reward_mean"]
        out += [f"### {key}", "", f"Seeds {', '.join(map(str, r['compare']['seeds']))} (those at which every arm finished). "
                f"Primary curve: plain_reward_mean; threshold {primary['threshold']:.4g} = r0 {primary['r0']:.4g} + "
                f"0.9 x (r_final {primary['r_final']:.4g} - r0), from the baseline's mean curve.", "",
                "| arm | queries to threshold, per seed | not reached | speedup vs baseline [95% CI] | final plain reward | "
                "final held-out reward | final training reward | layout entropy (end) | alignment (end) | aesthetic (end) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, g in primary["groups"].items():
            per_seed = ", ".join(f"{q:.0f}" for q in g["queries_to_threshold_per_run"] or [])
            ci = "-" if g["speedup_per_run"] is None else f"{g['speedup_per_run']:.2f}x [{g['speedup_ci95'][0]:.2f}, {g['speedup_ci95'][1]:.2f}]"
            held = r["compare"]["heldout_reward_mean"]["groups"][arm]
            train = r["compare"]["reward_mean"]["groups"][arm]
            f = r["final"].get(arm, {})
            cells = [mean_sd(f[k]) if f else "-" for k in ("layout_entropy", "alignment", "toy-aesthetic")]
            out.append(f"| {arm} | {per_seed} | {g['not_reached']} | {ci} | {g['final_mean']:.3g} ± {g['final_std']:.2g} | "
                       f"{held['final_mean']:.3g} ± {held['final_std']:.2g} | {train['final_mean']:.3g} ± {train['final_std']:.2g} | "
                       + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def figure(path: str):
    """Plain policy's reward against reward queries: trainers x tasks, DiffExp and baseline, mean and ±std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import compare
    fig, axes = plt.subplots(len(TRAINERS), len(TASKS), figsize=(10, 7), dpi=110, squeeze=False)
    for i, trainer in enumerate(TRAINERS):
        for j, task in enumerate(TASKS):
            ax, seeds = axes[i][j], complete_seeds(trainer, task)
            for arm, colour in (("diffexp", "tab:orange"), ("baseline", "tab:blue")) if seeds else ():
                runs = compare.parse_groups((group_spec(trainer, task, arm, seeds),))[arm]
                g = compare.group_curves(runs, "plain_reward_mean", "none", 1)
                ax.plot(g["grid"], g["mean"], color=colour, label=f"{arm} ({len(runs)} seeds)")
                ax.fill_between(g["grid"], g["mean"] - g["std"], g["mean"] + g["std"], color=colour, alpha=0.2, linewidth=0)
            finish_axes(ax, f"{'AlignProp' if trainer == 'alignprop' else 'DDPO'}, {task}", "plain policy's reward")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finish_axes(ax, title: str, ylabel: str):
    """One panel of a study figure: its title, the query axis, grid and legend (a panel not read yet says so)."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("reward queries")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not read yet", transform=ax.transAxes, ha="center", va="center", color="gray")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "run"
    followup = "--followup" in sys.argv
    if what == "run":
        run_all(sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--only" else "", followup)
    elif what == "analyse":
        analyse_followup() if followup else analyse()
    elif what == "final-stats":  # the final policies' statistics of every finished run, cached for analyse
        import torch
        torch.set_num_threads(1)  # beside a study still running
        [final_policy_stats(r) for r in all_runs() if finished(r)]
    else:
        raise SystemExit(f"usage: python {sys.argv[0]} run [--only TRAINER-TASK | --followup] | analyse [--followup] | final-stats")
