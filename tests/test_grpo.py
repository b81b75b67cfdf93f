"""train_grpo.py on the tiny SD3 (and the tiny DDIM model): group advantages and the loss against independent computations, a run whose
first ratio is 1 and whose plain policy's reward rises, LoRA saved under diffusers' 'transformer.' prefix,
resume equal to an uninterrupted run, and one-line errors for GRPO's own flags."""

import dataclasses
import os

import pytest
import torch
from safetensors import safe_open

import scaffold
import train_grpo
from common import ConfigError


def small(tmp_path, preset="tiny-sd3", **kw):
    cfg = train_grpo.PRESETS[preset][1]
    return dataclasses.replace(cfg, run_dir=str(tmp_path / "run"), threads=1, **kw)


def read(run_dir):
    return scaffold.read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = train_grpo.group_advantages(r, 3)
    a = torch.tensor([1.0, 2.0, 3.0])
    expected = (a - a.mean()) / (a.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv[:3], expected)
    assert torch.equal(adv[3:], torch.zeros(3))  # equal rewards: no signal
    by_batch = train_grpo.group_advantages(r, 3, "batch")
    torch.testing.assert_close(by_batch[:3], (a - 2.0) / (r.std(unbiased=False) + 1e-4))


def test_loss_is_the_clipped_surrogate_plus_beta_kl():
    lp, old = torch.tensor([0.0, 0.5, -0.5]), torch.zeros(3)
    adv, kl = torch.tensor([1.0, 1.0, -1.0]), torch.tensor([0.1, 0.2, 0.3])
    loss, ratio, clipfrac = train_grpo.ppo_kl_loss(lp, old, adv, kl, clip_range=0.2, beta=0.5)
    r = torch.exp(lp)
    surrogate = torch.stack([-1.0 * r[0], -1.0 * torch.tensor(1.2), torch.maximum(r[2], torch.tensor(0.8))])
    assert loss.item() == pytest.approx((surrogate + 0.5 * kl).mean().item(), rel=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)


@pytest.mark.slow
@pytest.mark.parametrize("preset, prefix", [("tiny-sd3", "transformer."), ("tiny", "unet.")])
def test_tiny_run_is_on_policy_and_raises_the_plain_reward(tmp_path, preset, prefix):
    """Both model families: the flow SDE (tiny SD3) and DDIM with eta (the tiny SD v1.5-style model)."""
    run = train_grpo.main(small(tmp_path, preset))
    records = read(run)
    assert [r["epoch"] for r in records] == list(range(-1, 8))
    assert [r["reward_queries"] for r in records[1:]] == [16 * (e + 1) for e in range(8)]
    assert all(r["first_ratio_err"] < 1e-5 for r in records[1:])  # re-scoring reproduces the sampler's log-probs
    assert [r["exploring"] for r in records[1:]] == [True] * 6 + [False] * 2  # exactly 3/4 of 8 epochs
    plain = [r["plain_reward_mean"] for r in records if "plain_reward_mean" in r]
    assert len(plain) == 3 and plain[-1] > plain[0] + 0.002, plain  # brightness of the plain policy rises
    weights = os.path.join(scaffold.latest_checkpoint(run), "pytorch_lora_weights.safetensors")
    with safe_open(weights, "pt") as f:
        assert all(k.startswith(prefix) for k in f.keys())  # what the family's diffusers pipeline reads


def test_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    full = train_grpo.main(small(tmp_path / "a", num_epochs=2, log=scaffold.LogConfig(save_every=1)))
    half = small(tmp_path / "b", num_epochs=2, log=scaffold.LogConfig(save_every=1))
    train_grpo.main(dataclasses.replace(half, num_epochs=1))
    resumed = train_grpo.main(dataclasses.replace(half, resume="auto"))
    a, b = read(full)[-1], read(resumed)[-1]
    assert a["reward_mean"] == b["reward_mean"] and a["loss"] == b["loss"]


@pytest.mark.parametrize("field, value, flag", [("noise_level", 0.0, "--sample.noise-level"),
                                                ("sde_window", (2, 9), "--sample.sde-window"),
                                                ("group_size", 1, "--sample.group-size")])
def test_grpo_flags_fail_at_start_up(tmp_path, field, value, flag):
    cfg = small(tmp_path)
    with pytest.raises(ConfigError, match=flag):
        train_grpo.main(dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **{field: value})))
    assert not os.path.exists(cfg.run_dir)
