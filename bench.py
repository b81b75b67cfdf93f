"""
Benchmarks of the hot loops, in the manner of nanoGPT's bench.py: stripped copies of sampling, the DDPO
update, one AlignProp step and the learned rewards, each with burn-in, a timed stage with synchronised
timers, and (for the UNet stages) FLOPs counted once and an MFU estimate.

One stage or several, on a CPU or one GPU:

    python bench.py tiny                                   # tiny offline model on a CPU, about a minute
    OMP_NUM_THREADS=2 python bench.py tiny --threads 2 --out bench-cpu.jsonl
    python bench.py sd15-gpu --out bench-gpu.jsonl         # SD v1.5 architecture, random weights, bf16
    python bench.py sdxl-gpu --out bench-gpu.jsonl         # the same for SDXL base at 1024 px
    python bench.py tiny --stages sample ddpo              # some stages only
    python bench.py tiny --help                            # every flag

Every GPU measurement in one time-boxed run, with its markdown table, is bench_gpu.py, built on these
stages.

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
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from torch.utils.flop_counter import FlopCounterMode

import common
import diffusion
import flow
import lora
import rewards
from scaffold import run_cli
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
    timesteps_per_forward: tuple[int, ...] = (1, 10)  # one measurement each (--train.timesteps-per-forward)
    clip_range: float = 1e-4


@dataclass(frozen=True)
class AlignPropBench:
    batch: int = 2  # trajectories per micro-batch (one backward each)
    num_steps: int = 50  # DDIM steps T
    guidance_scale: float = 7.5
    k: tuple[int, ...] = (1, 0)  # gradients through the last K steps; 0 means all T
    checkpointing: tuple[bool, ...] = (True, False)  # gradient checkpointing of each UNet call with gradient
    reward: Literal["brightness", "contrast"] = "brightness"  # model-free: the cost is the diffusion model's


@dataclass(frozen=True)
class RewardBench:
    names: tuple[LearnedReward, ...] = ("aesthetic", "pickscore", "hpsv2")
    batch: int = 8  # images per call, at the diffusion model's resolution
    tiny: bool = True  # small random reward models (rewards.py's tiny=True); False: full-size, random weights


@dataclass(frozen=True)
class Config:
    model: str = "tiny"  # tiny | sd15-random (full SD v1.5 architecture, random weights) | a diffusers folder
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    # as the trainers' --dtype: frozen weights, autocast, GradScaler (float16)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int = 0  # CPU threads for torch (0: torch's default, which follows OMP_NUM_THREADS)
    stages: tuple[Stage, ...] = ("sample", "ddpo", "alignprop", "reward")
    burn_in: int = 1  # untimed iterations before each measurement (allocator, kernel selection, caches)
    iters: int = 3  # timed iterations per measurement; the median is reported
    lora_rank: int = 4  # LoRA on the UNet's attention projections, as the trainers' default
    compile: bool = False  # torch.compile the UNet, as the trainers' --compile (FLOPs: on the uncompiled one)
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
    "sd15-gpu": ("Full-size SD v1.5 architecture (random weights), 512 px, bf16, one GPU; the papers' "
                 "batch sizes.",
                 Config(model="sd15-random", device="cuda", dtype="bfloat16", iters=3,
                        sample=SampleBench(batch=8, num_steps=50),
                        ddpo=DDPOBench(batch=4, timesteps_per_forward=(1, 2)),
                        alignprop=AlignPropBench(batch=2, num_steps=50),
                        reward=RewardBench(batch=8, tiny=False))),
    "sdxl-gpu": ("Full-size SDXL base architecture (random weights), 1024 px, bf16, one GPU; the trainers' "
                 "SDXL batch sizes.",
                 Config(model="sdxl-random", device="cuda", dtype="bfloat16", iters=2,
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
    math_backend = sdpa_kernel(SDPBackend.MATH) if device == "cpu" else nullcontext()
    with FlopCounterMode(display=False) as counter, math_backend:
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


def cuda_measure(run, b: "Bench"):
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


# -----------------------------------------------------------------------------
# Records and child processes


def write_record(r: dict, out: str, records: list) -> dict:
    """One measurement: a JSON line on stdout, appended and flushed to `out` (if set, so a run stopped
    from outside keeps it), and kept in `records` as a reader of that file sees it. -> the kept record."""
    line = json.dumps(r, default=str)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    records.append(json.loads(line))
    return records[-1]


def child(target: str, payload: dict, timeout: float | None = None) -> dict:
    """target ("module.function", e.g. "bench.alignprop_child")(payload) -> dict, run in a fresh Python
    process: its own peak memory, CUDA context and compile caches, and a time limit that can stop it
    (subprocess.TimeoutExpired; a compilation cannot be interrupted in-process). The dict comes back as
    the last line the process prints."""
    code = ("import importlib, json, sys; module, fn = sys.argv[1].rsplit('.', 1); "
            "print(json.dumps(getattr(importlib.import_module(module), fn)(json.loads(sys.argv[2]))))")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code, target, json.dumps(payload)], cwd=here,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{target} ({payload.get('name', '')}) exited with status {out.returncode}:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def config_from_dict(cls, d: dict):
    """The inverse of dataclasses.asdict for the config classes (JSON has turned their tuples into lists)."""
    def value(f):
        v = d[f.name]
        if dataclasses.is_dataclass(f.type):
            return config_from_dict(f.type, v)
        return tuple(v) if isinstance(v, list) else v
    return cls(**{f.name: value(f) for f in dataclasses.fields(cls)})


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
        texts = [prompts[i % len(prompts)].text for i in range(batch)]
        return diffusion.encode_text(self.models, texts)  # (B, 77, D)

    def emit(self, name, batch, steps, value, unit, seconds, flops=None, **extra) -> dict:
        """One measurement, written by write_record (stdout, --out) and kept for the table."""
        device_name = torch.cuda.get_device_name(self.device) if self.device.startswith("cuda") else "cpu"
        r = dict(name=name, device=device_name, dtype=self.cfg.dtype, batch=batch, steps=steps,
                 resolution=self.models.image_size, value=value, unit=unit, seconds=seconds,
                 compile=self.cfg.compile)
        if self.device == "cpu":
            r["threads"] = torch.get_num_threads()
        if flops is not None:
            peak = peak_flops(self.device, self.dtype)
            achieved = flops / seconds if seconds else None
            r.update(flops=flops, flop_per_s=achieved, mfu=achieved / peak if peak and achieved else None)
        r.update(extra)
        return write_record(r, self.cfg.out, self.records)


RANDOM_MODELS = ("tiny", "sd15-random", "tiny-sdxl", "sdxl-random", "tiny-sd3", "sd35m-random")


def load_models(name: str = "tiny", device="cpu", dtype=torch.float32, seed: int = 0):
    """diffusion.load_models (flow.load_flow_models for SD3 models), with a random architecture's weights
    drawn on `device` itself: drawing SDXL's 3.5 B random weights on the host takes about a minute (SD
    v1.5's 1.1 B: 14 s on 2 cores), a large part of a measurement budget, and their values do not matter
    here. The scheduler is rebuilt outside, so its tensors stay on the host, as the loaders leave them. On
    a CPU this is the loader itself. The same signature as the loaders: a loader to hand to what takes one."""
    load = flow.load_flow_models if flow.is_flow_model(name) else diffusion.load_models
    if name not in RANDOM_MODELS:
        return load(name, device=device, dtype=dtype, seed=seed)
    try:
        with torch.device(device):
            models = load(name, device=device, dtype=dtype, seed=seed)
    except Exception as e:  # a constructor that does not follow the default device: the host's draw, slower
        print(f"bench: drawing {name}'s weights on {device} failed ({type(e).__name__}: {e}); "
              "drawing them on the host", flush=True)
        return load(name, device=device, dtype=dtype, seed=seed)
    models.scheduler = type(models.scheduler).from_config(models.scheduler.config)
    return models


def setup(cfg: Config) -> Bench:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = common.resolve_device(cfg.device)
    dtype = common.resolve_dtype(cfg.dtype, device)  # as the trainers: also TF32 for float32 matmuls on a GPU
    models = load_models(cfg.model, device=device, dtype=dtype, seed=cfg.seed)
    # as the trainers: LoRA on from the start
    params = lora.inject(models.unet, rank=cfg.lora_rank, alpha=cfg.lora_rank, seed=cfg.seed)
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


def ddpo_forwards(b: Bench, traj: diffusion.Trajectory, cond, guidance, tpf: int, g: torch.Generator,
                  eta: float):
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
        w = guidance[torch.arange(B)[:, None].expand_as(i).reshape(-1),
                     order_host[:, j:j + tpf].reshape(-1)]  # on the host
        rows, i = idx[:, None].expand_as(i).reshape(-1), i.reshape(-1)  # (B*c,)
        with b.precision.autocast():
            log_prob = diffusion.step_log_prob(b.models, traj.latents[rows, i], timesteps[i],
                                               traj.latents[rows, i + 1], cond[rows], b.uncond, w, eta, T)
        yield log_prob, traj.log_probs[rows, i], rows


def ddpo_update(b: Bench, traj, cond, guidance, advantages, tpf: int, g, eta: float, clip_range: float):
    """One optimizer step on one micro-batch: the PPO loss of every forward, backward, clipping, AdamW."""
    B, T = guidance.shape
    for log_prob, old_log_prob, rows in ddpo_forwards(b, traj, cond, guidance, tpf, g, eta):
        loss = ppo_loss(log_prob, old_log_prob, advantages[rows], clip_range)[0]
        b.precision.backward(loss * (len(rows) // B) / T)
    b.precision.step(b.optimizer, b.params, 1.0, 1, "bench ddpo")


def bench_ddpo(b: Bench):
    """DDPO's training pass (train_ddpo.py's inner loop): one micro-batch of trajectories re-scored at
    all T timesteps in shuffled order, timesteps_per_forward of them folded into each UNet batch, the
    PPO loss, backward, then gradient clipping and an AdamW step on the LoRA weights."""
    s, d, models = b.cfg.sample, b.cfg.ddpo, b.models
    T, B = s.num_steps, d.batch
    cond = b.conditioning(B)
    g = torch.Generator().manual_seed(b.cfg.seed)
    # real trajectories to re-score (LoRA B = 0: the ratio starts at 1)
    with torch.no_grad(), b.precision.autocast():
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
        b.emit(f"ddpo update tpf={tpf}", B, T, seconds and B * T / seconds, "transitions/s", seconds,
               seconds and flops, timesteps_per_forward=tpf, unet_batch=2 * B * min(tpf, T), memory_mb=memory,
               baseline_mb=baseline, error=error)


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
            raise RuntimeError("bench: peak RSS cannot be reset on this system (/proc/self/clear_refs); "
                               "use --stages without alignprop.")
        baseline = rss_mb("VmRSS")
        seconds = timeit(step, b.device, b.cfg.burn_in, b.cfg.iters)
        memory = rss_mb("VmHWM")
    T = a.num_steps
    flops = ((T - k) * unet_call_flops(models, cond, b.uncond)
             + k * unet_call_flops(models, cond, b.uncond, backward=True)
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
            b.emit(name, a.batch, a.num_steps, m["seconds"], "s/step", m["seconds"], m["flops"], k=k,
                   checkpointing=checkpointing, memory_mb=m["memory_mb"], baseline_mb=m["baseline_mb"],
                   memory_method=method, error=m["error"])


def alignprop_subprocess(cfg: Config, k: int, checkpointing: bool) -> dict:
    """alignprop_measure in a fresh Python process (CPU memory: its own peak RSS) -> its dict."""
    return child("bench.alignprop_child", dict(cfg=dataclasses.asdict(cfg), k=k, checkpointing=checkpointing,
                                               threads=torch.get_num_threads()))


def alignprop_child(d: dict) -> dict:
    """The subprocess's side of alignprop_subprocess."""
    cfg = dataclasses.replace(config_from_dict(Config, d["cfg"]), threads=d["threads"])
    return alignprop_measure(setup(cfg), d["k"], d["checkpointing"])


def reward_scorer(name: str, tiny: bool, device: str, dtype: torch.dtype):
    """The reward's image path: images in [0, 1] (B, 3, H, W) -> (B,). tiny: rewards.make_reward itself.
    Otherwise the full-size architectures with random weights (nothing downloaded), scoring as rewards.py
    does; its text embeddings are cached per prompt, so fixed random ones stand in for them here."""
    if tiny:
        fn = rewards.make_reward(name, device, dtype, tiny=True)
        return lambda images: fn(images, ["a cat"] * len(images))
    import open_clip

    def preprocess(images):
        return rewards.clip_preprocess(images).to(dtype)
    if name == "aesthetic":  # OpenAI CLIP ViT-L/14 image tower + the LAION head shipped in the repo
        clip = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
        visual = rewards.frozen(clip.visual, device, dtype)
        head = rewards.frozen(rewards.load_aesthetic_head(), device, dtype)
        return lambda images: head(F.normalize(visual(preprocess(images)), dim=-1)).squeeze(-1).float()
    if name == "hpsv2":  # open_clip ViT-H-14
        model = rewards.frozen(open_clip.create_model("ViT-H-14", pretrained=None), device, dtype)
        text = F.normalize(torch.randn(1, 1024, device=device, dtype=dtype), dim=-1)
        return lambda images: (model.encode_image(preprocess(images), normalize=True) * text).sum(-1).float()
    from transformers import CLIPConfig, CLIPModel  # PickScore: a transformers CLIPModel, ViT-H/14 config
    config = CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120,
                           num_hidden_layers=32, num_attention_heads=16, hidden_act="gelu"),
        projection_dim=1024)
    model = rewards.frozen(CLIPModel(config), device, dtype)
    text = F.normalize(torch.randn(1, 1024, device=device, dtype=dtype), dim=-1)

    def score(images):
        emb = rewards.features(model.get_image_features(pixel_values=preprocess(images)))
        return (model.logit_scale.exp() * (F.normalize(emb, dim=-1) * text).sum(-1)).float()
    return score


def bench_reward(b: Bench):
    """Images/s of each learned reward without gradients (DDPO's reward pass), at the model's resolution."""
    r = b.cfg.reward
    size = b.models.image_size
    g = torch.Generator().manual_seed(b.cfg.seed)
    images = torch.rand((r.batch, 3, size, size), generator=g).to(b.device)
    for name in r.names:
        score = reward_scorer(name, r.tiny, b.device, b.dtype)
        with torch.no_grad():
            seconds = timeit(lambda: score(images), b.device, b.cfg.burn_in, b.cfg.iters)
        b.emit(f"reward {name}{' (tiny)' if r.tiny else ''}", r.batch, None, r.batch / seconds, "images/s",
               seconds)
        del score
        if b.device.startswith("cuda"):
            torch.cuda.empty_cache()


STAGES = {"sample": bench_sample, "ddpo": bench_ddpo, "alignprop": bench_alignprop, "reward": bench_reward}

# -----------------------------------------------------------------------------
# The table and the command line


def table(records: list[dict]) -> str:
    """The stages' records as a plain-text table, one row each."""
    def num(x, fmt):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
    rows = [("measurement", "batch", "T", "res", "value", "unit", "s/iter", "GFLOP/iter", "MFU",
             "peak MB (+step)")]
    for r in records:
        memory = "-"
        if r.get("memory_mb") is not None:
            memory = f"{r['memory_mb']:.0f} (+{r['memory_mb'] - r['baseline_mb']:.0f})"
        rows.append((r["name"], str(r["batch"]), num(r["steps"], "d"), str(r["resolution"]),
                     r.get("error") or num(r["value"], ".4g"), r["unit"], num(r["seconds"], ".4g"),
                     num(r["flops"] / 1e9 if r.get("flops") else None, ".4g"), num(r.get("mfu"), ".1%"),
                     memory))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in rows)


def main(cfg: Config) -> list[dict]:
    b = setup(cfg)
    where = (f"{b.device} ({torch.get_num_threads()} threads)" if b.device == "cpu"
             else torch.cuda.get_device_name(b.device))
    print(f"bench: model {cfg.model} on {where}, {cfg.dtype}{', compiled UNet' if cfg.compile else ''}, "
          f"torch {torch.__version__}, burn-in {cfg.burn_in}, median of {cfg.iters} timed iterations",
          flush=True)
    for stage in cfg.stages:
        STAGES[stage](b)
    print("\n" + table(b.records), flush=True)
    return b.records


def cli(args=None) -> Config:
    """The presets: tiny, sd15-gpu, sdxl-gpu; each flag overrides."""
    return tyro.extras.overridable_config_cli(PRESETS, args=args, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    run_cli(main, cli)
