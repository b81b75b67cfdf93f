"""
The trainers' evaluation (--eval.*) and two commands on saved LoRA checkpoints: score measures them on
held-out prompts, sample shows the images behind the numbers (comparing runs' curves: compare.py).

    # score checkpoints on held-out prompts: the same seeds for every checkpoint, plain prompts, fixed CFG
    python evaluate.py score --checkpoints base diffexp=runs/ddpo-sd15-aesthetic-20260101-120000 \
        --prompts unseen-animals --samples-per-prompt 16 --rewards aesthetic pickscore --out eval/unseen
    python evaluate.py score --model tiny --checkpoints base runs/ddpo-tiny-20260101-120000 \
        --prompts animals --samples-per-prompt 4 --rewards jpeg-compressibility brightness --out eval/tiny

    # 8 images of each prompt from each checkpoint (the same 8 seeds for all), one labelled grid per prompt
    python evaluate.py sample --checkpoints base tuned=runs/ddpo-sd15-aesthetic-20260101-120000 \
        --prompts "a dolphin riding a bike" "a cat" --seeds 8 --rewards aesthetic --out samples/
    python evaluate.py sample --checkpoints base 'tuned=runs/alignprop-toy-*' \
        --prompts prompts/toy_heldout.txt "a red circle" --seeds 0 7 42 --rewards toy-classifier

--checkpoints: [LABEL=]PATH each, PATH base (no LoRA), a run folder (its newest checkpoint), a checkpoint
folder, a LoRA .safetensors file or a glob pattern of these (expand_checkpoints).

score writes OUT/results.json (per checkpoint: each reward's mean, std and standard error overall and
per prompt; per-prompt sample diversity and its mean), OUT/table.md and OUT/grid_<label>.png (rows:
prompts, columns: seeds, the same seeds for every checkpoint; under each image its prompt and first
reward). Settings left unset (--model, --num-steps, --eta, --guidance-scale) are taken from the
checkpoints' training configs when they agree, so a DDPO run (w_high 5.0, eta 1.0) and an AlignProp run
(7.5, 0.0) are each scored as trained.

sample writes OUT/<prompt>.png per prompt (rows: checkpoints, columns: seeds, under each image its seed
and, with --rewards, its rewards) and OUT/samples.json (prompts, seeds, checkpoints, settings, rewards).
--prompts takes prompt sets, prompt files and literal prompts, mixed. Plain prompts and one fixed
guidance scale (no exploration); settings default as for score. Seed s gives every checkpoint the same
noise, whatever other seeds or prompts are asked for, so rows differ only by their weights.

The trainers take EvalConfig and call policy_scores (the current LoRA on fixed seeds), embed_images and
mean_diversity. Sections: the trainers' settings | diversity | sampling with fixed seeds | score | sample |
command line.
"""

import contextlib
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

import common
import diffusion
import lora
import plots
import rewards
import scaffold
from common import ConfigError, config_value, jsonable, print0
from diffusion import Prompt
from rewards import RewardName

# -----------------------------------------------------------------------------
# Evaluation settings of the trainers (--eval.*)

@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # epochs between evaluations with fixed seeds, plain prompts and w_high (0: never); also before training
    plain: bool = True  # evaluate the training prompts too (plain_reward_*): the plain policy's reward, unbiased by exploration
    prompts: str = "unseen-animals"  # the held-out prompt set (heldout_reward_*)
    rewards: tuple[RewardName, ...] = ()  # further rewards scored on the same samples: plain_NAME_mean, heldout_NAME_mean
    samples_per_prompt: int = 4
    batch_size: int = 8
    diversity: bool = True  # log the CLIP diversity of each epoch's training samples (needs CLIP ViT-L/14)
    clip_tiny: bool = False  # a small random CLIP for the diversity metric (offline smoke runs)
    clip_weights: str | None = None  # local CLIP ViT-L/14 weights for the diversity metric


# -----------------------------------------------------------------------------
# Diversity: mean pairwise cosine distance of CLIP image embeddings. Reward hacking shows up as a
# collapse of the samples of one prompt onto one image, i.e. diversity falling towards 0.


def diversity(embeddings: torch.Tensor) -> float:
    """Mean of 1 - cos(e_i, e_j) over pairs i < j of embeddings (N, D), N >= 2: 0 for identical
    embeddings, up to 2 for opposite ones. Rows are re-normalised, so unnormalised input is fine too."""
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise ValueError(f"diversity needs embeddings of shape (N >= 2, D), got {tuple(embeddings.shape)}.")
    e = F.normalize(embeddings.detach().double(), dim=-1)  # float64: identical images give 0, not 1e-7
    i, j = torch.triu_indices(len(e), len(e), offset=1)
    return (1 - (e[i] * e[j]).sum(-1)).mean().clamp(min=0).item()


@torch.no_grad()
def embed_images(images: torch.Tensor, embedder, batch_size: int = 32) -> torch.Tensor:
    """images in [0, 1] (N, 3, H, W) -> embedder's embeddings (N, D), float32 on the CPU, in chunks."""
    return torch.cat([embedder(chunk).float().cpu() for chunk in images.split(batch_size)])


def image_diversity(images: torch.Tensor, embedder, batch_size: int = 32) -> float:
    """diversity() of images (N, 3, H, W) in [0, 1]; embedder: rewards.clip_image_embedder(...)."""
    return diversity(embed_images(images, embedder, batch_size))


def diversity_per_prompt(embeddings: torch.Tensor, prompts: list) -> dict[str, float]:
    """{prompt text: diversity of its samples} for every prompt with at least 2 samples.
    prompts: one str or Prompt per embedding row."""
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    if len(texts) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(texts)} prompts.")
    rows = {}
    for k, text in enumerate(texts):
        rows.setdefault(text, []).append(k)
    return {text: diversity(embeddings[idx]) for text, idx in rows.items() if len(idx) >= 2}


def mean_diversity(embeddings: torch.Tensor, prompts: list) -> float:
    """Mean over prompts (those with >= 2 samples) of the diversity of that prompt's samples. Diversity
    across different prompts is not counted: it says nothing about collapse. Returns nan only when no
    prompt has 2 samples (nothing to measure); otherwise a finite number."""
    per_prompt = diversity_per_prompt(embeddings, prompts)
    return sum(per_prompt.values()) / len(per_prompt) if per_prompt else float("nan")


def diversity_by_prompt(images: torch.Tensor, prompts: list, embedder, batch_size: int = 32) -> float:
    """mean_diversity of the images' CLIP embeddings."""
    return mean_diversity(embed_images(images, embedder, batch_size), prompts)


# -----------------------------------------------------------------------------
# Sampling with fixed seeds, shared by `score` and the trainers' held-out evaluation


def batch_seed(seed: int, first: int) -> int:
    """Seed of the noise generator of the batch whose first sample has flat index `first` (prompt-major:
    sample j of prompt i is i * samples_per_prompt + j). It depends on the seed, the prompt set, the
    samples per prompt and the batch size, never on the weights, so every checkpoint sees the same noise."""
    return (seed * 1_000_003 + first) % 2**63


def sample_batches(models: diffusion.Models, prompts: list[Prompt], samples_per_prompt: int, num_steps: int,
                   eta: float, guidance_scale: float, seed: int, batch_size: int):
    """Yields (prompt indices (b,), images (b, 3, H, W) in [0, 1]) for all prompts x samples_per_prompt,
    in prompt-major order (sample j of prompt i is number i * samples_per_prompt + j). Plain prompts, one fixed guidance scale (no
    exploration), the UNet as it is (whatever LoRA it holds). Noise comes from generators private to this
    function (see batch_seed); the global RNG is not used. Runs under no_grad with the UNet in eval mode,
    and puts the mode back when the iteration ends (consume it fully, or close it)."""
    if samples_per_prompt < 1 or batch_size < 1 or not prompts:
        raise ValueError(f"sampling needs prompts, samples_per_prompt >= 1 and batch_size >= 1 (got "
                         f"{len(prompts)} prompts, {samples_per_prompt}, {batch_size}).")
    order = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    was_training = models.unet.training
    models.unet.eval()  # evaluation samples must not depend on the mode the trainer left the UNet in
    try:
        with torch.no_grad():
            uncond = diffusion.encode_text(models, [""])  # (1, 77, D)
        for first in range(0, len(order), batch_size):
            chunk = order[first: first + batch_size]
            generator = torch.Generator().manual_seed(batch_seed(seed, first))
            with torch.no_grad():  # not across the yield: the caller's code must keep its own grad mode
                cond = diffusion.encode_text(models, [prompts[i].text for i, _ in chunk])  # (b, 77, D)
                traj = diffusion.sample(models, cond, uncond, guidance_scale, num_steps, eta, generator)
            yield [i for i, _ in chunk], traj.images
    finally:
        models.unet.train(was_training)


def stats(values: torch.Tensor) -> dict:
    """mean, std (with Bessel's correction) and standard error of the mean of a 1-d tensor; std and sem
    are nan for a single value."""
    v = values.double().flatten()
    std = v.std().item() if len(v) > 1 else float("nan")
    return {"mean": v.mean().item(), "std": std, "sem": std / math.sqrt(len(v)), "n": len(v)}


def heldout_score(models: diffusion.Models, prompts: list[Prompt], reward_fn, samples_per_prompt: int = 2,
                  num_steps: int = 50, eta: float = 0.0, guidance_scale: float = 7.5, seed: int = 0,
                  batch_size: int = 8, embedder=None, prefix: str = "heldout", extra: dict | None = None) -> dict:
    """Reward of the CURRENT UNet on held-out prompts, for the trainers' metrics records:
    {prefix_reward_mean, prefix_reward_std, prefix_reward_sem, prefix_samples}, prefix_NAME_mean for each
    reward of `extra` ({name: reward function}, scored on the same images) and, with a CLIP image
    `embedder`, prefix_diversity (diversity_by_prompt). Deterministic for fixed weights and arguments;
    touches neither the global RNG nor any generator of the caller; restores the UNet's train/eval mode."""
    scores, embeddings, texts, others = [], [], [], {name: [] for name in extra or {}}
    for prompt_idx, images in sample_batches(models, prompts, samples_per_prompt, num_steps, eta,
                                                guidance_scale, seed, batch_size):
        batch_texts = [prompts[i].text for i in prompt_idx]
        with torch.no_grad():
            scores.append(reward_fn(images, batch_texts).float().cpu())
            for name in others:
                others[name].append(extra[name](images, batch_texts).float().cpu())
        if embedder is not None:
            embeddings.append(embed_images(images, embedder))
        texts += batch_texts
    s = stats(torch.cat(scores))
    out = {f"{prefix}_reward_mean": s["mean"], f"{prefix}_reward_std": s["std"],
           f"{prefix}_reward_sem": s["sem"], f"{prefix}_samples": s["n"]}
    out |= {f"{prefix}_{name}_mean": torch.cat(v).double().mean().item() for name, v in others.items()}
    if embedder is not None:
        out[f"{prefix}_diversity"] = mean_diversity(torch.cat(embeddings), texts)
    return out


def policy_scores(models: diffusion.Models, eval_cfg, train_prompts: list[Prompt], heldout: list[Prompt] | None, reward_fn,
                  num_steps: int, eta: float, guidance_scale: float, seed: int, embedder=None,
                  extra: dict | None = None) -> dict:
    """The trainers' evaluation (--eval.*): the current UNet on fixed seeds with plain prompts and w_high, on the
    training prompts (plain_reward_*: the reward of the policy itself, which the training samples' reward
    understates while DiffExp explores) and on the held-out prompts (heldout_reward_*); the rewards of
    `extra` (load_eval_rewards) on the same images."""
    out = {}
    if eval_cfg.plain:
        out.update(heldout_score(models, train_prompts, reward_fn, eval_cfg.samples_per_prompt, num_steps, eta,
                                 guidance_scale, seed, eval_cfg.batch_size, None, prefix="plain", extra=extra))
    if heldout:
        out.update(heldout_score(models, heldout, reward_fn, eval_cfg.samples_per_prompt, num_steps, eta,
                                 guidance_scale, seed, eval_cfg.batch_size, embedder, extra=extra))
    return out


def load_eval_rewards(eval_cfg, device, dtype, tiny: bool) -> dict:
    """--eval.rewards: {name: reward function}, each model loaded once (tiny: small random models)."""
    return {name: rewards.make_reward(name, device=device, dtype=dtype, tiny=tiny) for name in eval_cfg.rewards}


# -----------------------------------------------------------------------------
# score: several checkpoints on one prompt set, each reward, diversity, a table and image grids


@dataclass(frozen=True)
class ScoreConfig:
    """Score LoRA checkpoints on a prompt set with the same seeds for every checkpoint."""
    # [LABEL=]PATH each: a run folder (newest checkpoint), a checkpoint folder, a LoRA .safetensors, or base (no LoRA)
    checkpoints: tuple[str, ...] = ("base",)
    model: str | None = None  # tiny | sd15 | sd15-random | a diffusers folder; default: the checkpoints' training model, else sd15
    model_seed: int | None = None  # init seed of a random base (tiny, sd15-random); default: the checkpoints' --seed, else 0
    prompts: str = "unseen-animals"  # unseen-animals | animals | animal-activities | drawbench[:Category,...] | file
    samples_per_prompt: int = 8  # samples (seeds) per prompt; the grid's columns
    seed: int = 0  # evaluation seed: sample j of prompt i gets the same noise for every checkpoint
    num_steps: int | None = None  # DDIM steps; default: the checkpoints' training value, else 50
    eta: float | None = None  # DDIM eta; default: the checkpoints' training value (DDPO 1.0, AlignProp 0.0), else 0.0
    guidance_scale: float | None = None  # fixed CFG scale; default: the checkpoints' training w_high, else 7.5
    batch_size: int = 8  # samples per sampling batch (the noise depends on it: keep it fixed across evaluations)
    rewards: tuple[RewardName, ...] = ("aesthetic",)  # registered rewards to score with
    reward_tiny: bool = False  # small random reward models and CLIP, offline (tests / CPU smoke runs)
    reward_weights: tuple[str, ...] = ()  # NAME=PATH per reward whose weights come from a local file/folder
    diversity: bool = True  # per-prompt diversity from CLIP ViT-L/14 image embeddings
    clip_weights: str | None = None  # local open_clip ViT-L-14 checkpoint for the diversity CLIP
    grid_prompts: int = 8  # prompts (rows) shown in each image grid
    out: str = "eval"  # output folder
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # frozen weights' dtype (auto: bfloat16 on a GPU, float32 on a CPU; the LoRA stays float32)


def parse_reward_weights(specs: tuple[str, ...], names: tuple[str, ...]) -> dict[str, str]:
    """--reward-weights NAME=PATH ... -> {NAME: PATH}, each NAME among --rewards."""
    weights = dict(s.split("=", 1) for s in specs if "=" in s)
    if len(weights) != len(specs) or not set(weights) <= set(names):
        raise ConfigError(f"--reward-weights {' '.join(specs)}: expected NAME=PATH with NAME among --rewards {list(names)}.")
    return weights


def find_weights(path: str) -> str | None:
    """The LoRA weights file a --checkpoints PATH names: the .safetensors file itself, the weights in a
    checkpoint folder, or those of a run folder's newest checkpoint; None when there are none."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return path
    if os.path.isfile(os.path.join(path, lora.WEIGHT_NAME)):
        return os.path.join(path, lora.WEIGHT_NAME)
    ckpt = scaffold.latest_checkpoint(path) if os.path.isdir(path) else None
    weights = os.path.join(ckpt, lora.WEIGHT_NAME) if ckpt else None
    return weights if weights and os.path.isfile(weights) else None


def expand_checkpoints(specs) -> list[str]:
    """Glob patterns in --checkpoints expanded here (the shell leaves LABEL=runs/x-* alone): each match keeps
    the label, suffixed by the folder's name when a pattern matches several ('tuned=runs/a-*' ->
    'tuned-a-s0=runs/a-s0', ...). A log file beside the run folders is skipped, and so is a matched folder
    without a checkpoint (a failed run), printing one line. A pattern left with no match fails naming it."""
    out = []
    for spec in specs:
        label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        if not glob.has_magic(path):
            out.append(spec)
            continue
        found = sorted(m for m in glob.glob(path) if os.path.isdir(m) or m.endswith(".safetensors"))
        usable = common.usable_matches(f"--checkpoints {spec}", path, found, find_weights, "run or checkpoint",
                                       "LoRA weights")
        for m in usable:
            name = label if not label or len(usable) == 1 else f"{label}-{os.path.basename(m.rstrip('/'))}"
            out.append(f"{name}={m}" if name else m)
    return out


def resolve_checkpoint(spec: str) -> tuple[str, str | None]:
    """'[LABEL=]PATH' -> (label, LoRA weights file, or None for 'base'). Fails naming the path."""
    label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    if path == "base":
        return label or "base", None
    weights = find_weights(path)
    if weights is None:
        raise ConfigError(
            f"--checkpoints {spec}: no LoRA checkpoint at {path} (expected 'base', a run folder with "
            f"checkpoints/NNNNNN/{lora.WEIGHT_NAME}, a checkpoint folder, or the .safetensors file).")
    if not label:  # runs/NAME -> NAME; runs/NAME/checkpoints/000040 -> NAME-000040
        folder = os.path.dirname(os.path.abspath(weights))
        run, parent = os.path.dirname(os.path.dirname(folder)), os.path.basename(os.path.dirname(folder))
        label = f"{os.path.basename(run)}-{os.path.basename(folder)}" if parent == "checkpoints" \
            else os.path.basename(folder)
    return label, weights


def training_config(weights: str | None) -> dict:
    """The trainer's config stored beside a checkpoint (meta.json), or {} (base, bare LoRA files)."""
    meta = os.path.join(os.path.dirname(weights), "meta.json") if weights else ""
    if not os.path.isfile(meta):
        return {}
    with open(meta) as f:
        return json.load(f).get("config", {})


def from_training(value, configs: list[dict], key: str, fallback, flag: str):
    """An explicit flag wins; else the value all checkpoints were trained with (dotted key), else fallback."""
    if value is not None:
        return value
    found = {json.dumps(v) for c in configs if (v := config_value(c, key)) is not None}
    if len(found) > 1:
        raise ConfigError(f"{flag}: the checkpoints were trained with different values ({', '.join(sorted(found))}); "
                         f"pass {flag} to score them under one setting.")
    return json.loads(found.pop()) if found else fallback


def resolve_checkpoints(cfg) -> tuple[list[tuple[str, str | None]], str, int, dict]:
    """--checkpoints -> (label, weights) each (labels must differ), and the settings left unset taken from
    their training configs: -> (checkpoints, model, model seed, {num_steps, eta, guidance_scale})."""
    checkpoints = [resolve_checkpoint(s) for s in expand_checkpoints(cfg.checkpoints)]
    labels = [label for label, _ in checkpoints]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--checkpoints: labels {labels} repeat; name them LABEL=PATH.")
    configs = [training_config(w) for _, w in checkpoints]
    model = from_training(cfg.model, configs, "model", "sd15", "--model")
    random_base = model in ("tiny", "sd15-random")  # the trainers build these from their --seed
    model_seed = from_training(cfg.model_seed, configs if random_base else [], "seed", 0, "--model-seed")
    return checkpoints, model, model_seed, dict(
        num_steps=from_training(cfg.num_steps, configs, "sample.num_steps", 50, "--num-steps"),
        eta=from_training(cfg.eta, configs, "sample.eta", 0.0, "--eta"),
        guidance_scale=from_training(cfg.guidance_scale, configs, "sample.guidance_scale", 7.5,
                                     "--guidance-scale"))


def load_models_and_rewards(cfg, model: str, model_seed: int, reward_weights: dict):
    """-> (models, {reward name: reward function}, device, dtype) for --device, --dtype and --rewards."""
    device = common.resolve_device(cfg.device)
    dtype = common.resolve_dtype(cfg.dtype, device)
    models = diffusion.load_models(model, device=device, dtype=dtype, seed=model_seed)
    reward_fns = {name: rewards.make_reward(name, device, dtype, tiny=cfg.reward_tiny,
                                            weights=reward_weights.get(name)) for name in cfg.rewards}
    return models, reward_fns, device, dtype


def lora_applied(unet, weights: str):
    """lora.applied: LoRA layers shaped as `weights` says, loaded, and taken out again on exit, so one base
    UNet serves every checkpoint. A file that is unreadable or holds no LoRA fails here, naming it."""
    try:
        lora.read_settings(weights)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--checkpoints: {e}") from e
    return lora.applied(unet, weights)


def score_checkpoint(models, prompts, reward_fns: dict, embedder, samples_per_prompt, num_steps, eta,
                     guidance_scale, seed, batch_size, grid_prompts: int):
    """Samples every prompt x seed with the current UNet, scores each reward and the diversity.
    -> (result dict, grid images (min(P, grid_prompts) * N, 3, H, W), their labels: prompt and first reward)."""
    N = samples_per_prompt
    scores = {name: [] for name in reward_fns}
    embeddings, grid, labels = [], [], []
    for prompt_idx, images in sample_batches(models, prompts, N, num_steps, eta, guidance_scale, seed, batch_size):
        texts = [prompts[i].text for i in prompt_idx]
        with torch.no_grad():
            for name, fn in reward_fns.items():
                scores[name].append(fn(images, texts).float().cpu())
        if embedder is not None:
            embeddings.append(embed_images(images, embedder, batch_size))
        shown = [k for k, i in enumerate(prompt_idx) if i < grid_prompts]
        grid += [images[k].cpu() for k in shown]
        first = scores[next(iter(scores))][-1] if scores else None  # the batch's values of the first reward (b,)
        labels += plots.grid_labels([texts[k] for k in shown], first[shown] if first is not None else None)
    result = {"rewards": {}}
    for name, chunks in scores.items():
        values = torch.cat(chunks).view(len(prompts), N)  # prompt-major, as sampled
        result["rewards"][name] = {**stats(values), "per_prompt": [
            {"prompt": p.text, **stats(v)} for p, v in zip(prompts, values)]}
    if embedder is not None and N >= 2:
        emb = torch.cat(embeddings).view(len(prompts), N, -1)
        per_prompt = [diversity(e) for e in emb]  # by index, not text: prompt sets may repeat a text
        result["diversity"] = {"mean": sum(per_prompt) / len(per_prompt),
                               "per_prompt": [{"prompt": p.text, "diversity": d} for p, d in zip(prompts, per_prompt)]}
    return result, torch.stack(grid) if grid else torch.empty(0), labels


def score(cfg: ScoreConfig) -> dict:
    # ---- everything that can fail on a typo fails before any model loads
    checkpoints, model, model_seed, trained = resolve_checkpoints(cfg)
    prompts = diffusion.load_prompts(cfg.prompts)
    reward_weights = parse_reward_weights(cfg.reward_weights, cfg.rewards)
    if cfg.samples_per_prompt < 1 or cfg.batch_size < 1:
        raise ConfigError("--samples-per-prompt and --batch-size must be >= 1.")
    settings = dict(
        model=model, model_seed=model_seed, prompts=cfg.prompts, num_prompts=len(prompts),
        samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed, batch_size=cfg.batch_size, **trained,
        dtype=cfg.dtype)
    print0("score: " + ", ".join(f"{k} {v}" for k, v in settings.items()))

    # ---- models
    models, reward_fns, device, dtype = load_models_and_rewards(cfg, model, model_seed, reward_weights)
    embedder = rewards.clip_image_embedder(device, dtype, tiny=cfg.reward_tiny, weights=cfg.clip_weights) \
        if cfg.diversity else None
    os.makedirs(cfg.out, exist_ok=True)

    # ---- each checkpoint on the same prompts and seeds
    sampling = {k: settings[k] for k in ("samples_per_prompt", "num_steps", "eta", "guidance_scale", "seed", "batch_size")}
    results = {"settings": settings, "checkpoints": {}}
    for label, path in checkpoints:
        with lora_applied(models.unet, path) if path else contextlib.nullcontext():
            result, grid, grid_labels = score_checkpoint(models, prompts, reward_fns, embedder,
                                                         grid_prompts=cfg.grid_prompts, **sampling)
        results["checkpoints"][label] = {"path": path, **result}
        if len(grid):
            grid_path = os.path.join(cfg.out, f"grid_{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png")
            title = label + (f"  (r = {cfg.rewards[0]})" if cfg.rewards else "")
            plots.save_grid(grid, grid_path, nrow=cfg.samples_per_prompt, labels=grid_labels, title=title)
        line = " | ".join(f"{name} {r['mean']:.4g}±{r['sem']:.2g}" for name, r in result["rewards"].items())
        print0(f"{label} | {line}" + (f" | diversity {result['diversity']['mean']:.3g}" if "diversity" in result else ""))

    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(jsonable(results), f, indent=1)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(markdown_table(results))
    print0(f"wrote {cfg.out}/results.json, table.md and grid_*.png")
    return results


def markdown_table(results: dict) -> str:
    """One row per checkpoint: each reward as mean ± standard error over all samples, and the mean diversity."""
    s = results["settings"]
    names = list(next(iter(results["checkpoints"].values()))["rewards"])
    has_div = any("diversity" in r for r in results["checkpoints"].values())
    head = ["checkpoint"] + names + (["diversity"] if has_div else [])
    lines = [f"Prompts `{s['prompts']}` ({s['num_prompts']}), {s['samples_per_prompt']} samples each (seed {s['seed']}), "
             f"model {s['model']}, {s['num_steps']} DDIM steps, eta {s['eta']}, guidance {s['guidance_scale']}. "
             "Rewards: mean ± standard error over all samples"
             + ("; diversity: mean pairwise CLIP cosine distance within a prompt." if has_div else "."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results["checkpoints"].items():
        cells = [f"{r['rewards'][n]['mean']:.4g} ± {r['rewards'][n]['sem']:.2g}" for n in names]
        if has_div:
            cells.append(f"{r['diversity']['mean']:.3g}" if "diversity" in r else "-")
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# sample: a few images of a few prompts from each checkpoint, side by side, to look at


@dataclass(frozen=True)
class SampleConfig:
    """Sample images of some prompts from several checkpoints with the same seeds, into one labelled grid per prompt."""
    # each: a prompt set (animals | unseen-animals | animal-activities | drawbench[:Category,...]), a .txt/.csv
    # file, or else a literal prompt: anything that is neither a prompt set nor an existing file is the prompt itself
    prompts: tuple[str, ...] = ()
    # [LABEL=]PATH each, as for score: a run folder (newest checkpoint), a checkpoint folder, a LoRA .safetensors, or base; the grids' rows
    checkpoints: tuple[str, ...] = ("base",)
    seeds: tuple[int, ...] = (4,)  # one number N: the seeds first-seed .. first-seed + N - 1; several: those seeds; the grids' columns
    first_seed: int = 0  # where a count of --seeds starts
    model: str | None = None  # tiny | sd15 | sd15-random | a diffusers folder; default: the checkpoints' training model, else sd15
    model_seed: int | None = None  # init seed of a random base (tiny, sd15-random); default: the checkpoints' --seed, else 0
    num_steps: int | None = None  # DDIM steps; default: the checkpoints' training value, else 50
    eta: float | None = None  # DDIM eta; default: the checkpoints' training value (DDPO 1.0, AlignProp 0.0), else 0.0
    guidance_scale: float | None = None  # fixed CFG scale; default: the checkpoints' training w_high, else 7.5
    rewards: tuple[RewardName, ...] = ()  # score every image with these rewards and show the values under it
    reward_tiny: bool = False  # small random reward models, offline (tests / CPU smoke runs)
    reward_weights: tuple[str, ...] = ()  # NAME=PATH per reward whose weights come from a local file/folder
    out: str = "samples"  # output folder: one PNG per prompt and samples.json
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # frozen weights' dtype (auto: bfloat16 on a GPU, float32 on a CPU; the LoRA stays float32)


def resolve_prompts(specs: tuple[str, ...]) -> list[Prompt]:
    """--prompts entries -> prompts, in order, each text once. A prompt set or an existing file is loaded
    (load_prompts); a missing .txt/.csv fails naming it; anything else is a literal prompt, taken as typed."""
    prompts = []
    for spec in specs:
        if spec.partition(":")[0] in diffusion.PROMPT_SETS or os.path.isfile(spec) or spec.endswith((".txt", ".csv")):
            prompts += diffusion.load_prompts(spec)
        elif spec.strip():
            prompts.append(Prompt(spec.strip(), (spec.strip(),)))
    prompts = list({p.text: p for p in prompts}.values())  # each text once, where it first appears
    if not prompts:
        raise ConfigError("--prompts: give at least one prompt set, prompt file or prompt, e.g. "
                         "--prompts 'a dolphin riding a bike' unseen-animals.")
    return prompts


def resolve_seeds(seeds: tuple[int, ...], first_seed: int = 0) -> list[int]:
    """(N,) -> first_seed .. first_seed + N - 1; several numbers -> those seeds."""
    if len(seeds) == 1:
        if seeds[0] < 1:
            raise ConfigError(f"--seeds {seeds[0]}: one number is a count of seeds and must be >= 1.")
        return list(range(first_seed, first_seed + seeds[0]))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: give a count N, or several different seeds.")
    return list(seeds)


def slug(text: str, taken: set) -> str:
    """A file name for a prompt: lower-case words joined by '-', at most 80 characters, unique in `taken`."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80].strip("-") or "prompt"
    name, k = base, 2
    while name in taken:  # a prompt set may repeat a text, and punctuation-only differences collide
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


@torch.no_grad()
def sample_seeds(models: diffusion.Models, text: str, seeds: list[int], num_steps: int, eta: float,
                 guidance_scale: float) -> torch.Tensor:
    """Images (S, 3, H, W) in [0, 1], on the models' device, of one plain prompt with the UNet as it is,
    one per seed. Each image is sampled alone from a generator seeded with its seed (on the CPU, so the
    device does not matter): it depends on the weights, prompt, seed and settings only, so every checkpoint
    starts from the same noise, and a seed gives the same image whatever other seeds are asked for."""
    was_training = models.unet.training
    models.unet.eval()
    try:
        cond, uncond = diffusion.encode_text(models, [text]), diffusion.encode_text(models, [""])  # (1, 77, D) each
        return torch.cat([diffusion.sample(models, cond, uncond, guidance_scale, num_steps, eta,
                                           torch.Generator().manual_seed(s)).images for s in seeds])
    finally:
        models.unet.train(was_training)


def sample(cfg: SampleConfig) -> dict:
    # ---- everything that can fail on a typo fails before any model loads
    prompts = resolve_prompts(cfg.prompts)
    seeds = resolve_seeds(cfg.seeds, cfg.first_seed)
    if not cfg.checkpoints:
        raise ConfigError("--checkpoints: give at least one, e.g. --checkpoints base tuned=runs/NAME.")
    checkpoints, model, model_seed, sampling = resolve_checkpoints(cfg)
    labels = [label for label, _ in checkpoints]
    reward_weights = parse_reward_weights(cfg.reward_weights, cfg.rewards)
    settings = dict(model=model, model_seed=model_seed, **sampling, dtype=cfg.dtype)
    print0(f"sample: {len(prompts)} prompts x {len(checkpoints)} checkpoints x {len(seeds)} seeds, "
           + ", ".join(f"{k} {v}" for k, v in settings.items()))

    # ---- models
    models, reward_fns, _, _ = load_models_and_rewards(cfg, model, model_seed, reward_weights)
    os.makedirs(cfg.out, exist_ok=True)

    # ---- one grid per prompt: rows checkpoints, columns seeds
    summary = {"settings": settings, "seeds": seeds, "checkpoints": dict(checkpoints), "prompts": []}
    taken = set()
    for prompt in prompts:
        images, tile_labels, scores = [], [], {}
        for label, path in checkpoints:
            with lora_applied(models.unet, path) if path else contextlib.nullcontext():
                x = sample_seeds(models, prompt.text, seeds, **sampling)  # (S, 3, H, W)
            with torch.no_grad():
                scores[label] = {name: fn(x, [prompt.text] * len(x)).float().cpu().tolist()
                                 for name, fn in reward_fns.items()}  # {reward: [S values]}
            images.append(x.cpu())
            # under each tile its seed and, when scored, its rewards ('r' when there is one, named in the title)
            for j, s in enumerate(seeds):
                values = " ".join(f"{name if len(reward_fns) > 1 else 'r'}={common.fmt(v[j])}" for name, v in scores[label].items())
                tile_labels.append(f"seed {s}\n{values}" if values else f"seed {s}")
        path = os.path.join(cfg.out, slug(prompt.text, taken) + ".png")
        title = prompt.text + (f"  (r = {cfg.rewards[0]})" if len(reward_fns) == 1 else "")
        plots.save_grid(torch.cat(images), path, nrow=len(seeds), labels=tile_labels, row_labels=labels, title=title)
        summary["prompts"].append({"prompt": prompt.text, "grid": os.path.basename(path),
                                   **({"rewards": scores} if reward_fns else {})})
        means = "".join(f" | mean {name}: " + ", ".join(f"{label} {sum(s[name]) / len(seeds):.4g}" for label, s in scores.items())
                        for name in reward_fns)
        print0(f"wrote {path}: {prompt.text!r}{means}")

    with open(os.path.join(cfg.out, "samples.json"), "w") as f:
        json.dump(jsonable(summary), f, indent=1)
    print0(f"wrote {os.path.join(cfg.out, 'samples.json')}")
    return summary


# -----------------------------------------------------------------------------
# Command line


def cli(args=None):
    commands = {"score": ScoreConfig, "sample": SampleConfig}
    return tyro.extras.subcommand_cli_from_dict(commands, args=args, description=__doc__.split("\n\n")[0].strip())


def main(args=None, cfg=None):
    cfg = cfg or cli(args)
    return {ScoreConfig: score, SampleConfig: sample}[type(cfg)](cfg)


if __name__ == "__main__":
    scaffold.run_cli(lambda cfg: main(cfg=cfg), cli)
