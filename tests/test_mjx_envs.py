"""MJX adversarial locomotion (adv:cheetah, adv:hopper). Compiling an MJX step takes
about a minute on a small CPU, so the rollout checks are slow tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import mjx_adversarial
from envs.adversarial import with_params

pytestmark = pytest.mark.skipif(not mjx_adversarial.available(), reason="mujoco-mjx is not installed")


def test_mjx_tasks_are_registered_with_their_specs():
    assert {"adv:cheetah", "adv:hopper", "adv:cheetah-noadv", "adv:hopper-noadv"} <= set(envs.registered())
    cheetah, hopper = envs.make("adv:cheetah"), envs.make("adv:hopper")
    assert (cheetah.spec.num_agents, cheetah.spec.obs_dim, cheetah.spec.action_dim) == (2, 17, 6)
    assert (hopper.spec.num_agents, hopper.spec.obs_dim, hopper.spec.action_dim) == (2, 11, 4)
    assert envs.make("adv:hopper-noadv").spec.num_agents == 1
    # the scaled model: torso mass and inertia, every geom's sliding friction
    inner = cheetah.unwrapped
    m = inner.physics_model(inner.params.replace(mass_scale=2.0, friction_scale=0.5))
    torso = int(inner._mass_bodies[0])
    np.testing.assert_allclose(m.body_mass[torso], 2 * inner.model.body_mass[torso], rtol=1e-6)
    np.testing.assert_allclose(m.geom_friction[:, 0], 0.5 * inner.model.geom_friction[:, 0], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adv:cheetah", "adv:hopper"])
def test_mjx_grid_forces_and_zero_sum(name):
    """(mass, friction, adversary scale) cells batched by vmap: bounded forces, zero-sum
    rewards, distinct trajectories per physics cell, the adversary switched off."""
    env = envs.make(name)
    spec, bound = env.spec, env.unwrapped.force_max
    T = 30

    def one(phys, acts):
        e = with_params(env, mass_scale=phys[0], friction_scale=phys[1], adversary_scale=phys[2])
        state, _ = e.reset(jax.random.PRNGKey(0))
        _, ts = jax.lax.scan(lambda s, a: e.step(jax.random.PRNGKey(1), s, a), state, acts)
        return ts.obs, ts.reward, ts.info["adversary_force"]

    acts = jax.random.uniform(jax.random.PRNGKey(2), (T, 2, spec.action_dim), minval=-1, maxval=1)
    other = acts.at[:, 1].set(-acts[:, 1])
    phys = jnp.array([[1, 1, 1], [2, 1, 1], [1, 0.2, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]], jnp.float32)
    batch = jnp.stack([acts, acts, acts, acts, other, other, 10 * acts])
    obs, r, force = map(np.asarray, jax.jit(jax.vmap(one))(phys, batch))
    assert np.isfinite(obs).all()
    np.testing.assert_allclose(r[..., 0], -r[..., 1])
    assert bound * 0.99 <= np.abs(force[6]).max() <= bound + 1e-5  # actions far outside [-1, 1]
    assert np.abs(force[3]).max() == 0
    np.testing.assert_allclose(obs[3], obs[4], atol=1e-5)  # adversary off: its action is ignored
    assert np.abs(obs[1] - obs[0]).max() > 1e-3 and np.abs(obs[2] - obs[0]).max() > 1e-3  # mass, friction
    assert np.abs(obs[0] - obs[5]).max() > 1e-3  # the adversary's force moves the body
