"""QARL: Gamma curriculum math, the per-episode temperature wrapper, alternating
phases under jit(vmap) over two seeds, and the robustness evaluation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import algos
import envs
from algos import qarl
from marl.config import ConfigError
from marl.runner import init_states, make_chunk_fn

RATE = 1000.0


@pytest.mark.parametrize("k1,r1,k2,r2", [(50.0, RATE, 44.0, RATE), (1.0, RATE, 50.0, RATE),
                                         (2.0, 1.0, 5.0, 3.0), (7.5, 40.0, 3.0, 10.0)])
def test_gamma_kl_matches_quadrature(k1, r1, k2, r2):
    p, q = stats.gamma(k1, scale=1 / r1), stats.gamma(k2, scale=1 / r2)
    lo, hi = p.ppf(1e-12), p.ppf(1 - 1e-12)
    numeric, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=400)
    closed = float(qarl.gamma_kl(jnp.float32(k1), r1, jnp.float32(k2), r2))
    np.testing.assert_allclose(closed, numeric, rtol=2e-3, atol=1e-5)
    x = np.float32(p.mean())
    np.testing.assert_allclose(float(qarl.gamma_log_prob(x, k1, r1)), p.logpdf(x), rtol=1e-4)


def _curriculum(returns_of, shape=50.0, n=30, threshold=10.0, seed=0):
    alpha = np.random.default_rng(seed).gamma(shape, 1 / RATE, n).astype(np.float32)
    cur = qarl.curriculum_init(shape, n, threshold, 0.5)
    return qarl.curriculum_push(cur, jnp.log(alpha), jnp.asarray(returns_of(alpha), jnp.float32),
                                jnp.full(n, shape), jnp.ones(n, bool))


def test_curriculum_update_picks_smallest_feasible_shape_or_keeps_the_old_one():
    update = jax.jit(functools.partial(qarl.self_paced_update, rate=RATE, target_shape=1.0, grid_size=64))
    cands = np.asarray(qarl.candidate_shapes(50.0, 1.0, 64))
    kl_old = np.asarray(qarl.gamma_kl(jnp.asarray(cands), RATE, 50.0, RATE))

    # good returns everywhere: only the KL trust region binds -> the smallest shape within it
    new, perf = update(_curriculum(lambda a: np.full_like(a, 100.0)))
    expected = cands[kl_old <= 0.5].min()
    assert float(new) == pytest.approx(expected) and float(new) < 50.0 and float(perf) == pytest.approx(100.0)
    assert float(qarl.gamma_kl(new, RATE, 50.0, RATE)) <= 0.5
    assert not (kl_old[cands < float(new) - 1e-4] <= 0.5).any()

    # performance below the threshold at k_old, or no pairs at all: nothing feasible, k stays
    assert float(update(_curriculum(lambda a: np.zeros_like(a)))[0]) == 50.0
    assert float(update(qarl.curriculum_init(50.0, 30, 10.0, 0.5))[0]) == 50.0

    # returns good only against weak (hot) adversaries: the importance-weighted return
    # falls as k shrinks, and the performance constraint stops the step earlier
    hot = lambda a: np.where(a > 0.05, 40.0, 0.0)
    cur = _curriculum(hot, n=30, seed=2, threshold=15.0)
    new_hot = float(update(cur)[0])
    perf = np.asarray(jax.jit(qarl.importance_weighted_return, static_argnums=2)(cur, jnp.asarray(cands), RATE))
    feasible = (kl_old <= 0.5) & (perf >= 15.0)
    assert perf[-1] >= 10.0 and new_hot == pytest.approx(cands[feasible].min())
    assert expected < new_hot < 50.0

    # point variant: plain mean return, the same trust region
    new_point, _ = qarl.self_paced_update(_curriculum(lambda a: np.full_like(a, 100.0)), RATE, 1.0, 64,
                                          importance=False)
    assert float(new_point) == pytest.approx(expected)


def test_ring_buffer_keeps_the_latest_pairs():
    cur = qarl.curriculum_init(50.0, 4, 0.0, 0.5)
    mask = jnp.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
    vals = jnp.arange(8, dtype=jnp.float32)
    cur = jax.jit(qarl.curriculum_push)(cur, vals, vals, vals, mask)
    assert int(cur.size) == 4 and int(cur.fresh) == 6 and int(cur.pos) == 2
    assert sorted(np.asarray(cur.ret).tolist()) == [3.0, 5.0, 6.0, 7.0]


def test_temperature_wrapper_draws_per_episode_and_appends_to_obs():
    base = envs.make("adv:cartpole")
    env = qarl.TemperatureObs(base, 50.0, RATE)
    assert env.spec.obs_dim == base.spec.obs_dim + 1
    n, T = 32, 150

    @jax.jit
    def run(key):
        def one(k):
            k0, k1 = jax.random.split(k)
            state, ts = env.reset(k0)
            def step(s, xs):
                i, kk = xs
                a = jax.random.uniform(kk, (2, 1), minval=-1, maxval=1)
                # from step 100 on, new episodes draw from Gamma(5) (as an algorithm sets it)
                s = s.replace(shape=jnp.where(i >= 100, 5.0, s.shape))
                s, ts = env.step(kk, s, a)
                return s, (ts.obs, ts.done, ts.info["final_obs"], ts.info["episode_log_alpha"],
                           ts.info["episode_shape"])
            return (ts.obs,) + jax.lax.scan(step, state, (jnp.arange(T), jax.random.split(k1, T)))[1]
        return jax.vmap(one)(jax.random.split(key, n))

    obs0, obs, done, final, ended, ended_shape = map(np.asarray, run(jax.random.PRNGKey(0)))
    la = np.concatenate([obs0[:, None, :, -1], obs[..., -1]], 1)  # [n, T + 1, A]
    np.testing.assert_array_equal(la[..., 0], la[..., 1])  # both agents see it
    la = la[..., 0]
    assert done.sum() > 2 * n  # random play: cart-pole episodes are short
    for i in range(n):
        ends = np.where(done[i])[0]
        changes = np.where(la[i, 1:] != la[i, :-1])[0]
        np.testing.assert_array_equal(changes, ends)  # constant within an episode, new at each start
        np.testing.assert_array_equal(ended[i, ends], la[i, ends])  # the ended episode's temperature
        np.testing.assert_array_equal(final[i, ends, :, -1], la[i, ends][:, None].repeat(2, 1))
    for i in range(n):  # an episode ending at e was drawn at the previous end (or at reset)
        ends = np.where(done[i])[0]
        drawn_at = np.concatenate([[-1], ends[:-1]])
        np.testing.assert_array_equal(ended_shape[i, ends], np.where(drawn_at >= 100, 5.0, 50.0))
    alphas = np.exp(la[:, 0])
    assert abs(alphas.mean() - 0.05) < 0.005 and alphas.std() > 0.003  # Gamma(50, 1000): mean 0.05, sd 0.007


@functools.lru_cache(maxsize=None)
def _tiny(env_name="adv:cartpole", **kw):
    cfg = dict(num_envs=4, num_steps=8, train_steps=2, batch_size=16, buffer_size=512, learning_starts=32,
               hidden=16, num_layers=1, total_steps=4 * 8 * 12, phase_unit="episodes", phase_length=3,
               update_every=4, history=8, threshold=5.0)
    cfg.update(kw)
    return algos.make("qarl", envs.make(env_name), **cfg)


def test_alternation_freezes_the_right_player_under_jit_vmap_two_seeds():
    algo = _tiny()
    chunk = make_chunk_fn(algo, 1)  # jit(vmap(scan(update))) over the seed axis
    state = init_states(algo, jax.random.split(jax.random.PRNGKey(0), 2))
    frozen_parts = lambda s: (s.params.actor, s.params.critic, s.target_critic, s.opt_actor, s.opt_critic)
    phases, episodes, shapes = [], [], []
    for _ in range(8):
        before = jax.device_get(frozen_parts(state))
        state, metrics, finite = chunk(state)
        after = jax.device_get(frozen_parts(state))
        phase = np.asarray(metrics["phase"])[:, 0].astype(int)
        assert np.asarray(finite).all() and np.asarray(metrics["learning"]).all()
        for s in range(2):
            learner, frozen = (1, 0) if phase[s] == 0 else (0, 1)
            moved = False
            for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
                np.testing.assert_array_equal(a[s, frozen], b[s, frozen])  # bit-identical
                moved |= not np.array_equal(a[s, learner], b[s, learner])
            assert moved
        phases.append(phase)
        episodes.append(np.asarray(metrics["episodes"])[:, 0])
        shapes.append(np.asarray(metrics["curriculum_shape"])[:, 0])
    phases, episodes = np.array(phases), np.array(episodes)
    # switch when the finished episodes of a phase reach phase_length (3)
    for s in range(2):
        count, phase = 0, 0
        for t in range(8):
            assert phases[t, s] == phase
            count += episodes[t, s]
            if count >= 3:
                phase, count = 1 - phase, 0
        assert 0 < phases[:, s].sum() < 8
    # the seeds differ; the curriculum moved (random play beats the low threshold 5)
    assert not np.array_equal(phases[:, 0], phases[:, 1]) or not np.allclose(
        state.params.log_alpha[0], state.params.log_alpha[1])
    assert (np.array(shapes)[-1] < 50.0).all()

    # per-episode temperatures reach both agents' observations and the replay buffer,
    # and the finished episodes' temperatures are the curriculum's pairs
    ts_la = np.asarray(state.last_ts.obs[..., -1])  # [S, E, A]
    np.testing.assert_array_equal(ts_la[..., 0], ts_la[..., 1])
    np.testing.assert_array_equal(ts_la[..., 0], np.asarray(state.env_state.log_alpha))
    buf = state.buffer
    size = int(buf.size[0])
    obs_la = np.asarray(buf.data.obs[0, :size, :, -1])
    np.testing.assert_array_equal(obs_la[:, 0], obs_la[:, 1])
    cur = state.ext.curriculum
    pairs = np.asarray(cur.log_alpha[0, : int(cur.size[0])])
    assert np.isin(pairs, obs_la[:, 0]).all() and len(np.unique(obs_la[:, 0])) > 4
    # the adversary's temperature is the observed one, not its (untuned) log_alpha
    assert not np.asarray(state.tune_alpha)[:, 1].any() and np.asarray(state.tune_alpha)[:, 0].all()


def test_phases_in_iterations_schedules_and_baselines():
    phase, count, seen = jnp.int32(0), jnp.int32(0), []
    for _ in range(5):  # phase_unit="iterations", phase_length=2: one per update
        seen.append(int(phase))
        phase, count = qarl.next_phase(phase, count, 1, 2)
    assert seen == [0, 0, 1, 1, 0]
    assert [int(p) for p in qarl.next_phase(jnp.int32(1), jnp.int32(2), 4, 5)] == [0, 0]  # episodes: 2 + 4 >= 5
    assert [int(p) for p in qarl.next_phase(jnp.int32(1), jnp.int32(2), 2, 5)] == [1, 4]
    lin = [float(qarl.linear_shape(i, 50.0, 1.0, 10.0)) for i in (0, 5, 10, 20)]
    np.testing.assert_allclose(lin, [50.0, 25.5, 1.0, 1.0])
    env = envs.make("adv:cartpole")
    small = dict(num_envs=4, num_steps=8, hidden=8, num_layers=1, buffer_size=64, learning_starts=0)
    rarl = algos.make("rarl", env, **small)  # RARL: the target temperature from the start
    assert rarl.config.curriculum == "none" and rarl.env.shape == 1.0 and not rarl.env.deterministic
    point = algos.make("qarl", env, curriculum="point", **small).env  # a point mass at the mean
    assert point.shape == 50.0 and float(point._draw(jax.random.PRNGKey(0), 50.0)) == pytest.approx(np.log(0.05))
    base = algos.make("qarl", env, adversary=False, **small)  # SAC: no adversary force
    assert float(base.env.unwrapped.params.adversary_scale) == 0.0
    with pytest.raises(ConfigError) as e:
        algos.make("qarl", env, curriculum="cosine")
    assert e.value.field == "curriculum"
    with pytest.raises(ConfigError) as e:
        algos.make("qarl", env, target_shape=60.0)
    assert e.value.field == "target_shape"
    with pytest.raises(ConfigError) as e:
        algos.make("qarl", envs.make("adv:cartpole-noadv"))
    assert e.value.field == "env"


def test_robustness_grid_parameters_reach_the_physics(tmp_path):
    algo = _tiny("adv:pendulum", threshold=-400.0)
    params = jax.jit(algo.init)(jax.random.PRNGKey(0)).params
    i, j = qarl.DEFAULT_MASSES.index(1.0), qarl.DEFAULT_FRICTIONS.index(1.0)

    @jax.jit
    def evaluate(p, key):  # one program: the 11 x 11 grid, the nominal cell, with and without adversary
        nominal = qarl.protagonist_returns(algo, p, qarl.eval_env(algo, adversary=False), key, 1)
        with_adv = qarl.protagonist_returns(algo, p, qarl.eval_env(algo, adversary=True), key, 1)
        return qarl.robustness_grid(algo, p, key), nominal, with_adv

    grid, nominal, with_adv = map(np.asarray, evaluate(params, jax.random.PRNGKey(3)))
    assert grid.shape == (11, 11) and np.isfinite(grid).all()
    assert len(np.unique(np.round(grid, 3))) > 110  # every (mass, friction) cell its own return
    # the nominal cell is the plain evaluation without adversary (same key, same start)
    np.testing.assert_allclose(grid[i, j], nominal[0], rtol=1e-4)
    assert not np.allclose(with_adv, nominal)  # the adversary's force matters
    js, png = qarl.save_grid(grid, qarl.DEFAULT_MASSES, qarl.DEFAULT_FRICTIONS, str(tmp_path / "grid"), "test")
    assert (tmp_path / "grid.png").stat().st_size > 1000 and "returns" in open(js).read()


def test_cross_params_swaps_the_adversary_of_every_seed():
    algo = _tiny("adv:pendulum", threshold=-400.0)
    init = jax.jit(jax.vmap(algo.init))
    a = init(jax.random.split(jax.random.PRNGKey(0), 3)).params
    b = init(jax.random.split(jax.random.PRNGKey(1), 3)).params
    crossed = qarl.cross_params(a, b, seed_axis=True)
    for x, y, c in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(crossed), strict=True):
        np.testing.assert_array_equal(c[:, 0], x[:, 0])  # every seed keeps its protagonist
        np.testing.assert_array_equal(c[:, 1], y[:, 1])  # and faces the other run's adversary
    one = qarl.cross_params(jax.tree.map(lambda x: x[0], a), jax.tree.map(lambda x: x[0], b))
    for x, c in zip(jax.tree.leaves(one), jax.tree.leaves(crossed), strict=True):
        np.testing.assert_array_equal(x, c[0])
