"""EMU's episodic memory: write semantics on hand-made episodes, exact search, re-keying."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marl import episodic_memory as em

DELTA = 0.01


PAD = 4  # episodes are padded to 4 steps (invalid padding), so each flag setting compiles once


@functools.partial(jax.jit, static_argnames=("propagate", "init_desirability"))
def _write_padded(memory, keys, states, returns, desirable, valid, propagate, init_desirability):
    return em.write_episode(
        memory,
        keys,
        states,
        returns,
        jnp.arange(PAD),
        desirable,
        valid,
        DELTA,
        chunk=3,
        propagate=propagate,
        init_desirability=init_desirability,
    )


def _write(memory, keys, returns, desirable, valid=None, propagate=True, init_desirability=False):
    keys = np.asarray(keys, np.float32)
    n = keys.shape[0]
    pad = lambda x: np.concatenate([x, np.zeros((PAD - n,) + x.shape[1:], x.dtype)])  # noqa: E731
    states = np.concatenate([keys, np.arange(n, dtype=np.float32)[:, None]], 1)  # state = (key, t)
    valid = np.ones((n,), bool) if valid is None else np.asarray(valid)
    return _write_padded(
        memory,
        pad(keys),
        pad(states),
        pad(np.asarray(returns, np.float32)),
        jnp.asarray(desirable),
        pad(valid),
        propagate,
        init_desirability,
    )


def _entry(memory, key):
    """Index of the stored entry whose raw key equals ``key``."""
    rows = np.where(np.all(np.isclose(np.asarray(memory.keys), key), 1) & np.asarray(em.filled_mask(memory)))[0]
    assert len(rows) == 1, (key, np.asarray(memory.keys))
    return int(rows[0])


def test_discounted_returns_stop_at_the_episode_end():
    R = em.discounted_returns(jnp.array([1.0, 0.0, 2.0, 5.0]), jnp.array([True, True, True, False]), 0.5)
    np.testing.assert_allclose(np.asarray(R), [1 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2.0, 0.0])


def test_write_hits_and_misses_keep_the_best_return_and_count_visits():
    m = em.init(8, 2, 3)
    # t = 0 and t = 2 share a key (within delta); written backwards: t = 3, 2, 1, 0
    keys = [[0.0, 0.0], [1.0, 0.0], [0.004, 0.0], [2.0, 2.0]]
    m = _write(m, keys, [4.0, 3.0, 2.0, 1.0], False)
    assert int(m.size) == 3 and int(m.clock) == 4
    a = _entry(m, [0.004, 0.0])  # inserted at t = 2, hit at t = 0: the stored key is the first one written
    assert float(m.H[a]) == 4.0 and int(m.n_call[a]) == 2 and int(m.timestep[a]) == 2
    b, c = _entry(m, [1.0, 0.0]), _entry(m, [2.0, 2.0])
    assert (float(m.H[b]), int(m.n_call[b]), float(m.H[c]), int(m.n_call[c])) == (3.0, 1, 1.0, 1)
    assert int(m.n_xi.sum()) == 0 and not bool(m.desirable.any())
    # slots fill in index order, starting with the last step of the episode
    assert [c, a, b] == [0, 1, 2]
    # a second, worse visit of the first state: a hit that keeps H = 4
    m2 = _write(m, [[0.0, 0.005]], [1.5], False)
    assert int(m2.size) == 3 and float(m2.H[a]) == 4.0 and int(m2.n_call[a]) == 3
    # a better one raises H
    m3 = _write(m2, [[0.0, 0.005]], [9.0], False)
    assert float(m3.H[a]) == 9.0 and int(m3.n_call[a]) == 4
    # just outside delta (per dimension): a miss, inserted
    m4 = _write(m3, [[0.0, 0.0 + 0.0041 + DELTA]], [0.0], False)
    assert int(m4.size) == 4
    # invalid steps are not written
    m5 = _write(m, [[7.0, 7.0], [8.0, 8.0]], [1.0, 1.0], False, valid=[False, True])
    assert int(m5.size) == 4 and int(m5.clock) == 5


@functools.partial(jax.jit, static_argnames=("init_desirability",))
def _write_jittered(keys, won, delta, init_desirability):
    """Episodes [N, 3, k] written one after the other into an empty memory (no propagation)."""
    m = em.init(64, keys.shape[-1], 1)
    for e in range(keys.shape[0]):
        m = em.write_episode(
            m,
            keys[e],
            jnp.zeros((3, 1)),
            jnp.ones(3),
            jnp.arange(3),
            won[e],
            jnp.ones(3, bool),
            delta,
            chunk=16,
            propagate=False,
            init_desirability=init_desirability,
        )
    return m


@pytest.mark.parametrize("rule", ["exact", "neighbourhood", "init"])
def test_desirability_on_jittered_revisits(rule):
    """8 jittered copies of one 3-step trajectory, the first 4 won. Exact revisits (the
    official threshold) never happen, so p = N_xi / N_call stays 0 unless an insertion
    counts its own desirable visit (init_desirability); a neighbourhood counts them."""
    rng = np.random.default_rng(0)
    keys = jnp.asarray(
        np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0]])[None] + rng.uniform(-1e-3, 1e-3, (8, 3, 2)), jnp.float32
    )
    won = jnp.arange(8) < 4
    delta = 0.01 if rule == "neighbourhood" else 1.3e-5
    m = _write_jittered(keys, won, delta, rule == "init")
    p = np.asarray(m.n_xi[: m.size]) / (np.asarray(m.n_call[: m.size]) + em.RATIO_EPS)
    if rule == "neighbourhood":
        assert int(m.size) == 3 and int(m.write_hits) == 21 and int(m.clock) == 24
        assert np.asarray(m.n_call[:3]).tolist() == [8] * 3 and np.asarray(m.n_xi[:3]).tolist() == [3] * 3
        np.testing.assert_allclose(p, 3 / (8 + 1e-3), rtol=1e-6)
    else:
        assert int(m.size) == 24 and int(m.write_hits) == 0
        assert (p > 0).sum() == (12 if rule == "init" else 0)  # the won episodes' own entries


def test_memory_shift_counts_and_desirability_propagation():
    m = em.init(8, 2, 3)
    m = _write(m, [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], [3.0, 2.0, 1.0], False)  # a lost episode
    b = _entry(m, [1.0, 1.0])
    # a won episode passes near B with a lower return: the undesirable entry is shifted to it
    m = _write(m, [[5.0, 5.0], [1.003, 1.0]], [0.5, 0.4], True)
    b_new = _entry(m, [1.003, 1.0])
    assert b_new == b
    assert bool(m.desirable[b]) and float(m.H[b]) == pytest.approx(0.4)  # replaced, not max
    assert int(m.timestep[b]) == 1 and np.allclose(m.states[b], [1.003, 1.0, 1.0])
    assert (int(m.n_call[b]), int(m.n_xi[b])) == (2, 1)  # counts kept and incremented
    np.testing.assert_allclose(m.keys_norm[b], em.normalize(m, m.keys[b]), rtol=1e-6)
    # the won episode's new state is desirable; N_xi starts at 0 unless init_desirability
    e = _entry(m, [5.0, 5.0])
    assert bool(m.desirable[e]) and int(m.n_xi[e]) == 0 and int(m.n_call[e]) == 1
    # a desirable entry is not shifted again: a lost visit only counts and takes the max
    m2 = _write(m, [[1.0, 1.002]], [7.0], False)
    assert bool(m2.desirable[b]) and float(m2.H[b]) == 7.0 and (int(m2.n_call[b]), int(m2.n_xi[b])) == (3, 1)
    # propagation: a lost episode that reaches the desirable B becomes desirable before it
    ep = [[9.0, 9.0], [1.0, 1.0], [8.0, 8.0]]  # t = 0 P, t = 1 B, t = 2 Q
    mp = _write(m, ep, [1.0, 1.0, 1.0], False, init_desirability=True)
    assert bool(mp.desirable[_entry(mp, [9.0, 9.0])]) and int(mp.n_xi[_entry(mp, [9.0, 9.0])]) == 1
    assert not bool(mp.desirable[_entry(mp, [8.0, 8.0])])
    mn = _write(m, ep, [1.0, 1.0, 1.0], False, propagate=False)
    assert not bool(mn.desirable[_entry(mn, [9.0, 9.0])])


def test_eviction_replaces_the_least_recently_written_entry():
    m = em.init(3, 2, 3)
    # written backwards: [0, 0] first, then [1, 0], then [2, 0]
    m = _write(m, [[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]], [1.0, 1.0, 1.0], False)
    assert int(m.size) == 3
    m = _write(m, [[0.0, 0.0]], [1.0], False)  # a hit refreshes [0, 0]: now [1, 0] is the oldest
    m = _write(m, [[5.0, 5.0]], [3.0], False)  # a miss in a full memory
    assert int(m.size) == 3
    kept = {tuple(np.round(np.asarray(k), 3).tolist()) for k in m.keys}
    assert kept == {(2.0, 0.0), (0.0, 0.0), (5.0, 5.0)}
    e = _entry(m, [5.0, 5.0])
    assert float(m.H[e]) == 3.0 and int(m.n_call[e]) == 1 and int(m.timestep[e]) == 0
    # the next eviction takes the oldest remaining one, [2, 0]
    m = _write(m, [[6.0, 6.0]], [3.0], False)
    assert {tuple(np.round(np.asarray(k), 3).tolist()) for k in m.keys} == {(0.0, 0.0), (5.0, 5.0), (6.0, 6.0)}


def _random_memory(rng, capacity, size, key_dim=4, state_dim=5):
    m = em.init(capacity, key_dim, state_dim)
    keys = np.zeros((capacity, key_dim), np.float32)
    keys[:size] = rng.normal(size=(size, key_dim)) * [1.0, 3.0, 0.2, 10.0][:key_dim] + 2.0
    m = m.replace(
        keys=jnp.asarray(keys),
        states=jnp.asarray(rng.normal(size=(capacity, state_dim)), jnp.float32),
        H=jnp.asarray(rng.normal(size=capacity), jnp.float32),
        n_call=jnp.asarray(rng.integers(1, 5, capacity), jnp.int32),
        n_xi=jnp.asarray(rng.integers(0, 2, capacity), jnp.int32),
        desirable=jnp.asarray(rng.random(capacity) < 0.5),
        size=jnp.asarray(size, jnp.int32),
    )
    return em.refresh_stats(m)


@pytest.mark.parametrize("metric", em.METRICS)
def test_lookup_matches_numpy_brute_force(metric):
    rng = np.random.default_rng(0)
    m = _random_memory(rng, capacity=300, size=250).replace(metric=metric)
    keys = np.asarray(m.keys[:250], np.float64)
    mean, std = keys.mean(0), keys.std(0)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-4)
    np.testing.assert_allclose(m.std, std, rtol=1e-4)
    queries = np.concatenate(
        [rng.normal(size=(40, 4)) * [1.0, 3.0, 0.2, 10.0] + 2.0, keys[[3, 77, 249]] + 1e-7], 0
    ).astype(np.float32)
    rec = jax.jit(em.lookup, static_argnums=2)(m, jnp.asarray(queries), 64, 1e-4)  # 64 does not divide 300
    qn, kn = (queries - mean) / std, (keys - mean) / std
    diff = qn[:, None] - kn[None]
    d = np.abs(diff).max(-1) if metric == "linf" else np.sqrt((diff**2).sum(-1))
    np.testing.assert_array_equal(np.asarray(rec.index), d.argmin(1))
    np.testing.assert_allclose(np.asarray(rec.distance), d.min(1), rtol=1e-4, atol=1e-5)
    assert np.asarray(rec.hit).tolist() == [False] * 40 + [True] * 3
    idx = d.argmin(1)
    np.testing.assert_allclose(rec.H, np.asarray(m.H)[idx])
    np.testing.assert_allclose(rec.ratio, np.asarray(m.n_xi)[idx] / (np.asarray(m.n_call)[idx] + 1e-3), rtol=1e-6)
    # an empty memory recalls nothing
    empty = em.lookup(em.init(16, 4, 5), jnp.asarray(queries), 8, 1.0)
    assert not bool(empty.hit.any()) and np.isinf(np.asarray(empty.distance)).all()


@pytest.mark.parametrize("metric", em.METRICS)
def test_indexed_hit_lookup_equals_brute_force_on_every_hit(metric):
    """lookup_hits == lookup wherever lookup hits, including crowded first coordinates
    (many entries share x_0, so candidate ranges span several windows) and ties."""
    rng = np.random.default_rng(3)
    m = _random_memory(rng, capacity=400, size=300).replace(metric=metric)
    keys = np.array(m.keys)
    keys[100:160, 0] = keys[100, 0]  # 60 entries with the same first coordinate
    keys[200] = keys[201]  # an exact duplicate: the tie goes to the lower index
    m = em.refresh_stats(m.replace(keys=jnp.asarray(keys)))
    delta = 0.05
    stored = keys[[0, 5, 100, 130, 159, 201, 299]]
    queries = np.concatenate(
        [
            stored + rng.uniform(-1e-3, 1e-3, size=stored.shape) * np.asarray(m.std),  # hits
            keys[rng.integers(0, 300, 40)] + rng.normal(size=(40, 4)) * 0.05 * np.asarray(m.std),  # mixed
            rng.normal(size=(20, 4)) * 5.0,  # mostly misses
            keys[350:352],  # unfilled slots' keys are never recalled
        ]
    ).astype(np.float32)
    q = jnp.asarray(queries)
    brute = em.lookup(m, q, 64, delta)
    fast = jax.jit(lambda mem, qq: em.lookup_hits(mem, em.build_index(mem), qq, delta, window=4))(m, q)
    hit = np.asarray(brute.hit)
    assert hit[: len(stored)].all() and 0 < hit.sum() < len(queries)
    np.testing.assert_array_equal(np.asarray(fast.hit), hit)
    np.testing.assert_array_equal(np.asarray(fast.index)[hit], np.asarray(brute.index)[hit])
    np.testing.assert_allclose(np.asarray(fast.distance)[hit], np.asarray(brute.distance)[hit], rtol=1e-6, atol=1e-7)
    for f in ("H", "ratio", "desirable"):
        np.testing.assert_array_equal(np.asarray(getattr(fast, f))[hit], np.asarray(getattr(brute, f))[hit])
        assert not np.asarray(getattr(fast, f))[~hit].any()
    assert np.isinf(np.asarray(fast.distance)[~hit]).all()
    assert int(fast.index[len(stored) - 2]) == 200  # the duplicate of entry 201
    # an empty memory recalls nothing
    empty = em.init(16, 4, 5)
    rec = em.lookup_hits(empty, em.build_index(empty), q, 1.0)
    assert not bool(rec.hit.any())


@pytest.mark.parametrize("recent_size", [64, 5])  # 5: the phase overflows into brute force
def test_indexed_write_equals_brute_force_write(recent_size):
    """Episodes with repeated keys (hits, memory shifts, max-H), misses and evictions
    (capacity 24 < 48 distinct keys): the indexed writes give the same memory."""
    rng = np.random.default_rng(4)
    protos = rng.normal(size=(48, 3)).astype(np.float32)
    L = 6

    @jax.jit
    def phase(memory, index, keys, rets, xis, valid):
        brute = memory
        cache = em.WriteCache(index, jnp.zeros((recent_size,), jnp.int32), jnp.zeros((), jnp.int32))
        for e in range(keys.shape[0]):
            args = (keys[e], keys[e][:, :2], rets[e], jnp.arange(L), xis[e], valid[e], DELTA)
            brute = em.write_episode(brute, *args, chunk=5)
            memory, cache = em.write_episode_indexed(memory, cache, *args, chunk=5)
        memory = em.refresh_stats(memory)  # the statistics move between phases
        index = jax.lax.cond(
            cache.count > recent_size, lambda m, i, c: em.build_index(m), em.update_index, memory, index, cache
        )
        return em.refresh_stats(brute), memory, index, cache.count

    memory = em.init(24, 3, 2)
    index = em.build_index(memory)
    for _ in range(4):  # each phase starts from the index merged (or rebuilt) after the last
        ids = rng.integers(0, 48, size=(6, L))
        keys = protos[ids] + rng.uniform(-1e-3, 1e-3, size=(6, L, 3)).astype(np.float32) * DELTA
        rets = rng.normal(size=(6, L)).astype(np.float32)
        valid = np.arange(L)[None] < rng.integers(2, L + 1, size=(6, 1))
        brute, fast, index, count = phase(
            memory, index, jnp.asarray(keys), jnp.asarray(rets), jnp.asarray(rng.random(6) < 0.5), jnp.asarray(valid)
        )
        for f in (
            "keys",
            "keys_norm",
            "states",
            "H",
            "timestep",
            "desirable",
            "n_call",
            "n_xi",
            "last_used",
            "size",
            "clock",
        ):
            np.testing.assert_array_equal(np.asarray(getattr(fast, f)), np.asarray(getattr(brute, f)), err_msg=f)
        # the merged index is the full sort's, up to the order of equal keys
        full, n = em.build_index(fast), int(fast.size)
        np.testing.assert_array_equal(np.asarray(index.first), np.asarray(full.first))
        assert sorted(np.asarray(index.order[:n]).tolist()) == list(range(n))
        np.testing.assert_array_equal(np.asarray(fast.keys_norm[index.order[:n], 0]), np.asarray(index.first[:n]))
        memory = fast
    assert int(memory.size) == 24 and int(memory.n_call.max()) > 1  # evictions and hits happened
    assert (int(count) > recent_size) == (recent_size == 5)


def test_rekey_recomputes_every_filled_key_and_the_statistics():
    rng = np.random.default_rng(1)
    m = _random_memory(rng, capacity=50, size=37)
    w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

    def embed(states, t):
        return states @ w + t[:, None].astype(jnp.float32)

    r = jax.jit(lambda mem: em.rekey(mem, embed, chunk=16))(m)
    expect = np.asarray(embed(m.states, m.timestep))
    np.testing.assert_allclose(r.keys[:37], expect[:37], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r.keys[37:], m.keys[37:])  # empty slots untouched
    kn = np.asarray(r.keys_norm[:37])
    np.testing.assert_allclose(kn.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(kn.std(0), 1.0, rtol=1e-3)
    # search after re-keying finds each entry from its own new key
    rec = em.lookup(r, r.keys[:37], 16, 1e-5)
    np.testing.assert_array_equal(np.asarray(rec.index), np.arange(37))
