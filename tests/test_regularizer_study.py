import json
import math

import numpy as np
import pytest

from experiments import regularizer_study as study
from experiments.regularizer_study import bootstrap_ci, final_per_seed, iqm

# ------------------------------------------------------------------ IQM


def test_iqm_hand_computed():
    assert iqm(np.arange(1, 9)) == pytest.approx(np.mean([3, 4, 5, 6]))  # drop 2 each side of 8
    assert iqm([5, 1, 100, 2]) == pytest.approx(3.5)  # order-free: drop 1 and 100
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) == pytest.approx(6.5)  # drop 3 each side
    assert iqm([1, 2, 3, 4, 1000]) == pytest.approx(3.0)  # n=5: drop floor(5/4)=1 each side
    assert iqm([2.0, 4.0]) == pytest.approx(3.0)  # fewer than 4 values: the mean
    assert iqm([7.0]) == 7.0
    assert math.isnan(iqm([1.0, np.nan, 3.0]))


def test_iqm_matches_scipy_trim_mean_and_is_vectorized():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 7, 8, 13, 40):
        x = rng.normal(size=n)
        assert iqm(x) == pytest.approx(scipy_stats.trim_mean(x, 0.25))
    m = rng.normal(size=(5, 9))
    np.testing.assert_allclose(iqm(m, axis=-1), [iqm(row) for row in m])
    np.testing.assert_allclose(iqm(m, axis=0), [iqm(col) for col in m.T])


def test_iqm_rejects_empty():
    with pytest.raises(ValueError):
        iqm([])


# ------------------------------------------------------------------ bootstrap CI


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    x = np.random.default_rng(1).normal(loc=2.0, size=12)
    lo, hi = bootstrap_ci(x, iqm, num_samples=2000, seed=3)
    assert lo < iqm(x) < hi
    assert bootstrap_ci(x, iqm, num_samples=2000, seed=3) == (lo, hi)
    assert bootstrap_ci(x, iqm, num_samples=2000, seed=4) != (lo, hi)
    # a wider confidence level gives a wider interval
    lo90, hi90 = bootstrap_ci(x, iqm, num_samples=2000, confidence=0.9, seed=3)
    assert lo <= lo90 and hi90 <= hi


def test_bootstrap_ci_narrows_with_more_data():
    rng = np.random.default_rng(2)
    small, large = rng.normal(size=8), rng.normal(size=400)
    w_small = np.subtract(*bootstrap_ci(small, iqm, seed=0)[::-1])
    w_large = np.subtract(*bootstrap_ci(large, iqm, seed=0)[::-1])
    assert 0 < w_large < w_small / 3


def test_bootstrap_ci_constant_sample_and_other_statistics():
    assert bootstrap_ci([1.5, 1.5, 1.5]) == (1.5, 1.5)
    assert bootstrap_ci([4.0]) == (4.0, 4.0)
    lo, hi = bootstrap_ci(np.arange(20.0), np.mean, num_samples=500, seed=0)
    assert lo < 9.5 < hi
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], confidence=1.0)


def test_final_per_seed_weights_episodes_and_falls_back():
    vals = np.array([[0.0, 1.0, 2.0, 4.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    eps = np.array([[0, 1, 1, 3, 1], [2, 0, 0, 0, 0]], float)
    # last 40% = 2 iterations: seed 0 -> (4*3 + 0*1) / 4; seed 1 has no episodes there -> 5
    np.testing.assert_allclose(final_per_seed(vals, eps, 0.4), [3.0, 5.0])
    assert np.isnan(final_per_seed(vals[:, :1], np.zeros((2, 1)), 0.1)).all()


# ------------------------------------------------------------------ CLI

TINY = {"num_envs": 4, "num_steps": 8, "num_minibatches": 1, "update_epochs": 1, "hidden": 16, "recurrent": False}


@pytest.mark.parametrize(
    "argv,field",
    [
        (["--kinds", "none", "wpr"], "kinds"),
        (["--envs", "smax:nope"], "envs"),
        (["--reference", "rollout"], "regularizer.reference"),  # penalty toward itself: zero
        (["--overrides", '{"lrr": 1}'], "overrides.lrr"),
        (["--num-seeds", "0"], "num_seeds"),
    ],
)
def test_cli_rejects_bad_input_naming_the_field(argv, field, tmp_path, capsys):
    rc = study.main(argv + ["--runs-dir", str(tmp_path), "--no-progress", "--total-steps", "1e6"])
    assert rc == 2
    assert field in capsys.readouterr().err


@pytest.mark.slow  # the earlier study's script; its input checks stay in the default suite
def test_study_end_to_end_smoke(tmp_path, capsys):
    argv = [
        "--envs",
        "mpe:simple_spread",
        "--kinds",
        "none",
        "wasserstein",
        "--num-seeds",
        "2",
        "--total-steps",
        "128",
        "--chunk-iterations",
        "4",
        "--overrides",
        json.dumps(TINY),
        "--runs-dir",
        str(tmp_path),
        "--name",
        "smoke",
        "--no-progress",
        "--bootstrap-samples",
        "200",
    ]
    assert study.main(argv) == 0
    out = tmp_path / "smoke"
    png = out / "curve_mpe-simple_spread.png"
    assert png.stat().st_size > 1000
    table = json.loads((out / "final.json").read_text())
    rows = {r["kind"]: r for r in table["rows"]}
    assert set(rows) == {"none", "wasserstein"}
    for r in rows.values():
        assert r["env"] == "mpe:simple_spread" and r["metric"] == "return" and r["num_finite_seeds"] == 2
        assert all(math.isfinite(r[k]) for k in ("iqm", "ci_low", "ci_high", "mean"))
        assert r["ci_low"] <= r["iqm"] <= r["ci_high"]
    for kind in ("none", "wasserstein"):  # the runner's run directories
        run = out / f"mpe-simple_spread_{kind}"
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 4 * 2
        assert json.loads((run / "run.json").read_text())["config"]["regularizer"]["kind"] == kind
    assert (out / "final.md").read_text().count("| mpe:simple_spread |") == 2
    printed = capsys.readouterr().out
    assert "| mpe:simple_spread | wasserstein | return |" in printed
