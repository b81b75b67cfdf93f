"""bench.py: the tiny preset, shrunk to seconds, runs every stage and writes well-formed JSON lines; the
FLOP count of a UNet call is positive and deterministic. bench_gpu.py and bench_parts.py: the GPU suite's
code path runs on the tiny models, keeps to its budget and records failures, and its table renders every
record."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import bench
import bench_gpu
import bench_parts
import diffusion
from scaffold import read_metrics

FIELDS = ("name", "device", "dtype", "batch", "steps", "resolution", "value", "unit", "seconds")


@pytest.mark.slow
def test_tiny_bench_emits_one_json_line_per_measurement(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    records = bench.main(bench.cli([
        "tiny", "--iters", "1", "--burn-in", "0", "--out", str(out),
        "--sample.batch", "2", "--sample.num-steps", "2",
        "--ddpo.batch", "2", "--ddpo.timesteps-per-forward", "1", "2",
        "--alignprop.batch", "1", "--alignprop.num-steps", "2", "--alignprop.k", "1", "--alignprop.checkpointing", "True",
        "--reward.batch", "2", "--reward.names", "aesthetic"]))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    stdout = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == stdout == records
    assert [r["name"] for r in lines] == ["sample", "ddpo update tpf=1", "ddpo update tpf=2", "alignprop K=1 ckpt",
                                          "reward aesthetic (tiny)"]
    for r in lines:
        assert all(f in r for f in FIELDS), r
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["resolution"] == 32
        assert math.isfinite(r["value"]) and r["value"] > 0 and r["seconds"] > 0
    for r in lines[:4]:  # the UNet stages: FLOPs counted, no MFU on a CPU
        assert r["flops"] > 0 and r["mfu"] is None
    assert all(r["memory_mb"] is None and r["error"] is None for r in lines[1:3])  # DDPO: peak memory on CUDA only
    alignprop = lines[3]
    assert alignprop["memory_mb"] >= alignprop["baseline_mb"] > 0 and alignprop["error"] is None


@pytest.mark.slow
def test_sdxl_architecture_runs_every_stage(tmp_path):
    """The sdxl-gpu preset's code path (two text encoders, packed conditioning, 1024 px on a GPU) on the
    tiny SDXL model: every stage measures, at the model's resolution, with FLOPs for the UNet stages."""
    assert bench.PRESETS["sdxl-gpu"][1].model == "sdxl-random"
    records = bench.main(bench.cli([
        "tiny", "--model", "tiny-sdxl", "--iters", "1", "--burn-in", "0", "--sample.batch", "2", "--sample.num-steps", "2",
        "--ddpo.batch", "1", "--ddpo.timesteps-per-forward", "2", "--alignprop.batch", "1", "--alignprop.num-steps", "2",
        "--alignprop.k", "1", "--alignprop.checkpointing", "True", "--reward.batch", "2", "--reward.names", "aesthetic"]))
    assert [r["name"] for r in records] == ["sample", "ddpo update tpf=2", "alignprop K=1 ckpt", "reward aesthetic (tiny)"]
    size = diffusion.load_models("tiny-sdxl").image_size
    assert all(r["resolution"] == size and math.isfinite(r["value"]) and r["value"] > 0 for r in records)
    assert all(r["flops"] > 0 for r in records[:3])


def test_unet_call_flops_positive_and_deterministic(tiny, cond, uncond):
    first = bench.unet_call_flops(tiny, cond, uncond)
    assert first > 0
    assert bench.unet_call_flops(tiny, cond, uncond) == first
    assert bench.unet_call_flops(tiny, cond[:1], uncond) * 3 == first  # linear in the batch


def test_count_flops_includes_attention_on_cpu():
    q = torch.randn(1, 2, 16, 8)  # (B, heads, tokens, head dim)
    flops = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), "cpu")
    assert flops == 2 * (2 * 2 * 16 * 16 * 8)  # QK^T and AV: 2 FLOPs per multiply-add each


def test_cuda_measure_reports_out_of_memory_as_a_result(monkeypatch):
    """On CUDA an out-of-memory step is a measurement ("out of memory"), its gradients freed, not a crash;
    a step that fits reports its seconds and the peak after a reset. (The CUDA calls are stood in for.)"""
    calls = []
    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**20)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    b = type("B", (), {"device": "cuda", "optimizer": torch.optim.SGD([p], lr=0.1)})()

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert bench.cuda_measure(oom, b) == (None, None, "out of memory")
    assert p.grad is None and calls == ["empty_cache", "reset_peak_memory_stats", "empty_cache"]
    assert bench.cuda_measure(lambda: 0.5, b) == (0.5, 3.0, None)
    b.device = "cpu"
    assert bench.cuda_measure(lambda: 0.25, b) == (0.25, None, None)


# -----------------------------------------------------------------------------
# The suite (python bench_gpu.py run): its code path on the tiny models, its deadline, its error records

TABLE_FIELDS = ("part", "name", "status", "value", "unit", "seconds", "mfu", "peak_mem_mb", "goal", "met", "error")
CPU_SKIPS = {"sample sweep: SDPA efficient", "sample sweep: SDPA cudnn", "sample sweep: compile reduce-overhead",
             "sample sweep: compile max-autotune-no-cudagraphs"}


def measurements(records):
    return [r for r in records if r["part"] not in ("header", "footer")]


def suite(args):
    """python bench_gpu.py run-tiny ARGS -> its records."""
    return bench_gpu.main(bench_gpu.cli(["run-tiny", *args]))


@pytest.mark.slow
def test_gpu_suite_runs_every_part_on_the_tiny_models(tmp_path):
    """bench_gpu.py run-tiny: every part measures (what needs CUDA is skipped, with the reason), every record
    carries what the table needs, the table has a row per measurement and the run's header line."""
    out = tmp_path / "suite.jsonl"
    records = suite(["--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == records  # every record flushed to --out
    header, footer, rows = records[0], records[-1], measurements(records)
    assert header["part"] == "header" and footer["part"] == "footer"
    assert header["card"] and header["driver"] is None and header["torch"] == torch.__version__
    assert set(footer["part_s"]) == set(bench_parts.PART_SECONDS) == {r["part"] for r in rows}
    for r in rows:
        assert all(f in r for f in TABLE_FIELDS), r
        if r["status"] == "skipped":
            assert r["name"] in CPU_SKIPS or r["part"] == "trl", r
            assert r["error"]
        else:
            assert r["status"] == "ok" and r["error"] is None and math.isfinite(r["value"]), r
            assert r["mfu"] is None  # no MFU on a CPU
    by_name = {r["name"]: r for r in rows}
    sweep = [r for r in rows if r["name"].startswith("sample sweep: batch") and r["config"]["compile"] is None]
    assert {r["config"]["batch"] for r in sweep} == {2, 4} and all(r["flops"] > 0 for r in sweep)
    compiled = next(r for r in rows if r["name"].startswith("sample sweep: batch") and r["config"]["compile"] == "default")
    assert compiled["compile_s"] is not None and compiled["goal"] == "MFU >= 50%"
    assert any(r["name"].startswith("sample sweep: best so far") for r in rows)
    fixed, diffexp = [r for r in rows if r["part"] == "diffexp"]
    assert (fixed["unet_rows"], diffexp["unet_rows"]) == (2 * 8 * 5, 2 * 8 * 5 - 8)  # t = 801: cond rows only
    assert diffexp["goal"] == "faster than fixed CFG" and diffexp["speedup_vs_fixed"] > 0
    ratios = [r for r in rows if "first_ratio_err" in r["name"]]
    assert len(ratios) == 4 and all(0 <= r["value"] <= 1e-4 and r["met"] for r in ratios)  # float32: re-scoring is on-policy
    updates = [r for r in rows if r["name"].startswith("ddpo update")]
    assert [r["timesteps_per_forward"] for r in updates] == [1, 2] and all(r["flops"] > 0 for r in updates)
    k_all = next(r for r in rows if r["name"].startswith("alignprop K=all"))
    assert k_all["peak_mem_mb"] > 0 and k_all["goal"] == "peak <= 24 GiB" and k_all["met"] is None  # RSS: no goal on a CPU
    trainers = [r for r in rows if r["part"] == "sdxl-train" and r["unit"] == "s/epoch"]
    assert len(trainers) == 2 and all(r["peak_mem_mb"] > 0 and r["seconds"] > 0 for r in trainers)
    assert "first_ratio_err" in trainers[0]["metrics"] and "s_step" in trainers[1]["metrics"]
    assert [r["name"].split(",")[0] for r in rows if r["part"] == "sdxl"] == ["sdxl: sample", "sdxl: ddpo update tpf=1",
                                                                              "sdxl: alignprop K=1"]
    assert by_name["trl 0.23.1 comparison (bench_trl.py)"]["status"] in ("ok", "skipped")
    # GRPO on tiny SD3 (run-tiny: 4 steps, all trained): one group of sd35m-pickscore's 24 per epoch
    rollouts, training = [r for r in rows if r["part"] == "grpo" and r["unit"] in ("images/s", "transitions/s")]
    assert rollouts["value"] == pytest.approx(24 / rollouts["seconds"])
    assert training["value"] == pytest.approx(24 * 4 / training["seconds"])
    assert rollouts["peak_mem_mb"] > 0 and rollouts["goal"] == "peak <= 80 GiB" and rollouts["met"] is None

    text = bench_gpu.render(records)
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| measurement")]
    assert len(table) == len(rows)
    assert all(line.count(" | ") == 5 for line in table)  # 6 columns, a "|" inside a cell escaped
    first = next(line for line in lines if line.startswith("**"))
    for part in (header["date"], "driver n/a", f"torch {torch.__version__}", "diffusers ", "transformers "):
        assert part in first
    assert "| measurement | value | MFU | peak memory | goal | met? |" in lines
    assert bench_gpu.main(bench_gpu.cli(["table", str(out)])) == text  # the table command reads them back


def test_suite_with_no_budget_left_skips_every_part(tmp_path):
    out = tmp_path / "suite.jsonl"
    records = suite(["--budget-s", "0", "--out", str(out)])
    rows = measurements(records)
    assert [r["part"] for r in rows] == list(bench_parts.PART_SECONDS)
    assert all(r["status"] == "skipped" and r["error"].startswith("budget: 0 s left") for r in rows)
    assert text_rows(bench_gpu.render(records)) == len(rows)


def text_rows(text):
    return sum(line.startswith("| ") and not line.startswith("| measurement") for line in text.splitlines())


def test_suite_records_a_failing_part_and_runs_the_next(tmp_path, monkeypatch):
    """A part that raises becomes an error record (running out of memory: "out of memory") and the next
    part runs; a part that runs past the deadline leaves the rest skipped; a part whose estimate does not
    fit in what is left is skipped."""
    def boom(run):
        raise RuntimeError("boom")

    def oom(run):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def fine(run):
        run.emit(run_part(run), "fine", 1.0, "x/s")
    ran = []

    def run_part(run):
        ran.append(1)
        return "diffexp"
    monkeypatch.setitem(bench_parts.PARTS, "sweep", boom)
    monkeypatch.setitem(bench_parts.PARTS, "ddpo", oom)
    monkeypatch.setitem(bench_parts.PARTS, "diffexp", fine)
    out = tmp_path / "suite.jsonl"
    records = measurements(suite(["--out", str(out), "--parts", "sweep", "ddpo", "diffexp"]))
    assert [(r["part"], r["status"], r["error"]) for r in records] == [
        ("sweep", "error", "RuntimeError: boom"), ("ddpo", "error", "out of memory"), ("diffexp", "ok", None)]
    assert "| sweep | error: RuntimeError: boom |" in bench_gpu.render(records)

    def slow(run):
        time.sleep(0.3)
    monkeypatch.setitem(bench_parts.PARTS, "sweep", slow)
    records = measurements(suite(["--out", str(out), "--budget-s", "0.2", "--parts", "sweep", "diffexp",
                                  "trl"]))
    assert [(r["part"], r["status"]) for r in records] == [("diffexp", "skipped"), ("trl", "skipped")]
    assert all("budget" in r["error"] for r in records)
    records = measurements(suite(["--out", str(out), "--budget-s", "60", "--estimate-scale", "1",
                                  "--parts", "diffexp", "trl"]))  # diffexp's 25 s fit, trl's 130 do not
    assert [(r["part"], r["status"]) for r in records] == [("diffexp", "ok"), ("trl", "skipped")]
    assert records[1]["error"].endswith("needs ~130 s") and len(ran) == 2


def test_sweep_config_stopped_at_the_deadline_is_an_error_record(tmp_path, monkeypatch):
    """A compiled configuration runs in a child process with the time left as its limit; stopped there,
    it is an error record and the sweep goes on."""
    def child(target, payload, timeout=None):
        assert target == "bench_parts.compile_child" and payload["mode"] == "max-autotune-no-cudagraphs"
        timeouts.append(timeout)
        raise subprocess.TimeoutExpired("python", timeout)
    timeouts = []
    monkeypatch.setattr(bench_parts, "child", child)
    for budget in (100, 1000):  # the time left, or the cap (180 s) when less
        cfg = bench_gpu.cli(["run-tiny", "--out", str(tmp_path / "s.jsonl"), "--budget-s", str(budget)])
        run = bench_gpu.Run(cfg, time.monotonic())
        assert bench_parts.sweep_measure(run, "compile-modes", 4, "max-autotune-no-cudagraphs") is None
        assert [(r["status"], r["error"]) for r in run.records] == [
            ("error", f"stopped after {timeouts[-1]:.0f} s (the compile cap or the deadline)")]
    assert 99 < timeouts[0] <= 100 and timeouts[1] == 180
    assert run.bench is None  # nothing was loaded in this process for it


def test_child_time_limit():
    with pytest.raises(subprocess.TimeoutExpired):
        bench.child("bench_parts.compile_child", {}, timeout=0.5)


def test_load_models_draws_in_a_device_context_with_the_scheduler_on_the_host(tiny):
    """bench.load_models builds the random architectures under torch.device(device); on a CPU that is
    load_models itself: the same weights. The scheduler's tensors stay on the host."""
    models = bench.load_models("tiny")
    assert models.scheduler.alphas_cumprod.device.type == "cpu"
    assert torch.equal(models.scheduler.alphas_cumprod, tiny.scheduler.alphas_cumprod)
    for (name, p), q in zip(models.unet.state_dict().items(), tiny.unet.state_dict().values()):
        assert torch.equal(p, q), name


def test_trainer_child_hands_the_trainer_its_loader(monkeypatch):
    """A trainer whose main takes a loader gets bench.load_models (random weights drawn on the device);
    nothing of diffusion is replaced. On a CPU the peak memory is the process's peak RSS."""
    seen, calls = {}, []

    def main(cfg, load_models=diffusion.load_models):
        seen.update(cfg=cfg, models=load_models("tiny", device="cpu"))
    trainer = types.ModuleType("a_trainer")
    trainer.cli, trainer.main = (lambda args: tuple(args)), main
    monkeypatch.setitem(sys.modules, "a_trainer", trainer)
    monkeypatch.setattr(bench_parts, "load_models", lambda *a, **kw: calls.append((a, kw)) or "models")
    loader = diffusion.load_models
    peak = bench_parts.trainer_child(dict(trainer="a_trainer", args=["--flag"], after_load=True))
    assert seen == dict(cfg=("--flag",), models="models") and calls == [(("tiny",), {"device": "cpu"})]
    assert diffusion.load_models is loader
    assert peak["peak_mem_mb"] > 0 and peak["memory_method"] == "peak RSS of the process"


def test_suite_stopped_from_outside_still_writes_its_footer(tmp_path, monkeypatch):
    """SIGTERM (what `timeout` sends) ends the run: the part it stopped is an error record, the footer and
    the table are still written."""
    def stopped(run):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    monkeypatch.setitem(bench_parts.PARTS, "sweep", stopped)
    out = tmp_path / "suite.jsonl"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        suite(["--out", str(out), "--parts", "sweep", "diffexp"])
    assert signal.getsignal(signal.SIGTERM) is before  # the handler was the run's only
    records = read_metrics(str(out))
    assert [(r["part"], r["status"]) for r in records] == [("header", "ok"), ("sweep", "error"), ("footer", "ok")]
    assert "SIGTERM" in records[1]["error"]
