"""Swarm environments: dynamics, neighbour statistics (dense vs cell list), memory, registry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.swarms import (
    cell_grid,
    make_swarm,
    neighbour_sums_cells,
    neighbour_sums_dense,
    reference_names,
    reference_policy,
)
from marl.config import ConfigError
from marl.evaluation import evaluate


def _rollout_order(env, steps, seed=0):
    """Order statistic per step of a zero-action rollout (no auto-reset)."""
    state, _ = jax.jit(env.reset)(jax.random.PRNGKey(seed))
    action = jnp.zeros((env.num_agents, env.action_dim))

    def body(s, k):
        s, ts = env.step(k, s, action)
        return s, ts.info["order"]

    _, order = jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.PRNGKey(seed + 1), steps)))(state)
    return np.asarray(order)


def test_torus_wrap_around():
    env = make_swarm("aggregation", num_agents=2, radius=0.1, noise=0.0, max_speed=1.0, dt=0.05)
    state, _ = jax.jit(env.reset)(jax.random.PRNGKey(0))
    state = state.replace(pos=jnp.array([[0.99, 0.5], [0.03, 0.5]]))
    obs, _ = jax.jit(env.observe)(state)
    # neighbours across the x = 0 boundary, at torus distance 0.04 (relative position / r)
    np.testing.assert_allclose(obs[:, 1:3], [[0.4, 0.0], [-0.4, 0.0]], atol=1e-5)
    assert float(obs[0, 0]) == 1.0
    for neighbours in ("dense", "cells"):
        sums = (
            neighbour_sums_dense
            if neighbours == "dense"
            else lambda p, f, r: neighbour_sums_cells(p, f, r, *cell_grid(2, r))
        )(state.pos, jnp.zeros((2, 0)), 0.1)
        np.testing.assert_allclose(sums.disp, [[0.04, 0.0], [-0.04, 0.0]], atol=1e-5)
    # moving right at full speed wraps 0.99 -> 0.04 and 0.03 -> 0.08; the centre is between them
    state, ts = jax.jit(env.step)(jax.random.PRNGKey(1), state, jnp.array([[1.0, 0.0], [1.0, 0.0]]))
    np.testing.assert_allclose(state.pos[:, 0], [0.04, 0.08], atol=1e-5)
    assert float(ts.info["order"]) == pytest.approx(-0.02, abs=1e-4)  # torus-aware mean distance


def test_kuramoto_synchronizes_above_critical_coupling_only():
    # Gaussian frequencies, std 0.5: K_c = sqrt(8 / pi) * 0.5 = 0.80
    final = {}
    for k in (0.3, 2.0):
        env = make_swarm("kuramoto", num_agents=400, coupling=k, noise=0.0, omega_std=0.5, max_steps=10_000)
        order = _rollout_order(env, 200)
        assert order[0] < 0.2  # uniform initial phases
        final[k] = order[-20:].mean()
    assert final[2.0] > 0.85
    assert final[0.3] < 0.2


def test_vicsek_order_falls_as_noise_grows():
    final = []
    for noise in (0.1, 1.5, 4.0):
        env = make_swarm("vicsek", num_agents=250, radius=0.15, alignment=5.0, noise=noise, max_steps=10_000)
        final.append(_rollout_order(env, 200)[-20:].mean())
    assert final[0] > 0.9 and final[2] < 0.25
    assert final[0] > final[1] > final[2]


def test_dense_and_cell_list_neighbour_sums_agree():
    n, r = 1500, 0.07
    pos = jax.random.uniform(jax.random.PRNGKey(0), (2, n, 2))  # a batch of two swarms: vmap works
    feats = jax.random.normal(jax.random.PRNGKey(1), (2, n, 3))
    g, cap = cell_grid(n, r)
    dense = jax.jit(jax.vmap(lambda p, f: neighbour_sums_dense(p, f, r)))(pos, feats)
    cells = jax.jit(jax.vmap(lambda p, f: neighbour_sums_cells(p, f, r, g, cap)))(pos, feats)
    assert not bool(jnp.any(cells.overflow)) and float(dense.count.mean()) > 10
    np.testing.assert_array_equal(dense.count, cells.count)
    np.testing.assert_allclose(dense.disp, cells.disp, atol=1e-5)
    np.testing.assert_allclose(dense.feats, cells.feats, atol=1e-4)


def test_dense_and_cell_list_observations_agree():
    kw = dict(num_agents=600, radius=0.12, observe_position=True)
    dense, cells = make_swarm("vicsek", neighbours="dense", **kw), make_swarm("vicsek", neighbours="cells", **kw)
    assert cells.use_cells and not dense.use_cells
    ts_d, ts_c = jax.jit(lambda k: (dense.reset(k)[1], cells.reset(k)[1]))(jax.random.PRNGKey(3))
    np.testing.assert_allclose(ts_d.obs, ts_c.obs, atol=1e-5)
    np.testing.assert_allclose(ts_d.state, ts_c.state, atol=1e-6)
    assert int(ts_c.info["neighbour_overflow"]) == 0
    assert float(ts_d.obs[:, 0].mean()) > 0.5  # agents do have neighbours


def test_cell_list_overflow_is_counted_and_reweighted():
    # everyone in one small patch: 200 agents in one cell with room for 50
    pos = 0.5 + 0.02 * jax.random.uniform(jax.random.PRNGKey(0), (200, 2))
    feats = jnp.ones((200, 1))
    exact = jax.jit(neighbour_sums_dense, static_argnums=2)(pos, feats, 0.1)
    approx = jax.jit(neighbour_sums_cells, static_argnums=(2, 3, 4))(pos, feats, 0.1, 10, 50)
    assert int(approx.overflow) == 150
    np.testing.assert_allclose(exact.count, 199.0)
    # stored agents stand for the whole cell: counts stay close (within one weight, 4)
    np.testing.assert_allclose(approx.count, 199.0, atol=4.0 + 1e-3)
    np.testing.assert_allclose(approx.feats[:, 0], approx.count, rtol=1e-5)


def _largest_intermediate(jaxpr) -> int:
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _largest_intermediate(inner))
    return best


def test_cell_list_step_at_10000_agents_is_linear_in_memory():
    n = 10_000
    env = make_swarm("aggregation", num_agents=n)
    assert env.use_cells
    state, _ = jax.jit(env.reset)(jax.random.PRNGKey(0))
    action = jnp.zeros((n, 2))
    step = lambda k, s: env.step(k, s, action)  # noqa: E731
    largest = _largest_intermediate(jax.make_jaxpr(step)(jax.random.PRNGKey(1), state).jaxpr)
    cells_total = env.cells**2 * env.capacity
    assert largest <= max(n * env.capacity, cells_total * 2)  # O(N cap): a [N, cap] block, a [C, cap, 2] table
    assert largest < n * n // 40
    state, ts = jax.jit(step)(jax.random.PRNGKey(1), state)
    assert ts.obs.shape == (n, env.spec.obs_dim) and bool(jnp.all(jnp.isfinite(ts.obs)))
    assert int(ts.info["neighbour_overflow"]) == 0
    # about pi r^2 (N - 1) = 314 neighbours each: the density feature is about 1
    assert 0.9 < float(ts.obs[:, 0].mean()) < 1.1


def test_registered_specs():
    dims = {
        "kuramoto": (1, 7, 19, (3, 4), 100),
        "vicsek": (1, 8, 83, (5, 6), 100),
        "vicsek_hard": (1, 6, 83, (1, 2), 200),
        "aggregation": (2, 4, 66, (1, 2), 100),
    }
    for task, (action_dim, obs_dim, state_dim, rule_features, horizon) in dims.items():
        spec = envs.make(f"swarm:{task}", num_agents=16).spec
        assert f"swarm:{task}" in envs.registered() and spec.name == f"swarm:{task}"
        assert (spec.action_dim, spec.obs_dim, spec.state_dim) == (action_dim, obs_dim, state_dim)
        assert spec.rule_features == rule_features and spec.max_steps == horizon
        assert spec.num_agents == 16 and not spec.discrete and (spec.action_low, spec.action_high) == (-1.0, 1.0)
    # the hard variant is Vicsek without the compass; the option works on either name
    assert envs.make("swarm:vicsek", num_agents=16, observe_heading=False).spec.rule_features == (1, 2)
    assert envs.make("swarm:vicsek_hard", num_agents=16, observe_heading=True).spec.obs_dim == 8


def test_vicsek_observes_its_own_heading():
    env = make_swarm("vicsek", num_agents=30, observe_position=True)
    state, ts = jax.jit(env.reset)(jax.random.PRNGKey(0))
    obs = np.asarray(ts.obs)
    assert obs.shape == (30, 12)  # density, 4 relative, cos / sin heading, 4 position, t / T
    np.testing.assert_allclose(obs[:, 5], np.cos(state.angle), atol=1e-6)
    np.testing.assert_allclose(obs[:, 6], np.sin(state.angle), atol=1e-6)
    hard = make_swarm("vicsek_hard", num_agents=30)
    _, ts_h = jax.jit(hard.reset)(jax.random.PRNGKey(0))
    np.testing.assert_allclose(ts_h.obs[:, :5], obs[:, :5], atol=1e-6)  # same swarm, no heading


def test_reference_policies_rank_as_the_task_implies():
    """Hand-coded references at N = 100, T = 50 (16 episodes): the compass (own heading) and
    the mean-phase controller far above local alignment, which is above doing nothing."""
    out = {}
    for task, kinds in (
        ("vicsek", ("zero", "local_alignment", "compass")),
        ("kuramoto", ("zero", "local_alignment", "mean_phase")),
        ("aggregation", ("zero", "local_mean")),
    ):
        kw = dict(radius=0.25, max_speed=1.0, noise=0.05) if task == "aggregation" else {}
        env = envs.make(f"swarm:{task}", num_agents=100, max_steps=50, **kw)
        assert list(kinds) == reference_names(env)
        for k in kinds:
            algo = reference_policy(env, k)
            run = jax.jit(lambda key, a=algo: evaluate(a, {}, key, 16)["return"])
            out[task, k] = float(run(jax.random.PRNGKey(0)))
    assert out["vicsek", "compass"] > 35 > out["vicsek", "local_alignment"] > out["vicsek", "zero"] + 4, out
    assert out["kuramoto", "mean_phase"] > 35 > out["kuramoto", "local_alignment"] > out["kuramoto", "zero"] + 4, out
    assert out["aggregation", "local_mean"] > out["aggregation", "zero"] + 2, out
    with pytest.raises(ConfigError, match="kind"):  # no compass without the heading
        reference_policy(envs.make("swarm:vicsek_hard", num_agents=8), "compass")


def test_make_with_auto_reset_and_vmap():
    env = envs.make("swarm:aggregation", num_agents=16, max_steps=5)
    spec = env.spec
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    state, ts = jax.jit(jax.vmap(env.reset))(keys)
    assert ts.obs.shape == (3, 16, spec.obs_dim) and ts.state.shape == (3, spec.state_dim)

    def body(s, k):
        a = jax.random.uniform(k, (3, 16, spec.action_dim), minval=-1.0, maxval=1.0)
        s, ts = jax.vmap(env.step)(jax.random.split(k, 3), s, a)
        return s, (ts.done, ts.info["episode_done"], ts.info["episode_length"], ts.reward, ts.obs[:, 0, -1])

    _, (done, ep_done, length, reward, t_frac) = jax.jit(
        lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.PRNGKey(1), 12))
    )(state)
    np.testing.assert_array_equal(done[:, 0], [False] * 4 + [True] + [False] * 4 + [True] + [False] * 2)
    assert bool(jnp.all(ep_done == done)) and bool(jnp.all(length[done] == 5))
    assert reward.shape == (12, 3, 16) and bool(jnp.all(reward == reward[..., :1]))  # shared reward
    # observation time feature restarts after the auto-reset
    np.testing.assert_allclose(t_frac[:6, 0], [0.2, 0.4, 0.6, 0.8, 0.0, 0.2], atol=1e-6)
    # different keys give different swarms
    assert not bool(jnp.allclose(state.inner.pos[0], state.inner.pos[1]))


def test_discrete_action_option():
    env = make_swarm("aggregation", num_agents=4, action_bins=3, noise=0.0, max_speed=1.0, dt=0.1)
    assert env.spec.num_actions == 9 and env.spec.action_cost.shape == (9, 9)
    state, ts = jax.jit(env.reset)(jax.random.PRNGKey(0))
    assert ts.avail_actions.shape == (4, 9)
    new, _ = jax.jit(env.step)(jax.random.PRNGKey(1), state, jnp.array([0, 4, 8, 5]))  # (-1,-1), (0,0), (1,1), (0,1)
    moved = np.asarray(jnp.round((new.pos - state.pos + 0.5) % 1.0 - 0.5, 5))
    np.testing.assert_allclose(moved, [[-0.1, -0.1], [0, 0], [0.1, 0.1], [0, 0.1]], atol=1e-5)


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="num_agents"):
        envs.make("swarm:kuramoto", num_agents=1)
    with pytest.raises(ConfigError, match="radius"):
        envs.make("swarm:vicsek", radius=0.0)
    with pytest.raises(ConfigError, match="neighbours"):
        make_swarm("aggregation", neighbours="kdtree")
    with pytest.raises(ConfigError, match="observe_heading"):
        make_swarm("vicsek", observe_heading="yes")
    with pytest.raises(ConfigError, match="coupling"):  # a Kuramoto field given to Vicsek
        make_swarm("vicsek", coupling=1.0)
    with pytest.raises(ConfigError, match="task"):
        make_swarm("flocking")
    with pytest.raises(envs.UnknownEnvError, match="swarm:vicsek"):
        envs.make("swarm:vicsec")


def test_reference_table_and_report_lines(tmp_path):
    from experiments import report, swarm_references

    out = tmp_path / "refs"
    res = swarm_references.evaluate_references(
        swarm_references.RefArgs(
            envs=('swarm:vicsek={"num_agents": 8, "max_steps": 5}',), seeds=2, episodes=2, out=str(out)
        )
    )
    assert [r["policy"] for r in res["rows"]] == ["zero", "local_alignment", "compass"]
    assert all(len(r["per_seed"]) == 2 and np.isfinite(r["mean"]) for r in res["rows"])
    args = report.ReportArgs(dirs=(str(tmp_path),), references=str(out / "references.json"))
    lines = report.reference_lines(args)
    assert set(lines["swarm:vicsek"]) == {"reference:zero", "reference:local_alignment", "reference:compass"}
    assert "reference:compass" in report.markdown({"per_task": [], "aggregate": []}, args)
    (tmp_path / "bad.json").write_text('{"swarm:vicsek": 3}')
    with pytest.raises(ConfigError, match="references"):
        report.check_args(dataclasses.replace(args, references=str(tmp_path / "bad.json")))
