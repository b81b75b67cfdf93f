"""
The prepared GPU measurement: every GPU measurement of this project in one time-boxed run (the suite),
one JSON line per measurement, then a markdown table of them. Built on bench.py's set-up and stages.

    timeout -k 10 570 python bench_gpu.py run --out bench-gpu.jsonl  # one H200: ~8.5 min (a 510 s budget)
    python bench_gpu.py table bench-gpu.jsonl > bench-gpu.md         # markdown: date, card, versions, rows
    python bench_gpu.py run-tiny --out bench-tiny.jsonl              # the same, on tiny models, CPU, ~1 min
    python bench_gpu.py run --out bench-gpu.jsonl --parts sdxl trl   # some parts only (what a timeout left)
    python bench_gpu.py run --help                                   # every flag

The parts (bench_parts.py), in priority order: GRPO on the SD3.5 Medium architecture (two shrunk epochs of
train_grpo's sd35m-pickscore: rollout images/s, training transitions/s, peak memory; goal 80 GiB), the
sampling MFU sweep on SD v1.5 (batch sizes,
channels_last, SDPA backends, torch.compile; goal 50% MFU), DiffExp's guidance schedule against fixed
CFG, the DDPO update at the sd15-aesthetic preset's defaults with first_ratio_err (goal: at most the PPO
clip range), AlignProp with gradients through all steps at batch 4 (goal: 24 GiB), SDXL's stages and one
shrunk epoch of each trainer's SDXL preset (goal: 80 GiB), the costlier torch.compile modes, and trl
0.23.1 through bench_trl.py when it is installed. Every record has part, name, status (ok / skipped /
error), value, unit, seconds, mfu, peak_mem_mb, goal, met and error; a header record (date, card,
driver, versions, the suite's settings) comes first and a footer (wall time per part) last.

This file holds the suite's runner (Suite, Run, run_suite), the table and the command line; the
measurement parts, their estimates and goals are in bench_parts.py.
"""

import dataclasses
import gc
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro

import common
from bench import Bench, Config, peak_flops, setup, write_record
from bench_parts import PART_SECONDS, PARTS, Part, error_text
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
# The parts, their estimates (PART_SECONDS) and goals are in bench_parts.py.


@dataclass(frozen=True)
class Suite:
    model: str = "sd15-random"  # the SD v1.5 parts' model
    sdxl_model: str = "sdxl-random"
    flow_model: str = "sd35m-random"  # the GRPO part's model
    # more train_grpo flags for the GRPO part, after sd35m-pickscore's: --grpo-args="--sample.resolution 256"
    grpo_args: str = ""
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
                 Suite(model="tiny", sdxl_model="tiny-sdxl", flow_model="tiny-sd3", device="cpu", dtype="float32",
                       # tiny SD3 at its native 32 px, T5 length 32, 4 steps
                       grpo_args="--sample.resolution 0 --sample.max-sequence-length 0 --sample.num-steps 4 "
                                 "--sample.sde-window 0 4",
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
        raise common.ConfigError("bench_gpu.py run: no CUDA device here; `python bench_gpu.py run-tiny` "
                                 "runs the same code on a CPU.")
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
            except Exception as e:  # out of memory, a failed compilation, a bug: recorded, the next runs
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
            per_part = ", ".join(f"{k} {v:.0f} s" for k, v in r["part_s"].items())
            lines += ["", f"Wall time per part: {per_part}; in all {r['total_s']:.0f} s."]
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
            f"models {s.get('model')} / {s.get('sdxl_model')} / {s.get('flow_model', '-')}, {s.get('dtype')}, "
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
