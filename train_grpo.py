"""
GRPO with DiffExp: group-relative policy optimisation over sampling trajectories that have a likelihood, on
flow-matching models (SD3 / SD3.5: Flow-GRPO's SDE, Liu et al. 2025, "Flow-GRPO: Training Flow Matching
Models via Online RL") and on DDIM models (SD v1.5, SDXL, the toy model: DDIM with eta, DDPO's sampler),
with DiffExp's exploration (Chae et al., AAAI 2025) on the sampling side.

    python train_grpo.py tiny-sd3                      # offline tiny SD3, seconds per epoch on a CPU
    python train_grpo.py tiny                          # offline tiny SD v1.5-style model (DDIM)
    python train_grpo.py tiny-sd3 --no-diffexp         # the same without exploration (the baseline)
    python train_grpo.py sd35m-pickscore               # SD3.5 Medium, Flow-GRPO's PickScore recipe
    python train_grpo.py --help                        # presets; `train_grpo.py tiny-sd3 --help`: all flags

Per sampling batch, `prompts_per_batch` prompts, each drawn `group_size` times (by default from the same
initial noise); each image's advantage is its reward normalised within its group. Only the steps inside a
window are trained (flow models: the SDE runs there, the ODE elsewhere): PPO's clipped ratio of the
per-step Gaussian log-probs, plus beta x the per-step KL to the model before fine-tuning (the same weights
with LoRA switched off, `lora.disabled`). Each sample keeps its guidance scales and exact (possibly
re-weighted) prompt embedding, so the first ratio of an epoch is 1 (logged as first_ratio_err). The two
model families differ only inside FlowFamily and DDIMFamily (encode, roll out, re-score a step, evaluate).
DiffExp enters as in the other trainers: `explore.explore_batch`, with a flow model's steps placed on SD
v1.5's timestep scale by noise level (`flow.sd_timesteps`), so --explore.t-thres means the same for both.
"""

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

import common
import diffusion
import evaluate
import explore
import flow
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
    num_steps: int = 10  # flow steps T per rollout
    guidance_scale: float = 4.5  # w_high: classifier-free guidance scale (the only one when not exploring)
    noise_level: float = 0.7  # flow models: the SDE's a (Flow-GRPO); must be > 0: the ODE has no log-prob
    eta: float = 1.0  # DDIM models (SD v1.5, SDXL, toy): the sampler's eta, > 0
    # the SDE (and training) at steps start <= i < end; the ODE elsewhere
    sde_window: tuple[int, int] = (0, 10)
    group_size: int = 8  # images per prompt per batch: the group an advantage is normalised in
    prompts_per_batch: int = 2  # sampling batch = prompts_per_batch x group_size
    num_batches: int = 4  # sampling batches per epoch
    same_noise: bool = True  # one initial noise per group (the images of a group differ by the SDE's noise)
    eval_num_steps: int = 10  # ODE steps of the plain policy's evaluation
    resolution: int = 0  # image side in pixels (0: the model's native size)
    max_sequence_length: int = 0  # T5's padded prompt length (0: the model's default)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 4  # rollouts per training micro-batch (each re-scored at every step of the window)
    updates_per_epoch: int = 1  # optimizer steps per epoch; gradient accumulation is derived from it
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4  # PPO: ratio clipped to [1 - clip_range, 1 + clip_range]
    adv_clip_max: float = 5.0
    beta: float = 0.04  # weight of the per-step KL to the model before fine-tuning (0: no KL term)
    std_over: Literal["group", "batch"] = "group"  # advantages divided by the group's std or the batch's


@dataclass(frozen=True)
class Config:
    name: str = "grpo"
    model: str = "sd35m"  # tiny-sd3 | sd35m | sd35m-random (random weights) | an SD3 folder | a hub id
    # animals | animal-activities | unseen-animals | drawbench[:Category,...] | file.txt
    prompts: str = "animals"
    num_epochs: int = 100
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = 0
    run_dir: str = ""
    resume: str = ""
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()
    explore: ExploreConfig = ExploreConfig()
    reward: RewardConfig = RewardConfig(name="pickscore")
    lora: LoRAConfig = LoRAConfig(rank=32, alpha=64.0, targets=flow.LORA_TARGETS)
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()


BASE = Config()
PRESETS = {
    "tiny-sd3": (
        "Offline tiny random SD3, the model-free brightness reward, a few epochs on a CPU.",
        Config(name="grpo-tiny-sd3", model="tiny-sd3", num_epochs=8,
               sample=SampleConfig(num_steps=4, sde_window=(0, 2), group_size=4, prompts_per_batch=2,
                                   num_batches=2, eval_num_steps=4),
               train=TrainConfig(batch_size=4, updates_per_epoch=2, lr=3e-2, clip_range=0.2, beta=0.01),
               reward=RewardConfig(name="brightness"),
               lora=LoRAConfig(rank=4, alpha=4.0, targets=flow.LORA_TARGETS),
               log=LogConfig(grid_every=4, save_every=4),
               eval=EvalConfig(every=4, samples_per_prompt=1, diversity=False, prompts="")),
    ),
}
TINY_SD3 = PRESETS["tiny-sd3"][1]
PRESETS["tiny"] = (
    "Offline tiny random SD v1.5-style model (DDIM, eta 1), the brightness reward, a CPU smoke run.",
    dataclasses.replace(TINY_SD3, name="grpo-tiny", model="tiny", lora=LoRAConfig(rank=4, alpha=4.0),
                        sample=dataclasses.replace(TINY_SD3.sample, guidance_scale=5.0, eta=1.0)))
TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy")
TOY_T_THRES = 570  # the paper's t_thres 800 mapped to the toy model's schedule by noise level (tested)
# The toy world (docs/toy-world.md) with DDPO's toy sampler (10 DDIM steps, eta 1, CFG 5) and its trained
# half of each trajectory, groups of 8 images per prompt, 128 rollouts and one optimizer step per epoch.
PRESETS["toy"] = (
    "The toy world's aesthetic task (the shipped pixel-space model, offline, CPU), GRPO on DDIM with eta 1.",
    Config(name="grpo-toy", model=TOY_MODEL, prompts=os.path.join(diffusion.PROMPTS_DIR, "toy_train.txt"),
           num_epochs=8, sample=SampleConfig(num_steps=10, guidance_scale=5.0, eta=1.0, sde_window=(0, 5),
                                             group_size=8, prompts_per_batch=2, num_batches=8),
           train=TrainConfig(batch_size=16, updates_per_epoch=1, lr=5e-3, clip_range=0.2, beta=0.01),
           explore=ExploreConfig(t_thres=TOY_T_THRES), reward=RewardConfig(name="toy-aesthetic"),
           lora=LoRAConfig(alpha=16.0), log=LogConfig(grid_every=1, save_every=1),
           eval=EvalConfig(every=1, samples_per_prompt=2, diversity=False,
                           prompts=os.path.join(diffusion.PROMPTS_DIR, "toy_heldout.txt"))))
# SD3.5 Medium with Flow-GRPO's PickScore recipe (github.com/yifan123/flow_grpo: config/grpo.py
# pickscore_sd3 and config/base.py; LoRA in scripts/train_sd3.py): 512 px, 10 rollout steps (the SDE at all
# of them) and 40 ODE steps to evaluate, guidance 4.5, noise level 0.7, groups of 24 images with different
# initial noise, advantages over the batch's std, lr 3e-4, clip range 1e-4, advantages clipped to 5, KL
# weight 0.01, two optimizer steps per epoch, LoRA rank 32 / alpha 64 on the joint attention, T5 prompts
# padded to 128. Flow-GRPO spreads 48 prompts x 24 images per epoch over 32 GPUs; one GPU here samples 4
# groups (96 rollouts) per epoch and 8 GPUs 16 groups (384), the rest unchanged. Prompts: our 135
# animal-activity prompts (Flow-GRPO trains on its own PickScore set).
SD35M = Config(
    model="sd35m", prompts="animal-activities", num_epochs=300, dtype="auto",
    sample=SampleConfig(num_steps=10, guidance_scale=4.5, noise_level=0.7, sde_window=(0, 10),
                        group_size=24, prompts_per_batch=1, num_batches=4, same_noise=False,
                        eval_num_steps=40, resolution=512, max_sequence_length=128),
    train=TrainConfig(batch_size=8, updates_per_epoch=2, lr=3e-4, clip_range=1e-4, adv_clip_max=5.0,
                      beta=0.01, std_over="batch"),
    reward=RewardConfig(name="pickscore"), lora=LoRAConfig(rank=32, alpha=64.0, targets=flow.LORA_TARGETS),
    log=LogConfig(grid_every=10, save_every=10),
    eval=EvalConfig(every=20, samples_per_prompt=1, diversity=False))
PRESETS |= {
    "sd35m-pickscore": ("SD3.5 Medium, 135 animal-activity prompts, PickScore; "
                        "Flow-GRPO's recipe on one GPU.",
                        dataclasses.replace(SD35M, name="grpo-sd35m-pickscore")),
    "sd35m-pickscore-8gpu": ("SD3.5 Medium, PickScore, Flow-GRPO's recipe on one node of 8 GPUs "
                             "(torchrun).",
                             dataclasses.replace(SD35M, name="grpo-sd35m-pickscore-8gpu",
                                                 sample=dataclasses.replace(SD35M.sample, num_batches=16))),
    "sd35m-aesthetic": ("SD3.5 Medium, 45 animals, LAION aesthetic; the PickScore recipe otherwise.",
                        dataclasses.replace(SD35M, name="grpo-sd35m-aesthetic", prompts="animals",
                                            reward=RewardConfig(name="aesthetic"))),
}


# -----------------------------------------------------------------------------
# The math of GRPO, as small functions the tests call directly


def group_advantages(rewards: torch.Tensor, group_size: int, std_over: str = "group") -> torch.Tensor:
    """rewards (N,), consecutive groups of group_size -> (r - group mean) / (std + 1e-4), the std of the
    group or of the whole batch. A group of equal rewards gets advantage 0: it carries no signal."""
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    std = (r.std(1, unbiased=False, keepdim=True) if std_over == "group"
           else rewards.double().std(unbiased=False))
    return (centred / (std + 1e-4)).view(-1).float()


def ppo_kl_loss(log_prob, old_log_prob, advantages, kl, clip_range: float, beta: float):
    """Clipped surrogate plus beta x KL, to be minimised; all (B,). -> loss, ratio, clipfrac."""
    ratio = torch.exp(log_prob - old_log_prob)
    surrogate = torch.maximum(-advantages * ratio,
                              -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return (surrogate + beta * kl).mean(), ratio, ((ratio - 1).abs() > clip_range).float().mean()


# -----------------------------------------------------------------------------


def main(cfg: Config, load_models=None):
    """Trains with cfg. load_models: how the models are loaded (default: the family's loader)."""
    return scaffold.run_guarded(functools.partial(train, load_models=load_models), cfg)


def check(cfg: Config, world: int, is_flow: bool) -> int:
    """GRPO's own flags, after the shared ones. -> micro-batches per optimizer step over all processes."""
    s, t = cfg.sample, cfg.train
    if is_flow and s.noise_level <= 0:
        raise ConfigError(f"--sample.noise-level {s.noise_level}: GRPO needs the SDE (> 0); "
                          "the ODE has no log-prob.")
    if not is_flow and s.eta <= 0:
        raise ConfigError(f"--sample.eta {s.eta}: GRPO on a DDIM model needs eta > 0 (a deterministic step "
                          "has no log-prob).")
    if not 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps:
        raise ConfigError(f"--sample.sde-window {s.sde_window[0]} {s.sde_window[1]}: needs "
                          f"0 <= start < end <= --sample.num-steps {s.num_steps}.")
    if min(s.group_size, s.prompts_per_batch, s.num_batches, t.batch_size, t.updates_per_epoch,
           s.eval_num_steps) < 1:
        raise ConfigError("--sample.group-size, --sample.prompts-per-batch, --sample.num-batches, "
                          "--train.batch-size, --train.updates-per-epoch and --sample.eval-num-steps "
                          "must be >= 1.")
    if s.group_size < 2:
        raise ConfigError(f"--sample.group-size {s.group_size}: a group needs at least 2 images "
                          "to compare.")
    if t.beta < 0:
        raise ConfigError(f"--train.beta {t.beta}: the KL weight must be >= 0.")
    n = s.group_size * s.prompts_per_batch * s.num_batches
    micro, rem = divmod(n, t.batch_size)
    accum, rem2 = divmod(micro, t.updates_per_epoch)
    if rem or rem2 or accum % world or s.num_batches % world:
        raise ConfigError(f"batch arithmetic: {n} rollouts per epoch (group size x prompts per batch x "
                          f"batches) must split into --train.batch-size {t.batch_size} x accumulation x "
                          f"--train.updates-per-epoch {t.updates_per_epoch}, with batches and accumulation "
                          f"divisible by the {world} process(es).")
    return accum


# -----------------------------------------------------------------------------
# The two model families, and what GRPO asks of each: encode prompts, roll out, re-score one step (its
# log-prob, mean and std under the current weights), evaluate the plain policy


class FlowFamily:
    """SD3 / SD3.5 (flow.py): Flow-GRPO's SDE inside the window, the ODE elsewhere and in evaluation. A
    phrase's positions are its CLIP token positions and its T5 token positions after the 77 CLIP rows, so
    that random prompt weighting reaches all three encoders' states."""

    def __init__(self, cfg: Config, models: flow.FlowModels):
        s = cfg.sample
        self.cfg, self.cache = cfg, {}
        self.models = dataclasses.replace(models, resolution=s.resolution or models.resolution,
                                          t5_length=s.max_sequence_length or models.t5_length)
        self.module = self.models.transformer  # what LoRA trains
        self.ts, self.sigmas = flow.schedule(self.models, s.num_steps)
        self.explore_ts, self.tokens = flow.sd_timesteps(self.sigmas[:-1]), None  # t_thres by noise level
        self.uncond = flow.encode_text(self.models, [""])  # (states, pooled); never weighted

    def encode(self, prompts: list):
        """-> states (B, 77 + L, D), pooled (B, P), phrase positions; each distinct prompt encoded once."""
        for p in dict.fromkeys(q for q in prompts if q not in self.cache):
            states, pooled = flow.encode_text(self.models, [p.text])
            clip = diffusion.phrase_positions(self.models.tokenizers[0], p)
            t5 = diffusion.phrase_positions(self.models.tokenizers[2], p)
            self.cache[p] = (states[0], pooled[0],
                             [a + [flow.CLIP_LENGTH + i for i in b] for a, b in zip(clip, t5)])
        entries = [self.cache[p] for p in prompts]
        return (torch.stack([e[0] for e in entries]), torch.stack([e[1] for e in entries]),
                [e[2] for e in entries])

    def rollout(self, cond, pooled, guidance, generator, x_T, sde: bool = True):
        s = self.cfg.sample
        steps = s.num_steps if sde else s.eval_num_steps
        traj = flow.sample(self.models, cond, pooled, *self.uncond, guidance, steps, generator,
                           s.noise_level if sde else 0.0, s.sde_window, x_T=x_T)
        return traj.latents, traj.log_probs, traj.images

    def step(self, x, i: int, x_next, cond, pooled, w):
        """-> log_prob (B,), mean, and the std the KL is measured in: Flow-GRPO's, the SDE's coefficient
        a sqrt(sigma / (1 - sigma)) without the step's sqrt(-dt), i.e. the KL per unit of sigma, so that its
        --train.beta values carry over (the true step KL is this divided by -dt)."""
        sig, a = self.sigmas, self.cfg.sample.noise_level
        std = flow.sde_std(sig[i], sig[i + 1], sig[1].item(), a).to(x.device)
        v = flow.guided_velocity(self.module, x, self.ts[i], cond, pooled, *self.uncond, w)
        mean = flow.sde_mean(v, x, sig[i].item(), sig[i + 1].item(), std)
        _, log_prob = flow.flow_step(v, x, sig[i], sig[i + 1], std.expand(len(x)), x_next=x_next)
        return log_prob, mean, std / (sig[i] - sig[i + 1]).sqrt().to(x.device)

    @torch.no_grad()
    def evaluate(self, prompts, reward_fn, extra: dict, prefix: str) -> dict:
        """The plain policy: the ODE from fixed seeds (sample k of a prompt gets the same noise at every
        evaluation), plain prompts, w_high, --sample.eval-num-steps. -> {prefix}_reward_mean / _std / _sem,
        _samples, and {prefix}_NAME_mean per --eval.rewards."""
        cfg = self.cfg
        items = [(p, k) for p in prompts for k in range(cfg.eval.samples_per_prompt)]
        scores, others = [], {name: [] for name in extra}
        was_training = self.module.training
        self.module.eval()
        for start in range(0, len(items), cfg.eval.batch_size):
            chunk = items[start:start + cfg.eval.batch_size]
            cond, pooled, _ = self.encode([p for p, _ in chunk])
            x_T = torch.stack([torch.randn(self.models.latent_shape,
                                           generator=common.generator(cfg.seed, "eval", p.text, k))
                               for p, k in chunk])
            w = torch.full((len(chunk), cfg.sample.eval_num_steps), float(cfg.sample.guidance_scale))
            images = self.rollout(cond, pooled, w, torch.Generator(), x_T, sde=False)[2]
            texts = [p.text for p, _ in chunk]
            scores.append(reward_fn(images, texts).float().cpu())
            for name in others:
                others[name].append(extra[name](images, texts).float().cpu())
        self.module.train(was_training)
        st = evaluate.stats(torch.cat(scores))
        return ({f"{prefix}_reward_mean": st["mean"], f"{prefix}_reward_std": st["std"],
                 f"{prefix}_reward_sem": st["sem"], f"{prefix}_samples": st["n"]}
                | {f"{prefix}_{n}_mean": torch.cat(v).double().mean().item() for n, v in others.items()})


class DDIMFamily:
    """SD v1.5, SDXL and the toy model (diffusion.py): DDIM with eta, DDPO's sampler, for rollouts and for
    the evaluation (evaluate.heldout_score, as the other trainers); the window's steps are trained."""

    def __init__(self, cfg: Config, models: diffusion.Models):
        self.cfg, self.models, self.module = cfg, models, models.unet
        self.ts = diffusion.timesteps(models, cfg.sample.num_steps)  # (T,) on the host
        self.explore_ts, self.tokens = self.ts, diffusion.PROMPT_LENGTH
        self.uncond = diffusion.encode_text(models, [""])  # never weighted
        self.encoder = diffusion.PromptEncoder(models)

    def encode(self, prompts: list):
        cond, positions = self.encoder(prompts)
        return cond, torch.zeros(len(prompts), 0, device=cond.device), positions  # no pooled embedding

    def rollout(self, cond, pooled, guidance, generator, x_T):
        s = self.cfg.sample
        traj = diffusion.sample(self.models, cond, self.uncond, guidance, s.num_steps, s.eta, generator,
                                x_T=x_T)
        return traj.latents, traj.log_probs, traj.images

    def step(self, x, i: int, x_next, cond, pooled, w):
        s = self.cfg.sample
        return diffusion.step_log_prob(self.models, x, self.ts[i], x_next, cond, self.uncond, w, s.eta,
                                       s.num_steps, with_mean=True)

    def evaluate(self, prompts, reward_fn, extra: dict, prefix: str) -> dict:
        s, e = self.cfg.sample, self.cfg.eval
        return evaluate.heldout_score(self.models, prompts, reward_fn, e.samples_per_prompt,
                                      s.num_steps, s.eta, s.guidance_scale, self.cfg.seed, e.batch_size,
                                      None, prefix, extra)


def train(cfg: Config, guard: scaffold.LastGoodState, load_models=None):
    # ---- checks and set-up: nothing is written until all of it has succeeded (scaffold.Run)
    scaffold.check_shared(cfg)
    explore.validate(cfg.explore, cfg.sample.guidance_scale)
    rank, world, device = common.init_distributed(cfg.device)
    common.set_threads(cfg.threads)
    is_flow = flow.is_flow_model(cfg.model)
    accum = check(cfg, world, is_flow)
    s, T = cfg.sample, cfg.sample.num_steps
    N = s.group_size * s.prompts_per_batch * s.num_batches
    dtype = common.resolve_dtype(cfg.dtype, device)
    run_dir = common.all_gather(scaffold.resolve_run_dir(cfg.run_dir, cfg.resume, cfg.name), world)[0]
    resume = scaffold.resume_from(cfg.resume, run_dir)
    scaffold.check_run_dir(run_dir, resume)

    load_models = load_models or (flow.load_flow_models if is_flow else diffusion.load_models)
    models = load_models(cfg.model, device=device, dtype=dtype, seed=cfg.seed)
    family = FlowFamily(cfg, models) if is_flow else DDIMFamily(cfg, models)
    precision = common.Precision(device, dtype)
    params = lora.inject(family.module, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, seed=cfg.seed)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.adam_betas,
                                  weight_decay=cfg.train.weight_decay, eps=cfg.train.adam_eps)
    reward_fn = rewards.make_reward(cfg.reward.name, device=device, dtype=dtype, tiny=cfg.reward.tiny,
                                    weights=cfg.reward.weights)
    eval_rewards = evaluate.load_eval_rewards(cfg.eval, device, dtype, cfg.reward.tiny)  # --eval.rewards
    prompt_set = diffusion.load_prompts(cfg.prompts)
    heldout = diffusion.load_prompts(cfg.eval.prompts) if cfg.eval.every > 0 and cfg.eval.prompts else None
    start_epoch, reward_queries = 0, 0
    if resume:
        state = scaffold.load_checkpoint(resume, family.module)
        optimizer.load_state_dict(state["optimizer"])
        precision.load_state_dict(state.get("precision"))
        start_epoch, reward_queries = state["epoch"], state["reward_queries"]
        print0(f"resumed from {state['path']} at epoch {start_epoch}")
    if scaffold.nothing_left(cfg, start_epoch, run_dir):
        return run_dir

    def policy_scores():  # fixed seeds, plain prompts, w_high: the training prompts and the held-out ones
        out = {}
        for prefix, prompts in (("plain", prompt_set if cfg.eval.plain else None), ("heldout", heldout)):
            if prompts:
                out |= family.evaluate(prompts, reward_fn, eval_rewards, prefix)
        return out

    def training_state(epochs_done: int) -> dict:
        return {"epoch": epochs_done, "reward_queries": reward_queries, "optimizer": optimizer.state_dict(),
                "precision": precision.state_dict()}
    run = scaffold.Run(cfg, run_dir, rank, world, start_epoch, reward_queries, family.module, params,
                       guard, training_state, policy_scores)
    bars = scaffold.show_progress(cfg.log, rank)
    window = torch.arange(*s.sde_window)
    print0(f"batch arithmetic: {N} rollouts per epoch = {s.num_batches} batches x {s.prompts_per_batch} "
           f"prompts x groups of {s.group_size}, over {world} process(es); training: steps "
           f"{s.sde_window[0]}..{s.sde_window[1] - 1} of {T}, micro-batches of {cfg.train.batch_size}, "
           f"{accum} per optimizer step")
    my_batches = list(range(rank, s.num_batches, world))
    n_local = len(my_batches) * s.group_size * s.prompts_per_batch

    for epoch in range(start_epoch, cfg.num_epochs):
        progress = epoch / cfg.num_epochs
        exploring = any(explore.active(cfg.explore, progress))
        t0 = time.perf_counter()
        batches = sample_epoch(cfg, family, prompt_set, epoch, my_batches, precision, bars)
        t_sample = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            local_reward = torch.cat(scaffold.score(reward_fn, [b["images"] for b in batches],
                                                    [b["prompts"] for b in batches], cfg.reward.name,
                                                    f"{run_dir}/unscored_epoch_{epoch:04d}"
                                                    f"_rank{rank}.pt")).float().cpu()
        t_reward = time.perf_counter() - t0
        reward = torch.cat(common.all_gather(local_reward, world))  # (N,), rank-major, groups consecutive
        reward_queries += len(reward)
        if not torch.isfinite(reward).all():
            raise FloatingPointError(f"epoch {epoch}: non-finite reward from "
                                     f"--reward.name {cfg.reward.name}.")
        advantages = group_advantages(reward, s.group_size, cfg.train.std_over)
        advantages = advantages.clamp(-cfg.train.adv_clip_max, cfg.train.adv_clip_max)
        advantages = advantages[rank * n_local:(rank + 1) * n_local].to(device)
        data = {k: torch.cat([b[k] for b in batches])
                for k in ("latents", "log_probs", "guidance", "cond", "pooled")}
        grid_images = torch.cat([b["images"] for b in batches])[:cfg.log.grid_size]
        local_prompts = sum([b["prompts"] for b in batches], [])
        grid_labels = plots.grid_labels(local_prompts[:cfg.log.grid_size], local_reward[:cfg.log.grid_size])
        del batches

        t0 = time.perf_counter()
        stats = {"loss": [], "kl": [], "clipfrac": [], "grad_norm": []}
        first_ratio_err = grpo_epoch(cfg, family, window, data, advantages, accum // world, precision,
                                     optimizer, params, world, stats,
                                     common.generator(cfg.seed, epoch, "train", rank), f"epoch {epoch}", bars)
        t_train = time.perf_counter() - t0
        common.assert_in_sync(params, world, f"epoch {epoch}")
        stats = {k: sum(v) / len(v) for k, v in stats.items()}
        if world > 1:
            stats = {k: sum(x[k] for x in common.all_gather(stats, world)) / world for k in stats}
            first_ratio_err = max(common.all_gather(first_ratio_err, world))
        groups = reward.view(-1, s.group_size)
        record = {"epoch": epoch, "reward_queries": reward_queries, **common.summarize(reward), **stats,
                  "first_ratio_err": first_ratio_err, "exploring": exploring,
                  "signal_share": (groups.max(1).values > groups.min(1).values).float().mean().item(),
                  "s_sample": t_sample, "s_reward": t_reward, "s_train": t_train}
        details = (f"kl {common.fmt(record['kl'])} | clipfrac {record['clipfrac']:.3f} | "
                   f"loss {common.fmt(record['loss'])}")
        run.end_epoch(epoch, record, details, t_sample + t_reward + t_train, grid_images, grid_labels)
    run.close()
    return run_dir


def sample_epoch(cfg: Config, family, prompt_set, epoch: int, my_batches: list[int], precision,
                 bars: bool) -> list[dict]:
    """This process's rollouts, with exploration: per sampling batch, prompts_per_batch prompts, each
    group_size times in a row; latents (B, T+1, ...), log-probs (B, T), guidance (B, T), exact prompt
    embeddings, images. Batch b draws from generators keyed by (seed, epoch, b): the same rollouts on any
    number of processes."""
    s, progress, out = cfg.sample, epoch / cfg.num_epochs, []
    for b in tqdm(my_batches, desc=f"epoch {epoch} sampling", leave=False, disable=not bars):
        idx = torch.randint(len(prompt_set), (s.prompts_per_batch,),
                            generator=common.generator(cfg.seed, epoch, b, "prompts"))
        prompts = [prompt_set[i] for i in idx for _ in range(s.group_size)]
        cond, pooled, positions = family.encode(prompts)
        cond, guidance = explore.explore_batch(cfg.explore, cond, positions, family.explore_ts,
                                               s.guidance_scale, progress,
                                               common.generator(cfg.seed, epoch, b, "explore"), family.tokens)
        noise = common.generator(cfg.seed, epoch, b, "noise")
        n_noise = s.prompts_per_batch if s.same_noise else len(prompts)
        x_T = torch.randn((n_noise, *family.models.latent_shape), generator=noise)
        x_T = x_T.repeat_interleave(s.group_size, 0) if s.same_noise else x_T
        with torch.no_grad(), precision.autocast():
            latents, log_probs, images = family.rollout(cond, pooled, guidance, noise, x_T)
        out.append(dict(latents=latents, log_probs=log_probs, guidance=guidance, cond=cond, pooled=pooled,
                        images=images, prompts=[p.text for p in prompts]))
    return out


def grpo_epoch(cfg: Config, family, window, data: dict, advantages, accum: int, precision, optimizer, params,
               world: int, stats: dict, generator, where: str, bars: bool) -> float:
    """One pass over this process's rollouts in shuffled micro-batches, each re-scored at every step of the
    window (LoRA on), with the reference step (LoRA off) for the KL term; an optimizer step every `accum`
    micro-batches. -> max |ratio - 1| before the first optimizer step (0 when on-policy)."""
    t = cfg.train
    perm = torch.randperm(len(advantages), generator=generator)
    micro = perm.split(t.batch_size)
    ratio_err = 0.0
    for m, rows in enumerate(tqdm(micro, desc=f"{where} training", leave=False, disable=not bars)):
        rows_dev, pending = rows.to(advantages.device), []  # per step: loss, KL, clipfrac, max |ratio - 1|
        for i in window[torch.randperm(len(window), generator=generator)].tolist():
            x, x_next, w = (data["latents"][rows_dev, i], data["latents"][rows_dev, i + 1],
                            data["guidance"][rows, i])
            cond, pooled = data["cond"][rows_dev], data["pooled"][rows_dev]
            with precision.autocast():
                log_prob, mean, std = family.step(x, i, x_next, cond, pooled, w)
                kl = torch.zeros_like(log_prob)
                if t.beta > 0:
                    with torch.no_grad(), lora.disabled(family.module):
                        mean_ref = family.step(x, i, x_next, cond, pooled, w)[1]
                    kl = flow.kl_same_std(mean, mean_ref, std)
            loss, ratio, clipfrac = ppo_kl_loss(log_prob, data["log_probs"][rows_dev, i],
                                                advantages[rows_dev], kl, t.clip_range, t.beta)
            precision.backward(loss / (accum * len(window)))
            pending.append(torch.stack([loss.detach(), kl.detach().mean(), clipfrac,
                                        (ratio.detach() - 1).abs().max()]).float())
        read = common.read_stats(pending, ("loss", "kl", "clipfrac"), stats, f"{where}, micro-batch {m}")
        if m < accum:
            ratio_err = max(ratio_err, read[:, 3].max().item())
        if (m + 1) % accum == 0:
            stats["grad_norm"].append(precision.step(optimizer, params, t.max_grad_norm, world,
                                                     f"{where}, micro-batch {m}"))
    return ratio_err


def cli(args=None) -> Config:
    return tyro.extras.overridable_config_cli(PRESETS, args=args, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    scaffold.run_cli(main, cli)
