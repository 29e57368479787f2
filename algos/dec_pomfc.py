r"""Dec-POMFC: decentralized partially observable mean-field control, trained by PPO
on the lifted (upper-level) MDP of the swarm's mean field.

Paper: Cui, Hauck, Fabian, Koeppl, "Learning Decentralized Partially Observable
Mean Field Control for Artificial Collective Behavior", ICLR 2024 (arXiv 2307.06175).
Only the paper's abstract and the description in ``specs/dec_pomfc.md`` were
available; where they are silent we follow the histogram mean-field PPO code of the
same first author (M3FC) and say so below. The swarm tasks are ours
(``envs/swarms.py``, adapted Kuramoto / Vicsek / Aggregation).

Lifted MDP (N agents, static per compile)
-----------------------------------------
Upper-level state: the mean field of the agents' task points
``x_i = env.mean_field_points(s)`` (positions / phases / headings on a unit torus),
as a kernel embedding at ``M_mf = mf_bins^dim`` grid centres ``c_b``
(``marl.mean_field.grid_embedding``)::

    mu_tilde_b = (1/N) sum_i exp(-|x_i - c_b|_T^2 / (2 sigma_mf^2))

or, with ``representation="histogram"``, the fraction of agents per grid cell; plus
``t / T``. Both are permutation-invariant and of a size independent of N.
Implementation: the swarm is rewrapped as ``EpisodeStats(AutoReset(MeanFieldState(env)))``
so that ``Timestep.state`` *is* this upper observation (and ``info["final_state"]``
the one of the last state of an episode).

Upper-level action: a decision rule ``xi``, drawn from a diagonal Gaussian
``pi_hat(xi | mu_t) = N(m_phi(mu_t), diag(exp(2 l)))`` (MLP mean, state-independent
log-std ``l`` initialized to ``upper_log_std_init``), flattened ``[D]`` with
``D = M P (+ d)``: per-centre parameters ``xi_b`` for ``M = rule_bins^k`` centres
``z_b`` on a grid in ``[-1, 1]^k`` of the agents' *observation-point* space.

Lower level (what every agent executes, decentralized): agent ``i`` maps its own
observation ``o_i`` to an observation point ``y_i = clip(o_i[obs_features], -1, 1)``
(``[k]``), interpolates the rule with normalized RBF weights::

    w_ib = exp(-|y_i - z_b|^2 / (2 sigma_r^2)) / sum_b' exp(-|y_i - z_b'|^2 / (2 sigma_r^2))
    mean_i = sum_b w_ib tanh(xi_b^mean)                              [d]
    log std_i = agent_log_std_init + (sum_b w_ib xi_b^logstd | xi^logstd | 0)
    a_i ~ N(mean_i, diag(std_i^2)),  sent to the env clipped to [action_low, action_high]

(``rule_log_std``: ``per_centre`` | ``shared`` (d extra upper-action entries) |
``fixed``; log std clipped to [-5, 1]). The tanh squashing of the per-centre means
follows M3FC's tanh-squashed per-bin decision rule.

Observation points: the task chooses them, as ``EnvSpec.rule_features`` (indices into
the swarm observation, documented in ``envs/swarms.py``; every feature lies in [-1, 1]);
``obs_features`` overrides them. The swarm tasks' choices:
  aggregation  (1, 2): mean displacement to the neighbours within r, divided by r
               (``<delta_T(x_i, x_j)>_i / r``): where the local crowd is.
  vicsek       (5, 6): the own heading ``cos phi_i, sin phi_i`` (the default
               ``observe_heading=True``). The upper policy, reading the heading
               distribution, places the rule so that headings turn toward a common
               direction (a compass policy reaches about 41 of 50). Before the heading
               was observed the rule read the relative headings (now
               ``swarm:vicsek_hard``) and stayed at the random polarization level
               (return about 5 of 50 at 80k steps).
  vicsek_hard  (1, 2): neighbours' mean relative heading ``<cos(phi_j - phi_i)>_i,
               <sin(phi_j - phi_i)>_i``: how far and which way to turn to align.
  kuramoto     (3, 4): the own phase ``cos theta_i, sin theta_i``. The rule is then a
               function of the agent's own state, as a mean-field control law; the
               upper policy, which reads the phase distribution, places it so that
               phases are pulled toward the swarm's mean phase. The neighbour lag and
               own frequency (``obs_features=(2, 5)``) did not learn on our task:
               with about 3 neighbours in r = 0.1 at N = 100 the lag is mostly noise
               (greedy return 7.0 after 160k steps vs 33.8 after 80k with the own
               phase, 2 seeds each, N = 100, T = 50).
An agent without neighbours sees 0 for the neighbour features (the centre of the grid).

Upper-level exploration noise: ``xi_t = m_phi(mu_t) + exp(l) * eps_t`` with
``eps_t ~ N(0, I)`` redrawn every step by default (``upper_noise_corr = 0``). With
``upper_noise_corr = rho > 0`` the noise is AR(1) within an episode,
``eps_t = rho eps_{t-1} + sqrt(1 - rho^2) z_t`` (redrawn at an episode's first step;
``rho = 1``: one draw per episode), so consecutive rules explore in one direction
instead of jittering around the mean (:func:`upper_noise`). PPO still scores ``xi_t``
with the marginal Gaussian ``N(m_phi(mu_t), exp(2 l))`` (each ``eps_t`` is marginally
N(0, I)), as state-dependent-exploration PPO does; the policy's true conditional
likelihood given ``eps_{t-1}`` is not used. Evaluation's sampled (non-greedy) ``act``
draws independent noise per step. Measured on Vicsek with the own heading (N = 100,
T = 50, 3 seeds, ``results/swarm_study``): with ``upper_noise_corr = 0.9`` the training
return passes 30 within 24k steps (greedy 36.7 at 40k). The same run with noise redrawn
every step has not been measured yet, so the default stays 0 (the paper's PPO).

Upper-level reward: the swarm's shared reward (mean over agents of ``Timestep.reward``).
PPO on the lifted MDP ("Dec-POMFPPO"): ``algos.ppo``'s GAE, clipped surrogate and
clipped value loss, Gaussian log-prob/entropy and regularizers, with
``L = L_pi + c_V L_V - c_H H[pi_hat] (+ regularizer)`` over minibatches of the
``num_envs x num_steps`` upper-level transitions (the upper policy is feed-forward,
so samples are shuffled freely). The upper log-probability is that of ``xi``; the
agents' own sampling noise is part of the lifted MDP's transition.

Training is centralized (the upper policy reads the mean field of the finite swarm it
is trained on; N is static per compile and the runner vmaps seeds), execution is
decentralized:
  closed loop (default ``act``): the upper policy computes the rule from the current
    mean field (one broadcast of ``xi`` per step); each agent then acts on its own
    observation only.
  open loop: :func:`open_loop_rules` precomputes ``xi_0 .. xi_{T-1}`` by running the
    upper policy greedily on a simulated swarm from the known initial distribution;
    :func:`open_loop` makes an algorithm whose ``act`` applies the stored rule of step
    ``t`` (the carry counts steps, restarting at episode ends): agents then use only
    their own observation and ``t``.
The parameters (upper policy and critic) do not depend on N: a policy trained at one
N runs at another unchanged (``algos.make("dec_pomfc", env_with_other_N, config)``).

Choices and deviations (ours, the paper body being unavailable)
- Kernel representation on a regular grid of the task's torus points; the paper's
  centres and bandwidths are unknown (defaults: ``mf_bins = 6``, bandwidth one cell).
- The decision rule is an RBF interpolation over a small observation feature space
  that each task declares (``spec.rule_features``, above), not a neural lower-level
  policy; per-centre Gaussian means (tanh-squashed, as M3FC) and a shared log-std by
  default. Its resolution bounds the feedback gain a rule can express: on Kuramoto
  (N = 100, T = 50, 320k steps, 3 seeds, ``results/swarm_study``) the default 5 x 5
  grid ends at greedy 36.5 on a flat curve, a 9 x 9 grid (``rule_bins = 9``) at 37.9,
  and the 9 x 9 grid with AR(1) 0.9 upper-level noise at 38.9 (the mean-phase rule:
  41.2). Larger PPO batches did not help (32 envs, 1,600 samples per update: 33.9 at
  the same steps, fewer updates). The default stays 5 (fewer parameters; Vicsek with
  the own heading reaches its target with it).
- PPO batches are ``num_envs x num_steps`` upper-level samples (400 in our studies,
  1600 with 32 envs), far below M3FC's 24,000: what a 2-core CPU affords.
- The horizon ends the episode as a termination by default
  (``bootstrap_truncation=False``): the swarm objective is finite-horizon and ``t/T``
  is observed, so the value after the last step is 0.
- PPO hyperparameters are smaller-batch versions of M3FC's (gamma 0.99, clip 0.2,
  8 epochs) with ``gae_lambda = 0.95`` and ``lr = 3e-4`` instead of 1.0 and 5e-5.
- Regularizers (``regularizer``) act on the upper Gaussian policy through
  ``marl.regularizers.gaussian_regularizer`` (closed-form KL / entropy / W2); the uniform
  reference does not exist for a Gaussian and is rejected.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from algos import ppo
from envs.wrappers import AutoReset, EpisodeStats
from marl import config as cfg
from marl import losses, returns
from marl import mean_field as mf
from marl import regularizers as reg
from marl.episodes import FINAL_KEYS, episode_metrics
from marl.networks import MLP, dense
from marl.optim import with_learning_rate
from marl.types import Algorithm, Timestep


@dataclasses.dataclass(frozen=True)
class DecPOMFCConfig(cfg.RunConfig):
    """Dec-POMFC settings (see the module docstring for the role of each)."""

    total_steps: int = 1_000_000
    num_envs: int = 16
    """parallel swarms (each a finite N-agent swarm)"""
    num_steps: int = 100
    update_epochs: int = 8
    num_minibatches: int = 4
    lr: float = 3e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 128
    bootstrap_truncation: bool = False
    representation: Literal["kernel", "histogram"] = "kernel"
    """mean-field representation: kernel | histogram"""
    mf_bins: int = 6
    """grid centres per dimension of the mean-field points"""
    mf_bandwidth: float = 0.0
    """kernel bandwidth on the unit torus; 0: one grid cell (1 / mf_bins)"""
    rule_bins: int = 5
    """decision-rule centres per observation-point dimension (grid on [-1, 1])"""
    rule_bandwidth: float = 0.0
    """RBF bandwidth of the rule interpolation; 0: the grid spacing 2 / (rule_bins - 1)"""
    obs_features: tuple[int, ...] = ()
    """indices of the observation features forming an agent's observation point; (): the
    task's ``spec.rule_features``"""
    upper_noise_corr: float = 0.0
    """correlation in [0, 1] of the upper-level exploration noise between consecutive steps of
    an episode: 0 redrawn every step, 1 drawn once per episode, between: AR(1)"""
    rule_log_std: Literal["shared", "per_centre", "fixed"] = "shared"
    """agent log-std: shared (part of the rule) | per_centre (interpolated) | fixed"""
    agent_log_std_init: float = -1.0
    upper_log_std_init: float = -0.5
    regularizer: reg.RegularizerConfig = dataclasses.field(default_factory=reg.RegularizerConfig)

    def __post_init__(self):
        for f in ("total_steps", "num_envs", "num_steps", "update_epochs", "num_minibatches", "hidden", "mf_bins"):
            cfg.check_positive(f, getattr(self, f), integer=True)
        if not (isinstance(self.rule_bins, int) and self.rule_bins >= 2):
            raise cfg.ConfigError("rule_bins", self.rule_bins, "must be an integer >= 2")
        cfg.check_positive("lr", self.lr)
        cfg.check_range("gamma", self.gamma, 0.0, 1.0)
        cfg.check_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        cfg.check_positive("clip_eps", self.clip_eps)
        cfg.check_nonnegative("ent_coef", self.ent_coef)
        cfg.check_nonnegative("vf_coef", self.vf_coef)
        cfg.check_positive("max_grad_norm", self.max_grad_norm)
        cfg.check_choice("representation", self.representation, ("kernel", "histogram"))
        cfg.check_nonnegative("mf_bandwidth", self.mf_bandwidth)
        cfg.check_nonnegative("rule_bandwidth", self.rule_bandwidth)
        cfg.check_range("upper_noise_corr", self.upper_noise_corr, 0.0, 1.0)
        cfg.check_choice("rule_log_std", self.rule_log_std, ("shared", "per_centre", "fixed"))
        for f in ("agent_log_std_init", "upper_log_std_init"):
            cfg.check_range(f, getattr(self, f), -10.0, 3.0)
        feats = self.obs_features
        if not (isinstance(feats, (tuple, list)) and all(isinstance(i, int) and i >= 0 for i in feats)):
            raise cfg.ConfigError("obs_features", feats, "must be a tuple of non-negative observation indices")
        reg.check_usage(self.regularizer, who="dec_pomfc's upper level", gaussian=True, rollout_is_policy=True)
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise cfg.ConfigError(
                "num_minibatches",
                self.num_minibatches,
                f"must divide num_envs * num_steps = {self.num_envs * self.num_steps}",
            )
        cfg.check_total_steps(self.total_steps, self.num_envs, self.num_steps)


# ----------------------------------------------------------------------------- the lifted env


def _raw_state(state):
    """The innermost (swarm) state under the wrappers' states."""
    while hasattr(state, "inner"):
        state = state.inner
    return state


class MeanFieldState:
    """A swarm whose ``Timestep.state`` is the mean-field representation plus ``t / T``."""

    def __init__(self, swarm, config: DecPOMFCConfig, dim: int):
        """``dim``: size of the swarm's ``mean_field_points`` (1, 2 or 3)."""
        self._env, self.config, self.dim = swarm, config, dim
        self._bw = config.mf_bandwidth or 1.0 / config.mf_bins
        self.spec = dataclasses.replace(swarm.spec, state_dim=config.mf_bins**dim + 1)

    @property
    def unwrapped(self):
        return self._env

    def representation(self, raw) -> jax.Array:
        """[mf_bins^dim + 1] mean-field representation of a raw swarm state, then t / T."""
        pts = self._env.mean_field_points(raw)
        c = self.config
        if c.representation == "kernel":
            rep = mf.grid_embedding(pts, c.mf_bins, self._bw)
        else:
            rep = mf.histogram(pts, c.mf_bins)
        t = jnp.asarray(raw.t, jnp.float32) / self._env.spec.max_steps
        return jnp.concatenate([rep, t[None]]).astype(jnp.float32)

    def _lift(self, state, ts: Timestep) -> Timestep:
        return ts._replace(state=self.representation(state))

    def reset(self, key):
        state, ts = self._env.reset(key)
        return state, self._lift(state, ts)

    def step(self, key, state, action):
        state, ts = self._env.step(key, state, action)
        return state, self._lift(state, ts)

    def __getattr__(self, name):
        return getattr(self._env, name)


def lifted_env(env, config: DecPOMFCConfig):
    """``EpisodeStats(AutoReset(MeanFieldState(swarm)))`` from a (wrapped) swarm env."""
    swarm = getattr(env, "unwrapped", env)
    if not hasattr(swarm, "mean_field_points"):
        raise cfg.ConfigError(
            "env", env.spec.name, "dec_pomfc needs an environment with a mean_field_points accessor (swarm:*)"
        )
    if env.spec.discrete:
        raise cfg.ConfigError("env", env.spec.name, "dec_pomfc needs continuous actions (swarm action_bins=0)")
    raw, _ = jax.eval_shape(swarm.reset, jax.random.PRNGKey(0))
    dim = jax.eval_shape(swarm.mean_field_points, raw).shape[-1]
    return EpisodeStats(AutoReset(MeanFieldState(swarm, config, dim)))


# ----------------------------------------------------------------------------- networks


class UpperPolicy(nn.Module):
    """Gaussian upper-level policy over flattened decision rules, and the critic."""

    rule_dim: int
    hidden: int
    log_std_init: float

    @nn.compact
    def __call__(self, s):
        mean = dense(self.rule_dim, 0.01)(MLP((self.hidden, self.hidden))(s))
        log_std = self.param("log_std", nn.initializers.constant(self.log_std_init), (self.rule_dim,))
        value = dense(1, 1.0)(MLP((self.hidden, self.hidden))(s))[..., 0]
        return mean, jnp.broadcast_to(log_std, mean.shape), value


# ----------------------------------------------------------------------------- state


@struct.dataclass
class TrainState:
    params: Any
    ref_params: Any  # frozen initial policy (regularizer reference "initial")
    opt_state: Any
    env_state: Any
    last_ts: Timestep  # [E, ...]
    noise: jax.Array  # [E, D] standard-normal upper exploration noise of the last step
    key: jax.Array
    update_step: jax.Array
    hparams: ppo.HParams


class Transition(NamedTuple):
    s: jax.Array  # [E, S] upper observation (mean field, t/T)
    rule: jax.Array  # [E, D] decision rule (unsquashed Gaussian sample)
    logp: jax.Array  # [E]
    value: jax.Array  # [E]
    reward: jax.Array  # [E] mean over agents
    done: jax.Array  # [E]
    terminated: jax.Array  # [E]
    final_value: jax.Array  # [E]
    info: dict


@struct.dataclass
class Carry:
    """``act``'s carry: ``rules [.., T, D]`` (open loop), ``t [..]`` step counter,
    ``open_loop [..]`` whether to apply the stored rules."""

    rules: jax.Array
    t: jax.Array
    open_loop: jax.Array


class _Pieces(NamedTuple):
    env: Any
    net: UpperPolicy
    rule_dim: int
    upper: Any  # (params, s) -> (mean, log_std, value)
    agent_actions: Any  # (rule, obs, key, greedy) -> actions for the env
    act: Any
    initial_carry: Any


def _build(env, config: DecPOMFCConfig) -> _Pieces:
    """The pure functions of Dec-POMFC on ``env`` (rebuilt on demand; no state)."""
    lenv = lifted_env(env, config)
    spec = lenv.spec
    d, T = spec.action_dim, spec.max_steps
    feats = tuple(config.obs_features) or spec.rule_features
    if not feats:
        raise cfg.ConfigError(
            "obs_features",
            config.obs_features,
            f"{spec.name} defines no rule_features in its spec; give observation indices",
        )
    if max(feats) >= spec.obs_dim:
        raise cfg.ConfigError("obs_features", feats, f"indices must be < obs_dim = {spec.obs_dim}")
    k = len(feats)
    centres = jnp.asarray(
        np.array(np.meshgrid(*[np.linspace(-1.0, 1.0, config.rule_bins)] * k, indexing="ij")).reshape(k, -1).T,
        jnp.float32,
    )  # [M, k]
    M = centres.shape[0]
    bw = config.rule_bandwidth or 2.0 / (config.rule_bins - 1)
    per_centre = 2 * d if config.rule_log_std == "per_centre" else d
    rule_dim = M * per_centre + (d if config.rule_log_std == "shared" else 0)
    net = UpperPolicy(rule_dim, config.hidden, config.upper_log_std_init)
    feat_idx = jnp.asarray(feats)

    def upper(params, s):
        return net.apply(params, s)

    def rule_weights(obs):
        """[..., N, M] normalized RBF weights of each agent's observation point."""
        y = jnp.clip(obs[..., feat_idx], -1.0, 1.0)
        d2 = jnp.sum((y[..., :, None, :] - centres) ** 2, -1)
        return jax.nn.softmax(-d2 / (2.0 * bw**2), axis=-1)

    def agent_distribution(rule, obs):
        """Per-agent Gaussian (mean [..., N, d], log_std [..., N, d]) from rule [..., D]."""
        w = rule_weights(obs)
        per = rule[..., : M * per_centre].reshape(rule.shape[:-1] + (M, per_centre))
        mean = jnp.einsum("...nm,...mp->...np", w, jnp.tanh(per[..., :d]))
        if config.rule_log_std == "per_centre":
            ls = jnp.einsum("...nm,...mp->...np", w, per[..., d:])
        elif config.rule_log_std == "shared":
            ls = jnp.broadcast_to(rule[..., None, M * per_centre :], mean.shape)
        else:
            ls = jnp.zeros_like(mean)
        return mean, jnp.clip(config.agent_log_std_init + ls, -5.0, 1.0)

    def agent_actions(rule, obs, key, greedy=False):
        """Each agent's action from its own observation and the rule ([..., N, d], clipped)."""
        mean, log_std = agent_distribution(rule, obs)
        a = jnp.where(greedy, mean, mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape))
        return jnp.clip(a, spec.action_low, spec.action_high)

    def initial_carry(batch_shape=()):
        return Carry(
            jnp.zeros(batch_shape + (T, rule_dim), jnp.float32),
            jnp.zeros(batch_shape, jnp.int32),
            jnp.zeros(batch_shape, bool),
        )

    def act(params, ts: Timestep, carry: Carry, key, greedy=False):
        """Closed loop: the rule from the upper policy at the mean field ``ts.state``;
        open loop (``carry.open_loop``): the stored rule of step ``t``. Then every agent
        acts on its own ``ts.obs`` only."""
        k_up, k_agents = jax.random.split(key)
        mean, log_std, _ = upper(params, ts.state)
        closed = jnp.where(greedy, mean, mean + jnp.exp(log_std) * jax.random.normal(k_up, mean.shape))
        t = jnp.where(ts.done, 0, carry.t)
        idx = jnp.clip(t, 0, T - 1)[..., None, None]
        stored = jnp.take_along_axis(carry.rules, jnp.broadcast_to(idx, idx.shape[:-1] + (rule_dim,)), -2)[..., 0, :]
        rule = jnp.where(carry.open_loop[..., None], stored, closed)
        return agent_actions(rule, ts.obs, k_agents, greedy), carry.replace(t=t + 1)

    return _Pieces(lenv, net, rule_dim, upper, agent_actions, act, initial_carry)


# ----------------------------------------------------------------------------- algorithm


def upper_noise(prev: jax.Array, fresh: jax.Array, first: jax.Array, corr: float) -> jax.Array:
    """Standard-normal upper exploration noise ``[E, D]`` of a step: AR(1) with
    correlation ``corr`` to ``prev`` (``eps_t = corr eps_{t-1} + sqrt(1 - corr^2) z_t``),
    redrawn (``z_t``) where ``first [E]`` marks an episode's first step. Every ``eps_t`` is
    N(0, I); ``corr = 0`` is independent noise per step, ``corr = 1`` one draw per episode."""
    if corr == 0.0:
        return fresh
    carried = corr * prev + float(np.sqrt(1.0 - corr**2)) * fresh
    return jnp.where(first[:, None], fresh, carried)


class Learner(NamedTuple):
    """What the learner's functions share (static): the lifted env's pieces, the config,
    the regularizer and the optimizer."""

    pc: _Pieces
    config: DecPOMFCConfig
    regularizer: reg.Regularizer
    tx: optax.GradientTransformation


def transition_fields(m: Learner) -> dict:
    """Each Transition array's shape after the leading ``[E]`` of one step, and its dtype
    (``marl.types.assert_fields``)."""
    f32 = jnp.float32
    scalar = ((), f32)
    return dict(
        s=((m.pc.env.spec.state_dim,), f32),
        rule=((m.pc.rule_dim,), f32),
        logp=scalar,
        value=scalar,
        reward=scalar,
        done=((), bool),
        terminated=((), bool),
        final_value=scalar,
    )


def init(m: Learner, key) -> TrainState:
    config, pc = m.config, m.pc
    E = config.num_envs
    k_param, k_env, k_noise, key = jax.random.split(key, 4)
    params = pc.net.init(k_param, jnp.zeros((1, pc.env.spec.state_dim)))
    env_state, ts = jax.vmap(pc.env.reset)(jax.random.split(k_env, E))
    hp = ppo.initial_hparams(config)
    noise = jax.random.normal(k_noise, (E, pc.rule_dim))
    return TrainState(params, params, m.tx.init(params), env_state, ts, noise, key, jnp.zeros((), jnp.int32), hp)


def rollout_step(m: Learner, state: TrainState, key):
    """One step of every lifted env: the upper policy's rule, the agents' actions."""
    pc, config = m.pc, m.config
    ts = state.last_ts
    k_up, k_agents, k_env = jax.random.split(key, 3)
    mean, log_std, value = pc.upper(state.params, ts.state)
    noise = upper_noise(state.noise, jax.random.normal(k_up, mean.shape), ts.done, config.upper_noise_corr)
    rule = mean + jnp.exp(log_std) * noise
    logp = losses.gaussian_log_prob(mean, log_std, rule)
    actions = pc.agent_actions(rule, ts.obs, k_agents)
    env_state, nts = jax.vmap(pc.env.step)(jax.random.split(k_env, config.num_envs), state.env_state, actions)
    if config.bootstrap_truncation:
        final_value = pc.upper(state.params, nts.info["final_state"])[2]
    else:
        final_value = jnp.zeros_like(value)
    stats = {k: v for k, v in nts.info.items() if k not in FINAL_KEYS}
    tr = Transition(ts.state, rule, logp, value, nts.reward.mean(-1), nts.done, nts.terminated, final_value, stats)
    return state.replace(env_state=env_state, last_ts=nts, noise=noise), tr


def reg_terms(m: Learner, params, ref_params, s, rule, hp):
    """The regularizer between the upper policies of ``params`` and ``ref_params`` at ``s``."""
    mean, log_std, _ = m.pc.upper(params, s)
    rmean, rlog_std, _ = m.pc.upper(ref_params, s)
    return m.regularizer.term((mean, log_std), (rmean, rlog_std), hp.reg_coef, action=rule)


def loss_fn(m: Learner, params, ref_params, mb: Transition, adv, targets, hp):
    """PPO's loss on the upper level's rules, plus the regularizer in loss mode."""
    mean, log_std, value = m.pc.upper(params, mb.s)
    logp = losses.gaussian_log_prob(mean, log_std, mb.rule)
    pg, _, approx_kl, clip_frac = losses.clipped_policy_loss(logp, mb.logp, adv, hp.clip_eps)
    vf = losses.clipped_value_loss(value, mb.value, targets, hp.clip_eps)
    entropy = losses.gaussian_entropy(log_std).mean()
    loss = pg + hp.vf_coef * vf - hp.ent_coef * entropy
    reg_value = jnp.zeros(())
    if m.regularizer.as_loss:
        reg_loss, _, v = reg_terms(m, params, ref_params, mb.s, mb.rule, hp)
        loss, reg_value = loss + reg_loss.mean(), v.mean()
    return loss, dict(
        policy_loss=pg,
        value_loss=vf,
        entropy=entropy,
        approx_kl=approx_kl,
        clip_frac=clip_frac,
        regularizer=reg_value,
        upper_std=jnp.exp(log_std).mean(),
    )


def update(m: Learner, state: TrainState):
    """One iteration: a rollout, the regularizer's penalty, GAE and PPO epochs."""
    config, hp = m.config, state.hparams
    n_samples = config.num_envs * config.num_steps
    key, k_roll, k_perm = jax.random.split(state.key, 3)
    params_old = state.params
    step = functools.partial(rollout_step, m)
    state, traj = jax.lax.scan(step, state, jax.random.split(k_roll, config.num_steps))
    last_value = m.pc.upper(state.params, state.last_ts.state)[2]
    ref_params = m.regularizer.reference(initial=lambda: state.ref_params, rollout=lambda: params_old)
    if m.regularizer.as_penalty:
        penalty = reg_terms(m, params_old, ref_params, traj.s, traj.rule, hp)[1]
        traj = traj._replace(reward=traj.reward - penalty)
    adv, targets = returns.gae(
        traj.reward,
        traj.value,
        traj.done,
        traj.terminated,
        traj.final_value,
        last_value,
        hp.gamma,
        hp.gae_lambda,
        config.bootstrap_truncation,
    )
    flat = lambda x: x.reshape((n_samples,) + x.shape[2:])  # noqa: E731 [T, E, ...] -> [T E, ...]
    data = jax.tree.map(flat, (traj._replace(info={}), adv, targets))
    lr = ppo.annealed_lr(config, hp, state.update_step)

    def grad_fn(params, idx):
        mb, a, tg = jax.tree.map(lambda z: z[idx], data)
        return jax.grad(functools.partial(loss_fn, m), has_aux=True)(params, ref_params, mb, a, tg, hp)

    (params, opt_state), metrics = ppo.minibatch_epochs(
        grad_fn,
        m.tx,
        state.params,
        with_learning_rate(state.opt_state, lr),
        k_perm,
        config.update_epochs,
        n_samples,
        config.num_minibatches,
    )
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics.update(episode_metrics(traj.info))
    metrics["lr"] = lr
    metrics["step_reward"] = traj.reward.mean()
    state = state.replace(params=params, opt_state=opt_state, key=key, update_step=state.update_step + 1)
    return state, metrics


def make(env, config: DecPOMFCConfig, name: str = "dec_pomfc") -> Algorithm:
    """Dec-POMFC on ``env``: the pieces above bound to its lifted env and ``config``."""
    pc = _build(env, config)
    R = reg.build(
        config.regularizer, who="dec_pomfc's upper level", policy="gaussian", references=("rollout", "initial")
    )
    m = Learner(pc, config, R, ppo.make_optimizer(config.max_grad_norm))
    return Algorithm(
        name,
        config,
        pc.env,
        functools.partial(init, m),
        functools.partial(update, m),
        pc.act,
        pc.initial_carry,
        config.num_envs * config.num_steps,
    )


# ----------------------------------------------------------------------------- open loop


def open_loop_rules(algo: Algorithm, params, key: jax.Array, env=None) -> jax.Array:
    """``[T, D]`` decision rules for steps ``0 .. T-1``, precomputed open loop.

    Runs the upper policy greedily (its mean) on one simulated swarm drawn from the
    known initial distribution (``env``: by default the algorithm's own; pass a swarm
    with larger N for a closer approximation of the mean field), the agents sampling
    their actions from the rule as in execution. ``params`` are one seed's parameters.
    """
    pc = _build(algo.env if env is None else env, algo.config)
    lenv = pc.env
    k_reset, k_run = jax.random.split(key)
    env_state, ts = lenv.reset(k_reset)

    def step(c, key):
        env_state, ts = c
        k_act, k_env = jax.random.split(key)
        rule = pc.upper(params, ts.state)[0]
        env_state, ts = lenv.step(k_env, env_state, pc.agent_actions(rule, ts.obs, k_act))
        return (env_state, ts), rule

    _, rules = jax.lax.scan(step, (env_state, ts), jax.random.split(k_run, lenv.spec.max_steps))
    return rules


def open_loop(algo: Algorithm, rules: jax.Array) -> Algorithm:
    """The algorithm whose ``act`` applies the stored ``rules [T, D]`` at step ``t``:
    agents use only their own observation and ``t`` (``marl.evaluation`` runs it as is)."""
    T, D = algo.env.spec.max_steps, algo.initial_carry().rules.shape[-1]
    if rules.shape != (T, D):
        raise cfg.ConfigError("rules", tuple(rules.shape), f"must have shape (max_steps, rule_dim) = {(T, D)}")

    def initial_carry(batch_shape=()):
        c = algo.initial_carry(batch_shape)
        return c.replace(rules=jnp.broadcast_to(rules, c.rules.shape), open_loop=jnp.ones(batch_shape, bool))

    return algo._replace(initial_carry=initial_carry)


def rule_dim(algo: Algorithm) -> int:
    """Size ``D`` of a flattened decision rule of ``algo``."""
    return int(algo.initial_carry().rules.shape[-1])
