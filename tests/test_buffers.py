"""Episode buffer: ring insertion with wrap-around, sampling, masks, jit/vmap consistency."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from marl import buffers

CAPACITY = 5
SLOTS = 4  # T + 1
MAX_BATCH = 8  # fixed batch shape: variable batch sizes are emulated with `valid`, one compilation

add_jit = jax.jit(buffers.add)
sample_jit = jax.jit(buffers.sample, static_argnums=2)


def make_episodes(ids, filled):
    """Episodes whose every leaf is a function of the episode id, so content identifies them."""
    ids = np.asarray(ids, np.int32)
    steps = np.arange(SLOTS, dtype=np.float32)
    return {
        "obs": (ids[:, None, None] * 100.0 + steps[None, :, None] + np.zeros((1, 1, 2))).astype(np.float32),
        "actions": np.broadcast_to(ids[:, None, None] % 7, (len(ids), SLOTS, 3)).astype(np.int32),
        "reward": ids[:, None] * np.ones((1, SLOTS), np.float32),
        "id": ids,  # a per-episode field
    }, np.asarray(filled, bool)


def empty_buffer():
    example, filled = make_episodes([0], np.ones((1, SLOTS), bool))
    return buffers.init(jax.tree.map(lambda x: x[0], example), CAPACITY, filled[0])


def expected_ring(num_inserted):
    """Slot s holds the last inserted episode j (0-based) with j % C == s."""
    return {s: max(j for j in range(num_inserted) if j % CAPACITY == s) for s in range(min(num_inserted, CAPACITY))}


def episode_filled(j):
    # A deterministic, id-dependent mask so that round-trips are checkable.
    length = 1 + (j * 7) % SLOTS
    return np.arange(SLOTS) < length


batches = st.lists(st.integers(min_value=0, max_value=MAX_BATCH), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None)
@given(batch_sizes=batches, seed=st.integers(0, 2**16))
def test_ring_insertion_matches_reference(batch_sizes, seed):
    rng = np.random.default_rng(seed)
    buf = empty_buffer()
    next_id = 0
    for size in batch_sizes:
        # The valid rows are scattered at random positions of the fixed-size batch.
        valid = np.zeros(MAX_BATCH, bool)
        valid[rng.choice(MAX_BATCH, size, replace=False)] = True
        ids = np.full(MAX_BATCH, -1, np.int32)
        ids[valid] = np.arange(next_id, next_id + size)
        next_id += size
        filled = np.stack([episode_filled(j) if j >= 0 else np.ones(SLOTS, bool) for j in ids])
        episodes, filled = make_episodes(ids, filled)
        buf = add_jit(buf, episodes, filled, valid)

    assert int(buf.size) == min(next_id, CAPACITY)
    assert int(buf.insert_pos) == next_id % CAPACITY
    ring = expected_ring(next_id)
    for slot in range(CAPACITY):
        if slot in ring:
            j = ring[slot]
            want, _ = make_episodes([j], episode_filled(j)[None])
            for name in want:
                np.testing.assert_array_equal(np.asarray(buf.data[name][slot]), want[name][0])
            np.testing.assert_array_equal(np.asarray(buf.filled[slot]), episode_filled(j))
        else:  # never written
            assert not np.asarray(buf.filled[slot]).any()
            assert all(not np.asarray(leaf[slot]).any() for leaf in jax.tree.leaves(buf.data))

    # Sampling returns stored episodes only, with their own masks.
    episodes, filled = sample_jit(buf, jax.random.PRNGKey(seed), 16)
    assert episodes["obs"].shape == (16, SLOTS, 2) and episodes["actions"].shape == (16, SLOTS, 3)
    assert episodes["id"].shape == (16,) and filled.shape == (16, SLOTS) and filled.dtype == bool
    if not ring:  # empty buffer: row 0, all zeros
        assert not np.asarray(filled).any() and not np.asarray(episodes["obs"]).any()
    for row, j in enumerate(np.asarray(episodes["id"]) if ring else []):
        assert int(j) in set(ring.values())
        np.testing.assert_array_equal(np.asarray(episodes["obs"][row, :, 0]), j * 100.0 + np.arange(SLOTS))
        np.testing.assert_array_equal(np.asarray(filled[row]), episode_filled(j))
    assert bool(buffers.can_sample(buf, 3)) == (min(next_id, CAPACITY) >= 3)


def test_plain_batches_without_valid_mask():
    """Batches smaller than, equal to and larger than the capacity, no `valid` mask."""
    buf, next_id = empty_buffer(), 0
    for size in (3, 7, 5):
        ids = np.arange(next_id, next_id + size)
        episodes, filled = make_episodes(ids, np.stack([episode_filled(j) for j in ids]))
        buf = add_jit(buf, episodes, filled)
        next_id += size
        ring = expected_ring(next_id)
        assert int(buf.size) == min(next_id, CAPACITY)
        got = {slot: int(buf.data["id"][slot]) for slot in ring}
        assert got == ring


def test_sample_from_empty_buffer_returns_row_zero():
    buf = empty_buffer()
    assert not bool(buffers.can_sample(buf, 1))
    episodes, filled = sample_jit(buf, jax.random.PRNGKey(0), 16)
    assert not np.asarray(filled).any()
    assert not np.asarray(episodes["obs"]).any()


def test_sampling_is_uniform_over_stored_episodes():
    buf = empty_buffer()
    ids = np.arange(3)
    episodes, filled = make_episodes(ids, np.ones((3, SLOTS), bool))
    buf = buffers.add(buf, episodes, filled)
    idx = jax.jit(buffers.sample_indices, static_argnums=2)(buf, jax.random.PRNGKey(1), 3000)
    counts = np.bincount(np.asarray(idx), minlength=CAPACITY)
    assert counts[3:].sum() == 0
    assert np.all(np.abs(counts[:3] / 3000 - 1 / 3) < 0.05)


def test_jit_and_vmap_over_seeds_match_per_seed_calls():
    example, filled0 = make_episodes([0], np.ones((1, SLOTS), bool))
    example = jax.tree.map(lambda x: x[0], example)
    seeds = 2
    vinit = jax.vmap(lambda _: buffers.init(example, CAPACITY, filled0[0]))
    bufs = vinit(jnp.arange(seeds))
    per_seed = [empty_buffer() for _ in range(seeds)]
    vadd = jax.jit(jax.vmap(buffers.add))
    for step, size in enumerate((4, 6)):
        batch = [
            make_episodes(
                np.arange(size) + 1000 * s + 10 * step,
                np.stack([episode_filled(j + s + step) for j in range(size)]),
            )
            for s in range(seeds)
        ]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *batch)
        bufs = vadd(bufs, *stacked)
        per_seed = [add_jit(b, *batch[s]) for s, b in enumerate(per_seed)]
    keys = jax.random.split(jax.random.PRNGKey(3), seeds)
    vsampled = jax.jit(jax.vmap(buffers.sample, in_axes=(0, 0, None)), static_argnums=2)(bufs, keys, 6)
    for s in range(seeds):
        single = jax.tree.map(lambda x, s=s: x[s], bufs)
        chex_equal(single, per_seed[s])
        chex_equal(jax.tree.map(lambda x, s=s: x[s], vsampled), sample_jit(per_seed[s], keys[s], 6))
        chex_equal(sample_jit(per_seed[s], keys[s], 6), buffers.sample(per_seed[s], keys[s], 6))


def chex_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_mask_after_done_hand_made_cases():
    dones = np.array(
        [
            [0, 0, 0, 0],  # never ends: every slot, including the bootstrap slot, is valid
            [0, 1, 0, 0],  # ends on transition 1: steps 0 and 1 valid
            [1, 0, 0, 0],  # ends on the first transition
            [0, 0, 0, 1],  # ends on the last transition: the bootstrap slot is not valid
            [0, 1, 1, 0],  # a spurious later done (auto-reset) changes nothing
        ],
        bool,
    )
    want = np.array(
        [
            [1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 0],
        ],
        bool,
    )
    got = jax.jit(buffers.mask_after_done)(dones)
    assert got.shape == (5, 5) and got.dtype == bool
    np.testing.assert_array_equal(np.asarray(got), want)


def test_accumulator_writes_per_env_episodes_and_hands_them_to_the_buffer():
    num_envs = 3
    acc = buffers.accumulator_init({"obs": jnp.zeros(2), "r": jnp.zeros(())}, num_envs, SLOTS)
    buf = buffers.init({"obs": jnp.zeros((SLOTS, 2)), "r": jnp.zeros(SLOTS)}, CAPACITY, SLOTS)
    write = jax.jit(buffers.write)
    # env 0 ends after 2 steps, env 1 after 3, env 2 keeps going.
    ends = {1: np.array([True, False, False]), 2: np.array([False, True, False])}
    for step in range(3):
        value = jnp.arange(num_envs, dtype=jnp.float32) * 10 + step
        acc = write(acc, {"obs": jnp.stack([value, value], -1), "r": value})
        if step in ends:
            buf = buffers.add(buf, acc.data, acc.filled, valid=jnp.asarray(ends[step]))
            acc = buffers.reset_envs(acc, jnp.asarray(ends[step]))
    assert int(buf.size) == 2
    np.testing.assert_array_equal(np.asarray(buf.filled[0]), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(buf.data["r"][0]), [0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(buf.filled[1]), [1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(buf.data["r"][1]), [10, 11, 12, 0])
    # env 0 restarted at step 2; env 2 still holds its first three steps.
    np.testing.assert_array_equal(np.asarray(acc.t), [1, 0, 3])
    np.testing.assert_array_equal(np.asarray(acc.data["r"][0]), [2, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(acc.data["r"][2]), [20, 21, 22, 0])
    # explicit time indices
    acc = buffers.write(acc, {"obs": jnp.ones((num_envs, 2)), "r": jnp.full(num_envs, 7.0)}, jnp.array([3, 3, 3]))
    np.testing.assert_array_equal(np.asarray(acc.filled[:, 3]), [1, 1, 1])
