"""
DiffExp (Chae, Choi, Kim, Lee, AAAI 2025): exploration for reward fine-tuning. It changes only how
training samples are generated, with two strategies, each switchable alone:

(a) dynamic CFG schedule: guidance w_low at the early, noisy steps (t > t_thres), which diversifies
    layout and composition, then the ordinary w_high, which keeps quality and prompt fidelity;
(b) random prompt weighting: one phrase of each prompt is up-weighted by w ~ U(1, 1.2), drawn afresh
    for every sample.

Both are used only for the first `explore_until` (3/4) of fine-tuning. Evaluation never explores.
Everything here is a small pure function; all randomness comes from the torch.Generator passed in.
"""

from dataclasses import dataclass
from typing import Annotated

import torch
import tyro

from common import ConfigError


@dataclass(frozen=True)
class ExploreConfig:
    # master switch: --no-diffexp gives the baseline (plain prompts, fixed guidance scale)
    diffexp: Annotated[bool, tyro.conf.arg(prefix_name=False)] = True
    cfg_schedule: bool = True  # (a) dynamic CFG schedule on/off (ablation)
    t_thres: int = 800  # w_low at timesteps t > t_thres, on the 0..999 training scale (paper ablates 900/800/700)
    w_low: float = 1.0  # guidance at the noisy steps; 1.0 = conditional, unguided; 0.0 = unconditional
    prompt_weighting: bool = True  # (b) random prompt weighting on/off (ablation)
    weight_low: float = 1.0  # phrase weight w ~ U(weight_low, weight_high), per sample
    weight_high: float = 1.2
    rescale: bool = True  # rescale the weighted embedding to its unweighted mean (A1111 "emphasis")
    explore_until: float = 0.75  # fraction of the planned training after which exploration stops


def validate(cfg: ExploreConfig, w_high: float) -> None:
    """Fails at start-up, naming the flag, on settings that make no sense."""
    if not 0 <= cfg.t_thres < 1000:
        raise ConfigError(f"--explore.t-thres {cfg.t_thres}: must lie in [0, 1000) (the training timestep scale).")
    if cfg.w_low < 0:
        raise ConfigError(f"--explore.w-low {cfg.w_low}: must be >= 0.")
    if cfg.w_low > w_high:
        raise ConfigError(f"--explore.w-low {cfg.w_low} is above the guidance scale w_high {w_high}: "
                         "the early steps must be guided less, not more.")
    if cfg.weight_low <= 0 or cfg.weight_low > cfg.weight_high:
        raise ConfigError(f"--explore.weight-low {cfg.weight_low} / --explore.weight-high {cfg.weight_high}: "
                         "need 0 < weight_low <= weight_high.")
    if not 0 <= cfg.explore_until <= 1:
        raise ConfigError(f"--explore.explore-until {cfg.explore_until}: a fraction of training in [0, 1].")


def active(cfg: ExploreConfig, progress: float) -> tuple[bool, bool]:
    """(cfg schedule on, prompt weighting on) at training progress in [0, 1]."""
    on = cfg.diffexp and progress < cfg.explore_until
    return on and cfg.cfg_schedule, on and cfg.prompt_weighting


def exploring_epochs(cfg: ExploreConfig, num_epochs: int) -> int:
    """How many of the first epochs explore: those with progress epoch / num_epochs < explore_until, i.e.
    ceil(explore_until x num_epochs). Every epoch spends the same reward queries, so this is exactly
    explore_until of the queries when explore_until x num_epochs is a whole number (3/4: epochs divisible by 4)."""
    return sum(any(active(cfg, epoch / num_epochs)) for epoch in range(num_epochs))


def schedule_note(cfg: ExploreConfig, num_epochs: int) -> str:
    """One start-up line: which epochs explore, and the share of the reward queries that is."""
    k = exploring_epochs(cfg, num_epochs)
    if k == 0:
        return "exploration: off (the baseline)" if not cfg.diffexp else "exploration: no epoch explores"
    return (f"exploration: epochs 0-{k - 1}, {k} of {num_epochs} = {k / num_epochs:.1%} of the reward queries "
            f"(--explore.explore-until {cfg.explore_until:g})")


def guidance_scales(timesteps: torch.Tensor, batch_size: int, w_high: float, cfg: ExploreConfig, schedule_on: bool) -> torch.Tensor:
    """Per-sample, per-step guidance scales (B, T): w_low where t > t_thres, w_high elsewhere."""
    w = torch.full((len(timesteps),), float(w_high))
    if schedule_on:
        w = torch.where(timesteps.cpu() > cfg.t_thres, float(cfg.w_low), w)
    return w.expand(batch_size, -1).clone()  # (B, T)


def weight_prompts(hidden: torch.Tensor, positions: list[list[list[int]]], cfg: ExploreConfig, generator: torch.Generator,
                   tokens: int | None = None):
    """Random prompt weighting of the CONDITIONAL embeddings (the unconditional one is never weighted).
    hidden (B, 77, D); positions[b][k] = token positions of phrase k of prompt b; tokens: how many of hidden's
    rows are token states (the text encoder's context length, 77 for CLIP; None: all of them).
    Picks one phrase per sample uniformly, draws w ~ U(weight_low, weight_high), multiplies the hidden
    states at that phrase's positions by w, then (if cfg.rescale) rescales the sample's whole (77, D)
    embedding so its mean equals the unweighted mean.
    SDXL: hidden is (B, 78, D) with tokens = 77, both encoders' token states side by side on D, so both are
    weighted at the same positions; row 77 packs the pooled embedding (diffusion.pack_sdxl), which is no
    token: it is neither weighted nor part of the rescale, and is returned unchanged.
    Returns the weighted hidden states (B, 77 or 78, D), the chosen phrase index (B,) and the weights (B,)."""
    hidden, extra = hidden[:, :tokens], hidden[:, hidden.shape[1] if tokens is None else tokens:]
    B = hidden.shape[0]
    n_phrases = torch.tensor([len(p) for p in positions])
    phrase = (torch.rand(B, generator=generator) * n_phrases).long()  # uniform over each prompt's phrases
    weights = cfg.weight_low + (cfg.weight_high - cfg.weight_low) * torch.rand(B, generator=generator)
    multipliers = torch.ones(hidden.shape[:2])  # (B, 77)
    for b in range(B):
        multipliers[b, positions[b][phrase[b]]] = weights[b]
    out = hidden * multipliers.to(hidden)[..., None]
    if cfg.rescale:
        dims = tuple(range(1, hidden.ndim))
        old_mean, new_mean = hidden.mean(dims, keepdim=True), out.mean(dims, keepdim=True)
        # A mean that is ~0 (a final LayerNorm with zero bias gives exactly that) is already preserved
        # by any weighting, and dividing by it would only amplify rounding: leave such samples alone.
        safe = new_mean.abs() > 1e-3 * out.abs().mean(dims, keepdim=True)
        out = out * torch.where(safe, old_mean / new_mean, torch.ones_like(new_mean))
    return torch.cat([out, extra], dim=1), phrase, weights


def explore_batch(cfg: ExploreConfig, cond, positions, timesteps, w_high: float, progress: float, generator,
                  tokens: int | None = None):
    """Both strategies for one sampling batch at training progress in [0, 1] (tokens: as weight_prompts).
    -> conditional embeddings to sample with (B, 77 or 78, D), guidance scales (B, T): what the trainers
    sample with and DDPO stores with each sample."""
    schedule_on, weighting_on = active(cfg, progress)
    if weighting_on:
        cond = weight_prompts(cond, positions, cfg, generator, tokens)[0]
    return cond, guidance_scales(timesteps, cond.shape[0], w_high, cfg, schedule_on)
