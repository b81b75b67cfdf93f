"""evaluate.py: score (shared seeds across checkpoints, outputs), sample (labelled grids per prompt, the same
noise per seed for every checkpoint), --checkpoints patterns (failed runs skipped), diversity, heldout_score
(deterministic, leaves RNG and UNet mode alone), the trainers' evaluation and the start-up errors.
Tiny offline model, 2 DDIM steps, 2 prompts x 2 seeds. (compare.py: test_compare.py.)"""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import scaffold
import plots
from common import ConfigError
import evaluate
import lora
import rewards
from diffusion import Prompt

# the tiny model's training settings as a checkpoint's meta.json stores them; score reads them back
TRAINED = {"model": "tiny", "seed": 0, "sample": {"num_steps": 2, "eta": 1.0, "guidance_scale": 5.0}}


@pytest.fixture(scope="module")
def embedder():
    return rewards.clip_image_embedder(tiny=True)


def make_checkpoint(lora_models, folder, seed: int, config: dict | None = TRAINED) -> str:
    """A folder shaped like a trainer's checkpoint: LoRA weights with B non-zero, state.pt, meta.json."""
    models, _ = lora_models(seed=seed)
    lora.save(models.unet, folder)
    torch.save({}, os.path.join(folder, "state.pt"))
    if config is not None:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump({"config": config, "epoch": 2}, f)
    return str(folder)


def write_prompts(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("a [cat]\na [dog] riding a bike\n")
    return str(path)


def numbers(result: dict) -> dict:
    """A checkpoint's scores without its path, for equality checks."""
    return {k: v for k, v in result.items() if k != "path"}


# ---- score


def test_score_shares_seeds_across_checkpoints_and_writes_outputs(tmp_path, lora_models, tiny):
    run = tmp_path / "runs" / "ddpo-tiny"
    ckpt = make_checkpoint(lora_models, run / "checkpoints" / "000002", seed=0)
    other = make_checkpoint(lora_models, tmp_path / "other", seed=1, config=None)  # a bare LoRA folder
    out = tmp_path / "eval"
    prompts = write_prompts(tmp_path)
    results = evaluate.main([
        "score", "--checkpoints", "base", str(run), f"again={ckpt}", f"other={other}", "after=base",
        "--prompts", prompts, "--samples-per-prompt", "2", "--batch-size", "3", "--grid-prompts", "2",
        "--rewards", "brightness", "jpeg-compressibility", "--reward-tiny", "--out", str(out)])

    # unset flags come from the checkpoint's training config
    s = results["settings"]
    assert (s["model"], s["num_steps"], s["eta"], s["guidance_scale"]) == ("tiny", 2, 1.0, 5.0)
    ck = results["checkpoints"]
    assert list(ck) == ["base", "ddpo-tiny-000002", "again", "other", "after"]
    assert numbers(ck["ddpo-tiny-000002"]) == numbers(ck["again"])  # same weights, same seeds: same numbers
    assert numbers(ck["base"]) == numbers(ck["after"])  # the LoRA layers were taken out again
    for label in ("base", "other"):
        assert ck[label]["rewards"]["brightness"]["mean"] != ck["again"]["rewards"]["brightness"]["mean"]
    r = ck["again"]["rewards"]["brightness"]
    assert r["n"] == 4 and [p["n"] for p in r["per_prompt"]] == [2, 2]
    assert r["sem"] == pytest.approx(r["std"] / 2)
    assert r["mean"] == pytest.approx(sum(p["mean"] for p in r["per_prompt"]) / 2)
    div = ck["again"]["diversity"]
    assert len(div["per_prompt"]) == 2 and div["mean"] >= 0

    # score and heldout_score sample through the same function: the same numbers
    held = evaluate.heldout_score(tiny, [Prompt("a cat", ("cat",)), Prompt("a dog riding a bike", ("dog",))],
                                  rewards.make_reward("brightness"), samples_per_prompt=2, num_steps=2, eta=1.0,
                                  guidance_scale=5.0, seed=0, batch_size=3)
    assert held["heldout_reward_mean"] == pytest.approx(ck["base"]["rewards"]["brightness"]["mean"], abs=1e-6)

    # outputs
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["checkpoints"]["again"]["rewards"]["brightness"]["mean"] == r["mean"]
    table = (out / "table.md").read_text()
    assert all(f"| {label} |" in table for label in ck) and "brightness" in table and "diversity" in table
    _, line_h = plots.grid_font(128)
    band = 2 + 2 * line_h  # under each image: its prompt and its brightness
    for label in ck:
        grid = Image.open(out / f"grid_{label}.png")  # 2 prompts x 2 seeds of 32 px images, upscaled to 128
        assert grid.size == (2 * 128 + 3 * 2, line_h + 2 + 2 * (128 + band + 2) + 2)  # a title line over the rows


def test_score_errors_name_the_path_or_flag(tmp_path):
    prompts = write_prompts(tmp_path)
    common = ["--model", "tiny", "--rewards", "brightness", "--out", str(tmp_path / "eval")]
    with pytest.raises(ConfigError, match="nothing-here"):
        evaluate.main(["score", "--checkpoints", str(tmp_path / "nothing-here"), "--prompts", prompts, *common])
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ConfigError, match="empty-run"):
        evaluate.main(["score", "--checkpoints", str(tmp_path / "empty-run"), "--prompts", prompts, *common])
    with pytest.raises(ValueError, match="drawbench:NoSuchCategory"):
        evaluate.main(["score", "--prompts", "drawbench:NoSuchCategory", *common])
    with pytest.raises(ValueError, match="repeat"):
        evaluate.main(["score", "--checkpoints", "base", "base", "--prompts", prompts, *common])
    with pytest.raises(ValueError, match="--reward-weights"):
        evaluate.main(["score", "--prompts", prompts, "--reward-weights", "aesthetic=x.pt", *common])
    with pytest.raises(SystemExit):  # a misspelt reward fails when flags are parsed
        evaluate.main(["score", "--rewards", "brightnes"])


# ---- sample


def tiles(path, rows: int, cols: int, labelled_lines: int = 1) -> np.ndarray:
    """The 128 px tiles of a sample grid -> (rows, cols, 128, 128, 3); the row-label column is whatever
    width is left of the tiles."""
    p = np.asarray(Image.open(path).convert("RGB"))
    _, line_h = plots.grid_font(128)
    top, band = line_h + 2, 2 + labelled_lines * line_h  # the title line; the label band under each tile
    left = p.shape[1] - (cols * 130 + 2)
    return np.stack([np.stack([p[top + 2 + r * (130 + band): top + 2 + r * (130 + band) + 128,
                                 left + 2 + c * 130: left + 2 + c * 130 + 128] for c in range(cols)]) for r in range(rows)])


def test_sample_writes_a_grid_per_prompt_with_shared_seeds(tmp_path, lora_models):
    ckpt = make_checkpoint(lora_models, tmp_path / "run" / "checkpoints" / "000002", seed=0)
    out = tmp_path / "samples"
    summary = evaluate.main(["sample", "--checkpoints", "base", f"tuned={ckpt}", "--prompts", "a dolphin riding a bike",
                             write_prompts(tmp_path), "a cat", "--seeds", "2", "--out", str(out)])  # 'a cat' once
    # unset flags come from the checkpoint's training config
    assert summary["settings"]["model"] == "tiny" and summary["settings"]["num_steps"] == 2
    on_disk = json.loads((out / "samples.json").read_text())
    assert on_disk["seeds"] == [0, 1] and list(on_disk["checkpoints"]) == ["base", "tuned"]
    assert on_disk["checkpoints"]["tuned"].endswith(lora.WEIGHT_NAME)
    assert [(p["prompt"], p["grid"]) for p in on_disk["prompts"]] == [
        ("a dolphin riding a bike", "a-dolphin-riding-a-bike.png"), ("a cat", "a-cat.png"),
        ("a dog riding a bike", "a-dog-riding-a-bike.png")]
    _, line_h = plots.grid_font(128)
    for p in on_disk["prompts"]:  # 2 checkpoints (rows) x 2 seeds (columns), a title line, one label line per tile
        w, h = Image.open(out / p["grid"]).size
        assert h == line_h + 2 + 2 * (128 + 2 + line_h + 2) + 2 and w > 2 * 130 + 2
    cat = tiles(out / "a-cat.png", 2, 2)
    assert (cat[0] != cat[1]).any()  # the LoRA changes the images
    assert (cat[:, 0] != cat[:, 1]).any()  # and so does the seed

    # a seed gives the same image whatever else is asked for: here other seeds, order, prompts and checkpoints
    again = evaluate.main(["sample", "--checkpoints", f"tuned={ckpt}", "--prompts", "a cat", "--seeds", "1", "0", "5",
                           "--rewards", "brightness", "--out", str(tmp_path / "again")])
    grid = tiles(tmp_path / "again" / "a-cat.png", 1, 3, labelled_lines=2)
    assert np.array_equal(grid[0, 0], cat[1, 1]) and np.array_equal(grid[0, 1], cat[1, 0])
    r = again["prompts"][0]["rewards"]["tuned"]["brightness"]
    assert len(r) == 3 and all(0 <= v <= 1 for v in r)
    assert json.loads((tmp_path / "again" / "samples.json").read_text())["prompts"][0]["rewards"]["tuned"]["brightness"] == r


def test_sample_errors_name_the_flag(tmp_path):
    base = ["sample", "--model", "tiny", "--out", str(tmp_path / "samples")]
    with pytest.raises(ValueError, match="--prompts"):
        evaluate.main(base)
    with pytest.raises(ConfigError, match="missing.txt"):
        evaluate.main([*base, "--prompts", str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="drawbench:NoSuchCategory"):
        evaluate.main([*base, "--prompts", "drawbench:NoSuchCategory"])
    with pytest.raises(ConfigError, match="nothing-here"):
        evaluate.main([*base, "--prompts", "a cat", "--checkpoints", str(tmp_path / "nothing-here")])
    with pytest.raises(ValueError, match="--seeds 0"):
        evaluate.main([*base, "--prompts", "a cat", "--seeds", "0"])
    with pytest.raises(ValueError, match="--seeds 3 3"):
        evaluate.main([*base, "--prompts", "a cat", "--seeds", "3", "3"])
    with pytest.raises(ValueError, match="repeat"):
        evaluate.main([*base, "--prompts", "a cat", "--checkpoints", "base", "base"])
    assert not (tmp_path / "samples").exists()  # all before any model loads or anything is written



def test_checkpoint_patterns_are_expanded_with_their_labels(tmp_path):
    """The shell does not expand LABEL=runs/x-*, so evaluate.py does: one match keeps the label, several get
    the folder's name appended; a log file beside the runs is skipped; no match names the pattern."""
    for name in ("ap-s1", "ap-s0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / lora.WEIGHT_NAME).write_bytes(b"")  # found by name; not read here
    (tmp_path / "ap-s0.log").write_text("")
    pattern = str(tmp_path / "ap-*")
    assert evaluate.expand_checkpoints(["base", f"tuned={pattern}"]) == \
        ["base", f"tuned-ap-s0={tmp_path / 'ap-s0'}", f"tuned-ap-s1={tmp_path / 'ap-s1'}"]
    assert evaluate.expand_checkpoints([f"one={tmp_path / 'ap-s1*'}"]) == [f"one={tmp_path / 'ap-s1'}"]
    assert evaluate.expand_checkpoints([pattern]) == [str(tmp_path / "ap-s0"), str(tmp_path / "ap-s1")]
    with pytest.raises(ConfigError, match=r"nothing-\*"):
        evaluate.expand_checkpoints([f"x={tmp_path / 'nothing-*'}"])


def test_a_pattern_skips_failed_runs_but_a_named_one_fails(tmp_path, lora_models, capsys):
    """A run that failed before its first checkpoint leaves a folder with config.json only: a pattern skips it
    (one line naming it) and keeps the rest; named outright it is an error; a pattern that matches only such
    folders is an error naming the pattern. sample and score both go through expand_checkpoints."""
    runs = tmp_path / "runs"
    make_checkpoint(lora_models, runs / "ap-s0" / "checkpoints" / "000002", seed=0)
    for name in ("ap-s1", "ap-s2"):  # failed runs
        (runs / name).mkdir(parents=True)
        (runs / name / "config.json").write_text("{}")
    assert evaluate.expand_checkpoints([f"tuned={runs}/ap-*"]) == [f"tuned={runs / 'ap-s0'}"]
    assert capsys.readouterr().out.splitlines() == [
        f"--checkpoints tuned={runs}/ap-*: skipped {runs / name}: no LoRA weights (a failed run?)"
        for name in ("ap-s1", "ap-s2")]
    with pytest.raises(ConfigError, match=r"ap-s\[12\].* matches no run or checkpoint with LoRA weights"):
        evaluate.expand_checkpoints([f"{runs}/ap-s[12]"])
    summary = evaluate.main(["sample", "--checkpoints", f"tuned={runs}/ap-*", "--prompts", "a cat",
                             "--seeds", "1", "--out", str(tmp_path / "samples")])
    assert list(summary["checkpoints"]) == ["tuned"]
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no LoRA checkpoint at .*ap-s1"):
        evaluate.main(["sample", "--checkpoints", f"tuned={runs}/ap-s1", "--prompts", "a cat",
                       "--out", str(tmp_path / "samples")])
    with pytest.raises(ConfigError, match="no LoRA checkpoint at .*ap-s2"):
        evaluate.main(["score", "--checkpoints", str(runs / "ap-s2"), "--model", "tiny",
                       "--out", str(tmp_path)])


def test_lora_applied_fails_naming_a_file_without_lora(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match="other.safetensors hold no LoRA tensors"):
        evaluate.lora_applied(torch.nn.Linear(2, 2), path)


# ---- diversity


def test_diversity_is_zero_for_identical_images_and_positive_for_different(embedder):
    g = torch.Generator().manual_seed(0)
    same = torch.rand(1, 3, 32, 32, generator=g).repeat(3, 1, 1, 1)
    different = torch.rand(3, 3, 32, 32, generator=g)
    assert evaluate.image_diversity(same, embedder) == pytest.approx(0.0, abs=1e-6)
    assert evaluate.image_diversity(different, embedder) > 1e-4

    # per prompt: only prompts with >= 2 samples count; none -> nan
    images = torch.cat([same[:2], different[:2], different[2:]])
    d = evaluate.diversity_by_prompt(images, ["a", "a", "b", "b", "c"], embedder)
    assert d == pytest.approx(evaluate.image_diversity(different[:2], embedder) / 2)
    assert math.isnan(evaluate.diversity_by_prompt(images[:2], ["a", "b"], embedder))


def test_diversity_matches_pairwise_cosine_distance():
    e = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    pairs = [1 - F.cosine_similarity(e[i], e[j], dim=0).item() for i in range(5) for j in range(i + 1, 5)]
    assert evaluate.diversity(e) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        evaluate.diversity(e[:1])


# ---- heldout_score


def test_heldout_score_is_deterministic_and_leaves_rng_and_mode_alone(lora_models, embedder):
    models, _ = lora_models(seed=3)
    reward_fn = rewards.make_reward("brightness")
    prompts = [Prompt("a cat", ("cat",)), Prompt("an owl", ("owl",))]
    kw = dict(samples_per_prompt=2, num_steps=2, eta=1.0, guidance_scale=5.0, batch_size=3, embedder=embedder)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    models.unet.train()
    a = evaluate.heldout_score(models, prompts, reward_fn, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), rng)
    assert models.unet.training
    models.unet.eval()
    assert evaluate.heldout_score(models, prompts, reward_fn, seed=7, **kw) == a  # deterministic, mode-independent
    assert not models.unet.training
    assert set(a) == {"heldout_reward_mean", "heldout_reward_std", "heldout_reward_sem", "heldout_samples", "heldout_diversity"}
    assert a["heldout_samples"] == 4 and all(math.isfinite(v) for v in a.values())
    assert evaluate.heldout_score(models, prompts, reward_fn, seed=8, **kw)["heldout_reward_mean"] != a["heldout_reward_mean"]


# ---- the trainers' evaluation


@pytest.mark.slow
def test_trainers_evaluate_the_plain_policy_before_and_during_training(tmp_path):
    """--eval.every: a record at 0 queries (the base model), then one per epoch, each with the training prompts'
    reward (plain_) and the held-out prompts' (heldout_) on fixed seeds; the first equals an independent
    evaluation of the base model."""
    import diffusion
    import train_alignprop
    from test_alignprop import small
    eval_cfg = evaluate.EvalConfig(every=1, prompts="unseen-animals", samples_per_prompt=1, diversity=False,
                                   rewards=("contrast",))
    cfg = small(tmp_path, num_epochs=2, eval=eval_cfg)
    run = train_alignprop.main(cfg)
    records = scaffold.read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [-1, 0, 1] and [r["reward_queries"] for r in records] == [0, 4, 8]
    assert "reward_mean" not in records[0]
    assert all("plain_reward_mean" in r and "heldout_reward_mean" in r for r in records)
    models = diffusion.load_models(cfg.model, seed=cfg.seed)
    reward_fn = rewards.make_reward(cfg.reward.name)
    for prompts, prefix in ((cfg.prompts, "plain"), (eval_cfg.prompts, "heldout")):
        expected = evaluate.heldout_score(models, diffusion.load_prompts(prompts), reward_fn, 1, cfg.sample.num_steps,
                                          cfg.sample.eta, cfg.sample.guidance_scale, cfg.seed, eval_cfg.batch_size, prefix=prefix)
        assert records[0][f"{prefix}_reward_mean"] == pytest.approx(expected[f"{prefix}_reward_mean"], abs=1e-6)
        # --eval.rewards contrast: scored on the same images as the training reward
        contrast = evaluate.heldout_score(models, diffusion.load_prompts(prompts), rewards.make_reward("contrast"), 1,
                                          cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale, cfg.seed,
                                          eval_cfg.batch_size, prefix=prefix)
        assert records[0][f"{prefix}_contrast_mean"] == pytest.approx(contrast[f"{prefix}_reward_mean"], abs=1e-6)
    assert records[2]["plain_reward_mean"] != records[0]["plain_reward_mean"]  # the policy moved
