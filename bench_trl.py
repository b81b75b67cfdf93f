"""
Peer comparison: DDPO throughput of trl's DDPOTrainer (trl 0.23.1, the last release that has it) and of
train_ddpo.py, with the same model, settings and reward, in one process on the same torch.

trl is not a dependency of this project. Install it beside the project's requirements in a separate
virtual environment outside the repository, for example:

    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install -r requirements.txt "trl==0.23.1"
    /tmp/trl-venv/bin/python bench_trl.py                     # tiny offline model, CPU, several minutes
    OMP_NUM_THREADS=2 /tmp/trl-venv/bin/python bench_trl.py --threads 2 --out bench-trl.jsonl
    /tmp/trl-venv/bin/python bench_trl.py --model sd15-random --device cuda --dtype bfloat16 --num-steps 20 \
        --epochs 2 --burn-in 1 --timesteps-per-forward 1 2                                     # one GPU, ~2 min

Both trainers load the same diffusers folder (written here from diffusion.load_models), sample
num_batches x sample_batch trajectories per epoch with DDIM (eta, steps, guidance as set), score them with
JPEG compressibility, normalise advantages over the epoch's batch, and run the PPO update over every
timestep with LoRA rank 4 on the UNet's attention projections. The frozen weights are float32, or bfloat16
with --dtype bfloat16 (trl's mixed_precision "bf16"; the LoRA weights stay float32). DiffExp's exploration is off
(trl has none). Throughput is taken from wall time per phase of each epoch after `burn_in` epochs:
samples/s in sampling, transitions/s (samples x steps) in training. train_ddpo.py runs once per
--timesteps-per-forward value; 1 is trl's batching (one timestep per UNet call).
"""

import dataclasses
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import scaffold
import diffusion
import rewards
import train_ddpo
from explore import ExploreConfig


@dataclass(frozen=True)
class Config:
    model: str = "tiny"  # tiny | sd15-random | a local diffusers folder (both trainers load the same one)
    device: str = "cpu"  # cpu | cuda
    dtype: Literal["float32", "bfloat16"] = "float32"  # frozen weights' dtype (trl: mixed_precision "no" / "bf16"; LoRA stays float32 in both)
    threads: int = 0  # CPU threads for torch (0: torch's default, which follows OMP_NUM_THREADS)
    epochs: int = 3  # epochs per trainer, the first `burn_in` of them untimed
    burn_in: int = 1
    num_steps: int = 10  # DDIM steps T
    eta: float = 1.0
    guidance_scale: float = 5.0
    sample_batch: int = 8  # trajectories per sampling batch
    num_batches: int = 2  # sampling batches per epoch
    train_batch: int = 4  # trajectories per training micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step
    lr: float = 3e-4
    clip_range: float = 1e-4
    timesteps_per_forward: tuple[int, ...] = (1, 10)  # train_ddpo.py runs, one per value
    compile: bool = False  # train_ddpo.py's --compile (trl has no such option); compiling falls in the burn-in epochs
    seed: int = 0
    out: str = ""  # also append the JSON lines to this file


def save_pipeline(models: diffusion.Models, folder: str):
    """The models as a diffusers StableDiffusionPipeline folder, the format trl's pipeline loads."""
    from diffusers import StableDiffusionPipeline
    StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
                            scheduler=models.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def throughput(cfg: Config, t_sample: list[float], t_train: list[float]) -> dict:
    """Samples/s and transitions/s over the timed epochs (total work / total time)."""
    n = cfg.sample_batch * cfg.num_batches
    timed = slice(cfg.burn_in, None)
    return {"samples_per_s": n * len(t_sample[timed]) / sum(t_sample[timed]),
            "transitions_per_s": n * cfg.num_steps * len(t_train[timed]) / sum(t_train[timed]),
            "s_sample": t_sample[timed], "s_train": t_train[timed]}


def run_trl(cfg: Config, folder: str, workdir: str) -> dict:
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    PartialState()  # trl's pipeline logs through accelerate, which refuses before its state exists
    ddpo_cfg = DDPOConfig(
        num_epochs=cfg.epochs, seed=cfg.seed, mixed_precision={"float32": "no", "bfloat16": "bf16"}[cfg.dtype],
        save_freq=10**9, logdir=os.path.join(workdir, "logs"),
        project_kwargs=dict(project_dir=os.path.join(workdir, "trl")), accelerator_kwargs=dict(cpu=cfg.device == "cpu"),
        sample_num_steps=cfg.num_steps, sample_eta=cfg.eta, sample_guidance_scale=cfg.guidance_scale,
        sample_batch_size=cfg.sample_batch, sample_num_batches_per_epoch=cfg.num_batches,
        train_batch_size=cfg.train_batch, train_gradient_accumulation_steps=cfg.grad_accum, train_learning_rate=cfg.lr,
        train_clip_range=cfg.clip_range, per_prompt_stat_tracking=False)
    pipeline = DefaultDDPOStableDiffusionPipeline(folder, use_lora=True)  # LoRA rank 4 on to_q/k/v/out.0, as ours
    jpeg = rewards.make_reward("jpeg-compressibility")
    prompts = [p.text for p in diffusion.load_prompts("animals")]
    rng = random.Random(cfg.seed)
    trainer = DDPOTrainer(ddpo_cfg, lambda images, texts, meta: (jpeg(images, list(texts)), {}),
                          lambda: (rng.choice(prompts), {}), pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    # time the two phases of trainer.step by wrapping its methods (timing only; behaviour unchanged)
    t_sample, t_train = [], []

    def timed(fn, times):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            return out
        return wrapper
    trainer._generate_samples = timed(trainer._generate_samples, t_sample)
    trainer._train_batched_samples = timed(trainer._train_batched_samples, t_train)
    global_step = 0
    for epoch in range(cfg.epochs):
        global_step = trainer.step(epoch, global_step)
        print(f"trl epoch {epoch}: sampling {t_sample[-1]:.2f} s, training {t_train[-1]:.2f} s", flush=True)
    return throughput(cfg, t_sample, t_train)


def run_ours(cfg: Config, folder: str, workdir: str, tpf: int) -> dict:
    preset = train_ddpo.PRESETS["tiny"][1]
    n = cfg.sample_batch * cfg.num_batches
    ours = dataclasses.replace(
        preset, name="bench-trl", model=folder, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, seed=cfg.seed,
        num_epochs=cfg.epochs,
        run_dir=os.path.join(workdir, f"ours-tpf{tpf}"), prompts="animals",
        sample=train_ddpo.SampleConfig(num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                                       batch_size=cfg.sample_batch, num_batches=cfg.num_batches),
        train=dataclasses.replace(preset.train, batch_size=cfg.train_batch, updates_per_epoch=n // (cfg.train_batch * cfg.grad_accum),
                                  timesteps_per_forward=tpf, lr=cfg.lr, clip_range=cfg.clip_range, per_prompt_stats=False),
        explore=ExploreConfig(diffexp=False), reward=rewards.RewardConfig(name="jpeg-compressibility"),
        lora=scaffold.LoRAConfig(rank=4, alpha=4.0), log=scaffold.LogConfig(grid_every=0, save_every=0),
        eval=dataclasses.replace(preset.eval, every=0, diversity=False))
    records = scaffold.read_metrics(os.path.join(train_ddpo.main(ours), "metrics.jsonl"))
    return throughput(cfg, [r["s_sample"] for r in records], [r["s_train"] for r in records])


def main(cfg: Config) -> list[dict]:
    assert cfg.epochs > cfg.burn_in, "--epochs must exceed --burn-in"
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    import trl
    header = dict(model=cfg.model, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile,
                  threads=torch.get_num_threads() if cfg.device == "cpu" else None,
                  torch=torch.__version__, trl=trl.__version__, steps=cfg.num_steps,
                  samples_per_epoch=cfg.sample_batch * cfg.num_batches, train_batch=cfg.train_batch,
                  timed_epochs=cfg.epochs - cfg.burn_in)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as workdir:
        folder = cfg.model if os.path.isdir(cfg.model) else os.path.join(workdir, "pipeline")
        if folder != cfg.model:
            save_pipeline(diffusion.load_models(cfg.model, seed=cfg.seed), folder)
        results.append({"trainer": "trl DDPOTrainer", **run_trl(cfg, folder, workdir)})
        for tpf in cfg.timesteps_per_forward:
            results.append({"trainer": f"train_ddpo tpf={tpf}", **run_ours(cfg, folder, workdir, tpf)})
    trl_result = results[0]
    lines = []
    for r in results:
        r = {**header, **r, "sample_ratio_vs_trl": r["samples_per_s"] / trl_result["samples_per_s"],
             "train_ratio_vs_trl": r["transitions_per_s"] / trl_result["transitions_per_s"]}
        lines.append(r)
        print(json.dumps(r), flush=True)
        if cfg.out:
            with open(cfg.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"\n{'trainer':<20} {'samples/s':>10} {'x trl':>6} {'transitions/s':>14} {'x trl':>6}")
    for r in lines:
        print(f"{r['trainer']:<20} {r['samples_per_s']:>10.3g} {r['sample_ratio_vs_trl']:>6.2f} "
              f"{r['transitions_per_s']:>14.3g} {r['train_ratio_vs_trl']:>6.2f}")
    return lines


if __name__ == "__main__":
    main(tyro.cli(Config, description=__doc__.split("\n\n")[0]))
