"""
Run scaffolding shared by the trainers and evaluate.py: the run folder, metrics.jsonl, the reward
plot and image grids, atomic checkpoints, RNG state, and the per-prompt sample picker. No math of
either method lives here; that stays in the trainers, diffusion.py and explore.py.
"""

import copy
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import pickle
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch

import lora


# -----------------------------------------------------------------------------
# Config groups both trainers share

@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 4
    alpha: float = 4.0  # scale = alpha / rank
    targets: tuple[str, ...] = lora.DEFAULT_TARGETS  # nn.Linear name suffixes in the UNet


@dataclass(frozen=True)
class LogConfig:
    grid_every: int = 10  # epochs between PNG grids of samples (and the last epoch)
    save_every: int = 10  # epochs between checkpoints (and the last epoch)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    grid_size: int = 16  # samples shown per grid
    progress: bool = False  # progress bars even when the output is not a terminal (on a terminal they are always on)
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
    wandb_project: str = "diffexp"
    wandb_name: str = ""  # W&B run name; default: the run folder's name
    wandb_tags: tuple[str, ...] = ()
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard (pip install tensorboard)


# -----------------------------------------------------------------------------
# Mistakes in the flags or input files. Every check that a user can fail raises ConfigError with a
# message naming the flag (or file) and the fix; the command line prints that one line and exits with
# status 2, as a mistyped flag does. Anything else is a real crash and keeps its traceback.

class ConfigError(ValueError):
    pass


def check_shared(cfg) -> None:
    """Fails at start-up, naming the flag, on settings both trainers share (each checks its own after this)."""
    checks = [
        (cfg.num_epochs >= 1, f"--num-epochs {cfg.num_epochs}: a run needs at least one epoch."),
        (cfg.sample.num_steps >= 1, f"--sample.num-steps {cfg.sample.num_steps}: a trajectory needs at least one DDIM step."),
        (cfg.sample.guidance_scale >= 0, f"--sample.guidance-scale {cfg.sample.guidance_scale}: must be >= 0 "
                                         "(1: no guidance, 0: unconditional)."),
        (cfg.train.lr > 0, f"--train.lr {cfg.train.lr}: the learning rate must be > 0."),
        (cfg.train.max_grad_norm > 0, f"--train.max-grad-norm {cfg.train.max_grad_norm}: must be > 0."),
        (cfg.lora.rank >= 1, f"--lora.rank {cfg.lora.rank}: must be >= 1."),
        (cfg.lora.alpha > 0, f"--lora.alpha {cfg.lora.alpha}: must be > 0 (the LoRA scale is alpha / rank)."),
        (len(cfg.lora.targets) > 0, "--lora.targets: give at least one nn.Linear name suffix, e.g. to_q to_k to_v to_out.0."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def run_cli(main, parse):
    """main(parse()), with a ConfigError printed once (rank 0) as 'error: ...' and exit status 2."""
    try:
        return main(parse())
    except ConfigError as e:
        print0(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except lora.TargetError as e:  # raised where the model is known, in lora.inject
        print0(f"error: --lora.targets: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def show_progress(log: LogConfig, rank: int) -> bool:
    """Progress bars on process 0, on an interactive terminal (or with --log.progress): in a log file or
    under a cluster's scheduler their carriage-return updates would bury the epoch lines."""
    return rank == 0 and (log.progress or sys.stderr.isatty())


# -----------------------------------------------------------------------------
# Several processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them, one process.

def init_distributed(device: str) -> tuple[int, int, str]:
    """-> (rank, world_size, device). NCCL on GPUs, gloo on CPUs (so a 2-process test runs anywhere)."""
    device = resolve_device(device)
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device if cuda else "cpu"


def all_gather(obj, world_size: int) -> list:
    """Python objects of every rank, in rank order (a one-element list when not distributed)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params, world_size: int):
    """Averages the LoRA gradients over ranks in one all-reduce (they are small)."""
    if world_size == 1:
        return
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def assert_in_sync(params, world_size: int, where: str):
    """Every process must hold the same LoRA weights after an optimizer step (a gradient-sync bug shows
    up here at once instead of as a silently worse model). Compares exact checksums."""
    if world_size == 1:
        return
    checksum = sum(p.detach().double().sum().item() + p.detach().double().abs().sum().item() for p in params)
    sums = all_gather(checksum, world_size)
    if len(set(sums)) != 1:
        raise RuntimeError(f"{where}: the LoRA weights differ between processes (checksums {sums}).")


def barrier(world_size: int):
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()


# -----------------------------------------------------------------------------
# Precision: frozen weights in the compute dtype (load_models), LoRA weights and optimizer state in
# float32 (lora.py), one autocast context around the models' forward passes, and for float16 a gradient
# scaler: small LoRA gradients underflow float16 unless the loss is scaled up before backward.

class Precision:
    def __init__(self, device: str, dtype: torch.dtype):
        self.device_type, self.dtype = torch.device(device).type, dtype
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)

    def autocast(self):
        """Runs the float32 LoRA layers (and anything else in float32) in the compute dtype; off for float32."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()  # loss * scale under float16, the loss itself otherwise

    def step(self, optimizer, params, max_grad_norm: float, world_size: int, where: str) -> float:
        """Averages gradients over processes, unscales, clips, steps, zeroes. -> the gradient norm.
        A non-finite gradient stops the run (FloatingPointError), with one exception: under float16 the
        scaler starts at a large scale (2^16) and finds a workable one by overflowing. Such a step is
        skipped (the scaler halves its scale), and its norm returned as NaN: the trainers log such steps as
        skipped_steps. At a scale of 1 or less an overflow is not the scaling's doing, so that stops the run."""
        average_gradients(params, world_size)
        self.scaler.unscale_(optimizer)  # a no-op when disabled
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        finite = bool(torch.isfinite(grad_norm))
        if not finite and not (self.scaler.is_enabled() and self.scaler.get_scale() > 1):
            raise FloatingPointError(f"{where}: non-finite gradient norm.")
        self.scaler.step(optimizer)  # skips optimizer.step() when the unscaled gradients are not finite
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm.item() if finite else float("nan")

    def state_dict(self) -> dict:
        return self.scaler.state_dict()  # empty unless float16

    def load_state_dict(self, state: dict | None):
        if self.scaler.is_enabled() and state:  # None: a checkpoint without it; {}: saved without float16
            self.scaler.load_state_dict(state)


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


def print0(*args, **kwargs):
    """Prints on rank 0 only (all ranks when not distributed)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def start_run(cfg) -> str:
    """Creates the run folder (see resolve_run_dir), stores and prints the config. -> run folder."""
    run_dir = resolve_run_dir(cfg.run_dir, cfg.resume, cfg.name)
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(to_jsonable(cfg), f, indent=2)
    print0(json.dumps(to_jsonable(cfg), indent=1))
    print0(f"run folder: {run_dir}")
    return run_dir


def resolve_device(device: str) -> str:
    """--device auto -> cuda when a GPU is visible, else cpu; an explicit device is checked here, not deep in torch."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device}: not a device name ({e}); use auto, cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()  # 0 without CUDA
        if count == 0:
            raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu (or auto).")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"--device {device}: only {count} CUDA device(s) visible (cuda:0 to cuda:{count - 1}).")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype values; auto: bfloat16 on a GPU, float32 elsewhere


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """--dtype auto: bfloat16 frozen weights on a GPU (3.3x faster sampling than float32 on an H200; LoRA and
    optimizer state stay float32), float32 on a CPU (the tests' and the toy world's dtype). On a GPU, float32
    matmuls (the LoRA layers outside autocast, a --dtype float32 run) may use TF32 tensor cores."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_run_dir(run_dir: str, resume: str, name: str) -> str:
    """--run-dir if given; else the run folder of the checkpoint to resume; else runs/{name}-{date}."""
    if run_dir:
        return run_dir
    if resume == "auto":
        raise ConfigError("--resume auto: needs --run-dir (the folder to resume from, or to start in when it has no checkpoint).")
    if resume:
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise ConfigError(f"--resume {resume}: no checkpoint there (expected a checkpoint folder with "
                              "state.pt, or a run folder with checkpoints/).")
        return os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def resume_from(resume: str, run_dir: str) -> str:
    """The checkpoint to resume ('' for a fresh start). --resume auto: the newest checkpoint in --run-dir if
    there is one, else a fresh start, so the same command can be resubmitted after a pre-emption."""
    if resume != "auto":
        return resume
    return latest_checkpoint(run_dir) or ""


# -----------------------------------------------------------------------------
# Metrics: one JSON object per line, one line per epoch / step

class Metrics:
    """Appends records to run_dir/metrics.jsonl. On resume, records at or after `start` (by `key`)
    are dropped first: they came from work after the checkpoint, which will be redone. A fresh start
    (start 0) drops all, the evaluation before training (epoch -1) included."""

    def __init__(self, run_dir: str, start: int = 0, key: str = "epoch"):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        old = read_metrics(self.path) if os.path.exists(self.path) and start > 0 else []
        self.records = [r for r in old if r[key] < start]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(self.path + ".tmp", self.path)

    def log(self, record: dict):
        record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}  # strict JSON
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _require(package: str, flag: str):
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"{flag}: the package {package!r} is not installed; `pip install {package}`, "
                          f"or run without {flag}.") from e


class Tracker:
    """Where an epoch's record goes: metrics.jsonl always (Metrics), and when asked Weights & Biases
    (--log.wandb) and TensorBoard (--log.tensorboard): every number of the record as a scalar against
    reward queries (the x axis of the paper's curves; W&B also offers epoch, logged beside it; TensorBoard
    gets a by_epoch/ copy), the sample grid as an image, the config as hyperparameters. Process 0 only.
    A resumed run continues the same W&B run (its id is kept in the run folder); TensorBoard hides the
    events of the redone epochs (purge_step)."""

    def __init__(self, cfg, run_dir: str, start_epoch: int = 0, start_queries: int = 0):
        self.metrics = Metrics(run_dir, start=start_epoch)
        self.wandb = self.tb = None
        config = to_jsonable(cfg)
        if cfg.log.wandb:
            wandb = _require("wandb", "--log.wandb")
            id_file = os.path.join(run_dir, "wandb_id.txt")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else secrets.token_hex(4)
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_name or os.path.basename(os.path.abspath(run_dir)),
                                    tags=list(cfg.log.wandb_tags), config=config, dir=run_dir, id=run_id, resume="allow")
            self.wandb.define_metric("reward_queries")
            self.wandb.define_metric("*", step_metric="reward_queries")
        if cfg.log.tensorboard:
            _require("tensorboard", "--log.tensorboard")
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_queries if start_epoch else None)
            flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in _flatten(config).items()}
            for summary in hparams(flat, {"reward_mean": 0.0}):  # the config in the HPARAMS tab, in this same run
                self.tb.file_writer.add_summary(summary)

    @property
    def records(self) -> list[dict]:
        return self.metrics.records

    def log(self, record: dict, image: str | None = None, caption: str = ""):
        """Appends the record to metrics.jsonl and mirrors it; `image`: a PNG grid to log with it."""
        self.metrics.log(record)
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and v == v}
        if self.wandb:
            import wandb
            extra = {"samples": wandb.Image(image, caption=caption)} if image else {}
            self.wandb.log({**numbers, **extra})
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["reward_queries"])
                self.tb.add_scalar(f"by_epoch/{k}", v, record["epoch"])
            if image:
                import numpy as np
                from PIL import Image
                self.tb.add_image("samples", np.asarray(Image.open(image).convert("RGB")), record["reward_queries"], dataformats="HWC")
            self.tb.flush()

    def close(self):
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()


def nothing_left(cfg, start_epoch: int, run_dir: str) -> bool:
    """True when a resumed run has already finished its --num-epochs: with --resume auto that is nothing to do
    (a resubmitted job ends at once); an explicit --resume of a finished run is a mistake."""
    if start_epoch < cfg.num_epochs:
        return False
    if cfg.resume != "auto":
        raise ConfigError(f"--resume {cfg.resume}: the run has finished its {start_epoch} epochs; raise --num-epochs to train on.")
    print0(f"{run_dir} has finished its {start_epoch} epochs: nothing to do.")
    return True


def start_tracking(cfg, run_dir: str, rank: int, start_epoch: int, reward_queries: int, policy_scores) -> Tracker | None:
    """The Tracker (process 0; None elsewhere). A fresh run with --eval.every first logs the evaluation of the
    model before training: the first point of the plain policy's curve, at 0 reward queries, as epoch -1."""
    if rank != 0:
        return None
    tracker = Tracker(cfg, run_dir, start_epoch, reward_queries)
    if start_epoch == 0 and cfg.eval.every > 0:
        before = {"epoch": -1, "reward_queries": 0, **policy_scores()}
        tracker.log(before)
        print0("before training" + eval_line(before))
    return tracker


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_rewards(records: list[dict], path: str, title: str = ""):
    """The training samples' reward (mean, +-std band) against cumulative reward queries, and, where the run
    evaluates (--eval.every), the plain policy's reward on fixed seeds (training and held-out prompts) -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evaluated = {k: [(r["reward_queries"], r[f"{k}_reward_mean"]) for r in records if r.get(f"{k}_reward_mean") is not None]
                 for k in ("plain", "heldout")}
    records = [r for r in records if r.get("reward_mean") is not None]  # not the evaluation before training
    x = [r["reward_queries"] for r in records]
    mean = [r["reward_mean"] for r in records]
    std = [r["reward_std"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(x, mean, marker="o", ms=3, label="reward (mean over the epoch's samples)")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2, label="± std")
    for k, label in (("plain", "plain policy, training prompts (fixed seeds)"), ("heldout", "plain policy, held-out prompts")):
        if evaluated[k]:
            ax.plot(*zip(*evaluated[k]), marker="s", ms=4, ls="--" if k == "heldout" else "-", label=label)
    explored = [r["reward_queries"] for r in records if r.get("exploring")]
    if explored:
        ax.axvspan(0, max(explored), color="orange", alpha=0.08, label="DiffExp exploration on")
    ax.set_xlabel("reward queries (generated training samples)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# Image grids: tiles upscaled so small images stay visible, each with an optional label in a band under
# it (its prompt and reward, say), an optional label left of each row and an optional title line.

GRID_PAD = 2  # pixels between tiles, as torchvision's make_grid


@functools.lru_cache(maxsize=8)
def grid_font(tile: int):
    """-> (font, line height in px) for labels under tiles `tile` px wide: DejaVu Sans (shipped with
    matplotlib) at 1/16 of the tile, at least 11 px (128 px tiles of the 32 px models); Pillow's own
    font where DejaVu cannot be found."""
    from PIL import ImageFont
    size = max(11, tile // 16)
    try:
        from matplotlib import font_manager
        font = ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except Exception:  # no matplotlib, or a matplotlib without its fonts
        font = ImageFont.load_default(size)
    return font, sum(font.getmetrics())  # ascent + descent


def shorten(text: str, font, width: float) -> str:
    """text cut to fit `width` px in `font`, with an ellipsis where it was cut."""
    if font.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)  # binary search for the longest prefix that fits with the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if font.getlength(text[:mid].rstrip() + "…") <= width else (lo, mid - 1)
    return text[:lo].rstrip() + "…"


def grid_labels(prompts: list, rewards=None, name: str = "r") -> list[str]:
    """One save_grid label per image: 'prompt', or 'prompt\\nr=value' with the value to 3 significant
    digits. prompts: str or anything with .text (diffusion.Prompt); rewards: (N,) tensor, list or None."""
    texts = [getattr(p, "text", p) for p in prompts]
    if rewards is None:
        return texts
    values = [float(v) for v in (rewards.detach().flatten().tolist() if torch.is_tensor(rewards) else rewards)]
    if len(values) != len(texts):
        raise ValueError(f"grid_labels: {len(texts)} prompts but {len(values)} rewards.")
    return [f"{t}\n{name}={fmt(v)}" for t, v in zip(texts, values)]


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, labels: list[str] | None = None,
              row_labels: list[str] | None = None, title: str | None = None):
    """images (N, 3, H, W) in [0, 1] -> one PNG grid of nrow columns, upscaled so small images stay visible.
    labels: one per image, up to 2 lines each, drawn under its tile; row_labels: one per row, drawn left of
    it; title: one line above the grid. Every line is shortened to the space it has. Without any of them the
    PNG is exactly torchvision's save_image(images, padding=2, pad_value=1). Written atomically."""
    import torch.nn.functional as F
    from PIL import Image, ImageDraw
    images = images.detach().float().cpu()
    if images.shape[-1] < 128:  # tiny models make 32 px images: nearest upscaling keeps pixels honest
        images = F.interpolate(images, scale_factor=128 // images.shape[-1], mode="nearest")
    N, _, H, W = images.shape
    cols = min(nrow, N)
    rows = math.ceil(N / cols)
    if labels is not None and len(labels) != N:
        raise ValueError(f"save_grid: {len(labels)} labels for {N} images; give one label per image.")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"save_grid: {len(row_labels)} row_labels for {rows} rows ({N} images, nrow {nrow}); "
                         "give one per row.")

    # layout: [title band] over [row label column | tiles, each with its label band under it]
    font, line_h = grid_font(W)
    tile_lines = [[shorten(line, font, W) for line in t.split("\n")[:2]] for t in labels or []]
    band = GRID_PAD + line_h * max(map(len, tile_lines)) if labels else 0
    row_text = [shorten(t.split("\n")[0], font, W) for t in row_labels or []]
    left = int(max(map(font.getlength, row_text))) + 2 * GRID_PAD + line_h // 2 if row_labels else 0
    top = line_h + GRID_PAD if title else 0
    pitch_x, pitch_y = W + GRID_PAD, H + band + GRID_PAD
    canvas = torch.full((3, top + rows * pitch_y + GRID_PAD, left + cols * pitch_x + GRID_PAD), 255, dtype=torch.uint8)
    pixels = images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)  # rounding as torchvision's save_image
    for k in range(N):
        y, x = top + GRID_PAD + (k // cols) * pitch_y, left + GRID_PAD + (k % cols) * pitch_x
        canvas[:, y: y + H, x: x + W] = pixels[k]
    grid = Image.fromarray(canvas.permute(1, 2, 0).numpy())

    draw, black = ImageDraw.Draw(grid), (0, 0, 0)
    for k, lines in enumerate(tile_lines):  # centred under the tile
        y, x = top + GRID_PAD + (k // cols) * pitch_y + H + GRID_PAD, left + GRID_PAD + (k % cols) * pitch_x
        for i, line in enumerate(lines):
            draw.text((x + (W - font.getlength(line)) / 2, y + i * line_h), line, fill=black, font=font)
    for r, text in enumerate(row_text):  # vertically centred on the row's tiles
        draw.text((GRID_PAD + line_h // 4, top + GRID_PAD + r * pitch_y + (H - line_h) / 2), text, fill=black, font=font)
    if title:
        text = shorten(title.split("\n")[0], font, grid.width - 2 * GRID_PAD)
        draw.text((GRID_PAD, GRID_PAD // 2), text, fill=black, font=font)
    grid.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def summarize(rewards: torch.Tensor, prefix: str = "reward") -> dict:
    r = rewards.float()
    return {f"{prefix}_mean": r.mean().item(), f"{prefix}_std": r.std(unbiased=False).item(),
            f"{prefix}_min": r.min().item(), f"{prefix}_max": r.max().item()}


# -----------------------------------------------------------------------------
# Checkpoints: run_dir/checkpoints/NNNNNN/{pytorch_lora_weights.safetensors, state.pt, meta.json},
# written into a temporary folder and renamed, so a checkpoint folder is either complete or absent.

def save_checkpoint(run_dir: str, step: int, unet, state: dict, meta: dict) -> str:
    final = os.path.join(run_dir, "checkpoints", f"{step:06d}")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lora.save(unet, tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(to_jsonable(meta), f, indent=2)
    # Re-saving a step (after an interrupt): the old folder is renamed aside, the new one renamed in, then
    # the old one deleted, so at every moment one complete checkpoint of this step exists on disk
    # (between the two renames it is the .old one, which latest_checkpoint also reads).
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint folders under run_dir/checkpoints, oldest first: NNNNNN, or NNNNNN.old where a
    re-save was cut between its two renames (then NNNNNN is missing)."""
    found = glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]*"))
    done = {os.path.basename(p) for p in found if os.path.basename(p).isdigit()}
    keep = [p for p in found if os.path.basename(p).isdigit()
            or (p.endswith(".old") and os.path.basename(p)[:-4] not in done)]
    return sorted(keep, key=os.path.basename)


def latest_checkpoint(path: str) -> str | None:
    """A checkpoint folder itself, or the newest complete one under run_dir/checkpoints."""
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    found = _checkpoints(path)
    return found[-1] if found else None


def load_checkpoint(path: str, unet) -> dict:
    """Loads the LoRA weights into `unet` (already injected) and returns the training state. state.pt is
    read with weights_only=True: it holds only tensors, numbers, strings, lists and dicts, and a file that
    holds anything else (a pickled object, which could run code when loaded) is refused."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"--resume {path}: no checkpoint there (expected a checkpoint folder with "
                          "state.pt, or a run folder with checkpoints/).")
    try:
        lora.load(unet, ckpt)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"--resume {path}: {e}") from e
    file = os.path.join(ckpt, "state.pt")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"--resume: refused to load {file}: it holds Python objects other than tensors, numbers, "
                          "lists and dicts, which could run code when unpickled; the trainers never write such "
                          f"files. ({str(e).splitlines()[0]})") from e
    except Exception as e:
        raise ConfigError(f"--resume: checkpoint file {file} is unreadable (truncated or corrupt?): {e}. "
                          "Delete that folder to resume from the one before.") from e
    state["path"] = ckpt
    return state


def prune_checkpoints(run_dir: str, keep: int):
    found = _checkpoints(run_dir)
    for p in found[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


# -----------------------------------------------------------------------------
# Stopping cleanly: SIGTERM, a non-finite value or a failing reward model in the middle of an epoch
# ends the run with a checkpoint of the state at the START of that epoch (kept in memory: LoRA weights
# and optimizer state are small). All randomness is keyed by position, so resuming redoes the epoch
# exactly and the run ends as if it had never stopped.

class Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


class LastGoodState:
    def __init__(self):
        self.run_dir = None

    def arm(self, run_dir: str, unet, params, rank: int):
        self.run_dir, self.unet, self.params, self.rank = run_dir, unet, params, rank

    def update(self, epoch: int, state: dict):
        """Call at the start of every epoch with the state a checkpoint of `epoch` finished epochs holds."""
        self.epoch, self.state = epoch, copy.deepcopy(state)
        self.weights = [p.detach().clone() for p in self.params]

    def save(self, reason: str) -> str | None:
        if self.run_dir is None or self.rank != 0 or not hasattr(self, "epoch"):
            return None
        with torch.no_grad():
            for p, w in zip(self.params, self.weights):
                p.copy_(w)
        return save_checkpoint(self.run_dir, self.epoch, self.unet, self.state, {"epoch": self.epoch, "stopped_by": reason})


def run_guarded(train, cfg):
    """Runs train(cfg, guard); on SIGTERM or any error, saves guard's last good state, then re-raises."""
    guard = LastGoodState()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return train(cfg, guard)
    except BaseException as e:
        path = guard.save(f"{type(e).__name__}: {e}")
        if path:
            print0(f"stopped in epoch {guard.epoch} by {type(e).__name__}: {e}\nsaved the state before that epoch to "
                   f"{path}; continue with --resume {guard.run_dir}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


# -----------------------------------------------------------------------------
# Randomness: every draw comes from a generator seeded by WHERE it happens (seed, epoch, batch, purpose),
# never from a stream that depends on what ran before. So a resumed run, a run split over several
# processes, and a run with one DiffExp strategy switched off all see the same noise for the same sample.

def generator(*keys) -> torch.Generator:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def every(n: int, i: int, last: bool = False) -> bool:
    """True every n-th (1-based) iteration i, and on the last one; n <= 0 means never (but the last)."""
    return last or (n > 0 and i % n == 0)


def eval_line(record: dict) -> str:
    """' | plain 0.52 | heldout 0.48' for the evaluated rewards of an epoch record ('' when none)."""
    return "".join(f" | {k} {record[f'{k}_reward_mean']:.4g}" for k in ("plain", "heldout") if f"{k}_reward_mean" in record)


def fmt(x: float) -> str:
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"

