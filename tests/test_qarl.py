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
from algos import qarl, qarl_eval
from envs.temperature import TemperatureObs
from marl import distributions, plotting
from marl.config import ConfigError
from marl.runner import init_states, make_chunk_fn

RATE = 1000.0


@pytest.mark.parametrize(
    "k1,r1,k2,r2", [(50.0, RATE, 44.0, RATE), (1.0, RATE, 50.0, RATE), (2.0, 1.0, 5.0, 3.0), (7.5, 40.0, 3.0, 10.0)]
)
def test_gamma_kl_matches_quadrature(k1, r1, k2, r2):
    p, q = stats.gamma(k1, scale=1 / r1), stats.gamma(k2, scale=1 / r2)
    lo, hi = p.ppf(1e-12), p.ppf(1 - 1e-12)
    numeric, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=400)
    closed = float(distributions.gamma_kl(jnp.float32(k1), r1, jnp.float32(k2), r2))
    np.testing.assert_allclose(closed, numeric, rtol=2e-3, atol=1e-5)
    x = np.float32(p.mean())
    np.testing.assert_allclose(float(distributions.gamma_log_prob(x, k1, r1)), p.logpdf(x), rtol=1e-4)


def _curriculum(returns_of, shape=50.0, n=30, threshold=10.0, seed=0):
    alpha = np.random.default_rng(seed).gamma(shape, 1 / RATE, n).astype(np.float32)
    cur = qarl.curriculum_init(shape, n, threshold, 0.5)
    return qarl.curriculum_push(
        cur, jnp.log(alpha), jnp.asarray(returns_of(alpha), jnp.float32), jnp.full(n, shape), jnp.ones(n, bool)
    )


def _reference_step(cur, k_old, threshold, bound=0.5, n=20001):
    """float64 reference of the constrained step: the smallest k of the feasible run of a
    dense log grid that ends at k_old (KL bound and importance-weighted return >= xi)."""
    ks = np.exp(np.linspace(np.log(1.0), np.log(k_old), n))
    la, ret, drawn = (np.asarray(x, np.float64) for x in (cur.log_alpha, cur.ret, cur.drawn_shape))
    a = np.exp(la)
    logw = stats.gamma.logpdf(a[None], ks[:, None], scale=1 / RATE) - stats.gamma.logpdf(a, drawn, scale=1 / RATE)
    w = np.exp(logw - logw.max(1, keepdims=True))
    perf = (w * ret).sum(1) / w.sum(1)
    kl = np.asarray(distributions.gamma_kl(jnp.asarray(ks), RATE, k_old, RATE))
    ok = (kl <= bound) & (perf >= threshold)
    bad = np.flatnonzero(~ok)
    return ks[0] if bad.size == 0 else ks[bad[-1] + 1]


def test_curriculum_update_solves_the_constrained_step_continuously_or_keeps_the_old_shape():
    update = jax.jit(functools.partial(qarl.self_paced_update, rate=RATE, target_shape=1.0, grid_size=64))

    # good returns everywhere: only the KL trust region binds -> exactly on its boundary
    good = _curriculum(lambda a: np.full_like(a, 100.0))
    new, perf = update(good)
    assert float(new) < 50.0 and float(perf) == pytest.approx(100.0)
    assert float(distributions.gamma_kl(new, RATE, 50.0, RATE)) == pytest.approx(0.5, abs=1e-4)
    assert float(new) == pytest.approx(_reference_step(good, 50.0, 10.0), rel=1e-3)

    # performance below the threshold at k_old, or no pairs at all: nothing feasible, k stays
    assert float(update(_curriculum(lambda a: np.zeros_like(a)))[0]) == 50.0
    assert float(update(qarl.curriculum_init(50.0, 30, 10.0, 0.5))[0]) == 50.0

    # returns good only against weak (hot) adversaries: the importance-weighted return
    # falls as k shrinks; the step ends where it meets xi, inside the trust region
    hot = _curriculum(lambda a: np.where(a > 0.05, 40.0, 0.0), n=30, seed=2, threshold=15.0)
    new_hot = float(update(hot)[0])
    assert new_hot == pytest.approx(_reference_step(hot, 50.0, 15.0), rel=1e-3)
    assert float(new) < new_hot < 50.0
    perf_at = lambda k: float(qarl.importance_weighted_return(hot, jnp.asarray([k], jnp.float32), RATE)[0])
    assert perf_at(new_hot * 1.001) >= 15.0 > perf_at(new_hot * 0.99)  # the performance constraint is active

    # point variant: plain mean return, the same trust region
    new_point, _ = qarl.self_paced_update(good, RATE, 1.0, 64, importance=False)
    assert float(new_point) == pytest.approx(float(new), rel=1e-5)


def test_curriculum_reaches_the_target_when_returns_exceed_the_threshold():
    """A toy task: every episode's return (50) beats xi (10); the shape walks from 50 to
    the target 1 in KL steps of 0.5, about sqrt(k) per step, then stays there."""
    step = jax.jit(functools.partial(qarl.self_paced_update, rate=RATE, target_shape=1.0))
    rng = np.random.default_rng(0)
    cur, shapes = qarl.curriculum_init(50.0, 30, 10.0, 0.5), [50.0]
    for _ in range(20):
        k = float(cur.shape)
        alpha = rng.gamma(k, 1 / RATE, 30).astype(np.float32)
        cur = qarl.curriculum_push(cur, jnp.log(alpha), jnp.full(30, 50.0), jnp.full(30, k), jnp.ones(30, bool))
        new, _ = step(cur)
        cur = cur.replace(shape=new, fresh=0)
        shapes.append(float(new))
    shapes = np.array(shapes)
    assert shapes[-1] == 1.0 and (np.diff(shapes) <= 0).all()
    reached = int(np.argmax(shapes == 1.0))
    assert 8 <= reached <= 16  # KL-limited steps: 2 (sqrt(50) - 1) = 12 in the normal approximation
    kl = np.asarray(
        distributions.gamma_kl(jnp.asarray(shapes[1:reached]), RATE, jnp.asarray(shapes[: reached - 1]), RATE)
    )
    np.testing.assert_allclose(kl, 0.5, atol=1e-3)  # every step but the last uses the whole trust region


def test_ring_buffer_keeps_the_latest_pairs():
    cur = qarl.curriculum_init(50.0, 4, 0.0, 0.5)
    mask = jnp.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
    vals = jnp.arange(8, dtype=jnp.float32)
    cur = jax.jit(qarl.curriculum_push)(cur, vals, vals, vals, mask)
    assert int(cur.size) == 4 and int(cur.fresh) == 6 and int(cur.pos) == 2
    assert sorted(np.asarray(cur.ret).tolist()) == [3.0, 5.0, 6.0, 7.0]


def test_temperature_wrapper_draws_per_episode_and_appends_to_obs():
    base = envs.make("adv:cartpole")
    env = TemperatureObs(base, 50.0, RATE)
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
                return s, (
                    ts.obs,
                    ts.done,
                    ts.info["final_obs"],
                    ts.info["episode_log_alpha"],
                    ts.info["episode_shape"],
                    ts.info["episode_discounted_return"],
                )

            return (ts.obs,) + jax.lax.scan(step, state, (jnp.arange(T), jax.random.split(k1, T)))[1]

        return jax.vmap(one)(jax.random.split(key, n))

    obs0, obs, done, final, ended, ended_shape, disc = map(np.asarray, run(jax.random.PRNGKey(0)))
    for i in range(n):  # cart-pole pays 1 per step: an episode of L steps has discounted return (1 - g^L) / (1 - g)
        ends = np.where(done[i])[0]
        lengths = np.diff(np.concatenate([[-1], ends]))
        np.testing.assert_allclose(disc[i, ends], (1 - 0.99**lengths) / 0.01, rtol=1e-5)
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
    cfg = dict(
        num_envs=4,
        num_steps=8,
        train_steps=2,
        batch_size=16,
        buffer_size=512,
        learning_starts=32,
        hidden=16,
        num_layers=1,
        total_steps=4 * 8 * 12,
        phase_unit="episodes",
        phase_length=3,
        update_every=4,
        history=8,
        threshold=5.0,
    )
    cfg.update(kw)
    return algos.make("qarl", envs.make(env_name), **cfg)


def test_temperature_inputs_per_player():
    env = TemperatureObs(envs.make("adv:cartpole"), 50.0, RATE, inputs=(True, False))
    _, ts = env.reset(jax.random.PRNGKey(0))
    assert float(ts.obs[0, -1]) < -1.0 and float(ts.obs[1, -1]) == 0.0  # log(~0.05) for the protagonist only
    assert env.with_temperature(inputs=(False, True)).inputs == (False, True)


@pytest.mark.slow
def test_qarl_reaches_the_target_shape_and_a_best_response_trains_only_the_adversary():
    """Random play on cart-pole earns a discounted return above xi = 0.5 in every episode:
    the curriculum runs from 50 to the target 1 inside the training loop. Then a fresh
    adversary at the target temperature trains against the frozen protagonists."""
    algo = _tiny(threshold=0.5, total_steps=4 * 8 * 70, update_every=6, history=12)
    chunk = make_chunk_fn(algo, 70)
    state, metrics, finite = chunk(init_states(algo, jax.random.split(jax.random.PRNGKey(0), 2)))
    shapes = np.asarray(metrics["curriculum_shape"])  # [S, I]
    assert np.asarray(finite).all() and (shapes[:, -1] == 1.0).all() and (np.diff(shapes, axis=1) <= 0).all()
    assert (shapes[:, 0] == 50.0).all()

    br = qarl_eval.best_response_algo(envs.make("adv:cartpole"), algo.config, 4 * 8 * 6, protagonist_input=True)
    assert br.config.curriculum == "fixed" and br.env.deterministic and br.env.shape == 1.0
    out = qarl_eval.train_best_response(br, state.params, jax.random.PRNGKey(1), chunk_iterations=3)
    for before, after in zip(jax.tree.leaves(state.params), jax.tree.leaves(out.params), strict=True):
        np.testing.assert_array_equal(after[:, 0], before[:, 0])  # the protagonist is frozen
    moved = [
        not np.array_equal(a[:, 1], b[:, 1])
        for a, b in zip(jax.tree.leaves(state.params.actor), jax.tree.leaves(out.params.actor), strict=True)
    ]
    assert any(moved) and int(out.ext.phase.max()) == 0  # only the adversary's phase
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    ret = jax.vmap(lambda p, k: qarl_eval.evaluate_protagonist(br, p, k, 4))(out.params, keys)
    assert np.isfinite(np.asarray(ret)).all()


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
        state.params.log_alpha[0], state.params.log_alpha[1]
    )
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
    rarl = algos.make("rarl", env, **small)  # RARL: plain auto-tuned SAC adversary, no temperature input
    assert rarl.config.curriculum == "auto" and rarl.env.inputs == (False, False)
    assert bool(jax.jit(rarl.init)(jax.random.PRNGKey(0)).tune_alpha.all())
    fixed = algos.make("qarl", env, curriculum="fixed", **small).env  # alpha = the target mean
    assert fixed.shape == 1.0 and float(fixed._draw(jax.random.PRNGKey(0), 1.0)) == pytest.approx(np.log(1e-3))
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
    for field, bad in (("threshold_fraction", 1.5), ("temperature_inputs", (True,)), ("temperature_inputs", "yes")):
        with pytest.raises(ConfigError) as e:
            algos.make("qarl", env, **{field: bad})
        assert e.value.field == field
    # xi on the discounted return: 10% of cart-pole's 99.3 (reward 1 per step, gamma 0.99, 500 steps)
    assert qarl.threshold_of(env, algos.default_config("qarl")) == pytest.approx(0.1 * (1 - 0.99**500) / 0.01)
    half = algos.default_config("qarl", threshold_fraction=0.5)
    assert qarl.threshold_of(env, half) == pytest.approx(49.67, abs=0.01)
    assert qarl.threshold_of(env, algos.default_config("qarl", threshold=3.0)) == 3.0


def test_robustness_grid_parameters_reach_the_physics(tmp_path):
    algo = _tiny("adv:pendulum", threshold=-400.0)
    params = jax.jit(algo.init)(jax.random.PRNGKey(0)).params
    i, j = qarl_eval.DEFAULT_MASSES.index(1.0), qarl_eval.DEFAULT_FRICTIONS.index(1.0)

    @jax.jit
    def evaluate(p, key):  # one program: the 11 x 11 grid, the nominal cell, with and without adversary
        nominal = qarl_eval.protagonist_returns(algo, p, qarl_eval.eval_env(algo, adversary=False), key, 1)
        with_adv = qarl_eval.protagonist_returns(algo, p, qarl_eval.eval_env(algo, adversary=True), key, 1)
        return qarl_eval.robustness_grid(algo, p, key), nominal, with_adv

    grid, nominal, with_adv = map(np.asarray, evaluate(params, jax.random.PRNGKey(3)))
    assert grid.shape == (11, 11) and np.isfinite(grid).all()
    assert len(np.unique(np.round(grid, 3))) > 110  # every (mass, friction) cell its own return
    # the nominal cell is the plain evaluation without adversary (same key, same start)
    np.testing.assert_allclose(grid[i, j], nominal[0], rtol=1e-4)
    assert not np.allclose(with_adv, nominal)  # the adversary's force matters
    js, png = plotting.save_grid(grid, qarl_eval.stress_axes(algo), str(tmp_path / "grid"), "test")
    assert (tmp_path / "grid.png").stat().st_size > 1000 and "returns" in open(js).read()


def test_cross_params_swaps_the_adversary_of_every_seed():
    algo = _tiny("adv:pendulum", threshold=-400.0)
    init = jax.jit(jax.vmap(algo.init))
    a = init(jax.random.split(jax.random.PRNGKey(0), 3)).params
    b = init(jax.random.split(jax.random.PRNGKey(1), 3)).params
    crossed = qarl_eval.cross_params(a, b, seed_axis=True)
    for x, y, c in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(crossed), strict=True):
        np.testing.assert_array_equal(c[:, 0], x[:, 0])  # every seed keeps its protagonist
        np.testing.assert_array_equal(c[:, 1], y[:, 1])  # and faces the other run's adversary
    one = qarl_eval.cross_params(jax.tree.map(lambda x: x[0], a), jax.tree.map(lambda x: x[0], b))
    for x, c in zip(jax.tree.leaves(one), jax.tree.leaves(crossed), strict=True):
        np.testing.assert_array_equal(x, c[0])
