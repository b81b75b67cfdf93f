"""
Flow-matching models (Stable Diffusion 3 / 3.5), the second model family beside diffusion.py's DDIM models:
loading (a hub id or local folder, or an offline tiny random model of the same architecture), prompt
encoding through the three text encoders, and one sampling loop that runs either the Euler ODE (equal to
diffusers' StableDiffusion3Pipeline) or, inside a window of steps, Flow-GRPO's SDE with its per-step
Gaussian log-prob, the likelihood that GRPO's ratio needs.

The model predicts a velocity v(x_t, t) along x_t = (1 - sigma) x_0 + sigma * noise; sigma runs from 1 (noise)
to 0 (data) over the scheduler's shifted schedule; the transformer sees t = 1000 sigma.
Sections: models | prompts | the ODE and SDE steps | sampling.
"""

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

import common
import diffusion
from common import ConfigError

SD35M_HUB_ID = "stabilityai/stable-diffusion-3.5-medium"
FLOW_MODEL_NAMES = ("tiny-sd3", "sd35m", "sd35m-random")  # --model also takes an SD3 / SD3.5 folder or hub id
CLIP_LENGTH = 77  # both CLIP encoders' context
# Tiny: SD3's architecture, small enough for a 2-core CPU (latents 4x16x16, images 32x32). The two CLIP
# encoders' penultimate states (32 + 32) are zero-padded to T5's width (32) as SD3 pads 768 + 1280 to 4096;
# their pooled projections (32 + 32) condition the transformer (pooled_projection_dim 64).
TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
TINY_VAE = dict(diffusion.TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE constants
TINY_CLIP = dict(diffusion.TINY_TEXT, hidden_act="gelu")
TINY_T5 = dict(vocab_size=49408, d_model=64, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
TINY_T5_LENGTH = 32  # the tiny model's T5 context (SD3.5: 256)
# Full-size SD3.5 Medium architecture (for speed / memory measurements with random weights, no download):
# the MMDiT-X transformer (24 joint blocks of 24 heads x 64, the first 13 with the second, image-only
# attention, RMS-normed queries and keys; 2.24 B parameters as built), SD3's 16-channel VAE and its three
# text encoders: CLIP ViT-L's text tower (diffusion.SD15_TEXT), OpenCLIP ViT-bigG's (diffusion.SDXL_TEXT_2),
# both with projections (768 + 1280 = the pooled 2048), and T5-v1.1-XXL's encoder (4.8 B; d_model 4096 = the
# joint attention width). Offline, CLIP's BPE stands in for T5's SentencePiece tokenizer here too, so the
# random T5's vocabulary is CLIP's 49,408 instead of 32,128 (69 M more embedding parameters, off the hot
# path: each prompt is encoded once).
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35M_VAE = dict(diffusion.SD15_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
                 shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
SD35M_T5 = dict(vocab_size=49408, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
SD35M_T5_LENGTH = 256
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5's FlowMatchEulerDiscreteScheduler
# LoRA on the MMDiT's joint attention: the image stream's projections and the text (context) stream's, as
# Flow-GRPO trains SD3.5; saved under the "transformer." prefix that StableDiffusion3Pipeline.load_lora_weights reads
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LORA_PREFIX = "transformer"


@dataclass
class FlowModels:
    """An SD3-style model: the MMDiT transformer, the VAE, CLIP-L, CLIP-G (both with projection) and T5."""
    transformer: nn.Module
    vae: nn.Module
    text_encoders: tuple  # (CLIP-L, CLIP-G, T5)
    tokenizers: tuple
    scheduler: object  # a diffusers FlowMatchEulerDiscreteScheduler: its shifted sigmas
    name: str
    t5_length: int = 256  # T5's padded length (max_sequence_length of the pipeline)
    resolution: int = 0  # image side in pixels; 0: the transformer's native sample size

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    @property
    def latent_shape(self):
        c = self.transformer.config.in_channels
        s = self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1) if self.resolution else \
            self.transformer.config.sample_size
        return (c, s, s)


def _random(name: str, transformer_cfg, vae_cfg, clip_l_cfg, clip_g_cfg, t5_cfg, t5_length: int,
            seed: int) -> FlowModels:
    """The architectures from configs with seeded random weights, touching no global RNG; CLIP's real BPE
    tokenizer (offline) also stands in for T5's SentencePiece tokenizer, which is not available offline
    (the architecture is T5's)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_cfg)
        vae = AutoencoderKL(**vae_cfg)
        encoders = (CLIPTextModelWithProjection(CLIPTextConfig(**clip_l_cfg)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**clip_g_cfg)), T5EncoderModel(T5Config(**t5_cfg)))
    tokenizers = (diffusion.build_clip_tokenizer(), diffusion.build_clip_tokenizer(pad_token="!"),
                  diffusion.build_clip_tokenizer())
    tokenizers[2].model_max_length = t5_length
    return FlowModels(transformer, vae, encoders, tokenizers, FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                      name, t5_length)


def _pretrained(source: str) -> FlowModels:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
    kw = dict(local_files_only=os.path.isdir(source) or not common.hub_reachable())
    try:
        transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
        encoders = (CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder", **kw),
                    CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kw),
                    T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", **kw))
        tokenizers = tuple(AutoTokenizer.from_pretrained(source, subfolder=f, **kw)
                           for f in ("tokenizer", "tokenizer_2", "tokenizer_3"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {source}: could not load an SD3 diffusers folder ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}): "
                          f"{common.OFFLINE_HINT.format(repo=source, flag='--model')}; --model tiny-sd3 is the "
                          "offline model.") from e
    return FlowModels(transformer, vae, encoders, tokenizers, scheduler, source)


def is_flow_model(name: str) -> bool:
    """Whether --model names a flow-matching model: one of FLOW_MODEL_NAMES, a folder with transformer/, or a
    hub id of Stable Diffusion 3 (the other names are diffusion.py's)."""
    if name in FLOW_MODEL_NAMES:
        return True
    if os.path.isdir(name):
        return os.path.isdir(os.path.join(name, "transformer"))
    return "stable-diffusion-3" in name.lower()


# the random models' configs: transformer, VAE, CLIP-L, CLIP-G, T5, and T5's context
RANDOM_ARCHITECTURES = {
    "tiny-sd3": (TINY_TRANSFORMER, TINY_VAE, TINY_CLIP, TINY_CLIP, TINY_T5, TINY_T5_LENGTH),
    "sd35m-random": (SD35M_TRANSFORMER, SD35M_VAE, diffusion.SD15_TEXT, diffusion.SDXL_TEXT_2, SD35M_T5,
                     SD35M_T5_LENGTH),
}


def load_flow_models(name: str = "tiny-sd3", device="cpu", dtype=torch.float32, seed: int = 0) -> FlowModels:
    """name: 'tiny-sd3' (offline, random), 'sd35m' (SD3.5 Medium from the hub), 'sd35m-random' (its full-size
    architecture with random weights, no download), a local diffusers folder or a hub id. Frozen weights on
    `device` in `dtype`, eval mode, requires_grad False (the VAE stays float32)."""
    if name in RANDOM_ARCHITECTURES:
        models = _random(name, *RANDOM_ARCHITECTURES[name], seed)
    elif name == "sd35m":
        models = _pretrained(SD35M_HUB_ID)
    elif os.path.isdir(name) or (name.count("/") == 1 and not name.startswith((".", "/"))):
        models = _pretrained(name)
    else:
        raise ConfigError(f"--model {name!r}: not a flow model name ({', '.join(FLOW_MODEL_NAMES)}), an existing "
                          "folder, or a hub id of the form owner/name.")
    for m in (models.transformer, *models.text_encoders, models.vae):
        m.to(device).eval().requires_grad_(False)
        target = torch.float32 if m is models.vae else dtype
        if next(m.parameters()).dtype != target:
            m.to(dtype=target)
    return models


# -----------------------------------------------------------------------------
# Prompts: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's states
# after them on the sequence axis; pooled: both CLIP projections side by side (StableDiffusion3Pipeline's
# encode_prompt).


@torch.no_grad()
def encode_text(models: FlowModels, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> (states (B, 77 + t5_length, D_t5), pooled (B, D_pooled)) on the models' device."""
    device, states, pooled = models.device, [], []
    for tokenizer, encoder in zip(models.tokenizers[:2], models.text_encoders[:2]):
        ids = tokenizer(texts, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    ids = models.tokenizers[2](texts, padding="max_length", max_length=models.t5_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids.to(device)
    t5 = models.text_encoders[2](ids)[0]
    clip = torch.cat(states, dim=-1)
    clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


# -----------------------------------------------------------------------------
# The ODE and SDE steps


def schedule(models: FlowModels, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's shifted schedule on the host: the transformer's timesteps (T,) = 1000 sigma, and
    sigmas (T + 1,) float32, from sigma_0 = 1 (noise) to sigma_T = 0."""
    models.scheduler.set_timesteps(num_steps, device="cpu")
    return models.scheduler.timesteps.cpu(), models.scheduler.sigmas.float().cpu()


def sd_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The Stable Diffusion v1.5 timestep (0..999) with the same signal-to-noise ratio as each flow sigma:
    x = (1 - sigma) x_0 + sigma eps has SNR (1 - sigma)^2 / sigma^2, DDPM's x_t has alpha_bar / (1 - alpha_bar),
    so alpha_bar = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2); the nearest of SD v1.5's alpha_bar. DiffExp's
    t_thres (on that scale, as the paper gives it) then applies to a flow schedule unchanged:
    explore.guidance_scales(sd_timesteps(sigmas[:-1]), ...)."""
    from diffusers import DDIMScheduler
    alphas = DDIMScheduler(**diffusion.SD15_SCHEDULER).alphas_cumprod.double()
    s = sigmas.double()
    target = (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)
    return (alphas[None, :] - target[:, None]).abs().argmin(dim=1)


def sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_max: float, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's per-step std of the rollout SDE: a sqrt(sigma / (1 - sigma)) sqrt(sigma - sigma_next),
    with sigma = 1 (the first step) replaced by sigma_max (the schedule's second sigma) inside the root."""
    safe = torch.where(sigma >= 1, torch.as_tensor(sigma_max, dtype=sigma.dtype), sigma)
    return noise_level * (sigma / (1 - safe)).sqrt() * (sigma - sigma_next).sqrt()


def flow_step(v, x, sigma, sigma_next, std=None, x_next=None, generator=None):
    """One step x(sigma) -> x(sigma_next) given the (guided) velocity v, all (B, C, h, w) in float32; sigma,
    sigma_next: (B,) or floats. std None or 0: the Euler ODE step x + (sigma_next - sigma) v (the scheduler's),
    log-prob 0. Else Flow-GRPO's SDE step (the ODE's marginals, with noise of std `std`, (B,)): mean
    x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt with dt = sigma_next - sigma and
    s = std / sqrt(-dt), then x_next = mean + std z; with x_next given, re-scores it. -> x_next, log_prob (B,):
    the Gaussian log-density averaged over the latent's elements (the same convention as diffusion.ddim_step)."""
    v, x = v.float(), x.float()
    B, shape = x.shape[0], (-1,) + (1,) * (x.ndim - 1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B).view(shape)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device).expand(B).view(shape)
    dt = sigma_next - sigma
    if std is None or torch.as_tensor(std).max() == 0:
        return x + dt * v, torch.zeros(B, device=x.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).expand(B).view(shape)
    mean = sde_mean(v, x, sigma, sigma_next, std)
    if x_next is None:
        z = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu")
        x_next = mean + std * z.to(x.device)
    x_next = x_next.float()
    log_prob = -((x_next.detach() - mean) ** 2) / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    return x_next, log_prob.mean(dim=tuple(range(1, x.ndim)))


def sde_mean(v, x, sigma, sigma_next, std):
    """The mean of Flow-GRPO's SDE step (see flow_step); sigma, sigma_next, std broadcast against x."""
    dt = sigma_next - sigma
    s2 = std ** 2 / (-dt)  # the SDE's diffusion coefficient squared
    return x * (1 + s2 / (2 * sigma) * dt) + v * (1 + s2 * (1 - sigma) / (2 * sigma)) * dt


def kl_same_std(mean, mean_ref, std) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per element, averaged over each sample's elements (B,): the
    per-step KL to a reference policy, which shares the step's std (Flow-GRPO's KL penalty). std: (B,) or a float."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).reshape(-1, *(1,) * (mean.ndim - 1))
    return ((mean - mean_ref) ** 2 / (2 * std ** 2)).mean(dim=tuple(range(1, mean.ndim)))


def guided_velocity(transformer, x, t, cond, pooled, uncond, pooled_uncond, w):
    """v_uncond + w (v_cond - v_uncond) per sample (w (B,)), batched as StableDiffusion3Pipeline batches it:
    one call on [uncond; cond], or on cond alone when every w is 1 (guidance off). t: the timestep (a 0-d
    tensor, 1000 sigma); cond (B, L, D), pooled (B, P); uncond / pooled_uncond (1, ...) or (B, ...)."""
    B, dtype = x.shape[0], next(transformer.parameters()).dtype
    guided = bool((w != 1).any())
    x_in = torch.cat([x, x]) if guided else x
    states = torch.cat([uncond.expand(B, -1, -1), cond]) if guided else cond
    pooled_in = torch.cat([pooled_uncond.expand(B, -1), pooled]) if guided else pooled
    v = transformer(hidden_states=x_in.to(dtype), timestep=t.to(x.device).expand(x_in.shape[0]),
                    encoder_hidden_states=states.to(dtype), pooled_projections=pooled_in.to(dtype),
                    return_dict=False)[0].float()
    if not guided:
        return v
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + w.to(v).view(-1, 1, 1, 1) * (v_cond - v_uncond)


@dataclass
class FlowTrajectory:
    latents: torch.Tensor  # (B, T + 1, C, h, w): x at sigma_0 = 1 ... sigma_T = 0
    log_probs: torch.Tensor  # (B, T): the SDE steps' log-probs (0 at ODE steps)
    sigmas: torch.Tensor  # (T + 1,)
    images: torch.Tensor | None  # (B, 3, H, W) in [0, 1]


def sample(models: FlowModels, cond, pooled, uncond, pooled_uncond, guidance, num_steps: int,
           generator: torch.Generator, noise_level: float = 0.0, sde_steps: tuple[int, int] | None = None,
           x_T: torch.Tensor | None = None, decode: bool = True) -> FlowTrajectory:
    """Samples B images: guidance (B, T) per-sample, per-step CFG scales; noise_level a > 0 runs the SDE at the
    steps in [sde_steps[0], sde_steps[1]) (default: all), the ODE elsewhere. x_T: the initial noise (B, C, h, w),
    else drawn from `generator` first, then each SDE step's noise in order."""
    B, device = cond.shape[0], models.device
    ts, s = schedule(models, num_steps)
    if x_T is None:
        x_T = torch.randn((B, *models.latent_shape), generator=generator, device=generator.device)
    x, latents, log_probs = x_T.to(device).float(), [x_T.to(device).float()], []
    first, stop = sde_steps or (0, num_steps)
    for i in range(num_steps):
        v = guided_velocity(models.transformer, x, ts[i], cond, pooled, uncond, pooled_uncond, guidance[:, i])
        std = sde_std(s[i], s[i + 1], s[1].item(), noise_level) if noise_level > 0 and first <= i < stop else None
        x, lp = flow_step(v, x, s[i], s[i + 1], std, generator=generator)
        latents.append(x)
        log_probs.append(lp)
    images = decode_latents(models, x) if decode else None
    return FlowTrajectory(torch.stack(latents, 1), torch.stack(log_probs, 1), s, images)


def decode_latents(models: FlowModels, x0: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1]: x / scaling_factor + shift_factor through the VAE (the pipeline's)."""
    cfg = models.vae.config
    z = x0.float() / cfg.scaling_factor + cfg.shift_factor
    return (models.vae.decode(z.to(next(models.vae.parameters()).dtype)).sample.float() / 2 + 0.5).clamp(0, 1)
