"""Tests for diffusion.py on CPU with the tiny offline models: the DDIM step and its log-prob, guidance,
sampling (determinism, re-scoring, the gradient switch), model loading, prompt sets and encoding."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.distributions import Normal

import diffusion
from common import ConfigError
from conftest import float32_tolerance
from diffusion import ddim_step, guided_eps, load_models, load_prompts, sample, step_log_prob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 4  # denoising steps in the sampling tests


def sd15_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(**diffusion.SD15_SCHEDULER)


def reference_step(scheduler, eps, t, x_t, eta, num_steps):
    """The DDIM posterior mean and std (DDIM eqs. 12 and 16) written out independently, in float64."""
    t = torch.as_tensor(t).long().expand(x_t.shape[0])
    alphas = scheduler.alphas_cumprod.double()
    prev_t = t - scheduler.config.num_train_timesteps // num_steps
    a_t = alphas[t].view(-1, 1, 1, 1)
    a_prev = torch.stack([alphas[p] if p >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod).double()
                          for p in prev_t.tolist()]).view(-1, 1, 1, 1)
    eps, x_t = eps.double(), x_t.double()
    x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0_hat + (1 - a_prev - std ** 2).sqrt() * eps
    return mean, std


def reference_log_prob(mean, std, x_prev):
    return Normal(mean, std.expand_as(mean)).log_prob(x_prev.double()).mean(dim=(1, 2, 3))


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(models, cond, uncond, guidance=5.0, eta=1.0, seed=0, **kw):
    return sample(models, cond, uncond, guidance, T, eta, torch.Generator().manual_seed(seed), **kw)


# -----------------------------------------------------------------------------
# The DDIM step with log-prob

@pytest.mark.parametrize("t", [981, 501, 21, 1])  # t = 1 is the final step of 50 (prev_t < 0)
def test_ddim_step_log_prob_matches_normal(t):
    """Sampled x_prev = mean + std * z with z from the generator; log-prob = Normal log-density, mean-reduced."""
    scheduler, eps, x_t = sd15_scheduler(), randn(3, 4, 8, 8, seed=1), randn(3, 4, 8, 8, seed=2)
    x_prev, log_prob = ddim_step(scheduler, eps, t, x_t, 1.0, 50, generator=torch.Generator().manual_seed(3))
    mean, std = reference_step(scheduler, eps, t, x_t, 1.0, 50)
    torch.testing.assert_close(x_prev.double(), mean + std * randn(3, 4, 8, 8, seed=3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_prob.double(), reference_log_prob(mean, std, x_prev), rtol=1e-5, atol=1e-5)
    assert log_prob.shape == (3,)


def test_ddim_step_per_sample_timesteps():
    """t of shape (B,): each sample uses its own alphas, the final step included; re-scoring a given x_prev."""
    scheduler, eps, x_t, x_prev = sd15_scheduler(), randn(4, 4, 8, 8, seed=1), randn(4, 4, 8, 8, seed=2), randn(4, 4, 8, 8, seed=3)
    t = torch.tensor([981, 501, 21, 1])
    out, log_prob = ddim_step(scheduler, eps, t, x_t, 0.7, 50, x_prev=x_prev)
    mean, std = reference_step(scheduler, eps, t, x_t, 0.7, 50)
    assert torch.equal(out, x_prev)
    # a random x_prev lies far from the mean at small std: log-probs of -1e3 and more, so compare relatively
    torch.testing.assert_close(log_prob.double(), reference_log_prob(mean, std, x_prev), rtol=1e-4, atol=1e-5)
    for i in range(4):  # the same as stepping each sample alone
        single = ddim_step(scheduler, eps[i:i + 1], int(t[i]), x_t[i:i + 1], 0.7, 50, x_prev=x_prev[i:i + 1])[1]
        torch.testing.assert_close(single, log_prob[i:i + 1])


def test_ddim_step_final_step_uses_final_alpha_cumprod():
    """prev_t < 0 reads scheduler.final_alpha_cumprod (here changed from SD's value to tell them apart)."""
    scheduler = sd15_scheduler()
    scheduler.final_alpha_cumprod = torch.tensor(0.9999)
    eps, x_t, x_prev = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2), randn(2, 4, 8, 8, seed=3)
    log_prob = ddim_step(scheduler, eps, torch.tensor([1, 21]), x_t, 1.0, 50, x_prev=x_prev)[1]
    mean, std = reference_step(scheduler, eps, torch.tensor([1, 21]), x_t, 1.0, 50)
    torch.testing.assert_close(log_prob.double(), reference_log_prob(mean, std, x_prev), rtol=1e-4, atol=1e-5)
    clamped = reference_step(sd15_scheduler(), eps, 1, x_t, 1.0, 50)
    assert not torch.allclose(clamped[0][:1], mean[:1], atol=1e-4)


def test_schedule_on_device_is_copied_once_and_follows_the_scheduler():
    """The step's schedule is copied to the device once (no host copy per step), not kept once stale."""
    scheduler = sd15_scheduler()
    first = diffusion.schedule_on(scheduler, "cpu")
    assert diffusion.schedule_on(scheduler, "cpu") is first  # reused: nothing copied again
    torch.testing.assert_close(first, torch.cat([scheduler.alphas_cumprod, scheduler.final_alpha_cumprod.view(1)]))
    scheduler.final_alpha_cumprod = torch.tensor(0.9999)  # a changed schedule is read again
    assert diffusion.schedule_on(scheduler, "cpu")[-1].item() == pytest.approx(0.9999)
    x_t, eps = randn(1, 4, 8, 8, seed=1), randn(1, 4, 8, 8, seed=2)
    after = ddim_step(scheduler, eps, 1, x_t, 0.0, 50)[0]  # the last step (prev_t < 0) uses the new final alpha
    torch.testing.assert_close(after.double(), reference_step(scheduler, eps, 1, x_t, 0.0, 50)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t", [981, 1])
def test_ddim_step_matches_diffusers(eta, t):
    """Our step equals diffusers' DDIMScheduler.step with the same noise (an independent implementation)."""
    scheduler, eps, x_t, z = sd15_scheduler(), randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2), randn(2, 4, 8, 8, seed=3)
    scheduler.set_timesteps(50)
    expected = scheduler.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
    x_prev, log_prob = ddim_step(scheduler, eps, t, x_t, eta, 50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_prev, expected, rtol=1e-5, atol=1e-5)
    if eta == 0:
        assert torch.equal(log_prob, torch.zeros(2))


# -----------------------------------------------------------------------------
# Classifier-free guidance

def test_guided_eps_against_separate_unet_calls(tiny, cond, uncond):
    """w = 0 gives the unconditional prediction, w = 1 the conditional one, else u + w (c - u); per sample."""
    x, t, w = randn(3, 4, 16, 16), torch.tensor([901, 501, 1]), torch.tensor([0.0, 1.0, 7.5])
    eps = guided_eps(tiny.unet, x, t, cond, uncond, w)
    with torch.no_grad():
        eps_u = tiny.unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        eps_c = tiny.unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(eps[0], eps_u[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps[1], eps_c[1], rtol=1e-5, atol=1e-5)
    # batched (6) and separate (3) UNet calls round differently; w = 7.5 amplifies that
    torch.testing.assert_close(eps[2], eps_u[2] + 7.5 * (eps_c[2] - eps_u[2]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eps_u, eps_c, atol=1e-4)  # the prompt matters, so the checks above mean something


def test_guidance_float_equals_constant_tensor(tiny, cond, uncond):
    """guidance=5.0 and a (B, T) tensor full of 5.0 sample the same trajectory."""
    a = run(tiny, cond, uncond, 5.0, decode_images=False)
    b = run(tiny, cond, uncond, torch.full((3, T), 5.0), decode_images=False)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


def test_guidance_is_per_sample(tiny64):
    """Row b of a (B, T) guidance tensor is what sample b uses: mixing scales in a batch equals separate runs.
    The three runs batch different rows (guidance skipping: 4, 3 and 6 rows per UNet call), so they run on
    the float64 UNet, where batch composition does not change the float32 results (conftest.tiny64)."""
    models, cond, uncond = tiny64
    mixed = run(models, cond, uncond, torch.tensor([[1.0] * T, [7.5] * T, [1.0] * T]), decode_images=False)
    low = run(models, cond, uncond, 1.0, decode_images=False)
    high = run(models, cond, uncond, 7.5, decode_images=False)
    tol = float32_tolerance(mixed.latents)
    torch.testing.assert_close(mixed.latents[[0, 2]], low.latents[[0, 2]], rtol=0, atol=tol)
    torch.testing.assert_close(mixed.latents[1], high.latents[1], rtol=0, atol=tol)
    assert (low.latents[:, -1] - high.latents[:, -1]).abs().max() > 1e3 * tol  # the scale matters, far beyond tol


# -----------------------------------------------------------------------------
# Sampling

def test_sample_shapes(tiny, cond, uncond):
    """latents (B, T+1, 4, 16, 16), log_probs (B, T), images (B, 3, 32, 32) in [0, 1], SD's timesteps."""
    traj = run(tiny, cond, uncond)
    assert traj.latents.shape == (3, T + 1, 4, 16, 16)
    assert traj.log_probs.shape == (3, T) and torch.isfinite(traj.log_probs).all()
    assert traj.images.shape == (3, 3, 32, 32) and traj.images.min() >= 0 and traj.images.max() <= 1
    assert traj.timesteps.tolist() == [751, 501, 251, 1] and traj.grad_from == T
    assert not traj.images.requires_grad and not traj.latents.requires_grad
    assert tiny.latent_shape == (4, 16, 16) and tiny.image_size == 32
    assert run(tiny, cond, uncond, decode_images=False).images is None


def test_rescoring_returns_stored_log_probs(tiny, cond, uncond):
    """step_log_prob on stored transitions, with per-sample, per-step guidance, returns the stored log-probs;
    also for a batch whose samples sit at different timesteps (DDPO's shuffled training pass)."""
    w = torch.tensor([[1.0, 1.0, 5.0, 5.0], [0.0, 2.0, 4.0, 6.0], [7.5] * T])
    traj = run(tiny, cond, uncond, w, decode_images=False)
    for i in range(T):
        log_prob = step_log_prob(tiny, traj.latents[:, i], traj.timesteps[i], traj.latents[:, i + 1],
                                 cond, uncond, w[:, i], 1.0, T)
        torch.testing.assert_close(log_prob, traj.log_probs[:, i], rtol=0, atol=1e-6)
    b, i = torch.arange(3), torch.tensor([3, 0, 2])
    log_prob = step_log_prob(tiny, traj.latents[b, i], traj.timesteps[i], traj.latents[b, i + 1],
                             cond, uncond.expand(3, -1, -1), w[b, i], 1.0, T)
    torch.testing.assert_close(log_prob, traj.log_probs[b, i], rtol=0, atol=1e-6)
    wrong = step_log_prob(tiny, traj.latents[:, -2], traj.timesteps[-1], traj.latents[:, -1], cond, uncond, torch.zeros(3), 1.0, T)
    assert not torch.allclose(wrong, traj.log_probs[:, -1], atol=1e-3)  # the guidance used matters


def test_eta_zero_is_deterministic_given_x_T(tiny, cond, uncond):
    """eta = 0: log-probs are zero, each step is the DDIM mean of the previous latent (no noise after x_T),
    and the same seed gives the same images."""
    a, b = run(tiny, cond, uncond, eta=0.0), run(tiny, cond, uncond, eta=0.0)
    assert torch.equal(a.images, b.images) and torch.equal(a.log_probs, torch.zeros(3, T))
    assert torch.equal(a.latents[:, 0], randn(3, 4, 16, 16, seed=0) * tiny.scheduler.init_noise_sigma)
    w = torch.full((3,), 5.0)
    for i in range(T):
        eps = guided_eps(tiny.unet, a.latents[:, i], a.timesteps[i], cond, uncond, w)
        mean, _ = reference_step(tiny.scheduler, eps, a.timesteps[i], a.latents[:, i], 0.0, T)
        torch.testing.assert_close(a.latents[:, i + 1].double(), mean, rtol=1e-5, atol=1e-5)


def test_eta_one_seeds(tiny, cond, uncond):
    """eta = 1: the same seed gives identical samples, another seed differs, and noise enters after x_T;
    sampling with a generator leaves the global RNG alone."""
    state = torch.get_rng_state()
    a, b, c = run(tiny, cond, uncond, seed=0), run(tiny, cond, uncond, seed=0), run(tiny, cond, uncond, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.allclose(a.images, c.images, atol=1e-3)
    deterministic = run(tiny, cond, uncond, eta=0.0, seed=0, decode_images=False)
    assert torch.equal(deterministic.latents[:, 0], a.latents[:, 0])
    assert not torch.allclose(deterministic.latents[:, 1], a.latents[:, 1], atol=1e-3)


# -----------------------------------------------------------------------------
# The gradient switch (AlignProp): gradients only through the last K UNet calls and the decode

def trainable_grads(params):
    return [p.grad.clone() for p in params]


def frozen_params(models, lora_params):
    ids = {id(p) for p in lora_params}
    return [p for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters() if id(p) not in ids]


@pytest.mark.parametrize("K", [0, 1, 2, T])
def test_grad_last_k_unet_calls(lora_models, cond, uncond, K):
    """With grad_last_k = K exactly the last K UNet calls run with gradient and give outputs that require grad."""
    models, _ = lora_models()
    calls = []
    hook = models.unet.register_forward_hook(lambda m, i, out: calls.append((torch.is_grad_enabled(), out.sample.requires_grad)))
    traj = run(models, cond, uncond, grad_last_k=K)
    hook.remove()
    assert calls == [(False, False)] * (T - K) + [(True, True)] * K
    assert traj.grad_from == T - K and traj.images.requires_grad == (K > 0)


def reference_images(models, cond, uncond, K, w=7.5):
    """The last K steps (eta = 0) recomputed with gradient from the no-grad trajectory's x at step T - K."""
    traj = run(models, cond, uncond, w, eta=0.0, decode_images=False)
    x = traj.latents[:, T - K]
    for i in range(T - K, T):
        eps = guided_eps(models.unet, x, traj.timesteps[i], cond, uncond, torch.full((3,), w))
        x = ddim_step(models.scheduler, eps, traj.timesteps[i], x, 0.0, T, generator=torch.Generator())[0]
    return diffusion.decode(models, x)


def test_grad_last_k_gradients(lora_models, cond, uncond):
    """For K = 1 and K = T, the LoRA gradients of a loss on the images equal those of an independent run that
    detaches the first T - K steps; they are non-zero and differ between the two K; nothing frozen gets one."""
    models, params = lora_models()
    weight = randn(3, 3, 32, 32, seed=5)
    grads = {}
    for K in (1, T):
        images = run(models, cond, uncond, 7.5, eta=0.0, grad_last_k=K).images
        (images * weight).sum().backward()
        grads[K] = trainable_grads(params)
        assert all(g.abs().sum() > 0 for g in grads[K])
        assert all(p.grad is None for p in frozen_params(models, params))
        for p in params:
            p.grad = None
        expected = reference_images(models, cond, uncond, K)
        torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
        (expected * weight).sum().backward()
        for g, p in zip(grads[K], params):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
            p.grad = None
    assert not torch.allclose(torch.cat([g.flatten() for g in grads[1]]), torch.cat([g.flatten() for g in grads[T]]),
                              rtol=1e-3, atol=1e-6)  # the first T - 1 steps are really cut when K = 1


def test_no_trainable_params_no_grad(tiny, cond, uncond):
    """grad_last_k on the frozen model: images need no gradient and no parameter gets one."""
    traj = run(tiny, cond, uncond, grad_last_k=2)
    assert not traj.images.requires_grad
    assert all(p.grad is None and not p.requires_grad for m in (tiny.unet, tiny.vae, tiny.text_encoder) for p in m.parameters())


def test_checkpointing_same_images_and_gradients(lora_models, cond, uncond):
    """Gradient checkpointing changes neither the samples nor the LoRA gradients (eta = 1, same seed)."""
    models, params = lora_models()
    out = {}
    for checkpointing in (True, False):
        traj = run(models, cond, uncond, 5.0, eta=1.0, grad_last_k=2, checkpointing=checkpointing)
        (traj.images * randn(3, 3, 32, 32, seed=5)).sum().backward()
        out[checkpointing] = traj, trainable_grads(params)
        for p in params:
            p.grad = None
    (a, grads_a), (b, grads_b) = out[True], out[False]
    torch.testing.assert_close(a.images, b.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-5)
    for g_a, g_b in zip(grads_a, grads_b):
        torch.testing.assert_close(g_a, g_b, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# Model loading

def test_unknown_model_name():
    """A name that is no model, folder or hub id fails with a ValueError naming --model."""
    with pytest.raises(ValueError, match="--model"):
        load_models("no-such-model")
    with pytest.raises(ValueError, match="--model"):
        load_models(os.path.join("/", "no", "such", "folder"))


def test_invalid_local_folder(tmp_path):
    """An existing folder that is no diffusers model fails with a ConfigError naming the folder."""
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match="--model") as e:
        load_models(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_local_folder_loads(tiny, tiny_folder):
    """A saved diffusers folder loads to the same models (UNet output, tokenizer ids, VAE present)."""
    models = load_models(str(tiny_folder))
    x, t, c = randn(2, 4, 16, 16), torch.tensor([500, 20]), randn(2, 77, 32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(models.unet(x, t, encoder_hidden_states=c).sample,
                                   tiny.unet(x, t, encoder_hidden_states=c).sample, rtol=0, atol=1e-6)
    texts = ["a dolphin riding a bike", "A Photo of a CAT!"]
    assert torch.equal(diffusion.tokenize(models.tokenizer, texts), diffusion.tokenize(tiny.tokenizer, texts))
    assert models.vae is not None and models.image_size == 32
    assert not any(p.requires_grad for p in models.unet.parameters())


def test_hub_id_offline_error(tmp_path):
    """Offline, a hub id (and sd15, sdxl) fails with a ConfigError naming the id, the download command that the
    installed huggingface_hub ships, --model DIR and HF_HUB_OFFLINE, without first trying the network.
    Runs in a subprocess because huggingface_hub reads HF_HUB_OFFLINE at import; an empty cache."""
    code = ("import diffusion\n"
            "for name in ('someone/no-such-model', 'sd15', 'sdxl'):\n"
            "    try:\n"
            "        diffusion.load_models(name)\n"
            "    except ValueError as e:  # a ConfigError\n"
            "        print('ERROR', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "DIFFUSERS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 3, out.stdout + out.stderr
    for line, hub_id in zip(errors, ("someone/no-such-model", diffusion.SD15_HUB_ID, diffusion.SDXL_HUB_ID)):
        assert hub_id in line and "--model DIR" in line and "HF_HUB_OFFLINE=1" in line
        assert f"`hf download {hub_id} --local-dir DIR`" in line and "huggingface-cli" not in line
    assert "Retrying" not in out.stderr and "retry" not in out.stderr.lower()  # no network attempts first
    hf = shutil.which("hf", path=os.path.dirname(sys.executable))
    assert hf, "the command the message names is installed with huggingface_hub"


def test_sd15_random_architecture():
    """'sd15-random' builds SD v1.5's architecture: checked on the meta device (no memory, no weights)."""
    cfg = diffusion.SD15_UNET
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280) and cfg["cross_attention_dim"] == 768
    try:
        with torch.device("meta"):
            models = load_models("sd15-random", device="meta")
    except Exception as e:  # depends on the diffusers / torch versions
        pytest.skip(f"diffusers cannot build on the meta device here: {e}")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(models.unet) == 859_520_964  # SD v1.5's UNet
    assert count(models.vae) == 83_653_863 and count(models.text_encoder) == 123_060_480
    assert models.latent_shape == (4, 64, 64) and models.image_size == 512
    assert models.text_encoder.config.hidden_size == models.unet.config.cross_attention_dim == 768


# -----------------------------------------------------------------------------
# Prompt encoding

TEXTS = ["a dolphin riding a bike", "A Photo of a CAT!", "Hello, world. It's 2024 -- isn't it?",
         'A sign that says "Deep Learning".', "an astronaut riding a horse; photorealistic, 4K", "word " * 100]


def test_tokenizer_matches_open_clip(tiny):
    """The offline tokenizer gives open_clip's ViT-L-14 ids; padded to 77 with 49407."""
    import open_clip
    ids, ref = diffusion.tokenize(tiny.tokenizer, TEXTS), open_clip.get_tokenizer("ViT-L-14")(TEXTS)
    assert ids.shape == (len(TEXTS), 77)
    for i in range(len(TEXTS)):
        n = int((ref[i] != 0).sum())  # open_clip pads with 0
        assert torch.equal(ids[i, :n], ref[i, :n]), TEXTS[i]
        assert (ids[i, n:] == 49407).all()
    assert (ids[:, 0] == 49406).all() and ids[-1, -1] == 49407  # start token; a truncated prompt keeps its end


def test_phrase_positions(tiny):
    """Phrase token positions in the 77 ids (position 0 is the start token); a missing phrase raises."""
    prompt = diffusion.Prompt("a dolphin riding a bike", ("dolphin", "riding a bike"))
    assert diffusion.phrase_positions(tiny.tokenizer, prompt) == [[2], [3, 4, 5]]
    with pytest.raises(ValueError, match="giraffe"):
        diffusion.phrase_positions(tiny.tokenizer, diffusion.Prompt("a dolphin riding a bike", ("giraffe",)))


def test_encode_prompts(tiny, prompts):
    """encode_prompts: (B, 77, D) hidden states of the padded ids, and each prompt's phrase positions."""
    hidden, positions = diffusion.encode_prompts(tiny, prompts)
    assert hidden.shape == (3, 77, 32) and positions[0] == [[2], [3, 4, 5]]
    with torch.no_grad():
        ids = diffusion.tokenize(tiny.tokenizer, [p.text for p in prompts])
        torch.testing.assert_close(hidden, tiny.text_encoder(ids).last_hidden_state)


# -----------------------------------------------------------------------------
# Prompt sets

def read_csv_prompts():
    with open(os.path.join(ROOT, "prompts", "drawbench.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_animal_prompt_sets():
    """45 animals, 135 'a/an {animal} {activity}' prompts with phrases (animal, activity), 6 unseen animals."""
    animals, unseen = load_prompts("animals"), load_prompts("unseen-animals")
    assert len(animals) == 45 and len(unseen) == 6 and len({p.text for p in animals}) == 45
    assert all(p.phrases == (p.text,) for p in animals + unseen)
    assert {p.text for p in unseen}.isdisjoint(p.text for p in animals)
    activities = load_prompts("animal-activities")
    assert len(activities) == 135 and len({p.text for p in activities}) == 135
    for p in activities:
        animal, activity = p.phrases
        assert p.text == f"{'an' if animal[0] in 'aeiou' else 'a'} {animal} {activity}"
    assert {p.phrases[1] for p in activities} == {"washing the dishes", "riding a bike", "playing chess"}
    assert any(p.text.startswith("an ") for p in activities) and any(p.text.startswith("a ") for p in activities)


def test_drawbench_and_categories():
    """DrawBench: 200 prompts; 'drawbench:Colors' gives exactly the rows of that category; unknown category raises."""
    rows = read_csv_prompts()
    assert len(load_prompts("drawbench")) == len(rows) == 200
    colors = load_prompts("drawbench:Colors")
    expected = [r["Prompts"] for r in rows if r["Category"] == "Colors"]
    assert colors and [p.text for p in colors] == [diffusion.parse_marked(t).text for t in expected]
    both = load_prompts("drawbench:Colors,Counting")
    assert len(both) == len(expected) + sum(r["Category"] == "Counting" for r in rows)
    with pytest.raises(ValueError, match="no-such-category"):
        load_prompts("drawbench:no-such-category")


def test_marked_txt_file(tmp_path):
    """A .txt file: [brackets] mark phrases; unmarked lines use their content words; comments skipped."""
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\na [red] [circle]\n\nthe cat on a mat\n")
    assert load_prompts(str(path)) == [diffusion.Prompt("a red circle", ("red", "circle")),
                                       diffusion.Prompt("the cat on a mat", ("cat", "mat"))]
    with pytest.raises(ValueError, match="unbalanced"):
        diffusion.parse_marked("a [red circle")


def test_prompt_errors(tmp_path, monkeypatch):
    """Missing file (also a bare file name), empty file and unknown set name give clear errors."""
    with pytest.raises(ConfigError, match="missing.txt"):
        load_prompts(str(tmp_path / "missing.txt"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="missing.txt"):
        load_prompts("missing.txt")
    with pytest.raises(ConfigError, match="missing.csv"):
        load_prompts(str(tmp_path / "missing.csv"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(str(empty))
    with pytest.raises(ValueError, match="no-such-set"):
        load_prompts("no-such-set")
