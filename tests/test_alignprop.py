"""AlignProp (train_alignprop.py): gradient truncation, the reward in the loss, exploration observed in
the sampling loop, learning, checkpoint/resume and start-up errors. Offline tiny model, few steps."""

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

import common
import scaffold
import diffusion
import lora
import rewards
import train_alignprop
from explore import ExploreConfig
from rewards import RewardConfig
from train_alignprop import Config, TrainConfig


def small(tmp_path, **kw) -> Config:
    cfg = train_alignprop.PRESETS["tiny"][1]
    cfg = dataclasses.replace(
        cfg, run_dir=str(tmp_path / "run"), num_epochs=1, k=1,
        sample=dataclasses.replace(cfg.sample, num_steps=4),
        train=dataclasses.replace(cfg.train, batch_size=2, total_batch=4),
        log=scaffold.LogConfig(grid_every=1, save_every=1))
    return dataclasses.replace(cfg, **kw)


def read(run_dir):
    return scaffold.read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def test_truncation_only_last_k_unet_calls_give_lora_gradients(tiny, cond, lora_models):
    """Only LoRA parameters get gradients; K = 1: only the last UNet call runs with gradient; K = T: all do."""
    models, params = lora_models()
    reward_fn = rewards.make_reward("brightness")
    T = 4
    calls = []
    hook = models.unet.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    try:
        for k in (1, T):
            calls.clear()
            for p in params:
                p.grad = None
            traj = diffusion.sample(models, cond, diffusion.encode_text(models, [""]), 5.0, T, 0.0,
                                    torch.Generator().manual_seed(0), grad_last_k=k)
            (-reward_fn(traj.images, ["x"] * len(cond)).mean()).backward()
            # the first T calls are the sampling loop's (checkpointing re-runs the last K during backward)
            assert calls[:T] == [False] * (T - k) + [True] * k
            assert traj.grad_from == T - k
            assert all(p.grad is not None for p in params)
            assert any(p.grad.abs().sum() > 0 for p in params)
            frozen = [p for n, p in models.unet.named_parameters() if "lora_" not in n]
            assert all(p.grad is None for p in frozen)
    finally:
        hook.remove()


def test_draw_k():
    g = torch.Generator().manual_seed(0)
    cfg = dataclasses.replace(Config(), truncation="uniform", k_min=2, k_max=4)
    ks = {train_alignprop.draw_k(cfg, g) for _ in range(200)}
    assert ks == {2, 3, 4}
    assert train_alignprop.draw_k(dataclasses.replace(Config(), k=3), g) == 3


def test_logged_reward_equals_reward_of_the_images(tmp_path):
    """The trainer's logged reward is the reward of the images it sampled (recomputed here from the same
    seeds with the untrained model: LoRA starts as the identity)."""
    cfg = small(tmp_path, explore=ExploreConfig(diffexp=False), train=TrainConfig(batch_size=4, total_batch=4))
    (rec,) = read(train_alignprop.main(cfg))
    models = diffusion.load_models("tiny", seed=cfg.seed)
    prompt_set = diffusion.load_prompts(cfg.prompts)
    idx = torch.randint(len(prompt_set), (4,), generator=common.generator(cfg.seed, 0, 0, "prompts"))
    batch = [prompt_set[i] for i in idx]
    cond, _ = diffusion.encode_prompts(models, batch)
    with torch.no_grad():
        traj = diffusion.sample(models, cond, diffusion.encode_text(models, [""]), cfg.sample.guidance_scale,
                                cfg.sample.num_steps, cfg.sample.eta, common.generator(cfg.seed, 0, 0, "noise"))
    r = rewards.make_reward(cfg.reward.name)(traj.images, [p.text for p in batch])
    assert abs(r.mean().item() - rec["reward_mean"]) < 1e-5
    assert rec["grad_from_step"] == cfg.sample.num_steps - 1


def test_exploration_seen_in_the_sampling_loop(tmp_path, monkeypatch):
    """With DiffExp on, the UNet calls of steps with t > t_thres use w_low and the rest w_high."""
    seen = []
    real = diffusion.guided_eps

    def spy(unet, x, t, cond, uncond, w):
        seen.append((int(torch.as_tensor(t).reshape(-1)[0]), w.detach().clone()))
        return real(unet, x, t, cond, uncond, w)

    monkeypatch.setattr(diffusion, "guided_eps", spy)
    cfg = small(tmp_path, explore=ExploreConfig(t_thres=500, w_low=0.5), checkpointing=False)
    train_alignprop.main(cfg)
    assert len(seen) == 2 * cfg.sample.num_steps  # 2 micro-batches of 4 steps
    for t, w in seen:
        assert torch.all(w == (0.5 if t > 500 else cfg.sample.guidance_scale)), (t, w)
    assert {t > 500 for t, _ in seen} == {True, False}


def test_tiny_run_raises_the_reward(tmp_path):
    cfg = small(tmp_path, num_epochs=8, k=2, train=TrainConfig(batch_size=4, total_batch=4, lr=3e-2))
    recs = read(train_alignprop.main(cfg))
    first, last = recs[0]["reward_mean"], sum(r["reward_mean"] for r in recs[-2:]) / 2
    assert last > first + 0.02, (first, last)


def test_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    full = train_alignprop.main(small(tmp_path / "a", num_epochs=2))
    half = small(tmp_path / "b", num_epochs=2)
    train_alignprop.main(dataclasses.replace(half, num_epochs=1))
    resumed = train_alignprop.main(dataclasses.replace(half, resume=half.run_dir))
    a = load_file(os.path.join(scaffold.latest_checkpoint(full), lora.WEIGHT_NAME))
    b = load_file(os.path.join(scaffold.latest_checkpoint(resumed), lora.WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward_mean"] for r in read(full)] == [r["reward_mean"] for r in read(resumed)]


def test_bad_settings_fail_at_start(tmp_path):
    cases = [
        (dict(reward=RewardConfig(name="jpeg-compressibility")), "--reward.name"),
        (dict(k=9), "--k"),
        (dict(train=TrainConfig(batch_size=3, total_batch=4)), "--train.total-batch"),
        (dict(explore=ExploreConfig(t_thres=1000)), "--explore.t-thres"),
    ]
    for kw, flag in cases:
        with pytest.raises(ValueError, match=flag.replace(".", r"\.")):
            train_alignprop.main(small(tmp_path, **kw))
