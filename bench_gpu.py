"""
The prepared GPU measurement: every GPU measurement of this project in one time-boxed run (the suite),
one JSON line per measurement, then a markdown table of them. Built on bench.py's set-up and stages.

    timeout -k 10 570 python bench_gpu.py run --out bench-gpu.jsonl  # one H200: ~8.5 min (a 510 s budget)
    python bench_gpu.py table bench-gpu.jsonl > bench-gpu.md         # markdown: date, card, versions, rows
    python bench_gpu.py run-tiny --out /tmp/bench-tiny.jsonl         # the same code, tiny models, CPU, ~1 min
    python bench_gpu.py run --out bench-gpu.jsonl --parts sdxl trl   # some parts only (what a timeout left)
    python bench_gpu.py run --help                                   # every flag

The parts, in priority order: the sampling MFU sweep on SD v1.5 (batch sizes, channels_last, SDPA
backends, torch.compile; goal 50% MFU), DiffExp's guidance schedule against fixed CFG, the DDPO update
at the sd15-aesthetic preset's defaults with first_ratio_err (goal: at most the PPO clip range),
AlignProp with gradients through all steps at batch 4 (goal: 24 GiB), SDXL's stages and one shrunk epoch
of each trainer's SDXL preset (goal: 80 GiB), the costlier torch.compile modes, and trl 0.23.1 through
bench_trl.py when it is installed. Every record has part, name, status (ok / skipped / error), value,
unit, seconds, mfu, peak_mem_mb, goal, met and error; a header record (date, card, driver, versions,
the suite's settings) comes first and a footer (wall time per part) last.
"""

import dataclasses
import gc
import importlib
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro

import common
import diffusion
import explore
import train_alignprop
import train_ddpo
from bench import (PRESETS, AlignPropBench, Bench, Config, alignprop_measure, bench_ddpo, bench_sample,
                   child, cuda_measure, ddpo_forwards, ddpo_update, decode_flops, load_models, peak_flops,
                   rss_mb, setup, timeit, unet_call_flops, write_record)
from scaffold import read_metrics, run_cli

# -----------------------------------------------------------------------------
# The suite: every GPU measurement in one run, under a deadline (python bench_gpu.py run)
#
# One process, parts in priority order, each in try/except: a part that fails (out of memory, a failed
# compilation) becomes an error record and the next part runs. A part starts only while the budget
# lasts and its estimate fits in what is left; otherwise it is recorded as skipped. Every record is
# appended and flushed to --out at once, so a run stopped from outside keeps what it measured.
# Compilations and the trainers run in child processes (bench.child), which the deadline can stop.
#
# Estimates on one H200, bf16, from docs/benchmarks.md (sampling batch 8 x 50 steps 3.7 s, compiled
# 2.4 s; a DDPO update 6.3 s; AlignProp K = all 13 s per step at batch 2), in seconds:
#   sweep          135  SD v1.5 set-up 15; the denoising loop (10 steps, no decode) at batch 8 / 16 / 32
#                       (~1, 2, 3 s a call at 25% MFU), then channels_last and the SDPA backends at the best
#                       batch, 3 calls each and a FLOP count (~50); torch.compile (default mode) of the best
#                       of those in a child: start-up 10, compilation ~50, 4 calls (~70, capped at
#                       compile_cap_s)
#   diffexp         25  sampling batch 8 x 50 steps with decode, fixed CFG vs DiffExp's schedule, 3 calls each
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

Part = Literal["sweep", "diffexp", "ddpo", "alignprop", "sdxl", "sdxl-train", "compile-modes", "trl"]
PART_SECONDS = {"sweep": 135, "diffexp": 25, "ddpo": 50, "alignprop": 40, "sdxl": 70, "sdxl-train": 80,
                "compile-modes": 90, "trl": 130}
# the seconds that must be left to start a compiled configuration, by mode
COMPILE_SECONDS = {"default": 75, "reduce-overhead": 90, "max-autotune-no-cudagraphs": 60}
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
    out: str = "bench-gpu.jsonl"  # JSON lines, appended and flushed one by one; `table OUT` renders them
    budget_s: float = 510  # no part starts after this many seconds; those left are recorded as skipped
    estimate_scale: float = 1.0  # a part starts only if its estimate (PART_SECONDS) x this fits in the rest
    parts: tuple[Part, ...] = tuple(PART_SECONDS)  # in this order
    burn_in: int = 1
    iters: int = 2  # timed iterations per measurement (median)
    num_steps: int = 50  # DDIM steps of sampling, DDPO and AlignProp (K = all is this many)
    sweep_batches: tuple[int, ...] = (8, 16, 32)  # sampling batch sizes of the sweep
    sweep_steps: int = 10  # DDIM steps per timed sweep call (MFU does not depend on the count; no decode)
    sdpa_backends: tuple[str, ...] = ("flash", "efficient", "cudnn")  # forced in turn (sdpa_kernel)
    compile_modes: tuple[str, ...] = ("reduce-overhead", "max-autotune-no-cudagraphs")  # part compile-modes
    compile_backend: str = "inductor"  # torch.compile's backend ("eager": dynamo's tracing only, for a CPU)
    compile_cap_s: float = 180  # a compiled configuration's child is stopped after this (or at the deadline)
    ddpo_tpf: tuple[int, ...] = (1, 2)  # timesteps per forward of the DDPO update
    alignprop_batch: int = 4
    trl_steps: int = 20


SUITE_PRESETS = {
    "run": ("Every GPU measurement in one run (~8.5 min on one H200): JSON lines to --out; then "
            "`bench_gpu.py table OUT`.", Suite()),
    "run-tiny": ("The suite's code on the tiny models, on a CPU (~1 min): what cannot run on a CPU is "
                 "skipped.",
                 Suite(model="tiny", sdxl_model="tiny-sdxl", device="cpu", dtype="float32",
                       out="bench-gpu-tiny.jsonl", budget_s=600, estimate_scale=0.0, burn_in=0, iters=1,
                       num_steps=5,  # 5 steps: t = 801 is one DiffExp step, so the guidance skipping runs
                       sweep_batches=(2, 4), sweep_steps=2, compile_backend="eager", alignprop_batch=1,
                       trl_steps=5)),
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

    def emit(self, part: str, name: str, value=None, unit: str = "", status: str = "ok",
             goal: str | None = None, met: bool | None = None, **extra) -> dict:
        """One record, written by bench.write_record: printed, appended to --out and flushed (a run stopped
        from outside keeps it), and kept as the table command will read it back."""
        r = dict(part=part, name=name, status=status, value=value, unit=unit, seconds=None, mfu=None,
                 peak_mem_mb=None, goal=goal, met=met, error=None)
        r.update(extra)
        return write_record(r, self.suite.out, self.records)

    def late(self, part: str, name: str, need: float = 0.0) -> bool:
        """True, with a skipped record, once the budget is spent or `need` seconds no longer fit in it."""
        left = self.left()
        if left > 0 and left >= need * self.suite.estimate_scale:
            return False
        error = f"budget: {max(left, 0):.0f} s left of {self.suite.budget_s:.0f} s"
        if need and left > 0:
            error += f", needs ~{need:.0f} s"
        self.emit(part, name, status="skipped", error=error)
        return True

    def mfu(self, flops, seconds) -> float | None:
        peak = peak_flops(self.suite.device, getattr(torch, self.suite.dtype))
        return flops / seconds / peak if peak and flops and seconds else None


def run_suite(s: Suite) -> list[dict]:
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise common.ConfigError("bench_gpu.py run: no CUDA device here; `python bench_gpu.py run-tiny` runs "
                                 "the same code on a CPU.")
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
            except Exception as e:  # out of memory, a failed compilation, a bug: recorded, the next part runs
                traceback.print_exc()
                run.emit(part, part, status="error", error=error_text(e))
                run.free()
            took[part] = time.monotonic() - t0
            print(f"bench: part {part}: {took[part]:.0f} s, {run.left():.0f} s of the budget left",
                  flush=True)
    except SystemExit:
        run.emit(part or "suite", part or "suite", status="error",
                 error="stopped from outside (SIGTERM) during this part")
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
    return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                card=props.name if cuda else platform.processor() or "cpu",
                memory_gib=props.total_memory / 2**30 if cuda else None,
                driver=nvidia_driver() if cuda else None, cuda=torch.version.cuda if cuda else None,
                torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                threads=None if cuda else torch.get_num_threads(), suite=dataclasses.asdict(s))


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


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


def sweep_measure(run: Run, part: str, batch: int, compile: str = "", channels_last: bool = False,
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
            m = child("bench_gpu.compile_child", payload, timeout=max(min(run.left(), s.compile_cap_s), 1))
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


def emit_winner(run: Run, part: str):
    best = run.best
    if best is not None:
        run.emit(part, f"sample sweep: best so far ({best['name'].split(': ', 1)[1]})", best["value"],
                 best["unit"], goal=best["goal"], met=best["met"], seconds=best["seconds"], mfu=best["mfu"],
                 config=best["config"])


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
            error = ("CUDA graphs: CUDA only" if graphs else "a CPU run compiles with dynamo's eager backend "
                     "(the sweep's default mode), where modes do not apply")
            run.emit(part, f"sample sweep: compile {mode}", status="skipped", error=error)
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


def part_ddpo(run: Run):
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


def part_alignprop(run: Run):
    """K = all (every step with gradient, checkpointed) at batch 4, then K = 1. Fixed CFG: every step
    runs both branches, the most memory (DiffExp's early steps run half the rows)."""
    s, b, part = run.suite, run.sd(), "alignprop"
    p = train_alignprop.PRESETS["sd15-aesthetic"][1]
    a = AlignPropBench(batch=s.alignprop_batch, num_steps=s.num_steps, guidance_scale=p.sample.guidance_scale)
    # K = all: one step (~25 s), warm from the parts before
    for k, burn_in, iters in ((s.num_steps, 0, 1), (1, s.burn_in, s.iters)):
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
             goal=f"peak <= {goal_gib} GiB" if goal_gib else None, met=met, peak_mem_mb=memory_mb,
             peak_reserved_mb=reserved,
             memory_method="torch.cuda.max_memory_allocated" if run.cuda else "peak RSS of the process",
             **extra)


# ---- part: SDXL, bench.py sdxl-gpu's stages


def part_sdxl(run: Run):
    """bench.py sdxl-gpu's sampling, DDPO update and AlignProp K = 1 stages, at the trainers' SDXL batch
    sizes."""
    s, part = run.suite, "sdxl"
    run.bench = None  # SD v1.5's weights would count in SDXL's peak memory
    run.free()
    base = PRESETS["sdxl-gpu"][1]
    b = setup(dataclasses.replace(base, model=s.sdxl_model, device=s.device, dtype=s.dtype, threads=s.threads,
                                  burn_in=s.burn_in, iters=1,
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
            emit_memory(run, part, f"sdxl: {r['name']}, batch {r['batch']}, {r['resolution']} px", r["value"],
                        r["unit"], r["seconds"], r.get("memory_mb"), r.get("error"), goal, mfu=r.get("mfu"),
                        flops=r.get("flops"))
    name = f"sdxl: alignprop K=1, batch {base.alignprop.batch}, checkpointing"
    if not run.late(part, name):
        m = alignprop_measure(b, 1, True)
        emit_memory(run, part, name, m["seconds"], "s/step", m["seconds"], m["memory_mb"], m["error"],
                    SDXL_MEMORY_GOAL_GIB, mfu=run.mfu(m["flops"], m["seconds"]), flops=m["flops"])
    del b
    run.free()


# ---- part: one shrunk epoch of each trainer's SDXL preset, in a child process


def trainer_child(d: dict) -> dict:
    """Runs train_ddpo / train_alignprop with d["args"], in a child process, and returns its peak memory.
    The trainer is handed bench.load_models as its loader: the random architectures' weights are then drawn on
    the device, which changes the set-up's time only."""
    trainer = importlib.import_module(d["trainer"])
    trainer.main(trainer.cli(d["args"]), load_models=load_models)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return dict(peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20,
                    peak_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
                    memory_method="torch.cuda.max_memory_allocated over the run")
    return dict(peak_mem_mb=rss_mb("VmHWM"), peak_reserved_mb=None, memory_method="peak RSS of the process")


def part_sdxl_train(run: Run):
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
                peak = child("bench_gpu.trainer_child", payload, timeout=max(run.left(), 1))
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


PARTS = {"sweep": part_sweep, "diffexp": part_diffexp, "ddpo": part_ddpo, "alignprop": part_alignprop,
         "sdxl": part_sdxl, "sdxl-train": part_sdxl_train, "compile-modes": part_compile_modes,
         "trl": part_trl}


# -----------------------------------------------------------------------------
# The table: the suite's JSON lines as markdown (python bench_gpu.py table bench-gpu.jsonl)


@dataclass(frozen=True)
class Table:
    jsonl: tyro.conf.Positional[str] = "bench-gpu.jsonl"  # what `bench_gpu.py run --out` wrote


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
    return (f"**{card}**, driver {h.get('driver') or 'n/a'}, CUDA {h.get('cuda') or 'n/a'}, {h['date']}; "
            f"torch {h['torch']}, diffusers {h['diffusers']}, transformers {h['transformers']}; "
            f"models {s.get('model')} / {s.get('sdxl_model')}, {s.get('dtype')}, "
            f"budget {s.get('budget_s', 0):.0f} s.")


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
        rss = "cuda" not in r.get("memory_method", "cuda")
        mem = f"{r['peak_mem_mb'] / 1024:.1f} GiB" + (" RSS" if rss else "")
    met = {True: "yes", False: "**no**", None: "-"}[r.get("met")]
    return name, value, mfu, mem, r.get("goal") or "-", met


# -----------------------------------------------------------------------------
# The command line


def main(cfg: Suite | Table):
    """run / run-tiny: the suite's records; table: the markdown, also printed."""
    if isinstance(cfg, Table):
        text = render(read_metrics(cfg.jsonl))
        print(text, end="")
        return text
    return run_suite(cfg)


def cli(args=None) -> Suite | Table:
    """The suite's presets (run, run-tiny) and `table JSONL`."""
    commands = SUITE_PRESETS | {"table": ("The suite's JSON lines as a markdown table, on stdout.", Table())}
    return tyro.extras.overridable_config_cli(commands, args=args, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    run_cli(main, cli)
