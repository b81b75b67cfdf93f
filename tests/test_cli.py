"""What surrounds the trainers: configuration mistakes as one-line errors (exit status 2, printed once
under torchrun), empty runs refused, progress bars only on a terminal, experiment tracking (TensorBoard
and W&B offline), safe and atomic checkpoints, and --resume auto."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import common
import scaffold
import train_alignprop
import train_ddpo
from common import ConfigError
from test_alignprop import small as small_alignprop
from test_ddpo import small as small_ddpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# ---- configuration mistakes

@pytest.mark.parametrize("flags, flag", [
    (["--num-epochs", "0"], "--num-epochs 0"),
    (["--explore.t-thres", "1200"], "--explore.t-thres 1200"),
    (["--prompts", "no/such/prompts.txt"], "no/such/prompts.txt"),
    (["--lora.targets", "no_such_layer"], "--lora.targets"),  # found out only once the model is loaded
])
def test_config_error_is_one_line_and_exit_2(flags, flag):
    out = subprocess.run([sys.executable, "train_ddpo.py", "tiny", *flags], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0], out.stderr[-2000:]


def test_config_error_is_printed_once_under_torchrun(tmp_path, free_port):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={free_port}", "train_ddpo.py", "tiny", "--num-epochs", "0",
                          "--run-dir", str(tmp_path / "run")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert text.count("error: --num-epochs 0") == 1, text[-3000:]
    assert 'File "' + os.path.join(ROOT, "train_ddpo.py") not in text  # no traceback through our code


def test_device_is_checked_by_name():
    assert common.resolve_device("cpu") == "cpu"
    assert common.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device gpu0: not a device name"):
        common.resolve_device("gpu0")
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"--device cuda:{count}: "):
        common.resolve_device(f"cuda:{count}")  # one past the last visible GPU (none here: cuda:0)


def test_run_cli_keeps_real_crashes(capsys):
    def crash(cfg):
        raise RuntimeError("a real bug")

    def mistake(cfg):
        raise ConfigError("--flag x: do y instead")
    with pytest.raises(RuntimeError, match="a real bug"):
        scaffold.run_cli(crash, lambda: None)
    with pytest.raises(SystemExit) as e:
        scaffold.run_cli(mistake, lambda: None)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --flag x: do y instead\n"


@pytest.mark.parametrize("trainer, small", [(train_ddpo, small_ddpo), (train_alignprop, small_alignprop)])
def test_empty_runs_are_errors(tmp_path, trainer, small):
    with pytest.raises(ConfigError, match="--num-epochs 0"):
        trainer.main(small(tmp_path, num_epochs=0))
    with pytest.raises(ConfigError, match="--resume auto: needs --run-dir"):
        trainer.main(small(tmp_path, run_dir="", resume="auto"))


@pytest.mark.parametrize("group, field, value, flag", [
    ("sample", "num_steps", 0, "--sample.num-steps 0"),
    ("sample", "guidance_scale", -1.0, "--sample.guidance-scale -1.0"),
    ("train", "lr", 0.0, "--train.lr 0.0"),
    ("train", "max_grad_norm", -1.0, "--train.max-grad-norm -1.0"),
    ("lora", "rank", 0, "--lora.rank 0"),
    ("lora", "alpha", 0.0, "--lora.alpha 0.0"),
    ("lora", "targets", (), "--lora.targets"),
    ("eval", "every", -1, "--eval.every -1"),
    ("eval", "samples_per_prompt", 0, "--eval.samples-per-prompt 0"),
    ("eval", "batch_size", 0, "--eval.batch-size 0"),
    ("log", "keep_checkpoints", 0, "--log.keep-checkpoints 0"),
    ("log", "grid_size", 0, "--log.grid-size 0"),
])
@pytest.mark.parametrize("trainer, small", [(train_ddpo, small_ddpo), (train_alignprop, small_alignprop)])
def test_shared_settings_are_checked_before_anything_runs(tmp_path, trainer, small, group, field, value, flag):
    cfg = small(tmp_path)
    cfg = dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **{field: value})})
    with pytest.raises(ConfigError, match=re.escape(flag)):
        trainer.main(cfg)
    assert not os.path.exists(cfg.run_dir)  # refused before the run folder is made


@pytest.mark.parametrize("trainer, small", [(train_ddpo, small_ddpo), (train_alignprop, small_alignprop)])
def test_failed_start_up_leaves_no_run_folder(tmp_path, trainer, small):
    """Mistakes found only while loading (an empty prompt file, an unknown model, LoRA targets the model lacks)
    come before the run folder is made, so the evaluate globs never meet a folder without a run in it."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for kw, message in ((dict(prompts=str(empty)), "empty.txt"), (dict(model="no-such-model"), "--model"),
                        (dict(lora=scaffold.LoRAConfig(targets=("no_such_layer",))), "no_such_layer")):
        with pytest.raises(Exception, match=re.escape(message)):
            trainer.main(small(tmp_path, **kw))
        assert not os.path.exists(small(tmp_path).run_dir), kw


def test_run_folder_mistakes_are_refused(tmp_path):
    """A fresh start in a folder that holds a run would erase its metrics: refused, naming --resume auto.
    A --run-dir that is a file is refused too; --threads must be >= 0."""
    run = train_ddpo.main(small_ddpo(tmp_path))
    before = {p: os.path.getmtime(os.path.join(run, p)) for p in ("metrics.jsonl", "config.json")}
    with pytest.raises(ConfigError, match="already holds a run.*--resume auto"):
        train_ddpo.main(small_ddpo(tmp_path))
    assert before == {p: os.path.getmtime(os.path.join(run, p)) for p in before}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        train_ddpo.main(small_ddpo(tmp_path, run_dir=str(tmp_path / "file")))
    with pytest.raises(ConfigError, match="--threads -1"):
        train_ddpo.main(small_ddpo(tmp_path / "t", threads=-1))


def test_threads_flag_sets_torch_threads(monkeypatch):
    """--threads N sets torch's threads; 0 keeps OMP_NUM_THREADS when set, else divides this process's cores
    among torchrun's processes on the machine."""
    before = torch.get_num_threads()
    try:
        assert common.set_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert common.set_threads(0) == torch.get_num_threads() == 3  # left as it is
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        cores = len(os.sched_getaffinity(0))
        assert common.set_threads(0) == max(1, cores // 2) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ---- logs

def test_progress_bars_only_when_asked(tmp_path, capfd):
    """Under pytest stderr is no terminal: no bars (no carriage returns) unless --log.progress."""
    train_alignprop.main(small_alignprop(tmp_path / "quiet"))
    quiet = capfd.readouterr()
    assert "\r" not in quiet.err and "\r" not in quiet.out
    assert "epoch 0 |" in quiet.out
    train_alignprop.main(small_alignprop(tmp_path / "bars", log=scaffold.LogConfig(progress=True)))
    assert "\r" in capfd.readouterr().err


# ---- tracking

def test_tensorboard_event_file_has_scalars_images_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = train_alignprop.main(small_alignprop(tmp_path, num_epochs=2, log=scaffold.LogConfig(tensorboard=True, grid_every=1)))
    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    records = scaffold.read_metrics(os.path.join(run, "metrics.jsonl"))
    assert {"reward_mean", "by_epoch/reward_mean", "grad_norm", "reward_queries"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("reward_mean")] == [r["reward_queries"] for r in records]
    assert [e.value for e in acc.Scalars("reward_mean")] == pytest.approx([r["reward_mean"] for r in records])
    assert [e.step for e in acc.Scalars("by_epoch/reward_mean")] == [0, 1]
    assert tags["images"] == ["samples"] and len(acc.Images("samples")) == 2
    assert "_hparams_/session_start_info" in tags["tensors"] or acc.summary_metadata  # the config as hparams


def test_wandb_offline_writes_local_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train_ddpo.main(small_ddpo(tmp_path, log=scaffold.LogConfig(wandb=True, wandb_tags=("test",))))
    with open(os.path.join(run, "wandb_id.txt")) as f:
        run_id = f.read().strip()
    offline = [d for d in os.listdir(os.path.join(run, "wandb")) if d.startswith("offline-run-") and d.endswith(run_id)]
    assert len(offline) == 1
    folder = os.path.join(run, "wandb", offline[0])
    with open(os.path.join(folder, f"run-{run_id}.wandb"), "rb") as f:
        log = f.read()  # the records W&B would upload (wandb sync): config, metrics
    assert b"ddpo-tiny" in log and b"reward_mean" in log and b"reward_queries" in log
    assert os.listdir(os.path.join(folder, "files", "media", "images"))  # the sample grid


def test_missing_tracking_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ConfigError, match="--log.wandb: the package 'wandb' is not installed"):
        train_ddpo.main(small_ddpo(tmp_path, log=scaffold.LogConfig(wandb=True)))


# ---- checkpoints

class NotATensor:
    pass


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    run = train_ddpo.main(small_ddpo(tmp_path))
    ckpt = scaffold.latest_checkpoint(run)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)  # what the trainers write loads safely
    state["payload"] = NotATensor()
    torch.save(state, os.path.join(ckpt, "state.pt"))
    with pytest.raises(ConfigError, match="refused to load .*state.pt"):
        train_ddpo.main(small_ddpo(tmp_path, num_epochs=2, resume=run))


def test_resaving_a_step_always_leaves_one_complete_checkpoint(tmp_path, monkeypatch, tiny):
    import copy
    import lora
    unet = copy.deepcopy(tiny.unet)
    lora.inject(unet, rank=2)
    scaffold.save_checkpoint(str(tmp_path), 3, unet, {"epoch": 3, "version": 1}, {})
    real, seen = os.replace, []

    def replace(src, dst):  # before every rename of a checkpoint folder: a complete checkpoint of step 3 is on disk
        if os.path.dirname(str(dst)) != str(tmp_path / "checkpoints"):
            return real(src, dst)
        found = scaffold.latest_checkpoint(str(tmp_path))
        seen.append(found is not None and os.path.isfile(os.path.join(found, "state.pt")))
        if len(seen) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        scaffold.save_checkpoint(str(tmp_path), 3, unet, {"epoch": 3, "version": 2}, {})
    monkeypatch.setattr(os, "replace", real)
    assert seen == [True, True]
    left = scaffold.latest_checkpoint(str(tmp_path))  # the old one, renamed aside
    assert left.endswith("000003.old") and scaffold.load_checkpoint(str(tmp_path), unet)["version"] == 1
    scaffold.save_checkpoint(str(tmp_path), 3, unet, {"epoch": 3, "version": 3}, {})  # the next save cleans up
    assert os.listdir(tmp_path / "checkpoints") == ["000003"]
    assert scaffold.load_checkpoint(str(tmp_path), unet)["version"] == 3


@pytest.mark.parametrize("trainer, small", [(train_ddpo, small_ddpo), (train_alignprop, small_alignprop)])
def test_resume_auto_starts_fresh_then_continues(tmp_path, trainer, small):
    """--resume auto with no checkpoint is a fresh start; on a finished run it has nothing to do; an explicit
    --resume of a finished run is an error (raise --num-epochs)."""
    full = trainer.main(small(tmp_path / "full", num_epochs=2))
    auto = trainer.main(small(tmp_path / "auto", num_epochs=2, resume="auto"))
    assert scaffold.read_metrics(os.path.join(full, "metrics.jsonl"))[-1]["reward_mean"] == \
        scaffold.read_metrics(os.path.join(auto, "metrics.jsonl"))[-1]["reward_mean"]
    assert trainer.main(small(tmp_path / "auto", num_epochs=2, resume="auto")) == auto  # nothing to do
    with pytest.raises(ConfigError, match="finished its 2 epochs"):
        trainer.main(small(tmp_path / "auto", num_epochs=2, resume=auto))


def test_toy_presets_use_the_mapped_t_thres():
    """The trainers' toy presets use the paper's t_thres 800 mapped to the toy model's schedule by noise level
    (toy_pretrain.snr_matched_t: the nearest alpha_bar, 569; the presets round it to 570)."""
    import toy_pretrain
    import train_grpo
    for trainer in (train_ddpo, train_alignprop, train_grpo):
        assert trainer.TOY_T_THRES == toy_pretrain.T_THRES and abs(trainer.TOY_T_THRES - toy_pretrain.snr_matched_t(800)) <= 1
        for preset in [p for p in ("toy", "toy-classifier") if p in trainer.PRESETS]:
            assert trainer.PRESETS[preset][1].explore.t_thres == trainer.TOY_T_THRES


def test_sample_grids_say_their_epoch_and_whether_exploring(tmp_path, monkeypatch):
    """Each epoch's grid is titled with the run, the epoch and whether its samples were drawn exploring."""
    import plots
    titles, save_grid = [], plots.save_grid

    def spy(images, path, **kw):
        titles.append(kw.get("title"))
        return save_grid(images, path, **kw)
    monkeypatch.setattr(plots, "save_grid", spy)
    cfg = small_alignprop(tmp_path, num_epochs=2)
    train_alignprop.main(dataclasses.replace(cfg, explore=dataclasses.replace(cfg.explore, explore_until=0.5)))
    assert titles == ["alignprop-tiny, epoch 0: training samples (exploring)",
                      "alignprop-tiny, epoch 1: training samples (plain)"]


def test_loading_a_model_folder_prints_no_progress_bar(tmp_path):
    """transformers' "Loading weights" bar would land in every run's log: loading the toy model prints nothing."""
    code = "import diffusion; diffusion.load_models('weights/toy')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Loading weights" not in out.stderr + out.stdout, out.stderr[-2000:]
