"""
DDPO with DiffExp: reward fine-tuning of a text-to-image diffusion model by policy gradient with PPO
clipping over DDIM-with-eta sampling trajectories (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning"), with DiffExp's exploration (Chae et al., AAAI 2025) on the sampling side.

    python train_ddpo.py tiny                          # offline tiny model, JPEG compressibility, ~1 min on CPU
    python train_ddpo.py tiny --no-diffexp             # the same without exploration (the baseline)
    python train_ddpo.py sd15-aesthetic                # SD v1.5, 45 animals, LAION aesthetic, one GPU
    python train_ddpo.py sd15-pickscore --explore.t-thres 700
    python train_ddpo.py tiny --resume runs/ddpo-tiny-20260101-120000   # continue a run
    python train_ddpo.py --help                        # presets; `python train_ddpo.py tiny --help`: all flags

Kept from the DDPO reference: DDIM log-probs reduced by the mean over latent dimensions, per-prompt
reward statistics with a buffer across epochs, shuffled timesteps, PPO clipping with clip_range 1e-4,
gradient accumulation over samples x timesteps. Added: each sample stores the guidance scale of every
step and its exact (possibly re-weighted) prompt embedding, so the training pass re-scores exactly
the policy that sampled (the ratio is 1 before the first update of each epoch; it is logged).
"""

import dataclasses
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro
from tqdm import tqdm

import common
import diffusion
import explore
import lora
import rewards
from common import LogConfig, LoRAConfig, print0
from explore import ExploreConfig
from rewards import RewardConfig

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
    timesteps_per_forward: int = 1  # timesteps folded into one UNet batch (same gradient; faster on small models)
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
    model: str = "sd15"  # tiny | sd15 | sd15-random | a local diffusers folder | a hub id
    prompts: str = "animals"  # animals | animal-activities | unseen-animals | drawbench[:Category,...] | file.txt
    num_epochs: int = 200  # planned epochs (exploration runs for the first explore_until of them)
    seed: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: Literal["float32", "bfloat16"] = "float32"  # frozen weights' dtype; LoRA weights stay float32
    run_dir: str = ""  # default: runs/{name}-{date}
    resume: str = ""  # a run folder (its newest checkpoint) or a checkpoint folder
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()
    explore: ExploreConfig = ExploreConfig(w_low=1.0)
    reward: RewardConfig = RewardConfig(name="aesthetic")
    lora: LoRAConfig = LoRAConfig()
    log: LogConfig = LogConfig()


BASE = Config()
PRESETS = {
    "tiny": ("Offline tiny random model, JPEG compressibility, a few epochs on a CPU.", dataclasses.replace(
        BASE, name="ddpo-tiny", model="tiny", num_epochs=12,
        sample=SampleConfig(num_steps=10, batch_size=8, num_batches=2),
        train=TrainConfig(batch_size=4, updates_per_epoch=2, timesteps_per_forward=10, lr=3e-3, clip_range=1e-2, min_count=4),
        explore=ExploreConfig(t_thres=700),
        reward=RewardConfig(name="jpeg-compressibility"),
        log=LogConfig(grid_every=4, save_every=4))),
    "sd15-aesthetic": ("SD v1.5, 45 animals, LAION aesthetic; the DDPO reference hyperparameters.", dataclasses.replace(
        BASE, name="ddpo-sd15-aesthetic")),
    "sd15-pickscore": ("SD v1.5, 135 animal-activity prompts, PickScore.", dataclasses.replace(
        BASE, name="ddpo-sd15-pickscore", prompts="animal-activities", reward=RewardConfig(name="pickscore"))),
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


def main(cfg: Config):
    # ---- checks and set-up
    explore.validate(cfg.explore, cfg.sample.guidance_scale)
    if cfg.sample.eta <= 0:
        raise ValueError(f"--sample.eta {cfg.sample.eta}: DDPO needs eta > 0 (a deterministic DDIM step has no log-prob).")
    if not 0 < cfg.train.timestep_fraction <= 1:
        raise ValueError(f"--train.timestep-fraction {cfg.train.timestep_fraction}: must lie in (0, 1].")
    samples_per_epoch = cfg.sample.batch_size * cfg.sample.num_batches
    micro_per_epoch, rem = divmod(samples_per_epoch, cfg.train.batch_size)
    grad_accum, rem2 = divmod(micro_per_epoch, cfg.train.updates_per_epoch) if cfg.train.updates_per_epoch > 0 else (0, 1)
    if rem or rem2 or grad_accum < 1:
        raise ValueError(
            f"batch arithmetic: samples per epoch (--sample.batch-size {cfg.sample.batch_size} x --sample.num-batches "
            f"{cfg.sample.num_batches} = {samples_per_epoch}) must split into --train.batch-size {cfg.train.batch_size} "
            f"x gradient accumulation x --train.updates-per-epoch {cfg.train.updates_per_epoch}.")
    device, dtype = common.resolve_device(cfg.device), getattr(torch, cfg.dtype)
    run_dir = common.start_run(cfg)

    models = diffusion.load_models(cfg.model, device=device, dtype=dtype, seed=cfg.seed)
    params = lora.inject(models.unet, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, seed=cfg.seed)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.adam_betas,
                                  weight_decay=cfg.train.weight_decay, eps=cfg.train.adam_eps)
    reward_fn = rewards.make_reward(cfg.reward.name, device=device, dtype=dtype, tiny=cfg.reward.tiny, weights=cfg.reward.weights)
    prompt_set = diffusion.load_prompts(cfg.prompts)
    encode = diffusion.PromptEncoder(models)
    uncond = diffusion.encode_text(models, [""])  # (1, 77, D); never weighted
    gens = common.make_generators(cfg.seed, ("noise", "prompts", "explore", "train"))
    stat_tracker = PerPromptStatTracker(cfg.train.buffer_size, cfg.train.min_count)
    T = cfg.sample.num_steps
    train_steps = max(1, int(T * cfg.train.timestep_fraction))
    start_epoch, reward_queries = 0, 0
    if cfg.resume:
        resume_state = common.load_checkpoint(cfg.resume, models.unet)
        optimizer.load_state_dict(resume_state["optimizer"])
        stat_tracker.load_state_dict(resume_state["stat_tracker"])
        common.set_rng_state(gens, resume_state["rng"])
        start_epoch, reward_queries = resume_state["epoch"], resume_state["reward_queries"]
        print0(f"resumed from {resume_state['path']} at epoch {start_epoch}")
    metrics = common.Metrics(run_dir, start=start_epoch)

    print0(f"batch arithmetic: {samples_per_epoch} samples per epoch = {cfg.sample.num_batches} batches x "
           f"{cfg.sample.batch_size}; training: micro-batches of {cfg.train.batch_size} x {train_steps} timesteps, "
           f"{grad_accum} micro-batches per optimizer step -> {cfg.train.updates_per_epoch} optimizer steps per "
           f"inner epoch, {cfg.train.inner_epochs} inner epoch(s)")
    assert samples_per_epoch == cfg.train.batch_size * grad_accum * cfg.train.updates_per_epoch

    for epoch in range(start_epoch, cfg.num_epochs):
        progress = epoch / cfg.num_epochs
        exploring = any(explore.active(cfg.explore, progress))

        # ---- sampling: trajectories with exploration, stored with their guidance and embeddings
        models.unet.eval()
        t0 = time.perf_counter()
        batches = []
        for _ in tqdm(range(cfg.sample.num_batches), desc=f"epoch {epoch} sampling", leave=False, disable=int(os.environ.get("RANK", 0)) != 0):
            idx = torch.randint(len(prompt_set), (cfg.sample.batch_size,), generator=gens["prompts"])
            batch_prompts = [prompt_set[i] for i in idx]
            cond, positions = encode(batch_prompts)
            ts = diffusion.timesteps(models, T)
            cond, guidance, _ = explore.explore_batch(cfg.explore, cond, positions, ts, cfg.sample.guidance_scale, progress, gens["explore"])
            with torch.no_grad():
                traj = diffusion.sample(models, cond, uncond, guidance, T, cfg.sample.eta, gens["noise"])
            batches.append(dict(latents=traj.latents, log_probs=traj.log_probs, guidance=guidance.to(device), cond=cond,
                                images=traj.images, prompts=[p.text for p in batch_prompts]))
        t_sample = time.perf_counter() - t0

        # ---- rewards and advantages
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                b["rewards"] = reward_fn(b["images"], b["prompts"]).float().cpu()
        t_reward = time.perf_counter() - t0
        prompts = [p for b in batches for p in b["prompts"]]
        reward = torch.cat([b["rewards"] for b in batches])  # (N,)
        reward_queries += len(reward)
        if not torch.isfinite(reward).all():
            raise FloatingPointError(f"epoch {epoch}: non-finite reward from --reward.name {cfg.reward.name}.")
        advantages = stat_tracker.update(prompts, reward) if cfg.train.per_prompt_stats else global_advantages(reward)
        advantages = advantages.clamp(-cfg.train.adv_clip_max, cfg.train.adv_clip_max).to(device)
        data = {k: torch.cat([b[k] for b in batches]) for k in ("latents", "log_probs", "guidance", "cond")}
        timesteps = diffusion.timesteps(models, T).to(device)
        grid_images = batches[0]["images"]
        if len(batches) > 1:
            grid_images = torch.cat([b["images"] for b in batches])[: cfg.log.grid_size]
        del batches

        # ---- training: PPO-clip updates over shuffled samples and shuffled timesteps
        models.unet.train()
        t0 = time.perf_counter()
        stats = {"loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
        first_ratio_err = 0.0  # max |ratio - 1| before the epoch's first optimizer step: 0 if on-policy
        for inner in range(cfg.train.inner_epochs):
            perm = torch.randperm(samples_per_epoch, generator=gens["train"])
            step_order = torch.stack([torch.randperm(T, generator=gens["train"]) for _ in range(samples_per_epoch)])
            micro_batches = perm.split(cfg.train.batch_size)
            for m, idx in enumerate(tqdm(micro_batches, desc=f"epoch {epoch} training", leave=False, disable=int(os.environ.get("RANK", 0)) != 0)):
                for j in range(0, train_steps, cfg.train.timesteps_per_forward):
                    # (sample, step) pairs of this forward: each sample at its next shuffled steps, folded into the batch
                    i = step_order[idx, j: min(j + cfg.train.timesteps_per_forward, train_steps)]  # (b, c)
                    rows, i = idx[:, None].expand_as(i).reshape(-1).to(device), i.reshape(-1).to(device)  # (b*c,)
                    log_prob = diffusion.step_log_prob(
                        models, data["latents"][rows, i], timesteps[i], data["latents"][rows, i + 1],
                        data["cond"][rows], uncond, data["guidance"][rows, i], cfg.sample.eta, T)
                    loss, ratio, approx_kl, clipfrac = ppo_loss(log_prob, data["log_probs"][rows, i], advantages[rows], cfg.train.clip_range)
                    # the loss is a mean over b*c transitions; weigh it so the step averages all b*steps*accum
                    (loss * (len(i) // len(idx)) / (grad_accum * train_steps)).backward()
                    if inner == 0 and m < grad_accum:
                        first_ratio_err = max(first_ratio_err, (ratio.detach() - 1).abs().max().item())
                    stats["loss"].append(loss.item())
                    stats["approx_kl"].append(approx_kl.item())
                    stats["clipfrac"].append(clipfrac.item())
                if (m + 1) % grad_accum == 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                    if not torch.isfinite(grad_norm):
                        raise FloatingPointError(f"epoch {epoch}, micro-batch {m}: non-finite gradient norm.")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats["grad_norm"].append(grad_norm.item())
        t_train = time.perf_counter() - t0

        # ---- logging, pictures, checkpoint
        record = {"epoch": epoch, "reward_queries": reward_queries, **common.summarize(reward),
                  **{k: sum(v) / len(v) for k, v in stats.items()}, "first_ratio_err": first_ratio_err,
                  "exploring": exploring, "s_sample": t_sample, "s_reward": t_reward, "s_train": t_train,
                  "samples_per_s": samples_per_epoch / t_sample,
                  "transitions_per_s": samples_per_epoch * train_steps * cfg.train.inner_epochs / t_train}
        metrics.log(record)
        print0(f"epoch {epoch} | reward {record['reward_mean']:.4g}±{record['reward_std']:.3g} | "
               f"kl {common.fmt(record['approx_kl'])} | clipfrac {record['clipfrac']:.3f} | loss {common.fmt(record['loss'])} | "
               f"{'explore' if exploring else 'plain'} | {t_sample + t_reward + t_train:.1f} s")
        last = epoch == cfg.num_epochs - 1
        common.plot_rewards(metrics.records, os.path.join(run_dir, "rewards.png"), title=f"{cfg.name}: {cfg.reward.name}")
        if common.every(cfg.log.grid_every, epoch + 1, last):
            common.save_grid(grid_images, os.path.join(run_dir, "samples", f"epoch_{epoch:04d}.png"))
        if common.every(cfg.log.save_every, epoch + 1, last):
            state = {"epoch": epoch + 1, "reward_queries": reward_queries, "optimizer": optimizer.state_dict(),
                     "stat_tracker": stat_tracker.state_dict(), "rng": common.rng_state(gens)}
            common.save_checkpoint(run_dir, epoch + 1, models.unet, state, {"config": cfg, "epoch": epoch + 1, **record})
            common.prune_checkpoints(run_dir, cfg.log.keep_checkpoints)
    return run_dir


def cli(args=None) -> Config:
    return tyro.extras.overridable_config_cli(PRESETS, args=args, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main(cli())
