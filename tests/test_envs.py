import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs


def _rollout(env, steps, seed=0):
    """Random valid actions for ``steps`` steps; returns the stacked timesteps."""
    state, ts = env.reset(jax.random.PRNGKey(seed))

    def step(carry, key):
        state, ts = carry
        k1, k2 = jax.random.split(key)
        a = jax.random.categorical(k1, jnp.where(ts.avail_actions, 0.0, -1e9))
        state, ts2 = env.step(k2, state, a)
        return (state, ts2), (ts, a, ts2)

    _, out = jax.jit(lambda k: jax.lax.scan(step, (state, ts), jax.random.split(k, steps)))(
        jax.random.PRNGKey(seed + 1)
    )
    return out


@pytest.mark.parametrize("name,agents,n", [("smax:3m", 3, 8), ("mpe:simple_spread", 3, 5)])
def test_adapter_shapes(name, agents, n):
    env = envs.make(name)
    spec = env.spec
    assert (spec.num_agents, spec.num_actions) == (agents, n)
    _, ts = env.reset(jax.random.PRNGKey(0))
    assert ts.obs.shape == (agents, spec.obs_dim) and ts.obs.dtype == jnp.float32
    assert ts.state.shape == (spec.state_dim,)
    assert ts.reward.shape == (agents,)
    assert ts.done.shape == () and ts.terminated.shape == ()
    assert ts.avail_actions.shape == (agents, n) and ts.avail_actions.dtype == bool
    assert spec.action_cost.shape == (n, n)
    # batching is vmap
    _, bts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), 5))
    assert bts.obs.shape == (5, agents, spec.obs_dim)


def test_smax_autoreset_termination_and_stats():
    env = envs.make("smax:3m")
    prev, a, ts = _rollout(env, 150)
    done = np.asarray(ts.done)
    assert done.sum() >= 3, "random play on 3m should end several episodes in 150 steps"
    first = int(np.argmax(done))
    # episode ended by a battle (not the 100-step limit): terminated, not truncated
    assert bool(ts.terminated[first])
    assert int(ts.info["episode_length"][first]) == first + 1
    # auto-reset: the returned obs starts a new episode, the final obs is kept
    assert not np.allclose(ts.obs[first], ts.info["final_obs"][first])
    assert np.allclose(ts.obs[first - 1], ts.info["final_obs"][first - 1])
    # returns are accumulated per episode and reported only at its end
    r = np.asarray(ts.reward).mean(-1)
    assert np.isclose(float(ts.info["episode_return"][first]), r[: first + 1].sum(), atol=1e-5)
    ends = np.where(done)[0]
    second = ends[1]
    assert np.isclose(float(ts.info["episode_return"][second]), r[first + 1 : second + 1].sum(), atol=1e-5)
    assert int(ts.info["episode_length"][second]) == second - first
    # dead agents can only take the stop action (JaxMARL's SMAX avail actions)
    av = np.asarray(prev.avail_actions)
    assert av[..., 4].all()


@pytest.mark.parametrize(
    "name, kwargs", [("smax:3m", {}), ("smax:3m", {"reward": "damage_alive"}), ("smax-mt:surComb3", {})]
)
def test_autoreset_takes_the_available_actions_of_the_kept_state(name, kwargs):
    """AutoReset asks the adapter for the available actions of the state it keeps, once,
    instead of selecting between the stepped and the reset state's: the same values, at
    every step and across auto-resets; final_avail stays the finished episode's."""
    from envs.wrappers import AutoReset, EpisodeStats

    once = envs.make(name, **kwargs)
    select = EpisodeStats(AutoReset(envs.make(name, wrap=False, **kwargs)))
    select._env._avail_of_state = False
    assert once._env._avail_of_state and not select._env._avail_of_state
    a, b = _rollout(once, 150)[2], _rollout(select, 150)[2]
    assert np.asarray(a.done).sum() >= 1, "the comparison must cross an auto-reset"
    np.testing.assert_array_equal(np.asarray(a.avail_actions), np.asarray(b.avail_actions))
    np.testing.assert_array_equal(np.asarray(a.info["final_avail"]), np.asarray(b.info["final_avail"]))
    np.testing.assert_array_equal(np.asarray(a.obs), np.asarray(b.obs))


def test_mpe_episodes_are_truncated_not_terminated():
    env = envs.make("mpe:simple_spread")
    _, _, ts = _rollout(env, 60)
    done = np.asarray(ts.done)
    assert list(np.where(done)[0]) == [24, 49]
    assert not np.asarray(ts.terminated).any()
    assert (np.asarray(ts.info["episode_length"])[done] == 25).all()


def test_unknown_env_lists_registered():
    with pytest.raises(envs.UnknownEnvError) as e:
        envs.make("smax:3mm")
    msg = str(e.value)
    assert "smax:3mm" in msg and "smax:3m" in msg and "mpe:simple_spread" in msg
    assert "smax:5m_vs_6m" in envs.registered() and "MPE_simple_reference_v3" in envs.registered()


def test_any_jaxmarl_id_plugs_in():
    env = envs.make("MPE_simple_reference_v3")
    _, ts = env.reset(jax.random.PRNGKey(0))
    assert ts.obs.shape == (env.spec.num_agents, env.spec.obs_dim)


@pytest.mark.parametrize("name", ["smax:3m", "smax:2s3z", "smax-mt:surComb3"])
def test_smax_world_state_is_bounded(name):
    """Every feature of ``state / state_scale`` stays small: JaxMARL's raw weapon cooldown
    (no floor, -49.5 within 100 steps) is bounded by the adapter."""
    env = envs.make(name)
    scale = np.asarray(env.spec.state_scale)
    _, _, ts = _rollout(env, 300)
    x = np.abs(np.asarray(ts.state) / scale)
    assert x.max() <= 1.5, (name, x.max(), np.unravel_index(x.argmax(), x.shape))
    # the cooldown columns are in use (units fire), within [0, 1]
    inner = env.unwrapped if hasattr(env, "unwrapped") else env
    while hasattr(inner, "_env") and not hasattr(inner, "own_features"):
        inner = inner._env
    feats = len(inner.own_features)
    units = inner.num_allies + inner.num_enemies
    cd = np.asarray(ts.state)[:, : units * feats].reshape(-1, units, feats)[..., 3]
    assert cd.min() >= 0.0 and cd.max() <= 1.0 and cd.max() > 0.5


def test_importing_envs_prints_nothing():
    """jaxmarl's two lines about optional submodules are dropped; the streams are restored."""
    import subprocess
    import sys

    code = "import sys, envs; print('streams', sys.stdout is sys.__stdout__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "streams True\n", out.stdout
    assert "Submoduled" not in out.stderr
