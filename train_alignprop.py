"""
AlignProp with DiffExp: reward fine-tuning of a text-to-image diffusion model by backpropagating a
differentiable reward through the last K denoising steps (Prabhudesai et al. 2023, "Aligning
Text-to-Image Diffusion Models with Reward Backpropagation"), with DiffExp's exploration
(Chae et al., AAAI 2025) on the sampling side.

    python train_alignprop.py tiny                        # offline tiny model, a model-free reward, CPU
    python train_alignprop.py tiny --no-diffexp           # the baseline
    python train_alignprop.py sd15-aesthetic              # SD v1.5, 45 animals, LAION aesthetic, one GPU
    python train_alignprop.py sd15-pickscore --truncation uniform --k-min 1 --k-max 10
    python train_alignprop.py sdxl-aesthetic              # SDXL base at 1024 px, bfloat16
    torchrun --nproc_per_node=8 train_alignprop.py sd15-aesthetic   # 8 GPUs, the same effective batch
    python train_alignprop.py tiny --resume runs/alignprop-tiny-20260101-120000

One "epoch" here is one optimizer step: total_batch samples (micro-batches of --train.batch-size,
gradients accumulated), each scored once, so reward queries grow by total_batch per epoch.
Truncation: gradients flow through the last K of the T sampling steps and the VAE decode only; the
earlier steps run without gradient. K is fixed (--truncation fixed --k K) or drawn uniformly from
[--k-min, --k-max] once per micro-batch of trajectories (--truncation uniform). Each UNet call with
gradient, and the decode, run under gradient checkpointing (--no-checkpointing turns it off).
"""

import dataclasses
import functools
import os
import resource
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
    eta: float = 0.0  # DDIM stochasticity (AlignProp samples deterministically from x_T)
    guidance_scale: float = 7.5  # w_high: classifier-free guidance scale (the only one when not exploring)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 2  # trajectories per micro-batch (one backward each)
    total_batch: int = 128  # trajectories per optimizer step (= batch_size x gradient accumulation)
    lr: float = 1e-3  # AdamW learning rate of the LoRA weights
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.1
    adam_eps: float = 1e-8
    max_grad_norm: float = 5.0  # gradient clipping
    loss: Literal["reward", "target"] = "reward"  # reward: loss = -reward; target: loss = |reward - target|
    target: float = 10.0  # reward target of the "target" loss


@dataclass(frozen=True)
class Config:
    name: str = "alignprop"  # run name: the run folder is runs/{name}-{date} unless --run-dir is given
    # tiny | sd15 | sd15-random | tiny-sdxl | sdxl | sdxl-random | a local diffusers folder | a hub id
    model: str = "sd15"
    # animals | animal-activities | unseen-animals | drawbench[:Category,...] | file.txt
    prompts: str = "animals"
    num_epochs: int = 100  # planned optimizer steps (exploration runs for the first explore_until of them)
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
    # K fixed, or drawn from U{k_min..k_max} per micro-batch
    truncation: Literal["fixed", "uniform"] = "fixed"
    k: int = 1  # fixed truncation: gradients through the last k steps (k = num_steps: through all)
    k_min: int = 1  # uniform truncation: smallest K
    k_max: int = 10  # uniform truncation: largest K
    checkpointing: bool = True  # gradient checkpointing of each UNet call with gradient and of the decode
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()
    explore: ExploreConfig = ExploreConfig()
    reward: RewardConfig = RewardConfig(name="aesthetic")
    lora: LoRAConfig = LoRAConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()


BASE = Config()
# shipped with the repo
TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy")
TOY_T_THRES = 570  # the paper's t_thres 800 mapped to the toy model's schedule by noise level (tested)
# The toy world (docs/toy-world.md): 10 DDIM steps (the alignment of 20 within 0.01, eta 0), gradients through
# all of them (in pixel space size, position and background are settled at the noisy steps, which K = 1
# cannot reach) without gradient checkpointing (the toy's activations are small; 30% faster), lr 5e-3
# (3e-3 learned half as far in the budget, 1e-2 faster but fell back once; experiments.md, section 6), CFG 5,
# DiffExp's t_thres mapped to this schedule by noise level (TOY_T_THRES, the
# paper's 800), and the plain policy evaluated every 4 steps on fixed seeds (training and held-out prompts).
# The random tiny CLIP behind the diversity metric means nothing here, so it is off.
TOY = dataclasses.replace(
    BASE, name="alignprop-toy", model=TOY_MODEL,
    prompts=os.path.join(diffusion.PROMPTS_DIR, "toy_train.txt"), num_epochs=20,
    k=10, checkpointing=False, sample=SampleConfig(num_steps=10, guidance_scale=5.0),
    train=TrainConfig(batch_size=8, total_batch=16, lr=5e-3),
    explore=ExploreConfig(t_thres=TOY_T_THRES), reward=RewardConfig(name="toy-aesthetic"),
    log=LogConfig(grid_every=5, save_every=5),
    eval=EvalConfig(every=4, samples_per_prompt=2, diversity=False,
                    prompts=os.path.join(diffusion.PROMPTS_DIR, "toy_heldout.txt")))
PRESETS = {
    "tiny": (
        "Offline tiny random model, the differentiable model-free brightness reward, a few steps on a CPU.",
        dataclasses.replace(
            BASE, name="alignprop-tiny", model="tiny", num_epochs=12, k=2,
            sample=SampleConfig(num_steps=10), train=TrainConfig(batch_size=4, total_batch=8, lr=1e-2),
            reward=RewardConfig(name="brightness"), log=LogConfig(grid_every=4, save_every=4),
            eval=EvalConfig(clip_tiny=True))),
    "toy": ("The toy world's aesthetic task (the shipped pixel-space model, offline, CPU): the quick start.",
            TOY),
    "toy-classifier": (
        "The toy world's prompt-fidelity task (toy-classifier reward), otherwise as toy.",
        dataclasses.replace(TOY, name="alignprop-toy-classifier",
                            reward=RewardConfig(name="toy-classifier"))),
    "sd15-aesthetic": (
        "SD v1.5, 45 animals, LAION aesthetic; AlignProp's reference hyperparameters.",
        dataclasses.replace(BASE, name="alignprop-sd15-aesthetic")),
    "sd15-pickscore": ("SD v1.5, 135 animal-activity prompts, PickScore.", dataclasses.replace(
        BASE, name="alignprop-sd15-pickscore", prompts="animal-activities",
        reward=RewardConfig(name="pickscore"))),
}
# SDXL base at 1024 px: the sd15 recipe (128 samples per optimizer step, K = 1, checkpointing) in bfloat16
# (the 2.6 B-parameter UNet in float32 would double memory and time), micro-batches of 1 trajectory
# (1024 px latents have 4x the positions of SD v1.5's and the UNet is 3x larger; the decode with gradient
# runs at 1024 px), and guidance 5.0, diffusers' SDXL default (AlignProp's 7.5 is SD v1.5's).
# Sized for one 80 GB GPU, not yet measured there.
SDXL = dataclasses.replace(BASE, model="sdxl", dtype="bfloat16", sample=SampleConfig(guidance_scale=5.0),
                           train=TrainConfig(batch_size=1))
PRESETS |= {
    "sdxl-aesthetic": (
        "SDXL base, 45 animals, LAION aesthetic; bfloat16, guidance 5.0, micro-batches of 1.",
        dataclasses.replace(SDXL, name="alignprop-sdxl-aesthetic")),
    "sdxl-pickscore": (
        "SDXL base, 135 animal-activity prompts, PickScore; bfloat16, guidance 5.0.",
        dataclasses.replace(SDXL, name="alignprop-sdxl-pickscore", prompts="animal-activities",
                            reward=RewardConfig(name="pickscore"))),
}


def draw_k(cfg: Config, generator: torch.Generator) -> int:
    """The number of final steps that get gradients for one micro-batch of trajectories."""
    if cfg.truncation == "fixed":
        return cfg.k
    return int(torch.randint(cfg.k_min, cfg.k_max + 1, (1,), generator=generator))


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated on CUDA; elsewhere the process's peak resident memory (Linux: KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -----------------------------------------------------------------------------


def main(cfg: Config, load_models=diffusion.load_models):
    """Trains with cfg. load_models: how the models are loaded (bench_parts.py passes one that draws random
    full-size weights on the GPU)."""
    return scaffold.run_guarded(functools.partial(train, load_models=load_models), cfg)


def check(cfg: Config, world: int) -> tuple[tuple[int, int], int]:
    """AlignProp's own flags, after the shared ones. -> (the range of K, micro-batches per optimizer step over
    all processes)."""
    if cfg.reward.name not in rewards.DIFFERENTIABLE:
        raise ConfigError(f"--reward.name {cfg.reward.name}: AlignProp needs a differentiable reward "
                          f"({', '.join(sorted(rewards.DIFFERENTIABLE))}); use train_ddpo.py for this one.")
    ks = (cfg.k, cfg.k) if cfg.truncation == "fixed" else (cfg.k_min, cfg.k_max)
    if not 1 <= ks[0] <= ks[1] <= cfg.sample.num_steps:
        raise ConfigError(f"truncation: need 1 <= K <= --sample.num-steps {cfg.sample.num_steps}; got "
                          f"--k {cfg.k} (or --k-min {cfg.k_min} / --k-max {cfg.k_max}).")
    grad_accum, rem = divmod(cfg.train.total_batch, max(1, cfg.train.batch_size))
    if cfg.train.batch_size < 1 or rem or grad_accum < 1 or grad_accum % world:
        raise ConfigError(f"--train.total-batch {cfg.train.total_batch} must be a multiple of "
                          f"--train.batch-size {cfg.train.batch_size} (>= 1) x the number of processes "
                          f"({world}).")
    return ks, grad_accum


def train(cfg: Config, guard: scaffold.LastGoodState, load_models=diffusion.load_models):
    # ---- checks and set-up: nothing is written until all of it has succeeded (scaffold.Run)
    scaffold.check_shared(cfg)
    explore.validate(cfg.explore, cfg.sample.guidance_scale)
    rank, world, device = common.init_distributed(cfg.device)
    common.set_threads(cfg.threads)
    ks, grad_accum = check(cfg, world)
    T = cfg.sample.num_steps
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
    start_epoch, reward_queries = 0, 0
    if resume:
        state = scaffold.load_checkpoint(resume, unet)
        optimizer.load_state_dict(state["optimizer"])
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
                "precision": precision.state_dict()}
    run = scaffold.Run(cfg, run_dir, rank, world, start_epoch, reward_queries, unet, params, guard,
                       training_state, policy_scores)
    bars = scaffold.show_progress(cfg.log, rank)
    print0(f"batch arithmetic: {cfg.train.total_batch} samples per optimizer step = {grad_accum} "
           f"micro-batches x {cfg.train.batch_size} over {world} process(es); gradients through the last "
           f"{ks[0]}..{ks[1]} of {T} steps")
    assert grad_accum * cfg.train.batch_size == cfg.train.total_batch
    my_micro = list(range(rank, grad_accum, world))  # global micro-batch indices of this process

    for epoch in range(start_epoch, cfg.num_epochs):
        progress = epoch / cfg.num_epochs
        exploring = any(explore.active(cfg.explore, progress))
        models.unet.train()
        t0 = time.perf_counter()
        out = {"reward": [], "loss": [], "grad_from": [], "prompts": [], "embeddings": []}
        shown = []  # the epoch's first samples, for the grid
        for m in tqdm(my_micro, desc=f"epoch {epoch}", leave=False, disable=not bars):
            images = micro_batch(cfg, models, encode, uncond, prompt_set, ts, reward_fn, precision, epoch, m,
                                 len(my_micro),
                                 os.path.join(run_dir, f"unscored_epoch_{epoch:04d}_rank{rank}.pt"), out)
            if embedder:
                out["embeddings"].append(evaluate.embed_images(images, embedder).cpu())
            if sum(map(len, shown)) < cfg.log.grid_size:
                shown.append(images.cpu())
        grad_norm = precision.step(optimizer, params, cfg.train.max_grad_norm, world,
                                   f"epoch {epoch}")  # NaN: skipped
        seconds = time.perf_counter() - t0
        common.assert_in_sync(params, world, f"epoch {epoch}")

        # ---- the epoch's record: log, grid, checkpoint (scaffold.Run, process 0)
        local = (torch.cat(out["reward"]), out["loss"], out["grad_from"], peak_memory_mb(device),
                 out["prompts"], torch.cat(out["embeddings"]) if embedder else None)
        gathered = common.all_gather(local, world)
        reward = torch.cat([g[0] for g in gathered])
        losses, grad_from = [x for g in gathered for x in g[1]], [x for g in gathered for x in g[2]]
        reward_queries += len(reward)
        record = {"epoch": epoch, "reward_queries": reward_queries, **common.summarize(reward),
                  "loss": sum(losses) / len(losses), "grad_norm": grad_norm,
                  "skipped_steps": int(grad_norm != grad_norm),
                  "grad_from_step": sum(grad_from) / len(grad_from), "exploring": exploring,
                  "s_step": seconds, "samples_per_s": len(reward) / seconds,
                  "peak_mem_mb": max(g[3] for g in gathered)}
        if embedder and rank == 0:
            record["diversity"] = evaluate.mean_diversity(torch.cat([g[5] for g in gathered]),
                                                          [t for g in gathered for t in g[4]])
        n = cfg.log.grid_size  # process 0's first samples, labelled
        labels = plots.grid_labels(out["prompts"][:n], torch.cat(out["reward"])[:n])
        details = (f"loss {common.fmt(record['loss'])} | grad norm {common.fmt(record['grad_norm'])} | "
                   f"grads from step {record['grad_from_step']:.3g}/{T}")
        run.end_epoch(epoch, record, details, seconds, torch.cat(shown)[:n], labels)
    run.close()
    return run_dir


def micro_batch(cfg: Config, models, encode, uncond, prompt_set, ts, reward_fn, precision, epoch: int, m: int,
                accum: int, unscored: str, out: dict):
    """One micro-batch of trajectories, with exploration: sampled with gradients through the last K steps and
    the decode, scored by the differentiable reward, and the loss backpropagated (gradients accumulate over
    the step's `accum` micro-batches). Micro-batch m draws from generators keyed by (seed, epoch, m): the same
    on any number of processes. Appends the rewards, loss, first step with gradient and prompts to `out`.
    -> the images (b, 3, H, W), detached."""
    idx = torch.randint(len(prompt_set), (cfg.train.batch_size,),
                        generator=common.generator(cfg.seed, epoch, m, "prompts"))
    batch_prompts = [prompt_set[i] for i in idx]
    texts = [p.text for p in batch_prompts]
    cond, positions = encode(batch_prompts)
    cond, guidance = explore.explore_batch(cfg.explore, cond, positions, ts, cfg.sample.guidance_scale,
                                           epoch / cfg.num_epochs,
                                           common.generator(cfg.seed, epoch, m, "explore"),
                                           diffusion.PROMPT_LENGTH)
    k = draw_k(cfg, common.generator(cfg.seed, epoch, m, "truncation"))
    with precision.autocast():
        traj = diffusion.sample(models, cond, uncond, guidance, len(ts), cfg.sample.eta,
                                common.generator(cfg.seed, epoch, m, "noise"), grad_last_k=k,
                                checkpointing=cfg.checkpointing)
    # (b,), differentiable
    reward = scaffold.score(reward_fn, [traj.images], [texts], cfg.reward.name, unscored)[0]
    loss = -reward.mean() if cfg.train.loss == "reward" else (reward - cfg.train.target).abs().mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"epoch {epoch}: non-finite loss (reward {reward.tolist()}).")
    precision.backward(loss / accum)
    out["reward"].append(reward.detach().float().cpu())
    out["loss"].append(loss.item())
    out["grad_from"].append(traj.grad_from)
    out["prompts"] += texts
    return traj.images.detach()


def cli(args=None) -> Config:
    return tyro.extras.overridable_config_cli(PRESETS, args=args, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    scaffold.run_cli(main, cli)
