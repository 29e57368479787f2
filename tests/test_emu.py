"""EMU on the Q-learning backbone: the incentive in the TD target, the embedding, vmapped updates."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import algos
import envs
from algos import emu
from algos import qlearning as ql
from marl import buffers
from marl import episodic_memory as em
from marl.config import ConfigError
from marl.runner import train
from tests.conftest import tiny_overrides

L, S = 4, 3  # a toy env: episodes of at most 4 steps, 3 state features
SPEC = SimpleNamespace(state_dim=S, max_steps=L, state_scale=None, max_return=None)


def _config(**kw):
    base = dict(mixer="vdn", gamma=0.5, delta=1e-4, embed_interval=10**9, stats_interval_episodes=10**6)
    return emu.EMUConfig(**{**base, **kw})


def _buffer(states, rewards, lengths, won):
    """A replay buffer holding toy episodes: states [N, L + 1, S], rewards [N, L + 1]."""
    n = len(lengths)
    filled = np.arange(L + 1)[None] <= np.asarray(lengths)[:, None]  # steps 0..len (len + 1 observations)
    won = np.broadcast_to(np.asarray(won, np.float32)[:, None], (n, L + 1))
    data = {"step": {"state": jnp.asarray(states, jnp.float32), "reward": jnp.asarray(rewards, jnp.float32)},
            "episode": {"won": jnp.asarray(won), "return": jnp.asarray(won)}}
    return buffers.EpisodeBuffer(data, jnp.asarray(filled), jnp.asarray(0, jnp.int32), jnp.asarray(n, jnp.int32))


def test_incentive_in_the_td_target_hand_computed():
    parts = emu.make_parts(SPEC, _config())
    _, ext = parts.hooks.init(jax.random.PRNGKey(0))
    write = jax.jit(parts.hooks.after_iteration)
    rng = np.random.default_rng(0)
    states = rng.normal(size=(1, L + 1, S))
    rewards = np.array([[1.0, 0.0, 2.0, 0.0, 0.0]])  # a won episode of 3 transitions
    buf = _buffer(states, rewards, [3], [1.0])
    # written twice: on the second pass every step hits its own entry, N_call = 2, N_xi = 1
    ext = write(ext, {}, buf, jnp.asarray(1), jax.random.PRNGKey(1))
    ext = write(ext, {}, buf, jnp.asarray(1), jax.random.PRNGKey(2))
    mem = ext.memory
    assert int(mem.size) == 3 and np.asarray(mem.n_call[:3]).tolist() == [2, 2, 2]
    assert np.asarray(mem.n_xi[:3]).tolist() == [1, 1, 1]
    # H = discounted return-to-go with gamma 0.5: R_0 = 1 + 0.5 * 0 + 0.25 * 2, R_1 = 1, R_2 = 2
    H = {int(t): float(h) for t, h in zip(mem.timestep[:3], mem.H[:3], strict=True)}
    assert H == pytest.approx({0: 1.5, 1: 1.0, 2: 2.0})
    # the same episode as a training batch; transition t recalls s_{t+1}
    batch = {"state": jnp.asarray(states, jnp.float32), "filled": buf.filled,
             "terminated": jnp.asarray([[False, False, True, False, False]])}
    target_next = jnp.asarray([[0.2, 3.0, -1.0, 0.0]])  # Qbar_tot(s_{t+1}, a*)
    scaled = emu.make_parts(SPEC, _config(incentive_scale=3.0)).hooks.intrinsic_reward
    off = emu.make_parts(SPEC, _config(incentive=False)).hooks.intrinsic_reward
    batch_far = dict(batch, state=batch["state"] + 10.0)  # states the memory has never seen

    swept = ql.HParams(*(jnp.asarray(v, jnp.float32) for v in (1e-3, 0.25, 0.6, 0.05, 0.0, 0.05)))

    @jax.jit
    def variants(ext):
        return (parts.hooks.intrinsic_reward(ext, batch, target_next), scaled(ext, batch, target_next),
                off(ext, batch, target_next), parts.hooks.intrinsic_reward(ext, batch_far, target_next),
                parts.hooks.intrinsic_reward(ext, batch, target_next, swept))

    bonus, scaled, off, far, bonus_swept = (np.asarray(x) for x in variants(ext))
    # a swept gamma (0.25 instead of the config's 0.5) reaches the incentive's gamma factor
    np.testing.assert_allclose(bonus_swept, 0.5 * bonus, rtol=1e-5)
    bonus = bonus[0]
    p = 1.0 / (2.0 + 1e-3)
    # t = 0: s_1 has H = 1.0 > 0.2; t = 1: s_2 has H = 2.0 < 3.0 (no gap);
    # t = 2: s_3 ends the episode (terminal, no incentive); t = 3: no transition
    np.testing.assert_allclose(bonus, [0.5 * p * (1.0 - 0.2), 0.0, 0.0, 0.0], rtol=1e-5)
    # the scale, the off switch, and states the memory has never seen
    np.testing.assert_allclose(scaled[0], 3.0 * bonus, rtol=1e-5)
    assert not off.any() and not far.any()
    # the formula itself, on recalled entries
    rec = em.Recall(index=jnp.zeros(3, jnp.int32), distance=jnp.zeros(3), hit=jnp.array([True, True, False]),
                    H=jnp.array([5.0, 1.0, 9.0]), desirable=jnp.ones(3, bool), ratio=jnp.array([0.5, 1.0, 1.0]))
    np.testing.assert_allclose(emu.incentive(rec, jnp.array([1.0, 2.0, 0.0])), [2.0, 0.0, 0.0])


def test_embedding_training_lowers_its_loss_and_rekeys_the_memory():
    # 512 env steps per iteration (8 envs x 64 steps): the phase is due at the second call
    cfg = _config(embed_interval=1000, embed_steps=150, embed_batch=64, embed_lr=3e-3, capacity=256)
    parts = emu.make_parts(SPEC, cfg)
    _, ext = parts.hooks.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    n = 200
    states = rng.normal(size=(n, S)).astype(np.float32)
    t = rng.integers(0, L, n)
    H = (states @ np.array([1.0, -2.0, 0.5]) + t).astype(np.float32)  # a return the embedding can predict
    mem = ext.memory
    mem = mem.replace(states=mem.states.at[:n].set(states), timestep=mem.timestep.at[:n].set(t),
                      H=mem.H.at[:n].set(H), size=jnp.asarray(n, jnp.int32))
    ext = ext.replace(memory=mem)
    loss = jax.jit(parts.embedding_loss)
    before = float(loss(ext.embed_params, states, jnp.asarray(t), H))
    empty = _buffer(np.zeros((1, L + 1, S)), np.zeros((1, L + 1)), [1], [0.0])
    step = jax.jit(parts.hooks.after_iteration)
    same = step(ext, {}, empty, jnp.asarray(0), jax.random.PRNGKey(3))
    # not due yet: nothing is trained
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), same.embed_params, ext.embed_params))
    new = step(same, {}, empty, jnp.asarray(0), jax.random.PRNGKey(4))
    assert int(new.last_embed) == 1024
    after = float(loss(new.embed_params, states, jnp.asarray(t), H))
    assert after < 0.3 * before, (before, after)
    assert 0 < float(new.embed_loss) < before
    # every stored key is the new encoder's key of its stored state, with refreshed statistics
    keys = parts.encode(new.embed_params, jnp.asarray(states), jnp.asarray(t))
    np.testing.assert_allclose(new.memory.keys[:n], keys, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.memory.keys_norm[:n]).mean(0), 0.0, atol=1e-3)


def test_config_errors_name_the_field():
    for field, value in [("capacity", 0), ("delta", -1.0), ("hit_metric", "l1"), ("embed_steps", 0),
                         ("lookup_chunk", 1.5), ("mixer", "none"), ("lambda_rcon", -0.1)]:
        with pytest.raises(ConfigError) as e:
            algos.default_config("emu", **{field: value})
        assert e.value.field == field


def test_vmapped_updates_on_smax_fill_the_memory_and_train_the_embedding():
    env = envs.make("smax:3m")
    kw = tiny_overrides("emu", num_envs=2, num_steps=32, train_steps=1, batch_size=2, buffer_size=64, hidden=16)
    kw.update(mixer="vdn", capacity=1024, embed_interval=128, embed_steps=4, embed_batch=8, lookup_chunk=256,
              stats_interval_episodes=2, total_steps=3 * 64)
    algo = algos.make("emu", env, **kw)
    r = train(algo, num_iterations=3, num_seeds=2, chunk_iterations=3, progress=False)
    m = r.metrics
    assert np.isfinite(m["loss"]).all() and (m["learning"][:, -1] == 1).all()
    ext, buf = r.state.ext, r.state.buffer
    assert (np.asarray(ext.env_steps) == 3 * 64).all() and (np.asarray(ext.last_embed) == 128).all()
    assert (np.asarray(m["embed_loss"][:, -1]) > 0).all()  # trained once, after iteration 2
    parts = emu.make_parts(env.spec, algo.config)
    for s in range(2):
        size = int(ext.memory.size[s])
        assert 0 < size <= 1024
        # every transition stored in the replay buffer was written once: as an insertion or a hit
        transitions = int((np.asarray(buf.filled[s]).sum(-1) - 1).clip(0).sum())
        assert int(np.asarray(ext.memory.n_call[s]).sum()) == transitions > 0
        assert int(ext.written[s]) == int(buf.size[s])
        # stored keys are the embedding of stored states (re-keyed after the training phase)
        p = jax.tree.map(lambda x, i=s: x[i], ext.embed_params)
        keys = parts.encode(p, ext.memory.states[s, :size], ext.memory.timestep[s, :size])
        np.testing.assert_allclose(ext.memory.keys[s, :size], keys, rtol=1e-4, atol=1e-4)
    # seeds differ
    leaf = jax.tree.leaves(r.state.params["agent"])[0]
    assert not np.allclose(leaf[0], leaf[1])
