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
    data = {
        "step": {"state": jnp.asarray(states, jnp.float32), "reward": jnp.asarray(rewards, jnp.float32)},
        "episode": {"won": jnp.asarray(won), "return": jnp.asarray(won)},
    }
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
    batch = {
        "state": jnp.asarray(states, jnp.float32),
        "filled": buf.filled,
        "terminated": jnp.asarray([[False, False, True, False, False]]),
    }
    target_next = jnp.asarray([[0.2, 3.0, -1.0, 0.0]])  # Qbar_tot(s_{t+1}, a*)
    scaled = emu.make_parts(SPEC, _config(incentive_scale=3.0)).hooks.intrinsic_reward
    off = emu.make_parts(SPEC, _config(incentive=False)).hooks.intrinsic_reward
    batch_far = dict(batch, state=batch["state"] + 10.0)  # states the memory has never seen

    swept = ql.HParams(*(jnp.asarray(v, jnp.float32) for v in (1e-3, 0.25, 0.6, 0.05, 0.0, 0.05)))

    @jax.jit
    def variants(ext):
        return (
            parts.hooks.intrinsic_reward({}, ext, batch, target_next),
            scaled({}, ext, batch, target_next),
            off({}, ext, batch, target_next),
            parts.hooks.intrinsic_reward({}, ext, batch_far, target_next),
            parts.hooks.intrinsic_reward({}, ext, batch, target_next, swept),
        )

    outs = variants(ext)
    metrics, far_metrics, off_metrics = outs[0][1], outs[3][1], outs[2][1]
    bonus, scaled, off, far, bonus_swept = (np.asarray(x[0]) for x in outs)
    # lookups: the live transitions t = 0, 1 both recall their stored s_{t+1} (p = 1 / 2.001 > 0);
    # only t = 0 has a positive gap
    expect = {"replay_hit_rate": 1.0, "hit_positive_ratio": 1.0, "incentive_positive": 0.5, "incentive_active": 1.0}
    assert {k: float(metrics[k]) for k in expect} == pytest.approx(expect)
    assert float(far_metrics["replay_hit_rate"]) == 0.0 and float(far_metrics["incentive_active"]) == 0.0
    assert float(off_metrics["replay_hit_rate"]) == 1.0  # switched off, the lookups are still measured
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
    rec = em.Recall(
        index=jnp.zeros(3, jnp.int32),
        distance=jnp.zeros(3),
        hit=jnp.array([True, True, False]),
        H=jnp.array([5.0, 1.0, 9.0]),
        desirable=jnp.ones(3, bool),
        ratio=jnp.array([0.5, 1.0, 1.0]),
    )
    np.testing.assert_allclose(emu.incentive(rec, jnp.array([1.0, 2.0, 0.0])), [2.0, 0.0, 0.0])


def test_embedding_loss_is_the_official_sum():
    # by hand: (3 - 1)^2 + 0.1 * (1 + 4) and (0 - 2)^2 + 0.1 * (0 + 9), summed over the samples
    s = jnp.array([[1.0, 2.0], [0.0, 3.0]])
    terms = (s, jnp.zeros_like(s), jnp.array([3.0, 0.0]), jnp.array([1.0, 2.0]), 0.1)
    assert float(emu.embedding_loss_terms(*terms)) == pytest.approx(4.5 + 4.9)
    assert float(emu.embedding_loss_terms(*terms, reduction="mean")) == pytest.approx(4.0 + 0.1 * 14 / 4)
    # the network's loss is that sum over its own reconstructions
    parts = emu.make_parts(SPEC, _config())
    _, ext = parts.hooks.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    states, t, H = rng.normal(size=(5, S)), np.arange(5) % L, rng.normal(size=5)
    net = emu.StateEmbedding(S, 4, 64)
    _, (s_hat, h_hat) = net.apply(ext.embed_params, jnp.asarray(states, jnp.float32), jnp.asarray(t / L, jnp.float32))
    by_hand = ((H - np.asarray(h_hat)) ** 2).sum() + 0.1 * ((states - np.asarray(s_hat)) ** 2).sum()
    got = float(parts.embedding_loss(ext.embed_params, jnp.asarray(states, jnp.float32), jnp.asarray(t), H))
    assert got == pytest.approx(by_hand, rel=1e-5)


def _jittered_episodes(rng, n, jitter):
    """n episodes of 3 transitions along one base trajectory (steps far apart), each
    state jittered by up to ``jitter``; the first half won."""
    base = 10.0 * rng.normal(size=(1, L + 1, S))
    states = base + rng.uniform(-jitter, jitter, size=(n, L + 1, S))
    rewards = np.tile([[0.0, 0.0, 1.0, 0.0, 0.0]], (n, 1))
    return _buffer(states, rewards, [3] * n, (np.arange(n) < n // 2).astype(float))


def test_desirability_rises_on_jittered_revisits():
    """Jittered copies of one trajectory, half of them won, written through the hooks:
    revisits counted within a neighbourhood (write_delta) raise N_xi, p > 0 reaches
    the lookups and the incentive. (Exact revisits only: tests/test_episodic_memory.py.)"""
    parts = emu.make_parts(SPEC, _config(delta=1e-6, write_delta=0.05))
    _, ext = parts.hooks.init(jax.random.PRNGKey(0))
    buf = _jittered_episodes(np.random.default_rng(1), 8, 0.01)  # key jitter < 0.006, steps > 0.4 apart
    ext = jax.jit(parts.hooks.after_iteration)(ext, {}, buf, jnp.asarray(8), jax.random.PRNGKey(1))
    mem = ext.memory
    # the first (won) episode inserts 3 entries; the 7 others revisit them
    assert int(mem.size) == 3 and float(ext.write_revisits) == pytest.approx(21 / 24)
    assert np.asarray(mem.n_call[:3]).tolist() == [8, 8, 8]
    # slots hold t = 2, 1, 0; the 3 other won episodes add 1 everywhere; a lost episode
    # reaches the desirable entry of t = 2, so its earlier steps count as desirable too
    assert np.asarray(mem.n_xi[:3]).tolist() == [3, 7, 7]
    m = {k: float(v) for k, v in em.memory_metrics(mem).items()}
    assert m["memory_positive_ratio"] == 1.0 and m["memory_revisited"] == 1.0 and m["memory_desirable"] == 1.0
    # replayed: lookups at the tiny delta hit only the first episode's own states (2 of
    # 16 live transitions), and those have p > 0 and a positive incentive
    batch = {
        "state": buf.data["step"]["state"],
        "filled": buf.filled,
        "terminated": jnp.zeros(buf.filled.shape, bool).at[:, 2].set(True),
    }
    bonus, metrics = jax.jit(parts.hooks.intrinsic_reward)({}, ext, batch, jnp.full((8, L), -1.0))
    assert float(metrics["replay_hit_rate"]) == pytest.approx(1 / 8)
    assert float(metrics["hit_positive_ratio"]) == 1.0
    assert (np.asarray(bonus[0, :2]) > 0).all() and not np.asarray(bonus[1:]).any()


def test_running_top_quantile_makes_the_best_returns_desirable():
    recent = jnp.asarray(np.r_[np.arange(20.0), np.full(10, np.nan)])  # 20 known returns 0..19
    xi = jax.vmap(lambda r: emu.desirability(0.0, r, recent, quantile=0.9))(jnp.array([17.0, 17.2, 19.5]))
    assert np.asarray(xi).tolist() == [False, True, True]  # 0.9 quantile of 0..19 = 17.1
    assert bool(emu.desirability(1.0, -5.0, recent, quantile=0.9))  # a won episode stays desirable
    few = jnp.asarray(np.r_[np.arange(5.0), np.full(25, np.nan)])
    assert not bool(emu.desirability(0.0, 100.0, few, quantile=0.9))  # fewer than 10 known returns
    assert not bool(emu.desirability(0.0, 100.0, recent))  # the rule is off by default


def test_embedding_training_lowers_its_loss_and_rekeys_the_memory():
    # 512 env steps per iteration (8 envs x 64 steps): the phase is due at the second call
    cfg = _config(
        embed_interval=1000,
        embed_steps=150,
        embed_batch=64,
        embed_lr=3e-3,
        capacity=256,
        embed_min_entries=64,
        embed_loss_reduction="mean",
    )
    parts = emu.make_parts(SPEC, cfg)
    _, ext = parts.hooks.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    n = 200
    states = rng.normal(size=(n, S)).astype(np.float32)
    t = rng.integers(0, L, n)
    H = (states @ np.array([1.0, -2.0, 0.5]) + t).astype(np.float32)  # a return the embedding can predict
    mem = ext.memory
    mem = mem.replace(
        states=mem.states.at[:n].set(states),
        timestep=mem.timestep.at[:n].set(t),
        H=mem.H.at[:n].set(H),
        size=jnp.asarray(n, jnp.int32),
    )
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
    for field, value in [
        ("capacity", 0),
        ("delta", -1.0),
        ("hit_metric", "l1"),
        ("embed_steps", 0),
        ("lookup_chunk", 1.5),
        ("mixer", "none"),
        ("lambda_rcon", -0.1),
        ("write_delta", -1.0),
        ("embed_loss_reduction", "max"),
        ("desirable_quantile", 1.5),
        ("capacity", 2.5),
        ("embed_min_entries", 0),
        ("stats_interval", 0),
    ]:
        with pytest.raises(ConfigError) as e:
            algos.default_config("emu", **{field: value})
        assert e.value.field == field


def test_vmapped_updates_on_smax_fill_the_memory_and_train_the_embedding():
    env = envs.make("smax:3m")
    kw = tiny_overrides("emu", num_envs=2, num_steps=32, train_steps=1, batch_size=2, buffer_size=64, hidden=16)
    kw.update(
        mixer="vdn",
        capacity=1024,
        embed_interval=128,
        embed_steps=4,
        embed_batch=8,
        lookup_chunk=256,
        stats_interval_episodes=2,
        total_steps=3 * 64,
        desirable_quantile=0.5,
        desirable_window=8,
    )
    algo = algos.make("emu", env, **kw)
    r = train(algo, num_iterations=3, num_seeds=2, chunk_iterations=3, progress=False)
    m = r.metrics
    assert np.isfinite(m["loss"]).all() and (m["learning"][:, -1] == 1).all()
    ext, buf = r.state.ext, r.state.buffer
    assert (np.asarray(ext.env_steps) == 3 * 64).all() and (np.asarray(ext.last_embed) == 128).all()
    assert (np.asarray(m["embed_loss"][:, -1]) > 0).all()  # trained once, after iteration 2
    # the memory behaviour is logged every iteration
    for k in (
        "replay_hit_rate",
        "hit_positive_ratio",
        "incentive",
        "incentive_positive",
        "incentive_active",
        "memory_size",
        "memory_desirable",
        "memory_revisited",
        "memory_positive_ratio",
        "write_revisits",
        "intrinsic_reward",
    ):
        assert m[k].shape == (2, 3) and np.isfinite(m[k]).all(), k
    # by the last iteration most replayed episodes were written before, so lookups hit
    assert (m["replay_hit_rate"][:, -1] > 0).all() and (m["memory_size"][:, 1:] > 0).all()
    # the running-quantile rule's ring holds the returns of the written episodes
    known = np.isfinite(np.asarray(ext.recent_returns)).sum(-1)
    np.testing.assert_array_equal(known, np.minimum(np.asarray(ext.written), 8))
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
