"""Short learning checks: train for real and check a threshold."""

import numpy as np
import pytest

import algos
import envs
from marl.evaluation import evaluate_seeds
from marl.runner import train


def test_mappo_learns_on_mpe_simple_spread():
    env = envs.make("mpe:simple_spread")
    algo = algos.make(
        "mappo",
        env,
        num_envs=32,
        num_steps=25,
        num_minibatches=2,
        update_epochs=4,
        hidden=64,
        lr=3e-3,
        clip_eps=0.2,
        recurrent=False,
        total_steps=32 * 25 * 100,
    )
    r = train(algo, num_iterations=100, num_seeds=1, seed=0, chunk_iterations=100, progress=False)
    ret = r.metrics["return"][0]
    early, late = ret[:5].mean(), ret[-5:].mean()
    assert late > early + 4.0, (early, late)


@pytest.mark.slow
def test_mappo_wins_smax_3m():
    env = envs.make("smax:3m")
    algo = algos.make("mappo", env, total_steps=1_500_000)
    r = train(algo, num_iterations=algo.config.num_updates, num_seeds=1, progress=False)
    ev = evaluate_seeds(algo, r.state.params, __import__("jax").random.PRNGKey(1), 64)
    assert np.mean(ev["win_rate"]) >= 0.8
