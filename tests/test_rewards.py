"""Tests for rewards.py on CPU with the tiny (random, offline) models; each model is built once."""

import json
import os
import subprocess
import sys
import warnings
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for plain `pytest`
import rewards  # noqa: E402
from common import ConfigError  # noqa: E402

LEARNED = ("aesthetic", "pickscore", "hpsv2")
PROMPTS = ["a photo of a cat", "a corgi riding a red bicycle on the beach at sunset", "a photo of a cat"]
TOY_PROMPTS = ["a red circle", "a blue square", "a red circle"]


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tests run beside other work on a small machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_rewards():
    return {name: rewards.make_reward(name, tiny=True) for name in LEARNED}


def random_images(b=3, h=40, w=56, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def uint8_images(kind, h, w, b=2, seed=0):
    """Random test images as uint8: white noise (the worst case for resampling) or smooth blobs."""
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    low = torch.rand(b, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    return (F.interpolate(low, size=(h, w), mode="bilinear") * 255).round().to(torch.uint8)


def to_pil(u8):
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]


# -----------------------------------------------------------------------------
# Preprocessing against the models' own (PIL / uint8) pipelines

# Measured max |ours - reference| in normalised units over the cases below (noise and smooth images,
# 32x32 ... 512x512): open_clip 0.0164, transformers CLIPImageProcessor 0.0164 (torchvision backend) and
# 0.0164 (PIL backend); mean abs about 0.004; 0 at 224x224. That is about one uint8 level (1/255/std =
# 0.015): the references round the resized image to uint8 and PIL uses fixed-point coefficients.
PREPROCESS_ATOL = 0.02
SIZES = [(32, 32), (64, 48), (224, 224), (256, 320), (512, 512), (333, 517)]
# transformers floors the center-crop offset where torchvision rounds it: a one-pixel shift when the
# margin is odd (333x517 -> 224x347). Square images (all of Stable Diffusion's) are unaffected.
EVEN_MARGIN_SIZES = [s for s in SIZES if s != (333, 517)]


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("h,w", SIZES)
def test_preprocess_matches_open_clip(kind, h, w):
    import open_clip
    u8 = uint8_images(kind, h, w)
    transform = open_clip.image_transform(224, is_train=False)  # Resize(224, bicubic), CenterCrop, CLIP mean/std
    ref = torch.stack([transform(p) for p in to_pil(u8)])
    ours = rewards.clip_preprocess(u8.float() / 255)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    assert (ours - ref).abs().max() < PREPROCESS_ATOL


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("h,w", EVEN_MARGIN_SIZES)
def test_preprocess_matches_transformers(kind, h, w):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config, built offline
    config = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                  do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
                  image_mean=list(rewards.CLIP_MEAN), image_std=list(rewards.CLIP_STD))
    u8 = uint8_images(kind, h, w)
    ours = rewards.clip_preprocess(u8.float() / 255)
    for processor in (CLIPImageProcessor(**config), CLIPImageProcessorPil(**config)):
        ref = torch.as_tensor(processor(images=to_pil(u8), return_tensors="pt")["pixel_values"])
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < PREPROCESS_ATOL, type(processor).__name__


# -----------------------------------------------------------------------------
# Every differentiable reward: shape, finiteness, gradients, batch-order invariance


@pytest.mark.parametrize("name", sorted(rewards.DIFFERENTIABLE))
def test_differentiable_rewards(name, tiny_rewards):
    reward_fn = tiny_rewards.get(name) or rewards.make_reward(name)
    prompts = TOY_PROMPTS if name.startswith("toy-") else PROMPTS  # toy rewards read "a {colour} {shape}"
    images = random_images().requires_grad_()
    r = reward_fn(images, prompts)
    assert r.shape == (3,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    r.sum().backward()
    assert torch.isfinite(images.grad).all()
    if name != "toy-dial-sparse":  # by design 0 with no gradient far from its target (test_toy: near it)
        assert images.grad.abs().sum() > 0

    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        r_perm = reward_fn(images[perm], [prompts[i] for i in perm])
    torch.testing.assert_close(r_perm, r.detach()[perm], rtol=1e-5, atol=1e-5)


def test_contrast_gradient_on_flat_image():
    images = torch.full((2, 3, 16, 16), 0.5, requires_grad=True)
    rewards.make_reward("contrast")(images, ["", ""]).sum().backward()
    assert torch.isfinite(images.grad).all()


def test_learned_reward_in_bfloat16():
    reward_fn = rewards.make_reward("hpsv2", dtype=torch.bfloat16, tiny=True)
    r = reward_fn(random_images(), PROMPTS)
    assert r.dtype == torch.float32 and torch.isfinite(r).all()


@pytest.mark.parametrize("size", [64, 1024])  # a small image, and SDXL's
def test_learned_rewards_resize_any_image_size(tiny_rewards, size):
    """Every learned reward resizes its input (clip_preprocess to CLIP's 224; the toy classifier to 32):
    images of any size score, with gradients."""
    fns = {**tiny_rewards, "toy-classifier": rewards.make_reward("toy-classifier")}
    images = random_images(b=2, h=size, w=size).requires_grad_()
    for name, reward_fn in fns.items():
        r = reward_fn(images, (TOY_PROMPTS if name.startswith("toy-") else PROMPTS)[:2])
        assert r.shape == (2,) and torch.isfinite(r).all(), name
        (grad,) = torch.autograd.grad(r.sum(), images)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# -----------------------------------------------------------------------------
# Aesthetic head and CLIP embedder

HEAD_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_aesthetic_head_is_the_linear_chain():
    state = load_file(rewards.AESTHETIC_HEAD)  # the shipped file, read independently
    assert set(state) == HEAD_KEYS
    head = rewards.load_aesthetic_head()  # loads with strict=True
    x = F.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    expected = x
    for i in (0, 2, 4, 6, 7):  # no activations between the layers
        expected = expected @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(x), expected)


def test_convert_aesthetic_head_round_trip(tmp_path):
    state = {f"layers.{k}": torch.randn_like(v) for k, v in rewards.aesthetic_mlp().state_dict().items()}
    torch.save(state, tmp_path / "head.pth")
    rewards.convert_aesthetic_head(str(tmp_path / "head.pth"), str(tmp_path / "head.safetensors"))
    loaded = rewards.load_aesthetic_head(str(tmp_path / "head.safetensors")).state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k.removeprefix("layers.")], v)


def test_aesthetic_is_head_on_normalised_embedding(tiny_rewards):
    embed = rewards.clip_image_embedder(tiny=True)
    images = random_images()
    with torch.no_grad():
        e = embed(images)
        assert e.shape == (3, 768)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(tiny_rewards["aesthetic"](images, PROMPTS),
                                   tiny_rewards["aesthetic"].head(e).squeeze(-1))


# -----------------------------------------------------------------------------
# Prompt-conditioned rewards against an independent, uncached computation


def features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: a ModelOutput


@torch.no_grad()
def test_pickscore_matches_reference(tiny_rewards):
    reward_fn = tiny_rewards["pickscore"]
    model, tokenizer = reward_fn.model, reward_fn.tokenizer
    images = random_images()
    image_emb = features(model.get_image_features(pixel_values=rewards.clip_preprocess(images)))
    expected = torch.stack([
        model.logit_scale.exp() * F.cosine_similarity(
            features(model.get_text_features(**tokenizer([p], return_tensors="pt"))), image_emb[i:i + 1])[0]
        for i, p in enumerate(PROMPTS)])  # one prompt at a time: no padding, no cache
    reward_fn.text_cache.clear()
    first = reward_fn(images, PROMPTS)  # encodes the 2 distinct prompts together, the short one padded
    assert list(reward_fn.text_cache) == PROMPTS[:2]
    second = reward_fn(images, PROMPTS)  # all from the cache
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first)


@torch.no_grad()
def test_hpsv2_matches_reference(tiny_rewards):
    reward_fn = tiny_rewards["hpsv2"]
    model, tokenizer = reward_fn.model, reward_fn.tokenizer
    images = random_images()
    image_emb = model.encode_image(rewards.clip_preprocess(images), normalize=True)
    expected = torch.stack([(model.encode_text(tokenizer([p]), normalize=True)[0] * image_emb[i]).sum()
                            for i, p in enumerate(PROMPTS)])  # cosine, no logit scale
    reward_fn.text_cache.clear()
    first = reward_fn(images, PROMPTS)
    second = reward_fn(images, PROMPTS)
    assert len(reward_fn.text_cache) == 2
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first)


@torch.no_grad()
def test_pickscore_loads_local_folder(tiny_rewards, tmp_path):
    """The real loading path (CLIPModel.from_pretrained, tokenizer from the folder) on a saved tiny model."""
    tiny = tiny_rewards["pickscore"]
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    reward_fn = rewards.make_reward("pickscore", weights=str(tmp_path))
    images = random_images()
    torch.testing.assert_close(reward_fn(images, PROMPTS), tiny(images, PROMPTS))


# -----------------------------------------------------------------------------
# JPEG (in)compressibility


def test_jpeg_flat_beats_noise():
    flat = torch.full((1, 3, 64, 64), 0.4)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise]).requires_grad_()
    comp = rewards.make_reward("jpeg-compressibility")(images, ["", ""])
    incomp = rewards.make_reward("jpeg-incompressibility")(images, ["", ""])
    assert comp.shape == (2,) and comp.dtype == torch.float32 and not comp.requires_grad
    assert comp[0] > comp[1] and (comp < 0).all()
    torch.testing.assert_close(incomp, -comp)
    assert not ({"jpeg-compressibility", "jpeg-incompressibility"} & rewards.DIFFERENTIABLE)


def test_jpeg_size_matches_torchvision():
    """rewards.py encodes with PIL as DDPO did; torchvision's encoder (deprecated) gives the same bytes."""
    import torchvision.io
    if not hasattr(torchvision.io, "encode_jpeg"):
        pytest.skip("torchvision no longer has encode_jpeg")
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    u8 = (images * 255).round().to(torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = torch.tensor([len(e) / 1000 for e in torchvision.io.encode_jpeg(list(u8), quality=95)])
    torch.testing.assert_close(rewards.make_reward("jpeg-incompressibility")(images, ["", ""]), expected)


# -----------------------------------------------------------------------------
# Registry and errors


def test_registry():
    assert set(get_args(rewards.RewardName)) == set(rewards.REWARDS)
    assert rewards.DIFFERENTIABLE <= set(rewards.REWARDS)
    with pytest.raises(ValueError, match="no weights"):
        rewards.make_reward("brightness", weights="head.safetensors")


def test_unknown_name_lists_rewards():
    with pytest.raises(ValueError) as e:
        rewards.make_reward("aesthetics")
    assert all(name in str(e.value) for name in rewards.REWARDS)


def test_missing_local_weights_file():
    with pytest.raises(ConfigError, match="--reward.weights"):
        rewards.make_reward("hpsv2", weights="/nonexistent/HPS_v2.1_compressed.pt")


OFFLINE_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import open_clip, transformers  # imported before timing: only the weight lookup is timed
import rewards
out = {}
for name in ("aesthetic", "pickscore", "hpsv2"):
    start = time.time()
    try:
        rewards.make_reward(name)
        out[name] = ["no error", 0.0]
    except ValueError as e:  # a ConfigError
        out[name] = [str(e), time.time() - start]
print(json.dumps(out))
"""


def test_offline_errors_are_quick_and_helpful(tmp_path):
    # A fresh process: huggingface_hub reads HF_HUB_OFFLINE at import. An empty HF_HOME, so a cached
    # copy of the weights cannot hide the error.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, root], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    hub_ids = {"aesthetic": rewards.OPENAI_L14_HUB, "pickscore": rewards.PICKSCORE_HUB, "hpsv2": rewards.HPSV2_HUB}
    for name, (message, seconds) in out.items():
        assert hub_ids[name] in message and "--reward.weights" in message and "offline" in message, message
        assert seconds < 10, (name, seconds)
