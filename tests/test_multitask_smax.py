"""Multi-task SMAX: task draws follow the weights, padded units are absent, registry names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.multitask_smax import COLOSSUS_SUBSTITUTE, TASK_SETS, TaskSet, task_weights

NOOP = 4  # SMAX's stop action, the only one a dead unit has

# team sizes 2, 4 and 3: padded to 4 per team
CUSTOM = [
    {"units": {"marine": 2}, "weight": 0.6},
    {"units": {"stalker": 2, "zealot": 2}, "weight": 0.3},
    {"units": {"marauder": 1, "zergling": 2}, "weight": 0.1},
]


@pytest.fixture(scope="module")
def custom_env():
    return envs.make("smax-mt:custom", tasks=CUSTOM, reflect_prob=0.5, max_steps=30)


@pytest.fixture(scope="module")
def resets(custom_env):
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    return jax.jit(jax.vmap(custom_env.reset))(keys)


def test_named_sets_are_registered_with_the_substitute_unit():
    for name in ("surComb3", "surComb4", "surComb3-reflect", "surComb4-reflect", "custom"):
        assert f"smax-mt:{name}" in envs.registered()
    assert TASK_SETS["surComb3-reflect"].reflect_prob == 0.5 and TASK_SETS["surComb3"].reflect_prob == 0.0
    assert len(TASK_SETS["surComb4"].tasks) == 4
    assert all(COLOSSUS_SUBSTITUTE in t["units"] for t in TASK_SETS["surComb3"].tasks[1:])
    env = envs.make("smax-mt:surComb4")
    assert env.spec.num_agents == 5 and env.spec.max_steps == 200 and env.spec.max_return == 2.0
    np.testing.assert_allclose(task_weights(env), [0.25] * 4)


def test_tasks_are_drawn_with_the_configured_weights(resets):
    _, ts = resets
    tid = np.asarray(ts.info["task_id"])
    freq = np.bincount(tid, minlength=3) / len(tid)
    p = np.array([0.6, 0.3, 0.1])
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / len(tid))), freq


def test_padded_units_are_absent(custom_env, resets):
    state, ts = resets
    inner = state.inner.inner.state  # EpisodeStats -> AutoReset -> adapter -> heuristic wrapper
    tid = np.asarray(ts.info["task_id"])
    sizes = np.array([2, 4, 3])[tid]
    N = custom_env.spec.num_agents
    assert N == 4
    present = np.arange(N)[None] < sizes[:, None]  # [E, N]
    alive = np.asarray(inner.unit_alive)
    np.testing.assert_array_equal(alive[:, :N], present)
    np.testing.assert_array_equal(alive[:, N:], present)  # the enemy mirrors
    np.testing.assert_array_equal(np.asarray(inner.unit_types[:, :N]), np.asarray(inner.unit_types[:, N:]))
    assert (np.asarray(inner.unit_health)[:, :N][~present] == 0).all()
    obs, avail = np.asarray(ts.obs), np.asarray(ts.avail_actions)
    assert (obs[~present] == 0).all() and (np.abs(obs[present]).sum(-1) > 0).all()
    noop_only = np.zeros(avail.shape[-1], bool)
    noop_only[NOOP] = True
    assert (avail[~present] == noop_only).all()
    # attacks on padded enemies are never available
    enemy_slots = avail[..., 5:]
    assert not enemy_slots[np.broadcast_to(~present[:, None, :], enemy_slots.shape)].any()


@pytest.mark.slow
def test_heuristic_enemy_plays_with_padded_units(custom_env):
    """A few steps against the heuristic enemy: padded units stay dead, absent and silent."""
    E = 64
    state, ts = jax.vmap(custom_env.reset)(jax.random.split(jax.random.PRNGKey(1), E))
    present = np.asarray(state.inner.inner.state.present)

    def step(carry, key):
        state, ts = carry
        k_a, k_s = jax.random.split(key)
        logits = jnp.where(ts.avail_actions, 0.0, -1e9)
        a = jax.random.categorical(k_a, logits)
        state, ts = jax.vmap(custom_env.step)(jax.random.split(k_s, E), state, a)
        return (state, ts), (
            ts.obs,
            ts.avail_actions,
            ts.reward,
            state.inner.inner.state.unit_alive,
            ts.done,
            ts.info["task_id"],
        )

    _, (obs, avail, rew, alive, done, tid) = jax.jit(
        lambda s, t: jax.lax.scan(step, (s, t), jax.random.split(jax.random.PRNGKey(2), 25))
    )(state, ts)
    obs, avail, alive, done = map(np.asarray, (obs, avail, alive, done))
    assert np.isfinite(np.asarray(rew)).all() and float(np.asarray(rew).max()) <= 2.0
    # until each env's first episode ends, its padded units stay absent
    first_done = np.where(done.any(0), done.argmax(0), done.shape[0])
    for e in range(E):
        pad = ~present[e]
        for t in range(first_done[e]):
            assert not alive[t, e][pad].any()
            assert (obs[t, e][pad[:4]] == 0).all()
            assert (avail[t, e][pad[:4]].sum(-1) == 1).all() and avail[t, e][pad[:4], NOOP].all()


def test_custom_task_sets_are_validated():
    with pytest.raises(ValueError, match="unit type"):
        envs.make("smax-mt:custom", tasks=[{"units": {"colossus": 2}}])
    with pytest.raises(ValueError, match="tasks"):
        envs.make("smax-mt:custom")
    with pytest.raises(ValueError, match="reflect_prob"):
        TaskSet(({"units": {"marine": 1}},), reflect_prob=2.0)
    with pytest.raises(ValueError, match="weight"):
        TaskSet(({"units": {"marine": 1}, "weight": 0},))


def test_slots_are_sorted_by_unit_type_then_position(custom_env, resets):
    """Default slot order (SMACv2's): a task keeps one slot pattern; ties in type are
    ordered by x; ``shuffle_units=True`` permutes the types instead."""
    state, ts = resets
    inner = state.inner.inner.state
    N = custom_env.spec.num_agents
    tid = np.asarray(ts.info["task_id"])
    types = np.asarray(inner.unit_types).astype(int)
    pos = np.asarray(inner.unit_positions)
    present = np.asarray(inner.present)
    for task in range(3):
        rows = types[tid == task, :N]
        assert (rows == rows[0]).all()  # one pattern per task
        n = present[tid == task][0, :N].sum()
        assert (np.diff(rows[0, :n]) >= 0).all()  # ascending type index
    for team in (slice(0, N), slice(N, 2 * N)):
        same = (types[:, team][:, 1:] == types[:, team][:, :-1]) & present[:, team][:, 1:]
        assert same.any() and (np.diff(pos[:, team, 0], axis=1)[same] >= 0).all()
    shuffled = envs.make("smax-mt:custom", tasks=CUSTOM, shuffle_units=True, max_steps=30)
    st, ts2 = jax.jit(jax.vmap(shuffled.reset))(jax.random.split(jax.random.PRNGKey(0), 400))
    t2 = np.asarray(st.inner.inner.state.unit_types)[:, :N]
    rows = t2[np.asarray(ts2.info["task_id"]) == 1]  # 2 stalkers + 2 zealots
    assert len({tuple(r) for r in rows}) > 1
