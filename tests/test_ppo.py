import jax
import numpy as np
import pytest

import algos
import envs
from marl.config import ConfigError
from marl.regularizers import RegularizerConfig
from marl.runner import train


def _finite(metrics):
    return all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


def test_wasserstein_loss_mode_with_per_agent_params():
    env = envs.make("smax:3m")
    rc = RegularizerConfig(kind="wasserstein", coef=0.1, mode="loss", reference="rollout")
    algo = algos.make("ippo", env, num_envs=4, num_steps=8, num_minibatches=2, update_epochs=2, hidden=16,
                      total_steps=64, shared_params=False, regularizer=rc)
    r = train(algo, num_iterations=2, num_seeds=1, progress=False)
    assert _finite(r.metrics)
    # each agent has its own parameters: a leading agent axis after the seed axis
    leaf = jax.tree.leaves(r.state.params)[0]
    assert leaf.shape[:2] == (1, env.spec.num_agents)
    # the trust-region term is live: after the first epoch the policy has moved
    assert r.metrics["regularizer"].max() > 0


def test_wpr_penalty_mode_changes_rewards_not_shapes():
    env = envs.make("mpe:simple_spread")
    base = dict(num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1, hidden=16, total_steps=32,
                recurrent=False)
    rc = RegularizerConfig(kind="wasserstein", coef=1.0, mode="penalty", reference="uniform")
    algo = algos.make("mappo", env, regularizer=rc, **base)
    plain = algos.make("mappo", env, **base)
    r1 = train(algo, num_iterations=1, num_seeds=1, progress=False)
    r0 = train(plain, num_iterations=1, num_seeds=1, progress=False)
    assert _finite(r1.metrics)
    # same seed, same data; only the penalized rewards (hence values/advantages) differ
    np.testing.assert_allclose(r1.metrics["return"], r0.metrics["return"])
    assert not np.allclose(r1.metrics["value_loss"], r0.metrics["value_loss"])


def test_greedy_act_respects_available_actions():
    env = envs.make("smax:3m")
    algo = algos.make("mappo", env, num_envs=4, num_steps=8, num_minibatches=2, hidden=16, total_steps=32)
    state = algo.init(jax.random.PRNGKey(0))
    _, ts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), 16))
    # forbid every action but one random available one per agent
    keep = jax.random.randint(jax.random.PRNGKey(2), ts.avail_actions.shape[:-1], 0, 5)
    avail = jax.nn.one_hot(keep, ts.avail_actions.shape[-1]).astype(bool)
    ts = ts._replace(avail_actions=avail)
    for greedy in (True, False):
        a, _ = algo.act(state.params, ts, algo.initial_carry((16,)), jax.random.PRNGKey(3), greedy)
        assert (a == keep).all()


def test_penalty_mode_with_rollout_reference_is_rejected():
    with pytest.raises(ConfigError, match="regularizer.reference"):
        algos.default_config("mappo", regularizer=RegularizerConfig(kind="kl", coef=0.1, mode="penalty"))


def test_unknown_algorithm_lists_registered():
    with pytest.raises(ConfigError, match="ippo"):
        algos.make("qmixx", envs.make("smax:3m"))
