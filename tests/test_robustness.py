"""Stopping and resuming: a failure mid-epoch (a NaN reward, an exception, a real SIGTERM) saves the
state before that epoch, and resuming from it ends exactly like an uninterrupted run; corrupt
checkpoints give clear errors; bfloat16 runs a training step on the CPU."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import scaffold
from common import ConfigError
import lora
import rewards
import train_alignprop
import train_ddpo
from test_alignprop import small as small_alignprop
from test_ddpo import small as small_ddpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = [(train_ddpo, small_ddpo), (train_alignprop, small_alignprop)]


def weights(run_dir):
    return load_file(os.path.join(scaffold.latest_checkpoint(str(run_dir)), lora.WEIGHT_NAME))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def nan_reward_from_call(n):
    """A make_reward stand-in whose reward is NaN from its n-th call on (counting from 0)."""
    real, calls = rewards.make_reward, [0]

    def make(*args, **kwargs):
        fn = real(*args, **kwargs)

        def reward(images, prompts):
            r = fn(images, prompts)
            calls[0] += 1
            return r * float("nan") if calls[0] > n else r
        return reward
    return make


@pytest.mark.slow
@pytest.mark.parametrize("trainer, small", TRAINERS)
def test_nan_reward_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, trainer, small):
    full = trainer.main(small(tmp_path / "full", num_epochs=3, log=scaffold.LogConfig(save_every=0)))
    cfg = small(tmp_path / "cut", num_epochs=3, log=scaffold.LogConfig(save_every=0))  # checkpoints only at the end
    calls_per_epoch = 2  # both tiny configs score 2 batches per epoch
    monkeypatch.setattr(rewards, "make_reward", nan_reward_from_call(calls_per_epoch + 1))  # NaN in epoch 1
    with pytest.raises(FloatingPointError, match="epoch 1"):
        trainer.main(cfg)
    ckpt = scaffold.latest_checkpoint(cfg.run_dir)
    assert ckpt.endswith("000001")  # the state after epoch 0, the last good one
    monkeypatch.undo()
    resumed = trainer.main(dataclasses.replace(cfg, resume=cfg.run_dir))
    assert same(weights(full), weights(resumed))
    assert [r["reward_mean"] for r in scaffold.read_metrics(os.path.join(full, "metrics.jsonl"))] == \
           [r["reward_mean"] for r in scaffold.read_metrics(os.path.join(resumed, "metrics.jsonl"))]


@pytest.mark.parametrize("trainer, small, scored", [(train_ddpo, small_ddpo, 8), (train_alignprop, small_alignprop, 2)])
def test_failing_reward_model_keeps_the_samples(tmp_path, monkeypatch, trainer, small, scored):
    """The samples the reward model failed on are saved, in both trainers: DDPO's whole epoch on this process
    (2 batches of 4), AlignProp's micro-batch (2)."""
    def broken(*args, **kwargs):
        def reward(images, prompts):
            raise RuntimeError("out of memory (simulated)")
        return reward
    monkeypatch.setattr(rewards, "make_reward", broken)
    cfg = small(tmp_path)
    with pytest.raises(RuntimeError, match="samples are saved in") as e:
        trainer.main(cfg)
    path = str(e.value).rsplit(" in ", 1)[1].rstrip(".")
    saved = torch.load(path)
    assert saved["images"].shape[0] == scored and len(saved["prompts"]) == scored
    assert saved["images"].shape[1:] == (3, 32, 32) and 0 <= saved["images"].min() <= saved["images"].max() <= 1


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    flags = ["tiny", "--num-epochs", "3", "--log.save-every", "0", "--sample.num-steps", "4", "--sample.batch-size", "4",
             "--sample.num-batches", "2", "--train.batch-size", "2", "--train.updates-per-epoch", "2",
             "--train.timesteps-per-forward", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full = tmp_path / "full"
    subprocess.run([sys.executable, "train_ddpo.py", *flags, "--run-dir", str(full)], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=600)
    cut = tmp_path / "cut"
    command = [sys.executable, "train_ddpo.py", *flags, "--run-dir", str(cut), "--resume", "auto"]  # resubmittable as is
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # stop it during epoch 1 (progress bars share the line: search, don't match)
        if "epoch 0 |" in line:
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "saved the state before that epoch" in out, out[-2000:]
    assert int(os.path.basename(scaffold.latest_checkpoint(str(cut)))) >= 1  # epoch 0's work was kept
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)  # the same command again
    assert same(weights(full), weights(cut))


def snapshot(folder) -> dict:
    """Every file under folder -> (size, mtime, bytes)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (os.path.getsize(path), os.path.getmtime(path), f.read())
    return out


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    """A truncated state.pt or LoRA file: one line naming the file and the way on (delete that checkpoint),
    and the failed resume changes nothing in the run folder (config.json and metrics.jsonl included)."""
    run = train_ddpo.main(small_ddpo(tmp_path))
    ckpt = scaffold.latest_checkpoint(run)
    state = os.path.join(ckpt, "state.pt")
    with open(state, "r+b") as f:
        f.truncate(100)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=f"state.pt.*Delete {ckpt} to resume from the checkpoint before it") as e:
        train_ddpo.main(dataclasses.replace(small_ddpo(tmp_path), resume=run, num_epochs=2))
    assert ".." not in str(e.value)
    assert snapshot(run) == before
    weights_file = os.path.join(ckpt, lora.WEIGHT_NAME)
    with open(weights_file, "r+b") as f:
        f.truncate(50)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=f"{lora.WEIGHT_NAME}.*Delete {ckpt} to resume from the checkpoint before it"):
        train_ddpo.main(dataclasses.replace(small_ddpo(tmp_path), resume=run, num_epochs=2))
    assert snapshot(run) == before
    with pytest.raises(ConfigError, match="--resume"):
        train_ddpo.main(dataclasses.replace(small_ddpo(tmp_path), resume=str(tmp_path / "nothing")))


@pytest.mark.parametrize("trainer, small", TRAINERS)
def test_bfloat16_training_step_on_cpu(tmp_path, trainer, small):
    run = trainer.main(small(tmp_path, dtype="bfloat16"))
    (rec,) = scaffold.read_metrics(os.path.join(run, "metrics.jsonl"))
    assert rec["grad_norm"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))
    w = weights(run)
    assert all(t.dtype == torch.float32 for t in w.values())  # LoRA weights stay float32
