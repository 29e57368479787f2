r"""SAC: soft actor-critic with twin critics and automatic temperature, per agent.

Papers: Haarnoja et al. 2018, "Soft Actor-Critic: Off-Policy Maximum Entropy Deep
RL with a Stochastic Actor" (ICML), and Haarnoja et al. 2018, "Soft Actor-Critic
Algorithms and Applications" (arXiv:1812.05905: twin critics, automatic
temperature). The backbone of QARL (``../shared/specs/qarl.md``).

Equations (per agent i with observation o, action a in the env's box; the agent
axis is an array axis, each agent is an independent learner on its own reward):
  policy     u ~ N(mu(o), sigma(o)),  a = mid + half * tanh(u)  (mid, half: box centre, half-width)
             log pi(a|o) = log N(u) - sum log(half * (1 - tanh(u)^2))
  critics    y = r + gamma (1 - term) (min_j Qbar_j(o', a') - alpha log pi(a'|o')),  a' ~ pi(.|o')
             L_Q = 1/2 sum_j E[(Q_j(o, a) - y)^2]         (Qbar: Polyak targets, tau)
  actor      L_pi = E[alpha log pi(a~|o) - min_j Q_j(o, a~)],  a~ ~ pi(.|o) (reparameterized)
  temperature L_alpha = -log(alpha) E[log pi(a~|o) + H_target],  H_target = -action_dim
             (the gradient of the paper's -alpha E[log pi + H_target] has the same sign;
             optimizing log alpha keeps alpha > 0)
  targets    Qbar <- tau Q + (1 - tau) Qbar, after every gradient step
Truncated episodes bootstrap from their true final observation (``info["final_obs"]``
of the auto-reset wrapper); only ``terminated`` stops the bootstrap.

One ``update``: ``num_steps`` steps in each of ``num_envs`` environments (uniformly
random actions until ``learning_starts`` transitions have been collected), the
transitions go into a ring replay buffer, then ``train_steps`` gradient steps on
batches of ``batch_size`` (updates-to-data ratio = train_steps / (num_envs * num_steps)),
once ``learning_starts`` transitions have been collected.

Agents (``agents``):
- ``"independent"`` (default): each agent has its own actor, critics and temperature;
  parameters are stacked on a leading ``[A]`` axis and applied with ``vmap`` over the
  agent axis (heterogeneous players, e.g. QARL's protagonist and adversary).
- ``"shared"``: one actor and one pair of critics for all agents, with a one-hot agent
  id appended to the observation (``agent_ids``); the temperature is still per agent.
Freezing: ``TrainState.train_mask [A]`` says which agents learn (actor, critics,
targets, temperature, optimizer state: all kept for a frozen agent, which still
acts with its stochastic policy). It starts from ``frozen_agents`` and an algorithm
built on SAC may change it between updates (alternating phases of a game).
``TrainState.tune_alpha [A]`` turns the temperature update off per agent; the
temperature is ``exp(params.log_alpha)``, which such an algorithm may also set.

Hooks for algorithms built on SAC (QARL, ``algos/qarl.py``); none changes plain SAC:
- ``temperature_from_obs`` (config): agents whose temperature is not ``exp(log_alpha)``
  but ``exp(o[-1])``, the last entry of their own observation, per transition: the
  actor loss uses the transition's ``o``, the soft target its ``o'``. An environment
  wrapper that fixes a temperature per episode and appends its log to the observation
  so gives that agent a per-episode temperature in both places (QARL's adversary).
  These agents' ``log_alpha`` is neither used nor tuned.
- ``TrainState.ext``: the state of the algorithm built on SAC (QARL's curriculum),
  carried unchanged by SAC's ``update``; ``None`` for SAC.
- :func:`make_parts` also gives ``update_with_rollout(state) -> (state, metrics,
  Rollout)``: the same update, returning the iteration's per-step arrays (``done [T, E]``,
  ``ret [T, E, A]``: the running per-agent return, the episode's return where ``done``;
  ``info``: the environment's ``Timestep.info``, leaves ``[T, E, ...]``) for an algorithm
  built on SAC (QARL's curriculum reads the finished episodes from it).

Regularizer (the shared block, ``marl.regularizers``): ``kind="entropy"`` (default)
is SAC's own maximum-entropy term above, with temperature alpha (``init_alpha``,
``autotune``; ``regularizer.coef`` is not used). ``kind="none"`` drops it (alpha = 0,
never tuned). ``kind="kl"`` / ``"wasserstein"`` keep SAC's entropy term and add
``coef * D(pi(.|o), pi_ref(.|o))`` to the actor loss, in closed form between the
diagonal Gaussians before the tanh (KL(pi || ref) or squared W2); the reference is
the frozen initial actor (``reference="initial"``) or the actor at the start of the
update (``"rollout"``: a trust region toward the previous iterate). Only
``mode="loss"`` applies (an off-policy reward penalty would be stale).

Choices and deviations:
- Networks: ``num_layers`` x ``hidden`` ReLU MLPs (paper: 2 x 256; QARL: 3 x 256)
  with PyTorch's default initialization (as the reference code; no QR, so vmapped
  init is safe), zero biases; log-std clipped to [log_std_min, log_std_max]
  (QARL: [-20, 2]).
- The actor loss uses the critics after this gradient step's critic update (as in
  most implementations); one actor and one temperature step per critic step.
- Adam without gradient clipping; learning rates, gamma, tau, the target entropy and
  the regularizer coefficient are arrays in ``TrainState.hparams`` (sweepable).
- Gradient steps only start once the buffer holds ``learning_starts`` transitions and
  at least one batch; the decision is shared by the runner's vmapped seeds
  (``max_over_seeds``) so it stays a real branch.
- Metrics report ``return`` (the mean over agents, ``EpisodeStats``) and, with more
  than one agent, ``return_agent{i}``: for a zero-sum game the mean is 0 and the
  per-agent returns are the informative ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple, Optional, Sequence

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from marl import buffers
from marl import config as cfg
from marl import regularizers as reg
from marl.episodes import episode_metrics
from marl.networks import relu_stack
from marl.optim import descent, with_learning_rate
from marl.types import Algorithm, Timestep, hparams, max_over_seeds


def _default_regularizer() -> reg.RegularizerConfig:
    return reg.RegularizerConfig(kind="entropy", mode="loss")


@dataclasses.dataclass(frozen=True)
class SACConfig(cfg.RunConfig):
    """SAC settings. ``agents``: "independent" (per-agent parameters) or "shared"."""

    agents: Literal["independent", "shared"] = "independent"
    total_steps: int = 100_000
    num_envs: int = 4
    num_steps: int = 4
    train_steps: int = 16
    batch_size: int = 256
    buffer_size: int = 1_000_000
    learning_starts: int = 5_000
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    init_alpha: float = 1.0
    autotune: bool = True
    target_entropy: Optional[float] = None
    """None: -action_dim"""
    hidden: int = 256
    num_layers: int = 2
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    agent_ids: bool = True
    """shared mode: append a one-hot agent id to the observation"""
    frozen_agents: tuple[int, ...] = ()
    """agents that never learn (their initial policy acts)"""
    temperature_from_obs: tuple[int, ...] = ()
    """agents whose temperature is exp(last observation entry), per transition (QARL's adversary)"""
    regularizer: reg.RegularizerConfig = dataclasses.field(default_factory=_default_regularizer)

    def __post_init__(self):
        cfg.check_choice("agents", self.agents, ["independent", "shared"])
        for f in (
            "total_steps",
            "num_envs",
            "num_steps",
            "train_steps",
            "batch_size",
            "buffer_size",
            "hidden",
            "num_layers",
        ):
            cfg.check_positive(f, getattr(self, f), integer=True)
        cfg.check_nonnegative("learning_starts", self.learning_starts)
        for f in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
            cfg.check_positive(f, getattr(self, f))
        cfg.check_range("gamma", self.gamma, 0.0, 1.0)
        cfg.check_range("tau", self.tau, 0.0, 1.0, lo_open=True)
        if self.target_entropy is not None and not isinstance(self.target_entropy, (int, float)):
            raise cfg.ConfigError("target_entropy", self.target_entropy, "must be a number or None (-action_dim)")
        if not self.log_std_min < self.log_std_max:
            raise cfg.ConfigError("log_std_min", self.log_std_min, f"must be < log_std_max={self.log_std_max}")
        for f in ("frozen_agents", "temperature_from_obs"):
            if any(not isinstance(i, int) or i < 0 for i in getattr(self, f)):
                raise cfg.ConfigError(f, getattr(self, f), "must be agent indices >= 0")
        reg.check_usage(self.regularizer, who="SAC", gaussian=True, loss_only=True)
        cfg.check_total_steps(self.total_steps, self.num_envs, self.num_steps)


class HParams(NamedTuple):
    actor_lr: jax.Array
    critic_lr: jax.Array
    alpha_lr: jax.Array
    gamma: jax.Array
    tau: jax.Array
    target_entropy: jax.Array
    reg_coef: jax.Array


class Transition(NamedTuple):
    obs: jax.Array  # [..., A, obs_dim]
    action: jax.Array  # [..., A, action_dim]
    reward: jax.Array  # [..., A]
    next_obs: jax.Array  # [..., A, obs_dim] (the episode's final obs when it ended)
    terminated: jax.Array  # [...]


def transition_fields(spec) -> dict:
    """Each replayed Transition array's shape after its leading dims, and its dtype
    (``marl.types.assert_fields``)."""
    A, f32 = spec.num_agents, jnp.float32
    return dict(
        obs=((A, spec.obs_dim), f32),
        action=((A, spec.action_dim), f32),
        reward=((A,), f32),
        next_obs=((A, spec.obs_dim), f32),
        terminated=((), bool),
    )


# PyTorch's default Linear init, as in the SAC reference code: U(+-1/sqrt(fan_in)) weights.
# It needs no QR (see marl/networks.py on batched QR) and compiles far faster than the
# orthogonal initializer's Gram-Schmidt loop.
_torch_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_dense(features: int) -> nn.Dense:
    return nn.Dense(features, kernel_init=_torch_init)


def _mlp(x, hidden: Sequence[int]):
    return relu_stack(x, hidden, _torch_dense)


class Actor(nn.Module):
    action_dim: int
    hidden: Sequence[int]
    log_std_min: float
    log_std_max: float

    @nn.compact
    def __call__(self, x):
        h = _mlp(x, self.hidden)
        mean = nn.Dense(self.action_dim, kernel_init=_torch_init)(h)
        log_std = nn.Dense(self.action_dim, kernel_init=_torch_init)(h)
        return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)


class TwinQ(nn.Module):
    hidden: Sequence[int]

    @nn.compact
    def __call__(self, x, a):
        xa = jnp.concatenate([x, a], -1)
        return tuple(nn.Dense(1, kernel_init=_torch_init)(_mlp(xa, self.hidden))[..., 0] for _ in range(2))


@struct.dataclass
class Params:
    actor: Any
    critic: Any
    log_alpha: jax.Array  # [A]


@struct.dataclass
class TrainState:
    params: Params
    target_critic: Any
    ref_actor: Any  # frozen initial actor (regularizer reference "initial"), else None
    opt_actor: Any
    opt_critic: Any
    opt_alpha: Any
    buffer: buffers.Replay
    env_state: Any
    last_ts: Timestep  # [E, ...]
    episode_return: jax.Array  # [E, A] running per-agent return
    train_mask: jax.Array  # [A] bool, which agents learn
    tune_alpha: jax.Array  # [A] bool, which temperatures are tuned
    env_steps: jax.Array  # [] int32, transitions collected (all envs)
    key: jax.Array
    hparams: HParams
    ext: Any = None  # state of an algorithm built on SAC; carried unchanged


class SACNets(NamedTuple):
    """The static pieces of a SAC learner: its networks, the agent layout (``shared``: one
    parameter tree for all agents, else a leading [A] axis on every leaf) and the action box."""

    actor: Actor
    critic: TwinQ
    shared: bool
    ids: jax.Array  # [A, A] one-hot ids (shared mode with agent_ids) or [A, 0]
    num_agents: int
    action_dim: int
    in_dim: int
    mid: float  # centre of the action box
    half: float  # half-width of the action box


def make_nets(spec, config: SACConfig) -> SACNets:
    A, d = spec.num_agents, spec.action_dim
    shared = config.agents == "shared"
    ids = jnp.eye(A) if (shared and config.agent_ids) else jnp.zeros((A, 0))
    hidden = (config.hidden,) * config.num_layers
    low, high = float(spec.action_low), float(spec.action_high)
    return SACNets(
        Actor(d, hidden, config.log_std_min, config.log_std_max),
        TwinQ(hidden),
        shared,
        ids,
        A,
        d,
        spec.obs_dim + ids.shape[1],
        (high + low) / 2,
        (high - low) / 2,
    )


def net_inputs(nets: SACNets, obs):
    """[..., A, obs_dim] -> [..., A, in_dim] (one-hot ids appended in shared mode)."""
    return jnp.concatenate([obs, jnp.broadcast_to(nets.ids, obs.shape[:-1] + nets.ids.shape[-1:])], -1)


def actor_apply(nets: SACNets, p, x):
    """(mean, log_std) [..., A, d] of the pre-tanh Gaussian."""
    if nets.shared:
        return nets.actor.apply(p, x)
    return jax.vmap(nets.actor.apply, in_axes=(0, -2), out_axes=-2)(p, x)


def critic_apply(nets: SACNets, p, x, a):
    """The twin Q-values, each [..., A]."""
    if nets.shared:
        return nets.critic.apply(p, x, a)
    return jax.vmap(nets.critic.apply, in_axes=(0, -2, -2), out_axes=-1)(p, x, a)


def tanh_policy(nets: SACNets, mean, log_std):
    """The tanh-squashed diagonal Gaussian, rescaled to the action box."""
    bijector = distrax.Block(distrax.Chain([distrax.ScalarAffine(shift=nets.mid, scale=nets.half), distrax.Tanh()]), 1)
    return distrax.Transformed(distrax.MultivariateNormalDiag(mean, jnp.exp(log_std)), bijector)


def init_params(nets: SACNets, key):
    """(actor, critic) parameters."""
    k_a, k_c = jax.random.split(key)
    x0, a0 = jnp.zeros((1, nets.in_dim)), jnp.zeros((1, nets.action_dim))
    if nets.shared:
        return nets.actor.init(k_a, x0), nets.critic.init(k_c, x0, a0)
    return (
        jax.vmap(lambda k: nets.actor.init(k, x0))(jax.random.split(k_a, nets.num_agents)),
        jax.vmap(lambda k: nets.critic.init(k, x0, a0))(jax.random.split(k_c, nets.num_agents)),
    )


def masked_step(tx, p, grads, opt_state, lr, mask, agent_axis: bool):
    """One Adam step; agents outside ``mask`` [A] keep parameters and optimizer state."""
    stepped = with_learning_rate(opt_state, lr)
    if agent_axis:
        upd, new_os = jax.vmap(tx.update)(grads, stepped)
        keep = lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)
    else:
        upd, new_os = tx.update(grads, stepped)
        keep = lambda n, o: jnp.where(mask.any(), n, o)
    new_p = optax.apply_updates(p, upd)
    return jax.tree.map(keep, new_p, p), jax.tree.map(keep, new_os, opt_state), keep


def make_regularizer(config: SACConfig) -> reg.Regularizer:
    """SAC's regularizer: ``entropy`` is SAC's own maximum-entropy term (its temperature
    alpha); ``kl`` / ``wasserstein`` add the divergence to the ``initial`` or ``rollout``
    (current) actor to the actor's loss, besides the entropy term."""
    return reg.build(
        config.regularizer, who="SAC", policy="gaussian", references=("rollout", "initial"), loss_only=True
    )


def grad_step(nets: SACNets, tx, config: SACConfig, obs_temp, carry, key):
    """One SAC gradient step on a replay batch: the twin critics toward the soft Bellman
    target, the actor by reparameterized soft policy improvement (plus the regularizer's
    divergence to ``ref_actor``), the temperatures toward the target entropy. Agents
    outside ``state.train_mask`` keep their parameters. ``carry = (state, ref_actor)``."""
    R = make_regularizer(config)
    use_entropy = R.active
    per_agent = not nets.shared
    A = nets.num_agents
    inputs = functools.partial(net_inputs, nets)
    actor = functools.partial(actor_apply, nets)
    critic = functools.partial(critic_apply, nets)
    policy = functools.partial(tanh_policy, nets)
    state, ref_actor = carry
    hp, p, mask = state.hparams, state.params, state.train_mask
    k_batch, k_next, k_pi = jax.random.split(key, 3)
    b = buffers.replay_sample(state.buffer, k_batch, config.batch_size)
    x, nx = inputs(b.obs), inputs(b.next_obs)  # [B, A, in]
    alpha = jnp.exp(p.log_alpha) if use_entropy else jnp.zeros((A,))
    next_alpha = alpha
    if use_entropy and config.temperature_from_obs:  # [B, A]: per-transition temperatures
        alpha, next_alpha = (jnp.where(obs_temp, jnp.exp(o[..., -1]), alpha) for o in (b.obs, b.next_obs))
    n_train = jnp.maximum(mask.sum(), 1)

    # critics: soft Bellman targets from the Polyak-averaged critics
    next_action, next_logp = policy(*actor(p.actor, nx)).sample_and_log_prob(seed=k_next)
    tq1, tq2 = critic(state.target_critic, nx, next_action)
    not_term = 1.0 - b.terminated.astype(jnp.float32)[:, None]
    y = jax.lax.stop_gradient(b.reward + hp.gamma * not_term * (jnp.minimum(tq1, tq2) - next_alpha * next_logp))

    def critic_loss(cp):
        q1, q2 = critic(cp, x, b.action)
        per_agent = 0.5 * ((q1 - y) ** 2 + (q2 - y) ** 2).mean(0)  # [A]
        return (per_agent * mask).sum() / n_train, (per_agent, q1.mean(0))

    c_grads, (c_loss, q_mean) = jax.grad(critic_loss, has_aux=True)(p.critic)
    critic_p, opt_critic, keep = masked_step(tx, p.critic, c_grads, state.opt_critic, hp.critic_lr, mask, per_agent)
    target = jax.tree.map(lambda t, c: hp.tau * c + (1 - hp.tau) * t, state.target_critic, critic_p)
    target = jax.tree.map(keep, target, state.target_critic)

    # actor: reparameterized soft policy improvement against the updated critics
    def actor_loss(ap):
        mean, log_std = actor(ap, x)
        a, logp = policy(mean, log_std).sample_and_log_prob(seed=k_pi)
        q1, q2 = critic(critic_p, x, a)
        per_agent = (alpha * logp - jnp.minimum(q1, q2)).mean(0)
        div = jnp.zeros((A,))
        if R.divergence:
            div = R.divergence_to((mean, log_std), actor(ref_actor, x)).mean(0)
            per_agent = per_agent + hp.reg_coef * div
        return (per_agent * mask).sum() / n_train, (per_agent, logp, div)

    a_grads, (a_loss, logp, div) = jax.grad(actor_loss, has_aux=True)(p.actor)
    actor_p, opt_actor, _ = masked_step(tx, p.actor, a_grads, state.opt_actor, hp.actor_lr, mask, per_agent)

    # temperature: raise alpha when the entropy is below the target, lower it above
    entropy = -logp.mean(0)  # [A]
    alpha_grad = jax.lax.stop_gradient(entropy - hp.target_entropy)  # d/dlog_alpha of L_alpha
    log_alpha, opt_alpha, _ = masked_step(
        tx, p.log_alpha, alpha_grad, state.opt_alpha, hp.alpha_lr, mask & state.tune_alpha, True
    )

    state = state.replace(
        params=Params(actor_p, critic_p, log_alpha),
        target_critic=target,
        opt_actor=opt_actor,
        opt_critic=opt_critic,
        opt_alpha=opt_alpha,
    )
    metrics = {"critic_loss": c_loss, "actor_loss": a_loss, "q": q_mean, "entropy": entropy, "regularizer": div}
    return (state, ref_actor), metrics


def iteration_metrics(stats: dict, learn_metrics: dict, done, ret, alpha, ready) -> dict:
    """One iteration's logged metrics: the finished episodes' statistics, the learner's
    (averaged over agents), the temperature and, with several agents, each agent's return
    (``ret`` [T, E, A] where ``done`` [T, E]) and temperature."""
    metrics = episode_metrics(stats) if stats else {}
    n_done = done.sum()
    per_agent_return = (ret * done[..., None]).sum((0, 1)) / jnp.maximum(n_done, 1)
    for k, v in learn_metrics.items():
        metrics[k] = v.mean()  # over agents
    metrics["alpha"] = alpha.mean()
    if alpha.shape[0] > 1:
        for i in range(alpha.shape[0]):
            metrics[f"return_agent{i}"] = per_agent_return[i]
            metrics[f"alpha_agent{i}"] = alpha[i]
    metrics["learning"] = ready.astype(jnp.float32)
    return metrics


class Rollout(NamedTuple):
    """One iteration's per-step rollout arrays (see :func:`make_parts`)."""

    done: jax.Array  # [T, E]
    ret: jax.Array  # [T, E, A] running per-agent return (the episode's return where done)
    info: dict  # Timestep.info, leaves [T, E, ...]


class SACParts(NamedTuple):
    algorithm: Algorithm
    update_with_rollout: Callable  # state -> (state, metrics, Rollout)


def make(env, config: SACConfig, name: str = "sac") -> Algorithm:
    return make_parts(env, config, name).algorithm


class Learner(NamedTuple):
    """What SAC's learner functions share (static)."""

    env: Any
    config: SACConfig
    nets: SACNets
    regularizer: reg.Regularizer
    tx: optax.GradientTransformation
    obs_temp: jax.Array  # [A] agents whose temperature is read from their observation


def check_env(spec, config: SACConfig, name: str) -> None:
    """ConfigErrors for an env this configuration cannot run, before anything compiles."""
    if spec.discrete or spec.action_dim is None:
        raise cfg.ConfigError("env", spec.name, f"{name} needs a continuous-action environment")
    for f in ("frozen_agents", "temperature_from_obs"):
        if any(i >= spec.num_agents for i in getattr(config, f)):
            raise cfg.ConfigError(f, getattr(config, f), f"agent indices must be < {spec.num_agents}")


def opt_init(m: Learner, p):
    """Adam state: one per agent (a leading [A] axis) with independent agents, else one."""
    return m.tx.init(p) if m.nets.shared else jax.vmap(m.tx.init)(p)


def init(m: Learner, key) -> TrainState:
    config, spec, nets = m.config, m.env.spec, m.nets
    A, d, E = spec.num_agents, spec.action_dim, config.num_envs
    rcfg = config.regularizer
    k_param, k_env, key = jax.random.split(key, 3)
    actor_p, critic_p = init_params(nets, k_param)
    log_alpha = jnp.full((A,), jnp.log(config.init_alpha), jnp.float32)
    params = Params(actor_p, critic_p, log_alpha)
    env_state, ts = jax.vmap(m.env.reset)(jax.random.split(k_env, E))
    example = Transition(
        jnp.zeros((A, spec.obs_dim)),
        jnp.zeros((A, d)),
        jnp.zeros((A,)),
        jnp.zeros((A, spec.obs_dim)),
        jnp.zeros((), bool),
    )
    train_mask = jnp.ones((A,), bool).at[jnp.asarray(config.frozen_agents, jnp.int32)].set(False)
    target_entropy = -float(d) if config.target_entropy is None else config.target_entropy
    hp = hparams(
        HParams,
        actor_lr=config.actor_lr,
        critic_lr=config.critic_lr,
        alpha_lr=config.alpha_lr,
        gamma=config.gamma,
        tau=config.tau,
        target_entropy=target_entropy,
        reg_coef=rcfg.coef,
    )
    return TrainState(
        params=params,
        target_critic=critic_p,
        ref_actor=actor_p if m.regularizer.divergence and rcfg.reference == "initial" else None,
        opt_actor=opt_init(m, actor_p),
        opt_critic=opt_init(m, critic_p),
        opt_alpha=jax.vmap(m.tx.init)(log_alpha),
        buffer=buffers.replay_init(example, config.buffer_size),
        env_state=env_state,
        last_ts=ts,
        episode_return=jnp.zeros((E, A)),
        train_mask=train_mask,
        tune_alpha=jnp.full((A,), config.autotune and m.regularizer.active) & ~m.obs_temp,
        env_steps=jnp.zeros((), jnp.int32),
        key=key,
        hparams=hp,
    )


def act(nets: SACNets, params: Params, ts: Timestep, carry, key, greedy=False):
    """ts.obs [..., A, obs_dim] -> actions [..., A, action_dim] in the env's box."""
    mean, log_std = actor_apply(nets, params.actor, net_inputs(nets, ts.obs))
    sample = tanh_policy(nets, mean, log_std).sample(seed=key)
    return jnp.where(greedy, nets.mid + nets.half * jnp.tanh(mean), sample), carry


def initial_carry(batch_shape=()):
    return jnp.zeros(batch_shape)  # feed-forward: nothing to carry


def rollout_step(m: Learner, state: TrainState, key, keep_info: bool = False):
    """One step of every env: uniform random actions before ``learning_starts``, then
    the policy's samples; the transition for the replay buffer."""
    config, spec = m.config, m.env.spec
    E, A, d = config.num_envs, spec.num_agents, spec.action_dim
    ts = state.last_ts
    k_act, k_rand, k_env = jax.random.split(key, 3)
    policy_action, _ = act(m.nets, state.params, ts, None, k_act)
    low, high = float(spec.action_low), float(spec.action_high)
    random_action = jax.random.uniform(k_rand, (E, A, d), minval=low, maxval=high)
    action = jnp.where(state.env_steps < config.learning_starts, random_action, policy_action)
    env_state, nts = jax.vmap(m.env.step)(jax.random.split(k_env, E), state.env_state, action)
    next_obs = nts.info.get("final_obs", nts.obs)
    tr = Transition(ts.obs, action, nts.reward, next_obs, nts.terminated)
    ret = state.episode_return + nts.reward
    state = state.replace(
        env_state=env_state,
        last_ts=nts,
        episode_return=jnp.where(nts.done[:, None], 0.0, ret),
        env_steps=state.env_steps + E,
    )
    stats = {k: nts.info[k] for k in ("episode_done", "episode_return", "episode_length", "won") if k in nts.info}
    return state, (tr, stats, ret, nts.done, nts.info if keep_info else None)


def learn(m: Learner, state: TrainState, ref_actor, key):
    """``train_steps`` gradient steps; metrics averaged over them."""
    step = functools.partial(grad_step, m.nets, m.tx, m.config, m.obs_temp)
    (state, _), metrics = jax.lax.scan(step, (state, ref_actor), jax.random.split(key, m.config.train_steps))
    return state, jax.tree.map(lambda x: x.mean(0), metrics)


def update_with_rollout(m: Learner, state: TrainState, keep_info: bool = True):
    """A rollout of ``num_steps`` into the replay, then learning once it may start (the
    same branch for every vmapped seed). Returns (state, metrics, Rollout)."""
    config, R = m.config, m.regularizer
    E, T = config.num_envs, config.num_steps
    key, k_roll, k_learn = jax.random.split(state.key, 3)
    step = functools.partial(rollout_step, m, keep_info=keep_info)
    state, (traj, stats, ret, done, infos) = jax.lax.scan(step, state, jax.random.split(k_roll, T))
    flat = jax.tree.map(lambda z: z.reshape((T * E,) + z.shape[2:]), traj)
    state = state.replace(buffer=buffers.replay_add(state.buffer, flat))
    ref_actor = None
    if R.divergence:
        ref_actor = R.reference(initial=lambda: state.ref_actor, rollout=lambda: state.params.actor)
    ready = (state.env_steps >= config.learning_starts) & (state.buffer.size >= config.batch_size)
    skipped = jax.tree.map(jnp.zeros_like, jax.eval_shape(functools.partial(learn, m), state, ref_actor, k_learn)[1])
    state, learn_metrics = jax.lax.cond(
        max_over_seeds(ready.astype(jnp.int32)) > 0,
        lambda s: learn(m, s, ref_actor, k_learn),
        lambda s: (s, skipped),
        state,
    )
    state = state.replace(key=key)
    alpha = jnp.exp(state.params.log_alpha) if R.active else jnp.zeros((m.env.spec.num_agents,))
    metrics = iteration_metrics(stats, learn_metrics, done, ret, alpha, ready)
    return state, metrics, Rollout(done, ret, infos)


def update(m: Learner, state: TrainState):
    state, metrics, _ = update_with_rollout(m, state, keep_info=False)
    return state, metrics


def make_parts(env, config: SACConfig, name: str = "sac") -> SACParts:
    """SAC on ``env``: the pieces above bound to its spec and ``config``."""
    spec = env.spec
    check_env(spec, config, name)
    A = spec.num_agents
    obs_temp = jnp.zeros((A,), bool).at[jnp.asarray(config.temperature_from_obs, jnp.int32)].set(True)
    nets = make_nets(spec, config)
    m = Learner(env, config, nets, make_regularizer(config), descent(optax.scale_by_adam()), obs_temp)
    algorithm = Algorithm(
        name,
        config,
        env,
        functools.partial(init, m),
        functools.partial(update, m),
        functools.partial(act, nets),
        initial_carry,
        config.num_envs * config.num_steps,
    )
    return SACParts(algorithm, functools.partial(update_with_rollout, m))
