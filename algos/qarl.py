r"""QARL: quantal adversarial RL with a self-paced curriculum over the adversary's rationality.

Paper: Reddi, Toelle, Peters, Chalvatzaki, D'Eramo, "Robust Adversarial Reinforcement
Learning via Bounded Rationality Curricula" (ICLR 2024); official code
AryamanReddi99/quantal-adversarial-rl (PyTorch, mushroom-rl, dm_control). Notes on
the reference setup: ``../shared/specs/qarl.md``. Backbone: SAC (``algos/sac.py``).

The game
--------
Two players on a zero-sum task (``envs/adversarial.py``: agent 0 the protagonist with
reward r, agent 1 the adversary with -r, a bounded force on a named body). Both are
SAC learners with their own parameters (SAC's ``agents="independent"``). With an
entropy bonus alpha_adv for the adversary (and the protagonist's own, auto-tuned one)
the solution of the entropy-regularized game is a quantal response equilibrium (QRE):

    pi_adv(a | o) ~ exp(Q_adv(o, a) / alpha_adv)

alpha_adv -> 0 is a fully rational adversary (RARL's Nash setting), a large alpha_adv a
nearly random one. QARL starts with an easy, boundedly rational adversary and makes it
more rational as the protagonist copes.

Per-episode temperature (the ``envs.temperature.TemperatureObs`` wrapper)
------------------------------------------------------------------------
At the start of every episode of every parallel environment a temperature is drawn,
alpha ~ p_k(alpha), and kept fixed for the episode; ``log alpha`` is appended to *both*
agents' observations (``obs_dim + 1``). The adversary's SAC uses this temperature in
its actor loss and its soft target (SAC's ``temperature_from_obs=(1,)``): for a
transition (o, a, r, o'),

    L_pi_adv = E[alpha(o) log pi(a~|o) - min_j Q_j(o, a~)]
    y_adv    = r_adv + gamma (1 - term) (min_j Qbar_j(o', a') - alpha(o') log pi(a'|o'))

(alpha(o') = alpha(o) within an episode; a truncated episode's final observation keeps
its own alpha). The protagonist's temperature is SAC's usual auto-tuned one.

Curriculum: p_k(alpha) = Gamma(shape k, rate theta)
----------------------------------------------------
    log p_k(alpha) = k log theta + (k - 1) log alpha - theta alpha - log Gamma(k)
    KL(Gamma(k1, t1) || Gamma(k2, t2)) = (k1 - k2) psi(k1) - log Gamma(k1) + log Gamma(k2)
                                         + k2 (log t1 - log t2) + k1 (t2 - t1) / t1
(psi: digamma; with equal rates the last two terms vanish). Finished episodes push
(alpha_i, J_i, k_i) into a fixed-size ring buffer in the train state (J_i: the
protagonist's *discounted* return sum_t gamma^t r_t with SAC's gamma, as the reference
code's compute_J; k_i: the shape alpha_i was drawn from). Every ``update_every`` new
pairs, the shape is updated by

    k_new = argmin_k KL(p_k || p_target)
            s.t.  KL(p_k || p_k_old) <= eps,
                  J_hat(k) = sum_i w_i(k) J_i / sum_i w_i(k) >= xi,   w_i(k) = p_k(alpha_i) / p_{k_i}(alpha_i)

only if J_hat(k_old) >= xi (otherwise k stays). The solve is continuous in k
(``self_paced_update``): with equal rates the objective falls monotonically toward
k_target, so the answer is the feasible k closest to it. The KL constraint is an
interval [k_kl, k_old] whose end k_kl is found by bisection; the performance constraint
is followed from k_old toward k_kl (a local solve, as the reference's trust-region
solver started at k_old): ``grid_size`` points bracket its first violation and
bisection on J_hat(k) - xi places the boundary to float precision.

Threshold xi (``threshold``, ``threshold_fraction``, ``THRESHOLD_FRACTIONS``): on the
discounted return, ``xi = D (lo + f (hi - lo))`` with D = sum_{t<T} gamma^t and the
task's per-step reward bounds ``reward_range = (lo, hi)`` (``threshold_for``). For a
reward in [0, 1] that is f times the maximum discounted return. The reference's
values out of a maximum of about 99 (gamma 0.99): cartpole, cheetah and walker 10
(f = 0.1), hopper 1 (f = 0.01); the defaults here use the same fractions
(adv:cartpole xi = 9.93, adv:cheetah 10.0, adv:hopper 1.0) and f = 0.1 for the tasks the
reference does not have (adv:pendulum, adv:pointmass).

Variants (``curriculum``)
-------------------------
- ``"gamma"``: the self-paced Gamma curriculum above (QARL).
- ``"linear"``: no feedback; the shape (hence the mean temperature k / theta) falls
  linearly from ``init_shape`` to ``target_shape`` over the first ``linear_fraction`` of
  the iterations; alpha is still drawn from Gamma(k, theta).
- ``"point"``: a point (Dirac) distribution at the mean, alpha = k / theta; importance
  weights do not exist for a Dirac, so the performance test uses the plain mean of the
  recent returns, and the step is the same KL trust region on the shape.
- ``"none"``: the shape stays at ``target_shape`` from the start (Gamma(1, theta) draws).
- ``"fixed"``: alpha = k_target / theta in every episode (the best-response adversary of
  the evaluation).
- ``"auto"``: RARL as in the reference code (registered as ``"rarl"``): the adversary is
  ordinary SAC with its own auto-tuned temperature (target entropy -|A|) and no
  temperature input; no curriculum.
- ``adversary=False``: the SAC baseline (the adversary's force is scaled by 0; the
  adversary learns nothing, the protagonist learns in every iteration).

Temperature input (``temperature_inputs``): which players see log alpha. Default: both
with a temperature curriculum, neither with ``"auto"`` or without adversary. A player
without it sees 0 in that slot (the observation keeps its size, so players from runs
with and without the input can meet in cross play).

Alternation
-----------
Phases alternate: the adversary learns (protagonist frozen through SAC's
``train_mask``; its parameters, targets and optimizer state are bit-identical across the
phase), then the protagonist learns (adversary frozen), each for ``phase_length``
finished episodes (summed over the parallel environments; ``phase_unit="episodes"``)
or iterations (``phase_unit="iterations"``). Both players always act; the first phase
is the adversary's, as in the paper.

Defaults and deviations
-----------------------
- Paper values: theta = 1000, k from 50 (mean 0.05) to 1 (mean 0.001), KL bound 0.5,
  about 30 pairs per update, 3 x 256 ReLU networks, actor lr 1e-4, critic and
  temperature lr 3e-4, batch 256, replay start 3000, tau 0.005, log-std in [-20, 2],
  one gradient step per 3 environment steps (here 4 envs x 3 steps -> 4 steps), 5
  episodes per phase.
- The paper samples 5 temperatures per iteration and plays one episode per temperature
  in each phase; here every episode of every environment draws its own (episodes run
  across phase boundaries in the parallel environments).
- Every finished episode (both phases) is an (alpha, J) pair; the ring buffer is not
  emptied after an update (the reference empties it), its pairs are reweighted by their
  own drawing shape k_i (exact importance weights instead of assuming all came from
  k_old). Weights are self-normalized (the reference's are not).
- The temperature enters the observation as log alpha (well scaled: -3 at k = 50,
  -7 at k = 1) rather than alpha.
- Evaluation (``algos.qarl_eval``: ``evaluate_protagonist``, ``robustness_grid``) fixes the adversary's
  temperature to the target mean k_target / theta, the most rational level trained for.
  The stress grid is the task's (``stress_axes``: cart-pole's pole mass 0.1-20 kg x cart
  mass 0.5-5 kg, as the reference's 1-20 kg pole grid; mass x friction elsewhere);
  ``grid_spread`` = (max - min) / mean says whether the grid tells policies apart.
- Best response (``algos.qarl_eval``: ``best_response_algo``, ``train_best_response``): a fresh SAC adversary
  at the target temperature trains for a fixed budget against each frozen protagonist
  (which acts with its stochastic policy during that training, greedily in the
  evaluation); the protagonist's return against it is a worst-case estimate that does
  not depend on how good the run's own adversary became.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from algos import sac
from envs.adversarial import with_params
from envs.temperature import TemperatureObs
from marl import config as cfg
from marl.distributions import gamma_kl, gamma_log_prob
from marl.types import Algorithm

THRESHOLD_FRACTIONS = {
    "adv:cartpole": 0.1,
    "adv:cheetah": 0.1,
    "adv:hopper": 0.01,
    "adv:pendulum": 0.1,
    "adv:pointmass": 0.1,
}
"""Default performance thresholds xi, as a fraction of each task's discounted return range
(see :func:`threshold_for` and the module docstring)."""


def max_discounted_return(reward_per_step: float, gamma: float, horizon: int) -> float:
    """sum_{t < horizon} gamma^t r: the discounted return of a constant per-step reward."""
    return float(reward_per_step * (1.0 - gamma**horizon) / (1.0 - gamma) if gamma < 1 else reward_per_step * horizon)


def threshold_for(env, gamma: float, fraction: float) -> float:
    """xi = D (lo + fraction (hi - lo)), D = sum_{t < T} gamma^t: ``fraction`` of the way
    from the lowest to the highest discounted return a full episode can earn, with the
    task's per-step reward bounds ``env.unwrapped.reward_range = (lo, hi)``. For rewards
    in [0, 1] this is ``fraction`` times the maximum discounted return (cartpole: 99.3)."""
    lo, hi = env.unwrapped.reward_range
    return max_discounted_return(lo + fraction * (hi - lo), gamma, env.spec.max_steps)


CURRICULA = ["gamma", "linear", "point", "none", "fixed", "auto"]


# ----------------------------------------------------------------------------- curriculum state
@struct.dataclass
class Curriculum:
    """The temperature distribution and the recent (alpha, return) pairs (ring buffer, ``[N]``)."""

    shape: jax.Array  # [] current Gamma shape k
    log_alpha: jax.Array  # [N] episode temperatures (log)
    ret: jax.Array  # [N] protagonist returns
    drawn_shape: jax.Array  # [N] the shape each temperature was drawn from
    pos: jax.Array  # [] int32 next slot
    size: jax.Array  # [] int32 valid pairs
    fresh: jax.Array  # [] int32 pairs since the last curriculum update
    performance: jax.Array  # [] the last estimate J_hat(k_old)
    threshold: jax.Array  # [] xi
    kl_bound: jax.Array  # [] eps


def curriculum_init(shape, capacity: int, threshold, kl_bound) -> Curriculum:
    f = lambda v: jnp.asarray(v, jnp.float32)
    z = jnp.zeros((capacity,), jnp.float32)
    i0 = jnp.zeros((), jnp.int32)
    return Curriculum(f(shape), z, z, z, i0, i0, i0, f(0.0), f(threshold), f(kl_bound))


def curriculum_push(cur: Curriculum, log_alpha, ret, drawn_shape, mask) -> Curriculum:
    """Append the pairs where ``mask`` (all ``[n]``), in order; more than N: the last N stay."""
    capacity = cur.ret.shape[0]
    mask = mask.astype(bool)
    rank = jnp.cumsum(mask) - 1
    n = mask.sum().astype(jnp.int32)
    keep = mask & (rank >= n - capacity)
    idx = jnp.where(keep, (cur.pos + rank) % capacity, capacity)  # capacity: dropped
    put = lambda buf, x: buf.at[idx].set(x.astype(buf.dtype), mode="drop")
    return cur.replace(
        log_alpha=put(cur.log_alpha, log_alpha),
        ret=put(cur.ret, ret),
        drawn_shape=put(cur.drawn_shape, drawn_shape),
        pos=((cur.pos + n) % capacity).astype(jnp.int32),
        size=jnp.minimum(cur.size + n, capacity).astype(jnp.int32),
        fresh=(cur.fresh + n).astype(jnp.int32),
    )


def importance_weighted_return(cur: Curriculum, shapes, rate):
    """J_hat(k) for each k in ``shapes [G]``: self-normalized importance-weighted mean
    of the buffered returns (weights p_k(alpha_i) / p_{k_i}(alpha_i)) -> ``[G]``."""
    valid = jnp.arange(cur.ret.shape[0]) < cur.size
    alpha = jnp.exp(cur.log_alpha)
    logw = gamma_log_prob(alpha, shapes[:, None], rate) - gamma_log_prob(alpha, cur.drawn_shape, rate)
    logw = jnp.where(valid, logw, -jnp.inf)
    w = jax.nn.softmax(logw, axis=-1)
    return jnp.where(cur.size > 0, (w * cur.ret).sum(-1), -jnp.inf)


def kl_trust_bound(k_old, k_target, rate, kl_bound, iters: int = 40):
    """The smallest k in [k_target, k_old] with KL(p_k || p_k_old) <= kl_bound (the KL grows
    as k moves away from k_old, so the trust region toward the target is [bound, k_old]);
    bisection in log k, ``iters`` halvings of an interval at most log(k_old / k_target) wide."""
    lo, hi = jnp.log(jnp.minimum(k_target, k_old)), jnp.log(k_old)
    inside = lambda lk: gamma_kl(jnp.exp(lk), rate, k_old, rate) <= kl_bound

    def halve(_, b):
        lo, hi = b  # lo outside, hi inside
        mid = 0.5 * (lo + hi)
        return jnp.where(inside(mid), lo, mid), jnp.where(inside(mid), mid, hi)

    _, hi_in = jax.lax.fori_loop(0, iters, halve, (lo, hi))
    return jnp.exp(jnp.where(inside(lo), lo, hi_in))


def self_paced_update(
    cur: Curriculum, rate: float, target_shape: float, grid_size: int = 64, importance: bool = True, iters: int = 40
):
    """The constrained curriculum step, solved over the continuous shape; returns
    (new shape, J_hat(k_old)).

    min_k KL(p_k || p_target) s.t. KL(p_k || p_k_old) <= eps and J_hat(k) >= xi: with
    equal rates the objective falls monotonically as k approaches k_target, so the solution
    is the feasible k closest to k_target. The KL constraint gives the interval
    [k_kl, k_old] (:func:`kl_trust_bound`, bisection). Along it, starting from k_old (a
    local solve, as the reference's trust-region solver started at the current shape),
    the performance constraint is followed toward k_kl: ``grid_size`` log-spaced points
    bracket the first violation, and bisection on J_hat(k) - xi inside the bracket places
    the boundary to ``iters`` halvings (J_hat is smooth in k). ``importance=False`` (the
    point variant) replaces J_hat by the plain mean return (then the KL bound alone
    decides). Nothing feasible (J_hat(k_old) < xi, or no pairs): the old shape.
    """
    k_old = cur.shape
    if importance:
        perf_of = lambda ks: importance_weighted_return(cur, jnp.atleast_1d(ks), rate).reshape(jnp.shape(ks))
        perf_old = perf_of(k_old)
    else:
        valid = jnp.arange(cur.ret.shape[0]) < cur.size
        perf_old = jnp.where(cur.size > 0, (cur.ret * valid).sum() / jnp.maximum(cur.size, 1), -jnp.inf)
        perf_of = lambda ks: jnp.full(jnp.shape(ks), perf_old)
    k_kl = kl_trust_bound(k_old, target_shape, rate, cur.kl_bound, iters)
    t = jnp.linspace(0.0, 1.0, grid_size)
    grid = jnp.exp(jnp.log(k_kl) + t * (jnp.log(k_old) - jnp.log(k_kl))).at[-1].set(k_old)  # [G]
    ok = perf_of(grid) >= cur.threshold
    # first index of the feasible run that ends at k_old
    run_start = grid_size - jnp.argmin(jnp.concatenate([ok[::-1], jnp.zeros((1,), bool)]))
    first = jnp.clip(run_start, 0, grid_size - 1)

    def halve(_, b):
        lo, hi = b  # log k: lo infeasible, hi feasible
        mid = 0.5 * (lo + hi)
        good = perf_of(jnp.exp(mid)) >= cur.threshold
        return jnp.where(good, lo, mid), jnp.where(good, mid, hi)

    lo, hi = jnp.log(grid[jnp.maximum(first - 1, 0)]), jnp.log(grid[first])
    _, boundary = jax.lax.fori_loop(0, iters, halve, (lo, hi))
    best = jnp.where(first == 0, k_kl, jnp.exp(boundary))
    feasible = (perf_old >= cur.threshold) & (k_old > target_shape)
    return jnp.where(feasible, jnp.maximum(best, target_shape), k_old), perf_old


def linear_shape(iteration, init_shape: float, target_shape: float, horizon: float):
    """The linear curriculum: k falls from init to target over ``horizon`` iterations."""
    frac = jnp.minimum(1.0, iteration / max(1.0, horizon))
    return init_shape + frac * (target_shape - init_shape)


def next_phase(phase, count, increment, phase_length: int):
    """Alternation bookkeeping: add ``increment`` (episodes or 1 iteration) to the
    phase's ``count``; at ``phase_length`` switch phase (0 <-> 1) and restart the count."""
    count = count + increment
    switch = count >= phase_length
    return (jnp.where(switch, 1 - phase, phase).astype(jnp.int32), jnp.where(switch, 0, count).astype(jnp.int32))


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class QARLConfig(sac.SACConfig):
    """SAC's fields (defaults: the paper's) plus the curriculum and the alternation."""

    total_steps: int = 200_000
    num_envs: int = 4
    num_steps: int = 3
    train_steps: int = 4
    num_layers: int = 3
    actor_lr: float = 1e-4
    learning_starts: int = 3_000
    curriculum: Literal["gamma", "linear", "point", "none", "fixed", "auto"] = "gamma"
    """gamma (QARL) | linear | point | none (Gamma(target) from the start) | fixed (alpha = target
    mean, every episode) | auto (RARL: the adversary is plain SAC, auto-tuned, no temperature input)"""
    adversary: bool = True
    """False: the SAC baseline (adversary force scaled by 0, only the protagonist learns)"""
    gamma_rate: float = 1000.0
    init_shape: float = 50.0
    target_shape: float = 1.0
    kl_bound: float = 0.5
    threshold: Optional[float] = None
    """performance threshold xi on the protagonist's discounted return; None: from threshold_fraction"""
    threshold_fraction: Optional[float] = None
    """xi as this fraction of the task's discounted return range (threshold_for); None: THRESHOLD_FRACTIONS"""
    temperature_inputs: Optional[tuple[bool, bool]] = None
    """which players see log alpha (protagonist, adversary); None: both, or neither for curriculum
    'auto' and without adversary"""
    update_every: int = 30
    """new (alpha, return) pairs between curriculum updates"""
    history: int = 30
    """ring buffer of (alpha, return) pairs"""
    grid_size: int = 64
    linear_fraction: float = 0.8
    """linear curriculum: the fraction of the iterations over which k reaches its target"""
    phase_length: int = 5
    phase_unit: Literal["episodes", "iterations"] = "episodes"
    """episodes (summed over envs) | iterations"""

    def __post_init__(self):
        super().__post_init__()
        cfg.check_choice("curriculum", self.curriculum, CURRICULA)
        cfg.check_choice("phase_unit", self.phase_unit, ["episodes", "iterations"])
        if not isinstance(self.adversary, bool):
            raise cfg.ConfigError("adversary", self.adversary, "must be a bool")
        for f in ("update_every", "history", "grid_size", "phase_length"):
            cfg.check_positive(f, getattr(self, f), integer=True)
        for f in ("gamma_rate", "init_shape", "target_shape", "kl_bound"):
            cfg.check_positive(f, getattr(self, f))
        if self.grid_size < 2:
            raise cfg.ConfigError("grid_size", self.grid_size, "must be >= 2")
        if self.target_shape > self.init_shape:
            raise cfg.ConfigError("target_shape", self.target_shape, f"must be <= init_shape={self.init_shape}")
        cfg.check_range("linear_fraction", self.linear_fraction, 0.0, 1.0, lo_open=True)
        if self.frozen_agents:
            raise cfg.ConfigError("frozen_agents", self.frozen_agents, "must be empty: QARL's phases decide who learns")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise cfg.ConfigError("threshold", self.threshold, "must be a finite number or None")
        if self.threshold_fraction is not None:
            cfg.check_range("threshold_fraction", self.threshold_fraction, 0.0, 1.0)
        ti = self.temperature_inputs
        if ti is not None and (not isinstance(ti, tuple) or len(ti) != 2 or not all(isinstance(i, bool) for i in ti)):
            raise cfg.ConfigError("temperature_inputs", ti, "must be None or a pair of bools (protagonist, adversary)")

    @property
    def inputs(self) -> tuple[bool, bool]:
        if self.temperature_inputs is not None:
            return self.temperature_inputs
        return (False, False) if self.curriculum == "auto" or not self.adversary else (True, True)


@struct.dataclass
class QARLExt:
    curriculum: Curriculum
    phase: jax.Array  # [] int32: 0 the adversary learns, 1 the protagonist learns
    phase_count: jax.Array  # [] int32 episodes or iterations in this phase so far
    iteration: jax.Array  # [] int32


def _sac_config(config: QARLConfig) -> sac.SACConfig:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(sac.SACConfig)}
    return sac.SACConfig(
        **{**fields, "temperature_from_obs": () if config.curriculum == "auto" else (1,), "frozen_agents": ()}
    )


def threshold_of(env, config: QARLConfig) -> float:
    """The performance threshold xi on the protagonist's discounted return: ``config.threshold``,
    else ``threshold_for`` with ``config.threshold_fraction`` or the task's default fraction."""
    if config.threshold is not None:
        return float(config.threshold)
    name = env.spec.name
    fraction = config.threshold_fraction if config.threshold_fraction is not None else THRESHOLD_FRACTIONS.get(name)
    if fraction is None or not hasattr(env.unwrapped, "reward_range"):
        raise cfg.ConfigError(
            "threshold",
            None,
            f"has no default for env {name!r}; set threshold or threshold_"
            f"fraction (defaults exist for {sorted(THRESHOLD_FRACTIONS)})",
        )
    return threshold_for(env, config.gamma, fraction)


LEARNER_MASK = ((False, True), (True, False))
"""Which agent learns in each phase (agent 0: the protagonist, agent 1: the adversary)."""


class QARLParts(NamedTuple):
    """What QARL's functions share (static): the config, the SAC learner on the
    temperature-augmented env, the curriculum's start shape, threshold and rate."""

    config: QARLConfig
    sac: sac.SACParts
    init_shape: float
    threshold: float
    rate: float


def learner_mask(config: QARLConfig, phase):
    """[2] which agents learn in ``phase`` (without an adversary: the protagonist only)."""
    masks = jnp.array(LEARNER_MASK)
    return masks[phase] if config.adversary else masks[1]


def init(m: QARLParts, key) -> sac.TrainState:
    config = m.config
    state = m.sac.algorithm.init(key)
    ext = QARLExt(
        curriculum_init(m.init_shape, config.history, m.threshold, config.kl_bound),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )
    return state.replace(train_mask=learner_mask(config, 0), ext=ext)


def next_shape(m: QARLParts, cur: Curriculum, iteration):
    """The curriculum's next shape k (linear schedule, self-paced step, or fixed) and the
    performance estimate it used."""
    config = m.config
    if config.curriculum == "linear":
        shape = linear_shape(
            iteration, config.init_shape, config.target_shape, config.linear_fraction * config.num_updates
        )
        return cur.replace(shape=shape), cur.performance
    if config.curriculum in ("none", "fixed", "auto"):
        return cur, cur.performance
    due = cur.fresh >= config.update_every
    new, perf = self_paced_update(
        cur, m.rate, config.target_shape, config.grid_size, importance=config.curriculum == "gamma"
    )
    cur = cur.replace(
        shape=jnp.where(due, new, cur.shape),
        fresh=jnp.where(due, 0, cur.fresh),
        performance=jnp.where(due, perf, cur.performance),
    )
    return cur, cur.performance


def curriculum_metrics(m: QARLParts, state: sac.TrainState, metrics: dict, cur: Curriculum, perf, ended_la, done):
    """The temperatures and the curriculum's shape, mean temperature and performance."""
    n_done = done.sum()
    adv_alpha = (
        jnp.exp(state.params.log_alpha[1])
        if m.config.curriculum == "auto"
        else jnp.exp(state.env_state.log_alpha).mean()
    )
    metrics["alpha_agent1"] = adv_alpha
    metrics["alpha"] = (metrics["alpha_agent0"] + adv_alpha) / 2
    metrics["curriculum_shape"] = cur.shape
    metrics["curriculum_mean_alpha"] = cur.shape / m.rate
    metrics["curriculum_performance"] = jnp.where(jnp.isfinite(perf), perf, 0.0)
    metrics["episode_alpha"] = (jnp.exp(ended_la) * done).sum() / jnp.maximum(n_done.astype(jnp.int32), 1)
    return metrics


def update(m: QARLParts, state: sac.TrainState):
    """One SAC iteration, then the curriculum (ended episodes' temperatures and discounted
    returns) and the learning phase (who trains next)."""
    config = m.config
    ext: QARLExt = state.ext
    state, metrics, ro = m.sac.update_with_rollout(state)
    done, info = ro.done.reshape(-1), ro.info
    ended_la = info["episode_log_alpha"].reshape(-1)
    cur = curriculum_push(
        ext.curriculum,
        ended_la,
        info["episode_discounted_return"].reshape(-1),
        info["episode_shape"].reshape(-1),
        done,
    )
    iteration = ext.iteration + 1
    cur, perf = next_shape(m, cur, iteration)
    env_state = state.env_state.replace(shape=jnp.full((config.num_envs,), cur.shape, jnp.float32))
    n_done = done.sum().astype(jnp.int32)
    phase, count = next_phase(
        ext.phase, ext.phase_count, n_done if config.phase_unit == "episodes" else 1, config.phase_length
    )
    state = state.replace(
        env_state=env_state, train_mask=learner_mask(config, phase), ext=QARLExt(cur, phase, count, iteration)
    )
    metrics = curriculum_metrics(m, state, metrics, cur, perf, ended_la, done)
    metrics["phase"] = ext.phase.astype(jnp.float32)  # the phase this iteration learned in
    return state, metrics


def make(env, config: QARLConfig, name: str = "qarl") -> Algorithm:
    """QARL (or RARL, SAC) on ``env``: SAC on the temperature-augmented env, bound with
    the curriculum's functions above."""
    spec = env.spec
    if spec.num_agents != 2 or spec.discrete:
        raise cfg.ConfigError("env", spec.name, f"{name} needs a two-player continuous adversarial task (adv:<task>)")
    threshold = threshold_of(env, config)
    if not config.adversary:
        env = with_params(env, adversary_scale=0.0)
    k0 = config.init_shape if config.curriculum in ("gamma", "linear", "point") else config.target_shape
    tenv = TemperatureObs(
        env,
        k0,
        config.gamma_rate,
        deterministic=config.curriculum in ("point", "fixed"),
        gamma=config.gamma,
        inputs=config.inputs,
    )
    parts = sac.make_parts(tenv, _sac_config(config), name=name)
    m = QARLParts(config, parts, k0, threshold, config.gamma_rate)
    base = parts.algorithm
    return Algorithm(
        name,
        config,
        tenv,
        functools.partial(init, m),
        functools.partial(update, m),
        base.act,
        base.initial_carry,
        base.env_steps_per_update,
    )
