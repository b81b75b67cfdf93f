"""
Run scaffolding shared by the trainers and evaluate.py: the run folder, metrics.jsonl, the reward
plot and image grids, atomic checkpoints, RNG state, and the per-prompt sample picker. No math of
either method lives here; that stays in the trainers, diffusion.py and explore.py.
"""

import copy
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import signal
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


# -----------------------------------------------------------------------------
# Several processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them, one process.

def init_distributed(device: str) -> tuple[int, int, str]:
    """-> (rank, world_size, device). NCCL on GPUs, gloo on CPUs (so a 2-process test runs anywhere)."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device)
    import torch.distributed as dist
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
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
    every: int = 0  # epochs between held-out evaluations with plain prompts and w_high (0: never)
    prompts: str = "unseen-animals"  # the held-out prompt set
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
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_run_dir(run_dir: str, resume: str, name: str) -> str:
    """--run-dir if given; else the run folder of the checkpoint to resume; else runs/{name}-{date}."""
    if run_dir:
        return run_dir
    if resume:
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a checkpoint folder with "
                                    "state.pt, or a run folder with checkpoints/).")
        return os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


# -----------------------------------------------------------------------------
# Metrics: one JSON object per line, one line per epoch / step

class Metrics:
    """Appends records to run_dir/metrics.jsonl. On resume, records at or after `start` (by `key`)
    are dropped first: they came from work after the checkpoint, which will be redone."""

    def __init__(self, run_dir: str, start: int = 0, key: str = "epoch"):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.records = [r for r in read_metrics(self.path) if r[key] < start] if os.path.exists(self.path) else []
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(self.path + ".tmp", self.path)

    def log(self, record: dict):
        record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}  # strict JSON
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_rewards(records: list[dict], path: str, title: str = ""):
    """reward mean (with a +-std band) against cumulative reward queries -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r["reward_queries"] for r in records]
    mean = [r["reward_mean"] for r in records]
    std = [r["reward_std"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(x, mean, marker="o", ms=3, label="reward (mean over the epoch's samples)")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2, label="± std")
    explored = [r["reward_queries"] for r in records if r.get("exploring")]
    if explored:
        ax.axvspan(min(x), max(explored), color="orange", alpha=0.08, label="DiffExp exploration on")
    ax.set_xlabel("reward queries (generated training samples)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8):
    """images (N, 3, H, W) in [0, 1] -> one PNG grid, upscaled so small images stay visible."""
    import torch.nn.functional as F
    from torchvision.utils import save_image
    images = images.detach().float().cpu()
    if images.shape[-1] < 128:  # tiny models make 32 px images: nearest upscaling keeps pixels honest
        images = F.interpolate(images, scale_factor=128 // images.shape[-1], mode="nearest")
    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)


def summarize(rewards: torch.Tensor, prefix: str = "reward") -> dict:
    r = rewards.float()
    return {f"{prefix}_mean": r.mean().item(), f"{prefix}_std": r.std(unbiased=False).item(),
            f"{prefix}_min": r.min().item(), f"{prefix}_max": r.max().item()}


# -----------------------------------------------------------------------------
# Checkpoints: run_dir/checkpoints/NNNNNN/{pytorch_lora_weights.safetensors, state.pt, meta.json},
# written into a temporary folder and renamed, so a checkpoint folder is either complete or absent.

def save_checkpoint(run_dir: str, step: int, unet, state: dict, meta: dict) -> str:
    final = os.path.join(run_dir, "checkpoints", f"{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lora.save(unet, tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(to_jsonable(meta), f, indent=2)
    if os.path.exists(final):  # re-saving the same step (e.g. after an interrupt): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(path: str) -> str | None:
    """A checkpoint folder itself, or the newest complete one under run_dir/checkpoints."""
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    found = sorted(p for p in glob.glob(os.path.join(path, "checkpoints", "[0-9]*")) if not p.endswith(".tmp"))
    return found[-1] if found else None


def load_checkpoint(path: str, unet) -> dict:
    """Loads the LoRA weights into `unet` (already injected) and returns the training state."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"--resume {path}: no checkpoint there (expected a checkpoint folder with "
                                "state.pt, or a run folder with checkpoints/).")
    lora.load(unet, ckpt)
    try:
        state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"--resume: checkpoint file {os.path.join(ckpt, 'state.pt')} is unreadable "
                           f"(truncated or corrupt?): {e}. Delete that folder to resume from the one before.") from e
    state["path"] = ckpt
    return state


def prune_checkpoints(run_dir: str, keep: int):
    found = sorted(p for p in glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]*")) if not p.endswith(".tmp"))
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


def fmt(x: float) -> str:
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"

