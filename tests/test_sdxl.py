"""SDXL on the CPU with the tiny-sdxl model (SDXL's architecture family, small and random): loading,
encoding as diffusers' StableDiffusionXLPipeline does and its packing into one (B, 78, D) tensor,
sampling and exact re-scoring, prompt weighting of both encoders, LoRA, and a step of each trainer."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file

import common
import scaffold
import diffusion
import explore
import lora
import train_alignprop
import train_ddpo
from explore import ExploreConfig
from test_alignprop import small as small_alignprop
from test_ddpo import small as small_ddpo

T = 4
PROMPTS = [diffusion.Prompt("a dolphin riding a bike", ("dolphin", "riding a bike")),
           diffusion.Prompt("a cat", ("cat",)),
           diffusion.Prompt("an owl playing chess", ("owl", "playing chess"))]


@pytest.fixture(scope="module")
def sdxl():
    return diffusion.load_models("tiny-sdxl")


@pytest.fixture(scope="module")
def pipe(sdxl):
    """diffusers' own SDXL pipeline around the same modules: the reference for encoding and LoRA files."""
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline(vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2,
                                     tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet,
                                     scheduler=sdxl.scheduler, add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl_pipeline")
    pipe.save_pretrained(folder)
    return folder


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def unet_out(unet, cond):
    """The UNet's output for fixed latents and timesteps under packed conditioning (2, 78, D)."""
    hidden, added = diffusion.unpack_cond(unet, cond)
    with torch.no_grad():
        return unet(randn(2, 4, 16, 16), torch.tensor([700, 30]), encoder_hidden_states=hidden, added_cond_kwargs=added).sample


# -----------------------------------------------------------------------------
# Loading and encoding

def test_tiny_sdxl_loads_offline(sdxl):
    assert sdxl.is_sdxl and not diffusion.load_models("tiny").is_sdxl
    assert sdxl.unet.config.addition_embed_type == "text_time" and sdxl.unet.config.cross_attention_dim == 64
    assert sdxl.latent_shape == (4, 16, 16) and sdxl.image_size == 32
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.tokenizer_2.pad_token_id == 0
    assert sdxl.vae.config.scaling_factor == 0.13025
    frozen = (sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2, sdxl.vae)
    assert not any(p.requires_grad for m in frozen for p in m.parameters()) and not sdxl.text_encoder_2.training


def test_tokenizers_agree_up_to_padding(sdxl):
    """Both tokenizers give the same ids up to the end token, then pad with 49407 and 0 ("!"): phrase
    positions from the first hold in the second. SDXL's second tokenizer also reads a "!" in the text as
    its pad token (a known quirk of the shipped tokenizer, kept as diffusers keeps it): one "!" keeps the
    positions, "!!" splits in two and shifts them, which encode_prompts refuses."""
    texts = [p.text for p in PROMPTS] + ["A Photo of a CAT, 4K", "word " * 100]
    ids_1, ids_2 = diffusion.tokenize(sdxl.tokenizer, texts), diffusion.tokenize(sdxl.tokenizer_2, texts)
    for a, b in zip(ids_1, ids_2):
        n = b.tolist().index(49407) + 1  # through the end token
        assert torch.equal(a[:n], b[:n]) and (a[n:] == 49407).all() and (b[n:] == 0).all()
    for p in PROMPTS:
        assert diffusion.phrase_positions(sdxl.tokenizer, p) == diffusion.phrase_positions(sdxl.tokenizer_2, p)
    ids_1, ids_2 = diffusion.tokenize(sdxl.tokenizer, ["a cat!"]), diffusion.tokenize(sdxl.tokenizer_2, ["a cat!"])
    assert ids_1[0, 3] == 256 and ids_2[0, 3] == 0 and ids_1[0, 4] == ids_2[0, 4] == 49407
    diffusion.encode_prompts(sdxl, [diffusion.Prompt("a cat! riding a bike", ("cat", "riding a bike"))])
    with pytest.raises(ValueError, match="rephrase"):
        diffusion.encode_prompts(sdxl, [diffusion.Prompt("a cat!! riding a bike", ("cat", "riding a bike"))])


def test_encoding_matches_diffusers_and_packs(sdxl, pipe):
    """encode_text = diffusers' encode_prompt (penultimate states of both encoders, encoder 2's pooled
    output; zeros for the empty prompt), packed as (B, 78, D) with row 77 = [pooled, time ids, zeros]."""
    texts = [p.text for p in PROMPTS]
    cond, uncond = diffusion.encode_text(sdxl, texts), diffusion.encode_text(sdxl, [""])
    assert cond.shape == (3, 78, 64) and uncond.shape == (1, 78, 64)
    with torch.no_grad():
        ref, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(texts, device="cpu", do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
    hidden, added = diffusion.unpack_cond(sdxl.unet, cond)
    torch.testing.assert_close(hidden, ref, rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], ref_pooled, rtol=0, atol=0)
    assert torch.equal(added["time_ids"], time_ids.expand(3, 6)) and time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]
    assert (cond[:, 77, 32 + 6:] == 0).all()  # the rest of the row is padding
    hidden, added = diffusion.unpack_cond(sdxl.unet, uncond)
    assert (ref_neg == 0).all() and (ref_neg_pooled == 0).all()  # force_zeros_for_empty_prompt
    assert (hidden == 0).all() and (added["text_embeds"] == 0).all() and torch.equal(added["time_ids"], time_ids)
    positions = diffusion.encode_prompts(sdxl, PROMPTS)[1]
    assert positions[0] == [[2], [3, 4, 5]]


def test_local_sdxl_folder_loads(sdxl, sdxl_folder):
    """A saved diffusers SDXL folder (it has text_encoder_2/) loads as SDXL, with the same outputs."""
    models = diffusion.load_models(str(sdxl_folder))
    assert models.is_sdxl and models.tokenizer_2.pad_token_id == 0
    cond = diffusion.encode_text(models, [p.text for p in PROMPTS[:2]])
    torch.testing.assert_close(cond, diffusion.encode_text(sdxl, [p.text for p in PROMPTS[:2]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(unet_out(models.unet, cond), unet_out(sdxl.unet, cond), rtol=0, atol=1e-6)


def test_sdxl_random_architecture():
    """'sdxl-random' builds SDXL base's architecture: parameter counts on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            models = diffusion.load_models("sdxl-random", device="meta")
    except Exception as e:  # depends on the diffusers / torch versions
        pytest.skip(f"diffusers cannot build on the meta device here: {e}")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(models.unet) == 2_567_463_684 and count(models.text_encoder_2) == 694_659_840
    assert count(models.text_encoder) == 123_060_480 and count(models.vae) == 83_653_863
    assert models.latent_shape == (4, 128, 128) and models.image_size == 1024


# -----------------------------------------------------------------------------
# Guidance, sampling, re-scoring

def test_guided_eps_unpacks_the_conditioning(sdxl):
    """w = 0 gives the UNet's output on the unconditional inputs, w = 1 on the conditional ones."""
    cond, uncond = diffusion.encode_text(sdxl, ["a cat", "a dog"]), diffusion.encode_text(sdxl, [""])
    eps_0 = diffusion.guided_eps(sdxl.unet, randn(2, 4, 16, 16), torch.tensor([700, 30]), cond, uncond, torch.zeros(2))
    eps_1 = diffusion.guided_eps(sdxl.unet, randn(2, 4, 16, 16), torch.tensor([700, 30]), cond, uncond, torch.ones(2))
    torch.testing.assert_close(eps_0, unet_out(sdxl.unet, uncond.expand(2, -1, -1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_1, unet_out(sdxl.unet, cond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eps_0, eps_1, atol=1e-4)


def test_sample_and_exact_rescoring(sdxl):
    """eta 1: images and finite log-probs of the right shapes; step_log_prob on the stored transitions,
    per-sample guidance and shuffled timesteps included, gives the sampling log-probs: ratio 1."""
    cond, uncond = diffusion.encode_prompts(sdxl, PROMPTS)[0], diffusion.encode_text(sdxl, [""])
    w = torch.tensor([[1.0, 1.0, 5.0, 5.0], [0.0, 2.0, 4.0, 6.0], [5.0] * T])
    traj = diffusion.sample(sdxl, cond, uncond, w, T, 1.0, torch.Generator().manual_seed(0))
    assert traj.latents.shape == (3, T + 1, 4, 16, 16) and traj.log_probs.shape == (3, T)
    assert torch.isfinite(traj.log_probs).all()
    assert traj.images.shape == (3, 3, 32, 32) and traj.images.min() >= 0 and traj.images.max() <= 1
    for i in range(T):
        log_prob = diffusion.step_log_prob(sdxl, traj.latents[:, i], traj.timesteps[i], traj.latents[:, i + 1],
                                           cond, uncond, w[:, i], 1.0, T)
        torch.testing.assert_close(torch.exp(log_prob - traj.log_probs[:, i]), torch.ones(3), rtol=0, atol=1e-6)
    b, i = torch.arange(3), torch.tensor([3, 0, 2])
    log_prob = diffusion.step_log_prob(sdxl, traj.latents[b, i], traj.timesteps[i], traj.latents[b, i + 1],
                                       cond, uncond, w[b, i], 1.0, T)
    torch.testing.assert_close(log_prob, traj.log_probs[b, i], rtol=0, atol=1e-6)


def test_float16_keeps_the_vae_in_float32():
    """SDXL's VAE overflows in float16: with force_upcast it stays float32 (and decodes outside autocast)."""
    models = diffusion.load_models("tiny-sdxl", dtype=torch.float16)
    assert models.unet.dtype == models.text_encoder_2.dtype == torch.float16 and models.vae.dtype == torch.float32
    cond, uncond = diffusion.encode_text(models, ["a cat"]), diffusion.encode_text(models, [""])
    with torch.no_grad(), common.Precision("cpu", torch.float16).autocast():
        traj = diffusion.sample(models, cond, uncond, 5.0, T, 1.0, torch.Generator().manual_seed(0))
    assert traj.images.dtype == torch.float32 and torch.isfinite(traj.images).all()
    assert diffusion.load_models("tiny-sdxl", dtype=torch.bfloat16).vae.dtype == torch.bfloat16  # no overflow there


# -----------------------------------------------------------------------------
# Prompt weighting

def test_prompt_weighting_weights_both_encoders_not_the_pooled_row(sdxl):
    """At the chosen phrase's positions both encoders' feature slices (32 + 32) are multiplied by w; the
    pooled row is never touched, and the rescale keeps the mean of the 77 token rows."""
    cond, positions = diffusion.encode_prompts(sdxl, PROMPTS)
    out, phrase, weights = explore.weight_prompts(cond, positions, ExploreConfig(rescale=False), torch.Generator().manual_seed(1),
                                                   tokens=77)
    assert out.shape == cond.shape and torch.equal(out[:, 77], cond[:, 77])
    for b in range(3):
        chosen = positions[b][phrase[b]]
        others = [i for i in range(77) if i not in chosen]
        for features in (slice(0, 32), slice(32, 64)):  # encoder 1, encoder 2
            torch.testing.assert_close(out[b, chosen, features], cond[b, chosen, features] * weights[b])
        assert torch.equal(out[b, others], cond[b, others])
    out, _, _ = explore.weight_prompts(cond, positions, ExploreConfig(), torch.Generator().manual_seed(1), tokens=77)
    assert torch.equal(out[:, 77], cond[:, 77])
    torch.testing.assert_close(out[:, :77].mean(dim=(1, 2)), cond[:, :77].mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, cond)


# -----------------------------------------------------------------------------
# LoRA

def lora_unet(sdxl, rank=4, alpha=8, seed=0):
    unet = copy.deepcopy(sdxl.unet)
    lora.inject(unet, rank=rank, alpha=alpha, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora.lora_layers(unet).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
    return unet


def test_lora_round_trip_and_diffusers(sdxl, sdxl_folder, tmp_path):
    """The default targets wrap SDXL's self- and cross-attention projections; save / load is exact, and
    diffusers' StableDiffusionXLPipeline.load_lora_weights reproduces our UNet's output."""
    unet = lora_unet(sdxl)
    names = list(lora.lora_layers(unet))
    assert any(".attn1.to_q" in n for n in names) and any(".attn2.to_k" in n for n in names)
    lora.save(unet, str(tmp_path))
    fresh = lora_unet(sdxl, seed=7)
    lora.load(fresh, str(tmp_path))
    cond = diffusion.encode_text(sdxl, ["a cat", "a dog"])
    ours = unet_out(unet, cond)
    assert torch.equal(unet_out(fresh, cond), ours)
    assert not torch.allclose(ours, unet_out(sdxl.unet, cond), atol=1e-3)  # LoRA changes the output
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), add_watermarker=False)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(unet_out(pipe.unet, cond), ours, rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# The trainers

@pytest.mark.parametrize("trainer, small", [(train_ddpo, small_ddpo), (train_alignprop, small_alignprop)])
def test_training_step_on_tiny_sdxl(tmp_path, trainer, small):
    """One epoch of the tiny preset with --model tiny-sdxl, exploring: it runs, moves the LoRA weights (B
    starts at zero), and DDPO's re-scoring is on-policy (ratio 1 before the first update)."""
    cfg = small(tmp_path, model="tiny-sdxl", explore=ExploreConfig(t_thres=500))
    run = trainer.main(cfg)
    (rec,) = scaffold.read_metrics(os.path.join(run, "metrics.jsonl"))
    assert rec["exploring"] and rec["grad_norm"] > 0
    if trainer is train_ddpo:
        assert rec["first_ratio_err"] < 1e-5
    weights = load_file(os.path.join(scaffold.latest_checkpoint(run), lora.WEIGHT_NAME))
    assert any(".attn2.to_k.lora_B" in k for k in weights)
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
