"""Shared fixtures: the tiny offline models are built once per test session.

Tests must not modify the shared models in place: to inject LoRA, use `lora_models`, which works on a
copy of the UNet.
"""

import copy
import dataclasses
import os
import socket
import sys

import pytest

# One thread per test process (pytest -n runs several), also in every process a test starts: the trainers'
# --threads 0 keeps OMP_NUM_THREADS when it is set, and would otherwise take every core in each process.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import diffusion  # noqa: E402
import lora  # noqa: E402

# The tiny models are too small to gain from several threads, and one thread avoids oversubscribing a
# small machine that runs other work beside the tests.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end test of 10 s or more on a 2-core CPU (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def tiny():
    """diffusion.load_models('tiny'): random tiny UNet / VAE / 2-layer CLIP text encoder, real tokenizer."""
    return diffusion.load_models("tiny")


@pytest.fixture(scope="session")
def prompts():
    return [diffusion.Prompt("a dolphin riding a bike", ("dolphin", "riding a bike")),
            diffusion.Prompt("a cat", ("cat",)),
            diffusion.Prompt("an owl playing chess", ("owl", "playing chess"))]


@pytest.fixture(scope="session")
def cond(tiny, prompts):
    """Prompt embeddings (3, 77, D) of `prompts`."""
    return diffusion.encode_prompts(tiny, prompts)[0]


@pytest.fixture(scope="session")
def uncond(tiny):
    """The empty prompt's embedding (1, 77, D)."""
    return diffusion.encode_text(tiny, [""])


@pytest.fixture(scope="session")
def tiny64(tiny, cond, uncond):
    """(models, cond, uncond): the tiny models with the UNet in float64, and `cond` / `uncond` in float64.
    For comparing runs whose UNet calls batch different rows (guidance skipping runs B to 2B rows): in
    float32 the kernels a batch size selects round differently, ~1e-7 relative per operation, and that
    grows over the sampling steps by an amount that depends on the CPU (2.7e-5 after 4 steps on one AVX-512
    machine, 4.8e-6 on another). In float64 the same effect is ~1e-16 relative, far below the float32 in
    which eps is returned and the sampler steps, so such runs agree to the float32 rounding of their
    results (see float32_tolerance)."""
    unet = copy.deepcopy(tiny.unet).to(torch.float64)
    return dataclasses.replace(tiny, unet=unet), cond.double(), uncond.double()


def float32_tolerance(reference: torch.Tensor, ulps: int = 16) -> float:
    """An absolute tolerance of `ulps` float32 units in the last place at the scale of `reference`. Runs of
    the float64 UNet (tiny64) that differ only in batch composition return bit-identical float32 eps unless
    a value lies within ~1e-16 of a float32 rounding boundary (about one value in 1e8); such a flip moves
    that value by one ulp, and the remaining steps of a 4-step sampler can grow it by a few ulps."""
    return ulps * torch.finfo(torch.float32).eps * reference.abs().max().item()


@pytest.fixture(scope="session")
def tiny_folder(tiny, tmp_path_factory):
    """The tiny models saved as a diffusers StableDiffusionPipeline folder."""
    from diffusers import StableDiffusionPipeline
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def lora_models(tiny):
    """Factory: a copy of the tiny models whose UNet has LoRA injected, with B made non-zero (seeded).
    Returns (models, params)."""
    def make(rank=4, alpha=None, seed=0, nonzero=True):
        unet = copy.deepcopy(tiny.unet)
        params = lora.inject(unet, rank=rank, alpha=alpha, seed=seed)
        if nonzero:
            g = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for layer in lora.lora_layers(unet).values():
                    layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
        return dataclasses.replace(tiny, unet=unet), params
    return make


@pytest.fixture
def free_port():
    """A TCP port no process listens on now, for torchrun's --master_port: tests run in parallel (pytest -n),
    so fixed ports collide. The OS picks it (bind to port 0); the short window before torchrun binds it
    is the only chance of a clash."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
