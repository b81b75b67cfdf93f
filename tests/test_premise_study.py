"""The premise study's runs (experiments/premise_study.py, experiments.md 8) are the commands their
pre-registration describes: every one parses with its trainer, trains on its level's reward for its
budget, and explores for exactly 3/4 of its reward queries (none in the baselines)."""

import importlib
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import explore  # noqa: E402
import premise_study as ps  # noqa: E402


def distinct_runs():
    """One run per phase x trainer x level x arm (the seeds change only --seed and the folder)."""
    seen = {}
    for r in ps.pilot_runs() + ps.study_runs():
        seen.setdefault((r.phase, r.trainer, r.level, r.arm), r)
    return list(seen.values())


def test_study_has_the_registered_arms_and_seeds():
    runs = ps.study_runs()
    assert len({r.name for r in runs}) == len(runs)
    count = {t: sum(r.trainer == t for r in runs) for t in ps.TRAINERS}
    # DDPO: 2 arms x 5 seeds x 2 levels + 4 arms x 10 seeds; AlignProp: 6 arms at the sparse end
    assert count["ddpo"] == 2 * 5 * 2 + 4 * 10 and count["alignprop"] == 2 * 5 * 2 + 6 * 10
    assert count["grpo"] == 2 * 5 * 2  # its own pre-registration (8.3): diffexp and baseline at the dial's ends
    assert {r.seed for r in runs if r.trainer == "grpo"} <= set(range(20, 25))
    assert ps.PILOT_SEED not in {r.seed for r in runs}


@pytest.mark.parametrize("run", distinct_runs(), ids=lambda r: f"{r.phase}-{r.name}")
def test_every_run_parses_and_explores_for_three_quarters(run):
    trainer = importlib.import_module(f"train_{run.trainer}")
    command = run.command()
    assert command[1].endswith(f"train_{run.trainer}.py")
    cfg = trainer.cli(command[2:])
    epochs = (ps.PILOT_EPOCHS if run.phase == "pilot" else ps.EPOCHS)[run.trainer]
    assert cfg.num_epochs == epochs and cfg.seed == run.seed and cfg.reward.name == ps.REWARD[run.trainer, run.level]
    assert cfg.eval.rewards == (ps.SUCCESS,) and cfg.eval.samples_per_prompt == 8
    k = explore.exploring_epochs(cfg.explore, cfg.num_epochs)
    assert k == (0 if run.arm.startswith("baseline") else 3 * cfg.num_epochs // 4)
    assert 4 * k == 3 * cfg.num_epochs or k == 0
    assert cfg.explore.cfg_schedule == (run.arm != "weighting-only")
    assert cfg.explore.prompt_weighting == (run.arm != "cfg-only")


def test_analyse_reads_no_trainer_and_level_before_every_seed_is_finished(tmp_path, monkeypatch, capsys):
    """The reading rule in code: with every arm finished at the first seed only, every trainer x level is left
    out, nothing is compared, and the README's figures are not written."""
    monkeypatch.setattr(ps, "OUT", str(tmp_path / "out"))
    monkeypatch.setattr(ps, "ROOT", str(tmp_path))
    os.makedirs(tmp_path / "out")
    monkeypatch.setattr(ps, "recorded", lambda r: r.seed == 20)
    import compare
    monkeypatch.setattr(compare, "main", lambda *a: pytest.fail("compared an unfinished trainer x level"))
    ps.analyse()
    printed = capsys.readouterr().out
    for trainer in ps.TRAINERS:
        for level in ps.LEVELS_OF[trainer]:
            assert f"{trainer}-{level}: 1 of {len(ps.seeds_of(trainer, level))} seeds finished by every arm; left out" in printed
    assert (tmp_path / "out" / "premise-speedup.png").is_file() and not (tmp_path / "docs").exists()


def test_a_finished_runs_record_is_what_the_analysis_reads(tmp_path, monkeypatch):
    """A short real DDPO run on the dial: its record (config, the kept metrics, final statistics) gives the
    analysis the same curves, seed, advantage-signal share and final statistics as the run folder does; a
    finished run is recorded, not run again; an unfinished one is refused, naming its folder."""
    import compare
    import scaffold
    import train_ddpo
    monkeypatch.setattr(ps, "OUT", str(tmp_path / "out"))
    monkeypatch.setattr(ps, "RECORD", str(tmp_path / "record"))
    run = ps.Run("study", "ddpo", "dense", "diffexp", 20, ())
    with pytest.raises(SystemExit, match=f"record: {run.folder} is not a finished run"):
        ps.record(run)
    command = run.command()[2:]
    command[command.index("--num-epochs") + 1] = "2"
    train_ddpo.main(train_ddpo.cli(command + [
        "--sample.num-steps", "2", "--sample.batch-size", "4", "--sample.num-batches", "1", "--train.batch-size", "2",
        "--train.updates-per-epoch", "1", "--train.timesteps-per-forward", "1", "--eval.samples-per-prompt", "1",
        "--log.save-every", "1", "--prompts", os.path.join(ps.ROOT, "prompts", "toy_heldout.txt")]))
    ran = []
    monkeypatch.setattr(ps.toy_study, "run_many", lambda todo, out, after: ran.extend(todo))
    ps.run_and_record([run], ps.OUT)
    assert ran == [] and ps.recorded(run) and ps.toy_study.finished(run)
    full = scaffold.read_metrics(os.path.join(run.folder, "metrics.jsonl"))
    kept = scaffold.read_metrics(os.path.join(run.record, "metrics.jsonl"))
    assert len(kept) == len(full) and all(set(k) <= set(ps.KEEP) for k in kept)
    for metric in ("plain_reward_mean", f"plain_{ps.SUCCESS}_mean", "heldout_reward_mean", "reward_mean"):
        x, y = compare.read_curve(run.folder, metric)
        xr, yr = compare.read_curve(run.record, metric)
        assert len(x) >= 2 and torch.equal(x, xr) and torch.equal(y, yr)  # every epoch (and the plain policy before)
    assert compare.run_seeds([run.record]) == [20]
    config = json.load(open(os.path.join(run.record, "config.json")))  # the folder's, paths relative to ROOT
    assert config["model"] == "weights/toy" and config["prompts"] == "prompts/toy_heldout.txt"
    assert config == json.loads(json.dumps(json.load(open(os.path.join(run.folder, "config.json")))).replace(
        ps.ROOT + os.sep, ""))
    epochs = [m for m in full if "signal_share" in m]
    assert len(epochs) == 2 and any(m["exploring"] for m in epochs)
    for mode, shares in ps.mean_key([run], "diffexp", [20], "signal_share").items():
        mine = [m["signal_share"] for m in epochs if m["exploring"] == (mode == "exploring")]
        assert shares == ([sum(mine) / len(mine)] if mine else [])
    machine = json.load(open(os.path.join(run.record, "machine.json")))
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and machine["torch"] == torch.__version__
    stats = json.load(open(os.path.join(run.record, "final_stats.json")))
    assert stats == ps.toy_study.final_policy_stats(run) and 0 <= stats["alignment"] <= 1
    assert ps.final_stats([run]) == {k: [v] for k, v in stats.items()}


def test_run_many_calls_after_once_each_run_has_its_seconds(tmp_path):
    """The runner's hook (which writes a run's record, machine.json's seconds included) sees the run's time in
    times.json already, for every run."""
    class Quick:
        def __init__(self, name):
            self.name, self.folder = name, str(tmp_path / "out" / name)

        def command(self):
            return [sys.executable, "-c", "pass"]
    seen = {}

    def after(run):
        seen[run.name] = json.load(open(tmp_path / "out" / "times.json")).get(run.name)
    ps.toy_study.run_many([Quick("a"), Quick("b"), Quick("c")], str(tmp_path / "out"), after=after)
    assert sorted(seen) == ["a", "b", "c"] and all(isinstance(s, float) and s > 0 for s in seen.values())
