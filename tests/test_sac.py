import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import algos
import envs
from algos import sac
from envs.wrappers import AutoReset, EpisodeStats
from marl import buffers
from marl.config import ConfigError
from marl.evaluation import evaluate_seeds
from marl.runner import train
from marl.types import EnvSpec, Timestep


class Bandit:
    """One-step continuous bandit for two agents: agent 0 is paid -(a - 0.5)^2,
    agent 1 -(a + 0.5)^2 (on the first action dimension); episodes terminate at once."""

    spec = EnvSpec(name="bandit", num_agents=2, obs_dim=2, state_dim=2, max_steps=1, action_dim=1)
    targets = jnp.array([0.5, -0.5])

    def _ts(self, reward, done):
        obs = jnp.ones((2, 2))
        return Timestep(obs, obs[0], reward, done, done, jnp.ones((2, 1), bool), {})

    def reset(self, key):
        return jnp.zeros(()), self._ts(jnp.zeros(2), jnp.zeros((), bool))

    def step(self, key, state, action):
        reward = -((action[:, 0] - self.targets) ** 2)
        return state, self._ts(reward, jnp.ones((), bool))


@functools.lru_cache(maxsize=None)
def _bandit_algo():
    env = EpisodeStats(AutoReset(Bandit()))
    return algos.make(
        "sac",
        env,
        num_envs=8,
        num_steps=1,
        train_steps=8,
        batch_size=64,
        buffer_size=512,
        learning_starts=64,
        hidden=32,
        total_steps=8 * 120,
        actor_lr=3e-3,
        critic_lr=3e-3,
        alpha_lr=3e-3,
        frozen_agents=(1,),
    )


def test_sac_learns_a_bandit_with_a_frozen_agent_over_two_seeds():
    """jit(vmap(scan(update))) over 2 seeds; agent 0 learns its optimum, agent 1 is frozen."""
    algo = _bandit_algo()
    state0 = jax.jit(jax.vmap(algo.init))(jax.random.split(jax.random.PRNGKey(0), 2))
    result = train(algo, num_iterations=120, num_seeds=2, chunk_iterations=120, progress=False)
    m = result.metrics
    assert m["return_agent0"].shape == (2, 120) and all(np.isfinite(v).all() for v in m.values())
    assert m["learning"][:, -1].all() and not m["learning"][:, 0].any()
    p, p0 = result.state.params, state0.params
    # frozen agent 1: actor, critics and temperature unchanged; agent 0 moved
    for new, old in zip(jax.tree.leaves((p.actor, p.critic)), jax.tree.leaves((p0.actor, p0.critic)), strict=True):
        np.testing.assert_array_equal(new[:, 1], old[:, 1])
        assert not np.allclose(new[:, 0], old[:, 0])
    np.testing.assert_array_equal(p.log_alpha[:, 1], p0.log_alpha[:, 1])
    # greedy action of agent 0 near its optimum 0.5 (reward -(a - 0.5)^2), in both seeds
    ts = jax.vmap(algo.env.reset)(jax.random.split(jax.random.PRNGKey(1), 2))[1]
    greedy = jax.vmap(lambda prm, t: algo.act(prm, t, None, jax.random.PRNGKey(0), True)[0])(p, ts)
    assert np.abs(np.asarray(greedy[:, 0, 0]) - 0.5).max() < 0.15, greedy
    # sampled returns: uniform random actions earn about -0.58, the learned policy near 0
    assert m["return_agent0"][:, :5].mean() < -0.2 and m["return_agent0"][:, -10:].mean() > -0.1
    # the seeds differ (independent keys)
    assert not np.allclose(p.actor["params"]["Dense_0"]["kernel"][0], p.actor["params"]["Dense_0"]["kernel"][1])


def test_sac_shared_temperature_moves_toward_target_entropy():
    """Shared parameters on adv:pendulum, 2 seeds with different target entropies (a
    swept hyperparameter): alpha falls when the entropy is above the target, rises below."""
    env = envs.make("adv:pendulum")
    algo = algos.make(
        "sac",
        env,
        agents="shared",
        num_envs=2,
        num_steps=25,
        train_steps=8,
        batch_size=32,
        buffer_size=400,
        learning_starts=50,
        hidden=32,
        total_steps=2 * 25 * 8,
        alpha_lr=1e-2,
        regularizer=sac.SACConfig().regularizer.__class__(kind="kl", reference="initial", coef=0.1, mode="loss"),
    )
    # the policy's initial entropy is about 0.6 nats: targets below and far above it
    result = train(
        algo, num_iterations=8, num_seeds=2, chunk_iterations=8, progress=False, hparams={"target_entropy": [-1.0, 5.0]}
    )
    m = result.metrics
    alpha = np.asarray(jnp.exp(result.state.params.log_alpha))  # [seeds, agents]
    assert (alpha[0] < 0.97).all() and (alpha[1] > 1.03).all(), alpha
    assert np.all(np.diff(m["alpha"][0][m["learning"][0] > 0]) < 0)
    # shared: one actor for both agents (no agent axis on the parameters)
    kernel = result.state.params.actor["params"]["Dense_0"]["kernel"]
    assert kernel.shape == (2, env.spec.obs_dim + 2, 32)
    # zero-sum episodes ended at step 200; the per-agent returns are opposite
    assert m["episodes"][:, -1].min() > 0
    np.testing.assert_allclose(m["return_agent0"][:, -1], -m["return_agent1"][:, -1], rtol=1e-5)
    assert (m["return_agent0"][:, -1] < 0).all() and (m["regularizer"][:, -1] > 0).all()


def test_replay_ring_buffer():
    ex = sac.Transition(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1,)), jnp.zeros((1, 1)), jnp.zeros((), bool))
    buf = buffers.replay_init(ex, 8)
    add = jax.jit(buffers.replay_add)

    def batch(start, n):
        r = jnp.arange(start, start + n, dtype=jnp.float32)
        return sac.Transition(r[:, None, None], r[:, None, None], r[:, None], r[:, None, None], r > 0)

    buf = add(buf, batch(0, 5))
    assert int(buf.size) == 5 and int(buf.pos) == 5
    buf = add(buf, batch(5, 5))  # wraps: 8, 9 overwrite slots 0, 1
    assert int(buf.size) == 8 and int(buf.pos) == 2
    np.testing.assert_array_equal(buf.data.reward[:, 0], [8, 9, 2, 3, 4, 5, 6, 7])
    big = add(buf, batch(100, 11))  # more than the capacity: the last 8 stay
    assert sorted(np.asarray(big.data.reward[:, 0]).tolist()) == list(range(103, 111))
    s = buffers.replay_sample(buf, jax.random.PRNGKey(0), 64)
    assert set(np.asarray(s.reward[:, 0]).tolist()) <= set(range(2, 10))


def test_sac_config_errors():
    with pytest.raises(ConfigError) as e:
        sac.SACConfig(agents="both")
    assert e.value.field == "agents"
    with pytest.raises(ConfigError) as e:
        sac.SACConfig(regularizer=sac.SACConfig().regularizer.__class__(kind="kl", mode="penalty"))
    assert e.value.field == "regularizer.mode"
    with pytest.raises(ConfigError) as e:
        algos.make("sac", envs.make("adv:pendulum"), frozen_agents=(2,))
    assert e.value.field == "frozen_agents"
    with pytest.raises(ConfigError) as e:
        algos.make("sac", envs.make("mpe:simple_spread"))
    assert e.value.field == "env"
    with pytest.raises(ConfigError):
        sac.SACConfig(tau=0.0)


@pytest.mark.slow
def test_sac_swings_up_the_pendulum_without_adversary():
    env = envs.make("adv:pendulum-noadv")
    algo = algos.make("sac", env, total_steps=12_000, learning_starts=1_000)
    result = train(algo, num_iterations=algo.config.num_updates, num_seeds=1, chunk_iterations=125, progress=False)
    ev = evaluate_seeds(algo, result.state.params, jax.random.PRNGKey(0), num_episodes=16)
    assert ev["return"][0] > -400, ev  # random play: about -1200; solved: about -150
