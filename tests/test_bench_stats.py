"""The statistics benchmark against rliable (experiments/bench_stats.py): without rliable it
stops with the install hint and exit code 2; its replay of given resamples reproduces
``marl.stats`` exactly (the check it applies to rliable's resamples)."""

import sys

import numpy as np
import pytest

from experiments import bench_stats as bs
from marl import stats


def test_exits_2_with_install_hint_when_rliable_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rliable", None)  # makes `import rliable` raise ImportError
    assert bs.load_rliable() is None
    assert bs.cli(["--repeats", "1"]) == 2
    assert "pip install rliable==1.2.0" in capsys.readouterr().err


@pytest.mark.parametrize("seeds,tasks", [(3, 1), (5, 3), (10, 2)])
def test_replaying_our_draws_gives_our_interval_exactly(seeds, tasks):
    scores = bs.make_scores(seeds, tasks, seed=1)
    draws = bs.ours_draws(scores, 500, seed=7)
    assert draws.shape == (500, seeds, tasks)
    replay = bs.iqm_ci_from_draws(scores, draws, 0.95)
    point, ci = bs.ours_iqm_ci(scores, 500, 0.95, seed=7)
    np.testing.assert_array_equal(replay, ci)
    assert point == stats.iqm(scores.ravel())


def test_rliable_draws_are_stratified_run_indices():
    scores = bs.make_scores(4, 3)
    draws = bs.rliable_draws(scores, 50, seed=0)
    assert draws.shape == (50, 4, 3) and draws.min() >= 0 and draws.max() < 4
    np.testing.assert_array_equal(draws, bs.rliable_draws(scores, 50, seed=0))  # reseeding replays them


def test_data_and_band_shapes():
    curves = bs.make_curves(5, 20)
    assert curves.shape == (5, 20) and curves.min() >= 0 and curves.max() <= 1
    center, band = bs.ours_band(curves, 100, 0.95, seed=0)
    assert center.shape == (20,) and band.shape == (2, 20) and np.all(band[0] <= band[1])
