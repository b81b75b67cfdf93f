"""Mixed precision (common.Precision): one autocast context, float32 LoRA weights, and for float16 a
gradient scaler whose deliberate overflow-and-skip steps do not trip the non-finite-gradient stop,
while real non-finite gradients still do. float16 training steps of both trainers run on the CPU."""

import os

import pytest
import torch
from safetensors.torch import load_file

import common
import scaffold
import lora
import train_alignprop
import train_ddpo
from test_alignprop import small as small_alignprop
from test_ddpo import small as small_ddpo


@pytest.mark.slow
@pytest.mark.parametrize("trainer, small", [(train_ddpo, small_ddpo), (train_alignprop, small_alignprop)])
def test_float16_training_step_on_cpu(tmp_path, trainer, small):
    run = trainer.main(small(tmp_path, dtype="float16"))
    (rec,) = scaffold.read_metrics(os.path.join(run, "metrics.jsonl"))
    assert rec["grad_norm"] > 0 and rec["skipped_steps"] == 0 and torch.isfinite(torch.tensor(rec["loss"]))
    ckpt = scaffold.latest_checkpoint(run)
    weights = load_file(os.path.join(ckpt, lora.WEIGHT_NAME))
    assert all(t.dtype == torch.float32 for t in weights.values())  # LoRA weights stay float32
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # and they moved
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    assert state["precision"]["scale"] > 1  # the loss scale is checkpointed, so a resume continues with it


def test_autocast_only_below_float32():
    for dtype in (torch.float16, torch.bfloat16):
        with common.Precision("cpu", dtype).autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    with common.Precision("cpu", torch.float32).autocast():
        assert not torch.is_autocast_enabled("cpu")


def setup(dtype):
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    precision = common.Precision("cpu", dtype)
    return p, optimizer, precision


def backward(p, precision, overflow=False):
    precision.backward((p * torch.tensor([1.0, 2.0, 3.0])).sum())
    if overflow:
        p.grad[0] = float("inf")  # what a float16 overflow in the backward pass leaves


def test_float16_overflow_is_a_skipped_step_not_a_stop():
    p, optimizer, precision = setup(torch.float16)
    scale = precision.scaler.get_scale()
    backward(p, precision, overflow=True)
    norm = precision.step(optimizer, [p], 1.0, 1, "here")
    assert norm != norm and torch.equal(p.detach(), torch.ones(3))  # NaN norm, no update
    assert precision.scaler.get_scale() == scale / 2 and p.grad is None
    backward(p, precision)
    norm = precision.step(optimizer, [p], 100.0, 1, "here")  # the next step is an ordinary one
    assert norm == pytest.approx(14 ** 0.5) and torch.allclose(p.detach(), torch.tensor([0.9, 0.8, 0.7]))


def test_real_non_finite_gradients_still_stop():
    p, optimizer, precision = setup(torch.float16)
    backward(p, precision, overflow=True)
    precision.scaler.update(1.0)  # a scale of 1: an overflow now is the gradient's own
    with pytest.raises(FloatingPointError, match="here"):
        precision.step(optimizer, [p], 1.0, 1, "here")
    for dtype in (torch.float32, torch.bfloat16):  # no scaler: any non-finite gradient stops
        p, optimizer, precision = setup(dtype)
        backward(p, precision, overflow=True)
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            precision.step(optimizer, [p], 1.0, 1, "here")


def test_scaler_state_round_trip():
    _, _, a = setup(torch.float16)
    a.scaler.scale(torch.ones(()))  # the scale is created on first use
    a.scaler.update(1024.0)
    _, _, b = setup(torch.float16)
    b.load_state_dict(a.state_dict())
    assert b.scaler.get_scale() == 1024.0
    _, _, c = setup(torch.float32)
    assert c.state_dict() == {}
    c.load_state_dict(a.state_dict())  # a float16 run resumed in float32: nothing to restore
    b.load_state_dict(None)  # a checkpoint from before mixed precision
    b.load_state_dict({})  # a float32 run resumed in float16: the fresh scaler
    assert b.scaler.get_scale() == 1024.0


def test_bench_and_evaluate_run_in_float16(tmp_path, lora_models):
    """bench.py measures the trainers' float16 path (autocast, GradScaler); evaluate.py scores a LoRA
    checkpoint in float16 with numbers close to float32's (the same samples, rounded differently)."""
    import bench
    import evaluate
    from test_evaluate import make_checkpoint, write_prompts
    records = bench.main(bench.cli([
        "tiny", "--dtype", "float16", "--iters", "1", "--burn-in", "0", "--stages", "sample", "ddpo",
        "--sample.batch", "2", "--sample.num-steps", "2", "--ddpo.batch", "2", "--ddpo.timesteps-per-forward", "2"]))
    assert [r["name"] for r in records] == ["sample", "ddpo update tpf=2"]
    assert all(r["dtype"] == "float16" and r["value"] > 0 and r["flops"] > 0 for r in records)

    ckpt = make_checkpoint(lora_models, tmp_path / "ckpt", seed=0)
    args = ["score", "--checkpoints", "base", ckpt, "--prompts", write_prompts(tmp_path), "--samples-per-prompt", "2",
            "--rewards", "brightness", "--reward-tiny", "--no-diversity"]
    means = {dtype: [r["rewards"]["brightness"]["mean"] for r in evaluate.main(
        args + ["--dtype", dtype, "--out", str(tmp_path / dtype)])["checkpoints"].values()] for dtype in ("float32", "float16")}
    assert means["float16"] == pytest.approx(means["float32"], abs=2e-3)
    assert means["float16"][0] != means["float16"][1]  # the LoRA is applied in float16 too
