"""Statistics against hand-computed values, and the report on a hand-made runs directory."""

import json
import math

import numpy as np
import pytest

from experiments import report as rep
from marl import stats

# ------------------------------------------------------------------ statistics


def test_iqm_hand_computed():
    assert stats.iqm(np.arange(1, 9)) == pytest.approx(4.5)  # drop 1, 2 and 7, 8
    assert stats.iqm([5, 1, 100, 2]) == pytest.approx(3.5)  # drop 1 and 100
    assert stats.iqm([1, 2, 3, 4, 1000]) == pytest.approx(3.0)  # n=5: drop one each side
    assert stats.iqm([2.0, 4.0]) == pytest.approx(3.0)  # fewer than 4: the mean
    assert math.isnan(stats.iqm([1.0, np.nan, 3.0]))
    np.testing.assert_allclose(stats.iqm(np.array([[1, 2, 3, 100], [0, 0, 4, 4]]), axis=-1), [2.5, 2.0])
    with pytest.raises(ValueError):
        stats.iqm([])


def test_bootstrap_ci_hand_computed():
    # mean of two draws from {0, 1}: 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert stats.bootstrap_ci([0.0, 1.0], np.mean, num_samples=4000, confidence=0.95) == (0.0, 1.0)
    assert stats.bootstrap_ci([0.0, 1.0], np.mean, num_samples=4000, confidence=0.4) == (0.5, 0.5)
    assert stats.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    x = np.arange(12.0)
    assert stats.bootstrap_ci(x, seed=7) == stats.bootstrap_ci(x, seed=7)


def test_stratified_bootstrap_hand_computed():
    # within-task resampling keeps each task's values: constant tasks give a point interval
    tasks = np.array([[0.0, 1.0]] * 4)  # [runs, tasks]
    assert stats.aggregate(tasks) == pytest.approx(0.5)
    assert stats.stratified_bootstrap_ci(tasks) == (0.5, 0.5)
    lo, hi = stats.bootstrap_ci(tasks.ravel())  # pooling ignores the tasks and is wider
    assert lo < 0.5 < hi
    # tasks of different sizes: (a1 + a2 + 5) / 3 with a_i from {0, 1} -> 5/3, 2, 7/3
    lo, hi = stats.stratified_bootstrap_ci({"A": [0.0, 1.0], "B": [5.0]}, np.mean, num_samples=4000)
    assert (lo, hi) == pytest.approx((5 / 3, 7 / 3))
    # one task: exactly the plain bootstrap (same draws)
    x = np.array([0.3, 1.2, 0.7, 2.2, 0.1])
    assert stats.stratified_bootstrap_ci([x], seed=3) == stats.bootstrap_ci(x, seed=3)
    with pytest.raises(ValueError):
        stats.stratified_bootstrap_ci({"A": []})


def test_bootstrap_band_and_final_scores():
    curves = np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    mean, lo, hi = stats.bootstrap_band(curves, num_samples=2000)
    np.testing.assert_allclose(mean, [1, 1, 1])
    np.testing.assert_allclose(lo, [0, 0, 0])
    np.testing.assert_allclose(hi, [2, 2, 2])
    mean, lo, hi = stats.bootstrap_band(np.array([[np.nan, 1.0], [np.nan, 1.0]]))
    assert np.isnan(mean[0]) and mean[1] == lo[1] == hi[1] == 1.0
    vals = np.array([[1.0, 2.0, 1.0, 3.0], [4.0, 5.0, 9.0, 9.0]])
    eps = np.array([[1, 1, 1, 3], [1, 1, 0, 0]])
    # seed 0: (1 * 1 + 3 * 3) / 4 = 2.5; seed 1: no episode in the window -> last valid value 5
    np.testing.assert_allclose(stats.final_scores(vals, eps, 0.5), [2.5, 5.0])
    np.testing.assert_allclose(stats.final_scores(vals, None, 0.25), [3.0, 9.0])
    # overall: mean over iterations, carrying values over iterations without episodes
    np.testing.assert_allclose(stats.overall_scores(vals, eps), [7.0 / 4, 19.0 / 4])
    np.testing.assert_allclose(stats.overall_scores([[np.nan, 2.0, 4.0]]), [3.0])


# ------------------------------------------------------------------ report


def _write_run(path, info, finals, episodes_last=(1, 3), iterations=10, steps=100):
    """A run whose seed s has return 0 before the last two iterations, then
    ``finals[s] - 1`` and ``finals[s] + 1/3`` with 1 and 3 episodes: weighted mean ``finals[s]``."""
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps(info))
    lines = []
    for it in range(1, iterations + 1):
        for s, f in enumerate(finals):
            if it <= iterations - 2:
                v, e = 0.0, 2
            else:
                v = f - 1.0 if it == iterations - 1 else f + 1.0 / 3.0
                e = episodes_last[it - iterations + 1]
            lines.append(
                json.dumps(
                    {"iteration": it, "env_steps": it * steps, "seed": s, "return": v, "episodes": e, "win_rate": 0.0}
                )
            )
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_report_on_a_hand_made_runs_directory(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs / "a_x", {"algo": "a", "env": "x"}, [1.0, 2.0, 3.0, 10.0])
    _write_run(runs / "b_x", {"algo": "b", "env": "x"}, [4.0, 4.0, 4.0, 4.0])
    _write_run(runs / "a_y", {"algo": "a", "env": "y"}, [0.0, 0.0, 6.0, 6.0])
    # a sweep directory: 2 configurations x 2 seeds as rows c * 2 + s
    _write_run(
        runs / "sw" / "run",
        {"algo": "c", "env": "x", "sweep": {"configs": [{"lr": 0.1}, {"lr": 0.2}], "num_seeds": 2}},
        [1.0, 3.0, 7.0, 9.0],
    )
    out = rep.report(
        rep.ReportArgs(
            dirs=(str(runs),), out=str(tmp_path / "out"), final_fraction=0.2, panels=("episodes", "not_logged")
        )
    )
    assert out["panels"] == {"x": ["return", "episodes"], "y": ["return", "episodes"]}

    for c in out["curves"]:
        assert open(c, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.rsplit("/", 1)[1] for p in out["curves"]) == ["curves_x.png", "curves_y.png"]
    rows = {(r["task"], r["method"]): r for r in out["tables"]["per_task"]}
    assert set(rows) == {("x", "a"), ("x", "b"), ("y", "a"), ("x", "c[c0: lr=0.1]"), ("x", "c[c1: lr=0.2]")}
    a_x = rows[("x", "a")]
    assert a_x["metric"] == "return"  # nobody won
    np.testing.assert_allclose(a_x["per_seed"], [1, 2, 3, 10])
    assert a_x["iqm"] == pytest.approx(2.5) and a_x["mean"] == pytest.approx(4.0)
    # overall per seed f: (8 * 0 + (f - 1) + (f + 1/3)) / 10; IQM = mean of seeds 2 and 3
    np.testing.assert_allclose(a_x["overall_per_seed"], [(2 * f - 2 / 3) / 10 for f in (1, 2, 3, 10)])
    assert a_x["overall_iqm"] == pytest.approx(((4 - 2 / 3) + (6 - 2 / 3)) / 20)
    assert (a_x["ci_low"], a_x["ci_high"]) == pytest.approx(stats.bootstrap_ci([1, 2, 3, 10]))
    assert rows[("x", "b")]["iqm"] == pytest.approx(4.0)
    assert (rows[("x", "b")]["ci_low"], rows[("x", "b")]["ci_high"]) == pytest.approx((4.0, 4.0))
    assert rows[("x", "c[c1: lr=0.2]")]["per_seed"] == pytest.approx([7.0, 9.0])
    # across tasks: method a has x = [1, 2, 3, 10] and y = [0, 0, 6, 6]; IQM of the 8 pooled
    # scores = mean(1, 2, 3, 6) = 3.0, stratified interval from marl.stats
    agg = {r["method"]: r for r in out["tables"]["aggregate"]}
    assert agg["a"]["iqm"] == pytest.approx(3.0) and agg["a"]["tasks"] == ["x", "y"]
    assert (agg["a"]["ci_low"], agg["a"]["ci_high"]) == pytest.approx(
        stats.stratified_bootstrap_ci({"x": [1, 2, 3, 10], "y": [0, 0, 6, 6]})
    )

    md = open(out["markdown"]).read()
    assert "| x | a | return | 2.5000 |" in md
    assert "| x | b | return | 4.0000 | [4.0000, 4.0000] | 4.0000 | 0.7333 | 4 |" in md
    assert "| a | 2 | return | 3.0000 |" in md


def test_report_cli_and_bad_input(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_run(runs / "r1", {"algo": "a", "env": "x"}, [1.0, 2.0])
    _write_run(runs / "r2", {"algo": "a", "env": "x"}, [5.0, 6.0])
    assert rep.main([str(runs), "--group-by", "run", "--final-fraction", "0.2", "--panels", "episodes", "nope"]) == 0
    md = open(runs / "report" / "report.md").read()
    assert "| x | r1 | return | 1.5000 |" in md and "| x | r2 | return | 5.5000 |" in md
    # run folders named one by one, at different depths: labelled below their common parent
    _write_run(tmp_path / "other" / "sub" / "r3", {"algo": "a", "env": "x"}, [7.0, 8.0])
    r3 = tmp_path / "other" / "sub" / "r3"
    assert (
        rep.main(
            [str(runs / "r1"), str(r3), "--group-by", "run", "--final-fraction", "0.2", "--out", str(tmp_path / "o2")]
        )
        == 0
    )
    md = open(tmp_path / "o2" / "report.md").read()
    assert "| x | runs/r1 | return | 1.5000 |" in md and "| x | other/sub/r3 | return | 7.5000 |" in md
    # grouped by label, the two runs pool their seeds
    assert rep.main([str(runs), "--final-fraction", "0.2", "--out", str(tmp_path / "o")]) == 0
    assert "| x | a | return | 3.5000 |" in open(tmp_path / "o" / "report.md").read()
    assert rep.main([str(tmp_path / "missing")]) == 2
    assert rep.main([str(runs), "--group-by", "nope"]) == 2
    (tmp_path / "empty").mkdir()
    assert rep.main([str(tmp_path / "empty")]) == 2
    assert "no run" in capsys.readouterr().err


def test_only_episode_statistics_are_episode_weighted():
    eps = np.array([[2.0, 0.0, 1.0]])
    for m in ("return", "win_rate", "length", "return_agent0"):
        np.testing.assert_array_equal(rep.iteration_weights(m, eps), eps)
    # a per-iteration metric keeps its value where no episode ended
    w = rep.iteration_weights("cluster_ari", eps)
    np.testing.assert_array_equal(w, np.ones_like(eps))
    np.testing.assert_array_equal(rep.curve(np.array([[0.1, 0.5, 0.7]]), w), [[0.1, 0.5, 0.7]])
    np.testing.assert_array_equal(rep.curve(np.array([[0.1, 0.5, 0.7]]), eps), [[0.1, 0.1, 0.7]])
