r"""The shared policy regularizer: KL, entropy and WPR's Wasserstein term.

Paper: "Wasserstein Policy Regularization" (WPR). A policy is regularized
towards a reference policy by the entropic optimal-transport distance between
the two action distributions at each state, under a ground cost ``C`` between
actions (:mod:`marl.action_costs`). Instead of differentiating through the OT
solver, WPR uses the Sinkhorn dual potential of the taken action as a reward
penalty, so the policy-gradient learner runs unchanged. KL and entropy are
offered as the classical alternatives. specs/wpr.md has the background.

Equations (one state; ``a = pi(.|s)``, ``b = pi_ref(.|s)``, ``n`` actions)
----------------------------------------------------------------------------
Entropic OT, the ott-jax ``ent_reg_cost`` convention, used everywhere here::

    W_eps(a, b) = min_{P 1 = a, P^T 1 = b}  <C, P> - eps H(P),   H(P) = -sum P log P

(Cuturi's form ``<C, P> + eps sum P (log P - 1)`` is the same minus ``eps``.)
Dual, with the optimal coupling ``P_ij = exp((f_i + g_j - C_ij) / eps)``::

    W_eps(a, b) = max_{f, g} <a, f> + <b, g> + eps (1 - sum_ij exp((f_i + g_j - C_ij) / eps))

Log-domain Sinkhorn (ott's ``lse_mode``, alternating, ``g`` first, from
``f = g = 0`` on the supports and ``-inf`` off them; a fixed number of
iterations so ``vmap`` never waits for the slowest element)::

    g_j <- eps log b_j - eps LSE_i((f_i - C_ij) / eps)
    f_i <- eps log a_i - eps LSE_j((g_j - C_ij) / eps)

``distance`` is the dual objective at the final potentials (exactly what ott
reports as ``ent_reg_cost``).

Danskin: ``grad_a W_eps(a, b) = f`` (up to an additive constant, which does not
matter on the simplex). Hence

- WPR reward penalty: ``r_t <- r_t - beta f(a_t)`` (``penalty`` below);
- surrogate loss with the same policy gradient:
  ``beta <softmax(logits), stop_gradient(f)>`` (:func:`surrogate_loss`).

Centring (the default): the raw potential is not zero at ``a == b`` (it is not
even constant: with a near-identity kernel ``f ~ eps/2 log a``), and
``W_eps(a, a) != 0`` (it is ``<= -eps H(a)``). So the plain centred form
``f - <a, f> + W`` (expectation ``W`` under ``a``) does NOT vanish at equality.
We debias as in the Sinkhorn divergence (Feydy et al. 2019)::

    S_eps(a, b) = W_eps(a, b) - W_eps(a, a) / 2 - W_eps(b, b) / 2
    grad_a S_eps = f_ab - f_aa          (f_aa: potential of the (a, a) problem)
    centred_penalty = d - <a, d> + S_eps,   d = f_ab - f_aa

``centred_penalty`` has expectation ``S_eps(a, b)`` under ``a`` (so summed
rewards see the regularized objective itself) and the same policy gradient as
``S_eps``. At ``a == b`` it is exactly zero: the three problems are solved by
the same batched solver call, so ``f_ab`` and ``f_aa`` are the same numbers.
``S_eps >= 0`` and ``S_eps(a, b) = S_eps(b, a)`` when the kernel
``exp(-C / eps)`` is positive definite (uniform cost, Euclidean costs) and the
solver has converged. The price is three OT solves instead of one.

Raw potential (``centred=False``): the official WPR code's penalty, the dual potential
``f = eps log u`` of ``pi_theta`` itself (``u`` the Sinkhorn scaling of the policy
marginal), after a fixed number of iterations. Same gradient direction on the simplex
as the centred form up to the ``f_aa`` debiasing term, but (i) it is not zero at
``pi == ref`` (with a near-identity kernel ``f ~ eps/2 log pi``), so the reward
penalty also acts as an entropy-like bonus even at the reference; (ii) its mean under
the policy is ``<pi, f>``, not the divergence; (iii) with ``C / eps`` large and few
iterations it is a rescaled KL log-ratio whose size grows with the iteration count.
The logged ``value`` is then ``W_eps`` (not 0 at equality). Tested against a float64
Sinkhorn written from the equations above.

Continuous (diagonal Gaussian) policies use the closed form
``W2^2 = ||mu1 - mu2||^2 + ||sigma1 - sigma2||^2`` (:func:`gaussian_w2`).

Choices and deviations
----------------------
- lse (log-domain) mode with a fixed iteration count, in float32: kernel mode
  underflows when ``C / eps > ~80``. Official WPR uses 10 iterations of the
  scaling form, ``eps = 0.01``, a Euclidean embedding cost and top-k support.
- Three backends with the same convention (same updates from the same initialization):
  ``"ott_kernel"`` (the default: ott-jax's Sinkhorn ``vmap``-ed over states, kernel
  mode, for ``max(cost) / epsilon <= 50``), ``"ott"`` (the same in lse mode, any
  epsilon) and ``"fast"`` (a hand-written log-domain ``fori_loop``, batched over leading
  dims, any epsilon). Measured side by side at the learners' sizes
  (``experiments.bench_sinkhorn``, ``docs/benchmarks.md``): kernel-mode ott-jax is
  2.8-6x faster than ``fast``, lse-mode ott-jax 2.7-4.9x slower; all agree to 4e-7.
  :class:`RegularizerConfig` defaults to ``ott_kernel`` and rejects an epsilon below
  0.02 with it (action costs are scaled to max 1); the functions below default to
  ``"auto"``: ``ott_kernel`` when epsilon and the cost are concrete and
  ``max(cost) / epsilon <= 50``, else ``ott``.
- Masking: masked actions (``mask`` False) get probability exactly 0 in both
  the policy and the reference. Their potentials are ``-inf`` inside the
  solver (``log 0``; they receive and send no mass) and are reported as 0 in
  every output; they are never sampled, so the value is immaterial. Use a mask
  rather than ``-inf`` logits (``-inf`` logits are clipped to a large negative
  finite value anyway, so neither produces NaN gradients).
- No gradient flows through the solver (its inputs are ``stop_gradient``-ed);
  gradients reach the policy only through :func:`surrogate_loss` / the
  policy-gradient of the reward penalty, as in WPR.
- The ``reference`` (rollout, initial, uniform policy, or a trained ``run``) is
  chosen by the algorithm, which passes the reference logits; uniform = zero logits.
  ``run`` (WPR's setting: a frozen competent policy, like RLHF's SFT model) is read
  by :func:`marl.reference.load_run_params` from a run directory and checked
  against the environment and parameter shapes before anything compiles; one
  reference (``reference_seed`` of the run) is shared by every vmapped row.
  Regularizing toward the ``initial`` policy of a fresh network (nearly uniform)
  makes KL a second entropy bonus: ``KL(pi || U) = log n - H(pi)``.

Shapes: batch dims are arbitrary leading dims, ``logits [..., n]``, cost
``[n, n]`` (or broadcastable ``[..., n, n]``), ``epsilon``/``coef`` scalars or
broadcastable to ``[...]`` (traced arrays are fine: sweeps ``vmap`` them).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Literal, NamedTuple, Optional

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from marl.config import ConfigError, check_choice, check_nonnegative, check_positive

__all__ = [
    "KINDS",
    "REFERENCES",
    "MODES",
    "BACKENDS",
    "RegularizerConfig",
    "SinkhornResult",
    "WassersteinOutput",
    "RegularizerOutput",
    "log_probs",
    "probs",
    "kl",
    "entropy",
    "sinkhorn_ott",
    "sinkhorn_fast",
    "wasserstein",
    "wasserstein_penalty",
    "surrogate_loss",
    "correlation",
    "gaussian_w2",
    "regularize",
    "gaussian_regularizer",
    "gaussian_divergence",
    "Regularizer",
    "build",
]

KINDS = ("none", "kl", "wasserstein", "entropy")
REFERENCES = ("rollout", "initial", "uniform", "run")
MODES = ("penalty", "loss")
BACKENDS = ("ott_kernel", "ott", "fast")
KERNEL_MAX_COST_OVER_EPS = 50.0
"""Largest ``max(cost) / epsilon`` the ott-jax kernel-mode backend accepts: above it
``exp(-C / eps)`` nears float32's underflow and the scalings can overflow."""


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
    """Static description of the regularizer of one algorithm.

    Attributes:
      kind: ``none`` | ``kl`` (KL(pi || ref)) | ``wasserstein`` (WPR) |
        ``entropy`` (negative entropy of pi; ``reference`` unused).
      coef: the coefficient ``beta`` (>= 0). Swept: algorithms copy it into the
        train state as an array.
      epsilon: entropic regularization of the OT problem (> 0), in the units of
        the cost (action costs are scaled to max 1). Swept like ``coef``.
      iterations: fixed number of Sinkhorn iterations (static).
      reference: which policy the algorithm passes as reference:
        ``rollout`` (the behaviour / old policy: a trust region),
        ``initial`` (frozen initial policy), ``uniform``, or ``run`` (the frozen
        policy of a trained run, ``reference_run``: WPR/RLHF style, a competent
        reference). ``run`` is supported by the PPO family (IPPO, MAPPO).
      reference_run: ``reference="run"`` only: the run directory (``runs/<name>``,
        with ``run.json`` and ``checkpoints/``) whose latest parameters are the
        reference (:func:`marl.reference.load_run_params`). Checked before
        compiling: same environment, same parameter shapes.
      reference_seed: which seed of a seed-batched reference run; the one
        reference is shared by every row of a vmapped run or sweep.
      init_from_reference: ``reference="run"`` only: also start the policy (actor
        and critic) from the reference's parameters: fine-tuning, as RLHF starts
        from the SFT model. The optimizer state starts fresh.
      mode: ``penalty`` (WPR: subtract ``coef * penalty(a_t)`` from the reward)
        or ``loss`` (add ``coef * value`` with the surrogate gradient to the loss).
      centred: Wasserstein only. True: debiased, centred potential (zero at
        ``pi == ref``, expectation = Sinkhorn divergence); False: WPR's raw
        potential ``f``.
      backend: Wasserstein only, the Sinkhorn solver: ``ott_kernel`` (ott-jax, kernel
        mode; epsilon >= 0.02), ``ott`` (ott-jax, lse mode) or ``fast`` (our batched
        log-domain loop); see the module docstring for the measured speeds.
    """

    kind: Literal["none", "kl", "wasserstein", "entropy"] = "none"
    coef: float = 0.0
    epsilon: float = 0.05
    iterations: int = 10
    reference: Literal["rollout", "initial", "uniform", "run"] = "rollout"
    mode: Literal["penalty", "loss"] = "penalty"
    centred: bool = True
    reference_run: Optional[str] = None
    reference_seed: int = 0
    init_from_reference: bool = False
    backend: Literal["ott_kernel", "ott", "fast"] = "ott_kernel"

    def __post_init__(self):
        check_choice("regularizer.kind", self.kind, KINDS)
        _check_number("regularizer.coef", self.coef)
        check_nonnegative("regularizer.coef", self.coef)
        _check_number("regularizer.epsilon", self.epsilon)
        check_positive("regularizer.epsilon", self.epsilon)
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool):
            raise ConfigError("regularizer.iterations", self.iterations, "must be a positive integer")
        check_positive("regularizer.iterations", self.iterations, integer=True)
        check_choice("regularizer.reference", self.reference, REFERENCES)
        check_choice("regularizer.mode", self.mode, MODES)
        check_choice("regularizer.backend", self.backend, BACKENDS)
        if self.kind == "wasserstein" and self.backend == "ott_kernel" and self.epsilon < 1 / KERNEL_MAX_COST_OVER_EPS:
            raise ConfigError(
                "regularizer.epsilon",
                self.epsilon,
                f"must be >= {1 / KERNEL_MAX_COST_OVER_EPS:g} with backend 'ott_kernel' (ott-jax kernel mode "
                f"underflows at cost / epsilon > {KERNEL_MAX_COST_OVER_EPS:g}; action costs are scaled to max 1); "
                "for a smaller epsilon pass --regularizer.backend ott (lse mode) or fast",
            )
        if not isinstance(self.centred, bool):
            raise ConfigError("regularizer.centred", self.centred, "must be a bool")
        if self.reference == "run" and not self.reference_run:
            raise ConfigError(
                "regularizer.reference_run",
                self.reference_run,
                "reference 'run' needs the directory of a trained run (runs/<name>)",
            )
        if self.reference_run is not None:
            if self.reference != "run":
                raise ConfigError(
                    "regularizer.reference_run",
                    self.reference_run,
                    f"is only used with reference 'run' (got reference {self.reference!r}); "
                    "pass --regularizer.reference run",
                )
            if not isinstance(self.reference_run, str) or not os.path.isfile(
                os.path.join(self.reference_run, "run.json")
            ):
                raise ConfigError(
                    "regularizer.reference_run",
                    self.reference_run,
                    "must be a run directory holding run.json and checkpoints/",
                )
        if isinstance(self.reference_seed, bool) or not isinstance(self.reference_seed, int) or self.reference_seed < 0:
            raise ConfigError("regularizer.reference_seed", self.reference_seed, "must be an integer >= 0")
        if not isinstance(self.init_from_reference, bool):
            raise ConfigError("regularizer.init_from_reference", self.init_from_reference, "must be a bool")
        if self.init_from_reference and self.reference != "run":
            raise ConfigError(
                "regularizer.init_from_reference",
                True,
                f"needs reference 'run' (got {self.reference!r}): the policy starts from that run",
            )


def check_usage(
    r: RegularizerConfig, *, who: str, gaussian: bool = False, rollout_is_policy: bool = False, loss_only: bool = False
) -> None:
    """The rules for using the regularizer ``r`` with one learner (``who``), in one place;
    ConfigError naming the field before anything compiles.

    - ``loss_only``: the learner applies kl / wasserstein as a loss term only (SAC).
    - ``gaussian``: the policy is a Gaussian: no uniform reference exists (entropy, which
      reads no reference, is allowed).
    - ``rollout_is_policy``: the learner's ``rollout`` reference is the policy being
      trained (PPO's old policy), so a reward penalty toward it is zero.
    """
    if r.kind == "none":
        return
    if loss_only and r.kind in ("kl", "wasserstein") and r.mode != "loss":
        raise ConfigError("regularizer.mode", r.mode, f"{who} applies kl/wasserstein as a loss term: use 'loss'")
    if gaussian and r.kind != "entropy" and r.reference == "uniform":
        raise ConfigError(
            "regularizer.reference",
            r.reference,
            f"{who} has a Gaussian policy, which has no uniform reference; use initial or rollout",
        )
    if rollout_is_policy and r.mode == "penalty" and r.reference == "rollout":
        raise ConfigError(
            "regularizer.reference",
            r.reference,
            "with mode 'penalty' the rollout policy is the policy itself (zero penalty); "
            "use reference initial (or uniform for a categorical policy), or mode 'loss' for a trust region",
        )


def _check_number(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(field, value, "must be a finite number")


# --------------------------------------------------------------- KL and entropy


def _masked_logits(logits: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """Replace masked (and ``-inf``) logits by a large finite negative value.

    A finite fill keeps ``p log p`` and its gradient at exactly 0 for masked
    actions; ``-inf`` would give ``0 * inf = NaN`` in the backward pass.
    """
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.float32)
    fill = jnp.asarray(0.25 * jnp.finfo(logits.dtype).min, logits.dtype)
    logits = jnp.maximum(logits, fill)
    if mask is not None:
        logits = jnp.where(mask, logits, fill)
    return logits


def log_probs(logits: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """``[..., n]`` log-probabilities; masked entries are very negative but finite."""
    return jax.nn.log_softmax(_masked_logits(logits, mask), axis=-1)


def probs(logits: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """``[..., n]`` probabilities, exactly 0 on masked actions."""
    p = jax.nn.softmax(_masked_logits(logits, mask), axis=-1)
    return p if mask is None else jnp.where(mask, p, 0.0)


def kl(logits_p: jax.Array, logits_q: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """``KL(p || q)`` per state, ``[...]``. The mask applies to both distributions."""
    logp, logq = log_probs(logits_p, mask), log_probs(logits_q, mask)
    terms = jnp.exp(logp) * (logp - logq)
    if mask is not None:
        terms = jnp.where(mask, terms, 0.0)
    return jnp.sum(terms, axis=-1)


def entropy(logits: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Shannon entropy per state, ``[...]``; masked actions contribute 0."""
    logp = log_probs(logits, mask)
    terms = jnp.exp(logp) * logp
    if mask is not None:
        terms = jnp.where(mask, terms, 0.0)
    return -jnp.sum(terms, axis=-1)


# ------------------------------------------------------------------------ Sinkhorn


class SinkhornResult(NamedTuple):
    """Entropic OT between ``a [..., n]`` and ``b [..., m]`` (ott's conventions).

    Attributes:
      distance: ``[...]`` ``ent_reg_cost`` = ``<C, P> - eps H(P)`` (dual value).
      f: ``[..., n]`` potential paired with ``a`` (0 where ``a == 0``).
      g: ``[..., m]`` potential paired with ``b`` (0 where ``b == 0``).
      marginal_error: ``[...]`` L1 error of the coupling's column marginal vs
        ``b`` (the row marginal is exact after the last ``f`` update).
    """

    distance: jax.Array
    f: jax.Array
    g: jax.Array
    marginal_error: jax.Array


def sinkhorn_ott(a, b, cost, epsilon, iterations: int, lse_mode: bool = True) -> SinkhornResult:
    """Entropic OT for ONE pair ``a [n]``, ``b [m]``, ``cost [n, m]`` with ott-jax.

    ``vmap`` it for batches. ``epsilon`` may be a traced scalar; ``iterations``
    is static (min = max = inner iterations, so exactly ``iterations`` updates).
    ``lse_mode=False``: ott's kernel (scaling) mode, which underflows for ``C / eps``
    above about 80 (measured against lse mode in ``experiments.bench_sinkhorn``).
    """
    iterations = int(iterations)
    geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
    prob = linear_problem.LinearProblem(geom, a=a, b=b)
    solver = sinkhorn.Sinkhorn(
        lse_mode=lse_mode,
        min_iterations=iterations,
        max_iterations=iterations,
        inner_iterations=iterations,
    )
    out = solver(prob)
    return SinkhornResult(
        distance=out.ent_reg_cost,
        f=jnp.where(a > 0, out.f, 0.0),
        g=jnp.where(b > 0, out.g, 0.0),
        marginal_error=out.errors[-1],  # type: ignore[index]  # always recorded with these settings
    )


def _lse(x: jax.Array, axis: int) -> jax.Array:
    """logsumexp tolerating all-``-inf`` slices (returns ``-inf`` there, no NaN)."""
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.log(jnp.sum(jnp.exp(x - m), axis=axis)) + jnp.squeeze(m, axis)


def _sinkhorn_states_last(a, b, c, eps, iterations: int):
    """Sinkhorn on ``a [B, n]``, ``b [B, m]``, ``c = C / eps`` ``[n, m, 1 | B]``, ``eps [] | [B]``.

    States are moved to the last (contiguous) axis so the small reductions over
    actions vectorize across states.
    """
    a_t, b_t = a.T, b.T  # [n, B], [m, B]
    log_a, log_b = jnp.log(a_t), jnp.log(b_t)

    def body(_, uv):
        u, _v = uv
        lse_v = _lse(u[:, None, :] - c, axis=0)
        v = log_b - jnp.where(jnp.isfinite(lse_v), lse_v, 0.0)
        lse_u = _lse(v[None, :, :] - c, axis=1)
        u = log_a - jnp.where(jnp.isfinite(lse_u), lse_u, 0.0)
        return u, v

    # ott's initializer: 0 on the support, -inf off it (so zero-mass rows never
    # enter the first g update).
    init = (jnp.where(a_t > 0, 0.0, -jnp.inf), jnp.where(b_t > 0, 0.0, -jnp.inf))
    u, v = jax.lax.fori_loop(0, iterations, body, init)

    coupling = jnp.exp(u[:, None, :] + v[None, :, :] - c)  # [n, m, B]
    col = jnp.sum(coupling, axis=0)  # [m, B]
    err = jnp.sum(jnp.abs(col - b_t), axis=0)
    total = jnp.sum(col, axis=0)
    f = jnp.where(a_t > 0, eps * u, 0.0)
    g = jnp.where(b_t > 0, eps * v, 0.0)
    mass = jnp.sum(a_t, axis=0) * jnp.sum(b_t, axis=0)
    distance = jnp.sum(a_t * f, 0) + jnp.sum(b_t * g, 0) + eps * (mass - total)
    return SinkhornResult(distance, f.T, g.T, err)


def sinkhorn_fast(a, b, cost, epsilon, iterations: int, chunk: Optional[int] = None) -> SinkhornResult:
    """Fixed-iteration log-domain Sinkhorn, batched over leading dims (no ``vmap``).

    Same updates, initialization and outputs as :func:`sinkhorn_ott` (to float32
    rounding), for ``a [..., n]``, ``b [..., m]``, ``cost [n, m]`` or
    broadcastable ``[..., n, m]``, ``epsilon`` scalar or broadcastable to
    ``[...]``. Potentials are iterated in units of ``eps`` (``u = f / eps``).
    Zero-mass entries have ``log a = -inf``, hence ``u = -inf``: they drop out
    of every log-sum-exp; an all-``-inf`` slice is replaced by 0 as ott does.

    Speed (CPU): states are the last, contiguous axis, and large batches are
    solved ``chunk`` states at a time (``lax.map``; default: about 32k cost
    entries per chunk), which keeps the ``[n, m, chunk]`` temporaries in cache
    (measured 1.5-15x faster than one big batch). Log-domain throughout: the
    kernel ``exp(-C / eps)`` underflows in float32 once ``C / eps > ~87``
    (e.g. WPR's eps = 0.01 with unit costs), so a matrix-vector "kernel mode"
    would silently be wrong there.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    cost = jnp.asarray(cost, a.dtype)
    eps = jnp.asarray(epsilon, a.dtype)
    n, m = a.shape[-1], b.shape[-1]
    batch = jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1], cost.shape[:-2], eps.shape)
    size = math.prod(batch)
    iterations = int(iterations)
    if chunk is None:
        chunk = max(8, 2 ** int(math.log2(max(1, 32768 // (n * m)))))
    shared = cost.ndim == 2 and eps.ndim == 0
    flat = lambda x, tail: jnp.broadcast_to(x, batch + tail).reshape((size,) + tail)
    a_f, b_f = flat(a, (n,)), flat(b, (m,))
    if shared:
        c_f, eps_f = (cost / eps)[:, :, None], eps
    else:
        eps_f = flat(eps, ())
        c_f = jnp.moveaxis(flat(cost, (n, m)) / eps_f[:, None, None], 0, -1)  # [n, m, size]

    if size <= chunk:
        res = _sinkhorn_states_last(a_f, b_f, c_f, eps_f, iterations)
    else:
        k = -(-size // chunk)
        pad = k * chunk - size
        # Padding states are uniform marginals: finite, cheap, discarded below.
        a_p = jnp.concatenate([a_f, jnp.full((pad, n), 1.0 / n, a.dtype)])
        b_p = jnp.concatenate([b_f, jnp.full((pad, m), 1.0 / m, b.dtype)])
        xs: tuple = (a_p.reshape(k, chunk, n), b_p.reshape(k, chunk, m))
        if not shared:
            c_p = jnp.concatenate([c_f, jnp.broadcast_to(c_f[..., :1], (n, m, pad))], axis=-1)
            e_p = jnp.concatenate([eps_f, jnp.broadcast_to(eps_f[:1], (pad,))])
            xs = xs + (jnp.moveaxis(c_p.reshape(n, m, k, chunk), 2, 0), e_p.reshape(k, chunk))
            solve = lambda x: _sinkhorn_states_last(x[0], x[1], x[2], x[3], iterations)
        else:
            solve = lambda x: _sinkhorn_states_last(x[0], x[1], c_f, eps_f, iterations)
        res = jax.lax.map(solve, xs)
        res = jax.tree.map(lambda x: x.reshape((k * chunk,) + x.shape[2:])[:size], res)
    return SinkhornResult(
        distance=res.distance.reshape(batch),
        f=res.f.reshape(batch + (n,)),
        g=res.g.reshape(batch + (m,)),
        marginal_error=res.marginal_error.reshape(batch),
    )


def resolve_backend(backend: str, cost, epsilon) -> str:
    """``backend`` itself, or for ``"auto"``: ``"ott_kernel"`` when ``cost`` and ``epsilon``
    are concrete (not traced) and ``max(cost) / min(epsilon) <= KERNEL_MAX_COST_OVER_EPS``,
    else ``"ott"`` (lse mode, safe for any epsilon)."""
    check_choice("regularizer.backend", backend, BACKENDS + ("auto",))
    if backend != "auto":
        return backend
    try:
        c_max = float(np.max(np.asarray(cost)))
        e_min = float(np.min(np.asarray(epsilon)))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return "ott"
    return "ott_kernel" if e_min > 0 and c_max / e_min <= KERNEL_MAX_COST_OVER_EPS else "ott"


def _solve(a, b, cost, eps, iterations: int, backend: str) -> SinkhornResult:
    check_choice("regularizer.backend", backend, BACKENDS)
    if backend == "fast":
        return sinkhorn_fast(a, b, cost, eps, iterations)
    n, m = a.shape[-1], b.shape[-1]
    batch = jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1], cost.shape[:-2], eps.shape)
    flat = lambda x, tail: jnp.broadcast_to(x, batch + tail).reshape((-1,) + tail)
    if cost.ndim > 2:
        cost_flat, cost_axis = flat(cost, (n, m)), 0
    else:
        cost_flat, cost_axis = cost, None
    lse_mode = backend == "ott"
    solve = jax.vmap(
        lambda a_, b_, c_, e_: sinkhorn_ott(a_, b_, c_, e_, iterations, lse_mode=lse_mode),
        in_axes=(0, 0, cost_axis, 0),
    )
    res = solve(flat(a, (n,)), flat(b, (m,)), cost_flat, flat(eps, ()))
    return jax.tree.map(lambda x: x.reshape(batch + x.shape[1:]), res)


# --------------------------------------------------------------------- Wasserstein


class WassersteinOutput(NamedTuple):
    """Entropic OT between a policy ``p`` and a reference ``q`` at a batch of states.

    Attributes:
      distance: ``[...]`` ``W_eps(p, q)`` (ott's ``ent_reg_cost``; not 0 at p == q).
      divergence: ``[...]`` Sinkhorn divergence ``S_eps(p, q)`` if debiased,
        else equal to ``distance``.
      f: ``[..., n]`` potential of ``p`` (0 on masked actions).
      g: ``[..., n]`` potential of ``q`` (0 on masked actions).
      penalty: ``[..., n]`` WPR's per-action penalty: the raw ``f``.
      centred_penalty: ``[..., n]`` ``d - <p, d> + divergence`` with
        ``d = f - f_pp`` if debiased (exactly 0 at ``p == q``), else ``d = f``
        (plain centring; its mean is ``W_eps``, not 0 at equality). 0 where
        ``p == 0``.
      marginal_error: ``[]`` largest L1 marginal error over the batch (and
        over the debiasing solves): a convergence diagnostic to log.
    """

    distance: jax.Array
    divergence: jax.Array
    f: jax.Array
    g: jax.Array
    penalty: jax.Array
    centred_penalty: jax.Array
    marginal_error: jax.Array


def wasserstein(
    logits_p: jax.Array,
    logits_ref: jax.Array,
    cost: jax.Array,
    epsilon,
    iterations: int,
    mask: Optional[jax.Array] = None,
    backend: str = "auto",
    debias: bool = True,
) -> WassersteinOutput:
    """Entropic OT between ``softmax(logits_p)`` and ``softmax(logits_ref)``.

    Args:
      logits_p, logits_ref: ``[..., n]``; the mask applies to both.
      cost: ``[n, n]`` ground cost (or broadcastable ``[..., n, n]``).
      epsilon: entropic regularization, scalar or broadcastable to ``[...]``.
      iterations: static number of Sinkhorn iterations.
      mask: optional ``[..., n]`` bool, True = available action.
      backend: ``"ott_kernel"`` (ott-jax, kernel mode, ``vmap``-ed), ``"ott"`` (lse
        mode), ``"fast"`` (batched log-domain ``fori_loop``), or ``"auto"``
        (:func:`resolve_backend`).
      debias: static. Also solve ``(p, p)`` and ``(q, q)`` (three solves in
        one batched call) for the Sinkhorn divergence and the debiased centred
        penalty.

    No gradient flows into the solver; every output is a constant for autodiff.
    """
    backend = resolve_backend(backend, cost, epsilon)
    p = jax.lax.stop_gradient(probs(logits_p, mask))
    q = jax.lax.stop_gradient(probs(logits_ref, mask))
    cost = jax.lax.stop_gradient(jnp.asarray(cost, p.dtype))
    eps = jax.lax.stop_gradient(jnp.asarray(epsilon, p.dtype))
    if debias:
        res = _solve(jnp.stack([p, p, q]), jnp.stack([q, p, q]), cost, eps, iterations, backend)
        pq = jax.tree.map(lambda x: x[0], res)
        w_pp, w_qq = res.distance[1], res.distance[2]
        divergence = pq.distance - 0.5 * w_pp - 0.5 * w_qq
        d = pq.f - res.f[1]
    else:
        res = pq = _solve(p, q, cost, eps, iterations, backend)
        divergence = pq.distance
        d = pq.f
    centred = d - jnp.sum(p * d, axis=-1, keepdims=True) + divergence[..., None]
    centred = jnp.where(p > 0, centred, 0.0)
    return WassersteinOutput(
        distance=pq.distance,
        divergence=divergence,
        f=pq.f,
        g=pq.g,
        penalty=pq.f,
        centred_penalty=centred,
        marginal_error=jnp.max(res.marginal_error),
    )


def _take(values: jax.Array, actions: jax.Array) -> jax.Array:
    """``values [..., n]`` at integer ``actions [...]`` -> ``[...]``."""
    idx = jnp.asarray(actions, jnp.int32)[..., None]
    return jnp.take_along_axis(values, idx, axis=-1)[..., 0]


def wasserstein_penalty(
    actions: jax.Array,
    logits_p: jax.Array,
    logits_ref: jax.Array,
    cost: jax.Array,
    epsilon,
    iterations: int,
    mask: Optional[jax.Array] = None,
    centred: bool = True,
    backend: str = "auto",
) -> jax.Array:
    """WPR reward penalty of the taken ``actions [...]`` (subtract ``beta *`` it from r).

    ``centred`` selects the debiased centred potential (default) or WPR's raw ``f``.
    """
    out = wasserstein(logits_p, logits_ref, cost, epsilon, iterations, mask, backend, debias=centred)
    return _take(out.centred_penalty if centred else out.penalty, actions)


def surrogate_loss(logits: jax.Array, f: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """``<softmax(logits), stop_gradient(f)>`` per state, ``[...]``.

    Its gradient in the probabilities is ``f`` (Danskin), so adding
    ``beta * surrogate_loss`` to a loss follows the gradient of ``beta * W``.
    """
    return jnp.sum(probs(logits, mask) * jax.lax.stop_gradient(f), axis=-1)


def correlation(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson correlation of ``x`` and ``y`` over all their entries, ``[]``; 0 when
    either is constant (no NaN). Used to check that a Wasserstein penalty is not just a
    rescaled KL log-ratio (then its correlation with it is ~1)."""
    x = jnp.ravel(x) - jnp.mean(x)
    y = jnp.ravel(y) - jnp.mean(y)
    den = jnp.sqrt(jnp.sum(x * x) * jnp.sum(y * y))
    return jnp.where(den > 0, jnp.sum(x * y) / jnp.where(den > 0, den, 1.0), 0.0)


def gaussian_w2(mu1: jax.Array, std1: jax.Array, mu2: jax.Array, std2: jax.Array) -> jax.Array:
    """Squared W2 between diagonal Gaussians, summed over the last dim, ``[...]``.

    ``||mu1 - mu2||^2 + ||std1 - std2||^2``: closed form, differentiable
    (no square root, so the gradient is 0, not NaN, at equality).
    """
    return jnp.sum(jnp.square(mu1 - mu2) + jnp.square(std1 - std2), axis=-1)


# -------------------------------------------------------------------- entry point


class RegularizerOutput(NamedTuple):
    """What :func:`regularize` gives an algorithm.

    Attributes:
      loss: ``[...]`` ``coef * value`` with the right gradient w.r.t. the policy
        logits (add its mean to the loss when ``mode == "loss"``).
      penalty: ``[..., n]`` ``coef *`` per-action reward penalty (constant for
        autodiff; gather the taken action and subtract it from the reward when
        ``mode == "penalty"``). Its expectation under the policy is ``coef * value``.
      value: ``[...]`` the regularizer itself, for logging: KL, negative
        entropy, Sinkhorn divergence (centred) or ``W_eps`` (raw).
    """

    loss: jax.Array
    penalty: jax.Array
    value: jax.Array


def regularize(
    kind: str,
    logits: jax.Array,
    ref_logits: Optional[jax.Array],
    coef,
    *,
    mask: Optional[jax.Array] = None,
    cost: Optional[jax.Array] = None,
    epsilon=0.05,
    iterations: int = 10,
    centred: bool = True,
    backend: str = "auto",
) -> RegularizerOutput:
    """The single entry point: the regularizer of ``softmax(logits)`` toward a reference.

    Args:
      kind: static, one of :data:`KINDS`.
        ``none``: zeros.
        ``kl``: value ``KL(p || q)``; penalty ``log p(a) - log q(a)``.
        ``entropy``: value ``-H(p)``; penalty ``log p(a)`` (max-ent reward);
        ``ref_logits`` unused.
        ``wasserstein``: value ``S_eps(p, q)`` and the debiased centred
        potential (``centred``), or ``W_eps`` and WPR's raw ``f``.
      logits: ``[..., n]`` current policy (gradients flow into it through ``loss``).
      ref_logits: ``[..., n]`` reference policy (always ``stop_gradient``-ed);
        zero logits for the uniform reference.
      coef: coefficient, scalar or broadcastable to ``[...]`` (may be traced).
      mask: optional ``[..., n]`` available actions, applied to both policies.
      cost: ``[n, n]`` ground cost (Wasserstein); ``None`` = uniform cost.
      epsilon, iterations, backend: see :func:`wasserstein`.
      centred: static, Wasserstein only (see :class:`RegularizerConfig`).
    """
    check_choice("regularizer.kind", kind, KINDS)
    logits = jnp.asarray(logits)
    coef = jnp.asarray(coef, logits.dtype)
    if kind == "none":
        zeros = jnp.zeros(logits.shape[:-1], logits.dtype)
        return RegularizerOutput(zeros, jnp.zeros_like(logits), zeros)
    if kind == "entropy":
        value = -entropy(logits, mask)
        per_action = log_probs(logits, mask)
        loss = coef * value
    elif kind == "kl":
        ref = jax.lax.stop_gradient(jnp.asarray(ref_logits, logits.dtype))
        value = kl(logits, ref, mask)
        per_action = log_probs(logits, mask) - log_probs(ref, mask)
        loss = coef * value
    else:
        n = logits.shape[-1]
        if cost is None:
            cost = 1.0 - jnp.eye(n, dtype=logits.dtype)
        if ref_logits is None:
            raise ValueError("regularize: kind 'wasserstein' needs ref_logits (zero logits for the uniform reference)")
        out = wasserstein(logits, ref_logits, cost, epsilon, iterations, mask, backend, debias=centred)
        per_action = out.centred_penalty if centred else out.penalty
        value = out.divergence
        surrogate = surrogate_loss(logits, per_action, mask)
        # Straight-through: the value of the OT term, the gradient of the surrogate.
        loss = coef * (surrogate + jax.lax.stop_gradient(value - surrogate))
    if mask is not None:
        per_action = jnp.where(mask, per_action, 0.0)
    penalty = jax.lax.stop_gradient(coef[..., None] * per_action)
    return RegularizerOutput(loss, penalty, jax.lax.stop_gradient(value))


def gaussian_regularizer(kind: str, mean, log_std, ref_mean, ref_log_std, action, coef):
    """Closed-form regularizers between diagonal Gaussians (module docstring).

    Returns (loss [...], penalty at ``action`` [...], value [...]): ``loss = coef * value``
    carries the gradient; ``penalty`` (no gradient) is ``coef`` times the per-sample
    term whose mean under the policy is ``value``.
    """
    ref_mean, ref_log_std = jax.lax.stop_gradient(ref_mean), jax.lax.stop_gradient(ref_log_std)
    std, ref_std = jnp.exp(log_std), jnp.exp(ref_log_std)
    p = distrax.MultivariateNormalDiag(mean, std)
    if kind == "entropy":
        value = -p.entropy()
        per_sample = p.log_prob(action)
    elif kind in ("kl", "wasserstein"):
        value = gaussian_divergence(kind, mean, log_std, ref_mean, ref_log_std)
        if kind == "kl":
            per_sample = p.log_prob(action) - distrax.MultivariateNormalDiag(ref_mean, ref_std).log_prob(action)
        else:
            ratio = ref_std / std
            per_sample = jnp.sum(
                action**2
                - 2 * ref_mean * action
                - ratio * (action - mean) ** 2
                + ref_mean**2
                + ref_std**2
                - std * ref_std,
                -1,
            )
    else:
        raise ConfigError("regularizer.kind", kind, f"must be one of {list(KINDS)}")
    return coef * value, jax.lax.stop_gradient(coef * per_sample), jax.lax.stop_gradient(value)


def gaussian_divergence(kind: str, mean, log_std, ref_mean, ref_log_std):
    """``[...]`` closed-form D(pi || ref) between diagonal Gaussians, summed over the
    action dimensions: ``kl`` or ``wasserstein`` (W2^2); the reference gets no gradient."""
    ref_mean, ref_log_std = jax.lax.stop_gradient(ref_mean), jax.lax.stop_gradient(ref_log_std)
    std, ref_std = jnp.exp(log_std), jnp.exp(ref_log_std)
    if kind == "kl":
        return distrax.MultivariateNormalDiag(mean, std).kl_divergence(
            distrax.MultivariateNormalDiag(ref_mean, ref_std)
        )
    if kind == "wasserstein":
        return gaussian_w2(mean, std, ref_mean, ref_std)
    raise ConfigError("regularizer.kind", kind, "a Gaussian divergence is 'kl' or 'wasserstein'")


# -------------------------------------------------------------------- one learner's wiring

POLICIES = ("categorical", "gaussian")


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """The regularizer of one learner, built from its config by :func:`build`: which
    reference it reads, whether it is a loss term or a reward penalty, and the term
    itself for the learner's policy family. Learners ask it; they never read
    ``RegularizerConfig.kind`` / ``mode`` / ``reference`` themselves.

    A categorical policy is given as logits ``[..., n]`` (with the availability mask
    ``avail``); a Gaussian as ``(mean, log_std)``, each ``[..., d]``.
    ``coef`` and ``epsilon`` are the (traced, sweepable) values of the train state.
    """

    config: RegularizerConfig
    policy: str = "categorical"
    cost: Optional[jax.Array] = None  # [n, n] ground cost between actions (categorical Wasserstein)

    @property
    def active(self) -> bool:
        return self.config.kind != "none"

    @property
    def as_loss(self) -> bool:
        """Added to the learner's loss (``mode == "loss"``)."""
        return self.active and self.config.mode == "loss"

    @property
    def as_penalty(self) -> bool:
        """Subtracted from the reward at the taken action (``mode == "penalty"``, WPR)."""
        return self.active and self.config.mode == "penalty"

    @property
    def divergence(self) -> bool:
        """A divergence to a reference (kl, wasserstein), not the reference-free entropy."""
        return self.config.kind in ("kl", "wasserstein")

    def reference(self, **sources):
        """The reference the config names, from the learner's candidates: each keyword
        (``rollout``, ``initial``, ``uniform``, ``run``) is a thunk, and only the chosen
        one is evaluated. :func:`build` has already checked that the learner offers it
        for a divergence; a regularizer that reads no reference (none, entropy) gets the
        configured candidate when offered, else the first one, as a placeholder."""
        chosen = sources.get(self.config.reference)
        if chosen is None and not self.divergence:
            chosen = next(iter(sources.values()))
        return chosen()

    def term(self, pol, ref, coef, epsilon=None, *, avail=None, action=None) -> RegularizerOutput:
        """The regularizer of ``pol`` toward ``ref``. Categorical: :func:`regularize`
        (``penalty`` per action ``[..., n]``). Gaussian: :func:`gaussian_regularizer`
        (``penalty`` at ``action`` ``[...]``, so ``action`` is required)."""
        if self.policy == "gaussian":
            (mean, log_std), (ref_mean, ref_log_std) = pol, ref
            return RegularizerOutput(
                *gaussian_regularizer(self.config.kind, mean, log_std, ref_mean, ref_log_std, action, coef)
            )
        r = self.config
        return regularize(
            r.kind,
            pol,
            ref,
            coef,
            mask=avail,
            cost=self.cost,
            epsilon=epsilon,
            iterations=r.iterations,
            centred=r.centred,
            backend=r.backend,
        )

    def loss_term(self, pol, ref, coef, epsilon=None, *, avail=None, action=None):
        """(loss [...] carrying the gradient, value [...] for logging)."""
        out = self.term(pol, ref, coef, epsilon, avail=avail, action=action)
        return out.loss, out.value

    def penalty(self, pol, ref, coef, epsilon=None, *, avail=None, action):
        """(reward penalty at the taken ``action`` [...] (no gradient), value [...])."""
        out = self.term(pol, ref, coef, epsilon, avail=avail, action=action)
        if self.policy == "gaussian":
            return out.penalty, out.value
        return jnp.take_along_axis(out.penalty, action[..., None], -1)[..., 0], out.value

    def divergence_to(self, pol, ref):
        """Gaussian only: the closed-form divergence ``[...]`` alone (a learner that
        adds it to its own loss, as SAC's actor does)."""
        (mean, log_std), (ref_mean, ref_log_std) = pol, ref
        return gaussian_divergence(self.config.kind, mean, log_std, ref_mean, ref_log_std)


def build(
    config: RegularizerConfig,
    *,
    who: str,
    policy: str = "categorical",
    cost: Optional[jax.Array] = None,
    references: tuple = REFERENCES,
    rollout_is_policy: bool = False,
    loss_only: bool = False,
) -> Regularizer:
    """The learner ``who``'s :class:`Regularizer`, after :func:`check_usage` and a check
    that the learner offers the configured reference (``references``); ConfigError
    naming the field before anything compiles."""
    check_choice("regularizer policy", policy, POLICIES)
    check_usage(
        config, who=who, gaussian=policy == "gaussian", rollout_is_policy=rollout_is_policy, loss_only=loss_only
    )
    needs_reference = config.kind in ("kl", "wasserstein")
    if needs_reference and config.reference not in references:
        raise ConfigError(
            "regularizer.reference", config.reference, f"{who} supports the references {list(references)}"
        )
    return Regularizer(config, policy, cost)
