"""
Shared diffusion code for both trainers (the equivalent of nanoGPT's model.py).

    models = load_models("tiny")                         # or "sd15", "sd15-random", a local folder
    prompts = load_prompts("animals")                    # list[Prompt(text, phrases)]
    cond, positions = encode_prompts(models, prompts)    # (B, 77, D), phrase token positions
    traj = sample(models, cond, uncond, guidance, num_steps=50, eta=1.0, generator=g)

Sections: model loading | prompt sets | prompt encoding | the DDIM step with log-prob | sampling.
The same code runs on real Stable Diffusion weights and on the tiny offline model; only sizes and
weights differ.
"""

import csv
import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

# -----------------------------------------------------------------------------
# Model loading

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_NAMES = ("tiny", "sd15", "sd15-random")  # or any local diffusers folder / hub id
PROMPT_LENGTH = 77  # CLIP's context length, padded to it as Stable Diffusion does

# Stable Diffusion v1.5's scheduler config (scheduler/scheduler_config.json of the hub repo).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
# Full-size SD v1.5 architecture (for speed / memory measurements with random weights).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
# Tiny: the same architectures, small enough for a 2-core CPU. Latents 4x16x16, images 32x32.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32, norm_num_groups=8,
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
TINY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


@dataclass
class Models:
    """Everything a text-to-image diffusion model needs. vae is None for a pixel-space model."""
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object  # a diffusers DDIMScheduler: we read its alphas_cumprod and timesteps
    vae: nn.Module | None
    name: str

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self):  # (C, h, w) of the sampled tensor x_T
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        return (c, s, s)

    @property
    def image_size(self):
        s = self.unet.config.sample_size
        return s if self.vae is None else s * 2 ** (len(self.vae.config.block_out_channels) - 1)


@lru_cache(maxsize=None)
def _clip_tokenizer_folder():
    """vocab.json + merges.txt of CLIP's BPE, written once per process from the vocabulary file that
    open_clip_torch ships in its package, so the tokenizer needs no network. The construction follows
    CLIP's own tokenizer: 256 byte symbols, the same with the end-of-word mark, the merges, 2 specials."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tempfile.mkdtemp(prefix="clip_tokenizer_")
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_clip_tokenizer():
    """The real CLIP BPE tokenizer (same ids as SD v1.5's, pad = <|endoftext|> = 49407), offline."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(
        _clip_tokenizer_folder(), model_max_length=PROMPT_LENGTH, pad_token="<|endoftext|>",
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )


def _random_models(name, unet_cfg, vae_cfg, text_cfg, seed):
    """Builds the architectures from configs with seeded random weights, touching no global RNG."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return Models(unet, text_encoder, build_clip_tokenizer(), DDIMScheduler(**SD15_SCHEDULER), vae, name)


def _pretrained_models(source):
    """Loads a diffusers folder (local or hub). A folder without vae/ is a pixel-space model."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    is_local = os.path.isdir(source)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
        has_vae = os.path.isdir(os.path.join(source, "vae")) if is_local else True
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae") if has_vae else None
    except (OSError, ValueError) as e:
        if is_local:
            raise RuntimeError(f"--model {source}: could not load the diffusers folder ({e}). It needs "
                               "unet/, text_encoder/, tokenizer/, scheduler/ and (latent models) vae/.") from e
        raise RuntimeError(
            f"--model {source}: could not download '{source}' from the Hugging Face hub ({type(e).__name__}). "
            "If this machine is offline, download the model elsewhere (e.g. `huggingface-cli download "
            f"{source} --local-dir DIR`) and pass --model DIR, or use --model tiny for the offline model.") from e
    return Models(unet, text_encoder, tokenizer, scheduler, vae, source)


def load_models(name: str = "tiny", device="cpu", dtype=torch.float32, seed: int = 0) -> Models:
    """name: 'tiny' (offline, random), 'sd15' (hub weights), 'sd15-random' (full-size SD v1.5
    architecture with random weights, no download), a local diffusers folder, or a hub id.
    Frozen weights are put on `device` in `dtype`, in eval mode, with requires_grad False."""
    if name == "tiny":
        models = _random_models(name, TINY_UNET, TINY_VAE, TINY_TEXT, seed)
    elif name == "sd15-random":
        models = _random_models(name, SD15_UNET, SD15_VAE, SD15_TEXT, seed)
    elif name == "sd15":
        models = _pretrained_models(SD15_HUB_ID)
    elif name.startswith("sdxl"):
        raise NotImplementedError("--model sdxl: SDXL support is not implemented yet.")
    elif os.path.isdir(name) or (name.count("/") == 1 and not name.startswith((".", "/"))):
        models = _pretrained_models(name)  # a local folder, or something that looks like a hub id
    else:
        raise ValueError(f"--model {name!r}: not a known model name ({', '.join(MODEL_NAMES)}), not an existing "
                         "folder, and not a hub id of the form owner/name.")
    for m in (models.unet, models.text_encoder, models.vae):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
            if next(m.parameters()).dtype != dtype:
                m.to(dtype=dtype)
    return models


# -----------------------------------------------------------------------------
# Prompt sets. A prompt has phrases: the parts random prompt weighting may up-weight.

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
PROMPT_SETS = ("animals", "animal-activities", "unseen-animals", "drawbench")  # or a .txt / .csv file
STOPWORDS = set("a an the of on in at to and or with is are was its it his her their by for from as into "
                "over under near next that this which who be".split())


@dataclass(frozen=True)
class Prompt:
    text: str
    phrases: tuple[str, ...]


def _read_lines(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: prompt file {path} does not exist.")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{what}: prompt file {path} is empty; it needs one prompt per line.")
    return lines


def parse_marked(line: str) -> Prompt:
    """'a [red] [circle]' -> Prompt('a red circle', ('red', 'circle')). Unmarked text: its content words."""
    phrases, text, rest = [], "", line
    while "[" in rest:
        before, _, rest = rest.partition("[")
        phrase, closed, rest = rest.partition("]")
        if not closed:
            raise ValueError(f"unbalanced '[' in prompt {line!r}")
        text, phrases = text + before + phrase, phrases + [phrase.strip()]
    text += rest
    if not phrases:
        phrases = [w.strip(".,;:!?\"'()") for w in text.split()]
        phrases = [w for w in phrases if w and w.lower() not in STOPWORDS] or [text]
    return Prompt(text.strip(), tuple(phrases))


def load_prompts(spec: str = "animals") -> list[Prompt]:
    """spec: 'animals' (45, prompt = the animal's name as in DDPO), 'animal-activities' (135: 'a cat
    riding a bike', phrases [animal, activity]), 'unseen-animals', 'drawbench' or 'drawbench:Colors,Counting'
    (categories), or a path: .txt with one prompt per line ([brackets] mark phrases) or a .csv with a
    'Prompts' column (and optional 'Category')."""
    name, _, categories = spec.partition(":")
    if name in ("animals", "unseen-animals"):
        animals = _read_lines(os.path.join(PROMPTS_DIR, name.replace("-", "_") + ".txt"), f"--prompts {spec}")
        return [Prompt(a, (a,)) for a in animals]
    if name == "animal-activities":
        animals = _read_lines(os.path.join(PROMPTS_DIR, "animals.txt"), f"--prompts {spec}")
        activities = _read_lines(os.path.join(PROMPTS_DIR, "activities.txt"), f"--prompts {spec}")
        return [Prompt(f"{'an' if a[0] in 'aeiou' else 'a'} {a} {act}", (a, act)) for a in animals for act in activities]
    path = os.path.join(PROMPTS_DIR, "drawbench.csv") if name == "drawbench" else name
    if path.endswith(".csv"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--prompts {spec}: prompt file {path} does not exist.")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        wanted = {c.strip().lower() for c in categories.split(",") if c.strip()}
        rows = [r for r in rows if not wanted or r.get("Category", "").lower() in wanted]
        if not rows:
            raise ValueError(f"--prompts {spec}: no prompts in {path}"
                             + (f" for categories {sorted(wanted)}" if wanted else "") + ".")
        return [parse_marked(r["Prompts"]) for r in rows]
    ext = os.path.splitext(path)[1]
    if ext == ".txt" or (ext == "" and (os.path.sep in path or os.path.isfile(path))):  # a missing .txt: say so
        return [parse_marked(line) for line in _read_lines(path, f"--prompts {spec}")]
    raise ValueError(f"--prompts {spec!r}: not a prompt set ({', '.join(PROMPT_SETS)}) nor a .txt/.csv file.")


# -----------------------------------------------------------------------------
# Prompt encoding

def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=PROMPT_LENGTH, truncation=True,
                     return_tensors="pt").input_ids  # (B, 77)


def phrase_positions(tokenizer, prompt: Prompt) -> list[list[int]]:
    """For each phrase, its token positions in the prompt's 77 ids (first occurrence as a token run)."""
    ids = tokenize(tokenizer, [prompt.text])[0].tolist()
    out = []
    for phrase in prompt.phrases:
        sub = tokenizer(phrase, add_special_tokens=False).input_ids
        starts = [i for i in range(len(ids) - len(sub) + 1) if sub and ids[i:i + len(sub)] == sub]
        if not starts:
            raise ValueError(f"phrase {phrase!r} is not a token run of prompt {prompt.text!r} (or was truncated).")
        out.append(list(range(starts[0], starts[0] + len(sub))))
    return out


@torch.no_grad()
def encode_text(models: Models, texts: list[str]) -> torch.Tensor:
    ids = tokenize(models.tokenizer, texts).to(models.device)
    return models.text_encoder(ids)[0]  # (B, 77, D) last hidden states, as Stable Diffusion uses them


def encode_prompts(models: Models, prompts: list[Prompt]):
    """-> hidden states (B, 77, D) and, per prompt, per phrase, its token positions."""
    positions = [phrase_positions(models.tokenizer, p) for p in prompts]
    return encode_text(models, [p.text for p in prompts]), positions


class PromptEncoder:
    """encode_prompts with a cache: the text encoder is frozen, so each distinct prompt is encoded once."""

    def __init__(self, models: Models):
        self.models, self.cache = models, {}

    def __call__(self, prompts: list[Prompt]):
        new = list({p: None for p in prompts if p not in self.cache})
        if new:
            hidden, positions = encode_prompts(self.models, new)
            self.cache.update({p: (h, pos) for p, h, pos in zip(new, hidden, positions)})
        return torch.stack([self.cache[p][0] for p in prompts]), [self.cache[p][1] for p in prompts]


# -----------------------------------------------------------------------------
# The DDIM step with log-prob (Song et al. 2021, "Denoising Diffusion Implicit Models"; as in the
# DDPO reference implementation, whose clip_range values depend on these exact conventions).

def ddim_step(scheduler, eps, t, x_t, eta: float, num_steps: int, x_prev=None, generator=None):
    """One DDIM step x_t -> x_prev with its Gaussian log-prob.
    eps: guided noise prediction (B, C, h, w); t: timestep, int or (B,) tensor (samples may sit at
    different timesteps when DDPO re-scores shuffled transitions). With x_prev given, re-scores it
    instead of sampling. Returns x_prev (B, C, h, w) and log_prob (B,) (zeros when eta = 0)."""
    eps, x_t = eps.float(), x_t.float()
    B = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).long().expand(B)
    prev_t = t - scheduler.config.num_train_timesteps // num_steps
    alphas = scheduler.alphas_cumprod.to(x_t.device)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas.dtype, device=x_t.device)
    a_t = alphas[t].view(B, 1, 1, 1)
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final).view(B, 1, 1, 1)
    x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # eq. (12), "predicted x_0"
    if scheduler.config.clip_sample:  # pixel-space models (the toy world): x_0 lies in [-r, r], as DDPM samples
        r = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-r, r)
        eps = (x_t - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()  # the noise consistent with the clipped x_0
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # eq. (16), sigma_t^2 at eta = 1
    std = eta * var.sqrt()
    mean = a_prev.sqrt() * x0_hat + (1 - a_prev - std ** 2).sqrt() * eps  # eq. (12), "direction to x_t"
    if x_prev is None and eta == 0:
        x_prev = mean  # deterministic: no noise drawn, so the generator's state does not move
    elif x_prev is None:
        z = torch.randn(x_t.shape, generator=generator, device=generator.device if generator else "cpu")
        x_prev = mean + std * z.to(x_t.device)
    x_prev = x_prev.float()
    if eta == 0:
        return x_prev, torch.zeros(B, device=x_t.device)
    # Gaussian log-density per element, reduced by the MEAN over latent dims (not the sum): this is
    # the DDPO reference's convention and why its PPO clip_range is as small as 1e-4.
    log_prob = -((x_prev.detach() - mean) ** 2) / (2 * std ** 2) - std.log() - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    return x_prev, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


# -----------------------------------------------------------------------------
# Sampling: DDIM with eta and per-sample, per-step classifier-free guidance.

def timesteps(models: Models, num_steps: int) -> torch.Tensor:
    models.scheduler.set_timesteps(num_steps)
    return models.scheduler.timesteps.clone()  # (T,) descending, e.g. 981, 961, ..., 1 for SD and T=50


def guided_eps(unet, x, t, cond, uncond, w):
    """eps_uncond + w * (eps_cond - eps_uncond), cond and uncond in ONE batched UNet call.
    x (B, C, h, w); t int or (B,); cond (B, 77, D), uncond (B or 1, 77, D); w (B,) guidance scales."""
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device).expand(B)
    dtype = next(unet.parameters()).dtype
    emb = torch.cat([uncond.expand(B, -1, -1), cond]).to(dtype)
    out = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]), encoder_hidden_states=emb).sample
    eps_uncond, eps_cond = out.float().chunk(2)
    return eps_uncond + w.view(B, 1, 1, 1).float() * (eps_cond - eps_uncond)


def step_log_prob(models: Models, x_t, t, x_prev, cond, uncond, w, eta: float, num_steps: int):
    """Re-scores stored transitions x_t -> x_prev under the current UNet (DDPO's training pass)."""
    eps = guided_eps(models.unet, x_t, t, cond, uncond, w)
    return ddim_step(models.scheduler, eps, t, x_t, eta, num_steps, x_prev=x_prev)[1]


def decode(models: Models, x0: torch.Tensor) -> torch.Tensor:
    """Final sample -> images in [0, 1], (B, 3, H, W), float32."""
    if models.vae is not None:
        x0 = models.vae.decode(x0.to(models.dtype) / models.vae.config.scaling_factor).sample
    return (x0.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class Trajectory:
    latents: torch.Tensor    # (B, T+1, C, h, w): x_T, ..., x_0
    log_probs: torch.Tensor  # (B, T): log p(x_{t-1} | x_t) of each step taken
    timesteps: torch.Tensor  # (T,)
    images: torch.Tensor     # (B, 3, H, W) in [0, 1]
    grad_from: int           # index of the first step run with gradient (T when none)


def sample(models: Models, cond, uncond, guidance, num_steps: int, eta: float, generator: torch.Generator,
           grad_last_k: int = 0, checkpointing: bool = True, decode_images: bool = True, progress=None) -> Trajectory:
    """Samples B images. cond (B, 77, D) prompt embeddings (already weighted if exploring); uncond
    (B or 1, 77, D); guidance: a float or (B, T) per-sample, per-step scales (fixed CFG and DiffExp's
    schedule are the same code). Noise comes from `generator` (drawn on its device, then moved).
    grad_last_k = 0: no gradients at all (DDPO sampling). grad_last_k = K: the last K UNet calls and
    the decode run with gradients (AlignProp), each under gradient checkpointing if `checkpointing`;
    the earlier steps run under no_grad, so their UNet outputs carry no gradient."""
    B, device = cond.shape[0], models.device
    ts = timesteps(models, num_steps)
    T = len(ts)
    w = torch.as_tensor(guidance, dtype=torch.float32, device=device)
    if w.ndim == 0:
        w = w.expand(B, T)  # fixed CFG
    if w.shape != (B, T):
        raise ValueError(f"guidance must be a float or a (B, T) = ({B}, {T}) tensor, got shape {tuple(w.shape)}")
    gen_device = generator.device if generator is not None else "cpu"
    x = torch.randn((B, *models.latent_shape), generator=generator, device=gen_device).to(device) * models.scheduler.init_noise_sigma
    grad_from = T - grad_last_k
    latents, log_probs = [x], []
    for i, t in enumerate(progress(ts) if progress else ts):
        with torch.set_grad_enabled(i >= grad_from):
            if i >= grad_from and checkpointing:
                eps = grad_checkpoint(guided_eps, models.unet, x, t, cond, uncond, w[:, i], use_reentrant=False)
            else:
                eps = guided_eps(models.unet, x, t, cond, uncond, w[:, i])
            x, log_prob = ddim_step(models.scheduler, eps, t, x, eta, num_steps, generator=generator)
        latents.append(x)
        log_probs.append(log_prob.detach())
    images = None
    if decode_images:
        with torch.set_grad_enabled(grad_last_k > 0):
            images = grad_checkpoint(decode, models, x, use_reentrant=False) if grad_last_k and checkpointing else decode(models, x)
    return Trajectory(torch.stack(latents, 1), torch.stack(log_probs, 1), ts, images, grad_from)
