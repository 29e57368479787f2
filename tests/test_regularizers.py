"""Behavioural tests of the shared regularizer (marl/regularizers.py) and action costs."""

from __future__ import annotations

import functools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from marl import action_costs as ac
from marl import regularizers as reg
from marl.config import ConfigError

jax.config.update("jax_enable_x64", False)


def _random_cost(rng: np.random.Generator, n: int) -> np.ndarray:
    """Euclidean distances between random 2-D points, scaled to max 1 (a metric)."""
    pts = rng.normal(size=(n, 2))
    cost = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    return (cost / cost.max()).astype(np.float32)


def _random_simplex(rng: np.random.Generator, shape, temperature=1.0) -> np.ndarray:
    return np.asarray(jax.nn.softmax(rng.normal(size=shape) * temperature), np.float32)


# Jitted entry points, shared by the tests so that each shape compiles once
# (eager calls re-trace the solver loops on every call).
_fast = jax.jit(reg.sinkhorn_fast, static_argnames=("iterations", "chunk"))
_ott = jax.jit(reg.sinkhorn_ott, static_argnames=("iterations",))
_wass = jax.jit(reg.wasserstein, static_argnames=("iterations", "backend", "debias"))


@functools.partial(jax.jit, static_argnames=("iterations",))
def _ott_batch(a, b, cost, eps, iterations):
    return jax.vmap(lambda x, y: reg.sinkhorn_ott(x, y, cost, eps, iterations))(a, b)


# ----------------------------------------------------------------- Sinkhorn solvers


@pytest.mark.parametrize(
    "n, m, eps, iterations, masked",
    [(5, 5, 0.05, 10, False), (7, 7, 0.01, 10, True), (6, 4, 0.5, 25, False), (11, 11, 0.05, 30, True)],
)
def test_fast_sinkhorn_agrees_with_ott(n, m, eps, iterations, masked):
    rng = np.random.default_rng(n * 100 + m)
    batch = 300  # > the fast solver's chunk for n = 11, so chunking and padding are exercised
    a = _random_simplex(rng, (batch, n), 2.0)
    b = _random_simplex(rng, (batch, m), 2.0)
    if masked:
        keep = rng.uniform(size=(batch, n)) > 0.3
        keep[:, 0] = True
        a = np.where(keep, a, 0.0)
        a = a / a.sum(-1, keepdims=True)
        b = np.where(keep, b, 0.0)
        b = b / b.sum(-1, keepdims=True)
    pts_a, pts_b = rng.normal(size=(n, 2)), rng.normal(size=(m, 2))
    cost = np.linalg.norm(pts_a[:, None] - pts_b[None], axis=-1).astype(np.float32)
    cost = cost / cost.max()

    fast = _fast(a, b, cost, jnp.asarray(eps), iterations=iterations)
    ref = _ott_batch(a, b, cost, jnp.asarray(eps), iterations=iterations)
    for name in ("distance", "f", "g", "marginal_error"):
        got, want = getattr(fast, name), getattr(ref, name)
        assert got.shape == want.shape, name
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
    if masked:
        assert np.all(np.where(a == 0, fast.f, 0.0) == 0.0)


def test_fast_sinkhorn_per_state_epsilon_and_cost():
    """Batched eps and batched costs give the per-state answers."""
    rng = np.random.default_rng(3)
    n = 5
    a, b = _random_simplex(rng, (4, n)), _random_simplex(rng, (4, n))
    costs = np.stack([_random_cost(rng, n) for _ in range(4)])
    eps = np.array([0.02, 0.05, 0.1, 0.5], np.float32)
    batched = _fast(a, b, costs, eps, iterations=20)
    for i in range(4):
        single = _ott(a[i], b[i], costs[i], eps[i], iterations=20)
        np.testing.assert_allclose(batched.distance[i], single.distance, atol=1e-5)
        np.testing.assert_allclose(batched.f[i], single.f, atol=1e-5)
    # Chunked with padding (4 states in chunks of 3), and under vmap over a swept eps.
    chunked = _fast(a, b, costs, eps, iterations=20, chunk=3)
    for x, y in zip(chunked, batched, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    sweep = jnp.array([0.05, 0.2], jnp.float32)
    swept = jax.vmap(lambda e: reg.sinkhorn_fast(a, b, costs[0], e, 20, chunk=3))(sweep)
    for j in range(2):
        single = _fast(a, b, costs[0], sweep[j], iterations=20)
        np.testing.assert_allclose(swept.f[j], single.f, atol=1e-6)
        np.testing.assert_allclose(swept.distance[j], single.distance, atol=1e-6)


def _exact_ot(a, b, cost):
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    res = scipy.optimize.linprog(
        cost.reshape(-1).astype(np.float64),
        A_eq=np.concatenate([rows, cols]),
        b_eq=np.concatenate([a, b]).astype(np.float64),
        bounds=(0, None),
        method="highs",
    )
    assert res.success
    return res.fun


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropic_distance_approaches_exact_ot(seed):
    """OT - 2 eps log n <= W_eps <= OT, so W_eps -> OT as eps -> 0."""
    rng = np.random.default_rng(seed)
    n = 5
    cost = _random_cost(rng, n)
    a, b = _random_simplex(rng, (n,), 1.5), _random_simplex(rng, (n,), 1.5)
    exact = _exact_ot(a, b, cost)
    for eps in (0.05, 0.01, 0.003):
        res = _fast(a, b, cost, jnp.float32(eps), iterations=10000)
        w = float(res.distance)
        assert float(res.marginal_error) < 1e-3
        assert w <= exact + 1e-4
        assert w >= exact - 2 * eps * np.log(n) - 1e-4
    assert abs(w - exact) < 0.02


# --------------------------------------------------- Danskin: gradients are potentials


def _simplex_direction(rng, n):
    v = rng.normal(size=n)
    return (v - v.mean()).astype(np.float32)


def test_gradient_of_entropic_cost_is_f():
    """d/dt W(a + t v, b) = <v, f> for directions with sum(v) = 0 (ott, converged)."""
    rng = np.random.default_rng(0)
    n, eps, iters, t = 4, 0.2, 500, 3e-3
    cost = _random_cost(rng, n)
    a, b = _random_simplex(rng, (n,)), _random_simplex(rng, (n,))
    res = _ott(a, b, cost, eps, iterations=iters)
    for _ in range(3):
        v = _simplex_direction(rng, n) * 0.1
        w_plus = _ott(a + t * v, b, cost, eps, iterations=iters).distance
        w_minus = _ott(a - t * v, b, cost, eps, iterations=iters).distance
        fd = (w_plus - w_minus) / (2 * t)
        np.testing.assert_allclose(fd, np.dot(v, res.f), atol=2e-3, rtol=2e-2)


def test_surrogate_loss_gradient_matches_distance_gradient():
    """grad_logits <softmax(logits), sg(f)> equals grad_logits W(softmax(logits), b)."""
    rng = np.random.default_rng(1)
    n, eps, iters, t = 5, 0.2, 500, 3e-3
    cost = _random_cost(rng, n)
    logits = rng.normal(size=n).astype(np.float32)
    ref = rng.normal(size=n).astype(np.float32)
    out = _wass(logits, ref, cost, eps, iterations=iters, backend="ott", debias=False)
    grad = jax.grad(reg.surrogate_loss)(jnp.asarray(logits), out.f)
    # All 2n perturbed problems in one batched call.
    shifts = np.concatenate([np.eye(n), -np.eye(n)]).astype(np.float32) * t
    dist = _wass(logits + shifts, ref, cost, eps, iterations=iters, backend="ott", debias=False).distance
    for i in range(n):
        fd = (dist[i] - dist[n + i]) / (2 * t)
        np.testing.assert_allclose(grad[i], fd, atol=2e-3)


def test_centred_penalty_is_the_gradient_of_the_sinkhorn_divergence():
    rng = np.random.default_rng(2)
    n, eps, iters, t = 4, 0.2, 500, 3e-3
    cost = _random_cost(rng, n)
    a, b = _random_simplex(rng, (n,)), _random_simplex(rng, (n,))
    div = lambda p: _wass(jnp.log(p), jnp.log(b), cost, eps, iterations=iters, backend="ott").divergence
    out = _wass(jnp.log(a), jnp.log(b), cost, eps, iterations=iters, backend="ott")
    for _ in range(3):
        v = _simplex_direction(rng, n) * 0.1
        fd = (div(a + t * v) - div(a - t * v)) / (2 * t)
        np.testing.assert_allclose(fd, np.dot(v, out.centred_penalty), atol=2e-3, rtol=2e-2)
    # The centred penalty's expectation under the policy is the divergence.
    np.testing.assert_allclose(np.dot(a, out.centred_penalty), out.divergence, atol=1e-6)


# ------------------------------------------------------------ centring and debiasing


@pytest.mark.parametrize("backend", ["fast", "ott", "ott_kernel"])
def test_centred_penalty_is_zero_at_equality(backend):
    rng = np.random.default_rng(4)
    n = 8
    logits = rng.normal(size=(16, n)).astype(np.float32) * 2
    mask = rng.uniform(size=(16, n)) > 0.3
    mask[:, 2] = True
    cost = ac.smax_cost(3)
    out = _wass(logits, logits, cost, 0.05, iterations=10, mask=mask, backend=backend)
    np.testing.assert_allclose(out.centred_penalty, 0.0, atol=1e-6)
    np.testing.assert_allclose(out.divergence, 0.0, atol=1e-6)
    # Why the debiasing is needed: the raw potential and the plain centring
    # f - <p, f> + W are not zero at p == ref.
    p = np.asarray(reg.probs(logits, mask))
    plain = out.f - np.sum(p * out.f, -1, keepdims=True) + out.distance[..., None]
    assert np.max(np.abs(np.where(mask, plain, 0.0))) > 1e-2
    assert np.max(np.abs(out.distance)) > 1e-2


@pytest.mark.parametrize("cost_name", ["uniform", "mpe"])
def test_sinkhorn_divergence_nonnegative_and_symmetric(cost_name):
    """For positive-definite kernels exp(-C/eps) (uniform, Euclidean) and a converged solver."""
    rng = np.random.default_rng(5)
    cost = ac.uniform_cost(5) if cost_name == "uniform" else ac.mpe_cost()
    p = rng.normal(size=(64, 5)).astype(np.float32) * 2
    q = rng.normal(size=(64, 5)).astype(np.float32) * 2
    both = _wass(np.stack([p, q]), np.stack([q, p]), cost, 0.2, iterations=300)
    assert float(both.marginal_error) < 1e-4
    pq, qp = both.divergence
    assert np.all(pq >= -1e-5)
    np.testing.assert_allclose(pq, qp, atol=1e-5)
    # Different distributions are strictly apart.
    assert np.all(pq > 0)


# ------------------------------------------------------------------- KL and entropy


def test_kl_and_entropy_match_distrax():
    rng = np.random.default_rng(6)
    lp = rng.normal(size=(3, 4, 7)).astype(np.float32) * 2
    lq = rng.normal(size=(3, 4, 7)).astype(np.float32) * 2
    mask = rng.uniform(size=(3, 4, 7)) > 0.3
    mask[..., 0] = True
    dp, dq = distrax.Categorical(logits=lp), distrax.Categorical(logits=lq)
    np.testing.assert_allclose(reg.kl(lp, lq), dp.kl_divergence(dq), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reg.entropy(lp), dp.entropy(), rtol=1e-5, atol=1e-6)
    # Masked: distrax with -inf logits on unavailable actions.
    mp = distrax.Categorical(logits=jnp.where(mask, lp, -jnp.inf))
    mq = distrax.Categorical(logits=jnp.where(mask, lq, -jnp.inf))
    np.testing.assert_allclose(reg.kl(lp, lq, mask), mp.kl_divergence(mq), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reg.entropy(lp, mask), mp.entropy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- masking


def _masked_case(n=6):
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(5, n)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(5, n)), jnp.float32)
    mask = np.ones((5, n), bool)
    mask[0, 1:] = False  # a single available action
    mask[1, [0, 3]] = False
    mask[2] = False  # nothing available (e.g. a padded agent slot)
    return logits, ref, jnp.asarray(mask)


@pytest.mark.parametrize("backend", ["fast", "ott"])
def test_masked_actions_give_finite_wasserstein_penalties_and_gradients(backend):
    logits, ref, mask = _masked_case()
    cost = ac.uniform_cost(logits.shape[-1])

    @functools.partial(jax.jit, static_argnames="centred")
    def run(lg, centred):
        def loss(x):
            kwargs = dict(mask=mask, cost=cost, epsilon=0.01, centred=centred, backend=backend)
            return jnp.sum(reg.regularize("wasserstein", x, ref, 0.5, **kwargs).loss)

        out = reg.wasserstein(lg, ref, cost, 0.01, 10, mask=mask, backend=backend, debias=centred)
        actions = jnp.zeros(5, jnp.int32)
        pen = reg.wasserstein_penalty(actions, lg, ref, cost, 0.01, 10, mask, centred, backend)
        return out, pen, jax.grad(loss)(lg)

    for centred in (True, False):
        out, pen, grad = run(logits, centred)
        for name, x in out._asdict().items():
            assert np.all(np.isfinite(x)), name
        for x in (out.f, out.penalty, out.centred_penalty):
            assert np.all(np.where(mask, 0.0, x) == 0.0)
        assert pen.shape == (5,) and np.all(np.isfinite(pen))
        assert np.all(np.isfinite(grad)) and np.all(np.where(mask, 0.0, grad) == 0.0)
    # -inf logits (instead of a mask) do not produce NaN gradients of the surrogate.
    inf_logits = jnp.where(mask, logits, -jnp.inf)
    sur = jax.grad(lambda lg: jnp.sum(reg.surrogate_loss(lg, out.f)))(inf_logits)
    assert np.all(np.isfinite(sur))


def test_masked_actions_give_finite_kl_and_entropy_gradients():
    logits, ref, mask = _masked_case()
    for kind in ("none", "kl", "entropy"):
        grad = jax.grad(lambda lg, k=kind: jnp.sum(reg.regularize(k, lg, ref, 0.5, mask=mask).loss))(logits)
        assert np.all(np.isfinite(grad)), kind
        assert np.all(np.where(mask, 0.0, grad) == 0.0), kind
        pen = reg.regularize(kind, logits, ref, 0.5, mask=mask).penalty
        assert np.all(np.isfinite(pen)) and np.all(np.where(mask, 0.0, pen) == 0.0), kind
    inf_logits = jnp.where(mask, logits, -jnp.inf)
    grad = jax.grad(lambda lg: jnp.sum(reg.kl(lg, ref) + reg.entropy(lg)))(inf_logits)
    assert np.all(np.isfinite(grad))


# ---------------------------------------------------------- shapes, jit and vmap


def test_shapes_under_jit_and_vmap():
    rng = np.random.default_rng(8)
    b, agents, n = 3, 2, 11
    logits = jnp.asarray(rng.normal(size=(b, agents, n)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(b, agents, n)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(b, agents, n)) > 0.2).at[..., 4].set(True)
    actions = jnp.full((b, agents), 4)
    cost = jnp.asarray(ac.smax_cost(6))

    @jax.jit
    def run(coef, eps):
        out = reg.wasserstein(logits, ref, cost, eps, 10, mask=mask)
        r = reg.regularize("wasserstein", logits, ref, coef, mask=mask, cost=cost, epsilon=eps)
        pen = reg.wasserstein_penalty(actions, logits, ref, cost, eps, 10, mask)
        return out, r, pen

    out, r, pen = run(jnp.asarray(0.1), jnp.asarray(0.05))
    for name in ("distance", "divergence"):
        assert getattr(out, name).shape == (b, agents)
    for name in ("f", "g", "penalty", "centred_penalty"):
        assert getattr(out, name).shape == (b, agents, n)
    assert out.marginal_error.shape == ()
    assert r.loss.shape == r.value.shape == pen.shape == (b, agents)
    assert r.penalty.shape == (b, agents, n)
    np.testing.assert_allclose(pen, out.centred_penalty[..., 4], atol=1e-6)

    # A sweep over (coef, eps) on a vmapped axis equals the individual runs.
    coefs, epss = jnp.array([0.0, 0.1, 1.0]), jnp.array([0.01, 0.05, 0.2])
    swept = jax.vmap(run)(coefs, epss)
    for i in range(3):
        single = run(coefs[i], epss[i])
        for x, y in zip(jax.tree.leaves(swept), jax.tree.leaves(single), strict=True):
            assert x.shape[1:] == y.shape
            np.testing.assert_allclose(x[i], y, atol=1e-5)

    # vmap of the ott backend over the batch axis matches its own batching.
    per_state = lambda lg, rf, mk: reg.wasserstein(lg, rf, cost, 0.05, 10, mask=mk, backend="ott")
    ott = jax.jit(jax.vmap(per_state))(logits, ref, mask)
    np.testing.assert_allclose(ott.centred_penalty, out.centred_penalty, atol=1e-4)


def test_regularize_kinds():
    rng = np.random.default_rng(9)
    n = 5
    logits = jnp.asarray(rng.normal(size=(4, n)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(4, n)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(4, n)) > 0.3).at[:, 0].set(True)
    coef = 0.3
    p = reg.probs(logits, mask)

    none = reg.regularize("none", logits, ref, coef, mask=mask)
    assert np.all(none.loss == 0) and np.all(none.penalty == 0)

    kl = reg.regularize("kl", logits, ref, coef, mask=mask)
    np.testing.assert_allclose(kl.value, reg.kl(logits, ref, mask), atol=1e-6)
    np.testing.assert_allclose(jnp.sum(p * kl.penalty, -1), coef * kl.value, atol=1e-5)
    g1 = jax.grad(lambda lg: jnp.sum(reg.regularize("kl", lg, ref, coef, mask=mask).loss))(logits)
    g2 = jax.grad(lambda lg: coef * jnp.sum(reg.kl(lg, ref, mask)))(logits)
    np.testing.assert_allclose(g1, g2, atol=1e-6)

    ent = reg.regularize("entropy", logits, None, coef, mask=mask)
    np.testing.assert_allclose(ent.loss, -coef * reg.entropy(logits, mask), atol=1e-6)
    np.testing.assert_allclose(jnp.sum(p * ent.penalty, -1), coef * ent.value, atol=1e-5)

    @functools.partial(jax.jit, static_argnames="centred")
    def wasserstein_case(lg, centred):
        def loss(x):
            kwargs = dict(mask=mask, epsilon=0.1, iterations=50, centred=centred)
            r = reg.regularize("wasserstein", x, ref, coef, **kwargs)
            return jnp.sum(r.loss), r

        (_, w), g = jax.value_and_grad(loss, has_aux=True)(lg)
        out = reg.wasserstein(lg, ref, ac.uniform_cost(n), 0.1, 50, mask=mask, debias=centred)
        per_action = out.centred_penalty if centred else out.penalty
        gs = jax.grad(lambda x: coef * jnp.sum(reg.surrogate_loss(x, per_action, mask)))(lg)
        return w, out, per_action, g, gs

    for centred in (True, False):
        w, out, per_action, g, gs = wasserstein_case(logits, centred)
        want = out.divergence if centred else out.distance
        np.testing.assert_allclose(w.value, want, atol=1e-6)
        np.testing.assert_allclose(w.loss, coef * want, atol=1e-6)
        np.testing.assert_allclose(w.penalty, coef * per_action, atol=1e-6)
        # The loss gradient is the surrogate's: sum_i dp_i * penalty_i.
        np.testing.assert_allclose(g, gs, atol=1e-6)

    with pytest.raises(ConfigError, match="regularizer.kind"):
        reg.regularize("tv", logits, ref, coef)


# ------------------------------------------------------------------------ Gaussians


def test_gaussian_w2_matches_general_formula_and_vanishes_at_equality():
    rng = np.random.default_rng(10)
    mu1, mu2 = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    s1, s2 = rng.uniform(0.2, 2.0, size=(2, 3)), rng.uniform(0.2, 2.0, size=(2, 3))
    got = reg.gaussian_w2(*(jnp.asarray(x, jnp.float32) for x in (mu1, s1, mu2, s2)))
    for i in range(2):
        c1, c2 = np.diag(s1[i] ** 2), np.diag(s2[i] ** 2)
        r1 = scipy.linalg.sqrtm(c1)
        cross = np.real(scipy.linalg.sqrtm(r1 @ c2 @ r1))
        want = np.sum((mu1[i] - mu2[i]) ** 2) + np.trace(c1 + c2 - 2 * cross)
        np.testing.assert_allclose(got[i], want, rtol=1e-5)
    mu, s = jnp.asarray(mu1, jnp.float32), jnp.asarray(s1, jnp.float32)
    assert np.all(reg.gaussian_w2(mu, s, mu, s) == 0)
    grads = jax.grad(lambda m, sd: jnp.sum(reg.gaussian_w2(m, sd, mu, s)), argnums=(0, 1))(mu, s)
    for g in grads:
        assert np.all(g == 0)


# --------------------------------------------------------------------- action costs


def _check_cost_matrix(cost, n):
    assert cost.shape == (n, n) and cost.dtype == np.float32
    np.testing.assert_array_equal(cost, cost.T)
    assert np.all(np.diag(cost) == 0) and np.all(cost >= 0) and cost.max() == pytest.approx(1.0)
    ac.validate_cost(cost, n)


def test_action_cost_matrices():
    _check_cost_matrix(ac.uniform_cost(4), 4)
    _check_cost_matrix(ac.mpe_cost(), 5)
    for enemies in (1, 3, 8):
        _check_cost_matrix(ac.smax_cost(enemies), 5 + enemies)

    dirs = ac.smax_move_directions()  # JaxMARL's decoding: N, E, S, W
    np.testing.assert_allclose(dirs, [[0, 1], [1, 0], [0, -1], [-1, 0]], atol=1e-7)
    smax = ac.smax_cost(3)
    for i in range(4):
        assert smax[i, (i + 2) % 4] == pytest.approx(1.0)  # opposite moves
        assert smax[i, (i + 1) % 4] == pytest.approx(0.5)  # adjacent moves
        assert smax[i, 4] == pytest.approx(0.5)  # move <-> stop
        assert np.all(smax[i, 5:] == 1.0)  # move <-> attack
    assert np.all(smax[4, 5:] == 1.0)
    assert smax[5, 6] == pytest.approx(0.25) and smax[6, 7] == pytest.approx(0.25)

    mpe = ac.mpe_cost()
    assert mpe[0, 1] == pytest.approx(0.5)  # no-op <-> move
    assert mpe[1, 2] == pytest.approx(1.0) and mpe[3, 4] == pytest.approx(1.0)  # left/right, down/up
    assert mpe[1, 3] == pytest.approx(np.sqrt(2) / 2)  # perpendicular


@pytest.mark.parametrize(
    "cost, message",
    [
        (np.zeros((3, 4)), "shape"),
        (np.array([[0, 1, 1], [2, 0, 1], [1, 1, 0]]), "symmetric"),
        (np.array([[0, -1, 1], [-1, 0, 1], [1, 1, 0]]), "nonnegative"),
        (np.ones((3, 3)), "diagonal"),
        (np.array([[0, np.nan, 1], [np.nan, 0, 1], [1, 1, 0]]), "finite"),
    ],
)
def test_validate_cost_rejects_bad_matrices(cost, message):
    with pytest.raises(ConfigError, match=message):
        ac.validate_cost(cost, 3)


# --------------------------------------------------------------------------- config


def test_config_defaults_are_valid_and_no_regularization():
    cfg = reg.RegularizerConfig()
    assert cfg.kind == "none" and cfg.coef == 0.0 and cfg.centred
    assert cfg.backend == "ott_kernel"
    reg.RegularizerConfig(kind="wasserstein", coef=0.05, epsilon=0.02, iterations=10, reference="initial", mode="loss")
    reg.RegularizerConfig(kind="wasserstein", epsilon=0.01, backend="ott")  # lse mode: any epsilon
    reg.RegularizerConfig(kind="wasserstein", epsilon=0.01, backend="fast")


def test_kernel_backend_rejects_a_small_epsilon_naming_the_field_and_the_alternatives():
    with pytest.raises(ConfigError, match="regularizer.epsilon") as info:
        reg.RegularizerConfig(kind="wasserstein", epsilon=0.01)
    assert "ott_kernel" in str(info.value) and "fast" in str(info.value)
    reg.RegularizerConfig(kind="kl", epsilon=0.01)  # epsilon is not used by KL


def test_auto_backend_uses_kernel_mode_only_where_it_is_safe():
    cost = jnp.asarray(1.0 - np.eye(4), jnp.float32)
    assert reg.resolve_backend("auto", cost, 0.05) == "ott_kernel"
    assert reg.resolve_backend("auto", cost, 0.01) == "ott"  # cost / eps = 100 > 50
    assert jax.jit(lambda e: jnp.asarray(reg.resolve_backend("auto", cost, e) == "ott"))(0.05)  # traced eps: lse
    assert reg.resolve_backend("fast", cost, 0.01) == "fast"
    with pytest.raises(ConfigError, match="regularizer.backend"):
        reg.resolve_backend("sinkhorn", cost, 0.05)


@pytest.mark.parametrize(
    "field, value",
    [
        ("kind", "tv"),
        ("coef", -0.1),
        ("coef", float("inf")),
        ("epsilon", 0.0),
        ("epsilon", -1.0),
        ("iterations", 0),
        ("iterations", 2.5),
        ("reference", "target"),
        ("mode", "reward"),
        ("centred", "yes"),
        ("backend", "pot"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"regularizer.{field}") as info:
        reg.RegularizerConfig(**{field: value})
    assert info.value.field == f"regularizer.{field}"


# ------------------------------------------------- WPR's raw (uncentred) potential


def _sinkhorn_f64(a, b, cost, eps, iterations):
    """Reference log-domain Sinkhorn in numpy float64, written from the equations
    (g first, from f = g = 0): -> (f, g, dual value)."""
    a, b, cost = (np.asarray(x, np.float64) for x in (a, b, cost))
    f, g = np.zeros_like(a), np.zeros_like(b)

    def lse(x, axis):
        mx = x.max(axis=axis, keepdims=True)
        return (np.log(np.exp(x - mx).sum(axis=axis, keepdims=True)) + mx).squeeze(axis)

    for _ in range(iterations):
        g = eps * np.log(b) - eps * lse((f[:, None] - cost) / eps, axis=0)
        f = eps * np.log(a) - eps * lse((g[None, :] - cost) / eps, axis=1)
    plan = np.exp((f[:, None] + g[None, :] - cost) / eps)
    value = a @ f + b @ g + eps * (1.0 - plan.sum())
    return f, g, value, plan


@pytest.mark.parametrize("n, eps, iterations", [(4, 0.2, 10), (6, 0.05, 10), (8, 0.05, 200)])
@pytest.mark.parametrize("backend", ["fast", "ott", "ott_kernel"])
def test_uncentred_penalty_is_the_raw_potential_of_a_float64_sinkhorn(n, eps, iterations, backend):
    rng = np.random.default_rng(n)
    cost = _random_cost(rng, n)
    logits_p, logits_q = rng.normal(size=(3, n)), rng.normal(size=(3, n))
    p, q = np.asarray(jax.nn.softmax(logits_p)), np.asarray(jax.nn.softmax(logits_q))
    out = _wass(
        jnp.asarray(logits_p, jnp.float32),
        jnp.asarray(logits_q, jnp.float32),
        cost,
        eps,
        iterations,
        backend=backend,
        debias=False,
    )
    actions = jnp.asarray(rng.integers(0, n, size=3))
    taken = reg.wasserstein_penalty(actions, logits_p, logits_q, cost, eps, iterations, centred=False, backend=backend)
    coef = 0.03
    reg_out = reg.regularize(
        "wasserstein",
        logits_p,
        logits_q,
        coef,
        cost=cost,
        epsilon=eps,
        iterations=iterations,
        centred=False,
        backend=backend,
    )
    for i in range(3):
        f, g, value, plan = _sinkhorn_f64(p[i], q[i], cost, eps, iterations)
        # the raw potential f = eps log u of the policy, WPR's penalty, to float32 accuracy
        np.testing.assert_allclose(out.penalty[i], f, atol=2e-4)
        np.testing.assert_allclose(out.f[i], f, atol=2e-4)
        np.testing.assert_allclose(out.distance[i], value, atol=2e-4)
        np.testing.assert_allclose(taken[i], f[int(actions[i])], atol=2e-4)
        np.testing.assert_allclose(reg_out.penalty[i], coef * f, atol=1e-5)
        # uncentred: the value is W_eps itself (not the debiased divergence), and the
        # penalty's mean under the policy is not the distance (it is <p, f>)
        np.testing.assert_allclose(reg_out.value[i], value, atol=2e-4)
        if iterations >= 200:
            # converged: both marginals hold and the dual value equals the primal one
            np.testing.assert_allclose(plan.sum(1), p[i], atol=1e-8)
            np.testing.assert_allclose(plan.sum(0), q[i], atol=1e-6)
            primal = (plan * cost).sum() + eps * (plan * np.log(plan)).sum()
            np.testing.assert_allclose(value, primal, atol=1e-6)


def test_raw_potential_is_not_zero_at_equality_but_the_centred_one_is():
    rng = np.random.default_rng(3)
    cost = _random_cost(rng, 5)
    logits = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    raw = _wass(logits, logits, cost, 0.05, 10, backend="fast", debias=False)
    cen = _wass(logits, logits, cost, 0.05, 10, backend="fast", debias=True)
    assert np.abs(np.asarray(raw.penalty)).max() > 1e-2
    np.testing.assert_allclose(cen.centred_penalty, 0.0, atol=1e-6)


def test_correlation_of_penalties():
    x = jnp.arange(10.0)
    assert float(reg.correlation(x, 3 * x + 1)) == pytest.approx(1.0)
    assert float(reg.correlation(x, -x)) == pytest.approx(-1.0)
    assert float(reg.correlation(x, jnp.ones(10))) == 0.0  # constant: 0, not NaN
    y = np.random.default_rng(0).normal(size=(4, 5))
    z = y + np.random.default_rng(1).normal(size=(4, 5))
    assert float(reg.correlation(y, z)) == pytest.approx(np.corrcoef(y.ravel(), z.ravel())[0, 1], abs=1e-5)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"reference": "run"}, "regularizer.reference_run"),
        ({"reference": "initial", "reference_run": "/nonexistent"}, "regularizer.reference_run"),
        ({"reference": "run", "reference_run": "/nonexistent"}, "regularizer.reference_run"),
        ({"reference_seed": -1}, "regularizer.reference_seed"),
        ({"reference": "initial", "init_from_reference": True}, "regularizer.init_from_reference"),
    ],
)
def test_config_reference_run_fields(changes, field):
    with pytest.raises(ConfigError) as info:
        reg.RegularizerConfig(kind="kl", coef=0.1, **changes)
    assert info.value.field == field


def test_check_usage_holds_every_learners_rules_in_one_place():
    r = reg.RegularizerConfig
    reg.check_usage(r(), who="x", gaussian=True, rollout_is_policy=True, loss_only=True)  # none: always fine
    with pytest.raises(ConfigError, match="regularizer.reference") as e:
        reg.check_usage(r(kind="kl", reference="uniform"), who="SAC", gaussian=True)
    assert "SAC" in str(e.value)
    reg.check_usage(r(kind="entropy", reference="uniform"), who="SAC", gaussian=True)  # entropy reads no reference
    with pytest.raises(ConfigError, match="regularizer.reference"):
        reg.check_usage(r(kind="kl", mode="penalty", reference="rollout"), who="PPO", rollout_is_policy=True)
    reg.check_usage(r(kind="kl", mode="penalty", reference="rollout"), who="QMIX")  # its rollout is the target net
    with pytest.raises(ConfigError, match="regularizer.mode"):
        reg.check_usage(r(kind="wasserstein", mode="penalty", reference="initial"), who="SAC", loss_only=True)


# ------------------------------------------------------------------ one learner's wiring


def test_build_rejects_a_reference_the_learner_does_not_offer():
    from marl.config import ConfigError
    from marl.regularizers import RegularizerConfig, build

    r = RegularizerConfig(kind="kl", coef=0.1, reference="uniform", mode="loss")
    with pytest.raises(ConfigError, match="regularizer.reference"):
        build(r, who="learner", references=("rollout", "initial"))
    with pytest.raises(ConfigError, match="Gaussian"):
        build(r, who="learner", policy="gaussian")
    # entropy reads no reference: any configured reference is accepted
    build(RegularizerConfig(kind="entropy", reference="uniform"), who="learner", references=("rollout",))


def test_regularizer_reference_evaluates_only_the_chosen_candidate():
    from marl.regularizers import RegularizerConfig, build

    R = build(RegularizerConfig(kind="kl", coef=0.1, reference="initial", mode="loss"), who="learner")

    def fail():
        raise AssertionError("evaluated a reference that was not chosen")

    assert R.reference(rollout=fail, initial=lambda: "initial", uniform=fail) == "initial"
    assert R.as_loss and not R.as_penalty and R.divergence
    # a regularizer that reads no reference gets a placeholder, the first offered candidate
    E = build(RegularizerConfig(kind="entropy", reference="uniform"), who="learner")
    assert E.reference(rollout=lambda: "rollout", initial=fail) == "rollout" and not E.divergence


def test_regularizer_penalty_is_the_taken_actions_per_action_penalty():
    """Categorical: ``penalty`` gathers :func:`regularize`'s per-action penalty at the taken
    action and ``loss_term`` is its loss; Gaussian: the closed forms of gaussian_regularizer."""
    from marl.regularizers import RegularizerConfig, build, gaussian_regularizer, regularize

    key = jax.random.PRNGKey(3)
    logits, ref = jax.random.normal(key, (2, 5, 4)), jax.random.normal(jax.random.fold_in(key, 1), (2, 5, 4))
    avail = jnp.ones((2, 5, 4), bool).at[..., 3].set(False)
    action = jax.random.randint(jax.random.fold_in(key, 2), (2, 5), 0, 3)
    cfg = RegularizerConfig(
        kind="wasserstein", coef=0.3, epsilon=0.1, iterations=30, mode="penalty", reference="initial"
    )
    R = build(cfg, who="learner")
    pen, value = R.penalty(logits, ref, 0.3, 0.1, avail=avail, action=action)
    out = regularize("wasserstein", logits, ref, 0.3, mask=avail, epsilon=0.1, iterations=30)
    np.testing.assert_allclose(pen, jnp.take_along_axis(out.penalty, action[..., None], -1)[..., 0], rtol=1e-6)
    np.testing.assert_allclose(value, out.value, rtol=1e-6)
    loss, _ = R.loss_term(logits, ref, 0.3, 0.1, avail=avail)
    np.testing.assert_allclose(loss, out.loss, rtol=1e-6)

    G = build(RegularizerConfig(kind="kl", coef=0.5, mode="loss", reference="initial"), who="g", policy="gaussian")
    m1, m2, s1, s2 = (jax.random.normal(jax.random.fold_in(key, i), (6, 2)) * 0.3 for i in range(4))
    a = jax.random.normal(jax.random.fold_in(key, 9), (6, 2))
    want = gaussian_regularizer("kl", m1, s1, m2, s2, a, 0.5)
    got = G.term((m1, s1), (m2, s2), 0.5, action=a)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    np.testing.assert_allclose(G.divergence_to((m1, s1), (m2, s2)), want[2], rtol=1e-6)
