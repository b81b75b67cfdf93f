"""The toy world (toy.py, toy_pretrain.py): the generator, the toy rewards, the prompt files, pretraining, and the
shipped toy model."""

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

import scaffold
import lora
import toy
import toy_pretrain
import train_alignprop
import train_ddpo
from diffusion import ddim_step, encode_text, load_models, load_prompts, phrase_positions, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MODEL = os.path.join(ROOT, "weights", "toy")


def wrong_captions(labels: torch.Tensor, what: str) -> list[str]:
    """Captions that get the colour (or the shape) wrong, deterministically."""
    out = []
    for i, (c, s) in enumerate(labels.tolist()):
        if what == "colour":
            c = (c + 1 + i % (len(toy.COLOURS) - 1)) % len(toy.COLOURS)
        else:
            s = (s + 1 + i % (len(toy.SHAPES) - 1)) % len(toy.SHAPES)
        out.append(toy.caption(c, s))
    return out


@pytest.fixture(scope="module")
def world():
    return toy.make_batch(256, torch.Generator().manual_seed(7))


def test_make_batch_is_deterministic_per_seed():
    a = toy.make_batch(32, torch.Generator().manual_seed(3))
    b = toy.make_batch(32, torch.Generator().manual_seed(3))
    c = toy.make_batch(32, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not torch.equal(a[0], c[0])


def test_captions_match_images(world):
    images, captions, labels = world
    assert images.shape == (256, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert captions == [toy.caption(c, s) for c, s in labels.tolist()]
    assert set(captions) == set(toy.all_captions())  # every colour-shape pair occurs
    reward = toy.toy_alignment()
    own = reward(images, captions)
    assert own.shape == (256,) and own.dtype == torch.float32
    # the smallest circles (radius 3.5, 7 px across) are blocky, so their circle-vs-square score is modest
    assert own.mean() > 0.9 and (own > 0.6).float().mean() > 0.97
    assert reward(images, wrong_captions(labels, "colour")).max() < 0.15
    assert reward(images, wrong_captions(labels, "shape")).quantile(0.99) < 0.3
    for tone in (0.1, 0.5):  # no object at all, on a dark or a light background
        assert reward(torch.full((2, 3, 32, 32), tone), captions[:2]).eq(0).all()


def test_unspecified_attributes_follow_their_distribution():
    """Size ~ U(3.5, 9.5), dark backgrounds with probability 0.2 (tones in their two ranges), centres where
    the shape fits with a 1 px margin, independent of colour and shape; and attributes() reads them back."""
    n = 20000
    a = toy.sample_attributes(n, torch.Generator().manual_seed(11))
    lo, hi = toy.SIZE_RANGE
    assert lo <= a["radius"].min() and a["radius"].max() <= hi
    for q in (0.25, 0.5, 0.75):  # the quartiles of a uniform distribution, to 3 standard errors
        assert abs(a["radius"].quantile(q).item() - (lo + q * (hi - lo))) < 3 * (hi - lo) * (q * (1 - q) / n) ** 0.5 * 1.5
    dark = a["background"] < toy.DARK_BELOW
    assert abs(dark.float().mean().item() - toy.DARK_FRACTION) < 3 * (0.2 * 0.8 / n) ** 0.5
    assert a["background"][dark].min() >= toy.DARK_TONES[0] and a["background"][dark].max() <= toy.DARK_TONES[1]
    assert a["background"][~dark].min() >= toy.LIGHT_TONES[0] and a["background"][~dark].max() <= toy.LIGHT_TONES[1]
    margin = toy.half_extent(a["radius"]) + 1
    assert (a["centre"] >= margin[:, None] - 1e-4).all() and (a["centre"] <= 32 - margin[:, None] + 1e-4).all()
    small = a["radius"] < toy.SMALL_RADIUS
    assert abs(small.float().mean().item() - (toy.SMALL_RADIUS - lo) / (hi - lo)) < 0.02
    for c in range(len(toy.COLOURS)):  # background and size do not depend on the caption
        assert abs(dark[a["colour"] == c].float().mean().item() - toy.DARK_FRACTION) < 0.04
    images = toy.render({k: v[:512] for k, v in a.items()})
    read = toy.attributes(images)
    assert read["present"].all()
    assert (read["tone"] - a["background"][:512]).abs().max() < 1e-5
    assert (read["radius"] - a["radius"][:512]).abs().mean() < 0.3
    # a triangle's centroid lies a third of its half-height below the centre of its box (apex up)
    y = a["centre"][:512, 1] + torch.where(a["shape"][:512] == 2, toy.half_extent(a["radius"][:512]) / 3, 0.0)
    assert (read["x"] - a["centre"][:512, 0]).abs().mean() < 0.3 and (read["y"] - y).abs().mean() < 0.3


def test_aesthetic_reward_prefers_the_low_key_configuration():
    """A small shape on a thirds point over a dark background scores near 1 and above the world's common
    configuration (a larger, central shape on a light background); noise, a colour blowout, an empty frame
    and a noisy copy of the preferred image score near 0; gradients reach the pixels."""
    g = torch.Generator().manual_seed(0)
    a = toy.sample_attributes(6, g)
    centroid = torch.tensor([[32 / 3, 32 / 3], [64 / 3, 32 / 3], [32 / 3, 64 / 3]] * 2)  # on thirds points
    lift = torch.where(a["shape"] == 2, toy.half_extent(torch.tensor(toy.AESTHETIC_RADIUS)) / 3, 0.0)  # a triangle's centroid sits low
    preferred = {**a, "radius": torch.full((6,), toy.AESTHETIC_RADIUS), "background": torch.full((6,), 0.1),
                 "centre": centroid - torch.stack([torch.zeros(6), lift], 1)}
    common_ = {**a, "radius": torch.full((6,), 8.0), "background": torch.full((6,), 0.55), "centre": torch.full((6, 2), 16.0)}
    reward = toy.toy_aesthetic()
    best, usual = reward(toy.render(preferred), [""] * 6), reward(toy.render(common_), [""] * 6)
    assert best.min() > 0.9 and usual.max() < 0.2
    bad = torch.cat([torch.rand(2, 3, 32, 32, generator=g),  # noise
                     torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 32, 32),  # a red blowout
                     torch.full((2, 3, 32, 32), 0.05),  # an empty dark frame
                     (toy.render(preferred)[:2] + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)])  # grain
    assert reward(bad, [""] * 8).max() < 0.05
    world = reward(toy.make_batch(2048, g)[0], [""] * 2048)
    assert 0.15 < world.mean() < 0.35 and 0.003 < (world > 0.8).float().mean() < 0.03  # rare in the world
    x = toy.render(common_).requires_grad_(True)
    reward(x, [""] * 6).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


DIAL = [f"toy-dial-{level}" for level in toy.DIAL_LEVELS]  # dense, medium, sparse


def dial_scores(images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: toy.TOY_REWARDS[name]()(images, [""] * len(images)) for name in DIAL + ["toy-dial-success"]}


def preferred_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """The dial's preferred configuration, rendered by the world: radius AESTHETIC_RADIUS, the centroid on each
    thirds point in turn (a triangle's centroid sits a third of its half-height below its box's centre)."""
    a = toy.sample_attributes(n, generator)
    points = torch.tensor([[32 / 3, 32 / 3], [64 / 3, 32 / 3], [32 / 3, 64 / 3], [64 / 3, 64 / 3]]).repeat(n // 4 + 1, 1)[:n]
    radius = torch.full((n,), toy.AESTHETIC_RADIUS)
    lift = torch.where(a["shape"] == 2, toy.half_extent(radius) / 3, 0.0)
    return toy.render({**a, "radius": radius, "centre": points - torch.stack([torch.zeros(n), lift], 1)})


def cfg5_like_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """World images in CFG 5's common configuration: a large shape (radius 7.5 .. 9.5) near the centre."""
    a = toy.sample_attributes(n, generator)
    radius = 7.5 + 2 * torch.rand(n, generator=generator)
    return toy.render({**a, "radius": radius, "centre": 16 + 6 * (torch.rand(n, 2, generator=generator) - 0.5)})


def test_dial_rewards_score_one_preferred_configuration_at_every_level():
    """The preferred image scores high, and at or above its success level, at every level, and succeeds; CFG 5's
    common configuration scores a real amount at the dense end and about 0 at the sparse end; noise and
    blown-out frames score 0; scores lie in [0, 1], ordered dense >= medium >= sparse."""
    g = torch.Generator().manual_seed(0)
    best = dial_scores(preferred_images(24, g))
    for name in DIAL:
        assert best[name].min() > 0.75 and (best[name] >= toy.DIAL_SUCCESS_LEVELS[name]).all()
    assert best["toy-dial-success"].eq(1).all()
    common_ = dial_scores(cfg5_like_images(256, g))
    assert common_["toy-dial-dense"].min() > 0.2 and common_["toy-dial-medium"].max() < toy.DIAL_SUCCESS_LEVELS["toy-dial-medium"]
    assert common_["toy-dial-sparse"].max() < 1e-6 and common_["toy-dial-success"].eq(0).all()
    blank = torch.cat([torch.ones(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.5)])  # white, black, flat grey
    noise = torch.cat([torch.rand(4, 3, 32, 32, generator=g), (0.5 + 0.2 * torch.randn(4, 3, 32, 32, generator=g)).clamp(0, 1)])
    for name, r in dial_scores(blank).items():
        assert r.eq(0).all(), name
    for name, r in dial_scores(noise).items():
        assert r.max() < 1e-3, name
    world = dial_scores(toy.make_batch(2048, g)[0])
    for scores in (best, common_, world):
        for name in DIAL:
            assert scores[name].dtype == torch.float32 and scores[name].min() >= 0 and scores[name].max() <= 1
        assert (scores["toy-dial-dense"] >= scores["toy-dial-medium"]).all() and (scores["toy-dial-medium"] >= scores["toy-dial-sparse"]).all()
    assert 0.01 < world["toy-dial-success"].mean() < 0.08  # rare in the world, but there
    for name in DIAL:  # the world's objects are clean, so each level's success level marks exactly the successes
        assert torch.equal((world[name] >= toy.DIAL_SUCCESS_LEVELS[name]).float(), world["toy-dial-success"]), name


def test_dial_gradients_are_dense_at_one_end_and_vanish_at_the_other():
    """With the soft edges of the model's samples (a rendered edge blurred by a 3x3 box), every image of CFG 5's
    common configuration has a gradient at the dense end and none to speak of at the sparse end. (On a
    perfectly crisp render the soft mask can be saturated at every pixel: a measurement with no gradient.)"""
    crisp = cfg5_like_images(16, torch.Generator().manual_seed(1))
    images = (crisp + torch.nn.functional.avg_pool2d(torch.nn.functional.pad(crisp, (1, 1, 1, 1), mode="replicate"), 3, stride=1)) / 2
    grads = {}
    for name in DIAL:
        x = images.clone().requires_grad_(True)
        toy.TOY_REWARDS[name]()(x, [""] * 16).sum().backward()
        assert torch.isfinite(x.grad).all()
        grads[name] = x.grad.abs().flatten(1).sum(1)  # per image
    assert grads["toy-dial-dense"].min() > 1e-2  # every typical image is pulled towards the configuration
    assert grads["toy-dial-sparse"].max() < 1e-6  # and none is at the sparse end
    assert grads["toy-dial-medium"].max() < grads["toy-dial-dense"].max()
    near = preferred_images(8, torch.Generator().manual_seed(3))  # the preferred configuration, shifted 1 px and blurred
    near = torch.roll(near, 1, dims=-1)
    x = ((near + torch.nn.functional.avg_pool2d(torch.nn.functional.pad(near, (1, 1, 1, 1), mode="replicate"), 3, stride=1)) / 2).requires_grad_(True)
    toy.TOY_REWARDS["toy-dial-sparse"]()(x, [""] * 8).sum().backward()
    assert x.grad.abs().flatten(1).sum(1).min() > 1e-2  # near it, the sparse end has a gradient too


def test_dial_registry():
    for name in DIAL + ["toy-dial-success"]:
        assert name in toy.TOY_REWARDS and name in toy.DIAL_SUCCESS_LEVELS
    assert set(DIAL) <= toy.TOY_DIFFERENTIABLE and "toy-dial-success" not in toy.TOY_DIFFERENTIABLE
    levels = [toy.DIAL_SUCCESS_LEVELS[name] for name in DIAL]
    assert levels == sorted(levels, reverse=True) and 0 < levels[-1]  # the sparser, the lower the score at D = 1
    x = preferred_images(4, torch.Generator().manual_seed(2)).requires_grad_(True)
    assert not toy.TOY_REWARDS["toy-dial-success"]()(x, [""] * 4).requires_grad


def test_toy_t_thres_is_the_papers_mapped_by_noise_level():
    assert abs(toy_pretrain.T_THRES - toy_pretrain.snr_matched_t(800)) <= 5
    assert [abs(t - toy_pretrain.snr_matched_t(t_sd)) <= 5 for t, t_sd in zip(toy_pretrain.T_THRES_ABLATIONS, (900, 700))] == [True, True]


def test_prompt_parsing():
    assert toy.parse_prompt("a red circle") == (0, 0)
    assert toy.parse_prompt("a [purple] [triangle]") == (5, 2)
    with pytest.raises(ValueError, match="colour"):
        toy.parse_prompt("a cat")


def test_prompt_files_cover_the_world():
    train = load_prompts(os.path.join(ROOT, "prompts", "toy_train.txt"))
    heldout = load_prompts(os.path.join(ROOT, "prompts", "toy_heldout.txt"))
    texts_train, texts_heldout = {p.text for p in train}, {p.text for p in heldout}
    assert not texts_train & texts_heldout
    assert texts_train | texts_heldout == set(toy.all_captions())
    for p in train + heldout:
        assert p.phrases == tuple(p.text.split()[1:])  # [colour, shape]


def test_classifier_reward_has_image_gradients():
    images, captions, _ = toy.make_batch(4, torch.Generator().manual_seed(0))
    for fn in (toy.toy_classifier(tiny=True), toy.toy_aesthetic()):
        x = images.clone().requires_grad_(True)
        r = fn(x, captions)
        assert r.shape == (4,) and r.dtype == torch.float32
        r.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not os.path.isfile(toy.CLASSIFIER_PATH), reason="no trained toy classifier shipped")
def test_classifier_reward_agrees_with_analytic(world):
    images, captions, labels = world
    assert os.path.getsize(toy.CLASSIFIER_PATH) < 1_000_000
    analytic, classifier = toy.toy_alignment(), toy.toy_classifier()
    all_images = torch.cat([images] * 3)
    prompts = captions + wrong_captions(labels, "colour") + wrong_captions(labels, "shape")
    a = analytic(all_images, prompts)
    p = classifier(all_images, prompts).exp()  # p(colour, shape) of the prompt
    assert p[:256].mean() > 0.95 and p[256:].mean() < 0.05
    assert ((a > 0.5) == (p > 0.5)).float().mean() > 0.98


def test_pretrain_writes_a_loadable_pixel_space_model(tmp_path):
    out = str(tmp_path / "toy")
    toy_pretrain.pretrain(toy_pretrain.PretrainConfig(out=out, steps=1, batch_size=4, threads=1))
    assert sorted(os.listdir(out)) == ["scheduler", "text_encoder", "tokenizer", "training_info.json", "unet"]
    models = load_models(out)
    assert models.vae is None and models.image_size == 32 and models.latent_shape == (3, 32, 32)
    assert models.scheduler.alphas_cumprod[-1] < 1e-4  # the pixel-space schedule ends in pure noise
    prompt = load_prompts(os.path.join(ROOT, "prompts", "toy_heldout.txt"))[0]  # "a [red] [circle]"
    assert prompt.phrases == ("red", "circle")
    assert phrase_positions(models.tokenizer, prompt) == [[2], [3]]  # one CLIP token per phrase, after <bos> a


def sampler_clips_x0(scheduler) -> bool:
    """Does diffusion.ddim_step clip the predicted x0 to [-1, 1] when scheduler.config.clip_sample is set?
    Probe at t = 951 -> 901, eta 0, x_t = 0, eps = 1: the predicted x0 = -sqrt((1 - a) / a) ~ -95. Clipped
    to -1, the step uses the eps consistent with it, sqrt(a / (1 - a)), and lands near 0 (unclipped: -0.59)."""
    a, a_prev = scheduler.alphas_cumprod[951], scheduler.alphas_cumprod[901]
    x_prev, _ = ddim_step(scheduler, torch.ones(1, 1, 1, 1), 951, torch.zeros(1, 1, 1, 1), eta=0.0, num_steps=20)
    clipped = -a_prev.sqrt() + (1 - a_prev).sqrt() * (a / (1 - a)).sqrt()  # DDIM eq. (12) with x0 = -1
    return torch.allclose(x_prev.flatten(), clipped.view(1).float(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(TOY_MODEL), reason="no pretrained toy model shipped")
def test_shipped_model_follows_guidance():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TOY_MODEL) for f in fs)
    assert size <= 10_000_000
    models = load_models(TOY_MODEL)
    assert models.vae is None and models.scheduler.config.clip_sample
    assert sampler_clips_x0(models.scheduler), (
        "diffusion.ddim_step must clip x0_hat to [-1, 1] (and use the eps consistent with it) when "
        "scheduler.config.clip_sample is set, as DDPM samples pixel-space models; see toy_pretrain.TOY_SCHEDULER.")
    prompts = toy.all_captions() * 2  # 36 samples, every colour-shape pair twice, 10 DDIM steps, eta 1

    def draw(texts, w):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return sample(models, encode_text(models, texts), encode_text(models, [""]), w, 10, 1.0, g).images
    guided, conditional = draw(prompts, 5.0), draw(prompts, 1.0)
    unconditional = draw([""] * len(prompts), 1.0)
    alignment = toy.toy_alignment()
    assert alignment(guided, prompts).mean() > 0.8 and alignment(unconditional, prompts).mean() < 0.15
    # CFG narrows what the caption leaves open (the premise of DiffExp): less layout variety at CFG 5 than at 1
    assert toy.describe(guided, prompts)["layout_entropy"] < toy.describe(conditional, prompts)["layout_entropy"] - 0.5


@pytest.mark.parametrize("preset", ["toy", "toy-classifier"])
@pytest.mark.parametrize("trainer", ["ddpo", "alignprop"])
def test_one_toy_epoch_of_each_trainer(tmp_path, trainer, preset):
    """Each toy preset of each trainer, shrunk to one epoch of 4 DDIM steps and a few samples: the shipped
    model, the toy prompts, the preset's reward and its evaluation (before training, then after the epoch)
    run end to end, and the LoRA weights move."""
    module = train_ddpo if trainer == "ddpo" else train_alignprop
    cfg = module.PRESETS[preset][1]
    if trainer == "ddpo":
        sample = dataclasses.replace(cfg.sample, num_steps=4, batch_size=4, num_batches=1)
        train = dataclasses.replace(cfg.train, batch_size=4, updates_per_epoch=1)
    else:
        sample = dataclasses.replace(cfg.sample, num_steps=4)
        train = dataclasses.replace(cfg.train, batch_size=2, total_batch=4)
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"), num_epochs=1, sample=sample, train=train,
                              eval=dataclasses.replace(cfg.eval, samples_per_prompt=1),
                              **({"k": 4} if trainer == "alignprop" else {}), log=scaffold.LogConfig(grid_every=1, save_every=1))
    module.main(cfg)
    before, record = scaffold.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert before["reward_queries"] == 0 and "plain_reward_mean" in before and "heldout_reward_mean" in before
    assert record["reward_queries"] == 4 and record["reward_mean"] == record["reward_mean"]  # not NaN
    assert cfg.reward.name == {"toy": "toy-aesthetic", "toy-classifier": "toy-classifier"}[preset]
    path = os.path.join(scaffold.latest_checkpoint(str(tmp_path / "run")), lora.WEIGHT_NAME)
    assert any(v.abs().max() > 0 for k, v in load_file(path).items() if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(TOY_MODEL), reason="no pretrained toy model shipped")
def test_ddpo_gradient_signal_measurement_runs():
    """experiments/ddpo_gradient_signal.py (a measurement made on the v1 world, experiments.md section 5) still
    runs on today's model at N = 4: one norm per DDIM step and a finite-difference row for each direction."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("signal", os.path.join(ROOT, "experiments", "ddpo_gradient_signal.py"))
    signal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(signal)
    out = signal.main(signal.Config(n=4, batch=4, steps=(0.3,)))
    norms = out["step_norms"]
    assert len(norms) == signal.Config().num_steps and min(norms) > 0
    assert [r["direction"] for r in out["rows"]] == ["pathwise", "ddpo", "ddpo, steps 1-5"]
    assert all(r["plus"] != r["minus"] for r in out["rows"])  # the weights moved, and were put back between


def test_one_toy_epoch_of_grpo(tmp_path):
    """train_grpo.py's toy preset (DDIM with eta 1 on the shipped model), shrunk to one epoch of 4 steps and two
    groups of 2: the toy reward, the evaluation before and after, LoRA weights that move."""
    import train_grpo
    cfg = train_grpo.PRESETS["toy"][1]
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"), num_epochs=1,
                              sample=dataclasses.replace(cfg.sample, num_steps=4, sde_window=(0, 2), group_size=2,
                                                         prompts_per_batch=1, num_batches=2),
                              train=dataclasses.replace(cfg.train, batch_size=2),
                              eval=dataclasses.replace(cfg.eval, samples_per_prompt=1))
    train_grpo.main(cfg)
    before, record = scaffold.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert before["reward_queries"] == 0 and "plain_reward_mean" in before and "heldout_reward_mean" in before
    assert record["reward_queries"] == 4 and record["first_ratio_err"] < 1e-5
    path = os.path.join(scaffold.latest_checkpoint(str(tmp_path / "run")), lora.WEIGHT_NAME)
    assert any(v.abs().max() > 0 for k, v in load_file(path).items() if "lora_B" in k)
