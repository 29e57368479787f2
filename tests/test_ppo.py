import jax
import jax.numpy as jnp
import numpy as np
import pytest

import algos
import envs
from marl.config import ConfigError
from marl.regularizers import RegularizerConfig
from marl.runner import train


def _finite(metrics):
    return all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


@pytest.mark.slow  # loss-mode Wasserstein is covered by test_regularizers and the penalty test here
def test_wasserstein_loss_mode_with_per_agent_params():
    env = envs.make("smax:3m")
    rc = RegularizerConfig(kind="wasserstein", coef=0.1, mode="loss", reference="rollout")
    algo = algos.make(
        "ippo",
        env,
        num_envs=4,
        num_steps=8,
        num_minibatches=2,
        update_epochs=2,
        hidden=16,
        total_steps=64,
        shared_params=False,
        regularizer=rc,
    )
    r = train(algo, num_iterations=2, num_seeds=1, progress=False)
    assert _finite(r.metrics)
    # each agent has its own parameters: a leading agent axis after the seed axis
    leaf = jax.tree.leaves(r.state.params)[0]
    assert leaf.shape[:2] == (1, env.spec.num_agents)
    # the trust-region term is live: after the first epoch the policy has moved
    assert r.metrics["regularizer"].max() > 0


def test_wpr_penalty_mode_changes_rewards_not_shapes():
    env = envs.make("mpe:simple_spread")
    base = dict(num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1, hidden=16, total_steps=32, recurrent=False)
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


# ------------------------------------------------------------------ continuous actions

AGG = dict(num_agents=2, radius=0.5, max_speed=1.0, noise=0.02, max_steps=20)


def test_continuous_ppo_learns_aggregation():
    """IPPO with a Gaussian policy on a two-agent aggregation swarm (each agent sees the
    other's displacement): the return rises clearly above its initial value (about -4;
    measured about -1.2 after 40 iterations)."""
    env = envs.make("swarm:aggregation", **AGG)
    algo = algos.make(
        "ippo",
        env,
        num_envs=8,
        num_steps=20,
        num_minibatches=2,
        update_epochs=4,
        hidden=32,
        recurrent=False,
        agent_ids=False,
        lr=3e-3,
        clip_eps=0.2,
        total_steps=8 * 20 * 40,
    )
    r = train(algo, num_iterations=40, num_seeds=1, chunk_iterations=40, progress=False)
    ret = r.metrics["return"][0]
    assert np.isfinite(ret).all()
    assert ret[-10:].mean() > ret[:2].mean() + 1.5, ret
    # the policy's spread shrinks as it learns (state-independent log-std is trained)
    assert r.metrics["entropy"][0, -1] < r.metrics["entropy"][0, 0]
    # greedy actions are the clipped means, within the env's bounds
    _, ts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), 3))
    p0 = jax.tree.map(lambda x: x[0], r.state.params)
    a, _ = jax.jit(algo.act, static_argnums=4)(p0, ts, algo.initial_carry((3,)), jax.random.PRNGKey(1), True)
    assert a.shape == (3, 2, 2) and float(jnp.abs(a).max()) <= 1.0


@pytest.mark.parametrize(
    "kind,mode,reference",
    [("kl", "loss", "rollout"), ("wasserstein", "penalty", "initial"), ("entropy", "loss", "rollout")],
)
def test_continuous_regularizers_run(kind, mode, reference):
    env = envs.make("swarm:aggregation", **AGG)
    rc = RegularizerConfig(kind=kind, coef=0.1, mode=mode, reference=reference)
    algo = algos.make(
        "ippo",
        env,
        num_envs=2,
        num_steps=20,
        num_minibatches=1,
        update_epochs=1,
        hidden=8,
        recurrent=False,
        agent_ids=False,
        total_steps=40,
        regularizer=rc,
    )
    r = train(algo, num_iterations=1, num_seeds=1, progress=False)
    assert _finite(r.metrics)
    if kind == "entropy":  # -H of the initial Gaussian: 2 dims at log std -0.5
        expected = -2 * (-0.5 + 0.5 * (1 + np.log(2 * np.pi)))
        np.testing.assert_allclose(r.metrics["regularizer"], expected, rtol=1e-3)


def test_gaussian_w2_potential_is_centred():
    """The W2 penalty's mean under the policy is W2^2, and it is 0 at equality."""
    from marl.regularizers import gaussian_regularizer

    m1, ls1 = jnp.array([0.2, -0.5]), jnp.array([-0.3, 0.1])
    m2, ls2 = jnp.array([-0.1, 0.4]), jnp.array([0.2, -0.6])
    x = m1 + jnp.exp(ls1) * jax.random.normal(jax.random.PRNGKey(0), (200_000, 2))
    _, pen, value = gaussian_regularizer("wasserstein", m1, ls1, m2, ls2, x, 1.0)
    np.testing.assert_allclose(pen.mean(), value, rtol=2e-2)
    _, pen0, v0 = gaussian_regularizer("wasserstein", m1, ls1, m1, ls1, x[:10], 1.0)
    np.testing.assert_allclose(pen0, 0.0, atol=1e-5)
    assert float(v0) == 0.0


def test_continuous_config_errors():
    env = envs.make("swarm:aggregation", num_agents=4)
    with pytest.raises(ConfigError, match="regularizer.reference"):
        algos.make(
            "ippo", env, regularizer=RegularizerConfig(kind="wasserstein", coef=0.1, mode="loss", reference="uniform")
        )
    with pytest.raises(ConfigError, match="log_std_init"):
        algos.default_config("ippo", log_std_init=50.0)
    # one-hot ids for a large swarm are refused before anything is allocated
    with pytest.raises(ConfigError, match="agent_ids"):
        algos.make("ippo", envs.make("swarm:aggregation", num_agents=300))


def test_truncation_bootstrap_values_are_the_critics_at_the_final_observations():
    """With episodes cut by the step limit inside a rollout, ``final_value`` holds the
    critic's value of the true last observation (continuing the step's hidden state) at
    every step with a truncation, where GAE bootstraps from it."""
    from algos import ppo

    env = envs.make("swarm:aggregation", num_agents=4, max_steps=3)
    config = ppo.PPOConfig(critic="centralized", hidden=16, num_envs=4, num_steps=8)
    m = ppo.make_parts(env.spec, config)
    state = ppo.init(m, env, None, jax.random.PRNGKey(0))

    def step(s, key):
        s, tr = ppo.rollout_step(m, env, s, key)
        return s, (tr, s.h, s.last_ts)

    _, (traj, h_after, nts) = jax.lax.scan(step, state, jax.random.split(jax.random.PRNGKey(1), config.num_steps))
    truncated = (traj.done & ~traj.terminated).any(axis=1)
    assert 2 <= truncated.sum() < config.num_steps
    for t in range(config.num_steps):
        if not truncated[t]:
            continue
        ts_t = jax.tree.map(lambda x, t=t: x[t], nts)
        fx, fcx = ppo.inputs(m, ts_t._replace(obs=ts_t.info["final_obs"], state=ts_t.info["final_state"]))
        want = ppo.value_only(m, state.params, h_after[t], fx, fcx, jnp.zeros(h_after[t].shape[:-2], bool))
        np.testing.assert_allclose(traj.final_value[t], want, rtol=1e-5, atol=1e-6)
