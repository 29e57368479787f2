"""IPPO and MAPPO: multi-agent PPO with shared or per-agent parameters.

Papers: Schulman et al. 2017 (PPO); de Witt et al. 2020 (IPPO, "Is independent
learning all you need in the StarCraft multi-agent challenge?"); Yu et al. 2022
(MAPPO, "The surprising effectiveness of PPO in cooperative multi-agent games").

Equations (per agent i, step t, the agent axis is an array axis):
  ratio      rho = pi(a|o) / pi_old(a|o)
  policy     L_pi = -E[min(rho A, clip(rho, 1-eps, 1+eps) A)]      (A normalized per minibatch)
  value      L_V = E[max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)] / 2
  GAE        delta_t = r_t + gamma (1 - term_t) V'_t - V_t
             A_t = delta_t + gamma lambda (1 - done_t) A_{t+1},   R = A + V_old
  where V'_t = V(final obs of the episode) when the episode ended at t (so a
  *truncated* episode bootstraps from its true last state) and V(o_{t+1}) otherwise.
  loss = L_pi + vf_coef L_V - ent_coef H[pi] (+ a regularizer, see marl.regularizers)
IPPO: the critic reads the agent's own observation through the actor's torso
(one shared trunk, as in JaxMARL's IPPO baseline). MAPPO: a separate critic on the
global state concatenated with the agent's one-hot id (agent-specific values of a
centralized critic).

Choices and deviations:
- Parameter sharing with one-hot agent ids by default; ``shared_params=False`` gives
  each agent its own parameters (vmapped over the agent axis).
- Unavailable actions get logits of -1e10 (never sampled, zero entropy contribution).
- Truncated episodes bootstrap from ``info["final_obs"]`` when
  ``bootstrap_truncation`` (default); JaxMARL's baselines treat truncation as
  termination. Turning it off reproduces theirs and saves one value pass per step.
- Learning-rate annealing is per update (linear to zero), not per minibatch.
- Minibatches split the parallel environments, keeping whole sequences for the GRU,
  which restarts from the hidden state stored at the start of the rollout.
- Regularizer reference ``run`` (``regularizer.reference_run``): a trained run's policy,
  loaded frozen into ``TrainState.ref_params`` by ``make`` (checked against the env and
  the parameter shapes before compiling; one reference shared by every vmapped row).
  Its GRU state is carried across rollouts (``TrainState.ref_params`` is then a
  ``RunReference(params, h)``; the ``initial``
  reference restarts from zeros at each rollout instead). ``init_from_reference``
  starts the policy (actor and critic) from it: fine-tuning. With a ``run`` reference
  every update logs ``reference_kl`` (KL(pi || ref) on the rollout, for every kind, none
  included) and, for Wasserstein, ``penalty_logratio_corr`` (correlation of the
  Wasserstein penalty with the KL log-ratio at the taken actions).
- Sweepable hyperparameters (lr, clip, entropy and value coefficients, gamma, GAE
  lambda, regularizer coefficient/epsilon) are arrays in ``TrainState.hparams``.
- One-hot agent ids cost ``A x A`` per step and environment (``jnp.eye(A)`` alone is
  400 MB at A = 10,000, and the ids are copied into every stored observation), so
  ``agent_ids=True`` with more than ``MAX_AGENT_IDS`` (256) agents is rejected with a
  ``ConfigError`` on ``agent_ids``: large homogeneous swarms use ``agent_ids=False``
  (``--no-agent-ids``), where a shared policy is already permutation-invariant.

Continuous actions (``spec.action_dim``; e.g. the swarms):
  policy     pi(a|o) = N(a; mu_theta(o), diag(sigma^2)),  log sigma a state-independent
             parameter ``log_std`` [action_dim] initialized to ``log_std_init``
             (per agent with ``shared_params=False``); mu is the actor head's output
             (the same network as the discrete logits, with action_dim outputs).
  log-prob   log pi(a|o) = sum_k [-(a_k - mu_k)^2 / (2 sigma_k^2) - log sigma_k - log(2 pi) / 2]
  entropy    H = sum_k [log sigma_k + (1 + log(2 pi)) / 2]
  The sample ``a`` is stored and scored *unclipped*; the environment receives
  ``clip(a, action_low, action_high)``. Clipping is part of the environment from the
  learner's point of view, so the ratio pi/pi_old stays that of a proper density
  (the usual choice of PPO implementations, e.g. Stable-Baselines3 and CleanRL); the
  price is some probability mass on out-of-range actions, which the policy learns
  to avoid only through their clipped effect. Greedy actions are ``clip(mu)``.
  Regularizers between Gaussians (closed forms, summed over action dimensions):
    kl           KL(pi || ref) = sum_k log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2;
                 penalty at the sample: log pi(a) - log ref(a)
    entropy      -H(pi); penalty log pi(a)
    wasserstein  W2^2 = |m1 - m2|^2 + |s1 - s2|^2 (``marl.regularizers.gaussian_w2``);
                 penalty: the centred Kantorovich potential of W2^2 at the sample,
                 f(a) = sum_k a_k^2 - 2 m2 a_k - (s2/s1)(a_k - m1)^2 + m2^2 + s2^2 - s1 s2,
                 whose gradient in a is 2 (a - T(a)) with the Brenier map
                 T(a) = m2 + (s2/s1)(a - m1), whose mean under pi is W2^2 and which is 0
                 when pi == ref (the Gaussian analogue of the centred Sinkhorn potential).
  ``regularizer.epsilon``/``iterations``/``centred`` do not apply (no entropic OT), and
  ``reference="uniform"`` is rejected (no uniform Gaussian): use ``initial`` or ``rollout``.

Code layout: every piece is a module-level function of a static :class:`PPOParts`
(spec, config, network, action distribution, regularizer, optimizer) and explicit
arrays: ``rollout_step``, ``replay``, ``reference_outputs``, ``loss_fn``, ``penalize``,
``minibatch_epochs``, ``update``; :func:`make` only binds them. Discrete and continuous
actions share one path through ``marl.policies`` (``Categorical`` / ``Gaussian``: sample,
log-probability and entropy, greedy action, what the env receives). The regularizer's
reference, mode and validity come from ``marl.regularizers.build``. Shared math lives
in marl/ (``marl.returns.gae``, the clipped losses in ``marl.losses``); ``algos.dec_pomfc``
reuses :func:`make_optimizer`, :func:`minibatch_epochs` and :func:`annealed_lr`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from marl import config as cfg
from marl import regularizers as reg
from marl.episodes import FINAL_KEYS, episode_metrics
from marl.losses import clipped_policy_loss, clipped_value_loss
from marl.networks import ActorCritic
from marl.optim import descent, with_learning_rate
from marl.policies import Categorical, Gaussian, for_spec
from marl.returns import gae
from marl.types import Algorithm, Timestep, hparams


@dataclasses.dataclass(frozen=True)
class PPOConfig(cfg.RunConfig):
    """PPO settings. ``critic``: "independent" (IPPO) or "centralized" (MAPPO)."""

    critic: Literal["independent", "centralized"] = "centralized"
    total_steps: int = 2_000_000
    num_envs: int = 128
    num_steps: int = 128
    update_epochs: int = 4
    num_minibatches: int = 4
    lr: float = 0.004
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.05
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.25
    hidden: int = 128
    recurrent: bool = True
    shared_params: bool = True
    agent_ids: bool = True
    bootstrap_truncation: bool = True
    log_std_init: float = -0.5
    """continuous actions: initial log-std of the Gaussian policy (state-independent)"""
    regularizer: reg.RegularizerConfig = dataclasses.field(default_factory=reg.RegularizerConfig)

    def __post_init__(self):
        reg.check_usage(self.regularizer, who="PPO", rollout_is_policy=True)
        cfg.check_choice("critic", self.critic, ["independent", "centralized"])
        for f in ("total_steps", "num_envs", "num_steps", "update_epochs", "num_minibatches", "hidden"):
            cfg.check_positive(f, getattr(self, f), integer=True)
        cfg.check_positive("lr", self.lr)
        cfg.check_range("gamma", self.gamma, 0.0, 1.0)
        cfg.check_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        cfg.check_positive("clip_eps", self.clip_eps)
        cfg.check_nonnegative("ent_coef", self.ent_coef)
        cfg.check_nonnegative("vf_coef", self.vf_coef)
        cfg.check_positive("max_grad_norm", self.max_grad_norm)
        if not (isinstance(self.log_std_init, (int, float)) and -10.0 <= self.log_std_init <= 3.0):
            raise cfg.ConfigError("log_std_init", self.log_std_init, "must be a number in [-10, 3]")
        if self.num_envs % self.num_minibatches:
            raise cfg.ConfigError(
                "num_envs",
                self.num_envs,
                f"must be divisible by num_minibatches={self.num_minibatches} "
                "(minibatches split the parallel environments)",
            )
        cfg.check_total_steps(self.total_steps, self.num_envs, self.num_steps)


PRESETS = {
    "ippo": dict(critic="independent"),
    "mappo": dict(critic="centralized"),
}


MAX_AGENT_IDS = 256
"""Largest number of agents for one-hot agent ids (see the module docstring)."""


# ------------------------------------------------------------------ reusable pieces


def make_optimizer(max_grad_norm: float) -> optax.GradientTransformation:
    """Adam with global-norm clipping; the learning rate is injected (``marl.optim``): the
    traced, annealed rate is set in the optimizer state each update."""
    return descent(optax.clip_by_global_norm(max_grad_norm), optax.scale_by_adam(eps=1e-5))


class GaussianActorCritic(nn.Module):
    """:class:`marl.networks.ActorCritic` whose head gives the Gaussian mean, plus a
    state-independent ``log_std`` parameter; outputs ``[..., 2d] = [mean, log_std]``."""

    action_dim: int
    hidden: int = 128
    recurrent: bool = True
    shared_torso: bool = False
    log_std_init: float = -0.5

    def setup(self):
        self.body = ActorCritic(self.action_dim, self.hidden, self.recurrent, self.shared_torso)
        self.log_std = self.param("log_std", nn.initializers.constant(self.log_std_init), (self.action_dim,))

    def __call__(self, h, x, critic_x, reset, avail):
        h, mean, value = self.body(h, x, critic_x, reset, avail)
        return h, jnp.concatenate([mean, jnp.broadcast_to(self.log_std, mean.shape)], -1), value

    def value(self, h, x, critic_x, reset):
        return self.body.value(h, x, critic_x, reset)


class HParams(NamedTuple):
    lr: jax.Array
    clip_eps: jax.Array
    ent_coef: jax.Array
    vf_coef: jax.Array
    gamma: jax.Array
    gae_lambda: jax.Array
    reg_coef: jax.Array
    reg_epsilon: jax.Array


@struct.dataclass
class TrainState:
    params: Any
    ref_params: Any  # frozen initial policy (reference "initial"), or a RunReference (reference "run")
    opt_state: Any
    env_state: Any
    last_ts: Timestep  # [E, ...]
    h: jax.Array  # [E, A, 2, H]
    first: jax.Array  # [E] the next step starts an episode: reset hidden state
    key: jax.Array
    update_step: jax.Array
    hparams: HParams


class RunReference(NamedTuple):
    """``TrainState.ref_params`` for regularizer reference "run" (other references keep
    plain parameters there, so their checkpoints keep their structure)."""

    params: Any  # the trained run's frozen parameters
    h: jax.Array  # [E, A, 2, H] the reference's hidden state at the start of the next rollout


class Transition(NamedTuple):
    x: jax.Array  # [E, A, obs_in]
    cx: jax.Array  # [E, A, critic_in]
    first: jax.Array  # [E, A]
    avail: jax.Array  # [E, A, n] (n = 1 for continuous actions)
    action: jax.Array  # [E, A] discrete; [E, A, d] continuous (the unclipped sample)
    logp: jax.Array
    value: jax.Array
    reward: jax.Array  # [E, A]
    done: jax.Array  # [E]
    terminated: jax.Array  # [E]
    final_value: jax.Array  # [E, A]
    info: dict


# ------------------------------------------------------------------ the learner's pieces


@dataclasses.dataclass(frozen=True, eq=False)
class PPOParts:
    """What the learner's functions share, built once by :func:`make` from the env spec
    and the config (no arrays that change during training)."""

    spec: Any
    config: PPOConfig
    net: nn.Module
    policy: Categorical | Gaussian  # the action distribution of the policy head
    regularizer: reg.Regularizer
    tx: optax.GradientTransformation
    ids: jax.Array  # [A, A] one-hot agent ids, or [A, 0]

    @property
    def centralized(self) -> bool:
        return self.config.critic == "centralized"

    @property
    def num_agents(self) -> int:
        return self.spec.num_agents


def transition_fields(m: PPOParts) -> dict:
    """Each Transition array's shape after the leading ``[E]`` of one step, and its dtype
    (``marl.types.assert_fields`` checks a rollout against it)."""
    spec, A, f32 = m.spec, m.num_agents, jnp.float32
    obs_in = spec.obs_dim + m.ids.shape[1]
    critic_in = (spec.state_dim if m.centralized else spec.obs_dim) + m.ids.shape[1]
    action = ((A,), jnp.int32) if m.policy.discrete else ((A, spec.action_dim), f32)
    per_agent = ((A,), f32)
    return dict(
        x=((A, obs_in), f32),
        cx=((A, critic_in), f32),
        first=((A,), bool),
        avail=((A, m.policy.mask_width), bool),
        action=action,
        logp=per_agent,
        value=per_agent,
        reward=per_agent,
        done=((), bool),
        terminated=((), bool),
        final_value=per_agent,
    )


def check_env(spec, config: PPOConfig, name: str) -> None:
    """ConfigErrors for an env this configuration cannot run, before anything compiles."""
    A = spec.num_agents
    if config.agent_ids and A > MAX_AGENT_IDS:
        raise cfg.ConfigError(
            "agent_ids",
            True,
            f"one-hot ids for {A} agents would add {A} inputs per agent ({A}x{A} floats per step and "
            f"environment); allowed up to {MAX_AGENT_IDS} agents: pass agent_ids=False (--no-agent-ids)",
        )
    if not spec.discrete and spec.action_dim is None:
        raise cfg.ConfigError("env", spec.name, f"{name} needs num_actions or action_dim in the env spec")


def make_parts(spec, config: PPOConfig, name: str = "ppo") -> PPOParts:
    """Network, action distribution, regularizer and optimizer for ``spec``."""
    check_env(spec, config, name)
    policy = for_spec(spec)
    shared_torso = config.critic != "centralized"
    if policy.discrete:
        net = ActorCritic(spec.num_actions, config.hidden, config.recurrent, shared_torso=shared_torso)
        cost = None if spec.action_cost is None else jnp.asarray(spec.action_cost, jnp.float32)
        regularizer = reg.build(config.regularizer, who=name, cost=cost, rollout_is_policy=True)
    else:
        net = GaussianActorCritic(
            spec.action_dim,
            config.hidden,
            config.recurrent,
            shared_torso=shared_torso,
            log_std_init=config.log_std_init,
        )
        regularizer = reg.build(
            config.regularizer, who=f"{name} on continuous actions", policy="gaussian", rollout_is_policy=True
        )
    A = spec.num_agents
    ids = jnp.eye(A) if config.agent_ids else jnp.zeros((A, 0))
    return PPOParts(spec, config, net, policy, regularizer, make_optimizer(config.max_grad_norm), ids)


def inputs(m: PPOParts, ts: Timestep):
    """Actor input [.., A, obs+ids] and critic input [.., A, (state|obs)+ids]."""
    lead = ts.obs.shape[:-2]
    idb = jnp.broadcast_to(m.ids, lead + m.ids.shape)
    x = jnp.concatenate([ts.obs, idb], -1)
    if m.centralized:
        s = jnp.broadcast_to(ts.state[..., None, :], lead + (m.num_agents, ts.state.shape[-1]))
        return x, jnp.concatenate([s, idb], -1)
    return x, x


def apply(m: PPOParts, params, h, x, cx, first, avail):
    """(hidden state, policy outputs, value) of one step; per-agent parameters
    (``shared_params=False``) have a leading [A] axis mapped over the agent axis."""
    if m.config.shared_params:
        return m.net.apply(params, h, x, cx, first, avail)
    f = jax.vmap(m.net.apply, in_axes=(0, -3, -2, -2, -1, -2), out_axes=(-3, -2, -1))
    return f(params, h, x, cx, first, avail)


def value_only(m: PPOParts, params, h, x, cx, first):
    """The critic alone (the truncation bootstrap's value of a final observation)."""
    method = type(m.net).value
    if m.config.shared_params:
        return m.net.apply(params, h, x, cx, first, method=method)
    f = jax.vmap(lambda p, *a: m.net.apply(p, *a, method=method), in_axes=(0, -3, -2, -2, -1), out_axes=-1)
    return f(params, h, x, cx, first)


def init_params(m: PPOParts, key):
    spec, A, H = m.spec, m.num_agents, m.config.hidden
    x0 = jnp.zeros((1, A, spec.obs_dim + m.ids.shape[1]))
    cx0 = jnp.zeros((1, A, (spec.state_dim if m.centralized else spec.obs_dim) + m.ids.shape[1]))
    h0, f0, av0 = jnp.zeros((1, A, 2, H)), jnp.zeros((1, A), bool), jnp.ones((1, A, m.policy.mask_width), bool)
    if m.config.shared_params:
        return m.net.init(key, h0, x0, cx0, f0, av0)
    keys = jax.random.split(key, A)
    return jax.vmap(lambda k: m.net.init(k, h0[:, 0], x0[:, 0], cx0[:, 0], f0[:, 0], av0[:, 0]))(keys)


def initial_carry(m: PPOParts, batch_shape=()):
    """(GRU state [.., A, 2, H], ``first`` [..]: the next step starts an episode)."""
    return (jnp.zeros(batch_shape + (m.num_agents, 2, m.config.hidden)), jnp.ones(batch_shape, bool))


def load_reference(m: PPOParts):
    """Regularizer reference ``run``: the trained run's parameters, checked (environment,
    shapes) and loaded before anything compiles; None for the other references."""
    rcfg = m.config.regularizer
    if rcfg.reference != "run":
        return None
    from marl.reference import load_run_params

    shapes = jax.eval_shape(functools.partial(init_params, m), jax.random.PRNGKey(0))
    return load_run_params(rcfg.reference_run, shapes, env_name=m.spec.name, seed_index=rcfg.reference_seed)


def initial_hparams(config) -> HParams:
    """The sweepable hyperparameters of a PPO-style config (PPO, Dec-POMFC) by field name."""
    rcfg = config.regularizer
    return hparams(
        HParams,
        lr=config.lr,
        clip_eps=config.clip_eps,
        ent_coef=config.ent_coef,
        vf_coef=config.vf_coef,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        reg_coef=rcfg.coef,
        reg_epsilon=rcfg.epsilon,
    )


def init(m: PPOParts, env, run_params, key) -> TrainState:
    config, rcfg = m.config, m.config.regularizer
    k_param, k_env, key = jax.random.split(key, 3)
    params = init_params(m, k_param)
    env_state, ts = jax.vmap(env.reset)(jax.random.split(k_env, config.num_envs))
    h, first = initial_carry(m, (config.num_envs,))
    hp = initial_hparams(config)
    ref_params = params
    if run_params is not None:
        ref_params = RunReference(run_params, jnp.zeros_like(h))
        if rcfg.init_from_reference:
            params = run_params
    return TrainState(params, ref_params, m.tx.init(params), env_state, ts, h, first, key, jnp.zeros((), jnp.int32), hp)


def act(m: PPOParts, params, ts: Timestep, carry, key, greedy=False):
    """ts: a (batched) Timestep; carry = (h, first) from ``initial_carry``.

    The hidden state restarts when ``first`` (the first call) or when ``ts.done``
    (the auto-reset timestep already holds the next episode's first observation).
    """
    h, first = carry
    first = first | ts.done
    x, cx = inputs(m, ts)
    firsts = jnp.broadcast_to(first[..., None], first.shape + (m.num_agents,))
    h, out, _ = apply(m, params, h, x, cx, firsts, ts.avail_actions)
    a = m.policy.to_env(jnp.where(greedy, m.policy.mode(out), m.policy.sample(key, out)[0]))
    return a, (h, jnp.zeros_like(first))


def rollout_step(m: PPOParts, env, state: TrainState, key):
    """One environment step of every parallel env; the Transition it stores."""
    ts = state.last_ts
    E, A = m.config.num_envs, m.num_agents
    k_act, k_env = jax.random.split(key)
    x, cx = inputs(m, ts)
    firsts = jnp.broadcast_to(state.first[:, None], (E, A))
    h, out, value = apply(m, state.params, state.h, x, cx, firsts, ts.avail_actions)
    action, logp = m.policy.sample(k_act, out)
    env_state, nts = jax.vmap(env.step)(jax.random.split(k_env, E), state.env_state, m.policy.to_env(action))
    if m.config.bootstrap_truncation:
        fx, fcx = inputs(m, nts._replace(obs=nts.info["final_obs"], state=nts.info["final_state"]))
        # the episode's last observation continues the hidden state of this step
        final_value = value_only(m, state.params, h, fx, fcx, jnp.zeros_like(firsts))
    else:
        final_value = jnp.zeros_like(value)
    stats = {k: v for k, v in nts.info.items() if k not in FINAL_KEYS}
    tr = Transition(
        x, cx, firsts, ts.avail_actions, action, logp, value, nts.reward, nts.done, nts.terminated, final_value, stats
    )
    state = state.replace(env_state=env_state, last_ts=nts, h=h, first=nts.done)
    return state, tr


def replay(m: PPOParts, params, h0, traj: Transition, with_carry: bool = False):
    """Policy outputs of ``params`` along the stored trajectory [T, E, A, P] (no
    gradient); with ``with_carry`` also the hidden state after its last step."""

    def step(h, xs):
        x, cx, first, avail = xs
        h, out, _ = apply(m, params, h, x, cx, first, avail)
        return h, out

    h, out = jax.lax.scan(step, h0, (traj.x, traj.cx, traj.first, traj.avail))
    out = jax.lax.stop_gradient(out)
    return (out, jax.lax.stop_gradient(h)) if with_carry else out


def reference_outputs(m: PPOParts, state: TrainState, h0, traj: Transition):
    """The regularizer's reference along the rollout [T, E, A, P] (no gradient) and the
    reference's hidden state after the rollout (``run`` only, else None).

    rollout: the policy that collected the data (a trust region, loss mode); initial:
    the frozen initial policy replayed with its own hidden state from the start of the
    rollout; run: a trained run's frozen policy, its hidden state carried across
    rollouts (``state.ref_params.h``); uniform: uniform over available actions. A
    regularizer that reads no reference (none, entropy) gets zeros.
    """
    R = m.regularizer
    if m.config.regularizer.reference == "run":
        return replay(m, state.ref_params.params, state.ref_params.h, traj, with_carry=True)
    if not R.divergence:
        return m.policy.no_reference(traj.avail), None
    ref = R.reference(
        rollout=lambda: replay(m, state.params, h0, traj),
        initial=lambda: replay(m, state.ref_params, jnp.zeros_like(h0), traj),
        uniform=lambda: jnp.where(traj.avail, 0.0, -1e10),
    )
    return ref, None


def loss_fn(m: PPOParts, params, h0, traj: Transition, ref_out, adv, targets, hp: HParams):
    """PPO's loss on a minibatch of whole sequences [T, mb, ...] (module docstring),
    plus the regularizer in loss mode."""

    def step(h, xs):
        x, cx, first, avail = xs
        h, out, value = apply(m, params, h, x, cx, first, avail)
        return h, (out, value)

    _, (out, value) = jax.lax.scan(step, h0, (traj.x, traj.cx, traj.first, traj.avail))
    logp, entropy = m.policy.log_prob_and_entropy(out, traj.action, traj.avail)
    entropy = entropy.mean()
    pg, ratio, approx_kl, clip_frac = clipped_policy_loss(logp, traj.logp, adv, hp.clip_eps)
    vf = clipped_value_loss(value, traj.value, targets, hp.clip_eps)
    loss = pg + hp.vf_coef * vf - hp.ent_coef * entropy
    reg_value = jnp.zeros(())
    if m.regularizer.as_loss:
        reg_loss, reg_v = m.regularizer.loss_term(
            m.policy.reg_view(out),
            m.policy.reg_view(ref_out),
            hp.reg_coef,
            hp.reg_epsilon,
            avail=traj.avail,
            action=traj.action,
        )
        loss = loss + reg_loss.mean()
        reg_value = reg_v.mean()
    metrics = dict(
        policy_loss=pg, value_loss=vf, entropy=entropy, approx_kl=approx_kl, clip_frac=clip_frac, regularizer=reg_value
    )
    return loss, metrics


def penalize(m: PPOParts, state: TrainState, h0, traj: Transition, ref_out, hp: HParams):
    """WPR: the regularizer's gradient (dual potential / log-ratio) at the taken action
    becomes a per-step reward penalty, then PPO runs unchanged. Also the divergence to a
    ``run`` reference on the rollout (categorical policies). Returns (traj, metrics)."""
    R, policy = m.regularizer, m.policy
    watch_run = m.config.regularizer.reference == "run" and policy.discrete
    if not (R.as_penalty or watch_run):
        return traj, {}
    pol_out = replay(m, state.params, h0, traj)
    metrics, watch = {}, {}
    if watch_run:
        # KL to the reference on the rollout, logged for every kind: a common divergence scale
        watch["reference_kl"] = reg.kl(pol_out, ref_out, traj.avail).mean()
    if not R.as_penalty:
        return traj, watch
    penalty, divergence = R.penalty(
        policy.reg_view(pol_out),
        policy.reg_view(ref_out),
        hp.reg_coef,
        hp.reg_epsilon,
        avail=traj.avail,
        action=traj.action,
    )
    if watch_run and R.config.kind == "wasserstein":
        # how far the Wasserstein penalty is from a rescaled KL log-ratio
        log_ratio = reg.log_probs(pol_out, traj.avail) - reg.log_probs(ref_out, traj.avail)
        taken = jnp.take_along_axis(log_ratio, traj.action[..., None], -1)[..., 0]
        watch["penalty_logratio_corr"] = reg.correlation(penalty, taken)
    # logged as "regularizer": the divergence to the reference on the rollout
    metrics = dict(regularizer=divergence.mean(), reward_penalty=penalty.mean(), **watch)
    return traj._replace(reward=traj.reward - penalty), metrics


def minibatch_epochs(grad_fn, tx, params, opt_state, key, epochs: int, num_items: int, num_minibatches: int):
    """``epochs`` passes over ``num_items`` items split into shuffled minibatches;
    ``grad_fn(params, idx) -> (grads, metrics)`` for the item indices ``idx``. Returns
    ((params, opt_state), metrics [epochs, num_minibatches, ...])."""

    def epoch(carry, key):
        perm = jax.random.permutation(key, num_items).reshape(num_minibatches, -1)

        def minibatch(carry, idx):
            params, opt_state = carry
            grads, metrics = grad_fn(params, idx)
            updates, opt_state = tx.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), metrics

        return jax.lax.scan(minibatch, carry, perm)

    return jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, epochs))


def annealed_lr(config, hp, update_step):
    """The learning rate of this update: linear to zero over the run with ``anneal_lr``."""
    frac = update_step / config.num_updates
    return hp.lr * (1.0 - frac) if config.anneal_lr else hp.lr


def update(m: PPOParts, env, state: TrainState):
    """One PPO iteration: a rollout of ``num_steps``, returns, and the epochs of
    minibatch updates."""
    config, hp, h0 = m.config, state.hparams, state.h
    E, A = config.num_envs, m.num_agents
    key, k_roll, k_perm = jax.random.split(state.key, 3)
    state, traj = jax.lax.scan(
        functools.partial(rollout_step, m, env), state, jax.random.split(k_roll, config.num_steps)
    )
    x, cx = inputs(m, state.last_ts)
    firsts = jnp.broadcast_to(state.first[:, None], (E, A))
    _, _, last_value = apply(m, state.params, state.h, x, cx, firsts, state.last_ts.avail_actions)
    ref_out, ref_h = reference_outputs(m, state, h0, traj)
    traj, reg_metrics = penalize(m, state, h0, traj, ref_out, hp)
    adv, targets = gae(
        traj.reward,
        traj.value,
        traj.done[..., None],
        traj.terminated[..., None],
        traj.final_value,
        last_value,
        hp.gamma,
        hp.gae_lambda,
        config.bootstrap_truncation,
    )
    lr = annealed_lr(config, hp, state.update_step)
    data = (traj._replace(info={}), ref_out, adv, targets)

    def grad_fn(params, idx):
        mb = jax.tree.map(lambda z: z[:, idx], data)  # [T, E, ...] -> [T, mb, ...]
        return jax.grad(functools.partial(loss_fn, m), has_aux=True)(params, h0[idx], *mb, hp)

    (params, opt_state), metrics = minibatch_epochs(
        grad_fn,
        m.tx,
        state.params,
        with_learning_rate(state.opt_state, lr),
        k_perm,
        config.update_epochs,
        E,
        config.num_minibatches,
    )
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics.update(reg_metrics)
    metrics.update(episode_metrics(traj.info))
    metrics["lr"] = lr
    if ref_h is not None:
        state = state.replace(ref_params=state.ref_params._replace(h=ref_h))
    state = state.replace(params=params, opt_state=opt_state, key=key, update_step=state.update_step + 1)
    return state, metrics


def make(env, config: PPOConfig, name: str = "ppo") -> Algorithm:
    """IPPO / MAPPO on ``env``: the pieces above bound to its spec and ``config``."""
    m = make_parts(env.spec, config, name)
    run_params = load_reference(m)
    return Algorithm(
        name,
        config,
        env,
        functools.partial(init, m, env, run_params),
        functools.partial(update, m, env),
        functools.partial(act, m),
        functools.partial(initial_carry, m),
        config.num_envs * config.num_steps,
    )
