"""bench.py: the tiny preset, shrunk to seconds, runs every stage and writes well-formed JSON lines; the
FLOP count of a UNet call is positive and deterministic."""

import json
import math

import torch

import bench
import diffusion

FIELDS = ("name", "device", "dtype", "batch", "steps", "resolution", "value", "unit", "seconds")


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
