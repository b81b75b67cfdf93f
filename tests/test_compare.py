"""compare.py: known curves give the known queries to threshold and speedups, the bootstrap intervals over
seeds (unpaired, and paired by seed where the arms share seeds), glob patterns that skip failed runs, the
default output under runs/, and the start-up errors. Synthetic run folders only; no model is loaded."""

import json
import math
import os

import pytest
import torch

import compare
from common import ConfigError


def write_run(folder, queries, values, reward="jpeg-compressibility", seed=None):
    """A run folder as a trainer leaves it: metrics.jsonl and config.json (with --seed when given)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for epoch, (q, v) in enumerate(zip(queries, values)):
            record = {"epoch": epoch, "reward_queries": q, "reward_mean": v, "reward_std": 0.1}
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"reward": {"name": reward}, **({"seed": seed} if seed is not None else {})}, f)


@pytest.fixture
def linear_runs(tmp_path):
    """Rewards linear in the queries, offset to negative values, 2 seeds (+-0.1) per group: the baseline
    gains 0.001 per query, DiffExp 0.002."""
    queries = [100 * k for k in range(1, 11)]
    for group, slope in (("base", 0.001), ("dx", 0.002)):
        for seed, offset in (("a", 0.1), ("b", -0.1)):
            values = [-5 + slope * q + offset for q in queries]
            write_run(tmp_path / "runs" / f"{group}-{seed}", queries, values)
    return tmp_path / "runs"


def test_compare_finds_the_known_queries_to_threshold(linear_runs, tmp_path):
    out = tmp_path / "cmp.png"
    (linear_runs / "dx-a.log").write_text("a training log beside its run folder: the glob skips it\n")
    summary = compare.main(["--groups", f"diffexp={linear_runs}/dx-*",
                             f"baseline={linear_runs}/base-a,{linear_runs}/base-b", "--out", str(out)])
    # r0 = -5 + 0.1, r_final = -5 + 1.0: threshold = r0 + 0.9 * 0.9 = -5 + 0.91
    assert summary["threshold"] == pytest.approx(-5 + 0.91)
    base, dx = summary["groups"]["baseline"], summary["groups"]["diffexp"]
    assert base["queries_to_threshold"] == pytest.approx(910)
    assert dx["queries_to_threshold"] == pytest.approx(455)
    assert dx["queries_to_threshold_per_run"] == pytest.approx([405, 505])  # offsets +0.1, -0.1; not the .log
    assert dx["runs"] == [str(linear_runs / "dx-a"), str(linear_runs / "dx-b")]
    assert dx["speedup"] == pytest.approx(2.0)
    assert dx["final_mean"] == pytest.approx(-3.0) and dx["final_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert out.stat().st_size > 0
    on_disk = json.loads((tmp_path / "cmp.json").read_text())
    assert on_disk["groups"]["diffexp"]["queries_to_threshold"] == pytest.approx(455)

    # a trailing 3-record moving average delays a linear curve by one record (100 queries)
    smoothed = compare.main(["--groups", f"diffexp={linear_runs}/dx-*", f"baseline={linear_runs}/base-*",
                              "--smooth", "ma", "--smooth-window", "3", "--out", str(out)])
    assert smoothed["threshold"] == pytest.approx(-5 + 0.1 + 0.9 * 0.8)
    assert smoothed["groups"]["baseline"]["queries_to_threshold"] == pytest.approx(920)
    assert smoothed["groups"]["diffexp"]["queries_to_threshold"] == pytest.approx(510)


def test_compare_bootstrap_interval_over_seeds(tmp_path):
    """5 seeds per arm with known per-seed queries to the threshold: DiffExp's are exactly half the
    baseline's, so the ratio of the arms' means is 2 and its bootstrap interval holds 2; an arm that never
    reaches the threshold is counted at its budget and reported as not reached."""
    queries = [0] + [100 * k for k in range(1, 21)]  # a record at 0 queries (evaluation before training)
    slopes = [0.00095, 0.00098, 0.001, 0.00102, 0.00105]  # each seed reaches the threshold by 2000 queries
    for group, factor in (("base", 1), ("dx", 2), ("slow", 0.05)):
        for k, slope in enumerate(slopes):
            write_run(tmp_path / f"{group}-s{k}", queries, [-5 + factor * slope * q for q in queries])
    summary = compare.main(["--groups", f"dx={tmp_path}/dx-s*", f"slow={tmp_path}/slow-s*",
                             f"base={tmp_path}/base-s*", "--metric", "reward_mean",
                             "--out", str(tmp_path / "c.png")])
    threshold = summary["threshold"]  # r0 = -5, r_final = -5 + 0.001 * 2000: threshold = -5 + 1.8
    assert threshold == pytest.approx(-5 + 1.8)
    base, dx, slow = (summary["groups"][g] for g in ("base", "dx", "slow"))
    assert base["queries_to_threshold_per_run"] == pytest.approx([1.8 / s for s in slopes])
    assert dx["queries_to_threshold_per_run"] == pytest.approx([0.9 / s for s in slopes])
    assert dx["speedup_per_run"] == pytest.approx(2.0) and dx["not_reached"] == 0
    lo, hi = dx["speedup_ci95"]
    assert lo < 2.0 < hi and hi - lo < 0.3
    assert base["speedup_per_run"] == pytest.approx(1.0)
    assert slow["not_reached"] == 5 and slow["queries_to_threshold_per_run"] == [2000] * 5
    assert slow["speedup_per_run"] == pytest.approx(sum(1.8 / s for s in slopes) / 5 / 2000)
    assert compare.bootstrap_ratio([4.0, 4.0, 4.0], [2.0, 2.0]) == (2.0, 2.0, 2.0)  # no spread: a point


def test_compare_errors_name_the_run_or_flag(linear_runs, tmp_path):
    out = ["--out", str(tmp_path / "cmp.png")]
    (linear_runs / "no-metrics").mkdir()
    with pytest.raises(ConfigError, match="no-metrics"):
        compare.main(["--groups", f"x={linear_runs}/no-metrics", *out])
    write_run(linear_runs / "empty", [], [])
    with pytest.raises(ValueError, match="no records"):
        compare.main(["--groups", f"x={linear_runs}/empty", *out])
    with pytest.raises(ConfigError, match="nothing-like-this"):
        compare.main(["--groups", f"x={linear_runs}/nothing-like-this*", *out])
    with pytest.raises(ValueError, match="LABEL=RUN"):
        compare.main(["--groups", str(linear_runs / "dx-a"), *out])
    with pytest.raises(ValueError, match="--baseline"):
        compare.main(["--groups", f"x={linear_runs}/dx-a", "--baseline", "y", *out])


def test_a_glob_skips_failed_runs_but_a_named_one_fails(linear_runs, tmp_path, capsys):
    """A run folder left by a run that failed before its first epoch (config.json only, or an empty
    metrics.jsonl): skipped with one line when a glob matches it, an error when named outright; a glob that
    matches only such folders fails naming the glob."""
    out = ["--out", str(tmp_path / "cmp.png")]
    failed, empty = linear_runs / "dx-failed", linear_runs / "dx-empty"
    failed.mkdir()
    (failed / "config.json").write_text("{}")
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    summary = compare.main(["--groups", f"diffexp={linear_runs}/dx-*", f"baseline={linear_runs}/base-*",
                            *out])
    assert summary["groups"]["diffexp"]["runs"] == [str(linear_runs / "dx-a"), str(linear_runs / "dx-b")]
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if "skipped" in line] == [
        f"--groups diffexp: skipped {empty}: no metrics.jsonl records (a failed run?)",
        f"--groups diffexp: skipped {failed}: no metrics.jsonl records (a failed run?)"]
    with pytest.raises(ConfigError, match="dx-failed has no metrics.jsonl"):
        compare.main(["--groups", f"x={failed}", f"baseline={linear_runs}/base-*", *out])
    with pytest.raises(ConfigError, match=r"dx-\[fe\]\*.* matches no run folder with metrics"):
        compare.main(["--groups", f"x={linear_runs}/dx-[fe]*", *out])


def test_the_default_output_goes_under_runs(linear_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compare.main(["--groups", f"baseline={linear_runs}/base-*"])
    assert sorted(os.listdir(tmp_path / "runs")) == [
        "base-a", "base-b", "compare.json", "compare.png", "dx-a", "dx-b"]
    assert not (tmp_path / "compare.png").exists()


JITTER = (30.0, -30.0, 0.0, 30.0, -30.0)


def paired_runs(folder, dx_seeds=range(5)):
    """Baseline seed s: reward -5 + k_s * 0.001 * queries, k_s from 0.6 to 1.6 (seeds differ a lot: a seed
    effect both arms share). DiffExp at seed s reaches the threshold (fraction 0.5) at half the baseline's
    queries of the same seed plus a jitter summing to 0: the true ratio of mean queries is exactly 2.
    Folder names do not follow the seeds, so runs must be matched by their config's seed."""
    queries = [100 * k for k in range(0, 21)]
    k = [0.6, 0.8, 1.0, 1.25, 1.6]
    gain = 0.5 * sum(k) / len(k) * 0.001 * 2000  # threshold - r0 with --fraction 0.5
    base_q = [gain / (ks * 0.001) for ks in k]
    for s, ks in enumerate(k):
        write_run(folder / f"base-{'edcba'[s]}", queries, [-5 + ks * 0.001 * q for q in queries], seed=s)
    for s, j in zip(dx_seeds, JITTER):
        slope = gain / (base_q[s % 5] / 2 + j)
        write_run(folder / f"dx-{'xvzwy'[s % 5]}", queries, [-5 + slope * q for q in queries], seed=s)
    return base_q


def test_paired_bootstrap_over_shared_seeds_is_narrower(tmp_path):
    base_q = paired_runs(tmp_path)
    flags = ["--groups", f"dx={tmp_path}/dx-*", f"base={tmp_path}/base-*", "--fraction", "0.5",
             "--out", str(tmp_path / "c.png")]
    summary = compare.main(flags)
    dx = summary["groups"]["dx"]
    dx_q = [q / 2 + j for q, j in zip(base_q, JITTER)]  # by seed
    by_folder = [dx_q[s] for s in (1, 3, 0, 4, 2)]  # dx-v .. dx-z hold seeds 1, 3, 0, 4, 2
    assert dx["queries_to_threshold_per_run"] == pytest.approx(by_folder)
    assert summary["groups"]["base"]["queries_to_threshold_per_run"] == pytest.approx(base_q[::-1])
    assert dx["paired_seeds"] == [0, 1, 2, 3, 4]
    assert dx["speedup_per_run"] == pytest.approx(2.0) and dx["speedup_paired"] == pytest.approx(2.0)
    (lo, hi), (plo, phi) = dx["speedup_ci95"], dx["speedup_paired_ci95"]
    assert lo < 2.0 < hi and plo < 2.0 < phi
    assert phi - plo < (hi - lo) / 3  # the seed effect cancels in the pairs
    assert summary["groups"]["base"]["speedup_paired_ci95"] == pytest.approx([1.0, 1.0])
    on_disk = json.loads((tmp_path / "c.json").read_text())["groups"]["dx"]
    assert on_disk["speedup_paired_ci95"] == dx["speedup_paired_ci95"]

    # --no-paired: the summary without the paired keys, the rest the same
    unpaired = compare.main([*flags, "--no-paired"])
    for g in unpaired["groups"].values():
        assert not any(k.startswith(("paired", "speedup_paired")) for k in g)
    assert unpaired["groups"]["dx"] == {k: v for k, v in dx.items() if k not in
                                        ("paired_seeds", "speedup_paired", "speedup_paired_ci95",
                                         "auc_diff_paired", "auc_diff_paired_ci95")}


def test_area_under_the_curve_and_its_paired_difference(tmp_path):
    """Each run's area is its curve's mean level: a line from a to b has (a + b) / 2. DiffExp at seed s is
    the baseline of seed s plus a constant c_s over every query: its paired difference is mean(c_s), with an
    interval inside [min c, max c]; the unpaired spread of the areas is much wider (the seeds differ)."""
    queries = [0, 100, 200, 400]
    shift = [0.05, 0.1, 0.15, 0.1]
    for s, level in enumerate([0.2, 0.6, 1.0, 1.4]):
        base = [level + q / 1000 for q in queries]
        write_run(tmp_path / f"base-{s}", queries, base, seed=s)
        write_run(tmp_path / f"dx-{s}", queries, [v + shift[s] for v in base], seed=s)
    summary = compare.main(["--groups", f"dx={tmp_path}/dx-*", f"base={tmp_path}/base-*",
                            "--out", str(tmp_path / "c.png")])
    base, dx = summary["groups"]["base"], summary["groups"]["dx"]
    assert base["auc_per_run"] == pytest.approx([level + 0.2 for level in [0.2, 0.6, 1.0, 1.4]])  # (a + b) / 2 per run
    assert dx["auc_mean"] - base["auc_mean"] == pytest.approx(0.1)
    assert dx["auc_diff_paired"] == pytest.approx(0.1)
    lo, hi = dx["auc_diff_paired_ci95"]
    assert 0.05 - 1e-12 <= lo <= 0.1 <= hi <= 0.15 + 1e-12
    assert base["auc_std"] > 0.4 and base["auc_diff_paired"] == pytest.approx(0.0)
    assert compare.area(torch.tensor([5.0]), torch.tensor([0.3])) == pytest.approx(0.3)


def test_an_absolute_threshold_replaces_the_fraction(tmp_path):
    """--threshold: a success rate fixed in advance, used even where the baseline does not improve (flat at 0);
    a run that never reaches it counts at its budget and is reported as not reached."""
    queries = [0, 100, 200, 300, 400]
    write_run(tmp_path / "base-0", queries, [0.0] * 5, seed=0)
    write_run(tmp_path / "dx-0", queries, [0.0, 0.1, 0.3, 0.5, 0.5], seed=0)
    flags = ["--groups", f"dx={tmp_path}/dx-*", f"base={tmp_path}/base-*", "--out", str(tmp_path / "c.png")]
    assert compare.main(flags)["threshold"] is None  # the fraction rule: the baseline did not improve
    summary = compare.main([*flags, "--threshold", "0.2"])
    assert summary["threshold"] == 0.2
    assert summary["groups"]["dx"]["queries_to_threshold"] == pytest.approx(150.0)  # 0.1 -> 0.3 between 100 and 200
    assert summary["groups"]["base"]["queries_to_threshold_per_run"] == [400.0]
    assert summary["groups"]["base"]["not_reached"] == 1
    assert summary["groups"]["dx"]["speedup_per_run"] == pytest.approx(400 / 150)


def test_no_paired_interval_without_shared_seeds(tmp_path):
    paired_runs(tmp_path, dx_seeds=range(10, 15))  # other seeds than the baseline's
    summary = compare.main(["--groups", f"dx={tmp_path}/dx-*", f"base={tmp_path}/base-*", "--fraction", "0.5",
                            "--out", str(tmp_path / "c.png")])
    dx = summary["groups"]["dx"]
    assert dx["paired_seeds"] == [] and dx["speedup_paired"] is None and dx["speedup_paired_ci95"] is None
    assert dx["speedup_ci95"] is not None  # the unpaired interval is still there
    assert compare.shared_seeds([0, 1, None], [0, 1, 2]) == []  # a run without a seed: no pairing
    assert compare.shared_seeds([0, 0, 1], [0, 1]) == []  # a repeated seed: no one-to-one pairs
    assert compare.shared_seeds([2, 0, 1], [1, 2, 3]) == [1, 2]
    with pytest.raises(ValueError, match="equal numbers"):
        compare.paired_bootstrap_ratio([1.0, 2.0], [1.0])
