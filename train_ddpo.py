"""
DDPO with DiffExp: reward fine-tuning of a text-to-image diffusion model by policy gradient with PPO
clipping over DDIM-with-eta sampling trajectories (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning"), with DiffExp's exploration (Chae et al., AAAI 2025) on the sampling side.

    python train_ddpo.py tiny                          # offline tiny model, a few minutes on a CPU
    python train_ddpo.py tiny --no-diffexp             # the same without exploration (the baseline)
    python train_ddpo.py sd15-aesthetic                # SD v1.5, 45 animals, LAION aesthetic, one GPU
    python train_ddpo.py sd15-pickscore --explore.t-thres 700
    python train_ddpo.py sdxl-aesthetic                # SDXL base at 1024 px, bfloat16
    torchrun --nproc_per_node=8 train_ddpo.py sd15-aesthetic   # 8 GPUs, the same effective batch
    python train_ddpo.py tiny --resume runs/ddpo-tiny-20260101-120000   # continue a run
    python train_ddpo.py --help                        # presets; `train_ddpo.py tiny --help`: all flags

Kept from the DDPO reference: DDIM log-probs reduced by the mean over latent dimensions, per-prompt
reward statistics with a buffer across epochs, shuffled timesteps, PPO clipping with clip_range 1e-4,
gradient accumulation over samples x timesteps. Added: each sample stores the guidance scale of every
step and its exact (possibly re-weighted) prompt embedding, so the training pass re-scores exactly
the policy that sampled (the ratio is 1 before the first update of each epoch; it is logged).
"""

import dataclasses
import functools
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

import common
import diffusion
import evaluate
import explore
import lora
import plots
import rewards
import scaffold
from common import ConfigError, print0
from evaluate import EvalConfig
from explore import ExploreConfig
from rewards import RewardConfig
from scaffold import LogConfig, LoRAConfig

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class SampleConfig:
    num_steps: int = 50  # DDIM steps T per trajectory
    eta: float = 1.0  # DDIM stochasticity; must be > 0 (a deterministic step has no log-prob)
    guidance_scale: float = 5.0  # w_high: classifier-free guidance scale (the only one when not exploring)
    batch_size: int = 8  # trajectories per sampling batch
    num_batches: int = 32  # sampling batches per epoch: samples per epoch = batch_size * num_batches


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 4  # trajectories per training micro-batch (each re-scored at several timesteps)
    updates_per_epoch: int = 2  # optimizer steps per inner epoch; gradient accumulation is derived from it
    inner_epochs: int = 1  # passes over each epoch's samples
    timestep_fraction: float = 1.0  # fraction of each trajectory's (shuffled) steps trained on
    # train only steps i with start <= i / T < end (0: the noisiest)
    timestep_range: tuple[float, float] = (0.0, 1.0)
    # timesteps folded into one UNet batch: the same gradient for N x the activations (2: 1.3 to 2.0x faster
    # on an H200, 19 GiB at SD v1.5, batch 4; docs/benchmarks.md)
    timesteps_per_forward: int = 2
    lr: float = 3e-4  # AdamW learning rate of the LoRA weights
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # gradient clipping
    clip_range: float = 1e-4  # PPO: ratio clipped to [1 - clip_range, 1 + clip_range]
    adv_clip_max: float = 5.0  # advantages clipped to +-adv_clip_max
    per_prompt_stats: bool = True  # normalise rewards per prompt (False: over the whole epoch's batch)
    buffer_size: int = 32  # per-prompt reward buffer, kept across epochs
    min_count: int = 16  # below this many rewards for a prompt, use the epoch's global statistics


@dataclass(frozen=True)
class Config:
    name: str = "ddpo"  # run name: the run folder is runs/{name}-{date} unless --run-dir is given
    # tiny | sd15 | sd15-random | tiny-sdxl | sdxl | sdxl-random | a local diffusers folder | a hub id
    model: str = "sd15"
    # animals | animal-activities | unseen-animals | drawbench[:Category,...] | file.txt
    prompts: str = "animals"
    num_epochs: int = 200  # planned epochs (exploration runs for the first explore_until of them)
    seed: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    # frozen weights and autocast (auto: bfloat16 on a GPU, float32 on a CPU); LoRA and optimizer state
    # stay float32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # CPU threads of torch (0: the cores this process may use, shared among torchrun's processes)
    threads: int = 0
    compile: bool = False  # torch.compile the UNet (checkpoints are always saved from the uncompiled module)
    run_dir: str = ""  # default: runs/{name}-{date}
    resume: str = ""  # a run folder (its newest checkpoint) or a checkpoint folder
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()
    explore: ExploreConfig = ExploreConfig(w_low=1.0)
    reward: RewardConfig = RewardConfig(name="aesthetic")
    lora: LoRAConfig = LoRAConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()


BASE = Config()
# shipped with the repo
TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy")
TOY_T_THRES = 570  # the paper's t_thres 800 mapped to the toy model's schedule by noise level (tested)
# The toy world (docs/toy-world.md), with train_alignprop.py's toy prompts, rewards, 10 DDIM steps and CFG 5,
# and DiffExp's t_thres mapped to this schedule by noise level (TOY_T_THRES). Each
# optimizer step averages 256 samples (with 32, Adam follows noise: experiments.md, section 5), and only
# the noisier first half of each trajectory is trained (the late steps' log-prob gradients are large and
# carry no reward information there). The plain policy is evaluated every epoch on fixed seeds.
TOY = dataclasses.replace(
    BASE, name="ddpo-toy", model=TOY_MODEL,
    prompts=os.path.join(diffusion.PROMPTS_DIR, "toy_train.txt"), num_epochs=5,
    sample=SampleConfig(num_steps=10, batch_size=16, num_batches=16),
    train=TrainConfig(batch_size=16, updates_per_epoch=1, timesteps_per_forward=5, timestep_range=(0.0, 0.5),
                      lr=5e-3, clip_range=0.2, min_count=4),
    explore=ExploreConfig(t_thres=TOY_T_THRES), reward=RewardConfig(name="toy-aesthetic"),
    lora=LoRAConfig(alpha=16.0),
    log=LogConfig(grid_every=1, save_every=1),
    eval=EvalConfig(every=1, samples_per_prompt=2, diversity=False,
                    prompts=os.path.join(diffusion.PROMPTS_DIR, "toy_heldout.txt")))
PRESETS = {
    "tiny": (
        "Offline tiny random model, the model-free brightness reward, a few epochs on a CPU.",
        dataclasses.replace(
            BASE, name="ddpo-tiny", model="tiny", num_epochs=7,
            sample=SampleConfig(num_steps=10, batch_size=8, num_batches=4),
            train=TrainConfig(batch_size=4, updates_per_epoch=4, timesteps_per_forward=10, lr=1e-2,
                              clip_range=0.1, min_count=4),
            explore=ExploreConfig(t_thres=700), reward=RewardConfig(name="brightness"),
            lora=LoRAConfig(alpha=16.0),
            log=LogConfig(grid_every=5, save_every=5), eval=EvalConfig(clip_tiny=True))),
    "toy": ("The toy world's aesthetic task (the shipped pixel-space model, offline, CPU): the quick start.",
            TOY),
    "toy-classifier": (
        "The toy world's prompt-fidelity task (toy-classifier reward), otherwise as toy.",
        dataclasses.replace(TOY, name="ddpo-toy-classifier", reward=RewardConfig(name="toy-classifier"))),
    "sd15-aesthetic": (
        "SD v1.5, 45 animals, LAION aesthetic; the DDPO reference hyperparameters.",
        dataclasses.replace(BASE, name="ddpo-sd15-aesthetic")),
    "sd15-pickscore": ("SD v1.5, 135 animal-activity prompts, PickScore.", dataclasses.replace(
        BASE, name="ddpo-sd15-pickscore", prompts="animal-activities",
        reward=RewardConfig(name="pickscore"))),
}
# SDXL base at 1024 px: the sd15 recipe (256 samples and 2 optimizer steps per epoch, guidance 5.0, which is
# also diffusers' SDXL default) in bfloat16 (the 2.6 B-parameter UNet in float32 would double memory and
# time) and smaller batches: 1024 px latents have 4x the positions of SD v1.5's 512 px ones and the UNet is
# 3x larger, so sampling batches of 4 and training micro-batches of 1 sample (2 with CFG). Sized for one
# 80 GB GPU, not yet measured there.
SDXL = dataclasses.replace(BASE, model="sdxl", dtype="bfloat16",
                           train=TrainConfig(batch_size=1, timesteps_per_forward=1),
                           sample=SampleConfig(guidance_scale=5.0, batch_size=4, num_batches=64))
PRESETS |= {
    "sdxl-aesthetic": (
        "SDXL base, 45 animals, LAION aesthetic; bfloat16, smaller batches.",
        dataclasses.replace(SDXL, name="ddpo-sdxl-aesthetic")),
    "sdxl-pickscore": (
        "SDXL base, 135 animal-activity prompts, PickScore; bfloat16, smaller batches.",
        dataclasses.replace(SDXL, name="ddpo-sdxl-pickscore", prompts="animal-activities",
                            reward=RewardConfig(name="pickscore"))),
}

# -----------------------------------------------------------------------------
# The math of DDPO, as small functions the tests call directly


class PerPromptStatTracker:
    """Reward normalisation per prompt string. This batch's rewards are appended to the prompt's buffer
    (the last `buffer_size` rewards, kept across epochs) BEFORE its statistics are taken; with fewer than
    `min_count` rewards buffered, the whole batch's mean and std are used instead."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        rewards = rewards.double().cpu()
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = torch.tensor([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards.mean(), rewards.std(unbiased=False)
            else:
                stats = torch.tensor(buffer, dtype=torch.float64)
                mean, std = stats.mean(), stats.std(unbiased=False)
            advantages[mask] = (rewards[mask] - mean) / (std + 1e-6)
        return advantages.float()

    def state_dict(self):
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state):
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def signal_share(prompts: list[str], rewards: torch.Tensor) -> float:
    """The share of this epoch's prompt groups (the samples of one prompt) whose rewards are not all equal.
    A group of equal rewards (a binary reward no sample reaches) gives its samples advantage 0 within the
    group: no signal, whatever the buffer holds later."""
    groups = {}
    for p, r in zip(prompts, rewards.tolist()):
        groups.setdefault(p, set()).add(r)
    return sum(len(v) > 1 for v in groups.values()) / len(groups)


def global_advantages(rewards: torch.Tensor) -> torch.Tensor:
    rewards = rewards.float()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)


def ppo_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """Clipped surrogate (Schulman et al. 2017), to be minimised. All inputs (B,).
    -> loss, ratio, approx_kl = 0.5 * mean((log_prob - old)^2), clipfrac = mean(|ratio - 1| > clip_range)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, ratio, approx_kl, clipfrac


# -----------------------------------------------------------------------------


def main(cfg: Config, load_models=diffusion.load_models):
    """Trains with cfg. load_models: how the models are loaded (bench_parts.py passes one that draws random
    full-size weights on the GPU)."""
    return scaffold.run_guarded(functools.partial(train, load_models=load_models), cfg)


def check(cfg: Config, world: int) -> tuple[torch.Tensor, int]:
    """DDPO's own flags, after the shared ones. -> (the step indices trained on, micro-batches per optimizer
    step over all processes). Batch arithmetic: N samples per epoch, split over the processes; each optimizer
    step averages grad_accum micro-batches (in all) x train_steps timesteps."""
    if cfg.sample.eta <= 0:
        raise ConfigError(f"--sample.eta {cfg.sample.eta}: DDPO needs eta > 0 (a deterministic DDIM step has "
                          f"no log-prob).")
    if not 0 < cfg.train.timestep_fraction <= 1:
        raise ConfigError(f"--train.timestep-fraction {cfg.train.timestep_fraction}: must lie in (0, 1].")
    T, (start, end) = cfg.sample.num_steps, cfg.train.timestep_range
    trainable = torch.tensor([i for i in range(T) if start <= i / T < end], dtype=torch.long)
    if not 0 <= start < end <= 1 or len(trainable) == 0:
        raise ConfigError(f"--train.timestep-range {start} {end}: needs 0 <= start < end <= 1 and at least "
                          f"one of the {T} steps i with start <= i / {T} < end.")
    if min(cfg.sample.batch_size, cfg.sample.num_batches, cfg.train.batch_size, cfg.train.inner_epochs,
           cfg.train.timesteps_per_forward) < 1:
        raise ConfigError("--sample.batch-size, --sample.num-batches, --train.batch-size, "
                          "--train.inner-epochs and --train.timesteps-per-forward must be >= 1.")
    N = cfg.sample.batch_size * cfg.sample.num_batches
    micro_per_epoch, rem = divmod(N, cfg.train.batch_size)
    grad_accum, rem2 = divmod(micro_per_epoch, max(1, cfg.train.updates_per_epoch))
    if rem or rem2 or grad_accum % world or cfg.sample.num_batches % world or cfg.train.updates_per_epoch < 1:
        raise ConfigError(
            f"batch arithmetic: samples per epoch (--sample.batch-size {cfg.sample.batch_size} x "
            f"--sample.num-batches {cfg.sample.num_batches} = {N}) must split into --train.batch-size "
            f"{cfg.train.batch_size} x gradient accumulation x --train.updates-per-epoch "
            f"{cfg.train.updates_per_epoch}, with the sampling batches and the accumulation steps divisible "
            f"by the {world} process(es).")
    return trainable, grad_accum


def train(cfg: Config, guard: scaffold.LastGoodState, load_models=diffusion.load_models):
    # ---- checks and set-up: nothing is written until all of it has succeeded (scaffold.Run)
    scaffold.check_shared(cfg)
    explore.validate(cfg.explore, cfg.sample.guidance_scale)
    rank, world, device = common.init_distributed(cfg.device)
    common.set_threads(cfg.threads)
    trainable, grad_accum = check(cfg, world)
    T, N = cfg.sample.num_steps, cfg.sample.batch_size * cfg.sample.num_batches
    train_steps = max(1, int(len(trainable) * cfg.train.timestep_fraction))
    dtype = common.resolve_dtype(cfg.dtype, device)
    run_dir = common.all_gather(scaffold.resolve_run_dir(cfg.run_dir, cfg.resume, cfg.name),
                                world)[0]  # rank 0's
    # --resume auto: the newest checkpoint in run_dir, if any
    resume = scaffold.resume_from(cfg.resume, run_dir)
    scaffold.check_run_dir(run_dir, resume)

    models = load_models(cfg.model, device=device, dtype=dtype, seed=cfg.seed)
    precision = common.Precision(device, dtype)
    params = lora.inject(models.unet, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, seed=cfg.seed)
    unet = models.unet  # the uncompiled module: LoRA is saved and loaded through it
    if cfg.compile:
        models = dataclasses.replace(models, unet=torch.compile(unet))  # shares unet's parameters
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.adam_betas,
                                  weight_decay=cfg.train.weight_decay, eps=cfg.train.adam_eps)
    reward_fn = rewards.make_reward(cfg.reward.name, device=device, dtype=dtype, tiny=cfg.reward.tiny,
                                    weights=cfg.reward.weights)
    prompt_set = diffusion.load_prompts(cfg.prompts)
    encode = diffusion.PromptEncoder(models)
    uncond = diffusion.encode_text(models, [""])  # (1, 77, D) (SDXL: (1, 78, D)); never weighted
    embedder = (rewards.clip_image_embedder(device, dtype, cfg.eval.clip_tiny, cfg.eval.clip_weights)
                if cfg.eval.diversity else None)
    eval_rewards = evaluate.load_eval_rewards(cfg.eval, device, dtype, cfg.reward.tiny)  # --eval.rewards
    heldout = diffusion.load_prompts(cfg.eval.prompts) if cfg.eval.every > 0 and cfg.eval.prompts else None
    ts = diffusion.timesteps(models, T)  # (T,) on the host
    stat_tracker = PerPromptStatTracker(cfg.train.buffer_size, cfg.train.min_count)
    start_epoch, reward_queries = 0, 0
    if resume:
        state = scaffold.load_checkpoint(resume, unet)
        optimizer.load_state_dict(state["optimizer"])
        stat_tracker.load_state_dict(state["stat_tracker"])
        precision.load_state_dict(state.get("precision"))
        start_epoch, reward_queries = state["epoch"], state["reward_queries"]
        print0(f"resumed from {state['path']} at epoch {start_epoch}")
    if scaffold.nothing_left(cfg, start_epoch, run_dir):  # --resume auto of a finished run
        return run_dir

    def policy_scores():  # fixed seeds, plain prompts, w_high: the training prompts and the held-out ones
        return evaluate.policy_scores(models, cfg.eval, prompt_set, heldout, reward_fn, T, cfg.sample.eta,
                                      cfg.sample.guidance_scale, cfg.seed, embedder, eval_rewards)

    def training_state(epochs_done: int) -> dict:
        return {"epoch": epochs_done, "reward_queries": reward_queries, "optimizer": optimizer.state_dict(),
                "stat_tracker": stat_tracker.state_dict(), "precision": precision.state_dict()}
    run = scaffold.Run(cfg, run_dir, rank, world, start_epoch, reward_queries, unet, params, guard,
                       training_state, policy_scores)
    bars = scaffold.show_progress(cfg.log, rank)
    print0(f"batch arithmetic: {N} samples per epoch = {cfg.sample.num_batches} batches x "
           f"{cfg.sample.batch_size} over {world} process(es); training: micro-batches of "
           f"{cfg.train.batch_size} samples x {train_steps} timesteps, {grad_accum} micro-batches per "
           f"optimizer step -> {cfg.train.updates_per_epoch} optimizer steps per inner epoch, "
           f"{cfg.train.inner_epochs} inner epoch(s)")
    assert N == cfg.train.batch_size * grad_accum * cfg.train.updates_per_epoch
    my_batches = list(range(rank, cfg.sample.num_batches, world))  # global sampling batches of this process
    n_local = len(my_batches) * cfg.sample.batch_size

    for epoch in range(start_epoch, cfg.num_epochs):
        progress = epoch / cfg.num_epochs
        exploring = any(explore.active(cfg.explore, progress))

        # ---- sampling, with exploration
        models.unet.eval()
        t0 = time.perf_counter()
        batches = sample_epoch(cfg, models, encode, uncond, prompt_set, ts, epoch, my_batches, precision,
                               bars)
        t_sample = time.perf_counter() - t0

        # ---- rewards; advantages from the rewards of ALL processes (per-prompt statistics need them)
        t0 = time.perf_counter()
        local_prompts = [b["prompts"] for b in batches]
        with torch.no_grad():
            unscored = os.path.join(run_dir, f"unscored_epoch_{epoch:04d}_rank{rank}.pt")
            local_reward = torch.cat(scaffold.score(reward_fn, [b["images"] for b in batches], local_prompts,
                                                    cfg.reward.name, unscored)).float().cpu()  # (n_local,)
            # (n_local, D): the diversity metric
            local_embeddings = (torch.cat([evaluate.embed_images(b["images"], embedder).cpu()
                                           for b in batches])
                                if embedder else torch.zeros(n_local, 0))
        t_reward = time.perf_counter() - t0
        local_prompts = sum(local_prompts, [])
        gathered = common.all_gather((local_prompts, local_reward, local_embeddings), world)
        prompts = [p for g in gathered for p in g[0]]
        reward = torch.cat([g[1] for g in gathered])  # (N,), rank-major order
        reward_queries += len(reward)
        if not torch.isfinite(reward).all():
            raise FloatingPointError(f"epoch {epoch}: non-finite reward from --reward.name "
                                     f"{cfg.reward.name}.")
        advantages = (stat_tracker.update(prompts, reward) if cfg.train.per_prompt_stats
                      else global_advantages(reward))
        advantages = advantages.clamp(-cfg.train.adv_clip_max, cfg.train.adv_clip_max)
        advantages = advantages[rank * n_local:(rank + 1) * n_local].to(device)  # this process's samples
        data = {k: torch.cat([b[k] for b in batches]) for k in ("latents", "log_probs", "guidance", "cond")}
        # process 0's first samples
        grid_images = torch.cat([b["images"] for b in batches])[:cfg.log.grid_size]
        grid_labels = plots.grid_labels(local_prompts[:cfg.log.grid_size], local_reward[:cfg.log.grid_size])
        del batches

        # ---- training: PPO-clip updates over shuffled samples and shuffled timesteps
        models.unet.train()
        t0 = time.perf_counter()
        stats = {"loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
        first_ratio_err = 0.0  # max |ratio - 1| before the epoch's first optimizer step: 0 if on-policy
        for inner in range(cfg.train.inner_epochs):
            ratio_err = ppo_epoch(cfg, models, uncond, ts.to(device), data, advantages, trainable,
                                  train_steps, grad_accum // world, precision, optimizer, params, world,
                                  stats, common.generator(cfg.seed, epoch, inner, "train", rank),
                                  f"epoch {epoch}", bars)
            first_ratio_err = ratio_err if inner == 0 else first_ratio_err
        t_train = time.perf_counter() - t0
        common.assert_in_sync(params, world, f"epoch {epoch}")

        # ---- the epoch's record: log, grid, checkpoint (scaffold.Run, process 0)
        # a NaN norm: a float16 step the loss scaler skipped
        skipped = sum(g != g for g in stats["grad_norm"])
        stats["grad_norm"] = [g for g in stats["grad_norm"] if g == g] or [float("nan")]
        stats = {k: sum(v) / len(v) for k, v in stats.items()}
        if world > 1:  # average the training statistics over processes; the worst ratio error
            stats = {k: sum(s[k] for s in common.all_gather(stats, world)) / world for k in stats}
            first_ratio_err = max(common.all_gather(first_ratio_err, world))
        record = {"epoch": epoch, "reward_queries": reward_queries, **common.summarize(reward), **stats,
                  "first_ratio_err": first_ratio_err, "skipped_steps": skipped, "exploring": exploring,
                  "signal_share": signal_share(prompts, reward),
                  "s_sample": t_sample, "s_reward": t_reward, "s_train": t_train,
                  "samples_per_s": N / t_sample,
                  "transitions_per_s": N * train_steps * cfg.train.inner_epochs / t_train}
        if embedder and rank == 0:
            record["diversity"] = evaluate.mean_diversity(torch.cat([g[2] for g in gathered]), prompts)
        details = (f"kl {common.fmt(record['approx_kl'])} | clipfrac {record['clipfrac']:.3f} | "
                   f"loss {common.fmt(record['loss'])}")
        run.end_epoch(epoch, record, details, t_sample + t_reward + t_train, grid_images, grid_labels)
    run.close()
    return run_dir


def sample_epoch(cfg: Config, models, encode, uncond, prompt_set, ts, epoch: int, my_batches: list[int],
                 precision, bars: bool) -> list[dict]:
    """This process's trajectories of the epoch, sampled with exploration: per sampling batch, its latents
    (B, T+1, ...), log-probs (B, T), guidance scales (B, T), exact (possibly re-weighted) prompt embeddings,
    images and prompts, so that training re-scores exactly the policy that sampled. Batch b draws from
    generators keyed by (seed, epoch, b): the same samples on any number of processes."""
    progress, out = epoch / cfg.num_epochs, []
    for b in tqdm(my_batches, desc=f"epoch {epoch} sampling", leave=False, disable=not bars):
        idx = torch.randint(len(prompt_set), (cfg.sample.batch_size,),
                            generator=common.generator(cfg.seed, epoch, b, "prompts"))
        batch_prompts = [prompt_set[i] for i in idx]
        cond, positions = encode(batch_prompts)
        cond, guidance = explore.explore_batch(cfg.explore, cond, positions, ts, cfg.sample.guidance_scale,
                                               progress, common.generator(cfg.seed, epoch, b, "explore"),
                                               diffusion.PROMPT_LENGTH)
        with torch.no_grad(), precision.autocast():
            traj = diffusion.sample(models, cond, uncond, guidance, len(ts), cfg.sample.eta,
                                    common.generator(cfg.seed, epoch, b, "noise"))
        out.append(dict(latents=traj.latents, log_probs=traj.log_probs, guidance=guidance, cond=cond,
                        images=traj.images, prompts=[p.text for p in batch_prompts]))
    return out


def flat_pairs(samples: torch.Tensor, order: torch.Tensor, steps: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sample, step) pairs of one forward: each sample at its shuffled steps order[sample, steps],
    flattened. samples (b,), order (n, S) -> sample indices (b*c,), step indices (b*c,)."""
    chosen = order[samples, steps]  # (b, c)
    return samples[:, None].expand_as(chosen).reshape(-1), chosen.reshape(-1)


def ppo_epoch(cfg: Config, models, uncond, timesteps, data: dict, advantages, trainable, train_steps: int,
              accum: int, precision, optimizer, params, world: int, stats: dict, generator, where: str,
              bars: bool) -> float:
    """One pass over this process's samples: micro-batches of shuffled samples, each re-scored at train_steps
    of its trainable steps (shuffled per sample), timesteps_per_forward of them folded into one UNet call (the
    same gradient for N x the activations); an optimizer step every `accum` micro-batches. Appends the
    statistics to `stats`. -> max |ratio - 1| before the first optimizer step (0 when on-policy, as the first
    pass must be)."""
    n, per_forward = len(advantages), cfg.train.timesteps_per_forward
    # drawn on the CPU (reproducible) and kept there too: the guidance scales are indexed on the host, so
    # guided_eps decides which UNet branches a forward needs without reading from the device
    perm = torch.randperm(n, generator=generator)  # (n,)
    order = torch.stack([trainable[torch.randperm(len(trainable), generator=generator)]
                         for _ in range(n)])  # (n, S)
    device = advantages.device
    perm_dev, order_dev = perm.to(device), order.to(device)  # copied to the device once, not per forward
    micro = list(zip(perm.split(cfg.train.batch_size), perm_dev.split(cfg.train.batch_size)))
    ratio_err = 0.0
    for m, (samples, samples_dev) in enumerate(tqdm(micro, desc=f"{where} training", leave=False,
                                                    disable=not bars)):
        pending = []  # per forward: loss, approx_kl, clipfrac, max |ratio - 1|, kept on the device
        for j in range(0, train_steps, per_forward):
            steps = slice(j, min(j + per_forward, train_steps))
            # (b*c,) on the device: index the trajectories
            rows, i = flat_pairs(samples_dev, order_dev, steps)
            w = data["guidance"][flat_pairs(samples, order, steps)]  # (b*c,) on the host
            with precision.autocast():
                log_prob = diffusion.step_log_prob(models, data["latents"][rows, i], timesteps[i],
                                                   data["latents"][rows, i + 1], data["cond"][rows], uncond,
                                                   w, cfg.sample.eta, cfg.sample.num_steps)
            loss, ratio, approx_kl, clipfrac = ppo_loss(log_prob, data["log_probs"][rows, i],
                                                        advantages[rows], cfg.train.clip_range)
            # a mean over b*c transitions, weighted so that an optimizer step averages all of its transitions
            precision.backward(loss * (steps.stop - steps.start) / (accum * train_steps))
            pending.append(torch.stack([loss.detach(), approx_kl.detach(), clipfrac,
                                        (ratio.detach() - 1).abs().max()]).float())
        read = common.read_stats(pending, ("loss", "approx_kl", "clipfrac"), stats,
                                 f"{where}, micro-batch {m}")  # (forwards, 4)
        if m < accum:
            ratio_err = max(ratio_err, read[:, 3].max().item())
        if (m + 1) % accum == 0:
            stats["grad_norm"].append(precision.step(optimizer, params, cfg.train.max_grad_norm, world,
                                                     f"{where}, micro-batch {m}"))
    return ratio_err


def cli(args=None) -> Config:
    return tyro.extras.overridable_config_cli(PRESETS, args=args, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    scaffold.run_cli(main, cli)
