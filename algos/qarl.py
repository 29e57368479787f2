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

Per-episode temperature (the ``TemperatureObs`` wrapper)
-------------------------------------------------------
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
protagonist's return, k_i: the shape alpha_i was drawn from). Every ``update_every``
new pairs, the shape is updated by

    k_new = argmin_{k in grid} KL(p_k || p_target)
            s.t.  KL(p_k || p_k_old) <= eps,
                  J_hat(k) = sum_i w_i(k) J_i / sum_i w_i(k) >= xi,   w_i(k) = p_k(alpha_i) / p_{k_i}(alpha_i)

over a grid of ``grid_size`` shapes log-spaced in [k_target, k_old] (k_old included),
and only if J_hat(k_old) >= xi; otherwise (nothing feasible) k stays. With equal
rates KL(p_k || p_target) grows with |k - k_target|, so this is the smallest feasible k.

Variants (``curriculum``)
-------------------------
- ``"gamma"``: the self-paced Gamma curriculum above (QARL).
- ``"linear"``: no feedback; the shape (hence the mean temperature k / theta) falls
  linearly from ``init_shape`` to ``target_shape`` over the first ``linear_fraction`` of
  the iterations; alpha is still drawn from Gamma(k, theta).
- ``"point"``: a point (Dirac) distribution at the mean, alpha = k / theta; importance
  weights do not exist for a Dirac, so the performance test uses the plain mean of the
  recent returns, and the step is the same KL trust region on the shape.
- ``"none"``: the shape stays at ``target_shape`` from the start: RARL with a nearly
  rational adversary (registered as ``"rarl"``).
- ``adversary=False``: the SAC baseline (the adversary's force is scaled by 0; the
  adversary learns nothing, the protagonist learns in every iteration).

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
- Thresholds xi: the paper's (cheetah 10, walker 10, hopper 1, cartpole 10) are for
  dm_control rewards. The tasks here have other scales, so the defaults
  (``THRESHOLDS``) are about half of what a good protagonist earns against a weak
  adversary: adv:cartpole 250 (reward 1 per step, 500 steps), adv:pendulum -400
  (random play about -1200, solved about -150), adv:pointmass -60 (random about -200,
  reaching the goal in about 40 steps about -30), adv:cheetah 100 (dm_control-style
  reward in [0, 1] per step, 1000 steps), adv:hopper 300 (alive bonus 1 per step).
  Any other task needs ``threshold``.
- The paper samples 5 temperatures per iteration and plays one episode per temperature
  in each phase; here every episode of every environment draws its own (episodes run
  across phase boundaries in the parallel environments).
- Every finished episode (both phases) is an (alpha, J) pair; the ring buffer is not
  emptied after an update, its pairs are reweighted by their own drawing shape k_i
  (exact importance weights instead of assuming all came from k_old). Weights are
  self-normalized.
- The temperature enters the observation as log alpha (well scaled: -3 at k = 50,
  -7 at k = 1) rather than alpha.
- Evaluation (``evaluate_protagonist``, ``robustness_grid``) fixes the adversary's
  temperature to the target mean k_target / theta, the most rational level trained for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.scipy.special import digamma, gammaln

from algos import sac
from envs.adversarial import with_params
from envs.wrappers import Wrapper
from marl import config as cfg
from marl.types import Algorithm

THRESHOLDS = {"adv:cartpole": 250.0, "adv:pendulum": -400.0, "adv:pointmass": -60.0,
              "adv:cheetah": 100.0, "adv:hopper": 300.0}
"""Default performance thresholds xi per environment (see the module docstring)."""

CURRICULA = ["gamma", "linear", "point", "none"]
LOG_ALPHA_MIN = float(np.log(1e-8))


# ----------------------------------------------------------------------------- Gamma math
def gamma_kl(k1, rate1, k2, rate2):
    """KL(Gamma(k1, rate1) || Gamma(k2, rate2)) (shape, rate), closed form; broadcasts."""
    return ((k1 - k2) * digamma(k1) - gammaln(k1) + gammaln(k2)
            + k2 * (jnp.log(rate1) - jnp.log(rate2)) + k1 * (rate2 - rate1) / rate1)


def gamma_log_prob(alpha, k, rate):
    """log density of Gamma(k, rate) at alpha > 0; broadcasts."""
    return k * jnp.log(rate) + (k - 1) * jnp.log(alpha) - rate * alpha - gammaln(k)


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
    return cur.replace(log_alpha=put(cur.log_alpha, log_alpha), ret=put(cur.ret, ret),
                       drawn_shape=put(cur.drawn_shape, drawn_shape),
                       pos=((cur.pos + n) % capacity).astype(jnp.int32),
                       size=jnp.minimum(cur.size + n, capacity).astype(jnp.int32),
                       fresh=(cur.fresh + n).astype(jnp.int32))


def importance_weighted_return(cur: Curriculum, shapes, rate):
    """J_hat(k) for each k in ``shapes [G]``: self-normalized importance-weighted mean
    of the buffered returns (weights p_k(alpha_i) / p_{k_i}(alpha_i)) -> ``[G]``."""
    valid = jnp.arange(cur.ret.shape[0]) < cur.size
    alpha = jnp.exp(cur.log_alpha)
    logw = gamma_log_prob(alpha, shapes[:, None], rate) - gamma_log_prob(alpha, cur.drawn_shape, rate)
    logw = jnp.where(valid, logw, -jnp.inf)
    w = jax.nn.softmax(logw, axis=-1)
    return jnp.where(cur.size > 0, (w * cur.ret).sum(-1), -jnp.inf)


def candidate_shapes(k_old, k_target, grid_size: int):
    """``[G]`` shapes log-spaced from k_target to k_old (both included)."""
    t = jnp.linspace(0.0, 1.0, grid_size)
    lo, hi = jnp.log(jnp.minimum(k_target, k_old)), jnp.log(k_old)
    return jnp.exp(lo + t * (hi - lo)).at[-1].set(k_old)


def self_paced_update(cur: Curriculum, rate: float, target_shape: float, grid_size: int = 64,
                      importance: bool = True):
    """The constrained curriculum step; returns (new shape, J_hat(k_old)).

    ``importance=False`` (the point variant) replaces J_hat by the plain mean return.
    Nothing feasible (or J_hat(k_old) < xi, or no pairs): the old shape.
    """
    k_old = cur.shape
    cands = candidate_shapes(k_old, target_shape, grid_size)
    if importance:
        perf = importance_weighted_return(cur, cands, rate)
        perf_old = perf[-1]
    else:
        valid = jnp.arange(cur.ret.shape[0]) < cur.size
        perf_old = jnp.where(cur.size > 0, (cur.ret * valid).sum() / jnp.maximum(cur.size, 1), -jnp.inf)
        perf = jnp.full(cands.shape, perf_old)
    feasible = (gamma_kl(cands, rate, k_old, rate) <= cur.kl_bound) & (perf >= cur.threshold)
    objective = jnp.where(feasible, gamma_kl(cands, rate, target_shape, rate), jnp.inf)
    best = cands[jnp.argmin(objective)]
    ok = feasible.any() & (perf_old >= cur.threshold)
    return jnp.where(ok, best, k_old), perf_old


def linear_shape(iteration, init_shape: float, target_shape: float, horizon: float):
    """The linear curriculum: k falls from init to target over ``horizon`` iterations."""
    frac = jnp.minimum(1.0, iteration / max(1.0, horizon))
    return init_shape + frac * (target_shape - init_shape)


def next_phase(phase, count, increment, phase_length: int):
    """Alternation bookkeeping: add ``increment`` (episodes or 1 iteration) to the
    phase's ``count``; at ``phase_length`` switch phase (0 <-> 1) and restart the count."""
    count = count + increment
    switch = count >= phase_length
    return (jnp.where(switch, 1 - phase, phase).astype(jnp.int32),
            jnp.where(switch, 0, count).astype(jnp.int32))


# ----------------------------------------------------------------------------- the wrapper
@struct.dataclass
class TemperatureState:
    inner: Any
    log_alpha: jax.Array  # [] this episode's adversary temperature (log)
    drawn_shape: jax.Array  # [] the shape it was drawn from
    shape: jax.Array  # [] the shape the next episode's temperature is drawn from


class TemperatureObs(Wrapper):
    """Draws a temperature per episode from Gamma(shape, rate) (or its mean, with
    ``deterministic``) and appends its log to every agent's observation.

    Goes outside ``EpisodeStats(AutoReset(env))``. ``info`` gains ``episode_log_alpha``
    and ``episode_shape``: the temperature of the episode that ended at this step and
    the shape it was drawn from (read where ``done``). ``final_obs`` carries the ended
    episode's temperature. The shape for new episodes is ``state.shape`` (an
    algorithm may set it); the initial one is ``self.shape``.
    """

    def __init__(self, env, shape: float, rate: float, deterministic: bool = False):
        super().__init__(env)
        self.shape, self.rate, self.deterministic = float(shape), float(rate), bool(deterministic)
        self.spec = dataclasses.replace(env.spec, obs_dim=env.spec.obs_dim + 1)

    def with_temperature(self, shape: Optional[float] = None, deterministic: Optional[bool] = None):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        if shape is not None:
            new.shape = float(shape)
        if deterministic is not None:
            new.deterministic = bool(deterministic)
        return new

    def _draw(self, key, shape):
        if self.deterministic:
            alpha = shape / self.rate
        else:
            alpha = jax.random.gamma(key, shape) / self.rate
        return jnp.maximum(jnp.log(alpha), LOG_ALPHA_MIN).astype(jnp.float32)

    @staticmethod
    def _append(obs, log_alpha):
        return jnp.concatenate([obs, jnp.broadcast_to(log_alpha, obs.shape[:-1] + (1,)).astype(obs.dtype)], -1)

    def _ts(self, ts, log_alpha, ended_log_alpha, ended_shape):
        info = dict(ts.info, episode_log_alpha=ended_log_alpha, episode_shape=ended_shape)
        if "final_obs" in info:
            info["final_obs"] = self._append(info["final_obs"], ended_log_alpha)
        return ts._replace(obs=self._append(ts.obs, log_alpha), info=info)

    def reset(self, key):
        k_env, k_alpha = jax.random.split(key)
        inner, ts = self._env.reset(k_env)
        shape = jnp.asarray(self.shape, jnp.float32)
        la = self._draw(k_alpha, shape)
        return TemperatureState(inner, la, shape, shape), self._ts(ts, la, la, shape)

    def step(self, key, state: TemperatureState, action):
        k_env, k_alpha = jax.random.split(key)
        inner, ts = self._env.step(k_env, state.inner, action)
        la = jnp.where(ts.done, self._draw(k_alpha, state.shape), state.log_alpha)
        drawn = jnp.where(ts.done, state.shape, state.drawn_shape)
        out = self._ts(ts, la, state.log_alpha, state.drawn_shape)
        return TemperatureState(inner, la, drawn, state.shape), out


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
    curriculum: str = "gamma"
    """gamma (QARL) | linear | point | none (RARL: the target temperature from the start)"""
    adversary: bool = True
    """False: the SAC baseline (adversary force scaled by 0, only the protagonist learns)"""
    gamma_rate: float = 1000.0
    init_shape: float = 50.0
    target_shape: float = 1.0
    kl_bound: float = 0.5
    threshold: Optional[float] = None
    """performance threshold xi; None: THRESHOLDS[env name]"""
    update_every: int = 30
    """new (alpha, return) pairs between curriculum updates"""
    history: int = 30
    """ring buffer of (alpha, return) pairs"""
    grid_size: int = 64
    linear_fraction: float = 0.8
    """linear curriculum: the fraction of the iterations over which k reaches its target"""
    phase_length: int = 5
    phase_unit: str = "episodes"
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


@struct.dataclass
class QARLExt:
    curriculum: Curriculum
    phase: jax.Array  # [] int32: 0 the adversary learns, 1 the protagonist learns
    phase_count: jax.Array  # [] int32 episodes or iterations in this phase so far
    iteration: jax.Array  # [] int32


def _sac_config(config: QARLConfig) -> sac.SACConfig:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(sac.SACConfig)}
    return sac.SACConfig(**{**fields, "temperature_from_obs": (1,), "frozen_agents": ()})


def make(env, config: QARLConfig, name: str = "qarl") -> Algorithm:
    spec = env.spec
    if spec.num_agents != 2 or spec.discrete:
        raise cfg.ConfigError("env", spec.name, f"{name} needs a two-player continuous adversarial task (adv:<task>)")
    threshold = config.threshold if config.threshold is not None else THRESHOLDS.get(spec.name)
    if threshold is None:
        raise cfg.ConfigError("threshold", None, f"has no default for env {spec.name!r}; set a number "
                                                 f"(defaults exist for {sorted(THRESHOLDS)})")
    if not config.adversary:
        env = with_params(env, adversary_scale=0.0)
    rate = config.gamma_rate
    k0 = config.target_shape if config.curriculum == "none" else config.init_shape
    tenv = TemperatureObs(env, k0, rate, deterministic=config.curriculum == "point")
    base = sac.make(tenv, _sac_config(config), name=name, expose_rollout=True)
    E = config.num_envs
    learner_mask = jnp.array([[False, True], [True, False]])  # by phase
    num_updates = config.num_updates

    def init(key) -> sac.TrainState:
        state = base.init(key)
        ext = QARLExt(curriculum_init(k0, config.history, threshold, config.kl_bound),
                      jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
        return state.replace(train_mask=learner_mask[0] if config.adversary else learner_mask[1], ext=ext)

    def next_shape(cur: Curriculum, iteration):
        if config.curriculum == "linear":
            shape = linear_shape(iteration, config.init_shape, config.target_shape,
                                 config.linear_fraction * num_updates)
            return cur.replace(shape=shape), cur.performance
        if config.curriculum == "none":
            return cur, cur.performance
        due = cur.fresh >= config.update_every
        new, perf = self_paced_update(cur, rate, config.target_shape, config.grid_size,
                                      importance=config.curriculum == "gamma")
        cur = cur.replace(shape=jnp.where(due, new, cur.shape), fresh=jnp.where(due, 0, cur.fresh),
                          performance=jnp.where(due, perf, cur.performance))
        return cur, cur.performance

    def update(state: sac.TrainState):
        ext: QARLExt = state.ext
        state, metrics = base.update(state)
        ro = metrics.pop("rollout")
        done = ro["done"].reshape(-1)
        info = ro["info"]
        ended_la = info["episode_log_alpha"].reshape(-1)
        cur = curriculum_push(ext.curriculum, ended_la, ro["return"][..., 0].reshape(-1),
                              info["episode_shape"].reshape(-1), done)
        iteration = ext.iteration + 1
        cur, perf = next_shape(cur, iteration)
        env_state = state.env_state.replace(shape=jnp.full((E,), cur.shape, jnp.float32))

        n_done = done.sum().astype(jnp.int32)
        phase, count = next_phase(ext.phase, ext.phase_count, n_done if config.phase_unit == "episodes" else 1,
                                  config.phase_length)
        mask = learner_mask[phase] if config.adversary else learner_mask[1]
        state = state.replace(env_state=env_state, train_mask=mask,
                              ext=QARLExt(cur, phase, count, iteration))

        adv_alpha = jnp.exp(state.env_state.log_alpha).mean()
        metrics["alpha_agent1"] = adv_alpha
        metrics["alpha"] = (metrics["alpha_agent0"] + adv_alpha) / 2
        metrics["curriculum_shape"] = cur.shape
        metrics["curriculum_mean_alpha"] = cur.shape / rate
        metrics["curriculum_performance"] = jnp.where(jnp.isfinite(perf), perf, 0.0)
        metrics["episode_alpha"] = (jnp.exp(ended_la) * done).sum() / jnp.maximum(n_done, 1)
        metrics["phase"] = ext.phase.astype(jnp.float32)  # the phase this iteration learned in
        return state, metrics

    return Algorithm(name, config, tenv, init, update, base.act, base.initial_carry, base.env_steps_per_update)


# ----------------------------------------------------------------------------- evaluation
# masses 0.354 .. 2.828 (log-spaced, 1 in the middle), frictions 0 .. 5
DEFAULT_MASSES = tuple(float(x) for x in np.round(2.0 ** np.linspace(-1.5, 1.5, 11), 3))
DEFAULT_FRICTIONS = tuple(float(x) for x in np.round(np.linspace(0.0, 5.0, 11), 3))


def eval_env(algo: Algorithm, adversary: bool = True, mass=1.0, friction=1.0, deterministic: bool = True):
    """The training environment with the adversary at its target temperature (its mean
    with ``deterministic``), physics multipliers set, the adversary on or off (scale 0)."""
    env = algo.env.with_temperature(shape=algo.config.target_shape, deterministic=deterministic)
    return with_params(env, mass_scale=mass, friction_scale=friction, adversary_scale=1.0 if adversary else 0.0)


def protagonist_returns(algo: Algorithm, params, env, key, num_episodes: int, greedy: bool = True):
    """``[num_episodes]`` protagonist returns of the first episode in each of
    ``num_episodes`` parallel copies of ``env`` (``spec.max_steps`` steps)."""
    n = num_episodes
    k_reset, k_run = jax.random.split(key)
    env_state, ts = jax.vmap(env.reset)(jax.random.split(k_reset, n))

    def step(c, key):
        env_state, ts, finished, ret = c
        k_act, k_env = jax.random.split(key)
        action, _ = algo.act(params, ts, None, k_act, greedy)
        env_state, ts = jax.vmap(env.step)(jax.random.split(k_env, n), env_state, action)
        ret = ret + jnp.where(finished, 0.0, ts.reward[:, 0])
        return (env_state, ts, finished | ts.done, ret), None

    init = (env_state, ts, jnp.zeros((n,), bool), jnp.zeros((n,), jnp.float32))
    (_, _, _, ret), _ = jax.lax.scan(step, init, jax.random.split(k_run, env.spec.max_steps))
    return ret


def evaluate_protagonist(algo: Algorithm, params, key, num_episodes: int = 16, adversary: bool = True,
                         greedy: bool = True):
    """Mean protagonist return against the (final) adversary in ``params``, or without
    adversary (``adversary=False``: its force scaled by 0). Jittable; vmap over seeds."""
    env = eval_env(algo, adversary=adversary)
    return protagonist_returns(algo, params, env, key, num_episodes, greedy).mean()


def robustness_grid(algo: Algorithm, params, key, masses: Sequence[float] = DEFAULT_MASSES,
                    frictions: Sequence[float] = DEFAULT_FRICTIONS, num_episodes: int = 1,
                    greedy: bool = True):
    """``[M, F]`` mean protagonist return without adversary on a mass x friction grid,
    ``num_episodes`` per cell, all cells in one vmapped rollout over the physics
    parameters (``with_params`` with traced values). Every cell uses the same ``key``
    (the same initial states): differences between cells come from the physics only.
    Jittable; vmap over seeds."""
    m, f = jnp.meshgrid(jnp.asarray(masses, jnp.float32), jnp.asarray(frictions, jnp.float32), indexing="ij")

    def cell(mass, friction):
        env = eval_env(algo, adversary=False, mass=mass, friction=friction)
        return protagonist_returns(algo, params, env, key, num_episodes, greedy).mean()

    return jax.vmap(cell)(m.reshape(-1), f.reshape(-1)).reshape(m.shape)


def cross_params(protagonist_params: sac.Params, adversary_params: sac.Params, seed_axis: bool = False) -> sac.Params:
    """Agent 0 (actor, critics, temperature) from one run and agent 1 from another:
    a protagonist against another method's adversary. Parameters are one seed's
    (agent axis first) or, with ``seed_axis=True``, seed-batched ``[S, A, ...]`` (seed i
    against the other run's seed i)."""
    if seed_axis:
        return jax.vmap(cross_params)(protagonist_params, adversary_params)
    return jax.tree.map(lambda p, a: p.at[1].set(a[1]), protagonist_params, adversary_params)


def save_grid(grid, masses, frictions, path_prefix: str, title: str = "") -> tuple[str, str]:
    """Writes ``<prefix>.json`` (masses, frictions, returns [M][F]) and a heatmap
    ``<prefix>.png``; returns both paths. ``grid``: ``[M, F]`` (or ``[S, M, F]``: the
    heatmap shows the mean over seeds, the JSON keeps every seed)."""
    import matplotlib.pyplot as plt  # headless: matplotlib picks Agg itself; a notebook keeps its backend

    grid = np.asarray(grid, np.float64)
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    with open(path_prefix + ".json", "w") as fh:
        json.dump({"title": title, "masses": list(map(float, masses)), "frictions": list(map(float, frictions)),
                   "axes": ["seed", "mass", "friction"] if grid.ndim == 3 else ["mass", "friction"],
                   "returns": grid.tolist()}, fh)
    mean = grid.mean(0) if grid.ndim == 3 else grid
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(mean, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(frictions)), [f"{v:g}" for v in frictions], rotation=45)
    ax.set_yticks(range(len(masses)), [f"{v:g}" for v in masses])
    ax.set_xlabel("friction scale")
    ax.set_ylabel("mass scale")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="protagonist return")
    fig.tight_layout()
    fig.savefig(path_prefix + ".png", dpi=100)
    plt.close(fig)
    return path_prefix + ".json", path_prefix + ".png"
