"""
The GPU suite's measurement parts (python bench_gpu.py run; the runner, its Run record and the table are in
bench_gpu.py): each part measures through bench.py's set-up and stages and writes its records with
Run.emit, keeping to the run's budget with Run.late. PARTS maps a part's name to its function, which
bench_gpu.run_suite calls in priority order (PART_SECONDS's), each under its estimate.

The parts, in priority order: GRPO on the SD3.5 Medium architecture (train_grpo's sd35m-pickscore preset,
shrunk: rollout images/s, training transitions/s, peak memory; goal 80 GiB), the sampling MFU sweep on
SD v1.5 (batch sizes, channels_last, SDPA backends, torch.compile; goal 50% MFU), DiffExp's guidance
schedule against fixed CFG, the DDPO update at the sd15-aesthetic preset's defaults with first_ratio_err
(goal: at most the PPO clip range),
AlignProp with gradients through all steps at batch 4 (goal: 24 GiB), SDXL's stages and one shrunk epoch
of each trainer's SDXL preset (goal: 80 GiB), the costlier torch.compile modes, and trl 0.23.1 through
bench_trl.py when it is installed. Compilations and the trainers run in child processes (bench.child,
targets "bench_parts.compile_child" and "bench_parts.trainer_child"), which the deadline can stop.
"""

import dataclasses
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Literal

import torch

import diffusion
import explore
import train_alignprop
import train_ddpo
from bench import (PRESETS, AlignPropBench, Bench, Config, alignprop_measure, bench_ddpo, bench_sample,
                   child, cuda_measure, ddpo_forwards, ddpo_update, decode_flops, load_models, rss_mb, setup,
                   timeit, unet_call_flops)
from scaffold import read_metrics

if TYPE_CHECKING:  # the parts' argument; bench_gpu.py imports this file, not the other way round
    from bench_gpu import Run

# -----------------------------------------------------------------------------
# The parts' estimates and goals
#
# Estimates on one H200, bf16, from docs/benchmarks.md (sampling batch 8 x 50 steps 3.7 s, compiled
# 2.4 s; a DDPO update 6.3 s; AlignProp K = all 13 s per step at batch 2), in seconds:
#   grpo           130  two shrunk epochs of train_grpo's sd35m-pickscore in a child (not yet measured on a
#                       GPU; from FLOPs): start-up and drawing SD3.5 Medium's 7.9 B random weights on the
#                       card ~30; per epoch one group of 24 rollouts of 10 steps at 512 px (~13 TFLOP per
#                       guided image-step: ~8 s at 40% MFU) and its training pass (240 transitions, each a
#                       guided forward and backward and the LoRA-off reference forward: ~4x, ~35 s)
#   sweep          135  SD v1.5 set-up 15; the denoising loop (10 steps, no decode) at batch 8 / 16 / 32
#                       (~1, 2, 3 s a call at 25% MFU), then channels_last and the SDPA backends at the best
#                       batch, 3 calls each and a FLOP count (~50); torch.compile (default mode) of the best
#                       of those in a child: start-up 10, compilation ~50, 4 calls (~70, capped at
#                       compile_cap_s)
#   diffexp         25  sampling batch 8 x 50 steps with decode, fixed CFG vs DiffExp's schedule, 3 calls
#                       each
#   ddpo            50  a sampling batch of 8 with DiffExp; first_ratio_err at 1 and 2 timesteps per forward
#                       (2 x 2 micro-batches, forward only); the update at 1 and 2 timesteps per forward, 3
#                       calls each
#   alignprop       40  batch 4: K = all, one step (~25: the other parts have warmed the kernels); K = 1, 3
#                       steps
#   sdxl            70  SDXL set-up 15; sampling batch 4 x 50 at 1024 px (~9 s a call), the DDPO update at
#                       batch 1 (~6 s), AlignProp K = 1 at batch 1, 2 calls each
#   sdxl-train      80  one shrunk epoch of each trainer's sdxl-aesthetic in a child (start-up ~20 each):
#                       DDPO 4 samples, 10 of the 50 timesteps trained; AlignProp 2 samples
#   compile-modes   90  "reduce-overhead" (CUDA graphs) in a child, ~90; "max-autotune-no-cudagraphs" only
#                       if 60 s are left (its autotuning may take minutes: stopped at the cap or the
#                       deadline, an error record)
#   trl            130  bench_trl.py at 20 steps, if trl is installed (skipped otherwise)
# The must-haves (all but the last two) come to ~400 s; the default budget is 510 s, so compile-modes runs
# its first mode, and the run ends by ~520 s with Python's start-up.

Part = Literal["grpo", "sweep", "diffexp", "ddpo", "alignprop", "sdxl", "sdxl-train", "compile-modes", "trl"]
PART_SECONDS = {"grpo": 130, "sweep": 135, "diffexp": 25, "ddpo": 50, "alignprop": 40, "sdxl": 70,
                "sdxl-train": 80, "compile-modes": 90, "trl": 130}
# the seconds that must be left to start a compiled configuration, by mode
COMPILE_SECONDS = {"default": 75, "reduce-overhead": 90, "max-autotune-no-cudagraphs": 60}
MFU_GOAL = 0.5
ALIGNPROP_MEMORY_GOAL_GIB = 24  # K = all at batch 4 must fit a 24 GB card
SDXL_MEMORY_GOAL_GIB = 80  # the SDXL presets are sized for one 80 GB GPU
GRPO_MEMORY_GOAL_GIB = 80  # so is train_grpo's sd35m-pickscore


# -----------------------------------------------------------------------------
# The parts


# ---- shared: an exception as a record's error (the runner's too), the UNet rows of a guidance schedule


def error_text(e: Exception) -> str:
    return "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}"


def guidance_rows(guidance: torch.Tensor) -> int:
    """UNet rows that guided_eps runs for these guidance scales: uncond where w != 1, cond where w != 0."""
    return int((guidance != 1).sum() + (guidance != 0).sum())


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


def sweep_measure(run: "Run", part: str, batch: int, compile: str = "", channels_last: bool = False,
                  sdpa: str = "default"):
    """One sweep configuration: eager in this process, compiled in a child (stopped at compile_cap_s or the
    deadline). -> its record, or None when it was skipped or failed (then a skipped or error record)."""
    s = run.suite
    config = dict(batch=batch, compile=compile or None, channels_last=channels_last, sdpa=sdpa)
    name = (f"sample sweep: batch {batch}, {f'compile {compile}' if compile else 'eager'}, "
            f"{'channels_last' if channels_last else 'NCHW'}, SDPA {sdpa}")
    if run.late(part, name, COMPILE_SECONDS.get(compile, 0)):
        return None
    try:
        if compile:
            payload = dict(name=name, model=s.model, device=s.device, dtype=s.dtype, threads=s.threads,
                           steps=s.sweep_steps, iters=s.iters, backend=s.compile_backend, mode=compile,
                           **config)
            m = child("bench_parts.compile_child", payload, timeout=max(min(run.left(), s.compile_cap_s), 1))
        else:
            with memory_format(run.sd().models.unet, channels_last):
                m = denoise_measure(run.sd(), batch, s.sweep_steps, sdpa, 0, s.iters)
    except Exception as e:
        error = (f"stopped after {e.timeout:.0f} s (the compile cap or the deadline)"
                 if isinstance(e, subprocess.TimeoutExpired) else error_text(e))
        run.emit(part, name, status="error", error=error, config=config)
        run.free()
        return None
    mfu = run.mfu(m["flops"], m["seconds"])
    r = run.emit(part, name, batch * s.sweep_steps / m["seconds"], "image-steps/s",
                 goal=f"MFU >= {MFU_GOAL:.0%}", met=None if mfu is None else mfu >= MFU_GOAL,
                 seconds=m["seconds"], mfu=mfu, flops=m["flops"], steps=s.sweep_steps,
                 first_call_s=m["first_s"],
                 compile_s=m["first_s"] - m["seconds"] if compile else None, config=config)
    if run.best is None or score(r) > score(run.best):
        run.best = r
    return r


def score(r: dict) -> float:
    return r["mfu"] if r["mfu"] is not None else r["value"]  # a CPU has no MFU: throughput instead


def emit_winner(run: "Run", part: str):
    best = run.best
    if best is not None:
        run.emit(part, f"sample sweep: best so far ({best['name'].split(': ', 1)[1]})", best["value"],
                 best["unit"], goal=best["goal"], met=best["met"], seconds=best["seconds"], mfu=best["mfu"],
                 config=best["config"])


def part_sweep(run: "Run"):
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


def part_compile_modes(run: "Run"):
    """The compile modes that cost most to compile, on the sweep's best eager configuration."""
    part = "compile-modes"
    eager = [r for r in run.records if r["part"] == "sweep" and r["status"] == "ok"
             and r.get("config", {}).get("compile") is None
             and not r["name"].startswith("sample sweep: best")]
    c = (max(eager, key=score)["config"] if eager
         else dict(batch=max(run.suite.sweep_batches), channels_last=False, sdpa="default"))
    for mode in run.suite.compile_modes:
        if run.cuda:
            sweep_measure(run, part, c["batch"], mode, c["channels_last"], c["sdpa"])
        else:
            graphs = mode in ("reduce-overhead", "max-autotune")
            error = ("CUDA graphs: CUDA only" if graphs else "a CPU run compiles with dynamo's eager "
                     "backend (the sweep's default mode), where modes do not apply")
            run.emit(part, f"sample sweep: compile {mode}", status="skipped", error=error)
    emit_winner(run, part)


# ---- part: DiffExp's guidance schedule against fixed CFG


def part_diffexp(run: "Run"):
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
    diffexp = f"DiffExp's schedule (w_low {p.explore.w_low:g} at t > {p.explore.t_thres}, then {w_high:g})"
    for what, guidance in ((f"fixed CFG {w_high:g}", torch.full((S, T), w_high)), (diffexp, schedule)):
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
                 met=speedup > 1 if fixed else None, seconds=seconds, mfu=run.mfu(flops, seconds),
                 flops=flops, unet_rows=guidance_rows(guidance), speedup_vs_fixed=speedup,
                 flops_ratio_vs_fixed=(2 * S * T * per_row + decode) / flops)
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
    cond, guidance = explore.explore_batch(p.explore, cond, positions, ts, p.sample.guidance_scale, 0.0, g,
                                           diffusion.PROMPT_LENGTH)
    b.models.unet.eval()
    with torch.no_grad(), b.precision.autocast():
        traj = diffusion.sample(b.models, cond, b.uncond, guidance, T, p.sample.eta, g, decode_images=False)
    return traj, cond, guidance


def micro_batch(traj: diffusion.Trajectory, cond, guidance, rows: slice):
    return (dataclasses.replace(traj, latents=traj.latents[rows], log_probs=traj.log_probs[rows]),
            cond[rows], guidance[rows])


def ratio_error(b: Bench, traj, cond, guidance, tpf: int, eta: float) -> float:
    """max |ratio - 1| of one micro-batch re-scored as train_ddpo's first update does (train mode,
    autograd on, no step taken): its first_ratio_err. 0 would mean re-scoring reproduces sampling exactly."""
    b.models.unet.train()
    g = torch.Generator().manual_seed(1)
    errors = [(torch.exp(lp.detach() - old) - 1).abs().max()
              for lp, old, _ in ddpo_forwards(b, traj, cond, guidance, tpf, g, eta)]
    return torch.stack(errors).max().item()


def part_ddpo(run: "Run"):
    s, b, part = run.suite, run.sd(), "ddpo"
    p = train_ddpo.PRESETS["sd15-aesthetic"][1]
    S, B, T = p.sample.batch_size, p.train.batch_size, s.num_steps
    eta, clip = p.sample.eta, p.train.clip_range
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
        run.emit(part, name, seconds and B * T / seconds, "transitions/s", status="error" if error else "ok",
                 error=error, seconds=seconds, mfu=run.mfu(flops, seconds), flops=flops, peak_mem_mb=memory,
                 timesteps_per_forward=tpf, unet_rows=guidance_rows(guidance))


# ---- part: AlignProp's memory at K = all


def part_alignprop(run: "Run"):
    """K = all (every step with gradient, checkpointed) at batch 4, then K = 1. Fixed CFG: every step
    runs both branches, the most memory (DiffExp's early steps run half the rows)."""
    s, b, part = run.suite, run.sd(), "alignprop"
    p = train_alignprop.PRESETS["sd15-aesthetic"][1]
    a = AlignPropBench(batch=s.alignprop_batch, num_steps=s.num_steps,
                       guidance_scale=p.sample.guidance_scale)
    # K = all: one step (~25 s), warm from the parts before
    for k, burn_in, iters in ((s.num_steps, 0, 1), (1, s.burn_in, s.iters)):
        name = f"alignprop K={'all' if k == s.num_steps else k} ({k} steps), batch {a.batch}, checkpointing"
        if run.late(part, name):
            return
        cfg = dataclasses.replace(b.cfg, alignprop=a, burn_in=burn_in, iters=iters)
        bk = dataclasses.replace(b, cfg=cfg)
        m = alignprop_measure(bk, k, p.checkpointing)
        emit_memory(run, part, name, m["seconds"], "s/step", m["seconds"], m["memory_mb"], m["error"],
                    ALIGNPROP_MEMORY_GOAL_GIB if k == s.num_steps else None,
                    mfu=run.mfu(m["flops"], m["seconds"]), flops=m["flops"], baseline_mb=m["baseline_mb"])


def emit_memory(run: "Run", part, name, value, unit, seconds, memory_mb, error, goal_gib, **extra):
    """A record whose goal, if any, is a peak memory (torch.cuda.max_memory_allocated, weights included;
    the peak the allocator reserved beside it). On a CPU the peak is the RSS, no goal is checked."""
    reserved = torch.cuda.max_memory_reserved() / 2**20 if run.cuda and memory_mb is not None else None
    met = None
    if goal_gib and run.cuda:
        met = memory_mb is not None and memory_mb <= goal_gib * 1024
    run.emit(part, name, value, unit, status="error" if error else "ok", error=error, seconds=seconds,
             goal=f"peak <= {goal_gib} GiB" if goal_gib else None, met=met, peak_mem_mb=memory_mb,
             peak_reserved_mb=reserved,
             memory_method="torch.cuda.max_memory_allocated" if run.cuda else "peak RSS of the process",
             **extra)


# ---- part: SDXL, bench.py sdxl-gpu's stages


def part_sdxl(run: "Run"):
    """bench.py sdxl-gpu's sampling, DDPO update and AlignProp K = 1 stages, at the trainers' SDXL batch
    sizes."""
    s, part = run.suite, "sdxl"
    run.bench = None  # SD v1.5's weights would count in SDXL's peak memory
    run.free()
    base = PRESETS["sdxl-gpu"][1]
    b = setup(dataclasses.replace(base, model=s.sdxl_model, device=s.device, dtype=s.dtype,
                                  threads=s.threads, burn_in=s.burn_in, iters=1,
                                  sample=dataclasses.replace(base.sample, num_steps=s.num_steps),
                                  ddpo=dataclasses.replace(base.ddpo, timesteps_per_forward=(1,)),
                                  alignprop=dataclasses.replace(base.alignprop, num_steps=s.num_steps)))
    for stage in (bench_sample, bench_ddpo):
        if run.late(part, f"sdxl: {stage.__name__}"):
            return
        n = len(b.records)
        stage(b)
        for r in b.records[n:]:
            goal = SDXL_MEMORY_GOAL_GIB if r.get("memory_mb") or r.get("error") else None
            name = f"sdxl: {r['name']}, batch {r['batch']}, {r['resolution']} px"
            emit_memory(run, part, name, r["value"], r["unit"], r["seconds"], r.get("memory_mb"),
                        r.get("error"), goal, mfu=r.get("mfu"), flops=r.get("flops"))
    name = f"sdxl: alignprop K=1, batch {base.alignprop.batch}, checkpointing"
    if not run.late(part, name):
        m = alignprop_measure(b, 1, True)
        emit_memory(run, part, name, m["seconds"], "s/step", m["seconds"], m["memory_mb"], m["error"],
                    SDXL_MEMORY_GOAL_GIB, mfu=run.mfu(m["flops"], m["seconds"]), flops=m["flops"])
    del b
    run.free()


# ---- part: one shrunk epoch of each trainer's SDXL preset, in a child process


def trainer_child(d: dict) -> dict:
    """Runs train_ddpo / train_alignprop / train_grpo with d["args"], in a child process, and returns its
    peak memory. The trainer is handed bench.load_models as its loader: the random architectures' weights
    are then drawn on the device, which changes the set-up's time only. d["after_load"]: the CUDA peak is
    reset once the models are loaded (it then counts the weights, not their float32 draw)."""
    trainer = importlib.import_module(d["trainer"])
    after_load = d.get("after_load") and torch.cuda.is_available()
    since = "after the models were loaded (weights included)" if after_load else "over the run"

    def loader(*args, **kw):
        models = load_models(*args, **kw)
        if after_load:
            torch.cuda.reset_peak_memory_stats()
        return models
    trainer.main(trainer.cli(d["args"]), load_models=loader)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return dict(peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20,
                    peak_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
                    memory_method=f"torch.cuda.max_memory_allocated {since}")
    return dict(peak_mem_mb=rss_mb("VmHWM"), peak_reserved_mb=None, memory_method="peak RSS of the process")


def part_sdxl_train(run: "Run"):
    s, part = run.suite, "sdxl-train"
    common_args = ["sdxl-aesthetic", "--model", s.sdxl_model, "--device", s.device, "--dtype", s.dtype,
                   "--num-epochs", "1", "--sample.num-steps", str(s.num_steps), "--reward.tiny",
                   "--eval.no-diversity"]
    n = train_ddpo.SDXL.sample.batch_size  # one sampling batch, 20% of the steps trained: time and memory
    trained = max(1, int(s.num_steps * 0.2))
    trainers = (("train_ddpo", f"{n} samples, {trained} of the {s.num_steps} steps trained",
                 ["--sample.num-batches", "1", "--train.updates-per-epoch", "1",
                  "--train.timestep-fraction", "0.2"]),
                ("train_alignprop", "2 samples, K = 1", ["--train.total-batch", "2"]))
    for trainer, shrunk, args in trainers:
        name = f"sdxl: {trainer} sdxl-aesthetic, one epoch of {shrunk}"
        if run.late(part, name):
            return
        with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
            payload = dict(name=name, trainer=trainer, args=common_args + args + ["--run-dir", tmp])
            try:
                peak = child("bench_parts.trainer_child", payload, timeout=max(run.left(), 1))
            except subprocess.TimeoutExpired:
                run.emit(part, name, status="error", error="stopped at the budget's deadline")
                continue
            m = read_metrics(os.path.join(tmp, "metrics.jsonl"))[-1]
        seconds = m["s_sample"] + m["s_reward"] + m["s_train"] if "s_train" in m else m["s_step"]
        mem = peak["peak_mem_mb"]
        met = mem <= SDXL_MEMORY_GOAL_GIB * 1024 if run.cuda else None
        keys = ("s_sample", "s_reward", "s_train", "s_step", "samples_per_s", "transitions_per_s",
                "first_ratio_err", "peak_mem_mb")
        run.emit(part, name, seconds, "s/epoch", goal=f"peak <= {SDXL_MEMORY_GOAL_GIB} GiB", met=met,
                 seconds=seconds, peak_mem_mb=mem, peak_reserved_mb=peak["peak_reserved_mb"],
                 memory_method=peak["memory_method"], metrics={k: m[k] for k in keys if k in m},
                 note="reward: the tiny random aesthetic model (no hub weights offline)")
        if "first_ratio_err" in m:
            clip = train_ddpo.SDXL.train.clip_range
            run.emit(part, f"sdxl: {trainer} first_ratio_err", m["first_ratio_err"], "|ratio - 1|",
                     goal=f"<= {clip:g} (the PPO clip range)", met=m["first_ratio_err"] <= clip)


# ---- part: GRPO on SD3.5 Medium (random weights): two shrunk epochs of train_grpo's preset, in a child


def part_grpo(run: "Run"):
    """train_grpo.py sd35m-pickscore at its own batch sizes (a group of 24 rollouts of 10 steps at 512 px,
    training micro-batches of 8 over all 10 steps, LoRA rank 32, the KL's reference pass), shrunk to one
    group per epoch; two epochs, the second one measured (the first warms kernels and the allocator):
    rollout images/s, training transitions/s, peak memory, and the ratio's distance from 1 before the first
    optimizer step against the PPO clip range."""
    s, part = run.suite, "grpo"
    # the runner checked the budget before this part
    name = f"grpo: train_grpo sd35m-pickscore on {s.flow_model}, one group per epoch"
    args = ["sd35m-pickscore", "--model", s.flow_model, "--device", s.device, "--dtype", s.dtype,
            "--num-epochs", "2", "--sample.num-batches", "1", "--train.updates-per-epoch", "1",
            "--reward.tiny", "--eval.every", "0", *shlex.split(s.grpo_args)]
    with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
        payload = dict(name=name, trainer="train_grpo", args=args + ["--run-dir", tmp], after_load=True)
        try:
            peak = child("bench_parts.trainer_child", payload, timeout=max(run.left(), 1))
        except subprocess.TimeoutExpired:
            run.emit(part, name, status="error", error="stopped at the budget's deadline")
            return
        first, m = read_metrics(os.path.join(tmp, "metrics.jsonl"))[-2:]
        with open(os.path.join(tmp, "config.json")) as f:
            cfg = json.load(f)  # what the trainer ran: the preset with the flags above
    sample = cfg["sample"]
    n = sample["group_size"] * sample["prompts_per_batch"] * sample["num_batches"]
    trained = sample["sde_window"][1] - sample["sde_window"][0]
    note = (f"{n} rollouts of {sample['num_steps']} steps, micro-batches of {cfg['train']['batch_size']}; "
            "reward: the tiny random PickScore (no hub weights offline); the second epoch's times")
    mem, goal = peak["peak_mem_mb"], f"peak <= {GRPO_MEMORY_GOAL_GIB} GiB"
    met = mem <= GRPO_MEMORY_GOAL_GIB * 1024 if run.cuda else None
    extra = dict(peak_mem_mb=mem, peak_reserved_mb=peak["peak_reserved_mb"], memory_method=peak["memory_method"],
                 resolution=sample["resolution"] or "native", note=note,
                 first_epoch_s=first["s_sample"] + first["s_train"])
    run.emit(part, f"{name}: rollouts (SDE, guided, decoded)", n / m["s_sample"], "images/s",
             seconds=m["s_sample"], goal=goal, met=met, **extra)
    run.emit(part, f"{name}: training ({trained} steps each, KL reference pass)", n * trained / m["s_train"],
             "transitions/s", seconds=m["s_train"], goal=goal, met=met, **extra)
    clip = cfg["train"]["clip_range"]
    err = max(first["first_ratio_err"], m["first_ratio_err"])  # each before its epoch's first update
    run.emit(part, f"{name}: first_ratio_err", err, "|ratio - 1|", goal=f"<= {clip:g} (the PPO clip range)",
             met=err <= clip)


# ---- part: trl 0.23.1, if installed


def part_trl(run: "Run"):
    s, part = run.suite, "trl"
    if importlib.util.find_spec("trl") is None:
        run.emit(part, "trl 0.23.1 comparison (bench_trl.py)", status="skipped",
                 error="trl is not installed here (bench_trl.py: a separate environment with trl==0.23.1)")
        return
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        out = os.path.join(tmp, "trl.jsonl")
        cmd = [sys.executable, "bench_trl.py", "--model", s.model, "--device", s.device, "--dtype", s.dtype,
               "--num-steps", str(s.trl_steps), "--epochs", "2", "--burn-in", "1",
               "--timesteps-per-forward", "1", "2", "--out", out]
        proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                              text=True, timeout=max(run.left(), 1))
        if proc.returncode != 0:
            raise RuntimeError(f"bench_trl.py exited with status {proc.returncode}:\n{proc.stderr[-3000:]}")
        lines = read_metrics(out)
    for r in lines:
        run.emit(part, f"trl comparison: {r['trainer']}, {s.trl_steps} steps", r["transitions_per_s"],
                 "transitions/s", samples_per_s=r["samples_per_s"],
                 train_ratio_vs_trl=r["train_ratio_vs_trl"],
                 sample_ratio_vs_trl=r["sample_ratio_vs_trl"], trl=r["trl"])


PARTS = {"grpo": part_grpo, "sweep": part_sweep, "diffexp": part_diffexp, "ddpo": part_ddpo,
         "alignprop": part_alignprop, "sdxl": part_sdxl, "sdxl-train": part_sdxl_train,
         "compile-modes": part_compile_modes, "trl": part_trl}
