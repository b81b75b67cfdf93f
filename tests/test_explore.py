"""DiffExp's two strategies (explore.py): the CFG schedule, random prompt weighting, validation."""

import dataclasses

import pytest
import torch

import explore
from explore import ExploreConfig

SD_TIMESTEPS = torch.arange(981, 0, -20)  # SD v1.5 with 50 DDIM steps: 981, 961, ..., 1


def test_cfg_schedule_both_sides_of_threshold():
    cfg = ExploreConfig(t_thres=800, w_low=1.0)
    w = explore.guidance_scales(SD_TIMESTEPS, 3, 5.0, cfg, schedule_on=True)
    assert w.shape == (3, 50)
    early = SD_TIMESTEPS > 800
    assert early.sum() == 10  # t_thres 800 gives w_low to the first 10 of 50 steps
    assert torch.all(w[:, early] == 1.0) and torch.all(w[:, ~early] == 5.0)
    for thres, n in ((900, 5), (700, 15)):
        w = explore.guidance_scales(SD_TIMESTEPS, 1, 5.0, ExploreConfig(t_thres=thres, w_low=0.0), True)
        assert (w == 0.0).sum() == n and (w == 5.0).sum() == 50 - n


def test_exploration_stops_after_explore_until_and_switches():
    cfg = ExploreConfig(explore_until=0.75)
    assert explore.active(cfg, 0.0) == (True, True)
    assert explore.active(cfg, 0.74) == (True, True)
    assert explore.active(cfg, 0.75) == (False, False)
    assert explore.active(dataclasses.replace(cfg, cfg_schedule=False), 0.1) == (False, True)
    assert explore.active(dataclasses.replace(cfg, prompt_weighting=False), 0.1) == (True, False)
    assert explore.active(dataclasses.replace(cfg, diffexp=False), 0.1) == (False, False)
    # schedule off (or after explore_until) is plain CFG everywhere
    w = explore.guidance_scales(SD_TIMESTEPS, 2, 7.5, cfg, schedule_on=False)
    assert torch.all(w == 7.5)


def _hidden(B=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 77, D, generator=g) + 0.5  # a clearly non-zero mean, as real CLIP states have


POSITIONS = [[[1], [2, 3, 4]], [[1, 2]], [[3], [5]], [[1], [4, 5]]]


def test_prompt_weighting_changes_only_the_chosen_phrase():
    h = _hidden()
    cfg = ExploreConfig(rescale=False)
    out, phrase, weights = explore.weight_prompts(h, POSITIONS, cfg, torch.Generator().manual_seed(1))
    assert torch.all((weights >= 1.0) & (weights <= 1.2))
    for b in range(len(POSITIONS)):
        chosen = POSITIONS[b][phrase[b]]
        others = [i for i in range(77) if i not in chosen]
        torch.testing.assert_close(out[b, chosen], h[b, chosen] * weights[b])
        assert torch.equal(out[b, others], h[b, others])


def test_prompt_weighting_rescale_keeps_the_mean():
    h = _hidden()
    out, phrase, weights = explore.weight_prompts(h, POSITIONS, ExploreConfig(), torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.mean(dim=(1, 2)), h.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, h)  # it still changed the embedding
    # the chosen phrase is emphasised relative to the rest of the prompt
    b, chosen = 0, POSITIONS[0][phrase[0]]
    ratio_chosen = (out[b, chosen] / h[b, chosen]).mean()
    ratio_rest = (out[b, 10:] / h[b, 10:]).mean()
    torch.testing.assert_close(ratio_chosen / ratio_rest, weights[0], rtol=1e-4, atol=1e-5)


def test_weights_cover_the_range_and_phrases_uniformly():
    h = _hidden(B=2000, D=2)
    positions = [[[1], [2], [3]]] * 2000
    cfg = ExploreConfig(weight_low=1.0, weight_high=1.2)
    _, phrase, weights = explore.weight_prompts(h, positions, cfg, torch.Generator().manual_seed(3))
    assert weights.min() >= 1.0 and weights.max() <= 1.2
    assert weights.min() < 1.01 and weights.max() > 1.19  # U(1, 1.2), not a constant
    counts = torch.bincount(phrase, minlength=3).float() / 2000
    assert torch.all((counts - 1 / 3).abs() < 0.05)


def test_explore_batch_off_is_plain():
    h = _hidden()
    ts = SD_TIMESTEPS
    cond, w = explore.explore_batch(ExploreConfig(diffexp=False), h, POSITIONS, ts, 5.0, 0.0, torch.Generator())
    assert torch.equal(cond, h) and torch.all(w == 5.0)
    cond, w = explore.explore_batch(ExploreConfig(), h, POSITIONS, ts, 5.0, 0.9, torch.Generator())
    assert torch.equal(cond, h) and torch.all(w == 5.0)  # past explore_until
    cond, w = explore.explore_batch(ExploreConfig(), h, POSITIONS, ts, 5.0, 0.1, torch.Generator().manual_seed(0))
    weighted = explore.weight_prompts(h, POSITIONS, ExploreConfig(), torch.Generator().manual_seed(0))[0]
    assert torch.equal(cond, weighted) and not torch.equal(cond, h) and (w == 1.0).any()


def test_same_generator_same_draws():
    h = _hidden()
    a = explore.weight_prompts(h, POSITIONS, ExploreConfig(), torch.Generator().manual_seed(5))
    b = explore.weight_prompts(h, POSITIONS, ExploreConfig(), torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs, flag", [
    (dict(w_low=6.0), "--explore.w-low"),
    (dict(w_low=-1.0), "--explore.w-low"),
    (dict(t_thres=1000), "--explore.t-thres"),
    (dict(t_thres=-1), "--explore.t-thres"),
    (dict(weight_low=1.3, weight_high=1.2), "--explore.weight-low"),
    (dict(weight_low=0.0), "--explore.weight-low"),
    (dict(explore_until=1.5), "--explore.explore-until"),
])
def test_invalid_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace(".", r"\.")):
        explore.validate(ExploreConfig(**kwargs), w_high=5.0)


def test_valid_defaults():
    explore.validate(ExploreConfig(), w_high=5.0)
    explore.validate(ExploreConfig(w_low=0.0, t_thres=0), w_high=0.0)


def test_exploring_epochs_are_the_first_three_quarters():
    """progress = epoch / epochs < 3/4: exactly 3/4 of the epochs (and queries) when epochs divide by 4, else
    the next whole epoch (4 of 5 = 80%); none for the baseline or explore_until 0."""
    cfg = ExploreConfig()
    assert [explore.exploring_epochs(cfg, n) for n in (4, 5, 8, 20, 1)] == [3, 4, 6, 15, 1]
    assert explore.exploring_epochs(dataclasses.replace(cfg, diffexp=False), 8) == 0
    assert explore.exploring_epochs(dataclasses.replace(cfg, explore_until=0.0), 8) == 0
    assert "epochs 0-3, 4 of 5 = 80.0% of the reward queries" in explore.schedule_note(cfg, 5)
    assert explore.schedule_note(dataclasses.replace(cfg, diffexp=False), 5) == "exploration: off (the baseline)"
