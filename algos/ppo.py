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

Shared pieces live in marl/ (``algos.dec_pomfc`` uses them too): ``marl.returns.gae``,
the clipped losses and Gaussian helpers in ``marl.losses``, and
``marl.regularizers.gaussian_regularizer``; :func:`make_optimizer` is here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from marl import config as cfg
from marl import regularizers as reg
from marl.episodes import FINAL_KEYS, episode_metrics
from marl.losses import clipped_policy_loss, clipped_value_loss, gaussian_entropy, gaussian_log_prob, split_gaussian
from marl.networks import ActorCritic
from marl.optim import descent, with_learning_rate
from marl.regularizers import gaussian_regularizer
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


def make(env, config: PPOConfig, name: str = "ppo") -> Algorithm:  # noqa: C901
    spec = env.spec
    discrete = spec.discrete
    A, E, T = spec.num_agents, config.num_envs, config.num_steps
    # n: the avail-mask width (1 for continuous envs); P: policy outputs per agent
    # (logits, or [mean, log_std] of a Gaussian)
    n = spec.num_actions if discrete else 1
    rcfg = config.regularizer
    if config.agent_ids and A > MAX_AGENT_IDS:
        raise cfg.ConfigError(
            "agent_ids",
            True,
            f"one-hot ids for {A} agents would add {A} inputs per agent ({A}x{A} floats per step and "
            f"environment); allowed up to {MAX_AGENT_IDS} agents: pass agent_ids=False (--no-agent-ids)",
        )
    if not discrete:
        if spec.action_dim is None:
            raise cfg.ConfigError("env", spec.name, f"{name} needs num_actions or action_dim in the env spec")
        reg.check_usage(rcfg, who=f"{name} on continuous actions", gaussian=True)
    centralized = config.critic == "centralized"
    if discrete:
        net = ActorCritic(n, config.hidden, config.recurrent, shared_torso=not centralized)
    else:
        net = GaussianActorCritic(
            spec.action_dim,
            config.hidden,
            config.recurrent,
            shared_torso=not centralized,
            log_std_init=config.log_std_init,
        )
    ids = jnp.eye(A) if config.agent_ids else jnp.zeros((A, 0))
    cost = None if spec.action_cost is None else jnp.asarray(spec.action_cost, jnp.float32)
    low, high = spec.action_low, spec.action_high

    def regularizer(logits, ref_logits, avail, hp: HParams):
        return reg.regularize(
            rcfg.kind,
            logits,
            ref_logits,
            hp.reg_coef,
            mask=avail,
            cost=cost,
            epsilon=hp.reg_epsilon,
            iterations=rcfg.iterations,
            centred=rcfg.centred,
            backend=rcfg.backend,
        )

    def continuous_regularizer(pol, ref_pol, action, hp: HParams):
        mean, log_std = split_gaussian(pol)
        ref_mean, ref_log_std = split_gaussian(ref_pol)
        return gaussian_regularizer(rcfg.kind, mean, log_std, ref_mean, ref_log_std, action, hp.reg_coef)

    def sample(key, pol):
        """Unclipped sample [.., A] (discrete) or [.., A, d] and its log-probability."""
        if discrete:
            a = jax.random.categorical(key, pol)
            return a, jnp.take_along_axis(jax.nn.log_softmax(pol), a[..., None], -1)[..., 0]
        mean, log_std = split_gaussian(pol)
        a = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
        return a, gaussian_log_prob(mean, log_std, a)

    def to_env(a):
        """The action the environment receives: continuous samples are clipped to its bounds."""
        return a if discrete else jnp.clip(a, low, high)

    tx = make_optimizer(config.max_grad_norm)
    value_method = type(net).value

    # ------------------------------------------------------------------ network I/O
    def inputs(ts: Timestep):
        """Actor input [.., A, obs+ids] and critic input [.., A, (state|obs)+ids]."""
        lead = ts.obs.shape[:-2]
        idb = jnp.broadcast_to(ids, lead + ids.shape)
        x = jnp.concatenate([ts.obs, idb], -1)
        if centralized:
            s = jnp.broadcast_to(ts.state[..., None, :], lead + (A, ts.state.shape[-1]))
            return x, jnp.concatenate([s, idb], -1)
        return x, x

    def apply(params, h, x, cx, first, avail):
        if config.shared_params:
            return net.apply(params, h, x, cx, first, avail)
        # per-agent parameters: params have a leading [A] axis; map over the agent axis
        f = jax.vmap(net.apply, in_axes=(0, -3, -2, -2, -1, -2), out_axes=(-3, -2, -1))
        return f(params, h, x, cx, first, avail)

    def value_only(params, h, x, cx, first):
        if config.shared_params:
            return net.apply(params, h, x, cx, first, method=value_method)
        f = jax.vmap(lambda p, *a: net.apply(p, *a, method=value_method), in_axes=(0, -3, -2, -2, -1), out_axes=-1)
        return f(params, h, x, cx, first)

    def init_params(key):
        x0 = jnp.zeros((1, A, spec.obs_dim + ids.shape[1]))
        cx0 = jnp.zeros((1, A, (spec.state_dim if centralized else spec.obs_dim) + ids.shape[1]))
        h0, f0, av0 = jnp.zeros((1, A, 2, config.hidden)), jnp.zeros((1, A), bool), jnp.ones((1, A, n), bool)
        if config.shared_params:
            return net.init(key, h0, x0, cx0, f0, av0)
        keys = jax.random.split(key, A)
        return jax.vmap(lambda k: net.init(k, h0[:, 0], x0[:, 0], cx0[:, 0], f0[:, 0], av0[:, 0]))(keys)

    def initial_carry(batch_shape=()):
        return (jnp.zeros(batch_shape + (A, 2, config.hidden)), jnp.ones(batch_shape, bool))

    # reference "run": a trained run's parameters, checked (environment, shapes) and
    # loaded here, before anything compiles; one reference shared by every vmapped row
    run_params = None
    if rcfg.reference == "run":
        from marl.reference import load_run_params

        run_params = load_run_params(
            rcfg.reference_run,
            jax.eval_shape(init_params, jax.random.PRNGKey(0)),
            env_name=spec.name,
            seed_index=rcfg.reference_seed,
        )

    # ------------------------------------------------------------------ init
    def init(key) -> TrainState:
        k_param, k_env, key = jax.random.split(key, 3)
        params = init_params(k_param)
        env_state, ts = jax.vmap(env.reset)(jax.random.split(k_env, E))
        h, first = initial_carry((E,))
        hp = hparams(
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
        ref_params = params
        if run_params is not None:
            ref_params = RunReference(run_params, jnp.zeros_like(h))
            if rcfg.init_from_reference:
                params = run_params
        return TrainState(
            params, ref_params, tx.init(params), env_state, ts, h, first, key, jnp.zeros((), jnp.int32), hp
        )

    # ------------------------------------------------------------------ acting
    def act(params, ts: Timestep, carry, key, greedy=False):
        """ts: a (batched) Timestep; carry = (h, first) from ``initial_carry``.

        The hidden state restarts when ``first`` (the first call) or when ``ts.done``
        (the auto-reset timestep already holds the next episode's first observation).
        """
        h, first = carry
        first = first | ts.done
        x, cx = inputs(ts)
        firsts = jnp.broadcast_to(first[..., None], first.shape + (A,))
        h, logits, _ = apply(params, h, x, cx, firsts, ts.avail_actions)
        if discrete:
            a = jnp.where(greedy, jnp.argmax(logits, -1), jax.random.categorical(key, logits))
        else:
            a = to_env(jnp.where(greedy, split_gaussian(logits)[0], sample(key, logits)[0]))
        return a, (h, jnp.zeros_like(first))

    # ------------------------------------------------------------------ update
    def rollout_step(carry, key):
        state: TrainState = carry
        ts = state.last_ts
        k_act, k_env = jax.random.split(key)
        x, cx = inputs(ts)
        firsts = jnp.broadcast_to(state.first[:, None], (E, A))
        h, logits, value = apply(state.params, state.h, x, cx, firsts, ts.avail_actions)
        action, logp = sample(k_act, logits)
        env_state, nts = jax.vmap(env.step)(jax.random.split(k_env, E), state.env_state, to_env(action))
        if config.bootstrap_truncation:
            fx, fcx = inputs(nts._replace(obs=nts.info["final_obs"], state=nts.info["final_state"]))
            # the episode's last observation continues the hidden state of this step
            final_value = value_only(state.params, h, fx, fcx, jnp.zeros_like(firsts))
        else:
            final_value = jnp.zeros_like(value)
        stats = {k: v for k, v in nts.info.items() if k not in FINAL_KEYS}
        tr = Transition(
            x,
            cx,
            firsts,
            ts.avail_actions,
            action,
            logp,
            value,
            nts.reward,
            nts.done,
            nts.terminated,
            final_value,
            stats,
        )
        state = state.replace(env_state=env_state, last_ts=nts, h=h, first=nts.done)
        return state, tr

    def advantages(traj: Transition, last_value, hp: HParams):
        return gae(
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

    def loss_fn(params, h0, traj: Transition, ref_logits, adv, targets, hp: HParams):
        def step(h, xs):
            x, cx, first, avail = xs
            h, logits, value = apply(params, h, x, cx, first, avail)
            return h, (logits, value)

        _, (logits, value) = jax.lax.scan(step, h0, (traj.x, traj.cx, traj.first, traj.avail))
        if discrete:
            logp_all = jax.nn.log_softmax(logits)
            logp = jnp.take_along_axis(logp_all, traj.action[..., None], -1)[..., 0]
        else:
            mean, log_std = split_gaussian(logits)
            logp = gaussian_log_prob(mean, log_std, traj.action)
        pg, ratio, approx_kl, clip_frac = clipped_policy_loss(logp, traj.logp, adv, hp.clip_eps)
        vf = clipped_value_loss(value, traj.value, targets, hp.clip_eps)
        if discrete:
            probs = jnp.exp(logp_all)
            entropy = -(probs * jnp.where(traj.avail, logp_all, 0.0)).sum(-1).mean()
        else:
            entropy = gaussian_entropy(log_std).mean()
        loss = pg + hp.vf_coef * vf - hp.ent_coef * entropy
        reg_value = jnp.zeros(())
        if rcfg.kind != "none" and rcfg.mode == "loss":
            if discrete:
                out = regularizer(logits, ref_logits, traj.avail, hp)
                reg_loss, reg_v = out.loss, out.value
            else:
                reg_loss, _, reg_v = continuous_regularizer(logits, ref_logits, traj.action, hp)
            loss = loss + reg_loss.mean()
            reg_value = reg_v.mean()
        return loss, dict(
            policy_loss=pg,
            value_loss=vf,
            entropy=entropy,
            approx_kl=approx_kl,
            clip_frac=clip_frac,
            regularizer=reg_value,
        )

    def reference_logits(state: TrainState, h0, traj: Transition):
        """Reference policy logits along the rollout [T, E, A, n] (no gradient); for
        continuous actions the reference Gaussian's [mean, log_std] [T, E, A, 2d].

        rollout: the policy that collected the data (a trust region, loss mode);
        initial: the frozen initial policy replayed with its own hidden state from
        the start of the rollout; run: a trained run's frozen policy, its hidden
        state carried across rollouts (``state.ref_params.h``); uniform: uniform over
        available actions. Returns (logits, the reference's hidden state after the
        rollout, or None).
        """
        if rcfg.reference == "run":
            return _replay_logits(state.ref_params.params, state.ref_params.h, traj, with_carry=True)
        if rcfg.kind == "none":
            return jnp.zeros(traj.avail.shape, jnp.float32), None
        if not discrete and rcfg.kind == "entropy":
            return jnp.zeros(traj.avail.shape[:-1] + (2 * spec.action_dim,), jnp.float32), None
        if rcfg.reference == "uniform":
            return jnp.where(traj.avail, 0.0, -1e10), None
        if rcfg.reference == "initial":
            return _replay_logits(state.ref_params, jnp.zeros_like(h0), traj), None
        return _replay_logits(state.params, h0, traj), None

    def update(state: TrainState):
        hp = state.hparams
        h0 = state.h
        key, k_roll, k_perm = jax.random.split(state.key, 3)
        state, traj = jax.lax.scan(rollout_step, state, jax.random.split(k_roll, T))
        x, cx = inputs(state.last_ts)
        firsts = jnp.broadcast_to(state.first[:, None], (E, A))
        _, _, last_value = apply(state.params, state.h, x, cx, firsts, state.last_ts.avail_actions)
        ref_logits, ref_h = reference_logits(state, h0, traj)
        penalized = rcfg.kind != "none" and rcfg.mode == "penalty"
        watch_run = rcfg.reference == "run" and discrete
        pol_logits = _replay_logits(state.params, h0, traj) if penalized or watch_run else None
        reference_metrics = {}
        if watch_run:
            # KL to the reference on the rollout, logged for every kind: a common divergence scale
            reference_metrics["reference_kl"] = reg.kl(pol_logits, ref_logits, traj.avail).mean()
        if penalized:
            # WPR: the regularizer's gradient (dual potential / log-ratio) at the taken
            # action becomes a per-step reward penalty; PPO then runs unchanged
            if discrete:
                out = regularizer(pol_logits, ref_logits, traj.avail, hp)
                taken = lambda v: jnp.take_along_axis(v, traj.action[..., None], -1)[..., 0]
                penalty = taken(out.penalty)
                divergence = out.value
                if watch_run and rcfg.kind == "wasserstein":
                    # how far the Wasserstein penalty is from a rescaled KL log-ratio
                    log_ratio = reg.log_probs(pol_logits, traj.avail) - reg.log_probs(ref_logits, traj.avail)
                    reference_metrics["penalty_logratio_corr"] = reg.correlation(penalty, taken(log_ratio))
            else:
                _, penalty, divergence = continuous_regularizer(
                    _replay_logits(state.params, h0, traj), ref_logits, traj.action, hp
                )
            traj = traj._replace(reward=traj.reward - penalty)
            # logged as "regularizer": the divergence to the reference on the rollout
            penalty_metrics = dict(regularizer=divergence.mean(), reward_penalty=penalty.mean())
        else:
            penalty_metrics = {}
        adv, targets = advantages(traj, last_value, hp)

        frac = state.update_step / config.num_updates
        lr = hp.lr * (1.0 - frac) if config.anneal_lr else hp.lr

        def epoch(carry, key):
            params, opt_state = carry
            perm = jax.random.permutation(key, E).reshape(config.num_minibatches, -1)

            def minibatch(carry, idx):
                params, opt_state = carry
                take_t = lambda z: z[:, idx]  # [T, E, ...] -> [T, mb, ...]
                mb = jax.tree.map(take_t, (traj._replace(info={}), ref_logits, adv, targets))
                grads, metrics = jax.grad(loss_fn, has_aux=True)(params, h0[idx], *mb, hp)
                updates, opt_state = tx.update(grads, opt_state)
                params = optax.apply_updates(params, updates)
                return (params, opt_state), metrics

            return jax.lax.scan(minibatch, (params, opt_state), perm)

        (params, opt_state), metrics = jax.lax.scan(
            epoch,
            (state.params, with_learning_rate(state.opt_state, lr)),
            jax.random.split(k_perm, config.update_epochs),
        )
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics.update(penalty_metrics)
        metrics.update(reference_metrics)
        metrics.update(episode_metrics(traj.info))
        metrics["lr"] = lr
        if ref_h is not None:
            state = state.replace(ref_params=state.ref_params._replace(h=ref_h))
        state = state.replace(params=params, opt_state=opt_state, key=key, update_step=state.update_step + 1)
        return state, metrics

    def _replay_logits(params, h0, traj: Transition, with_carry=False):
        """Logits of ``params`` along the stored trajectory (no gradient); with
        ``with_carry`` also the hidden state after its last step."""

        def step(h, xs):
            x, cx, first, avail = xs
            h, logits, _ = apply(params, h, x, cx, first, avail)
            return h, logits

        h, logits = jax.lax.scan(step, h0, (traj.x, traj.cx, traj.first, traj.avail))
        logits = jax.lax.stop_gradient(logits)
        return (logits, jax.lax.stop_gradient(h)) if with_carry else logits

    return Algorithm(name, config, env, init, update, act, initial_carry, E * T)
