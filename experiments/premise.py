"""
DiffExp's premise in numbers, before any training (experiments.md, section 7): on the shipped toy model,
how often does each sampler draw the sparsity dial's preferred configuration (toy.py: a small shape on a
thirds point), at plain CFG 5 and under DiffExp's schedule?

Cells: sampler (eta 1, DDPO's; eta 0, AlignProp's) x arm (plain CFG 5; DiffExp: the toy presets' CFG
schedule, w_low below t_thres' noise, and random prompt weighting, as in the first epoch of training),
plus the world's own images for the same prompts. Every cell draws the first epoch of the DDPO toy preset
at each seed: 16 batches of 16 prompts from prompts/toy_train.txt, with the preset's keyed generators for
prompts, prompt weighting and noise, so the arms and samplers share prompts and initial noise. Per cell
and dial level: the share of samples at or above the level's success level (a 95% Wilson interval) and the
mean reward; the share of successes (toy-dial-success); and, per seed, the share of prompt groups (the
groups DDPO normalises rewards in) whose success rewards are not all equal, i.e. that give DDPO a nonzero
advantage on the success reward.

    python experiments/premise.py                    # 12 seeds x 256 samples per cell; about 45 minutes on 2 CPU cores
    python experiments/premise.py --seeds 1          # a quick look (seconds per cell: printed)

Each seed's images are kept in OUT/seed-N.pt (16 MB), so an interrupted run resumes where it stopped and a
second run only scores them again; OUT/premise.json and OUT/premise.md hold the results.
"""

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import diffusion  # noqa: E402
import explore  # noqa: E402
import toy  # noqa: E402
import train_alignprop  # noqa: E402
import train_ddpo  # noqa: E402

DDPO = train_ddpo.PRESETS["toy"][1]
ALIGNPROP = train_alignprop.PRESETS["toy"][1]
LEVELS = [f"toy-dial-{level}" for level in toy.DIAL_LEVELS]  # dense, medium, sparse
SUCCESS = "toy-dial-success"
Z = 1.959964  # the normal quantile of a two-sided 95% interval


@dataclass(frozen=True)
class Config:
    seeds: int = 12  # seeds 0 .. seeds-1, one DDPO toy preset epoch (256 samples) each, per cell
    out: str = os.path.join("runs", "premise")
    threads: int = 1  # torch CPU threads


def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial share k / n."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def settings() -> dict[str, dict]:
    """The cells: sampler x arm, each with its DDIM eta and exploration (None: plain CFG), and the world."""
    assert DDPO.sample.num_steps == ALIGNPROP.sample.num_steps and DDPO.explore == ALIGNPROP.explore
    assert DDPO.sample.guidance_scale == ALIGNPROP.sample.guidance_scale
    cells = {"world (training data)": dict(eta=None, explore=None)}
    for eta, sampler in ((DDPO.sample.eta, "DDPO"), (ALIGNPROP.sample.eta, "AlignProp")):
        cells[f"eta {eta:g} ({sampler}), CFG {DDPO.sample.guidance_scale:g}"] = dict(eta=eta, explore=None)
        cells[f"eta {eta:g} ({sampler}), DiffExp"] = dict(eta=eta, explore=DDPO.explore)
    return cells


def score(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {name: toy.TOY_REWARDS[name]()(images, prompts) for name in LEVELS + [SUCCESS]}
        out["gate"] = toy.dial_parts(images)["gate"]
    return out


def sample_seed(models, prompt_set, uncond, seed: int) -> dict:
    """One DDPO toy preset epoch (epoch 0 at this seed) per cell: its prompts, and per cell the images and the
    seconds they took."""
    ts = diffusion.timesteps(models, DDPO.sample.num_steps)
    batches = range(DDPO.sample.num_batches)
    idx = [torch.randint(len(prompt_set), (DDPO.sample.batch_size,), generator=common.generator(seed, 0, b, "prompts"))
           for b in batches]
    prompts = [[prompt_set[i] for i in ix] for ix in idx]
    out = {"prompts": [p.text for batch in prompts for p in batch], "images": {}, "seconds": {}}
    for name, cell in settings().items():
        t0, images = time.time(), []
        for b in batches:
            texts = [p.text for p in prompts[b]]
            if cell["eta"] is None:
                images.append(toy.world_images(texts, common.generator(seed, 0, b, "world")))
                continue
            cond, positions = diffusion.encode_prompts(models, prompts[b])
            guidance = DDPO.sample.guidance_scale
            if cell["explore"] is not None:  # progress 0: the first epoch, exploring
                cond, guidance = explore.explore_batch(cell["explore"], cond, positions, ts, guidance, 0.0,
                                                       common.generator(seed, 0, b, "explore"), diffusion.PROMPT_LENGTH)
            with torch.no_grad():
                images.append(diffusion.sample(models, cond, uncond, guidance, len(ts), cell["eta"],
                                               common.generator(seed, 0, b, "noise")).images)
        out["images"][name] = torch.cat(images)
        out["seconds"][name] = time.time() - t0
        successes = int(toy.dial_success(out["images"][name]).sum())
        print(f"seed {seed} | {name} | {out['seconds'][name]:.0f} s | successes {successes}/{len(out['prompts'])}", flush=True)
    return out


def mixed_groups(prompts: list[str], success: torch.Tensor) -> tuple[int, int]:
    """(prompt groups whose success rewards are not all equal, prompt groups) in one epoch."""
    groups = {}
    for p, s in zip(prompts, success.tolist()):
        groups.setdefault(p, set()).add(s)
    return sum(len(v) > 1 for v in groups.values()), len(groups)


def summarise(per_seed: list[dict]) -> dict:
    results = {}
    for name in settings():
        r = {k: torch.cat([s["cells"][name][k] for s in per_seed]) for k in LEVELS + [SUCCESS, "gate"]}
        n = len(r[SUCCESS])
        row = {"samples": n, "seconds": sum(s["seconds"][name] for s in per_seed), "clean": r["gate"].ge(1).float().mean().item()}
        for level in LEVELS + [SUCCESS]:
            k = int((r[level] >= toy.DIAL_SUCCESS_LEVELS[level]).sum())
            row[level] = {"success_level": toy.DIAL_SUCCESS_LEVELS[level], "successes": k, "share": k / n,
                          "share_ci": wilson(k, n), "mean": r[level].mean().item(),
                          "mean_se": (r[level].std() / math.sqrt(n)).item()}
        groups = [mixed_groups(s["prompts"], s["cells"][name][SUCCESS]) for s in per_seed]
        mixed, total = sum(g[0] for g in groups), sum(g[1] for g in groups)
        row["mixed_groups"] = {"mixed": mixed, "groups": total, "share": mixed / total, "share_ci": wilson(mixed, total),
                               "per_epoch": [g[0] / g[1] for g in groups]}
        results[name] = row
    return results


def pct(share: float, ci: tuple[float, float]) -> str:
    return f"{100 * share:.2f}% [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def markdown(results: dict) -> str:
    levels = [(level, level.removeprefix("toy-dial-")) for level in LEVELS]
    head = ["setting", "samples", "success (D <= 1, clean) [95% CI]"]
    for level, short in levels:
        head += [f"{short}: share >= {toy.DIAL_SUCCESS_LEVELS[level]:.3f} [95% CI]", f"{short}: mean"]
    head.append("prompt groups with mixed success (DDPO epoch)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        cells = [name, str(row["samples"]), pct(row[SUCCESS]["share"], row[SUCCESS]["share_ci"])]
        for level, _ in levels:
            cells += [pct(row[level]["share"], row[level]["share_ci"]), f"{row[level]['mean']:.4f} ± {row[level]['mean_se']:.4f}"]
        g = row["mixed_groups"]
        cells.append(f"{g['mixed']}/{g['groups']} = {100 * g['share']:.1f}% [{100 * g['share_ci'][0]:.1f}, {100 * g['share_ci'][1]:.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    models = diffusion.load_models(DDPO.model)
    prompt_set = diffusion.load_prompts(DDPO.prompts)
    uncond = diffusion.encode_text(models, [""])
    per_seed = []
    for seed in range(cfg.seeds):
        path = os.path.join(cfg.out, f"seed-{seed}.pt")
        if not os.path.isfile(path):
            torch.save(sample_seed(models, prompt_set, uncond, seed), path + ".tmp")
            os.replace(path + ".tmp", path)
        data = torch.load(path)
        data["cells"] = {name: score(images, data["prompts"]) for name, images in data.pop("images").items()}
        per_seed.append(data)
    results = summarise(per_seed)
    table = markdown(results)
    print(table)
    explore_cfg = {k: v for k, v in asdict(DDPO.explore).items() if k in ("t_thres", "w_low", "weight_low", "weight_high")}
    meta = {"config": asdict(cfg), "model": DDPO.model, "prompts": DDPO.prompts, "num_steps": DDPO.sample.num_steps,
            "guidance_scale": DDPO.sample.guidance_scale, "explore": explore_cfg,
            "dial": {"levels": toy.DIAL_LEVELS, "scales": toy.DIAL_SCALES, "clean": toy.DIAL_CLEAN,
                     "success_levels": toy.DIAL_SUCCESS_LEVELS},
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor()}
    with open(os.path.join(cfg.out, "premise.json"), "w") as f:
        json.dump({**meta, "results": results}, f, indent=1)
    with open(os.path.join(cfg.out, "premise.md"), "w") as f:
        f.write(table)
    print(f"wrote {cfg.out}/premise.json, premise.md")
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
