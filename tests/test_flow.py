"""flow.py, the flow-matching family (SD3 / SD3.5) on the tiny model: the ODE sampler equals diffusers'
StableDiffusion3Pipeline on the same saved folder, the SDE step's log-prob equals an independent Gaussian
computation of Flow-GRPO's step, and re-scoring a rollout gives its log-probs back exactly (ratio 1)."""

import math

import pytest
import torch

import flow


@pytest.fixture(scope="module")
def sd3():
    return flow.load_flow_models("tiny-sd3")


@pytest.fixture(scope="module")
def saved(sd3, tmp_path_factory):
    """The tiny model saved as a diffusers folder (StableDiffusion3Pipeline.save_pretrained)."""
    from diffusers import StableDiffusion3Pipeline
    folder = tmp_path_factory.mktemp("tiny-sd3")
    (e1, e2, e3), (t1, t2, t3) = sd3.text_encoders, sd3.tokenizers
    pipe = StableDiffusion3Pipeline(transformer=sd3.transformer, scheduler=sd3.scheduler, vae=sd3.vae, text_encoder=e1,
                                    tokenizer=t1, text_encoder_2=e2, tokenizer_2=t2, text_encoder_3=e3, tokenizer_3=t3)
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("guidance", [5.0, 1.0])  # CFG on; off (the pipeline then runs the conditional rows alone)
def test_ode_sampler_equals_the_sd3_pipeline(saved, guidance):
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    models = flow.load_flow_models(saved)  # the same folder through our loader
    texts = ["a red circle", "a dolphin riding a bike"]
    x_T = torch.randn((2, *models.latent_shape), generator=torch.Generator().manual_seed(3))
    expected = pipe(texts, num_inference_steps=4, guidance_scale=guidance, latents=x_T.clone(), output_type="latent",
                    max_sequence_length=models.t5_length).images
    cond, pooled = flow.encode_text(models, texts)
    # the pipeline encodes the empty negative prompt once per sample: the same batch size, the same kernels
    uncond, pooled_uncond = flow.encode_text(models, [""] * 2)
    traj = flow.sample(models, cond, pooled, uncond, pooled_uncond, torch.full((2, 4), guidance), 4,
                       torch.Generator().manual_seed(0), x_T=x_T, decode=False)
    assert torch.equal(traj.latents[:, -1], expected)  # the same batches, kernels and order: bit for bit
    assert torch.equal(traj.log_probs, torch.zeros(2, 4))  # the ODE has no likelihood
    assert traj.sigmas[0] == 1 and traj.sigmas[-1] == 0


def test_sde_step_log_prob_equals_an_independent_gaussian():
    """Flow-GRPO's step, written out independently: dx = [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt + s dW,
    dt = sigma_next - sigma < 0, s = a sqrt(sigma / (1 - sigma)); one Euler-Maruyama step is Gaussian with
    std s sqrt(-dt). The log-prob is the mean over elements of torch.distributions.Normal's log-density."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma, sigma_next, a = 0.8, 0.6, 0.7
    s = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = x + (v + s ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = s * math.sqrt(-dt)
    assert flow.sde_std(torch.tensor(sigma), torch.tensor(sigma_next), 0.9, a).item() == pytest.approx(std, rel=1e-6)
    x_next, log_prob = flow.flow_step(v, x, sigma, sigma_next, torch.full((3,), std), generator=torch.Generator().manual_seed(1))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_next, mean + std * z, rtol=1e-5, atol=1e-6)
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
    # std 0: the ODE step (the scheduler's Euler step), log-prob 0
    ode, zero = flow.flow_step(v, x, sigma, sigma_next, None)
    dt32 = torch.tensor(sigma_next) - torch.tensor(sigma)  # float32, as the scheduler's sigmas
    assert torch.equal(ode, x + dt32 * v) and torch.equal(zero, torch.zeros(3))
    # the first step (sigma = 1) takes sigma_max inside the root instead of dividing by 0
    assert flow.sde_std(torch.tensor(1.0), torch.tensor(0.9), 0.9, a).item() == pytest.approx(a * math.sqrt(1 / (1 - 0.9)) * math.sqrt(1 - 0.9), rel=1e-6)


def test_rescoring_a_rollout_gives_its_log_probs_exactly(sd3):
    """SDE inside a window of steps (ODE elsewhere): re-scoring each stored transition with the same model is
    exactly the sampled log-prob (ratio 1 before any update), and the same seed gives the same rollout."""
    cond, pooled = flow.encode_text(sd3, ["a red circle", "a cat", "an owl"])
    uncond, pooled_uncond = flow.encode_text(sd3, [""])
    w = torch.full((3, 5), 4.0)
    run = lambda: flow.sample(sd3, cond, pooled, uncond, pooled_uncond, w, 5, torch.Generator().manual_seed(7),
                              noise_level=0.7, sde_steps=(1, 3), decode=False)
    traj = run()
    assert torch.equal(traj.latents, run().latents)
    assert (traj.log_probs[:, [0, 3, 4]] == 0).all() and (traj.log_probs[:, 1:3] != 0).all()
    ts, s = flow.schedule(sd3, 5)
    for i in (1, 2):
        v = flow.guided_velocity(sd3.transformer, traj.latents[:, i], ts[i], cond, pooled, uncond, pooled_uncond, w[:, i])
        std = flow.sde_std(s[i], s[i + 1], s[1].item(), 0.7)
        _, log_prob = flow.flow_step(v, traj.latents[:, i], s[i], s[i + 1], std, x_next=traj.latents[:, i + 1])
        assert torch.equal(log_prob, traj.log_probs[:, i])


def test_unknown_flow_model_is_a_config_error():
    from common import ConfigError
    with pytest.raises(ConfigError, match="--model 'sd3-tiny': not a flow model name"):
        flow.load_flow_models("sd3-tiny")


def test_transformer_lora_loads_into_the_sd3_pipeline(sd3, saved, tmp_path):
    """LoRA on the joint attention's image and context projections, saved by lora.save under 'transformer.':
    StableDiffusion3Pipeline.load_lora_weights reproduces our transformer's output (alpha != rank)."""
    pytest.importorskip("peft")
    import copy
    from diffusers import StableDiffusion3Pipeline
    import lora
    transformer = copy.deepcopy(sd3.transformer)
    params = lora.inject(transformer, flow.LORA_TARGETS, rank=4, alpha=8, seed=1)
    names = lora.lora_layers(transformer)
    assert any(n.endswith("add_q_proj") for n in names) and any(n.endswith("to_add_out") for n in names)
    with torch.no_grad():
        for p in params[1::2]:  # B starts at zero: give it values so that the LoRA changes the output
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    lora.save(transformer, str(tmp_path / "lora"), prefix=flow.LORA_PREFIX)
    g = torch.Generator().manual_seed(0)
    x, states, pooled = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 109, 64, generator=g), torch.randn(2, 64, generator=g)

    def out(model):
        return model(hidden_states=x, timestep=torch.tensor([500.0, 500.0]), encoder_hidden_states=states,
                     pooled_projections=pooled, return_dict=False)[0]
    pipe = StableDiffusion3Pipeline.from_pretrained(saved)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ours = out(transformer)
    torch.testing.assert_close(out(pipe.transformer), ours, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, out(sd3.transformer), atol=1e-3)  # the LoRA changes the output


def test_t_thres_maps_to_the_flow_schedule_by_noise_level():
    """A flow step explores (t > t_thres on SD v1.5's scale) exactly when its sigma is noisier than the sigma of
    equal signal-to-noise ratio: (1 - s)^2 / s^2 = alpha_bar / (1 - alpha_bar) at t_thres, s = 1 / (1 + sqrt(SNR)).
    Away from that crossing by more than the timestep grid's spacing, both agree; the ends map to 999 and 0."""
    from diffusers import DDIMScheduler
    import diffusion
    alphas = DDIMScheduler(**diffusion.SD15_SCHEDULER).alphas_cumprod.double()
    for t_thres in (700, 800, 900):
        snr = alphas[t_thres] / (1 - alphas[t_thres])
        s_thres = (1 / (1 + snr.sqrt())).item()
        sig = torch.linspace(0.0, 1.0, 2001)
        far = (sig - s_thres).abs() > 0.01
        explores = flow.sd_timesteps(sig) > t_thres
        assert torch.equal(explores[far], (sig > s_thres)[far])
    t = flow.sd_timesteps(torch.tensor([1.0, 0.0]))
    assert t.tolist() == [999, 0]
    assert (flow.sd_timesteps(torch.linspace(1, 0, 50)).diff() <= 0).all()  # less noise, earlier timestep


def test_kl_to_the_reference_step_equals_torch_distributions():
    g = torch.Generator().manual_seed(2)
    m, m_ref, std = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.1, 0.3, 1.0])
    s = std.view(3, 1, 1, 1).expand_as(m)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m, s),
                                                 torch.distributions.Normal(m_ref, s)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(flow.kl_same_std(m, m_ref, std), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(flow.kl_same_std(m, m, 0.5), torch.zeros(3))


def test_resolution_sets_the_latent_and_image_size(sd3):
    """--sample.resolution: a 64 px image is a 32 x 32 latent (the tiny VAE halves the side once)."""
    import dataclasses
    models = dataclasses.replace(sd3, resolution=64)
    assert models.latent_shape == (4, 32, 32)
    cond, pooled = flow.encode_text(models, ["a cat"])
    traj = flow.sample(models, cond, pooled, *flow.encode_text(models, [""]), torch.full((1, 2), 3.0), 2,
                       torch.Generator().manual_seed(0))
    assert traj.images.shape == (1, 3, 64, 64)


def test_sd35m_random_architecture_fits_together():
    """sd35m-random, built without weights (meta device: no 32 GB draw): the three encoders' widths are what
    the transformer reads (CLIP-L + CLIP-G pooled = its pooled projection, T5's width = its joint attention),
    the VAE's latents are its channels, the second attention sits in the first 13 blocks only, and the sizes
    are SD3.5 Medium's (a 2.2 B transformer, 24 blocks of 1536)."""
    import diffusion
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**flow.SD35M_TRANSFORMER)
        vae = AutoencoderKL(**flow.SD35M_VAE)
        clip_l, clip_g = (CLIPTextModelWithProjection(CLIPTextConfig(**c))
                          for c in (diffusion.SD15_TEXT, diffusion.SDXL_TEXT_2))
        t5 = T5EncoderModel(T5Config(**flow.SD35M_T5))
    c = transformer.config
    assert clip_l.config.projection_dim + clip_g.config.projection_dim == c.pooled_projection_dim == 2048
    assert clip_l.config.hidden_size + clip_g.config.hidden_size <= t5.config.d_model == c.joint_attention_dim
    assert vae.config.latent_channels == c.in_channels == c.out_channels == 16
    assert [b.attn2 is not None for b in transformer.transformer_blocks] == [i < 13 for i in range(24)]
    assert c.num_attention_heads * c.attention_head_dim == 1536
    assert 2.2e9 < sum(p.numel() for p in transformer.parameters()) < 2.3e9
    assert flow.is_flow_model("sd35m-random")
