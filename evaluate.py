"""
Evaluation of reward fine-tuning runs. The paper's claims are curves of reward
against the number of reward queries, DiffExp against the baseline, and scores on held-out prompts;
score and compare produce exactly these, and sample shows the images behind the numbers.

    # score checkpoints on held-out prompts: the same seeds for every checkpoint, plain prompts, fixed CFG
    python evaluate.py score --checkpoints base diffexp=runs/ddpo-sd15-aesthetic-20260101-120000 \
        --prompts unseen-animals --samples-per-prompt 16 --rewards aesthetic pickscore --out eval/unseen
    python evaluate.py score --model tiny --checkpoints base runs/ddpo-tiny-20260101-120000 \
        --prompts animals --samples-per-prompt 4 --rewards jpeg-compressibility brightness --out eval/tiny

    # 8 images of each prompt from each checkpoint (the same 8 seeds for all), one labelled grid per prompt
    python evaluate.py sample --checkpoints base tuned=runs/ddpo-sd15-aesthetic-20260101-120000 \
        --prompts "a dolphin riding a bike" "a cat" --seeds 8 --rewards aesthetic --out samples/
    python evaluate.py sample --checkpoints base runs/alignprop-toy-20260101-120000 \
        --prompts prompts/toy_heldout.txt "a red circle" --seeds 0 7 42 --rewards toy-classifier --out samples/toy

    # reward vs reward queries, mean and band over seeds, and sample efficiency against a baseline
    python evaluate.py compare --groups 'diffexp=runs/ddpo-aes-s*' 'baseline=runs/ddpo-aes-base-s*' --out compare.png

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

compare writes OUT (a PNG) and OUT with .json: per group the final reward (mean ± std over runs) and
the reward queries needed to reach a fraction of the baseline's improvement (see sample_efficiency).

The trainers call heldout_score (held-out prompts with the current LoRA) and diversity_by_prompt.
Sections: diversity | sampling with fixed seeds | score | sample | compare | command line.
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
from safetensors import safe_open

import common
import scaffold
import plots
import diffusion
import lora
import rewards
from common import ConfigError, print0
from diffusion import Prompt
from rewards import RewardName

# -----------------------------------------------------------------------------
# Evaluation settings of the trainers (--eval.*)

@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # epochs between evaluations with fixed seeds, plain prompts and w_high (0: never); also before training
    plain: bool = True  # evaluate the training prompts too (plain_reward_*): the plain policy's reward, unbiased by exploration
    prompts: str = "unseen-animals"  # the held-out prompt set (heldout_reward_*)
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
                  batch_size: int = 8, embedder=None, prefix: str = "heldout") -> dict:
    """Reward of the CURRENT UNet on held-out prompts, for the trainers' metrics records:
    {prefix_reward_mean, prefix_reward_std, prefix_reward_sem, prefix_samples} and, with a CLIP image
    `embedder`, prefix_diversity (diversity_by_prompt). Deterministic for fixed weights and arguments;
    touches neither the global RNG nor any generator of the caller; restores the UNet's train/eval mode."""
    scores, embeddings, texts = [], [], []
    for prompt_idx, images in sample_batches(models, prompts, samples_per_prompt, num_steps, eta,
                                                guidance_scale, seed, batch_size):
        batch_texts = [prompts[i].text for i in prompt_idx]
        with torch.no_grad():
            scores.append(reward_fn(images, batch_texts).float().cpu())
        if embedder is not None:
            embeddings.append(embed_images(images, embedder))
        texts += batch_texts
    s = stats(torch.cat(scores))
    out = {f"{prefix}_reward_mean": s["mean"], f"{prefix}_reward_std": s["std"],
           f"{prefix}_reward_sem": s["sem"], f"{prefix}_samples": s["n"]}
    if embedder is not None:
        out[f"{prefix}_diversity"] = mean_diversity(torch.cat(embeddings), texts)
    return out


def policy_scores(models: diffusion.Models, eval_cfg, train_prompts: list[Prompt], heldout: list[Prompt] | None, reward_fn,
                  num_steps: int, eta: float, guidance_scale: float, seed: int, embedder=None) -> dict:
    """The trainers' evaluation (--eval.*): the current UNet on fixed seeds with plain prompts and w_high, on the
    training prompts (plain_reward_*: the reward of the policy itself, which the training samples' reward
    understates while DiffExp explores) and on the held-out prompts (heldout_reward_*)."""
    out = {}
    if eval_cfg.plain:
        out.update(heldout_score(models, train_prompts, reward_fn, eval_cfg.samples_per_prompt, num_steps, eta,
                                 guidance_scale, seed, eval_cfg.batch_size, None, prefix="plain"))
    if heldout:
        out.update(heldout_score(models, heldout, reward_fn, eval_cfg.samples_per_prompt, num_steps, eta,
                                 guidance_scale, seed, eval_cfg.batch_size, embedder))
    return out


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


def expand_checkpoints(specs) -> list[str]:
    """Glob patterns in --checkpoints expanded here (the shell leaves LABEL=runs/x-* alone): each match keeps
    the label, suffixed by the folder's name when a pattern matches several ('tuned=runs/a-*' ->
    'tuned-a-s0=runs/a-s0', ...). A log file beside the run folders is skipped."""
    out = []
    for spec in specs:
        label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        if not glob.has_magic(path):
            out.append(spec)
            continue
        found = sorted(m for m in glob.glob(path) if os.path.isdir(m) or m.endswith(".safetensors"))
        if not found:
            raise ConfigError(f"--checkpoints {spec}: the pattern {path!r} matches no run or checkpoint.")
        for m in found:
            name = label if not label or len(found) == 1 else f"{label}-{os.path.basename(m.rstrip('/'))}"
            out.append(f"{name}={m}" if name else m)
    return out


def resolve_checkpoint(spec: str) -> tuple[str, str | None]:
    """'[LABEL=]PATH' -> (label, LoRA weights file, or None for 'base'). Fails naming the path."""
    label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    if path == "base":
        return label or "base", None
    if os.path.isfile(path) and path.endswith(".safetensors"):
        weights = path
    elif os.path.isfile(os.path.join(path, lora.WEIGHT_NAME)):
        weights = os.path.join(path, lora.WEIGHT_NAME)
    else:
        ckpt = scaffold.latest_checkpoint(path) if os.path.isdir(path) else None
        weights = os.path.join(ckpt, lora.WEIGHT_NAME) if ckpt else None
        if weights is None or not os.path.isfile(weights):
            raise ConfigError(
                f"--checkpoints {spec}: no LoRA checkpoint at {path} (expected 'base', a run folder with "
                f"checkpoints/NNNNNN/{lora.WEIGHT_NAME}, a checkpoint folder, or the .safetensors file).")
    if not label:  # runs/NAME -> NAME; runs/NAME/checkpoints/000040 -> NAME-000040
        folder = os.path.dirname(os.path.abspath(weights))
        run, parent = os.path.dirname(os.path.dirname(folder)), os.path.basename(os.path.dirname(folder))
        label = f"{os.path.basename(run)}-{os.path.basename(folder)}" if parent == "checkpoints" else os.path.basename(folder)
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
    found = {json.dumps(v) for c in configs if (v := _get(c, key)) is not None}
    if len(found) > 1:
        raise ConfigError(f"{flag}: the checkpoints were trained with different values ({', '.join(sorted(found))}); "
                         f"pass {flag} to score them under one setting.")
    return json.loads(found.pop()) if found else fallback


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


@contextlib.contextmanager
def lora_applied(unet, weights: str):
    """Injects LoRA layers shaped as in `weights` (rank, alpha, wrapped modules: read from the file), loads
    them, and on exit puts the original nn.Linear layers back, so one base UNet serves every checkpoint."""
    with safe_open(weights, framework="pt") as f:
        keys, metadata = [k for k in f.keys() if k.endswith(".lora_A.weight")], f.metadata() or {}
        if not keys:
            raise ConfigError(f"--checkpoints: {weights} holds no LoRA tensors (*.lora_A.weight).")
        rank = f.get_slice(keys[0]).get_shape()[0]  # lora_A is (rank, in_features)
    alpha = json.loads(metadata.get("lora_adapter_metadata", "{}")).get("unet.lora_alpha", rank)
    # targets are matched by name suffix: the module's last name part, two when it is an index (to_out.0);
    # lora.load below checks that exactly the file's modules were wrapped
    modules = [k[len("unet."): -len(".lora_A.weight")] for k in keys]
    targets = sorted({".".join(m.split(".")[-2:]) if m.split(".")[-1].isdigit() else m.split(".")[-1] for m in modules})
    lora.inject(unet, targets, rank, alpha)
    try:
        lora.load(unet, weights)
        yield unet
    finally:
        for name, layer in lora.lora_layers(unet).items():
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, layer.base)


def _jsonable(x):
    """nan -> None, so results.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


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
    checkpoints = [resolve_checkpoint(s) for s in expand_checkpoints(cfg.checkpoints)]
    labels = [label for label, _ in checkpoints]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--checkpoints: labels {labels} repeat; name them LABEL=PATH.")
    prompts = diffusion.load_prompts(cfg.prompts)
    reward_weights = parse_reward_weights(cfg.reward_weights, cfg.rewards)
    if cfg.samples_per_prompt < 1 or cfg.batch_size < 1:
        raise ConfigError("--samples-per-prompt and --batch-size must be >= 1.")
    configs = [training_config(w) for _, w in checkpoints]
    model = from_training(cfg.model, configs, "model", "sd15", "--model")
    random_base = model in ("tiny", "sd15-random")  # the trainers build these from their --seed
    model_seed = from_training(cfg.model_seed, configs if random_base else [], "seed", 0, "--model-seed")
    settings = dict(
        model=model, model_seed=model_seed, prompts=cfg.prompts, num_prompts=len(prompts),
        samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed, batch_size=cfg.batch_size,
        num_steps=from_training(cfg.num_steps, configs, "sample.num_steps", 50, "--num-steps"),
        eta=from_training(cfg.eta, configs, "sample.eta", 0.0, "--eta"),
        guidance_scale=from_training(cfg.guidance_scale, configs, "sample.guidance_scale", 7.5, "--guidance-scale"),
        dtype=cfg.dtype)
    print0("score: " + ", ".join(f"{k} {v}" for k, v in settings.items()))

    # ---- models
    device = common.resolve_device(cfg.device)
    dtype = common.resolve_dtype(cfg.dtype, device)
    models = diffusion.load_models(model, device=device, dtype=dtype, seed=model_seed)
    reward_fns = {name: rewards.make_reward(name, device, dtype, tiny=cfg.reward_tiny, weights=reward_weights.get(name))
                  for name in cfg.rewards}
    embedder = rewards.clip_image_embedder(device, dtype, tiny=cfg.reward_tiny, weights=cfg.clip_weights) if cfg.diversity else None
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
        json.dump(_jsonable(results), f, indent=1)
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
    checkpoints = [resolve_checkpoint(s) for s in expand_checkpoints(cfg.checkpoints)]
    labels = [label for label, _ in checkpoints]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--checkpoints: labels {labels} repeat; name them LABEL=PATH.")
    reward_weights = parse_reward_weights(cfg.reward_weights, cfg.rewards)
    configs = [training_config(w) for _, w in checkpoints]
    model = from_training(cfg.model, configs, "model", "sd15", "--model")
    random_base = model in ("tiny", "sd15-random")
    model_seed = from_training(cfg.model_seed, configs if random_base else [], "seed", 0, "--model-seed")
    settings = dict(
        model=model, model_seed=model_seed,
        num_steps=from_training(cfg.num_steps, configs, "sample.num_steps", 50, "--num-steps"),
        eta=from_training(cfg.eta, configs, "sample.eta", 0.0, "--eta"),
        guidance_scale=from_training(cfg.guidance_scale, configs, "sample.guidance_scale", 7.5, "--guidance-scale"),
        dtype=cfg.dtype)
    print0(f"sample: {len(prompts)} prompts x {len(checkpoints)} checkpoints x {len(seeds)} seeds, "
           + ", ".join(f"{k} {v}" for k, v in settings.items()))

    # ---- models
    device = common.resolve_device(cfg.device)
    dtype = common.resolve_dtype(cfg.dtype, device)
    models = diffusion.load_models(model, device=device, dtype=dtype, seed=model_seed)
    reward_fns = {name: rewards.make_reward(name, device, dtype, tiny=cfg.reward_tiny, weights=reward_weights.get(name))
                  for name in cfg.rewards}
    os.makedirs(cfg.out, exist_ok=True)

    # ---- one grid per prompt: rows checkpoints, columns seeds
    sampling = {k: settings[k] for k in ("num_steps", "eta", "guidance_scale")}
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
        json.dump(_jsonable(summary), f, indent=1)
    print0(f"wrote {os.path.join(cfg.out, 'samples.json')}")
    return summary


# -----------------------------------------------------------------------------
# compare: reward curves of several runs per group, and sample efficiency against a baseline


@dataclass(frozen=True)
class CompareConfig:
    """Plot reward against reward queries per group of runs (mean and band over seeds) and measure sample efficiency."""
    # LABEL=RUN[,RUN...] per group; a RUN is a run folder or a glob pattern (quote it: 'runs/ddpo-aes-s*')
    groups: tuple[str, ...]
    baseline: str | None = None  # label of the baseline group; default: the last group
    fraction: float = 0.9  # threshold = r0 + fraction * (r_final - r0) of the baseline's mean curve
    metric: str = "reward_mean"  # metrics.jsonl key on the y axis (records without it are skipped)
    smooth: Literal["none", "ema", "ma"] = "none"  # per-run smoothing before averaging and thresholding
    smooth_window: int = 5  # moving-average window in records; EMA with alpha = 2 / (window + 1)
    band: Literal["std", "minmax"] = "std"  # band around each group's mean curve: ±std or min..max over runs
    out: str = "compare.png"  # the plot; the summary goes to the same name with .json
    title: str = ""


def parse_groups(specs: tuple[str, ...]) -> dict[str, list[str]]:
    """('diffexp=runs/a*,runs/b', ...) -> {'diffexp': [run folders]}; globs expanded to the folders they
    match (a log file beside the run folders, runs/a-s0.log, is skipped), in sorted order."""
    groups = {}
    for spec in specs:
        label, sep, patterns = spec.partition("=")
        if not sep or not label or not patterns:
            raise ConfigError(f"--groups {spec!r}: expected LABEL=RUN[,RUN...] (e.g. 'diffexp=runs/ddpo-s*').")
        if label in groups:
            raise ConfigError(f"--groups: label {label!r} appears twice.")
        runs = []
        for pattern in patterns.split(","):
            found = sorted(filter(os.path.isdir, glob.glob(pattern))) if glob.has_magic(pattern) else [pattern]
            if not found:
                raise ConfigError(f"--groups {label}: the pattern {pattern!r} matches no run folder.")
            runs += found
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
        raise ConfigError(f"--groups: the runs {runs} share no range of reward queries; they cannot be averaged.")
    grid = torch.unique(torch.cat([x for x, _, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    ys = torch.stack([interp(grid, x, s) for x, _, s in curves])  # (runs, grid)
    finals = torch.tensor([y[-1].item() for _, y, _ in curves], dtype=torch.float64)  # raw last records
    return dict(runs=runs, curves=curves, grid=grid, mean=ys.mean(0),
                std=ys.std(0) if len(runs) > 1 else torch.zeros_like(grid), min=ys.min(0).values, max=ys.max(0).values,
                first=sum(y[0].item() for _, y, _ in curves) / len(curves),
                final_mean=finals.mean().item(), final_std=finals.std().item() if len(runs) > 1 else 0.0)


def bootstrap_ratio(a: list[float], b: list[float], n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) and its 95% percentile-bootstrap interval: both samples resampled with replacement,
    independently (the runs of two arms are independent), n times."""
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    ia, ib = torch.randint(len(a), (n, len(a)), generator=g), torch.randint(len(b), (n, len(b)), generator=g)
    ratios = a_t[ia].mean(1) / b_t[ib].mean(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return (a_t.mean() / b_t.mean()).item(), lo, hi


def sample_efficiency(groups: dict[str, dict], baseline: str, fraction: float) -> dict:
    """Reward queries each group needs to reach threshold = r0 + fraction * (r_final - r0), where r0 is the
    baseline's first-record reward (mean over its runs) and r_final the last point of the baseline's mean
    curve. Measuring the improvement over r0, not a fraction of r_final itself, keeps the definition
    meaningful for negative rewards (JPEG compressibility) and for offsets (aesthetic starts near 5).
    Queries are read off each group's mean curve (speedup = baseline queries / group queries) and off each
    run's own curve. Per run, a run that never reaches the threshold counts at its last record's queries
    (a lower bound: it needs at least that many; counted in `not_reached`). `speedup_per_run` = mean over
    the baseline's runs / mean over the group's runs, with a bootstrap 95% interval over runs (seeds).
    Undefined (None) when the baseline did not improve."""
    base = groups[baseline]
    r0, r_final = base["first"], base["mean"][-1].item()
    threshold = r0 + fraction * (r_final - r0) if r_final > r0 else None
    base_q = queries_to_reach(base["grid"], base["mean"], threshold) if threshold is not None else None
    summary = {"baseline": baseline, "fraction": fraction, "r0": r0, "r_final": r_final, "threshold": threshold, "groups": {}}

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
            "speedup_per_run": ratio[0] if ratio else None, "speedup_ci95": list(ratio[1:]) if ratio else None}
    return summary


def plot_groups(groups: dict[str, dict], summary: dict, cfg: CompareConfig, ylabel: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for label, g in groups.items():
        lo, hi = (g["mean"] - g["std"], g["mean"] + g["std"]) if cfg.band == "std" else (g["min"], g["max"])
        line, = ax.plot(g["grid"], g["mean"], label=f"{label} ({len(g['runs'])} run{'s' * (len(g['runs']) > 1)})")
        ax.fill_between(g["grid"], lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        q = summary["groups"][label]["queries_to_threshold"]
        if q is not None:
            ax.plot([q], [summary["threshold"]], "o", color=line.get_color(), ms=5)
    if summary["threshold"] is not None:
        ax.axhline(summary["threshold"], color="gray", ls="--", lw=0.8,
                   label=f"{cfg.fraction:g} of {summary['baseline']}'s improvement")
    ax.set_xlabel("reward queries (generated training samples)")
    ax.set_ylabel(ylabel + (f" ({cfg.smooth}, window {cfg.smooth_window})" if cfg.smooth != "none" else ""))
    ax.set_title(cfg.title or f"mean over runs, band: {'±std' if cfg.band == 'std' else 'min-max'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cfg.out)
    plt.close(fig)


def compare(cfg: CompareConfig) -> dict:
    runs = parse_groups(cfg.groups)
    baseline = cfg.baseline or list(runs)[-1]
    if baseline not in runs:
        raise ConfigError(f"--baseline {baseline}: not one of the group labels {list(runs)}.")
    if not 0 < cfg.fraction <= 1:
        raise ConfigError(f"--fraction {cfg.fraction}: must lie in (0, 1].")
    groups = {label: group_curves(r, cfg.metric, cfg.smooth, cfg.smooth_window) for label, r in runs.items()}
    summary = sample_efficiency(groups, baseline, cfg.fraction)
    summary.update(metric=cfg.metric, smooth=cfg.smooth, smooth_window=cfg.smooth_window)

    # the reward's name for the y axis, when all runs were trained on the same one
    names = set()
    for run in sum(runs.values(), []):
        if os.path.isfile(path := os.path.join(run, "config.json")):
            with open(path) as f:
                names.add(_get(json.load(f), "reward.name"))
    ylabel = f"{cfg.metric} ({names.pop()})" if len(names) == 1 and None not in names else cfg.metric
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    plot_groups(groups, summary, cfg, ylabel)
    with open(os.path.splitext(cfg.out)[0] + ".json", "w") as f:
        json.dump(_jsonable(summary), f, indent=1)

    smoothing = f", curves smoothed ({cfg.smooth}, window {cfg.smooth_window})" if cfg.smooth != "none" else ""
    if summary["threshold"] is None:
        print0(f"baseline {baseline} did not improve on its first record ({summary['r0']:.4g} -> "
               f"{summary['r_final']:.4g}): queries-to-threshold is undefined.")
    else:
        print0(f"threshold {summary['threshold']:.4g} = r0 {summary['r0']:.4g} + {cfg.fraction:g} x (r_final "
               f"{summary['r_final']:.4g} - r0), from baseline {baseline}{smoothing}")
    print0(f"{'group':<16} {'runs':>4}  {'final ' + cfg.metric:<24} {'queries to threshold':>20} {'speedup':>8}  "
           f"{'per run: mean queries (not reached)':>36} {'speedup, 95% CI over runs':>28}")
    for label, s in summary["groups"].items():
        q = "not reached" if s["queries_to_threshold"] is None else f"{s['queries_to_threshold']:.0f}"
        speed = "-" if s["speedup"] is None else f"{s['speedup']:.2f}x"
        runs_q = s["queries_to_threshold_per_run"]
        per_run = "-" if runs_q is None else f"{sum(runs_q) / len(runs_q):.0f} ({s['not_reached']})"
        ci = "-" if s["speedup_per_run"] is None else f"{s['speedup_per_run']:.2f}x [{s['speedup_ci95'][0]:.2f}, {s['speedup_ci95'][1]:.2f}]"
        print0(f"{label:<16} {len(s['runs']):>4}  {s['final_mean']:<.4g} ± {s['final_std']:<15.3g} {q:>20} {speed:>8}  {per_run:>36} {ci:>28}")
    print0(f"wrote {cfg.out} and {os.path.splitext(cfg.out)[0]}.json")
    return summary


# -----------------------------------------------------------------------------
# Command line


def cli(args=None):
    commands = {"score": ScoreConfig, "sample": SampleConfig, "compare": CompareConfig}
    return tyro.extras.subcommand_cli_from_dict(commands, args=args, description=__doc__.split("\n\n")[0].strip())


def main(args=None, cfg=None):
    cfg = cfg or cli(args)
    return {ScoreConfig: score, SampleConfig: sample, CompareConfig: compare}[type(cfg)](cfg)


if __name__ == "__main__":
    scaffold.run_cli(lambda cfg: main(cfg=cfg), cli)
