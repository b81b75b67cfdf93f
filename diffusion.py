"""
Shared diffusion code for both trainers (the equivalent of nanoGPT's model.py).

    models = load_models("tiny")                         # or "sd15", "sdxl", "tiny-sdxl", a local folder, ...
    prompts = load_prompts("animals")                    # list[Prompt(text, phrases)]
    cond, positions = encode_prompts(models, prompts)    # (B, 77, D) (SDXL: (B, 78, D)), phrase token positions
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

import common
from common import ConfigError

# -----------------------------------------------------------------------------
# Model loading

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
MODEL_NAMES = ("tiny", "sd15", "sd15-random", "tiny-sdxl", "sdxl", "sdxl-random")  # or a local diffusers folder / hub id
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
# Full-size SDXL base architecture (stabilityai/stable-diffusion-xl-base-1.0's configs). Two text
# encoders: CLIP ViT-L's text tower (as SD v1.5's) and OpenCLIP ViT-bigG's (with its projection, whose
# pooled output conditions the UNet), their states concatenated: 768 + 1280 = cross_attention_dim 2048.
# addition_embed_type "text_time": the UNet also takes the pooled embedding (1280) and 6 size / crop
# "micro-conditioning" numbers, each embedded in 256 dims: 1280 + 6 * 256 = 2816.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # overflows in float16
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)
# Tiny SDXL: the same architecture family at the tiny size (latents 4x16x16, images 32x32); two 32-wide
# text encoders (cross_attention_dim 64), pooled projection 32, 8-dim time embeddings: 32 + 6 * 8 = 80.
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)
TINY_SDXL_TEXT_2 = dict(TINY_TEXT, hidden_act="gelu", pad_token_id=0)


@dataclass
class Models:
    """Everything a text-to-image diffusion model needs. vae is None for a pixel-space model;
    text_encoder_2 and tokenizer_2 are SDXL's second text encoder (None for SD v1.5-style models)."""
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object  # a diffusers DDIMScheduler: we read its alphas_cumprod and timesteps
    vae: nn.Module | None
    name: str
    text_encoder_2: nn.Module | None = None
    tokenizer_2: object = None

    @property
    def is_sdxl(self):
        return self.text_encoder_2 is not None

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


def build_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer, offline. pad_token: SD v1.5's and SDXL's first tokenizer pad with
    <|endoftext|> (49407), SDXL's second with "!" (id 0); the ids of the prompt itself are the same."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(
        _clip_tokenizer_folder(), model_max_length=PROMPT_LENGTH, pad_token=pad_token,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )


def _random_models(name, unet_cfg, vae_cfg, text_cfg, seed, text_2_cfg=None):
    """Builds the architectures from configs with seeded random weights, touching no global RNG.
    text_2_cfg: SDXL's second text encoder (a CLIPTextModelWithProjection)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2_cfg)) if text_2_cfg else None
    tokenizer_2 = build_clip_tokenizer(pad_token="!") if text_2_cfg else None
    # SDXL base's scheduler config has the same betas, offset and spacing as SD v1.5's
    return Models(unet, text_encoder, build_clip_tokenizer(), DDIMScheduler(**SD15_SCHEDULER), vae, name,
                  text_encoder_2, tokenizer_2)


def _pretrained_models(source, flag=None):
    """Loads a diffusers folder (local or hub). A folder without vae/ is a pixel-space model; a model
    whose UNet takes SDXL's "text_time" conditioning (an SDXL folder, with text_encoder_2/) loads as SDXL."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # its "Loading weights" bar in every run's log (downloads keep theirs)
    is_local, flag = os.path.isdir(source), flag or source

    def load(local_files_only: bool) -> Models:
        kw = dict(local_files_only=local_files_only)
        text_encoder_2 = tokenizer_2 = None
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        if unet.config.addition_embed_type == "text_time":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kw)
            tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kw)  # SDXL ships Euler's: same betas
        has_vae = os.path.isdir(os.path.join(source, "vae")) if is_local else True
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw) if has_vae else None
        return Models(unet, text_encoder, tokenizer, scheduler, vae, source, text_encoder_2, tokenizer_2)

    offline = "--model tiny (--model tiny-sdxl) is the offline model"
    if is_local:
        try:
            return load(True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model {flag}: could not load the diffusers folder ({e}). It needs unet/, "
                              "text_encoder/, tokenizer/, scheduler/, (latent models) vae/ and (SDXL) "
                              "text_encoder_2/ and tokenizer_2/.") from e
    try:
        return load(True)  # already in the Hugging Face cache: no network needed
    except (OSError, ValueError):
        pass
    if not common.hub_reachable():
        raise ConfigError(f"--model {flag}: '{source}' is not in the local Hugging Face cache and the hub cannot be "
                          f"reached (offline, or HF_HUB_OFFLINE is set): "
                          f"{common.OFFLINE_HINT.format(repo=source, flag='--model')}; {offline}.")
    try:
        return load(False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {flag}: could not download '{source}' from the Hugging Face hub "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"{common.OFFLINE_HINT.format(repo=source, flag='--model')}; {offline}.") from e


def load_models(name: str = "tiny", device="cpu", dtype=torch.float32, seed: int = 0) -> Models:
    """name: 'tiny' (offline, random), 'sd15' (hub weights), 'sd15-random' (full-size SD v1.5
    architecture with random weights, no download), 'tiny-sdxl', 'sdxl', 'sdxl-random' (the same for
    SDXL base), a local diffusers folder, or a hub id.
    Frozen weights are put on `device` in `dtype`, in eval mode, with requires_grad False; except that a
    VAE whose config sets force_upcast (SDXL's, whose activations overflow float16) stays in float32
    when `dtype` is float16, as diffusers' SDXL pipeline upcasts it (see `decode`)."""
    if name == "tiny":
        models = _random_models(name, TINY_UNET, TINY_VAE, TINY_TEXT, seed)
    elif name == "sd15-random":
        models = _random_models(name, SD15_UNET, SD15_VAE, SD15_TEXT, seed)
    elif name == "sd15":
        models = _pretrained_models(SD15_HUB_ID)
    elif name == "tiny-sdxl":
        models = _random_models(name, TINY_SDXL_UNET, TINY_SDXL_VAE, TINY_TEXT, seed, TINY_SDXL_TEXT_2)
    elif name == "sdxl-random":
        models = _random_models(name, SDXL_UNET, SDXL_VAE, SD15_TEXT, seed, SDXL_TEXT_2)
    elif name == "sdxl":
        models = _pretrained_models(SDXL_HUB_ID, flag="sdxl")
    elif os.path.isdir(name) or (name.count("/") == 1 and not name.startswith((".", "/"))):
        models = _pretrained_models(name)  # a local folder, or something that looks like a hub id
    else:
        raise ConfigError(f"--model {name!r}: not a known model name ({', '.join(MODEL_NAMES)}), not an existing "
                         "folder, and not a hub id of the form owner/name.")
    for m in (models.unet, models.text_encoder, models.text_encoder_2, models.vae):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
            upcast = m is models.vae and dtype == torch.float16 and m.config.get("force_upcast", False)
            target = torch.float32 if upcast else dtype
            if next(m.parameters()).dtype != target:
                m.to(dtype=target)
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
        raise ConfigError(f"{what}: prompt file {path} does not exist.")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not lines:
        raise ConfigError(f"{what}: prompt file {path} is empty; it needs one prompt per line.")
    return lines


def parse_marked(line: str) -> Prompt:
    """'a [red] [circle]' -> Prompt('a red circle', ('red', 'circle')). Unmarked text: its content words."""
    phrases, text, rest = [], "", line
    while "[" in rest:
        before, _, rest = rest.partition("[")
        phrase, closed, rest = rest.partition("]")
        if not closed:
            raise ConfigError(f"unbalanced '[' in prompt {line!r}")
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
            raise ConfigError(f"--prompts {spec}: prompt file {path} does not exist.")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        wanted = {c.strip().lower() for c in categories.split(",") if c.strip()}
        rows = [r for r in rows if not wanted or r.get("Category", "").lower() in wanted]
        if not rows:
            raise ConfigError(f"--prompts {spec}: no prompts in {path}"
                             + (f" for categories {sorted(wanted)}" if wanted else "") + ".")
        return [parse_marked(r["Prompts"]) for r in rows]
    ext = os.path.splitext(path)[1]
    if ext == ".txt" or (ext == "" and (os.path.sep in path or os.path.isfile(path))):  # a missing .txt: say so
        return [parse_marked(line) for line in _read_lines(path, f"--prompts {spec}")]
    raise ConfigError(f"--prompts {spec!r}: not a prompt set ({', '.join(PROMPT_SETS)}) nor a .txt/.csv file.")


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
            raise ConfigError(f"phrase {phrase!r} is not a token run of prompt {prompt.text!r} (or was truncated).")
        out.append(list(range(starts[0], starts[0] + len(sub))))
    return out


@torch.no_grad()
def encode_text(models: Models, texts: list[str]) -> torch.Tensor:
    """-> (B, 77, D): the text encoder's last hidden states, as Stable Diffusion v1.5 uses them; for SDXL
    (B, 78, D): the token states of both encoders and the pooled embedding, packed (see pack_sdxl)."""
    ids = tokenize(models.tokenizer, texts).to(models.device)
    if not models.is_sdxl:
        return models.text_encoder(ids)[0]
    # As diffusers' StableDiffusionXLPipeline.encode_prompt: the PENULTIMATE hidden states of both encoders,
    # concatenated on the feature dim (768 + 1280), and encoder 2's projected pooled output (1280).
    ids_2 = tokenize(models.tokenizer_2, texts).to(models.device)
    out_1 = models.text_encoder(ids, output_hidden_states=True)
    out_2 = models.text_encoder_2(ids_2, output_hidden_states=True)
    hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, 77, D)
    pooled = out_2.text_embeds  # (B, P)
    # SDXL base sets force_zeros_for_empty_prompt: its unconditional embedding is all zeros, not the
    # encoding of "" (the micro-conditioning stays, as the pipeline gives both halves the same time ids)
    empty = torch.tensor([t == "" for t in texts], device=hidden.device)
    hidden, pooled = hidden.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
    return pack_sdxl(hidden, pooled, sdxl_time_ids(models.image_size, len(texts)).to(hidden))


def encode_prompts(models: Models, prompts: list[Prompt]):
    """-> hidden states (B, 77, D) (SDXL: (B, 78, D)) and, per prompt, per phrase, its token positions.
    For SDXL the positions come from the first tokenizer: both give the same ids up to the padding, and
    the two encoders' states sit side by side on the feature dim, so weighting a position weights both.
    One exception, checked: SDXL's second tokenizer (as shipped, and as diffusers uses it) reads "!" as
    its pad token, so "!!" becomes two tokens there and shifts every later position."""
    positions = [phrase_positions(models.tokenizer, p) for p in prompts]
    for p, pos in zip(prompts, positions):
        if models.is_sdxl and phrase_positions(models.tokenizer_2, p) != pos:
            raise ConfigError(f"prompt {p.text!r}: its phrases sit at different token positions in SDXL's two "
                             "tokenizers (the second reads '!' as padding), so prompt weighting cannot weight "
                             "both encoders alike; rephrase it without repeated '!'.")
    return encode_text(models, [p.text for p in prompts]), positions


# SDXL's extra conditioning, packed. The trainers keep ONE conditioning tensor per sample (it is stored
# with DDPO's samples, cached per prompt, gathered, weighted by explore.py and passed to the sampler),
# so SDXL's pooled text embedding and its micro-conditioning travel as one extra row after the 77 token
# rows: row 77 = [pooled (P), time ids (6), zeros], P + 6 = 1286 <= D = 2048. guided_eps unpacks it into
# the UNet's added_cond_kwargs. Prompt weighting touches the 77 token rows only.

def sdxl_time_ids(image_size: int, batch_size: int) -> torch.Tensor:
    """SDXL's micro-conditioning (original h, w, crop top, left, target h, w) = (H, W, 0, 0, H, W),
    what diffusers' pipeline passes by default: an uncropped image at the resolution sampled. (B, 6)."""
    return torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]], dtype=torch.float32).expand(batch_size, 6)


def pack_sdxl(hidden: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """hidden (B, 77, D), pooled (B, P), time_ids (B, 6) -> (B, 78, D), row 77 = [pooled, time_ids, zeros]."""
    B, _, D = hidden.shape
    extra = torch.cat([pooled, time_ids], dim=-1)
    if extra.shape[-1] > D:
        raise ValueError(f"SDXL packing: pooled ({pooled.shape[-1]}) + 6 time ids do not fit a row of {D}.")
    row = torch.zeros(B, 1, D, dtype=hidden.dtype, device=hidden.device)
    row[:, 0, :extra.shape[-1]] = extra
    return torch.cat([hidden, row], dim=1)


def unpack_cond(unet, cond: torch.Tensor):
    """-> (encoder_hidden_states (B, 77, D), added_cond_kwargs): None for SD v1.5-style (B, 77, D)
    conditioning; SDXL's {"text_embeds": pooled (B, P), "time_ids": (B, 6)} for a packed (B, 78, D).
    P is read off the UNet: its added-embedding input is P + 6 * addition_time_embed_dim wide."""
    if cond.shape[1] == PROMPT_LENGTH:
        return cond, None
    c = unet.config
    P = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    row = cond[:, PROMPT_LENGTH]
    return cond[:, :PROMPT_LENGTH], {"text_embeds": row[:, :P], "time_ids": row[:, P:P + 6]}


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

def schedule_on(scheduler, device) -> torch.Tensor:
    """The scheduler's alphas_cumprod followed by its final_alpha_cumprod, on `device`. Copied there once
    and kept on the scheduler (until either value or the device changes): a copy from the host at every
    step would make each step wait for the GPU to finish the one before."""
    alphas, final, device = scheduler.alphas_cumprod, scheduler.final_alpha_cumprod, torch.device(device)
    cached = getattr(scheduler, "_schedule_on_device", None)  # (alphas_cumprod, final_alpha_cumprod, the copy)
    if cached is None or cached[0] is not alphas or cached[1] is not final or cached[2].device != device:
        cached = (alphas, final, torch.cat([alphas, torch.as_tensor(final, dtype=alphas.dtype).view(1)]).to(device))
        scheduler._schedule_on_device = cached
    return cached[2]


def ddim_step(scheduler, eps, t, x_t, eta: float, num_steps: int, x_prev=None, generator=None, with_mean=False):
    """One DDIM step x_t -> x_prev with its Gaussian log-prob.
    eps: guided noise prediction (B, C, h, w); t: timestep, int or (B,) tensor (samples may sit at
    different timesteps when DDPO re-scores shuffled transitions). With x_prev given, re-scores it
    instead of sampling. Returns x_prev (B, C, h, w) and log_prob (B,) (zeros when eta = 0); with_mean:
    also the step's mean (B, C, h, w) and std (B, 1, 1, 1) (GRPO's KL to a reference step)."""
    eps, x_t = eps.float(), x_t.float()
    B = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).long().expand(B)
    prev_t = t - scheduler.config.num_train_timesteps // num_steps
    alphas = schedule_on(scheduler, x_t.device)  # (1001,): alphas_cumprod, then final_alpha_cumprod
    a_t = alphas[t].view(B, 1, 1, 1)
    a_prev = alphas[torch.where(prev_t >= 0, prev_t, len(alphas) - 1)].view(B, 1, 1, 1)  # before t = 0: the final alpha
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
        return (x_prev, torch.zeros(B, device=x_t.device)) + ((mean, std) if with_mean else ())
    # Gaussian log-density per element, reduced by the MEAN over latent dims (not the sum): this is
    # the DDPO reference's convention and why its PPO clip_range is as small as 1e-4.
    log_prob = -((x_prev.detach() - mean) ** 2) / (2 * std ** 2) - std.log() - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    return (x_prev, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))) + ((mean, std) if with_mean else ())


# -----------------------------------------------------------------------------
# Sampling: DDIM with eta and per-sample, per-step classifier-free guidance.

def timesteps(models: Models, num_steps: int) -> torch.Tensor:
    models.scheduler.set_timesteps(num_steps)
    return models.scheduler.timesteps.clone()  # (T,) descending, e.g. 981, 961, ..., 1 for SD and T=50


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """x on `device`. A host tensor goes to a GPU through pinned memory, without blocking: a copy from
    pageable memory may wait for the GPU to finish its queued work."""
    if x.device.type == "cpu" and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def guided_eps(unet, x, t, cond, uncond, w):
    """eps_uncond + w * (eps_cond - eps_uncond), the UNet's rows for cond and uncond in ONE batched call.
    x (B, C, h, w); t int or (B,); cond (B, 77, D) (SDXL: packed, (B, 78, D)), uncond (B or 1, 77 or 78, D);
    w (B,) guidance scales, on the host or on x's device.
    Only the branches a row needs are run: a row with w exactly 1 gets eps_cond itself (no uncond row is
    run for it), a row with w exactly 0 eps_uncond itself (no cond row); the others u + w (c - u). When
    every row needs both (fixed CFG) the call is the 2B-row batch [uncond; cond], as without skipping.
    Which rows to run is decided on the host: free for a host w (sample passes one), one read from the
    device per call for a device w (DDPO's re-scoring: the batch size of the call depends on it)."""
    B, dev = x.shape[0], x.device
    t = torch.as_tensor(t, device=dev).expand(B)
    dtype = next(unet.parameters()).dtype
    w_host = w.detach().float().cpu()  # (B,) no copy if on the host already
    w = to_device(w, dev).float().view(B, 1, 1, 1)
    need_u, need_c = w_host != 1, w_host != 0  # (B,) rows whose uncond / cond output enters the result
    uncond = uncond.expand(B, -1, -1)
    if need_u.all() and need_c.all():  # both branches for every row: [uncond; cond], 2B rows
        emb, added = unpack_cond(unet, torch.cat([uncond, cond]).to(dtype))
        out = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]), encoder_hidden_states=emb, added_cond_kwargs=added).sample
        eps_uncond, eps_cond = out.float().chunk(2)
        return eps_uncond + w * (eps_cond - eps_uncond)
    # the rows that need uncond, then those that need cond: B <= n_u + n_c < 2B rows
    rows = to_device(torch.cat([need_u.nonzero(), need_c.nonzero()])[:, 0], dev)  # (n_u + n_c,) batch indices
    n_u = int(need_u.sum())
    iu, ic = rows[:n_u], rows[n_u:]
    emb, added = unpack_cond(unet, torch.cat([uncond[iu], cond[ic]]).to(dtype))  # SDXL: the rows' pooled / time ids too
    out = unet(x[rows].to(dtype), t[rows], encoder_hidden_states=emb, added_cond_kwargs=added).sample.float()
    # back to (B, C, h, w) each, zeros in the rows not run (index_copy passes the gradient on to `out`)
    eps_uncond = out.new_zeros(x.shape).index_copy(0, iu, out[:n_u])
    eps_cond = out.new_zeros(x.shape).index_copy(0, ic, out[n_u:])
    guided = eps_uncond + w * (eps_cond - eps_uncond)
    return torch.where(w == 1, eps_cond, torch.where(w == 0, eps_uncond, guided))  # (B, C, h, w)


def step_log_prob(models: Models, x_t, t, x_prev, cond, uncond, w, eta: float, num_steps: int, with_mean=False):
    """Re-scores stored transitions x_t -> x_prev under the current UNet (DDPO's training pass) -> log_prob (B,);
    with_mean: (log_prob, the step's mean, its std), as ddim_step."""
    eps = guided_eps(models.unet, x_t, t, cond, uncond, w)
    out = ddim_step(models.scheduler, eps, t, x_t, eta, num_steps, x_prev=x_prev, with_mean=with_mean)
    return out[1:] if with_mean else out[1]


def decode(models: Models, x0: torch.Tensor) -> torch.Tensor:
    """Final sample -> images in [0, 1], (B, 3, H, W), float32. The VAE runs in its own weights' dtype
    with autocast off: load_models keeps a force_upcast VAE (SDXL's) in float32 under float16."""
    if models.vae is not None:
        vae = models.vae
        with torch.autocast(x0.device.type, enabled=False):
            x0 = vae.decode(x0.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
    return (x0.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class Trajectory:
    latents: torch.Tensor    # (B, T+1, C, h, w): x_T, ..., x_0
    log_probs: torch.Tensor  # (B, T): log p(x_{t-1} | x_t) of each step taken
    timesteps: torch.Tensor  # (T,)
    images: torch.Tensor     # (B, 3, H, W) in [0, 1]
    grad_from: int           # index of the first step run with gradient (T when none)


def sample(models: Models, cond, uncond, guidance, num_steps: int, eta: float, generator: torch.Generator,
           grad_last_k: int = 0, checkpointing: bool = True, decode_images: bool = True, progress=None,
           x_T: torch.Tensor | None = None) -> Trajectory:
    """Samples B images. cond (B, 77, D) prompt embeddings (already weighted if exploring); uncond
    (B or 1, 77, D); guidance: a float or (B, T) per-sample, per-step scales (fixed CFG and DiffExp's
    schedule are the same code). Noise comes from `generator` (drawn on its device, then moved).
    grad_last_k = 0: no gradients at all (DDPO sampling). grad_last_k = K: the last K UNet calls and
    the decode run with gradients (AlignProp), each under gradient checkpointing if `checkpointing`;
    the earlier steps run under no_grad, so their UNet outputs carry no gradient. x_T: the initial noise
    (B, C, h, w) instead of drawing it first from `generator` (GRPO: one per group)."""
    B, device = cond.shape[0], models.device
    ts = timesteps(models, num_steps)
    T = len(ts)
    # kept on the host: guided_eps decides from it which UNet rows each step needs without reading the device
    w = torch.as_tensor(guidance, dtype=torch.float32).cpu()
    if w.ndim == 0:
        w = w.expand(B, T)  # fixed CFG
    if w.shape != (B, T):
        raise ValueError(f"guidance must be a float or a (B, T) = ({B}, {T}) tensor, got shape {tuple(w.shape)}")
    gen_device = generator.device if generator is not None else "cpu"
    if x_T is None:
        x_T = torch.randn((B, *models.latent_shape), generator=generator, device=gen_device)
    x = x_T.to(device) * models.scheduler.init_noise_sigma
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
