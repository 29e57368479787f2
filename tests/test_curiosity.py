"""The EMC-style curiosity reward (EMU option): its pieces alone, and inside EMU's update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import algos
import envs
from algos import curiosity as cur
from marl.config import ConfigError
from marl.runner import train
from tests.conftest import tiny_overrides


def test_scale_decays_stepwise_to_its_floor():
    s = cur.CuriositySettings(scale=1e-3, decay_rate=0.5, decay_interval=100, decay_stop=2e-4)
    got = [float(cur.scale_at(t, s)) for t in (0, 99, 100, 250, 10_000)]
    assert got == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 2e-4])


def test_soft_update_compounds_the_per_step_rate():
    t, p = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    one = cur.soft_update(t, p, 0.1, 1)
    three = cur.soft_update(t, p, 0.1, 3)
    stepwise = cur.soft_update(cur.soft_update(one, p, 0.1, 1), p, 0.1, 1)  # fixed source: exact
    np.testing.assert_allclose(one["w"], 0.1)
    np.testing.assert_allclose(three["w"], stepwise["w"], rtol=1e-6)


def test_prediction_error_reward_and_loss_hand_computed():
    pred = jnp.asarray([[[[1.0, 0.0], [0.0, 0.0]]]])  # [B=1, T=1, A=2, n=2]
    soft = jnp.asarray([[[[0.1, 0.0], [0.03, 0.04]]]])
    err = cur.prediction_error(pred, soft, 10.0)  # |(1,0) - (1,0)| = 0, |(0,0) - (0.3,0.4)| = 0.5
    np.testing.assert_allclose(err, [[[0.0, 0.5]]], atol=1e-6)
    mask = jnp.ones((1, 1))
    np.testing.assert_allclose(cur.curiosity_reward(err, mask, 1e-3), [[0.25e-3]], rtol=1e-6)
    np.testing.assert_allclose(cur.curiosity_reward(err, mask * 0, 1e-3), [[0.0]])
    assert float(cur.predictor_loss(err, mask)) == pytest.approx(0.25)
    # the error's gradient reaches the predictor only
    g_pred, g_soft = jax.grad(lambda p, s: cur.prediction_error(p, s, 10.0).sum(), argnums=(0, 1))(pred, soft)
    assert np.isfinite(g_pred).all() and np.abs(g_pred).sum() > 0 and np.abs(g_soft).sum() == 0


def test_vdn_td_loss_hand_computed():
    # one episode, 2 transitions, 2 agents, 2 actions
    q = jnp.asarray([[[[1.0, 2.0], [0.5, 0.0]], [[3.0, 1.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    tq = q * 2.0
    batch = {
        "filled": jnp.asarray([[True, True, True]]),
        "action": jnp.asarray([[[1, 0], [0, 1], [0, 0]]]),
        "avail": jnp.ones((1, 3, 2, 2), bool),
        "terminated": jnp.asarray([[False, True, False]]),
    }
    reward = jnp.asarray([[1.0, 5.0]])
    # t = 0: chosen 2 + 0.5; a* = (0, 1) at t = 1, target values 6 + 2 -> y = 1 + 0.5 * 8 = 5
    # t = 1: chosen 3 + 1 = 4, terminal -> y = 5
    loss = cur.vdn_td_loss(q, tq, batch, reward, 0.5)
    assert float(loss) == pytest.approx(((2.5 - 5.0) ** 2 + (4.0 - 5.0) ** 2) / 2)


def test_config_errors_name_the_field():
    for field, value in [
        ("curiosity_scale", -1.0),
        ("curiosity_decay_rate", 1.5),
        ("curiosity_decay_interval", 0),
        ("curiosity_tau", 2.0),
        ("curiosity_target_scale", 0.0),
    ]:
        with pytest.raises(ConfigError) as e:
            algos.default_config("emu", **{field: value})
        assert e.value.field == field


def test_emu_with_curiosity_trains_its_networks_and_adds_the_reward():
    env = envs.make("smax:3m")
    kw = tiny_overrides("emu", num_envs=2, num_steps=32, train_steps=2, batch_size=2, buffer_size=64, hidden=16)
    kw.update(mixer="vdn", capacity=1024, total_steps=3 * 64, curiosity_scale=1e-3, curiosity_tau=0.1)
    algo = algos.make("emu", env, **kw)
    state0 = jax.jit(algo.init)(jax.random.PRNGKey(0))
    r = train(algo, num_iterations=3, num_seeds=2, chunk_iterations=3, progress=False)
    m = r.metrics
    for k in ("curiosity_reward", "curiosity_predictor_loss", "curiosity_vdn_loss", "curiosity_scale"):
        assert m[k].shape == (2, 3) and np.isfinite(m[k]).all(), k
    learning = m["learning"] == 1
    assert learning[:, -1].all()
    assert (m["curiosity_reward"][learning] > 0).all() and (m["curiosity_predictor_loss"][learning] > 0).all()
    np.testing.assert_allclose(m["curiosity_scale"][learning], 1e-3)
    # the reward reaches the TD target: with the incentive off, intrinsic_reward is the curiosity
    np.testing.assert_allclose(m["intrinsic_reward"][learning], m["curiosity_reward"][learning], rtol=1e-5)
    # the VDN network and the predictor are trained; the soft copy moved toward the VDN network
    p, p0 = r.state.params["ext"], state0.params["ext"]
    for name in ("vdn", "predictor"):
        assert not np.allclose(jax.tree.leaves(p[name])[0][0], jax.tree.leaves(p0[name])[0])
    soft0 = jax.tree.leaves(state0.ext.curiosity_soft)[0]
    soft, vdn = jax.tree.leaves(r.state.ext.curiosity_soft)[0][0], jax.tree.leaves(p["vdn"])[0][0]
    assert np.abs(soft - vdn).sum() < np.abs(soft0 - vdn).sum()


def test_curiosity_off_adds_no_parameters():
    env = envs.make("smax:3m")
    algo = algos.make("emu", env, **tiny_overrides("emu", mixer="vdn", capacity=256))
    state = jax.jit(algo.init)(jax.random.PRNGKey(0))
    assert state.params["ext"] == {} and state.ext.curiosity_soft == {}
