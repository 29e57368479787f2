"""Adversarial control tasks. One compiled, parameter-batched rollout per environment
(``_rollouts``) serves every test of that environment, so the file compiles little."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import adversarial
from envs.adversarial import with_params
from marl.config import ConfigError

TASKS = ["pendulum", "cartpole", "pointmass"]
T = 210  # steps per rollout (a pendulum episode is 200)
N = 9  # rollouts per call: a 3 x 3 grid, or up to 9 cases padded


@functools.lru_cache(maxsize=None)
def _rollouts(name: str):
    """jit(vmap): physics [N, 3] (mass, friction, adversary scale), actions [N, T, A, d]
    -> timesteps [N, T, ...], every rollout from the same reset key."""
    env = envs.make(name)

    def one(phys, actions):
        e = with_params(env, mass_scale=phys[0], friction_scale=phys[1], adversary_scale=phys[2])
        state, _ = e.reset(jax.random.PRNGKey(0))
        keys = jax.random.split(jax.random.PRNGKey(1), T)
        return jax.lax.scan(lambda s, xs: e.step(xs[0], s, xs[1]), state, (keys, actions))[1]

    return env, jax.jit(jax.vmap(one))


def run(name, cases):
    """cases: list of (phys (m, f, adv), actions [T, A, d]); -> timesteps, leading axis = case."""
    env, fn = _rollouts(name)
    cases = cases + [cases[-1]] * (N - len(cases))
    phys = jnp.asarray([c[0] for c in cases], jnp.float32)
    return fn(phys, jnp.stack([c[1] for c in cases]))


def random_actions(name, key=0, scale=1.0):
    s = envs.make(name).spec
    return scale * jax.random.uniform(jax.random.PRNGKey(key), (T, s.num_agents, s.action_dim), minval=-1, maxval=1)


NOMINAL = (1.0, 1.0, 1.0)


@pytest.mark.parametrize("task", TASKS)
def test_zero_sum_bounds_grid_and_protagonist_alone(task):
    name = f"adv:{task}"
    acts = random_actions(name)
    big = 50.0 * acts  # far outside [-1, 1]
    other = acts.at[:, 1].set(-acts[:, 1])  # another adversary
    ones = jnp.ones_like(acts)
    bound = envs.make(name).unwrapped.force_max

    # 1) zero-sum rewards, adversary force within its bound even for huge actions,
    #    clipping (an action beyond the box acts like its edge), the adversary switched off
    ts = run(
        name,
        [
            (NOMINAL, big),
            ((1.0, 1.0, 0.4), big),
            (NOMINAL, 7.0 * ones),
            (NOMINAL, ones),
            ((1.0, 1.0, 0.0), acts),
            ((1.0, 1.0, 0.0), other),
            (NOMINAL, acts),
            (NOMINAL, other),
        ],
    )
    r = np.asarray(ts.reward)
    assert r.shape == (N, T, 2) and np.abs(r).sum() > 0
    np.testing.assert_allclose(r[..., 0], -r[..., 1])
    force = np.abs(np.asarray(ts.info["adversary_force"]))
    for i, scale in ((0, 1.0), (1, 0.4)):
        assert bound * scale * 0.99 <= force[i].max() <= bound * scale + 1e-6
    np.testing.assert_allclose(ts.obs[2], ts.obs[3], atol=1e-6)
    np.testing.assert_allclose(ts.obs[4], ts.obs[5], atol=1e-6)  # adversary off: its action is ignored
    assert np.abs(force[4]).max() == 0
    assert not np.allclose(ts.obs[6], ts.obs[7])  # ... and matters when on

    # 2) the single-agent protagonist-alone variant matches the adversary switched off
    solo = run(f"{name}-noadv", [((1.0, 1.0, 1.0), acts[:, :1])])
    assert envs.make(f"{name}-noadv").spec.num_agents == 1
    assert envs.make(name, adversary=False).spec.num_agents == 1
    np.testing.assert_allclose(solo.obs[0], ts.obs[4][:, :1], atol=1e-5)
    np.testing.assert_allclose(solo.reward[0], r[4][:, :1], atol=1e-5)

    # 3) a 3 x 3 grid of (mass, friction) in one vmapped rollout: nine distinct trajectories;
    #    the (1, 1) cell is the default environment
    grid = [((m, f, 1.0), acts) for m in (0.5, 1.0, 2.0) for f in (0.0, 1.0, 3.0)]
    obs = np.asarray(run(name, grid).obs).reshape(N, -1)
    dist = np.abs(obs[:, None] - obs[None]).max(-1)
    assert (dist + np.eye(N) > 1e-4).all(), "every parameter cell gives its own trajectory"
    np.testing.assert_allclose(obs[4], np.asarray(ts.obs[6]).reshape(-1), atol=1e-5)


def test_heavier_pendulum_and_episode_ends():
    name = "adv:pendulum"
    acts = random_actions(name, key=2)
    zero = jnp.zeros_like(acts)
    ts = run(
        name,
        [
            (NOMINAL, acts),
            ((3.0, 1.0, 1.0), acts),
            ((1.0, 5.0, 1.0), acts),
            ((1.0, 0.0, 1.0), zero),
            ((3.0, 0.0, 1.0), zero),
        ],
    )
    obs = np.asarray(ts.obs)
    assert np.abs(obs[0] - obs[1]).max() > 0.1  # heavier pole: the same torques move it less
    assert np.abs(obs[0] - obs[2]).max() > 0.1  # more friction
    np.testing.assert_allclose(obs[3], obs[4], atol=1e-5)  # no torque: gravity and inertia scale together
    # truncated (not terminated) after 200 steps; the solo return is the sum of rewards
    done = np.asarray(ts.done[0])
    assert list(np.where(done)[0]) == [199] and not np.asarray(ts.terminated).any()
    solo = run("adv:pendulum-noadv", [(NOMINAL, acts[:, :1])])
    np.testing.assert_allclose(
        solo.info["episode_return"][0, 199], np.asarray(solo.reward)[0, :200, 0].sum(), rtol=1e-5
    )
    # cart-pole falls under random pushes: terminated
    cart = run("adv:cartpole", [(NOMINAL, random_actions("adv:cartpole"))])
    term = np.asarray(cart.terminated[0])
    assert term.any() and (term <= np.asarray(cart.done[0])).all()


def test_pointmass_wall_and_gap():
    env = adversarial.make("pointmass", adversary=False)
    right = jnp.tile(jnp.array([[1.0, 0.0]]), (200, 1, 1))

    @jax.jit
    def run_from(y):
        start = adversarial.EnvState(jnp.stack([-0.75, y, 0.0, 0.0]), jnp.zeros((), jnp.int32))
        return jax.lax.scan(lambda s, a: env.step(jax.random.PRNGKey(0), s, a), start, right)

    end, ts = run_from(0.5)
    assert float(ts.obs[:, 0, 0].max()) <= -env.wall_half_width + 1e-6  # blocked at the wall's face
    assert not np.asarray(ts.terminated).any()
    _, ts = run_from(0.0)
    reached = np.asarray(ts.terminated)
    assert reached.any(), "straight through the gap reaches the goal"
    assert bool(ts.info["won"][int(np.argmax(reached))])


def test_bad_names_and_parameters():
    with pytest.raises(ConfigError) as e:
        adversarial.make("pendulumm")
    assert e.value.field == "task" and "pendulum" in e.value.allowed
    with pytest.raises(envs.UnknownEnvError):
        envs.make("adv:pendulumm")
    with pytest.raises(ConfigError) as e:
        envs.make("adv:pendulum", mass_scale=-1.0)
    assert e.value.field == "mass_scale"
    with pytest.raises(ConfigError) as e:
        with_params(envs.make("adv:cartpole"), gravity=2.0)
    assert e.value.field == "gravity" and "mass_scale" in e.value.allowed
    with pytest.raises(ConfigError):
        envs.make("adv:pendulum-noadv", adversary=True)
    # with_params keeps the wrappers (auto-reset, episode statistics)
    env = with_params(envs.make("adv:pendulum"), mass_scale=2.0)
    assert type(env).__name__ == "EpisodeStats" and float(env.unwrapped.params.mass_scale) == 2.0


def test_stress_grids_and_reward_ranges():
    cart = envs.make("adv:cartpole").unwrapped
    (f1, v1), (f2, v2) = cart.stress_grid()
    assert (f1, f2) == ("mass_scale", "cart_mass_scale") and len(v1) == len(v2) == 11
    assert (v1[0], v1[-1], v2[0], v2[-1]) == (1.0, 200.0, 0.5, 5.0)  # pole 0.1 .. 20 kg, cart 0.5 .. 5 kg
    np.testing.assert_allclose(np.diff(np.log(v1)), np.log(200.0) / 10, rtol=1e-2)  # log-spaced
    (g1, w1), (g2, w2) = envs.make("adv:pendulum").unwrapped.stress_grid(3)
    assert (g1, g2) == ("mass_scale", "friction_scale") and w2 == (0.0, 2.5, 5.0)
    # the cart's mass reaches the dynamics: a heavier cart moves less under the same push
    push = jnp.zeros((1, 2, 1)).at[:, 0].set(1.0)
    start = cart.reset(jax.random.PRNGKey(0))[0]
    moved = [float(cart.with_params(cart_mass_scale=m).step(None, start, push[0])[0].q[2]) for m in (1.0, 4.0)]
    assert moved[0] > 2.0 * moved[1] > 0
    with pytest.raises(ConfigError) as e:
        cart.with_params(cart_mass_scale=0.0)
    assert e.value.field == "cart_mass_scale"
    for task in TASKS:  # random play stays within the documented per-step reward range
        ts = run(f"adv:{task}", [((1.0, 1.0, 1.0), random_actions(f"adv:{task}", key=3))])
        lo, hi = envs.make(f"adv:{task}").unwrapped.reward_range
        r = np.asarray(ts.reward[..., 0])
        assert (r >= lo - 1e-5).all() and (r <= hi + 1e-5).all()
