"""
A training run on disk and in time, shared by the trainers: the flags both share (LoRA, logging), the
checks of those flags, the run folder and its config.json, metrics.jsonl and the optional trackers
(Weights & Biases, TensorBoard), atomic checkpoints and resuming, clean stops that keep the last good
state, and the end of every epoch (log, grid, plot, checkpoint), so that it cannot drift between trainers.
No math of either method lives here; that stays in the trainers, diffusion.py and explore.py.
"""

import copy
import dataclasses
import glob
import json
import math
import os
import pickle
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch

import common
import explore
import lora
import plots
from common import ConfigError, print0


# -----------------------------------------------------------------------------
# Config groups both trainers share

@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 4
    alpha: float = 4.0  # scale = alpha / rank
    targets: tuple[str, ...] = lora.DEFAULT_TARGETS  # nn.Linear name suffixes in the UNet


@dataclass(frozen=True)
class LogConfig:
    grid_every: int = 10  # epochs between PNG grids of samples (and the last epoch)
    save_every: int = 10  # epochs between checkpoints (and the last epoch)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    grid_size: int = 16  # samples shown per grid
    progress: bool = False  # progress bars even when the output is not a terminal (on a terminal they are always on)
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
    wandb_project: str = "diffexp"
    wandb_name: str = ""  # W&B run name; default: the run folder's name
    wandb_tags: tuple[str, ...] = ()
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard (pip install tensorboard)


# -----------------------------------------------------------------------------
# Start-up checks: every flag both trainers share gets its one-line error before any work starts

def check_shared(cfg) -> None:
    """Fails at start-up, naming the flag, on settings both trainers share (each checks its own after this):
    the training settings, LoRA, evaluation, logging, and the run folder."""
    checks = [
        (cfg.threads >= 0, f"--threads {cfg.threads}: the number of CPU threads, >= 1 (0: automatic)."),
        (cfg.num_epochs >= 1, f"--num-epochs {cfg.num_epochs}: a run needs at least one epoch."),
        (cfg.sample.num_steps >= 1, f"--sample.num-steps {cfg.sample.num_steps}: a trajectory needs at least one DDIM step."),
        (cfg.sample.guidance_scale >= 0, f"--sample.guidance-scale {cfg.sample.guidance_scale}: must be >= 0 "
                                         "(1: no guidance, 0: unconditional)."),
        (cfg.train.lr > 0, f"--train.lr {cfg.train.lr}: the learning rate must be > 0."),
        (cfg.train.max_grad_norm > 0, f"--train.max-grad-norm {cfg.train.max_grad_norm}: must be > 0."),
        (cfg.lora.rank >= 1, f"--lora.rank {cfg.lora.rank}: must be >= 1."),
        (cfg.lora.alpha > 0, f"--lora.alpha {cfg.lora.alpha}: must be > 0 (the LoRA scale is alpha / rank)."),
        (len(cfg.lora.targets) > 0, "--lora.targets: give at least one nn.Linear name suffix, e.g. to_q to_k to_v to_out.0."),
        (cfg.eval.every >= 0, f"--eval.every {cfg.eval.every}: epochs between evaluations, >= 0 (0: never)."),
        (cfg.eval.samples_per_prompt >= 1, f"--eval.samples-per-prompt {cfg.eval.samples_per_prompt}: must be >= 1."),
        (cfg.eval.batch_size >= 1, f"--eval.batch-size {cfg.eval.batch_size}: must be >= 1."),
        (cfg.eval.every == 0 or cfg.eval.plain or bool(cfg.eval.prompts),
         "--eval.no-plain with an empty --eval.prompts leaves nothing to evaluate; set --eval.every 0 instead."),
        (cfg.log.grid_every >= 0, f"--log.grid-every {cfg.log.grid_every}: epochs between grids, >= 0 (0: the last epoch only)."),
        (cfg.log.save_every >= 0, f"--log.save-every {cfg.log.save_every}: epochs between checkpoints, >= 0 (0: the last "
                                  "epoch only)."),
        (cfg.log.keep_checkpoints >= 1, f"--log.keep-checkpoints {cfg.log.keep_checkpoints}: keep at least 1 (resuming "
                                        "needs one)."),
        (cfg.log.grid_size >= 1, f"--log.grid-size {cfg.log.grid_size}: must be >= 1."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_run_dir(run_dir: str, resume: str) -> None:
    """The run folder must be a folder this process can create or write, and a fresh start (no --resume) must
    not start over in a folder that already holds a run's metrics or checkpoints: that would erase them."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"--run-dir {run_dir}: is a file, not a folder.")
    parent = run_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--run-dir {run_dir}: {parent} is not writable; choose another folder.")
    if not resume and (latest_checkpoint(run_dir) or os.path.exists(os.path.join(run_dir, "metrics.jsonl"))):
        raise ConfigError(f"--run-dir {run_dir}: already holds a run (metrics.jsonl or checkpoints); continue it with "
                          "--resume auto, or choose another folder.")


def run_cli(main, parse):
    """main(parse()), with a ConfigError printed once (rank 0) as 'error: ...' and exit status 2."""
    try:
        return main(parse())
    except ConfigError as e:
        print0(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except lora.TargetError as e:  # raised where the model is known, in lora.inject
        print0(f"error: --lora.targets: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def show_progress(log: LogConfig, rank: int) -> bool:
    """Progress bars on process 0, on an interactive terminal (or with --log.progress): in a log file or
    under a cluster's scheduler their carriage-return updates would bury the epoch lines."""
    return rank == 0 and (log.progress or sys.stderr.isatty())


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def write_config(cfg, run_dir: str) -> None:
    """Creates the run folder and stores the config in it (atomically), then prints both."""
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(to_jsonable(cfg), f, indent=2)
    os.replace(path + ".tmp", path)
    print0(json.dumps(to_jsonable(cfg), indent=1))
    print0(f"run folder: {run_dir}")


def resolve_run_dir(run_dir: str, resume: str, name: str) -> str:
    """--run-dir if given; else the run folder of the checkpoint to resume; else runs/{name}-{date}."""
    if run_dir:
        return run_dir
    if resume == "auto":
        raise ConfigError("--resume auto: needs --run-dir (the folder to resume from, or to start in when it has no checkpoint).")
    if resume:
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise ConfigError(f"--resume {resume}: no checkpoint there (expected a checkpoint folder with "
                              "state.pt, or a run folder with checkpoints/).")
        return os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def resume_from(resume: str, run_dir: str) -> str:
    """The checkpoint to resume ('' for a fresh start). --resume auto: the newest checkpoint in --run-dir if
    there is one, else a fresh start, so the same command can be resubmitted after a pre-emption."""
    if resume != "auto":
        return resume
    return latest_checkpoint(run_dir) or ""


# -----------------------------------------------------------------------------
# Metrics: one JSON object per line, one line per epoch / step

class Metrics:
    """Appends records to run_dir/metrics.jsonl. On resume, records at or after `start` (by `key`)
    are dropped first: they came from work after the checkpoint, which will be redone. A fresh start
    (start 0) drops all, the evaluation before training (epoch -1) included."""

    def __init__(self, run_dir: str, start: int = 0, key: str = "epoch"):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        old = read_metrics(self.path) if os.path.exists(self.path) and start > 0 else []
        self.records = [r for r in old if r[key] < start]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(self.path + ".tmp", self.path)

    def log(self, record: dict):
        record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}  # strict JSON
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _require(package: str, flag: str):
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"{flag}: the package {package!r} is not installed; `pip install {package}`, "
                          f"or run without {flag}.") from e


class Tracker:
    """Where an epoch's record goes: metrics.jsonl always (Metrics), and when asked Weights & Biases
    (--log.wandb) and TensorBoard (--log.tensorboard): every number of the record as a scalar against
    reward queries (the x axis of the paper's curves; W&B also offers epoch, logged beside it; TensorBoard
    gets a by_epoch/ copy), the sample grid as an image, the config as hyperparameters. Process 0 only.
    A resumed run continues the same W&B run (its id is kept in the run folder); TensorBoard hides the
    events of the redone epochs (purge_step)."""

    def __init__(self, cfg, run_dir: str, start_epoch: int = 0, start_queries: int = 0):
        self.metrics = Metrics(run_dir, start=start_epoch)
        self.wandb = self.tb = None
        config = to_jsonable(cfg)
        if cfg.log.wandb:
            wandb = _require("wandb", "--log.wandb")
            id_file = os.path.join(run_dir, "wandb_id.txt")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else secrets.token_hex(4)
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_name or os.path.basename(os.path.abspath(run_dir)),
                                    tags=list(cfg.log.wandb_tags), config=config, dir=run_dir, id=run_id, resume="allow")
            self.wandb.define_metric("reward_queries")
            self.wandb.define_metric("*", step_metric="reward_queries")
        if cfg.log.tensorboard:
            _require("tensorboard", "--log.tensorboard")
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_queries if start_epoch else None)
            flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in _flatten(config).items()}
            for summary in hparams(flat, {"reward_mean": 0.0}):  # the config in the HPARAMS tab, in this same run
                self.tb.file_writer.add_summary(summary)

    @property
    def records(self) -> list[dict]:
        return self.metrics.records

    def log(self, record: dict, image: str | None = None, caption: str = ""):
        """Appends the record to metrics.jsonl and mirrors it; `image`: a PNG grid to log with it."""
        self.metrics.log(record)
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and v == v}
        if self.wandb:
            import wandb
            extra = {"samples": wandb.Image(image, caption=caption)} if image else {}
            self.wandb.log({**numbers, **extra})
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["reward_queries"])
                self.tb.add_scalar(f"by_epoch/{k}", v, record["epoch"])
            if image:
                import numpy as np
                from PIL import Image
                self.tb.add_image("samples", np.asarray(Image.open(image).convert("RGB")), record["reward_queries"], dataformats="HWC")
            self.tb.flush()

    def close(self):
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()


def nothing_left(cfg, start_epoch: int, run_dir: str) -> bool:
    """True when a resumed run has already finished its --num-epochs: with --resume auto that is nothing to do
    (a resubmitted job ends at once); an explicit --resume of a finished run is a mistake."""
    if start_epoch < cfg.num_epochs:
        return False
    if cfg.resume != "auto":
        raise ConfigError(f"--resume {cfg.resume}: the run has finished its {start_epoch} epochs; raise --num-epochs to train on.")
    print0(f"{run_dir} has finished its {start_epoch} epochs: nothing to do.")
    return True


def start_tracking(cfg, run_dir: str, rank: int, start_epoch: int, reward_queries: int, policy_scores) -> Tracker | None:
    """The Tracker (process 0; None elsewhere). A fresh run with --eval.every first logs the evaluation of the
    model before training: the first point of the plain policy's curve, at 0 reward queries, as epoch -1."""
    if rank != 0:
        return None
    tracker = Tracker(cfg, run_dir, start_epoch, reward_queries)
    if start_epoch == 0 and cfg.eval.every > 0:
        before = {"epoch": -1, "reward_queries": 0, **policy_scores()}
        tracker.log(before)
        print0("before training" + eval_line(before))
    return tracker


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Checkpoints: run_dir/checkpoints/NNNNNN/{pytorch_lora_weights.safetensors, state.pt, meta.json},
# written into a temporary folder and renamed, so a checkpoint folder is either complete or absent.

def save_checkpoint(run_dir: str, step: int, unet, state: dict, meta: dict) -> str:
    final = os.path.join(run_dir, "checkpoints", f"{step:06d}")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lora.save(unet, tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(to_jsonable(meta), f, indent=2)
    # Re-saving a step (after an interrupt): the old folder is renamed aside, the new one renamed in, then
    # the old one deleted, so at every moment one complete checkpoint of this step exists on disk
    # (between the two renames it is the .old one, which latest_checkpoint also reads).
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint folders under run_dir/checkpoints, oldest first: NNNNNN, or NNNNNN.old where a
    re-save was cut between its two renames (then NNNNNN is missing)."""
    found = glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]*"))
    done = {os.path.basename(p) for p in found if os.path.basename(p).isdigit()}
    keep = [p for p in found if os.path.basename(p).isdigit()
            or (p.endswith(".old") and os.path.basename(p)[:-4] not in done)]
    return sorted(keep, key=os.path.basename)


def latest_checkpoint(path: str) -> str | None:
    """A checkpoint folder itself, or the newest complete one under run_dir/checkpoints."""
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    found = _checkpoints(path)
    return found[-1] if found else None


def load_checkpoint(path: str, unet) -> dict:
    """Loads the LoRA weights into `unet` (already injected) and returns the training state. state.pt is
    read with weights_only=True: it holds only tensors, numbers, strings, lists and dicts, and a file that
    holds anything else (a pickled object, which could run code when loaded) is refused."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"--resume {path}: no checkpoint there (expected a checkpoint folder with "
                          "state.pt, or a run folder with checkpoints/).")
    delete = f"Delete {ckpt} to resume from the checkpoint before it."
    try:
        lora.load(unet, ckpt)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"--resume {path}: {str(e).rstrip('.')}. {delete}") from e
    file = os.path.join(ckpt, "state.pt")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"--resume: refused to load {file}: it holds Python objects other than tensors, numbers, "
                          "lists and dicts, which could run code when unpickled; the trainers never write such "
                          f"files. ({str(e).splitlines()[0]})") from e
    except Exception as e:
        raise ConfigError(f"--resume: checkpoint file {file} is unreadable (truncated or corrupt?): "
                          f"{str(e).rstrip('.')}. {delete}") from e
    state["path"] = ckpt
    return state


def prune_checkpoints(run_dir: str, keep: int):
    found = _checkpoints(run_dir)
    for p in found[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


# -----------------------------------------------------------------------------
# Stopping cleanly: SIGTERM, a non-finite value or a failing reward model in the middle of an epoch
# ends the run with a checkpoint of the state at the START of that epoch (kept in memory: LoRA weights
# and optimizer state are small). All randomness is keyed by position, so resuming redoes the epoch
# exactly and the run ends as if it had never stopped.

class Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


class LastGoodState:
    def __init__(self):
        self.run_dir = None

    def arm(self, run_dir: str, unet, params, rank: int):
        self.run_dir, self.unet, self.params, self.rank = run_dir, unet, params, rank

    def update(self, epoch: int, state: dict):
        """Call at the start of every epoch with the state a checkpoint of `epoch` finished epochs holds."""
        self.epoch, self.state = epoch, copy.deepcopy(state)
        self.weights = [p.detach().clone() for p in self.params]

    def save(self, reason: str) -> str | None:
        if self.run_dir is None or self.rank != 0 or not hasattr(self, "epoch"):
            return None
        with torch.no_grad():
            for p, w in zip(self.params, self.weights):
                p.copy_(w)
        return save_checkpoint(self.run_dir, self.epoch, self.unet, self.state, {"epoch": self.epoch, "stopped_by": reason})


def run_guarded(train, cfg):
    """Runs train(cfg, guard); on SIGTERM or any error, saves guard's last good state, then re-raises."""
    guard = LastGoodState()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return train(cfg, guard)
    except BaseException as e:
        path = guard.save(f"{type(e).__name__}: {e}")
        if path:
            print0(f"stopped in epoch {guard.epoch} by {type(e).__name__}: {e}\nsaved the state before that epoch to "
                   f"{path}; continue with --resume {guard.run_dir}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


# -----------------------------------------------------------------------------
# The run as both trainers drive it, so that its order cannot drift between them:
#
#     run = scaffold.Run(cfg, run_dir, rank, world, start_epoch, reward_queries, ...)  # after start-up
#     for epoch in range(start_epoch, cfg.num_epochs):
#         ...                                                                          # the method
#         run.end_epoch(epoch, record, details, seconds, images, labels)              # every process
#     run.close()                                                                      # every process

class Run:
    """Opened only once start-up has succeeded (flags checked, models, rewards, prompts and the checkpoint to
    resume loaded), so a run that fails at start-up leaves no folder and a failed --resume changes nothing on
    disk. Opening writes config.json, starts the trackers (with the evaluation before training of a fresh
    run) and arms the clean stop; process 0 does the writing, every process calls every method."""

    def __init__(self, cfg, run_dir: str, rank: int, world: int, start_epoch: int, reward_queries: int,
                 unet, params, guard: "LastGoodState", training_state, policy_scores):
        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.unet, self.guard, self.training_state, self.policy_scores = unet, guard, training_state, policy_scores
        if rank == 0:
            write_config(cfg, run_dir)
            print0(explore.schedule_note(cfg.explore, cfg.num_epochs))
        self.tracker = start_tracking(cfg, run_dir, rank, start_epoch, reward_queries, policy_scores)
        guard.arm(run_dir, unet, params, rank)
        guard.update(start_epoch, training_state(start_epoch))  # what a stop before the first epoch ends saves

    def end_epoch(self, epoch: int, record: dict, details: str, seconds: float, images, labels: list[str]):
        """Process 0: evaluates the plain policy when due, draws the grid of `images` (the epoch's first samples)
        when due, logs the record, prints the epoch line, redraws rewards.png and writes a checkpoint when due.
        The guard's last good state moves past this epoch as soon as it is logged."""
        if self.rank != 0:
            return
        cfg, last = self.cfg, epoch == self.cfg.num_epochs - 1
        if cfg.eval.every > 0 and common.every(cfg.eval.every, epoch + 1, last):
            record.update(self.policy_scores())
        grid, mode = None, "explore" if record["exploring"] else "plain"
        if common.every(cfg.log.grid_every, epoch + 1, last):
            grid = os.path.join(self.run_dir, "samples", f"epoch_{epoch:04d}.png")
            title = f"{cfg.name}, epoch {epoch}: training samples ({'exploring' if mode == 'explore' else 'plain'})"
            plots.save_grid(images, grid, labels=labels, title=title)
        self.tracker.log(record, image=grid, caption=f"epoch {epoch} ({mode})")
        state = self.training_state(epoch + 1)
        self.guard.update(epoch + 1, state)  # this epoch is done: a stop from here on keeps it
        print0(f"epoch {epoch} | reward {record['reward_mean']:.4g}±{record['reward_std']:.3g} | {details} | {mode} | "
               f"{seconds:.1f} s" + eval_line(record))
        plots.plot_rewards(self.tracker.records, os.path.join(self.run_dir, "rewards.png"),
                           title=f"{cfg.name}: {cfg.reward.name}")
        if common.every(cfg.log.save_every, epoch + 1, last):
            save_checkpoint(self.run_dir, epoch + 1, self.unet, state, {"config": cfg, "epoch": epoch + 1, **record})
            prune_checkpoints(self.run_dir, cfg.log.keep_checkpoints)

    def close(self):
        """The barrier first: no process returns before process 0 has written the last checkpoint (a job that
        reads it next, or a scheduler that sees the job end, finds it complete). The trackers close after it:
        closing W&B can take long or fail, and neither should hold (or hang) the other processes."""
        common.barrier(self.world)
        if self.tracker:
            self.tracker.close()


def score(reward_fn, batches: list, prompts: list[list[str]], name: str, path: str) -> list:
    """reward_fn(images, prompts) of each batch of images. When the reward model fails, every batch given is
    saved to `path` (the samples are worth looking at) and the error names the batch and the file."""
    out = []
    for n, (images, texts) in enumerate(zip(batches, prompts)):
        try:
            out.append(reward_fn(images, texts))
        except Exception as e:
            torch.save({"images": torch.cat([b.detach() for b in batches]).cpu(), "prompts": sum(prompts, [])}, path)
            raise RuntimeError(f"the reward model ({name}) failed on batch {n} of {len(batches)}: {e}. "
                               f"The samples are saved in {path}.") from e
    return out


def eval_line(record: dict) -> str:
    """' | plain 0.52 | heldout 0.48' for the evaluated rewards of an epoch record ('' when none)."""
    return "".join(f" | {k} {record[f'{k}_reward_mean']:.4g}" for k in ("plain", "heldout") if f"{k}_reward_mean" in record)


