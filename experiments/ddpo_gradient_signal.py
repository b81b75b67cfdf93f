"""
Does DDPO's gradient estimate point uphill? A measurement on the toy world (experiments.md, section 5).

At the pretrained toy model (LoRA B = 0), from the same number N of fresh samples, two estimates of the
gradient of the mean reward with respect to the LoRA weights:
  - DDPO's score-function estimate: sum over samples and steps of advantage x grad log p(x_{t-1} | x_t),
    with train_ddpo.py's per-prompt advantages and DDIM log-probs (eta = 1, all steps);
  - the pathwise estimate: the reward backpropagated through the same sampling chain (reparameterised
    noise), what AlignProp follows.
Each direction d is then checked by a central finite difference of the mean reward on a fixed evaluation
set (the same prompts, initial noise and step noise on both sides): r(theta + h d/|d|) - r(theta - h d/|d|).
The same for DDPO's estimate from the first (noisier) half of the steps alone. Also printed: the norm
of DDPO's estimate from each step alone, which shows which steps dominate it.

    python experiments/ddpo_gradient_signal.py --n 384          # about 20 minutes on 2 CPU cores
"""

import os
import sys
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import diffusion  # noqa: E402
import lora  # noqa: E402
import rewards  # noqa: E402
from train_ddpo import PRESETS, PerPromptStatTracker  # noqa: E402

TOY = PRESETS["toy"][1]


@dataclass(frozen=True)
class Config:
    n: int = 384  # samples per gradient estimate (and in the evaluation set)
    reward: str = "toy-classifier"  # must be differentiable for the pathwise estimate
    steps: tuple[float, ...] = (0.3, 1.0)  # finite-difference step sizes h (LoRA weight-space norm)
    batch: int = 32  # samples per forward pass
    guidance_scale: float = TOY.sample.guidance_scale
    num_steps: int = TOY.sample.num_steps
    lora_alpha: float = TOY.lora.alpha
    seed: int = 0


def main(cfg: Config):
    T, eta, w = cfg.num_steps, 1.0, cfg.guidance_scale
    models = diffusion.load_models(TOY.model)
    params = lora.inject(models.unet, rank=TOY.lora.rank, alpha=cfg.lora_alpha, seed=cfg.seed)
    reward_fn = rewards.make_reward(cfg.reward)
    prompt_set = diffusion.load_prompts(TOY.prompts)
    uncond = diffusion.encode_text(models, [""])
    ts = diffusion.timesteps(models, T)

    def draw(key):
        idx = torch.randint(len(prompt_set), (cfg.n,), generator=common.generator(cfg.seed, key, "prompts"))
        texts = [prompt_set[i].text for i in idx]
        return diffusion.encode_text(models, texts), texts

    def chunks():
        return [torch.arange(i, min(i + cfg.batch, cfg.n)) for i in range(0, cfg.n, cfg.batch)]

    def sample_rewards(cond, texts, key, grad=False):
        """(n,) rewards of samples keyed by `key`; with grad, also backpropagates -(mean reward)."""
        out = []
        for rows in chunks():
            with torch.set_grad_enabled(grad):
                traj = diffusion.sample(models, cond[rows], uncond, w, T, eta, common.generator(cfg.seed, key, int(rows[0])),
                                        grad_last_k=T if grad else 0)
                r = reward_fn(traj.images, [texts[i] for i in rows]).float()
            if grad:
                (-r.sum() / cfg.n).backward()
            out.append(r.detach())
        return torch.cat(out)

    def norm(d):
        return torch.sqrt(sum((x ** 2).sum() for x in d)).item()

    def take_direction():
        d = [-p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]  # ascent
        for p in params:
            p.grad = None
        return d

    eval_cond, eval_texts = draw("eval")
    base = sample_rewards(eval_cond, eval_texts, "eval").mean().item()
    print(f"{cfg.reward}, N = {cfg.n}: mean reward on the evaluation set {base:.4f}", flush=True)

    # pathwise estimate
    cond, texts = draw("pathwise")
    sample_rewards(cond, texts, "pathwise", grad=True)
    directions = {"pathwise": take_direction()}

    # DDPO's estimate, step by step
    cond, texts = draw("ddpo")
    latents = []
    with torch.no_grad():
        for rows in chunks():
            latents.append(diffusion.sample(models, cond[rows], uncond, w, T, eta, common.generator(cfg.seed, "ddpo", int(rows[0]))))
    lat = torch.cat([t.latents for t in latents])
    r = torch.cat([reward_fn(t.images, [texts[i] for i in rows]).float() for t, rows in zip(latents, chunks())])
    adv = PerPromptStatTracker(buffer_size=cfg.n, min_count=TOY.train.min_count).update(texts, r)  # as the first epoch
    per_step, norms, rows_out = [], [], []
    for k in range(T):
        for rows in chunks():
            lp = diffusion.step_log_prob(models, lat[rows, k], ts[k], lat[rows, k + 1], cond[rows], uncond,
                                         torch.full((len(rows),), w), eta, T)
            (-(adv[rows] * lp).sum() / cfg.n).backward()
        g = take_direction()
        per_step.append(g)
        norms.append(norm(g))
        print(f"  DDPO estimate from step {k} (t = {int(ts[k])}) alone: norm {norms[-1]:.3e}")
    directions["ddpo"] = [sum(gs) for gs in zip(*per_step)]
    half = T // 2  # the noisier half of the steps alone: without the steps whose estimates dominate the norm
    directions[f"ddpo, steps 1-{half}"] = [sum(gs) for gs in zip(*per_step[:half])]

    print("| direction | h | r(+h) | r(-h) | difference ± s.e. |\n|---|---|---|---|---|")
    for name, d in directions.items():
        size = norm(d)
        for h in cfg.steps:
            out = []
            for sign in (1, -1):
                with torch.no_grad():
                    for p, x in zip(params, d):
                        p.add_(sign * h * x / size)
                out.append(sample_rewards(eval_cond, eval_texts, "eval"))
                with torch.no_grad():
                    for p, x in zip(params, d):
                        p.sub_(sign * h * x / size)
            diff = out[0] - out[1]
            row = dict(direction=name, h=h, plus=out[0].mean().item(), minus=out[1].mean().item(),
                       diff=diff.mean().item(), sem=(diff.std() / cfg.n ** 0.5).item())
            rows_out.append(row)
            print(f"| {name} | {h} | {row['plus']:.3f} | {row['minus']:.3f} | {row['diff']:+.3f} ± {row['sem']:.3f} |", flush=True)
    return {"base": base, "step_norms": norms, "rows": rows_out}


if __name__ == "__main__":
    main(tyro.cli(Config))
