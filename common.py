"""
The small things every other file leans on, importing nothing of this project: the one error type for
mistakes in flags and input files, printing on process 0, the device and dtype, several processes under
torchrun, mixed precision, and randomness keyed by where it is drawn.
"""

import hashlib
import math
import os

import torch


# -----------------------------------------------------------------------------
# Mistakes in the flags or input files. Every check that a user can fail raises ConfigError with a
# message naming the flag (or file) and the fix; the command line prints that one line and exits with
# status 2, as a mistyped flag does. Anything else is a real crash and keeps its traceback.

class ConfigError(ValueError):
    pass


def print0(*args, **kwargs):
    """Prints on rank 0 only (all ranks when not distributed)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


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


def hub_reachable() -> bool:
    """One quick request to the Hugging Face hub (False at once under HF_HUB_OFFLINE=1). Without it, an offline
    machine waits through huggingface_hub's retries (about 20 s per file) before a download fails."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
        return True
    except Exception:
        return False


OFFLINE_HINT = ("download it on a machine with internet (`hf download {repo} --local-dir DIR`, the command of the "
                "huggingface_hub package) and pass {flag} DIR; HF_HUB_OFFLINE=1 makes every load skip the network "
                "at once")


def set_threads(threads: int) -> int:
    """--threads: torch's CPU threads. 0 (automatic): OMP_NUM_THREADS when set (torchrun sets it to 1 for
    several processes), else the cores this process may run on (its CPU affinity) divided among the processes
    torchrun started on this machine. On a machine that other jobs share, fewer threads than cores avoid
    oversubscription, which slows the small models several-fold (README). -> the number of threads."""
    if threads == 0 and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    return threads


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


# -----------------------------------------------------------------------------
# Randomness: every draw comes from a generator seeded by WHERE it happens (seed, epoch, batch, purpose),
# never from a stream that depends on what ran before. So a resumed run, a run split over several
# processes, and a run with one DiffExp strategy switched off all see the same noise for the same sample.

def read_stats(pending: list, names: tuple[str, ...], stats: dict, where: str) -> torch.Tensor:
    """The training statistics of one micro-batch: `pending` holds one device tensor per forward (the loss
    first, then `names[1:]`, then any extra columns), read to the host ONCE (a host-device synchronisation per
    forward would stall a GPU). Appends each named column to stats[name]; a non-finite loss raises
    FloatingPointError (checked here: under float16 a non-finite gradient may be the loss scaler's, which it
    skips). -> the (forwards, columns) host tensor."""
    read = torch.stack(pending).cpu()
    if not torch.isfinite(read[:, 0]).all():
        raise FloatingPointError(f"{where}: non-finite loss.")
    for k, column in zip(names, read.T):
        stats[k].extend(column.tolist())
    return read


def generator(*keys) -> torch.Generator:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def every(n: int, i: int, last: bool = False) -> bool:
    """True every n-th (1-based) iteration i, and on the last one; n <= 0 means never (but the last)."""
    return last or (n > 0 and i % n == 0)


def fmt(x: float) -> str:
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def summarize(rewards: torch.Tensor, prefix: str = "reward") -> dict:
    r = rewards.float()
    return {f"{prefix}_mean": r.mean().item(), f"{prefix}_std": r.std(unbiased=False).item(),
            f"{prefix}_min": r.min().item(), f"{prefix}_max": r.max().item()}


# -----------------------------------------------------------------------------
# Records

def usable_matches(flag: str, pattern: str, found: list[str], usable, what: str, lacking: str) -> list[str]:
    """Of the paths a glob pattern matched (found, sorted), those that pass usable(path). Each one left out is
    named in one line (`lacking`: what it lacks; a run that failed before it wrote any is such a folder), and
    a pattern that matches nothing, or nothing usable, is a ConfigError naming the flag and the pattern."""
    if not found:
        raise ConfigError(f"{flag}: the pattern {pattern!r} matches no {what}.")
    kept = [path for path in found if usable(path)]
    for path in found:
        if path not in kept:
            print0(f"{flag}: skipped {path}: no {lacking} (a failed run?)")
    if not kept:
        raise ConfigError(f"{flag}: the pattern {pattern!r} matches no {what} with {lacking} ({len(found)} without).")
    return kept


def config_value(config, dotted: str):
    """config['a']['b'] for 'a.b'; None where a part is missing."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def jsonable(x):
    """nan -> None, so the JSON is strict."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [jsonable(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x
