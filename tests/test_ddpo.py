"""DDPO (train_ddpo.py): PPO loss, stat tracking, on-policy bookkeeping with exploration, learning,
checkpoint/resume and start-up errors. Runs use the offline tiny model with few steps."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import scaffold
import lora
import train_ddpo
from explore import ExploreConfig
from train_ddpo import Config, PerPromptStatTracker, SampleConfig, TrainConfig, ppo_loss


def small(tmp_path, **kw) -> Config:
    """The tiny preset, shrunk to seconds: 4 DDIM steps, 8 samples per epoch."""
    cfg = train_ddpo.PRESETS["tiny"][1]
    cfg = dataclasses.replace(
        cfg, run_dir=str(tmp_path / "run"), num_epochs=1,
        sample=dataclasses.replace(cfg.sample, num_steps=4, batch_size=4, num_batches=2),
        train=dataclasses.replace(cfg.train, batch_size=2, updates_per_epoch=2, timesteps_per_forward=4),
        log=scaffold.LogConfig(grid_every=1, save_every=1))
    return dataclasses.replace(cfg, **kw)


def read(run_dir):
    return scaffold.read_metrics(os.path.join(run_dir, "metrics.jsonl"))


# ---- the math

def test_ppo_loss_at_ratio_one_is_the_policy_gradient_loss():
    old = torch.randn(6, dtype=torch.float64)
    log_prob = old.clone().requires_grad_(True)
    adv = torch.randn(6, dtype=torch.float64)
    loss, ratio, kl, clipfrac = ppo_loss(log_prob, old, adv, clip_range=1e-4)
    assert torch.all(ratio == 1) and kl == 0 and clipfrac == 0
    torch.testing.assert_close(loss, -adv.mean())
    loss.backward()  # d/dlogp of -A * exp(logp - old) at ratio 1 is -A / B, the REINFORCE gradient
    torch.testing.assert_close(log_prob.grad, -adv / 6)


def test_ppo_clipping_engages_beyond_clip_range():
    c = 0.1
    old = torch.zeros(4)
    # ratios 1.05 (inside), 1.2 (above), 0.8 (below), 0.8 (below)
    log_prob = torch.log(torch.tensor([1.05, 1.2, 0.8, 0.8])).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, ratio, kl, clipfrac = ppo_loss(log_prob, old, adv, clip_range=c)
    loss.backward()
    g = log_prob.grad
    assert g[0] != 0  # inside the range: gradient flows
    assert g[1] == 0  # positive advantage above 1 + c: clipped, no push further up
    assert g[2] == 0  # negative advantage below 1 - c: clipped, no push further down
    assert g[3] != 0  # positive advantage below 1 - c: the unclipped term is the max, gradient flows
    assert clipfrac == 0.75
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - c, 1 + c)).mean()
    torch.testing.assert_close(loss, expected)


def test_stat_tracker_appends_batch_before_statistics():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=2)
    prompts = ["cat", "cat", "dog", "dog"]
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    adv = tracker.update(prompts, r)
    # with min_count 2 each prompt's own two rewards (this batch) are its statistics
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_stat_tracker_below_min_count_uses_batch_statistics():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=3)
    prompts = ["cat", "cat", "dog", "dog"]
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    adv = tracker.update(prompts, r)
    expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(adv, expected)


def test_stat_tracker_buffers_persist_across_epochs_and_are_bounded():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["cat", "cat"], torch.tensor([0.0, 2.0]))
    adv = tracker.update(["cat"], torch.tensor([4.0]))  # buffer: 0, 2, 4
    buf = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(adv, ((4.0 - buf.mean()) / (buf.std(unbiased=False) + 1e-6)).float().reshape(1))
    tracker.update(["cat"], torch.tensor([6.0]))  # the oldest (0) falls out
    assert list(tracker.buffers["cat"]) == [2.0, 4.0, 6.0]
    state = tracker.state_dict()
    fresh = PerPromptStatTracker(buffer_size=3, min_count=2)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert list(fresh.buffers["cat"]) == [2.0, 4.0, 6.0]


# ---- the trainer end to end

def test_non_finite_loss_stops_the_run_naming_the_micro_batch(tmp_path, monkeypatch):
    """The PPO statistics are read once per micro-batch (no per-forward host-device sync); a non-finite
    loss is still caught there, before the optimizer step, and named."""
    def nan_loss(*args):
        loss, *rest = ppo_loss(*args)
        return (loss * float("nan"), *rest)
    monkeypatch.setattr(train_ddpo, "ppo_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="epoch 0, micro-batch 0: non-finite loss"):
        train_ddpo.main(small(tmp_path))


@pytest.mark.parametrize("diffexp", [True, False])
def test_ratio_is_one_before_the_first_update(tmp_path, diffexp):
    """Stored log-probs are re-scored exactly: with exploration (weighted embeddings, w_low steps) and without."""
    cfg = small(tmp_path, explore=ExploreConfig(diffexp=diffexp, t_thres=500))
    run_dir = train_ddpo.main(cfg)
    (rec,) = read(run_dir)
    assert rec["exploring"] == diffexp
    assert rec["first_ratio_err"] < 1e-5
    assert os.path.exists(os.path.join(run_dir, "rewards.png"))
    assert os.listdir(os.path.join(run_dir, "samples"))


@pytest.mark.slow
def test_tiny_run_raises_the_reward(tmp_path):
    """Seeded: the mean reward of the last two epochs clearly exceeds the first epoch's."""
    cfg = small(tmp_path, num_epochs=6)
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, num_steps=5, batch_size=8, num_batches=2),
                              train=dataclasses.replace(cfg.train, batch_size=8, updates_per_epoch=2, timesteps_per_forward=5))
    recs = read(train_ddpo.main(cfg))
    first, last = recs[0]["reward_mean"], sum(r["reward_mean"] for r in recs[-2:]) / 2
    assert last > first + 0.01, [r["reward_mean"] for r in recs]
    # a continuous reward: only a prompt drawn once in an epoch makes a group of equal rewards
    assert all(0 < r["signal_share"] <= 1 for r in recs)


def test_signal_share_counts_prompt_groups_with_unequal_rewards():
    prompts = ["a", "a", "b", "b", "c", "c", "c"]
    assert train_ddpo.signal_share(prompts, torch.tensor([0., 1., 0., 0., 1., 1., 1.])) == pytest.approx(1 / 3)
    assert train_ddpo.signal_share(prompts, torch.tensor([0., 1., 0., 1., 1., 0., 1.])) == 1.0
    assert train_ddpo.signal_share(prompts, torch.zeros(7)) == 0.0  # a binary reward nobody reaches


def test_timestep_range_trains_only_those_steps(tmp_path, monkeypatch):
    """--train.timestep-range 0 0.5 with 4 DDIM steps: every re-scored transition sits at one of the first 2."""
    import diffusion
    seen, rescore = [], diffusion.step_log_prob

    def recording(models, x_t, t, *args):
        seen.extend(torch.as_tensor(t).flatten().tolist())
        return rescore(models, x_t, t, *args)
    monkeypatch.setattr(diffusion, "step_log_prob", recording)
    cfg = small(tmp_path)
    run_dir = train_ddpo.main(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, timestep_range=(0.0, 0.5))))
    ts = diffusion.timesteps(diffusion.load_models("tiny"), 4).tolist()
    n = cfg.sample.batch_size * cfg.sample.num_batches
    assert sorted(seen) == sorted(ts[:2] * n)  # each sample at each of the first two steps, once
    assert read(run_dir)[0]["first_ratio_err"] < 1e-5


def test_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    full = train_ddpo.main(small(tmp_path / "a", num_epochs=2))
    half = small(tmp_path / "b", num_epochs=2)
    train_ddpo.main(dataclasses.replace(half, num_epochs=1))  # stops after epoch 0 (checkpoint at 1)
    resumed = train_ddpo.main(dataclasses.replace(half, resume=half.run_dir))
    a = load_file(os.path.join(scaffold.latest_checkpoint(full), lora.WEIGHT_NAME))
    b = load_file(os.path.join(scaffold.latest_checkpoint(resumed), lora.WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read(full), read(resumed)
    assert [r["epoch"] for r in rb] == [0, 1]
    assert [r["reward_mean"] for r in ra] == [r["reward_mean"] for r in rb]


# ---- start-up errors

def test_bad_settings_fail_at_start_naming_the_flag(tmp_path):
    cases = [
        (dict(explore=ExploreConfig(w_low=6.0)), "--explore.w-low"),
        (dict(sample=SampleConfig(eta=0.0)), "--sample.eta"),
        (dict(train=TrainConfig(batch_size=3)), "--train.batch-size"),
        (dict(train=TrainConfig(timestep_range=(0.5, 0.5))), "--train.timestep-range"),
        (dict(prompts=str(tmp_path / "missing.txt")), "missing.txt"),
        (dict(model="no-such-model"), "--model"),
    ]
    for kw, flag in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=flag.replace(".", r"\.")):
            train_ddpo.main(small(tmp_path, **kw))


def test_cli_rejects_unknown_preset_and_reward(capsys):
    with pytest.raises(SystemExit):
        train_ddpo.cli(["no-such-preset"])
    with pytest.raises(SystemExit):
        train_ddpo.cli(["tiny", "--reward.name", "aesthetik"])
    cfg = train_ddpo.cli(["tiny", "--no-diffexp", "--explore.t-thres", "900"])
    assert cfg.explore.diffexp is False and cfg.explore.t_thres == 900 and cfg.model == "tiny"
