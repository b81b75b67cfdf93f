"""
Reward functions. Every reward is built by a factory with one signature and
scores a batch of images against their prompts:

    reward_fn = make_reward("aesthetic", device="cuda", dtype=torch.float16)
    rewards = reward_fn(images, prompts)  # images in [0, 1] (B, 3, H, W), prompts list[str] -> (B,) float32

Learned rewards (aesthetic, pickscore, hpsv2) download their weights from the Hugging Face hub on first
use; `weights=PATH` (the trainers' --reward.weights) reads a local copy instead, and `tiny=True`
(--reward.tiny) builds the same architectures small and randomly initialised, fully offline, for tests
and CPU quick starts. Model-free rewards (jpeg-*, brightness, contrast) need nothing.

The aesthetic head ships with the repo in weights/aesthetic_head.safetensors, converted from LAION's
sac+logos+ava1-l14-linearMSE.pth (Apache-2.0) with

    python rewards.py convert-aesthetic-head sac+logos+ava1-l14-linearMSE.pth
"""

import argparse
import io
import os
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import common
from common import ConfigError
from toy import TOY_DIFFERENTIABLE, TOY_REWARDS

# open_clip and transformers are imported inside the factories that need them: together they take
# seconds to import, and the model-free rewards of the tiny quick start need neither.

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]

# -----------------------------------------------------------------------------
# Differentiable CLIP preprocessing, shared by all learned rewards

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """CLIP's eval transform in torch, so gradients reach the pixels: resize the shorter side to `size`
    (bicubic, antialiased), center crop, normalise. Output sizes and crop offsets follow torchvision's
    Resize(size) + CenterCrop(size) (open_clip's transform); transformers' center crop floors an odd
    margin where torchvision rounds it, a one-pixel shift for some non-square images. Returns float32."""
    x = images.float()  # (B, 3, H, W); resampling in fp32 whatever the model dtype
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)  # torchvision truncates the long side
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    # Bicubic overshoots. The reference pipelines resize uint8 images the way PIL does: a horizontal pass,
    # clipped to [0, 255], then a vertical one, clipped again. Two 1-D passes, each clamped, follow that.
    for size_hw in ((h, new_w), (new_h, new_w)):
        if size_hw != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size_hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = x[..., top:top + size, left:left + size]  # (B, 3, size, size)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# -----------------------------------------------------------------------------
# Loading weights: local path, hub cache, hub; a clear error when offline


def _weights_error(source: str, what: str, reason: str) -> ConfigError:
    return ConfigError(
        f"could not load the {what} from {source}: {reason}. Pass a local copy with --reward.weights PATH "
        f"(make_reward(..., weights=PATH)), or use the small random offline model with --reward.tiny.")


def _fetch(load: Callable[[bool], object], source: str, what: str):
    """Runs load(local_files_only) on a local path, else on the hub cache, else on the hub. Any failure
    becomes a ConfigError that names the source and the flag that takes a local copy."""
    if os.path.exists(source):
        try:
            return load(True)
        except Exception as e:
            raise _weights_error(source, what, f"reading it failed ({type(e).__name__}: {e})") from e
    try:
        return load(True)  # already in the Hugging Face cache: no network needed
    except Exception:
        pass
    if not common.hub_reachable():
        raise _weights_error(source, what, "it is not in the local Hugging Face cache and the machine appears "
                                           "to be offline (the hub is unreachable or HF_HUB_OFFLINE is set)")
    try:
        return load(False)
    except Exception as e:
        raise _weights_error(source, what, f"download failed ({type(e).__name__}: {e})") from e


def _weights_file(weights: str | None, repo_id: str, filenames: tuple[str, ...], what: str) -> str:
    """A local weights file: `weights` if given, else the first of `filenames` that repo_id has, from
    the hub cache or downloaded."""
    from huggingface_hub import hf_hub_download
    if weights is not None:
        if not os.path.isfile(weights):
            raise _weights_error(weights, what, "no such file")
        return weights

    def load(local_files_only):
        for i, filename in enumerate(filenames):
            try:
                return hf_hub_download(repo_id, filename, local_files_only=local_files_only)
            except Exception:
                if i == len(filenames) - 1:
                    raise
    return _fetch(load, f"{repo_id} ({' or '.join(filenames)})", what)


def frozen(model: nn.Module, device, dtype) -> nn.Module:
    """Rewards are fixed functions: eval mode (dropout off), no parameter gradients."""
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Builds a random tiny model with fixed weights without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (projection in pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _text_cache(encode: Callable[[list[str]], torch.Tensor]) -> Callable[[list[str]], torch.Tensor]:
    """Prompts repeat across batches and epochs: encode each distinct prompt once, without gradients,
    and keep its normalised embedding keyed by the prompt string."""
    cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def lookup(prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in cache]
        if new:
            cache.update(zip(new, encode(new)))  # encode: (N,) prompts -> (N, D)
        return torch.stack([cache[p] for p in prompts])  # (B, D)

    lookup.cache = cache
    return lookup


# -----------------------------------------------------------------------------
# Aesthetic: LAION improved aesthetic predictor = MLP on CLIP ViT-L/14 (OpenAI) image embeddings

AESTHETIC_HEAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "aesthetic_head.safetensors")
# What open_clip's pretrained="openai" tag of ViT-L-14 resolves to on the hub (safetensors preferred).
OPENAI_L14_HUB = "timm/vit_large_patch14_clip_224.openai"
OPENAI_L14_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Tiny open_clip CLIP: a 2-layer ViT with 32-pixel patches on 224x224 inputs (7x7 tokens) and a
# 2-layer text tower; embed_dim is set per reward (768 for the aesthetic head).
TINY_OPEN_CLIP = dict(
    vision_cfg=dict(image_size=CLIP_SIZE, patch_size=32, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
)


def aesthetic_mlp() -> nn.Sequential:
    """The predictor's head: 768-1024-128-64-16-1 linear layers, no activations. Dropouts sit at the
    original indices so the state dict keys are layers.{0,2,4,6,7}.{weight,bias} as in the .pth."""
    return nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )


def load_aesthetic_head(path: str = AESTHETIC_HEAD) -> nn.Sequential:
    head = aesthetic_mlp()
    state = load_file(path)  # keys layers.N.*, as in the original file
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()}, strict=True)
    return head


def convert_aesthetic_head(src: str, dst: str = AESTHETIC_HEAD):
    """sac+logos+ava1-l14-linearMSE.pth (a plain state dict) -> safetensors, keys unchanged."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    aesthetic_mlp().load_state_dict({k.removeprefix("layers."): v for k, v in state.items()}, strict=True)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, dst, metadata={
        "source": "LAION-AI/aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth", "license": "Apache-2.0"})
    print(f"wrote {dst} ({len(state)} tensors)")


def clip_image_embedder(device="cpu", dtype=torch.float32, tiny: bool = False, weights: str | None = None):
    """images in [0, 1] (B, 3, H, W) -> L2-normalised CLIP ViT-L/14 (OpenAI) image embeddings (B, 768),
    differentiable. The CLIP of the aesthetic reward; also used for sample-diversity metrics.
    weights: a local open_clip checkpoint of ViT-L-14 (state dict file) instead of the hub's."""
    import open_clip
    if tiny:
        model = _seeded(lambda: open_clip.CLIP(embed_dim=768, quick_gelu=True, **TINY_OPEN_CLIP))
    else:
        path = _weights_file(weights, OPENAI_L14_HUB, OPENAI_L14_FILES, "CLIP ViT-L/14 (OpenAI) weights")
        # OpenAI's CLIP was trained with QuickGELU; open_clip's ViT-L-14 config has nn.GELU and only
        # warns about the mismatch, so force it.
        model = _fetch(lambda _: open_clip.create_model("ViT-L-14", pretrained=path, force_quick_gelu=True),
                       path, "CLIP ViT-L/14 (OpenAI) weights")
    visual = frozen(model.visual, device, dtype)  # the text tower is not needed
    del model

    def embed(images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images.to(device)).to(dtype)  # (B, 3, 224, 224)
        return F.normalize(visual(x), dim=-1)  # (B, 768)

    embed.model = visual
    return embed


def aesthetic(device="cpu", dtype=torch.float32, tiny: bool = False, weights: str | None = None) -> RewardFn:
    """LAION aesthetic score (about 5-6 for SD v1.5 images). Ignores the prompts. weights: a local
    open_clip ViT-L-14 checkpoint (the head always comes from the repo). The real head also sits on top
    of the tiny CLIP (same 768-d embedding), so only the CLIP is random there."""
    embed = clip_image_embedder(device, dtype, tiny, weights)
    head = frozen(load_aesthetic_head(), device, dtype)

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return head(embed(images)).squeeze(-1).float().to(images.device)  # (B,)

    reward_fn.model, reward_fn.head = embed.model, head
    return reward_fn


# -----------------------------------------------------------------------------
# PickScore: a CLIP ViT-H/14 (transformers) fine-tuned on Pick-a-Pic preferences

PICKSCORE_HUB = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TINY_HF_CLIP = dict(
    text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                     eos_token_id=49407, pad_token_id=49407),
    vision_config=dict(image_size=CLIP_SIZE, patch_size=32, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2),
    projection_dim=32,
)


def pickscore(device="cpu", dtype=torch.float32, tiny: bool = False, weights: str | None = None) -> RewardFn:
    """PickScore = logit_scale.exp() * cos(text, image), about 100 x cosine (typically 20-23).
    weights: a local folder (or hub id) with the PickScore CLIPModel; its tokenizer files are used when
    present, else the laion ViT-H-14 tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    if tiny:
        from diffusion import build_clip_tokenizer  # the CLIP BPE tokenizer, built offline
        model = _seeded(lambda: CLIPModel(CLIPConfig(**TINY_HF_CLIP)))
        tokenizer = build_clip_tokenizer()
    else:
        source = weights or PICKSCORE_HUB
        model = _fetch(lambda local: CLIPModel.from_pretrained(source, local_files_only=local),
                       source, "PickScore model")
        has_tokenizer = os.path.isfile(os.path.join(source, "tokenizer_config.json"))
        tok_source = source if has_tokenizer else PICKSCORE_PROCESSOR
        tokenizer = _fetch(lambda local: AutoTokenizer.from_pretrained(tok_source, local_files_only=local),
                           tok_source, "PickScore tokenizer")
    model = frozen(model, device, dtype)

    def encode_text(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        return F.normalize(features(model.get_text_features(**tokens)), dim=-1)  # (N, D)

    text_embeddings = _text_cache(encode_text)

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = clip_preprocess(images.to(device)).to(dtype)  # (B, 3, 224, 224)
        image_emb = F.normalize(features(model.get_image_features(pixel_values=x)), dim=-1)  # (B, D)
        cosine = (image_emb * text_embeddings(prompts)).sum(-1)  # (B,)
        return (model.logit_scale.exp() * cosine).float().to(images.device)

    reward_fn.model, reward_fn.tokenizer, reward_fn.text_cache = model, tokenizer, text_embeddings.cache
    return reward_fn


# -----------------------------------------------------------------------------
# HPSv2: open_clip ViT-H-14 fine-tuned on Human Preference Dataset v2 (HPS v2.1 checkpoint)

HPSV2_HUB = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2.1_compressed.pt"


def hpsv2(device="cpu", dtype=torch.float32, tiny: bool = False, weights: str | None = None) -> RewardFn:
    """HPS v2.1 = cos(text, image) of normalised embeddings, no logit scale, as HPSv2 defines it (about
    0.2-0.35 for SD images). weights: a local HPS checkpoint file. HPSv2's own eval transform resizes the
    longer side and pads; we use the shared shorter-side resize + crop, identical for square images."""
    import open_clip
    if tiny:
        model = _seeded(lambda: open_clip.CLIP(embed_dim=64, **TINY_OPEN_CLIP))
    else:
        path = _weights_file(weights, HPSV2_HUB, (HPSV2_FILE,), "HPS v2.1 checkpoint")
        # open_clip loads it strictly, unwrapping its "state_dict" and stripping DDP's "module." prefix
        model = _fetch(lambda _: open_clip.create_model("ViT-H-14", pretrained=path), path, "HPS v2.1 checkpoint")
    model = frozen(model, device, dtype)
    tokenizer = open_clip.get_tokenizer("ViT-H-14")  # open_clip's CLIP BPE, shipped in its package

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts).to(device), normalize=True)  # (N, D)

    text_embeddings = _text_cache(encode_text)

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = clip_preprocess(images.to(device)).to(dtype)  # (B, 3, 224, 224)
        image_emb = model.encode_image(x, normalize=True)  # (B, D)
        return (image_emb * text_embeddings(prompts)).sum(-1).float().to(images.device)  # (B,)

    reward_fn.model, reward_fn.tokenizer, reward_fn.text_cache = model, tokenizer, text_embeddings.cache
    return reward_fn


# -----------------------------------------------------------------------------
# Model-free rewards: no weights, work offline


def _model_free(name: str, weights: str | None):
    if weights is not None:
        raise ConfigError(f"--reward.weights {weights}: reward {name!r} has no weights (got weights={weights!r})")


def _jpeg_size_kb(images: torch.Tensor) -> torch.Tensor:
    """Size in kB of each image JPEG-encoded at quality 95 (DDPO). (B, 3, H, W) in [0, 1] -> (B,) float32.
    PIL, as in DDPO: torchvision's encode_jpeg gives the same byte counts but is deprecated."""
    from PIL import Image
    pixels = (images.detach() * 255).round().clamp(0, 255).to("cpu", torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1)  # (B, H, W, 3) for PIL
    sizes = []
    for x in pixels.numpy():  # a few ms per 512x512 image
        buffer = io.BytesIO()
        Image.fromarray(x).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(device="cpu", dtype=torch.float32, tiny=False, weights=None) -> RewardFn:
    """-size_kb of the JPEG (quality 95): higher for simpler images. Not differentiable."""
    _model_free("jpeg-compressibility", weights)
    return lambda images, prompts: -_jpeg_size_kb(images)


def jpeg_incompressibility(device="cpu", dtype=torch.float32, tiny=False, weights=None) -> RewardFn:
    """+size_kb of the JPEG (quality 95): higher for detailed, noisy images. Not differentiable."""
    _model_free("jpeg-incompressibility", weights)
    return lambda images, prompts: _jpeg_size_kb(images)


def brightness(device="cpu", dtype=torch.float32, tiny=False, weights=None) -> RewardFn:
    """Mean pixel value in [0, 1]. Differentiable; a sanity-check reward for the offline quick start."""
    _model_free("brightness", weights)
    return lambda images, prompts: images.float().mean(dim=(1, 2, 3))  # (B,)


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights


def contrast(device="cpu", dtype=torch.float32, tiny=False, weights=None) -> RewardFn:
    """RMS contrast: standard deviation of the luma over the pixels, in [0, 0.5]. Differentiable. Unlike
    brightness, no flat image maximises it, so an AlignProp quick start has to make structure."""
    _model_free("contrast", weights)

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        luma = torch.einsum("bchw,c->bhw", images.float(), torch.tensor(LUMA, device=images.device))  # (B, H, W)
        # clamp: a flat image has zero variance, where sqrt's gradient would be infinite (NaN after 0 * inf)
        return luma.flatten(1).var(dim=1, unbiased=False).clamp_min(1e-12).sqrt()  # (B,)

    return reward_fn


# -----------------------------------------------------------------------------
# Registry

REWARDS: dict[str, Callable[..., RewardFn]] = {
    "jpeg-compressibility": jpeg_compressibility,
    "jpeg-incompressibility": jpeg_incompressibility,
    "brightness": brightness,
    "contrast": contrast,
    "aesthetic": aesthetic,
    "pickscore": pickscore,
    "hpsv2": hpsv2,
}
# The trainers' config field: tyro rejects a misspelt name at parse time.
REWARDS.update(TOY_REWARDS)  # the toy world's rewards (toy.py): alignment, classifier, aesthetic, the sparsity dial
RewardName = Literal["jpeg-compressibility", "jpeg-incompressibility", "brightness", "contrast",
                     "aesthetic", "pickscore", "hpsv2", "toy-alignment", "toy-classifier", "toy-aesthetic",
                     "toy-dial-dense", "toy-dial-medium", "toy-dial-sparse", "toy-dial-success"]
assert set(get_args(RewardName)) == set(REWARDS), "RewardName must list exactly the keys of REWARDS"
DIFFERENTIABLE = frozenset({"brightness", "contrast", "aesthetic", "pickscore", "hpsv2"}) | TOY_DIFFERENTIABLE  # w.r.t. the images
assert DIFFERENTIABLE <= set(REWARDS)


@dataclass(frozen=True)
class RewardConfig:
    """The trainers' --reward.* flags."""
    name: RewardName = "aesthetic"  # a registered reward (a misspelt name fails when flags are parsed)
    tiny: bool = False  # small random reward model, offline (tests / CPU smoke runs); model-free rewards ignore it
    weights: str | None = None  # local file / folder (or hub id) of the reward model's weights, instead of the hub default


def make_reward(name: str, device="cpu", dtype=torch.float32, tiny: bool = False,
                weights: str | None = None) -> RewardFn:
    """The reward `name`, its model (if any) loaded once, on `device` in `dtype`. tiny: small random
    models, offline (model-free rewards ignore it). weights overrides the default source of the real
    weights: an open_clip ViT-L-14 checkpoint file (aesthetic), a folder or hub id of a transformers
    CLIPModel (pickscore), an HPS checkpoint file (hpsv2)."""
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; registered rewards: {', '.join(REWARDS)}")
    return REWARDS[name](device=device, dtype=dtype, tiny=tiny, weights=weights)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reward utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert-aesthetic-head", help="LAION's .pth aesthetic head -> safetensors")
    convert.add_argument("src", help="sac+logos+ava1-l14-linearMSE.pth")
    convert.add_argument("dst", nargs="?", default=AESTHETIC_HEAD)
    args = parser.parse_args()
    if args.command == "convert-aesthetic-head":
        convert_aesthetic_head(args.src, args.dst)
