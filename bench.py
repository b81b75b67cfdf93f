"""
Benchmarks of the hot loops, in the manner of nanoGPT's bench.py: stripped copies of sampling, the DDPO
update, one AlignProp step and the learned rewards, each with burn-in, a timed stage with synchronised
timers, and (for the UNet stages) FLOPs counted once and an MFU estimate.

Every GPU measurement in one run (the suite: sections "The suite" and "The table" below), then its table:

    timeout -k 10 570 python bench.py gpu --out bench-gpu.jsonl  # one H200: ~8.5 min (a 510 s budget, then skips)
    python bench.py table bench-gpu.jsonl > bench-gpu.md         # markdown: date, card, driver, versions, one row each
    python bench.py gpu-tiny --out /tmp/bench-tiny.jsonl         # the same code on the tiny models, CPU, ~1 min
    python bench.py gpu --out bench-gpu.jsonl --parts sdxl trl   # some parts only (e.g. what a timeout left out)

Single stages:

    python bench.py tiny                                   # tiny offline model on a CPU, about a minute
    OMP_NUM_THREADS=2 python bench.py tiny --threads 2 --out bench-cpu.jsonl
    python bench.py sd15-gpu --out bench-gpu.jsonl         # full-size SD v1.5 architecture, random weights, bf16, one GPU
    python bench.py sdxl-gpu --out bench-gpu.jsonl         # the same for SDXL base at 1024 px
    python bench.py tiny --stages sample ddpo              # some stages only
    python bench.py tiny --help                            # every flag

Every measurement is one JSON line (stdout, and appended to --out) with name, device, dtype, batch,
steps, resolution, value, unit, seconds (the median of the timed iterations, for one iteration) and,
for the UNet stages, flops (per iteration) and mfu (null where the device's peak is unknown, e.g. a CPU).
A table of all of them follows at the end.

Memory (AlignProp; DDPO on CUDA only): on CUDA, torch.cuda.max_memory_allocated after a reset (weights
included), and running out of memory is reported as a result (error "out of memory"); on a CPU
(Linux), each configuration runs in its own subprocess, which resets its peak resident set size after
set-up and reports it after the steps (VmHWM, what ru_maxrss reads), so neither the set-up's peak nor
another configuration's memory hides the step's. `memory_mb - baseline_mb` is what the step adds.
"""

import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from torch.utils.flop_counter import FlopCounterMode

import common
import diffusion
import explore
import lora
import rewards
import train_alignprop
import train_ddpo
from scaffold import read_metrics, run_cli
from train_ddpo import ppo_loss

# -----------------------------------------------------------------------------
# Config

Stage = Literal["sample", "ddpo", "alignprop", "reward"]
LearnedReward = Literal["aesthetic", "pickscore", "hpsv2"]


@dataclass(frozen=True)
class SampleBench:
    batch: int = 8  # trajectories per sampling batch (cond + uncond: the UNet sees twice as many)
    num_steps: int = 50  # DDIM steps T (also the steps the DDPO update re-scores)
    eta: float = 1.0  # DDIM stochasticity (> 0: log-probs are computed, as DDPO samples)
    guidance_scale: float = 5.0


@dataclass(frozen=True)
class DDPOBench:
    batch: int = 4  # trajectories per training micro-batch, each re-scored at all T timesteps
    timesteps_per_forward: tuple[int, ...] = (1, 10)  # one measurement each (train_ddpo's --train.timesteps-per-forward)
    clip_range: float = 1e-4


@dataclass(frozen=True)
class AlignPropBench:
    batch: int = 2  # trajectories per micro-batch (one backward each)
    num_steps: int = 50  # DDIM steps T
    guidance_scale: float = 7.5
    k: tuple[int, ...] = (1, 0)  # gradients through the last K steps; 0 means all T
    checkpointing: tuple[bool, ...] = (True, False)  # gradient checkpointing of each UNet call with gradient
    reward: Literal["brightness", "contrast"] = "brightness"  # model-free: the step's cost is the diffusion model's


@dataclass(frozen=True)
class RewardBench:
    names: tuple[LearnedReward, ...] = ("aesthetic", "pickscore", "hpsv2")
    batch: int = 8  # images per call, at the diffusion model's resolution
    tiny: bool = True  # small random reward models (rewards.py's tiny=True); False: full-size architectures, random weights


@dataclass(frozen=True)
class Config:
    model: str = "tiny"  # tiny | sd15-random (full SD v1.5 architecture, random weights) | a local diffusers folder
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # as the trainers' --dtype: frozen weights, autocast, GradScaler (float16)
    threads: int = 0  # CPU threads for torch (0: torch's default, which follows OMP_NUM_THREADS)
    stages: tuple[Stage, ...] = ("sample", "ddpo", "alignprop", "reward")
    burn_in: int = 1  # untimed iterations before each measurement (allocator, kernel selection, caches)
    iters: int = 3  # timed iterations per measurement; the median is reported
    lora_rank: int = 4  # LoRA on the UNet's attention projections, as the trainers' default
    compile: bool = False  # torch.compile the UNet, as the trainers' --compile (FLOPs are counted on the uncompiled one)
    seed: int = 0
    out: str = ""  # also append the JSON lines to this file
    sample: SampleBench = SampleBench()
    ddpo: DDPOBench = DDPOBench()
    alignprop: AlignPropBench = AlignPropBench()
    reward: RewardBench = RewardBench()


PRESETS = {
    "tiny": ("Tiny offline model on a CPU: seconds per stage.", Config(
        model="tiny", device="cpu", iters=5,
        sample=SampleBench(batch=8, num_steps=10),
        ddpo=DDPOBench(batch=4, timesteps_per_forward=(1, 10)),
        alignprop=AlignPropBench(batch=4, num_steps=10),
        reward=RewardBench(batch=8, tiny=True))),
    "sd15-gpu": ("Full-size SD v1.5 architecture (random weights), 512 px, bf16, one GPU; the papers' batch sizes.", Config(
        model="sd15-random", device="cuda", dtype="bfloat16", iters=3,
        sample=SampleBench(batch=8, num_steps=50),
        ddpo=DDPOBench(batch=4, timesteps_per_forward=(1, 2)),
        alignprop=AlignPropBench(batch=2, num_steps=50),
        reward=RewardBench(batch=8, tiny=False))),
    "sdxl-gpu": ("Full-size SDXL base architecture (random weights), 1024 px, bf16, one GPU; the trainers' SDXL batch sizes.", Config(
        model="sdxl-random", device="cuda", dtype="bfloat16", iters=2,
        sample=SampleBench(batch=4, num_steps=50, guidance_scale=5.0),
        ddpo=DDPOBench(batch=1, timesteps_per_forward=(1, 2)),
        alignprop=AlignPropBench(batch=1, num_steps=50, guidance_scale=5.0),
        reward=RewardBench(batch=4, tiny=False))),
}

# Dense bf16 peak FLOP/s by device name, also used for float16 (the same tensor-core rate on these cards).
# H100 / H200: the ~790 TFLOP/s that large bf16 matmuls actually reach on these cards (measured), not the
# data sheet's 989, so MFU reads against what is attainable. A100: the data sheet's 312. Unknown devices
# and float32 runs get no MFU.
PEAK_BF16_FLOPS = {"H100": 790e12, "H200": 790e12, "A100": 312e12}

# -----------------------------------------------------------------------------
# Timing, FLOPs, memory


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, burn_in: int, iters: int) -> float:
    """Median wall seconds of one call of fn over `iters` timed calls, after `burn_in` untimed ones."""
    for _ in range(burn_in):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn, device: str) -> int:
    """FLOPs of one call of fn as torch counts them: matmuls, convolutions, attention, forward and
    backward (elementwise work is not counted). Torch has no FLOP formula for the CPU's fused attention
    kernel, so on a CPU attention runs on the math backend (plain matmuls) while counting."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH) if device == "cpu" else nullcontext():
        fn()
    return counter.get_total_flops()


def unet_call_flops(models: diffusion.Models, cond, uncond, backward: bool = False) -> int:
    """FLOPs of one guided UNet call (cond and uncond in one batch, as diffusion.guided_eps) for cond's
    batch; with backward, of the call and its backward pass (to the input latents and the LoRA weights)."""
    B = cond.shape[0]
    x = torch.zeros((B, *models.latent_shape), device=models.device, requires_grad=backward)
    w = torch.full((B,), 5.0, device=models.device)
    unet = getattr(models.unet, "_orig_mod", models.unet)  # under --compile, the module torch.compile wraps

    def call():
        with torch.set_grad_enabled(backward):
            eps = diffusion.guided_eps(unet, x, 999, cond, uncond, w)
            if backward:
                eps.sum().backward()
    flops = count_flops(call, str(models.device))
    unet.zero_grad(set_to_none=True)  # the counted backward must not leak into a later step
    return flops


def decode_flops(models: diffusion.Models, batch: int, backward: bool = False) -> int:
    """FLOPs of the VAE decode of `batch` latents, with its backward pass if `backward`."""
    x = torch.zeros((batch, *models.latent_shape), device=models.device, requires_grad=backward)

    def call():
        with torch.set_grad_enabled(backward):
            images = diffusion.decode(models, x)
            if backward:
                images.sum().backward()
    return count_flops(call, str(models.device))


def peak_flops(device: str, dtype: torch.dtype) -> float | None:
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def reset_peak_rss() -> bool:
    """Linux: sets this process's peak resident set size (VmHWM, what ru_maxrss reports) back to its
    current RSS, so that the next peak reading is the peak of what runs after. False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


# -----------------------------------------------------------------------------
# Set-up shared by the stages


@dataclass
class Bench:
    cfg: Config
    device: str
    dtype: torch.dtype
    precision: common.Precision  # the trainers' autocast / backward / optimizer step
    models: diffusion.Models
    params: list  # LoRA parameters
    optimizer: torch.optim.Optimizer
    uncond: torch.Tensor  # (1, 77, D)
    records: list

    def conditioning(self, batch: int) -> torch.Tensor:
        prompts = diffusion.load_prompts("animals")
        return diffusion.encode_text(self.models, [prompts[i % len(prompts)].text for i in range(batch)])  # (B, 77, D)

    def emit(self, name, batch, steps, value, unit, seconds, flops=None, **extra) -> dict:
        """One measurement: a JSON line on stdout and in --out, kept for the table."""
        device_name = torch.cuda.get_device_name(self.device) if self.device.startswith("cuda") else "cpu"
        r = dict(name=name, device=device_name, dtype=self.cfg.dtype, batch=batch, steps=steps,
                 resolution=self.models.image_size, value=value, unit=unit, seconds=seconds, compile=self.cfg.compile)
        if self.device == "cpu":
            r["threads"] = torch.get_num_threads()
        if flops is not None:
            peak = peak_flops(self.device, self.dtype)
            achieved = flops / seconds if seconds else None
            r.update(flops=flops, flop_per_s=achieved, mfu=achieved / peak if peak and achieved else None)
        r.update(extra)
        line = json.dumps(r)
        print(line, flush=True)
        if self.cfg.out:
            with open(self.cfg.out, "a") as f:
                f.write(line + "\n")
        self.records.append(r)
        return r


_load_models = diffusion.load_models  # kept: trainer_child puts load_models in its place
RANDOM_MODELS = ("tiny", "sd15-random", "tiny-sdxl", "sdxl-random")


def load_models(name: str = "tiny", device="cpu", dtype=torch.float32, seed: int = 0) -> diffusion.Models:
    """diffusion.load_models, with a random architecture's weights drawn on `device` itself: drawing SDXL's
    3.5 B random weights on the host takes about a minute (SD v1.5's 1.1 B: 14 s on 2 cores), a large
    part of a measurement budget, and their values do not matter here. The scheduler is rebuilt outside,
    so its tensors stay on the host, as load_models leaves them. On a CPU this is load_models itself."""
    if name not in RANDOM_MODELS:
        return _load_models(name, device=device, dtype=dtype, seed=seed)
    try:
        with torch.device(device):
            models = _load_models(name, device=device, dtype=dtype, seed=seed)
    except Exception as e:  # a constructor that does not follow the default device: the host's draw, slower
        print(f"bench: drawing {name}'s weights on {device} failed ({type(e).__name__}: {e}); drawing them on the host", flush=True)
        return _load_models(name, device=device, dtype=dtype, seed=seed)
    models.scheduler = type(models.scheduler).from_config(models.scheduler.config)
    return models


def setup(cfg: Config) -> Bench:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = common.resolve_device(cfg.device)
    dtype = common.resolve_dtype(cfg.dtype, device)  # as the trainers: also TF32 for float32 matmuls on a GPU
    models = load_models(cfg.model, device=device, dtype=dtype, seed=cfg.seed)
    params = lora.inject(models.unet, rank=cfg.lora_rank, alpha=cfg.lora_rank, seed=cfg.seed)  # as the trainers: LoRA on from the start
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if cfg.compile:
        models = dataclasses.replace(models, unet=torch.compile(models.unet))  # shares the UNet's parameters
    return Bench(cfg, device, dtype, common.Precision(device, dtype), models, params, optimizer,
                 diffusion.encode_text(models, [""]), [])


# -----------------------------------------------------------------------------
# Stages


def bench_sample(b: Bench):
    """DDPO's sampling pass: T guided UNet calls with per-step CFG and log-probs, then the VAE decode."""
    s, models = b.cfg.sample, b.models
    cond = b.conditioning(s.batch)
    g = torch.Generator().manual_seed(b.cfg.seed)
    models.unet.eval()

    def run():
        with torch.no_grad(), b.precision.autocast():
            diffusion.sample(models, cond, b.uncond, s.guidance_scale, s.num_steps, s.eta, g)

    seconds = timeit(run, b.device, b.cfg.burn_in, b.cfg.iters)
    flops = s.num_steps * unet_call_flops(models, cond, b.uncond) + decode_flops(models, s.batch)
    b.emit("sample", s.batch, s.num_steps, s.batch / seconds, "images/s", seconds, flops)


def ddpo_forwards(b: Bench, traj: diffusion.Trajectory, cond, guidance, tpf: int, g: torch.Generator, eta: float):
    """train_ddpo.py's inner loop over one micro-batch: its B trajectories re-scored at all T timesteps in
    shuffled order, tpf timesteps folded into each UNet batch, the guidance scales indexed on the host (so
    guided_eps decides which branches a row needs without reading the device). Yields, per UNet forward,
    (log_prob, the sampler's log_prob, the rows' trajectory indices), each (B * tpf,)."""
    B, T = guidance.shape
    timesteps = traj.timesteps.to(b.device)
    order_host = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])  # (B, T)
    step_order = order_host.to(b.device)
    idx = torch.arange(B, device=b.device)
    for j in range(0, T, tpf):
        i = step_order[:, j:j + tpf]  # (B, c)
        w = guidance[torch.arange(B)[:, None].expand_as(i).reshape(-1), order_host[:, j:j + tpf].reshape(-1)]  # host
        rows, i = idx[:, None].expand_as(i).reshape(-1), i.reshape(-1)  # (B*c,)
        with b.precision.autocast():
            log_prob = diffusion.step_log_prob(b.models, traj.latents[rows, i], timesteps[i], traj.latents[rows, i + 1],
                                               cond[rows], b.uncond, w, eta, T)
        yield log_prob, traj.log_probs[rows, i], rows


def ddpo_update(b: Bench, traj, cond, guidance, advantages, tpf: int, g, eta: float, clip_range: float):
    """One optimizer step on one micro-batch: the PPO loss of every forward, backward, clipping, AdamW."""
    B, T = guidance.shape
    for log_prob, old_log_prob, rows in ddpo_forwards(b, traj, cond, guidance, tpf, g, eta):
        loss = ppo_loss(log_prob, old_log_prob, advantages[rows], clip_range)[0]
        b.precision.backward(loss * (len(rows) // B) / T)
    b.precision.step(b.optimizer, b.params, 1.0, 1, "bench ddpo")


def guidance_rows(guidance: torch.Tensor) -> int:
    """UNet rows that guided_eps runs for these guidance scales: uncond where w != 1, cond where w != 0."""
    return int((guidance != 1).sum() + (guidance != 0).sum())


def bench_ddpo(b: Bench):
    """DDPO's training pass (train_ddpo.py's inner loop): one micro-batch of trajectories re-scored at
    all T timesteps in shuffled order, timesteps_per_forward of them folded into each UNet batch, the
    PPO loss, backward, then gradient clipping and an AdamW step on the LoRA weights."""
    s, d, models = b.cfg.sample, b.cfg.ddpo, b.models
    T, B = s.num_steps, d.batch
    cond = b.conditioning(B)
    g = torch.Generator().manual_seed(b.cfg.seed)
    with torch.no_grad(), b.precision.autocast():  # real trajectories to re-score (LoRA B = 0: the ratio starts at 1)
        traj = diffusion.sample(models, cond, b.uncond, s.guidance_scale, T, s.eta, g, decode_images=False)
    guidance = torch.full((B, T), s.guidance_scale)  # on the host, as train_ddpo keeps it (see guided_eps)
    advantages = torch.randn(B, generator=g).to(b.device)
    models.unet.train()
    # FLOPs are linear in the rows of a UNet batch, so folding timesteps does not change them: T UNet
    # calls with backward, of B trajectories each (the DDIM step and the loss are elementwise, not counted)
    flops = T * unet_call_flops(models, cond, b.uncond, backward=True)
    baseline = torch.cuda.memory_allocated() / 2**20 if b.device.startswith("cuda") else None
    for tpf in d.timesteps_per_forward:
        def update():
            ddpo_update(b, traj, cond, guidance, advantages, tpf, g, s.eta, d.clip_range)

        seconds, memory, error = cuda_measure(lambda: timeit(update, b.device, b.cfg.burn_in, b.cfg.iters), b)
        b.emit(f"ddpo update tpf={tpf}", B, T, seconds and B * T / seconds, "transitions/s", seconds, seconds and flops,
               timesteps_per_forward=tpf, unet_batch=2 * B * min(tpf, T), memory_mb=memory, baseline_mb=baseline, error=error)


def cuda_measure(run, b: Bench):
    """run() -> seconds, on CUDA with its peak memory (torch.cuda.max_memory_allocated after a reset, the
    weights included) and out-of-memory as a result rather than a crash: -> (seconds, memory MiB, error).
    On a CPU: (run(), None, None)."""
    if not b.device.startswith("cuda"):
        return run(), None, None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = run()
    except torch.cuda.OutOfMemoryError:  # e.g. AlignProp's K = all without checkpointing at 512 px
        seconds = None  # leaving the except block frees the activations its traceback holds
    if seconds is None:
        b.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return None, None, "out of memory"
    return seconds, torch.cuda.max_memory_allocated() / 2**20, None


def alignprop_measure(b: Bench, k: int, checkpointing: bool) -> dict:
    """Seconds per AlignProp step (sample with gradients through the last k steps and the decode, the
    reward, backward, AdamW step), its peak memory, and its model FLOPs: T - k UNet calls without
    gradient, k with backward, the decode with backward. Checkpointing's recomputed forwards are not
    counted (the usual MFU convention: they are extra work, not extra model)."""
    a, models = b.cfg.alignprop, b.models
    cond = b.conditioning(a.batch)
    reward_fn = rewards.make_reward(a.reward, b.device)
    g = torch.Generator().manual_seed(b.cfg.seed)
    models.unet.train()

    def step():
        with b.precision.autocast():
            traj = diffusion.sample(models, cond, b.uncond, a.guidance_scale, a.num_steps, 0.0, g,
                                    grad_last_k=k, checkpointing=checkpointing)
        b.precision.backward(-reward_fn(traj.images, []).mean())
        b.precision.step(b.optimizer, b.params, 5.0, 1, "bench alignprop")

    if b.device.startswith("cuda"):
        baseline = torch.cuda.memory_allocated() / 2**20
        seconds, memory, error = cuda_measure(lambda: timeit(step, b.device, b.cfg.burn_in, b.cfg.iters), b)
        if error:
            return dict(seconds=None, flops=None, memory_mb=None, baseline_mb=baseline, error=error)
    else:  # the peak of the set-up (imports, model loading) would hide the step's: start the peak afresh
        if not reset_peak_rss():
            raise RuntimeError("bench: peak RSS cannot be reset on this system (/proc/self/clear_refs); use --stages without alignprop.")
        baseline = rss_mb("VmRSS")
        seconds = timeit(step, b.device, b.cfg.burn_in, b.cfg.iters)
        memory = rss_mb("VmHWM")
    T = a.num_steps
    flops = ((T - k) * unet_call_flops(models, cond, b.uncond) + k * unet_call_flops(models, cond, b.uncond, backward=True)
             + decode_flops(models, a.batch, backward=True))
    return dict(seconds=seconds, flops=flops, memory_mb=memory, baseline_mb=baseline, error=None)


def bench_alignprop(b: Bench):
    a = b.cfg.alignprop
    for k in a.k:
        k = k or a.num_steps
        for checkpointing in a.checkpointing:
            if b.device.startswith("cuda"):
                m, method = alignprop_measure(b, k, checkpointing), "torch.cuda.max_memory_allocated"
            else:
                m, method = alignprop_subprocess(b.cfg, k, checkpointing), "peak RSS of a subprocess"
            name = f"alignprop K={'all' if k == a.num_steps else k} {'ckpt' if checkpointing else 'no-ckpt'}"
            b.emit(name, a.batch, a.num_steps, m["seconds"], "s/step", m["seconds"], m["flops"], k=k, checkpointing=checkpointing,
                   memory_mb=m["memory_mb"], baseline_mb=m["baseline_mb"], memory_method=method, error=m["error"])


def alignprop_subprocess(cfg: Config, k: int, checkpointing: bool) -> dict:
    """Runs alignprop_measure in a fresh Python process (CPU memory: its own peak RSS) and returns its dict."""
    return child("alignprop_child", {"cfg": dataclasses.asdict(cfg), "k": k, "checkpointing": checkpointing,
                                     "threads": torch.get_num_threads()})


def alignprop_child(d: dict) -> dict:
    """The subprocess's side of alignprop_subprocess."""
    cfg = dataclasses.replace(config_from_dict(Config, d["cfg"]), threads=d["threads"])
    return alignprop_measure(setup(cfg), d["k"], d["checkpointing"])


def child(fn: str, payload: dict, timeout: float | None = None) -> dict:
    """bench.<fn>(payload) -> dict, run in a fresh Python process: its own peak memory, CUDA context and
    compile caches, and a time limit that can stop it (subprocess.TimeoutExpired; a compilation cannot
    be interrupted in-process). The dict comes back as the last line the process prints."""
    code = "import json, sys, bench; print(json.dumps(getattr(bench, sys.argv[1])(json.loads(sys.argv[2]))))"
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code, fn, json.dumps(payload)], cwd=here, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{fn} ({payload.get('name', '')}) exited with status {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def config_from_dict(cls, d: dict):
    """The inverse of dataclasses.asdict for the config classes (JSON has turned their tuples into lists)."""
    def value(f):
        v = d[f.name]
        return config_from_dict(f.type, v) if dataclasses.is_dataclass(f.type) else tuple(v) if isinstance(v, list) else v
    return cls(**{f.name: value(f) for f in dataclasses.fields(cls)})


def reward_scorer(name: str, tiny: bool, device: str, dtype: torch.dtype):
    """The reward's image path: images in [0, 1] (B, 3, H, W) -> (B,). tiny: rewards.make_reward itself.
    Otherwise the full-size architectures with random weights (nothing downloaded), scoring as rewards.py
    does; its text embeddings are cached per prompt, so fixed random ones stand in for them here."""
    if tiny:
        fn = rewards.make_reward(name, device, dtype, tiny=True)
        return lambda images: fn(images, ["a cat"] * len(images))
    import open_clip
    if name == "aesthetic":  # OpenAI CLIP ViT-L/14 image tower + the LAION head shipped in the repo
        visual = rewards.frozen(open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True).visual, device, dtype)
        head = rewards.frozen(rewards.load_aesthetic_head(), device, dtype)
        return lambda images: head(F.normalize(visual(rewards.clip_preprocess(images).to(dtype)), dim=-1)).squeeze(-1).float()
    if name == "hpsv2":  # open_clip ViT-H-14
        model = rewards.frozen(open_clip.create_model("ViT-H-14", pretrained=None), device, dtype)
        text = F.normalize(torch.randn(1, 1024, device=device, dtype=dtype), dim=-1)
        return lambda images: (model.encode_image(rewards.clip_preprocess(images).to(dtype), normalize=True) * text).sum(-1).float()
    from transformers import CLIPConfig, CLIPModel  # PickScore: a transformers CLIPModel with the ViT-H/14 config
    config = CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120,
                           num_hidden_layers=32, num_attention_heads=16, hidden_act="gelu"),
        projection_dim=1024)
    model = rewards.frozen(CLIPModel(config), device, dtype)
    text = F.normalize(torch.randn(1, 1024, device=device, dtype=dtype), dim=-1)

    def score(images):
        emb = rewards.features(model.get_image_features(pixel_values=rewards.clip_preprocess(images).to(dtype)))
        return (model.logit_scale.exp() * (F.normalize(emb, dim=-1) * text).sum(-1)).float()
    return score


def bench_reward(b: Bench):
    """Images/s of each learned reward without gradients (DDPO's reward pass), on images at the model's resolution."""
    r = b.cfg.reward
    size = b.models.image_size
    images = torch.rand((r.batch, 3, size, size), generator=torch.Generator().manual_seed(b.cfg.seed)).to(b.device)
    for name in r.names:
        score = reward_scorer(name, r.tiny, b.device, b.dtype)
        with torch.no_grad():
            seconds = timeit(lambda: score(images), b.device, b.cfg.burn_in, b.cfg.iters)
        b.emit(f"reward {name}{' (tiny)' if r.tiny else ''}", r.batch, None, r.batch / seconds, "images/s", seconds)
        del score
        if b.device.startswith("cuda"):
            torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# The suite: every GPU measurement in one run, under a deadline (python bench.py gpu)
#
# One process, parts in priority order, each in try/except: a part that fails (out of memory, a failed
# compilation) becomes an error record and the next part runs. A part starts only while the budget
# lasts and its estimate fits in what is left; otherwise it is recorded as skipped. Every record is
# appended and flushed to --out at once, so a run stopped from outside keeps what it measured.
# Compilations and the trainers run in child processes (`child`), which the deadline can stop.
#
# Estimates on one H200, bf16, from README's Benchmarks (sampling batch 8 x 50 steps 3.7 s, compiled
# 2.4 s; a DDPO update 6.3 s; AlignProp K = all 13 s per step at batch 2), in seconds:
#   sweep          135  SD v1.5 set-up 15; the denoising loop (10 steps, no decode) at batch 8 / 16 / 32 (~1, 2, 3 s
#                       a call at 25% MFU), then channels_last and the SDPA backends at the best batch, 3 calls each
#                       and a FLOP count (~50); torch.compile (default mode) of the best of those in a child: start-up
#                       10, compilation ~50, 4 calls (~70, capped at compile_cap_s)
#   diffexp         25  sampling batch 8 x 50 steps with decode, fixed CFG vs DiffExp's schedule, 3 calls each
#   ddpo            50  a sampling batch of 8 with DiffExp; first_ratio_err at 1 and 2 timesteps per forward (2 x
#                       2 micro-batches, forward only); the update at 1 and 2 timesteps per forward, 3 calls each
#   alignprop       40  batch 4: K = all, one step (~25: the other parts have warmed the kernels); K = 1, 3 steps
#   sdxl            70  SDXL set-up 15; sampling batch 4 x 50 at 1024 px (~9 s a call), the DDPO update at batch 1
#                       (~6 s), AlignProp K = 1 at batch 1, 2 calls each
#   sdxl-train      80  one shrunk epoch of each trainer's sdxl-aesthetic in a child (start-up ~20 each):
#                       DDPO 4 samples, 10 of the 50 timesteps trained; AlignProp 2 samples
#   compile-modes   90  "reduce-overhead" (CUDA graphs) in a child, ~90; "max-autotune-no-cudagraphs" only if 60 s
#                       are left (its autotuning may take minutes: stopped at the cap or the deadline, an error record)
#   trl            130  bench_trl.py at 20 steps, if trl is installed (skipped otherwise)
# The must-haves (all but the last two) come to ~400 s; the default budget is 510 s, so compile-modes runs its
# first mode, and the run ends by ~520 s with Python's start-up.

Part = Literal["sweep", "diffexp", "ddpo", "alignprop", "sdxl", "sdxl-train", "compile-modes", "trl"]
PART_SECONDS = {"sweep": 135, "diffexp": 25, "ddpo": 50, "alignprop": 40, "sdxl": 70, "sdxl-train": 80,
                "compile-modes": 90, "trl": 130}
COMPILE_SECONDS = {"default": 75, "reduce-overhead": 90, "max-autotune-no-cudagraphs": 60}  # left, to start one
MFU_GOAL = 0.5
ALIGNPROP_MEMORY_GOAL_GIB = 24  # K = all at batch 4 must fit a 24 GB card
SDXL_MEMORY_GOAL_GIB = 80  # the SDXL presets are sized for one 80 GB GPU


@dataclass(frozen=True)
class Suite:
    model: str = "sd15-random"  # the SD v1.5 parts' model
    sdxl_model: str = "sdxl-random"
    device: str = "cuda"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    threads: int = 0  # CPU threads for torch (0: torch's default)
    out: str = "bench-gpu.jsonl"  # JSON lines, appended and flushed one by one; `python bench.py table OUT` renders them
    budget_s: float = 510  # no part starts after this many seconds; those left are recorded as skipped
    estimate_scale: float = 1.0  # a part starts only if its estimate (PART_SECONDS) x this fits in the time left
    parts: tuple[Part, ...] = tuple(PART_SECONDS)  # in this order
    burn_in: int = 1
    iters: int = 2  # timed iterations per measurement (median)
    num_steps: int = 50  # DDIM steps of sampling, DDPO and AlignProp (K = all is this many)
    sweep_batches: tuple[int, ...] = (8, 16, 32)  # sampling batch sizes of the sweep
    sweep_steps: int = 10  # DDIM steps per timed sweep call (MFU does not depend on the count; the decode is left out)
    sdpa_backends: tuple[str, ...] = ("flash", "efficient", "cudnn")  # forced in turn (torch.nn.attention.sdpa_kernel)
    compile_modes: tuple[str, ...] = ("reduce-overhead", "max-autotune-no-cudagraphs")  # the compile-modes part
    compile_backend: str = "inductor"  # torch.compile's backend ("eager": dynamo's tracing only, for a CPU)
    compile_cap_s: float = 180  # a compiled configuration's child is stopped after this long (or at the deadline)
    ddpo_tpf: tuple[int, ...] = (1, 2)  # timesteps per forward of the DDPO update
    alignprop_batch: int = 4
    trl_steps: int = 20


SUITE_PRESETS = {
    "gpu": ("Every GPU measurement in one run (~8.5 min on one H200): JSON lines to --out; then `bench.py table OUT`.", Suite()),
    "gpu-tiny": ("The gpu suite's code on the tiny models, on a CPU (~1 min): what cannot run on a CPU is skipped.", Suite(
        model="tiny", sdxl_model="tiny-sdxl", device="cpu", dtype="float32", out="bench-gpu-tiny.jsonl", budget_s=600,
        estimate_scale=0.0, burn_in=0, iters=1, num_steps=5, sweep_batches=(2, 4), sweep_steps=2, compile_backend="eager",
        alignprop_batch=1, trl_steps=5)),  # 5 steps: t = 801 is one DiffExp step, so the guidance skipping runs
}


@dataclass
class Run:
    """One run of the suite: its clock, its records, and the SD v1.5 set-up that the parts share."""
    suite: Suite
    start: float
    records: list = field(default_factory=list)
    bench: Bench | None = None
    best: dict | None = None  # the sweep's best configuration so far

    @property
    def cuda(self) -> bool:
        return self.suite.device.startswith("cuda")

    def left(self) -> float:
        return self.suite.budget_s - (time.monotonic() - self.start)

    def sd(self) -> Bench:
        if self.bench is None:
            s = self.suite
            self.bench = setup(Config(model=s.model, device=s.device, dtype=s.dtype, threads=s.threads,
                                      burn_in=s.burn_in, iters=s.iters))
        return self.bench

    def free(self):
        """Drops what a failed part may hold (gradients, its traceback's tensors) and the cached blocks."""
        if self.bench is not None:
            self.bench.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def emit(self, part: str, name: str, value=None, unit: str = "", status: str = "ok", goal: str | None = None,
             met: bool | None = None, **extra) -> dict:
        """One record: printed, appended to --out and flushed (a run stopped from outside keeps it)."""
        r = dict(part=part, name=name, status=status, value=value, unit=unit, seconds=None, mfu=None,
                 peak_mem_mb=None, goal=goal, met=met, error=None)
        r.update(extra)
        line = json.dumps(r, default=str)
        print(line, flush=True)
        with open(self.suite.out, "a") as f:
            f.write(line + "\n")
        self.records.append(json.loads(line))  # as the table command will read it back
        return self.records[-1]

    def late(self, part: str, name: str, need: float = 0.0) -> bool:
        """True, with a skipped record, once the budget is spent or `need` seconds no longer fit in it."""
        left = self.left()
        if left > 0 and left >= need * self.suite.estimate_scale:
            return False
        self.emit(part, name, status="skipped", error=f"budget: {max(left, 0):.0f} s left of {self.suite.budget_s:.0f} s"
                  + (f", needs ~{need:.0f} s" if need and left > 0 else ""))
        return True

    def mfu(self, flops, seconds) -> float | None:
        peak = peak_flops(self.suite.device, getattr(torch, self.suite.dtype))
        return flops / seconds / peak if peak and flops and seconds else None


def run_suite(s: Suite) -> list[dict]:
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise common.ConfigError("bench gpu: no CUDA device here; `python bench.py gpu-tiny` runs the same code on a CPU.")
    if s.threads > 0:
        torch.set_num_threads(s.threads)
    run = Run(s, time.monotonic())
    run.emit("header", "header", **environment(s))
    took, part = {}, None
    # stopped from outside (`timeout` sends SIGTERM): SystemExit unwinds through subprocess.run, which kills
    # the running child, and the footer and table below are still written
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for part in s.parts:
            if run.late(part, part, PART_SECONDS[part]):
                continue
            t0 = time.monotonic()
            try:
                PARTS[part](run)
            except Exception as e:  # out of memory, a failed compilation, a bug: recorded, and the next part runs
                traceback.print_exc()
                error = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}"
                run.emit(part, part, status="error", error=error)
                run.free()
            took[part] = time.monotonic() - t0
            print(f"bench: part {part}: {took[part]:.0f} s, {run.left():.0f} s of the budget left", flush=True)
    except SystemExit:
        run.emit(part or "suite", part or "suite", status="error", error="stopped from outside (SIGTERM) during this part")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.emit("footer", "footer", part_s=took, total_s=time.monotonic() - run.start)
        print("\n" + render(run.records), flush=True)
    return run.records


def environment(s: Suite) -> dict:
    """The header: date, card, driver, library versions, the suite's settings."""
    import diffusers
    import transformers
    cuda = s.device.startswith("cuda")
    props = torch.cuda.get_device_properties(s.device) if cuda else None
    return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), card=props.name if cuda else platform.processor() or "cpu",
                memory_gib=props.total_memory / 2**30 if cuda else None, driver=nvidia_driver() if cuda else None,
                cuda=torch.version.cuda if cuda else None, torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                threads=None if cuda else torch.get_num_threads(), suite=dataclasses.asdict(s))


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- part: the sampling MFU sweep


def sdpa_context(backend: str):
    """Forces one scaled-dot-product-attention backend ("default": torch's own choice)."""
    if backend == "default":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend])


@contextmanager
def memory_format(unet, channels_last: bool):
    """The UNet's 4-D weights in channels_last for the block (convolutions then run NHWC)."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if channels_last:
            unet.to(memory_format=torch.contiguous_format)


def denoise_measure(b: Bench, batch: int, steps: int, sdpa: str, burn_in: int, iters: int) -> dict:
    """The sampling loop without the decode (steps guided UNet calls with CFG 5 and log-probs, as DDPO
    samples): the seconds of its first call (compiled: the compilation with it), then the median of
    `iters` calls after `burn_in` more, and its FLOPs (counted on the uncompiled UNet)."""
    cond = b.conditioning(batch)
    g = torch.Generator().manual_seed(0)
    b.models.unet.eval()

    def run():
        with torch.no_grad(), b.precision.autocast(), sdpa_context(sdpa):
            diffusion.sample(b.models, cond, b.uncond, 5.0, steps, 1.0, g, decode_images=False)
    first = timeit(run, b.device, 0, 1)
    seconds = timeit(run, b.device, burn_in, iters)
    return dict(first_s=first, seconds=seconds, flops=steps * unet_call_flops(b.models, cond, b.uncond))


def compile_child(d: dict) -> dict:
    """denoise_measure with the UNet compiled (mode, backend), in a child process of its own."""
    b = setup(Config(model=d["model"], device=d["device"], dtype=d["dtype"], threads=d["threads"]))
    if d["channels_last"]:
        b.models.unet.to(memory_format=torch.channels_last)
    kwargs = {"mode": d["mode"]} if d["backend"] == "inductor" else {}  # modes are inductor's
    unet = torch.compile(b.models.unet, backend=d["backend"], **kwargs)
    b = dataclasses.replace(b, models=dataclasses.replace(b.models, unet=unet))
    return denoise_measure(b, d["batch"], d["steps"], d["sdpa"], 1, d["iters"])


def sweep_measure(run: Run, part: str, batch: int, compile: str = "", channels_last: bool = False, sdpa: str = "default"):
    """One sweep configuration: eager in this process, compiled in a child (stopped at compile_cap_s or the deadline).
    -> its record, or None when it was skipped or failed (then a skipped or error record)."""
    s = run.suite
    config = dict(batch=batch, compile=compile or None, channels_last=channels_last, sdpa=sdpa)
    name = (f"sample sweep: batch {batch}, {f'compile {compile}' if compile else 'eager'}, "
            f"{'channels_last' if channels_last else 'NCHW'}, SDPA {sdpa}")
    if run.late(part, name, COMPILE_SECONDS.get(compile, 0)):
        return None
    try:
        if compile:
            m = child("compile_child", dict(name=name, model=s.model, device=s.device, dtype=s.dtype, threads=s.threads,
                                            steps=s.sweep_steps, iters=s.iters, backend=s.compile_backend, mode=compile, **config),
                      timeout=max(min(run.left(), s.compile_cap_s), 1))
        else:
            with memory_format(run.sd().models.unet, channels_last):
                m = denoise_measure(run.sd(), batch, s.sweep_steps, sdpa, 0, s.iters)
    except Exception as e:
        error = (f"stopped after {e.timeout:.0f} s (the compile cap or the deadline)" if isinstance(e, subprocess.TimeoutExpired) else
                 "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}")
        run.emit(part, name, status="error", error=error, config=config)
        run.free()
        return None
    mfu = run.mfu(m["flops"], m["seconds"])
    r = run.emit(part, name, batch * s.sweep_steps / m["seconds"], "image-steps/s", goal=f"MFU >= {MFU_GOAL:.0%}",
                 met=None if mfu is None else mfu >= MFU_GOAL, seconds=m["seconds"], mfu=mfu, flops=m["flops"],
                 steps=s.sweep_steps, first_call_s=m["first_s"],
                 compile_s=m["first_s"] - m["seconds"] if compile else None, config=config)
    if run.best is None or score(r) > score(run.best):
        run.best = r
    return r


def score(r: dict) -> float:
    return r["mfu"] if r["mfu"] is not None else r["value"]  # a CPU has no MFU: throughput instead


def emit_winner(run: Run, part: str):
    best = run.best
    if best is not None:
        run.emit(part, f"sample sweep: best so far ({best['name'].split(': ', 1)[1]})", best["value"], best["unit"],
                 goal=best["goal"], met=best["met"], seconds=best["seconds"], mfu=best["mfu"], config=best["config"])


def part_sweep(run: Run):
    """Batch sizes eager, then channels_last and each SDPA backend at the best batch (each kept if it
    wins), then torch.compile's default mode on the best of those."""
    s, part = run.suite, "sweep"
    for batch in s.sweep_batches:
        sweep_measure(run, part, batch)
    if run.best is None:
        return
    batch = run.best["config"]["batch"]
    r = sweep_measure(run, part, batch, channels_last=True)
    channels_last = run.best is r
    for backend in s.sdpa_backends:
        if not run.cuda and backend in ("efficient", "cudnn"):
            run.emit(part, f"sample sweep: SDPA {backend}", status="skipped", error="a CUDA backend")
            continue
        sweep_measure(run, part, batch, channels_last=channels_last, sdpa=backend)
    c = run.best["config"]
    sweep_measure(run, part, c["batch"], "default", c["channels_last"], c["sdpa"])
    emit_winner(run, part)


def part_compile_modes(run: Run):
    """The compile modes that cost most to compile, on the sweep's best eager configuration."""
    part = "compile-modes"
    eager = [r for r in run.records if r["part"] == "sweep" and r["status"] == "ok" and r.get("config", {}).get("compile") is None
             and not r["name"].startswith("sample sweep: best")]
    c = max(eager, key=score)["config"] if eager else dict(batch=max(run.suite.sweep_batches), channels_last=False, sdpa="default")
    for mode in run.suite.compile_modes:
        if run.cuda:
            sweep_measure(run, part, c["batch"], mode, c["channels_last"], c["sdpa"])
        else:
            graphs = mode in ("reduce-overhead", "max-autotune")
            run.emit(part, f"sample sweep: compile {mode}", status="skipped", error="CUDA graphs: CUDA only" if graphs else
                     "a CPU run compiles with dynamo's eager backend (the sweep's default mode), where modes do not apply")
    emit_winner(run, part)


# ---- part: DiffExp's guidance schedule against fixed CFG


def part_diffexp(run: Run):
    """train_ddpo's sampling batch with decode, fixed CFG against DiffExp's schedule (w_low = 1 at t >
    t_thres), whose cond-only steps run half the UNet rows."""
    s, b, part = run.suite, run.sd(), "diffexp"
    p = train_ddpo.PRESETS["sd15-aesthetic"][1]
    S, T, w_high = p.sample.batch_size, s.num_steps, p.sample.guidance_scale
    cond = b.conditioning(S)
    ts = diffusion.timesteps(b.models, T)
    per_row = unet_call_flops(b.models, cond[:1], b.uncond) / 2  # FLOPs are linear in a call's rows
    decode = decode_flops(b.models, S)
    b.models.unet.eval()
    fixed = None  # its seconds
    schedule = explore.guidance_scales(ts, S, w_high, p.explore, True)
    for what, guidance in ((f"fixed CFG {w_high:g}", torch.full((S, T), w_high)),
                           (f"DiffExp's schedule (w_low {p.explore.w_low:g} at t > {p.explore.t_thres}, then {w_high:g})", schedule)):
        name = f"sample batch {S} x {T} steps with decode, {what}"
        if run.late(part, name):
            return
        g = torch.Generator().manual_seed(0)

        def sample():
            with torch.no_grad(), b.precision.autocast():
                diffusion.sample(b.models, cond, b.uncond, guidance, T, p.sample.eta, g)
        seconds = timeit(sample, b.device, s.burn_in, s.iters)
        flops = guidance_rows(guidance) * per_row + decode
        speedup = fixed / seconds if fixed else None
        run.emit(part, name, S / seconds, "images/s", goal="faster than fixed CFG" if fixed else None,
                 met=speedup > 1 if fixed else None, seconds=seconds, mfu=run.mfu(flops, seconds), flops=flops,
                 unet_rows=guidance_rows(guidance), speedup_vs_fixed=speedup, flops_ratio_vs_fixed=(2 * S * T * per_row + decode) / flops)
        fixed = fixed or seconds


# ---- part: the DDPO update at the sd15-aesthetic preset's defaults, and the ratio at the first update


def ddpo_samples(b: Bench, p, T: int):
    """One sampling batch as train_ddpo.py draws it in its first epoch: prompts of the preset's set,
    DiffExp's exploration (CFG schedule and prompt weighting, progress 0), DDIM with eta, under autocast;
    the UNet carries the LoRA of the bench's set-up (B = 0 before any update: the policy that samples)."""
    prompts = diffusion.load_prompts(p.prompts)
    g = torch.Generator().manual_seed(0)
    chosen = [prompts[i] for i in torch.randint(len(prompts), (p.sample.batch_size,), generator=g)]
    cond, positions = diffusion.encode_prompts(b.models, chosen)
    ts = diffusion.timesteps(b.models, T)
    cond, guidance, _ = explore.explore_batch(p.explore, cond, positions, ts, p.sample.guidance_scale, 0.0, g)
    b.models.unet.eval()
    with torch.no_grad(), b.precision.autocast():
        traj = diffusion.sample(b.models, cond, b.uncond, guidance, T, p.sample.eta, g, decode_images=False)
    return traj, cond, guidance


def micro_batch(traj: diffusion.Trajectory, cond, guidance, rows: slice):
    return dataclasses.replace(traj, latents=traj.latents[rows], log_probs=traj.log_probs[rows]), cond[rows], guidance[rows]


def ratio_error(b: Bench, traj, cond, guidance, tpf: int, eta: float) -> float:
    """max |ratio - 1| of one micro-batch re-scored as train_ddpo's first update does (train mode,
    autograd on, no step taken): its first_ratio_err. 0 would mean re-scoring reproduces sampling exactly."""
    b.models.unet.train()
    g = torch.Generator().manual_seed(1)
    errors = [(torch.exp(lp.detach() - old) - 1).abs().max() for lp, old, _ in ddpo_forwards(b, traj, cond, guidance, tpf, g, eta)]
    return torch.stack(errors).max().item()


def part_ddpo(run: Run):
    s, b, part = run.suite, run.sd(), "ddpo"
    p = train_ddpo.PRESETS["sd15-aesthetic"][1]
    S, B, T, eta, clip = p.sample.batch_size, p.train.batch_size, s.num_steps, p.sample.eta, p.train.clip_range
    traj, cond, guidance = ddpo_samples(b, p, T)
    micro = [micro_batch(traj, cond, guidance, slice(m, m + B)) for m in range(0, S, B)]
    for tpf in s.ddpo_tpf:  # before any update: the LoRA weights are still those that sampled
        name = f"ddpo first_ratio_err, {S} samples x {T} steps, micro-batches of {B}, tpf={tpf}"
        if run.late(part, name):
            return
        err = max(ratio_error(b, *m, tpf, eta) for m in micro)
        run.emit(part, name, err, "|ratio - 1|", goal=f"<= {clip:g} (the PPO clip range)", met=err <= clip,
                 note=f"sampled at batch {S}, re-scored at {B} x tpf, {s.dtype}, DiffExp's schedule")
    traj, cond, guidance = micro[0]
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(0)).to(b.device)
    flops = guidance_rows(guidance) * unet_call_flops(b.models, cond[:1], b.uncond, backward=True) / 2
    b.models.unet.train()
    for tpf in s.ddpo_tpf:
        name = f"ddpo update, batch {B} x {T} steps, tpf={tpf}, DiffExp's schedule"
        if run.late(part, name):
            return
        g = torch.Generator().manual_seed(2)

        def update():
            ddpo_update(b, traj, cond, guidance, advantages, tpf, g, eta, clip)
        seconds, memory, error = cuda_measure(lambda: timeit(update, b.device, s.burn_in, s.iters), b)
        run.emit(part, name, seconds and B * T / seconds, "transitions/s", status="error" if error else "ok", error=error,
                 seconds=seconds, mfu=run.mfu(flops, seconds), flops=flops, peak_mem_mb=memory, timesteps_per_forward=tpf,
                 unet_rows=guidance_rows(guidance))


# ---- part: AlignProp's memory at K = all


def part_alignprop(run: Run):
    """K = all (every step with gradient, checkpointed) at batch 4, then K = 1. Fixed CFG: every step
    runs both branches, the most memory (DiffExp's early steps run half the rows)."""
    s, b, part = run.suite, run.sd(), "alignprop"
    p = train_alignprop.PRESETS["sd15-aesthetic"][1]
    a = AlignPropBench(batch=s.alignprop_batch, num_steps=s.num_steps, guidance_scale=p.sample.guidance_scale)
    for k, burn_in, iters in ((s.num_steps, 0, 1), (1, s.burn_in, s.iters)):  # K = all: one step (~25 s), warm from the parts before
        name = f"alignprop K={'all' if k == s.num_steps else k} ({k} steps), batch {a.batch}, checkpointing"
        if run.late(part, name):
            return
        bk = dataclasses.replace(b, cfg=dataclasses.replace(b.cfg, alignprop=a, burn_in=burn_in, iters=iters))
        m = alignprop_measure(bk, k, p.checkpointing)
        emit_memory(run, part, name, m["seconds"], "s/step", m["seconds"], m["memory_mb"], m["error"],
                    ALIGNPROP_MEMORY_GOAL_GIB if k == s.num_steps else None,
                    mfu=run.mfu(m["flops"], m["seconds"]), flops=m["flops"], baseline_mb=m["baseline_mb"])


def emit_memory(run: Run, part, name, value, unit, seconds, memory_mb, error, goal_gib, **extra):
    """A record whose goal, if any, is a peak memory (torch.cuda.max_memory_allocated, weights included;
    the peak the allocator reserved beside it). On a CPU the peak is the RSS, no goal is checked."""
    reserved = torch.cuda.max_memory_reserved() / 2**20 if run.cuda and memory_mb is not None else None
    met = None
    if goal_gib and run.cuda:
        met = memory_mb is not None and memory_mb <= goal_gib * 1024
    run.emit(part, name, value, unit, status="error" if error else "ok", error=error, seconds=seconds,
             goal=f"peak <= {goal_gib} GiB" if goal_gib else None, met=met, peak_mem_mb=memory_mb, peak_reserved_mb=reserved,
             memory_method="torch.cuda.max_memory_allocated" if run.cuda else "peak RSS of the process", **extra)


# ---- part: SDXL, bench.py sdxl-gpu's stages


def part_sdxl(run: Run):
    """bench.py sdxl-gpu's sampling, DDPO update and AlignProp K = 1 stages at the trainers' SDXL batch sizes."""
    s, part = run.suite, "sdxl"
    run.bench = None  # SD v1.5's weights would count in SDXL's peak memory
    run.free()
    base = PRESETS["sdxl-gpu"][1]
    b = setup(dataclasses.replace(base, model=s.sdxl_model, device=s.device, dtype=s.dtype, threads=s.threads,
                                  burn_in=s.burn_in, iters=1, sample=dataclasses.replace(base.sample, num_steps=s.num_steps),
                                  ddpo=dataclasses.replace(base.ddpo, timesteps_per_forward=(1,)),
                                  alignprop=dataclasses.replace(base.alignprop, num_steps=s.num_steps)))
    for stage in (bench_sample, bench_ddpo):
        if run.late(part, f"sdxl: {stage.__name__}"):
            return
        n = len(b.records)
        stage(b)
        for r in b.records[n:]:
            goal = SDXL_MEMORY_GOAL_GIB if r.get("memory_mb") or r.get("error") else None
            emit_memory(run, part, f"sdxl: {r['name']}, batch {r['batch']}, {r['resolution']} px", r["value"], r["unit"],
                        r["seconds"], r.get("memory_mb"), r.get("error"), goal, mfu=r.get("mfu"), flops=r.get("flops"))
    name = f"sdxl: alignprop K=1, batch {base.alignprop.batch}, checkpointing"
    if not run.late(part, name):
        m = alignprop_measure(b, 1, True)
        emit_memory(run, part, name, m["seconds"], "s/step", m["seconds"], m["memory_mb"], m["error"], SDXL_MEMORY_GOAL_GIB,
                    mfu=run.mfu(m["flops"], m["seconds"]), flops=m["flops"])
    del b
    run.free()


# ---- part: one shrunk epoch of each trainer's SDXL preset, in a child process


def trainer_child(d: dict) -> dict:
    """Runs train_ddpo / train_alignprop with d["args"], in a child process, and returns its peak memory.
    The random architectures' weights are drawn on the device (load_models): set-up time only."""
    diffusion.load_models = load_models
    mod = importlib.import_module(d["trainer"])
    mod.main(mod.cli(d["args"]))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return dict(peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20, peak_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
                    memory_method="torch.cuda.max_memory_allocated over the run")
    return dict(peak_mem_mb=rss_mb("VmHWM"), peak_reserved_mb=None, memory_method="peak RSS of the process")


def part_sdxl_train(run: Run):
    s, part = run.suite, "sdxl-train"
    common_args = ["sdxl-aesthetic", "--model", s.sdxl_model, "--device", s.device, "--dtype", s.dtype, "--num-epochs", "1",
                   "--sample.num-steps", str(s.num_steps), "--reward.tiny", "--eval.no-diversity"]
    n = train_ddpo.SDXL.sample.batch_size  # one sampling batch; 20% of the steps trained, enough for time and memory
    trainers = (("train_ddpo", f"{n} samples, {max(1, int(s.num_steps * 0.2))} of the {s.num_steps} steps trained",
                 ["--sample.num-batches", "1", "--train.updates-per-epoch", "1", "--train.timestep-fraction", "0.2"]),
                ("train_alignprop", "2 samples, K = 1", ["--train.total-batch", "2"]))
    for trainer, shrunk, args in trainers:
        name = f"sdxl: {trainer} sdxl-aesthetic, one epoch of {shrunk}"
        if run.late(part, name):
            return
        with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
            try:
                peak = child("trainer_child", dict(name=name, trainer=trainer, args=common_args + args + ["--run-dir", tmp]),
                             timeout=max(run.left(), 1))
            except subprocess.TimeoutExpired:
                run.emit(part, name, status="error", error="stopped at the budget's deadline")
                continue
            m = read_metrics(os.path.join(tmp, "metrics.jsonl"))[-1]
        seconds = m["s_sample"] + m["s_reward"] + m["s_train"] if "s_train" in m else m["s_step"]
        mem = peak["peak_mem_mb"]
        met = mem <= SDXL_MEMORY_GOAL_GIB * 1024 if run.cuda else None
        keys = ("s_sample", "s_reward", "s_train", "s_step", "samples_per_s", "transitions_per_s", "first_ratio_err", "peak_mem_mb")
        run.emit(part, name, seconds, "s/epoch", goal=f"peak <= {SDXL_MEMORY_GOAL_GIB} GiB", met=met, seconds=seconds,
                 peak_mem_mb=mem, peak_reserved_mb=peak["peak_reserved_mb"], memory_method=peak["memory_method"],
                 metrics={k: m[k] for k in keys if k in m}, note="reward: the tiny random aesthetic model (no hub weights offline)")
        if "first_ratio_err" in m:
            clip = train_ddpo.SDXL.train.clip_range
            run.emit(part, f"sdxl: {trainer} first_ratio_err", m["first_ratio_err"], "|ratio - 1|",
                     goal=f"<= {clip:g} (the PPO clip range)", met=m["first_ratio_err"] <= clip)


# ---- part: trl 0.23.1, if installed


def part_trl(run: Run):
    s, part = run.suite, "trl"
    if importlib.util.find_spec("trl") is None:
        run.emit(part, "trl 0.23.1 comparison (bench_trl.py)", status="skipped",
                 error="trl is not installed here (bench_trl.py: a separate environment with trl==0.23.1)")
        return
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        out = os.path.join(tmp, "trl.jsonl")
        cmd = [sys.executable, "bench_trl.py", "--model", s.model, "--device", s.device, "--dtype", s.dtype,
               "--num-steps", str(s.trl_steps), "--epochs", "2", "--burn-in", "1", "--timesteps-per-forward", "1", "2", "--out", out]
        proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                              timeout=max(run.left(), 1))
        if proc.returncode != 0:
            raise RuntimeError(f"bench_trl.py exited with status {proc.returncode}:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            lines = [json.loads(line) for line in f]
    for r in lines:
        run.emit(part, f"trl comparison: {r['trainer']}, {s.trl_steps} steps", r["transitions_per_s"], "transitions/s",
                 samples_per_s=r["samples_per_s"], train_ratio_vs_trl=r["train_ratio_vs_trl"],
                 sample_ratio_vs_trl=r["sample_ratio_vs_trl"], trl=r["trl"])


PARTS = {"sweep": part_sweep, "diffexp": part_diffexp, "ddpo": part_ddpo, "alignprop": part_alignprop, "sdxl": part_sdxl,
         "sdxl-train": part_sdxl_train, "compile-modes": part_compile_modes, "trl": part_trl}


# -----------------------------------------------------------------------------
# The table: the suite's JSON lines as markdown (python bench.py table bench-gpu.jsonl)


@dataclass(frozen=True)
class Table:
    jsonl: tyro.conf.Positional[str] = "bench-gpu.jsonl"  # what `bench.py gpu --out` wrote


def render(records: list[dict]) -> str:
    """Markdown: for each run (a header record), a line with date, card, driver and versions, then one
    row per measurement: value, MFU, peak memory, goal, met?; then the wall time of each part."""
    head = ["| measurement | value | MFU | peak memory | goal | met? |", "|---|---|---|---|---|---|"]
    lines, in_table = [], False
    for r in records:
        if r["part"] == "header":
            lines += ["", header_line(r), ""] + head
            in_table = True
        elif r["part"] == "footer":
            lines += ["", "Wall time per part: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["part_s"].items())
                      + f"; in all {r['total_s']:.0f} s."]
            in_table = False
        else:
            if not in_table:
                lines += [""] + head
                in_table = True
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row(r)) + " |")
    return "\n".join(lines).strip() + "\n"


def header_line(h: dict) -> str:
    card = h["card"] + (f" ({h['memory_gib']:.0f} GiB)" if h.get("memory_gib") else "")
    s = h.get("suite", {})
    return (f"**{card}**, driver {h.get('driver') or 'n/a'}, CUDA {h.get('cuda') or 'n/a'}, {h['date']}; torch {h['torch']}, "
            f"diffusers {h['diffusers']}, transformers {h['transformers']}; models {s.get('model')} / {s.get('sdxl_model')}, "
            f"{s.get('dtype')}, budget {s.get('budget_s', 0):.0f} s.")


def row(r: dict) -> tuple[str, ...]:
    def num(x):
        return "-" if x is None else f"{x:.4g}"
    if r["status"] == "ok":
        value = f"{num(r['value'])} {r['unit']}".strip()
        if r.get("seconds") and not r["unit"].startswith("s/"):
            value += f" ({r['seconds']:.3g} s)"
    else:  # the exception's last line (a child's traceback ends with it)
        reason = (r.get("error") or "").strip().splitlines() or [""]
        value = f"{r['status']}: {reason[-1][:160]}"
    name = r["name"] + (f" ({r['note']})" if r.get("note") else "")
    mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
    mem = "-"
    if r.get("peak_mem_mb") is not None:
        mem = f"{r['peak_mem_mb'] / 1024:.1f} GiB" + ("" if "cuda" in r.get("memory_method", "cuda") else " RSS")
    met = {True: "yes", False: "**no**", None: "-"}[r.get("met")]
    return name, value, mfu, mem, r.get("goal") or "-", met


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------


def table(records: list[dict]) -> str:
    def num(x, fmt):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
    rows = [("measurement", "batch", "T", "res", "value", "unit", "s/iter", "GFLOP/iter", "MFU", "peak MB (+step)")]
    for r in records:
        memory = "-" if r.get("memory_mb") is None else f"{r['memory_mb']:.0f} (+{r['memory_mb'] - r['baseline_mb']:.0f})"
        rows.append((r["name"], str(r["batch"]), num(r["steps"], "d"), str(r["resolution"]),
                     r.get("error") or num(r["value"], ".4g"), r["unit"], num(r["seconds"], ".4g"),
                     num(r["flops"] / 1e9 if r.get("flops") else None, ".4g"), num(r.get("mfu"), ".1%"),
                     memory))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main(cfg: Config | Suite | Table):
    if isinstance(cfg, Table):
        text = render(read_jsonl(cfg.jsonl))
        print(text, end="")
        return text
    if isinstance(cfg, Suite):
        return run_suite(cfg)
    b = setup(cfg)
    where = f"{b.device} ({torch.get_num_threads()} threads)" if b.device == "cpu" else torch.cuda.get_device_name(b.device)
    print(f"bench: model {cfg.model} on {where}, {cfg.dtype}{', compiled UNet' if cfg.compile else ''}, torch {torch.__version__}, "
          f"burn-in {cfg.burn_in}, median of {cfg.iters} timed iterations", flush=True)
    stages = {"sample": bench_sample, "ddpo": bench_ddpo, "alignprop": bench_alignprop, "reward": bench_reward}
    for stage in cfg.stages:
        stages[stage](b)
    print("\n" + table(b.records), flush=True)
    return b.records


def cli(args=None) -> Config | Suite | Table:
    """The stage presets (tiny, sd15-gpu, sdxl-gpu), the suite's (gpu, gpu-tiny), and `table JSONL`."""
    commands = PRESETS | SUITE_PRESETS | {"table": ("The suite's JSON lines as a markdown table, on stdout.", Table())}
    return tyro.extras.overridable_config_cli(commands, args=args, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    run_cli(main, cli)
