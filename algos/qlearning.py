"""Value-factorization Q-learning: recurrent agents with VDN, QMIX or QPLEX mixing.

Papers: Sunehag et al. 2018 (VDN); Rashid et al. 2018 (QMIX); Wang et al. 2021
(QPLEX); Samvelyan et al. 2019 (the pymarl training setup these defaults follow).
This module is the backbone EMU and TRAMA build on (see :class:`Hooks`).

Equations (b: episode, t: step, i: agent; Q_i from a GRU over the agent's history):
  agent      Q_i(tau_i, .) = W_out GRU(ReLU(W_in [o_i, onehot(a_i,t-1), onehot(i), extra]))
  mixing     Q_tot = sum_i Q_i                                   (VDN)
             Q_tot = f(Q_1..Q_A; s) with |W|-weights from hypernetworks of s  (QMIX)
             Q_tot = V(s) + sum_i lambda_i(s, a) (Q_i - max_a Q_i)          (QPLEX)
  double Q   a*_i = argmax_{a available} Q_i(tau_{i,t+1}, a; theta)
             Qbar_{t+1} = Q_tot(Qbar_i(tau_{i,t+1}, a*_i); s_{t+1}; theta^-)
  TD(lambda) y_t = r_t + g_t + gamma (1 - term_t) [(1 - lambda) Qbar_{t+1} + lambda y_{t+1}]
             (y_{t+1} := Qbar_{t+1} past the episode's last transition; lambda = 0 is
             the 1-step target of the papers; g_t is a hook's intrinsic reward)
  loss       L = sum_bt m_bt (Q_tot(s_t, a_t) - sg(y_t))^2 / sum_bt m_bt
                 + attention_reg * QPLEX's attention logit penalty + hook losses
                 + the policy regularizer (marl.regularizers), if any
  acting     epsilon-greedy over the available actions, epsilon linear in env steps.

Defaults are the pymarl/EMU backbone (../shared/specs/emu.md): Linear 64 -> GRU 64,
RMSprop lr 5e-4 (alpha 0.99, eps 1e-5 outside the square root, as PyTorch), grad
norm clip 10, gamma 0.99, batch 32 episodes, buffer 5000 episodes, hard target copy
every 200 episodes, epsilon 1 -> 0.05 over 50k env steps, double Q.

Rollouts and storage (deviations from pymarl's one-episode-per-runner loop):
- ``num_envs`` environments step continuously for ``num_steps`` steps per
  iteration; each step is written into a per-env episode row [T + 1] (T = the
  env's ``max_steps``), and a row goes to the episode buffer the step its episode
  ends, so episodes are stored whole, aligned at t = 0, with a filled mask, and no
  env step is spent on padding. ``train_steps`` gradient steps (batch
  ``batch_size`` episodes) follow each iteration's rollout; pymarl's "one gradient
  step per episode" corresponds to ``train_steps`` ~ episodes per iteration.
- The target network is copied every ``target_update_episodes`` finished episodes,
  checked once per iteration.
- Truncated episodes (time limit) bootstrap from their final state and the final
  observation's available actions (``info["final_*"]`` of the auto-reset wrapper);
  pymarl treats the time limit as terminal.
- Team reward is the mean over agents of the per-agent rewards.
- Mixers read the state divided by the env's ``spec.state_scale`` (SMAX's world
  state has positions in map units, where SMAC's state is normalized).
- QMIX's hypernetwork output layers start at scale ``mixer_init_scale`` (0.01), so
  the mixing weights start near zero. With flax's default initializer the initial
  Q_tot on SMAX is ~10x the largest return and QMIX diverged under pymarl's
  settings (gradient norms > 1e4 once epsilon reached its floor); JaxMARL's QMIX
  uses a small mixer initialization (0.001) for the same reason.
- ``reward_scale`` multiplies the team reward in the TD target. SMAC normalizes
  returns to at most 20, which pymarl's hyperparameters were tuned for; SMAX's are
  at most 2 (damage dealt + 1 for a win). By default (None) the scale is
  20 / ``spec.max_return`` when the env declares its largest return (SMAX: x10),
  else 1. Without it QMIX did not learn on smax:3m in 100k steps where it did with
  it. Reported returns are always unscaled.
- Learning starts once ``batch_size`` episodes are stored (pymarl's rule).
- The agents' unroll skips the slots past the longest episode of the batch (taken
  over every seed of the runner's vmap, so the ``lax.cond`` stays a branch); what
  pymarl gets by truncating the batch to its longest episode, with fixed shapes.
  ``full_unroll=True`` unrolls every slot instead (the same numbers, fixed work: for
  benchmarks against learners that unroll whole fixed-length segments).
- The GRU's backward pass along time is written out (``marl.rnn.gru_recurrence``), which
  is much faster than autodiff of the scan on a CPU; ``gru_autodiff=True`` selects
  plain autodiff of the same recurrence (the same gradients to float tolerance), so
  the faster path can be chosen per backend.
- Sweepable hyperparameters (lr, gamma, td_lambda, epsilon_finish, regularizer
  coefficient/epsilon) are arrays in ``TrainState.hparams``.

Policy regularizer: the Boltzmann policy softmax(Q_i / reg_temperature) of the
online network against a reference (``rollout``: the target network's Boltzmann
policy; ``initial``: the frozen initial network's; ``uniform``), as a loss term or,
in penalty mode, as a reward penalty mean_i penalty_i(a_i) subtracted from r_t.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from marl import buffers
from marl import config as cfg
from marl import mixers as mx
from marl import regularizers as reg
from marl.episodes import FINAL_KEYS, episode_metrics
from marl.losses import NEG, masked_argmax, masked_max, next_actions, take
from marl.optim import descent, with_learning_rate
from marl.returns import lambda_returns
from marl.rnn import RNNAgent, unroll_chunked
from marl.types import Algorithm, Timestep, hparams, max_over_seeds


@dataclasses.dataclass(frozen=True)
class QLearningConfig(cfg.RunConfig):
    """Q-learning settings. ``mixer``: vdn | qmix | qplex | none (independent Q-learning)."""

    mixer: Literal["vdn", "qmix", "qplex", "none"] = "qmix"
    total_steps: int = 2_000_000
    num_envs: int = 8
    num_steps: int = 64
    """env steps per environment per iteration"""
    train_steps: int = 8
    """gradient steps (batches of whole episodes) per iteration"""
    batch_size: int = 32
    buffer_size: int = 5000
    lr: float = 5e-4
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    rms_alpha: float = 0.99
    opt_eps: float = 1e-5
    max_grad_norm: float = 10.0
    gamma: float = 0.99
    reward_scale: Optional[float] = None
    """team reward multiplier inside the TD target; None: 20 / env.spec.max_return when
    the env declares it (SMAC's normalization, which the defaults were tuned for), else 1"""
    td_lambda: float = 0.0
    double_q: bool = True
    target_update_episodes: int = 200
    epsilon_start: float = 1.0
    epsilon_finish: float = 0.05
    epsilon_anneal_steps: int = 50_000
    hidden: int = 64
    agent_ids: bool = True
    last_action: bool = True
    mixing_embed: int = 32
    hypernet_embed: int = 64
    qplex_heads: int = 4
    qplex_kernels: int = 4
    attention_reg: float = 0.001
    mixer_init_scale: float = 0.01
    """> 0: QMIX's hypernetwork output layers start at this scale (0: flax default)"""
    reg_temperature: float = 1.0
    """temperature of the Boltzmann policy softmax(Q / T) the regularizer acts on"""
    full_unroll: bool = False
    """unroll all T+1 slots of every sampled episode, not only up to the batch's longest
    (identical results; fixed work per update, for equal-work benchmarks)"""
    gru_autodiff: bool = False
    """differentiate the GRU's time scan with plain autodiff instead of the hand-written
    backward pass (the same gradients; choose the faster per backend)"""
    regularizer: reg.RegularizerConfig = dataclasses.field(default_factory=reg.RegularizerConfig)

    def __post_init__(self):
        cfg.check_choice("mixer", self.mixer, mx.MIXERS)
        cfg.check_choice("optimizer", self.optimizer, ["rmsprop", "adam"])
        for f in (
            "total_steps",
            "num_envs",
            "num_steps",
            "train_steps",
            "batch_size",
            "buffer_size",
            "target_update_episodes",
            "epsilon_anneal_steps",
            "hidden",
            "mixing_embed",
            "hypernet_embed",
            "qplex_heads",
            "qplex_kernels",
        ):
            cfg.check_positive(f, getattr(self, f), integer=True)
        for f in ("lr", "opt_eps", "max_grad_norm", "reg_temperature"):
            cfg.check_positive(f, getattr(self, f))
        if self.reward_scale is not None:
            cfg.check_positive("reward_scale", self.reward_scale)
        cfg.check_range("rms_alpha", self.rms_alpha, 0.0, 1.0)
        cfg.check_range("gamma", self.gamma, 0.0, 1.0)
        cfg.check_range("td_lambda", self.td_lambda, 0.0, 1.0)
        cfg.check_range("epsilon_start", self.epsilon_start, 0.0, 1.0)
        cfg.check_range("epsilon_finish", self.epsilon_finish, 0.0, 1.0)
        cfg.check_nonnegative("attention_reg", self.attention_reg)
        cfg.check_nonnegative("mixer_init_scale", self.mixer_init_scale)
        if self.batch_size > self.buffer_size:
            raise cfg.ConfigError(
                "batch_size", self.batch_size, f"must be <= buffer_size={self.buffer_size} (whole episodes are sampled)"
            )
        cfg.check_total_steps(self.total_steps, self.num_envs, self.num_steps)


class HParams(NamedTuple):
    lr: jax.Array
    gamma: jax.Array
    td_lambda: jax.Array
    epsilon_finish: jax.Array
    reg_coef: jax.Array
    reg_epsilon: jax.Array


class Hooks(NamedTuple):
    """Extension points for methods built on this backbone (EMU, TRAMA); all optional.

    ``E`` below is any batch shape (parallel envs during rollouts, or [B, T + 1]
    for stored episodes); ``ext_params`` is ``params["ext"]``, trained by the same
    optimizer step as the agents and the mixer; ``ext_state`` is a non-trained
    pytree carried in ``TrainState.ext`` (memories, codebooks, centroids).

    init(key) -> (ext_params, ext_state)
    initial_field_carry(batch_shape) -> carry for ``step_fields`` (e.g. a GRU state)
    step_fields(ext_params, ext_state, ts, field_carry, key, greedy) -> (fields, field_carry):
        extra per-step fields (a dict of arrays ``[E, ...]``, e.g. a predicted class
        per agent) computed while acting; stored in the buffer with each step and
        passed to ``agent_inputs``. ``field_carry`` restarts (is replaced by the
        initial one) at episode starts.
    agent_inputs(ext_params, fields) -> [..., A, extra_input_dim]: extra agent inputs
        built from the step's fields, for acting and for training (online and
        target networks read the same stored fields).
    intrinsic_reward(params, ext_state, batch, target_next, hp) -> [B, T]: added to r_t
        in the TD target (e.g. EMU's gamma * eta); ``params`` is the full parameter dict
        (gradients stopped), ``target_next`` is Qbar_{t+1} [B, T]; ``hp`` the run's
        :class:`HParams` (swept values such as gamma reach the hook). May return
        ``(bonus, metrics dict)`` to log metrics of the computation.
    extra_loss(params, target_params, ext_state, batch, key) -> (loss, metrics dict):
        added to the TD loss in the same gradient step (``params`` is the full dict, so
        the hook can read the agents' parameters too; ``target_params`` the target
        network's copy of it, ``params["ext"]`` included).
    after_iteration(ext_state, params, buffer, new_episodes, key, hp) -> ext_state: once
        per iteration after training (memory writes, clustering); ``new_episodes``
        [] is how many episodes entered the buffer this iteration (the newest rows
        end at ``buffer.insert_pos``).

    ``batch`` is the dict of sampled episodes: ``obs`` [B, T+1, A, o], ``state``,
    ``avail``, ``action`` [B, T+1, A], ``reward``, ``terminated`` [B, T+1],
    ``filled`` [B, T+1] (slots holding an observation; transition t is valid iff
    ``filled[:, t + 1]``), ``episode`` (``won``, ``return`` [B]) and the hook's fields.
    """

    init: Optional[Callable] = None
    initial_field_carry: Optional[Callable] = None
    step_fields: Optional[Callable] = None
    agent_inputs: Optional[Callable] = None
    extra_input_dim: int = 0
    intrinsic_reward: Optional[Callable] = None
    extra_loss: Optional[Callable] = None
    after_iteration: Optional[Callable] = None


@struct.dataclass
class TrainState:
    params: Any  # {"agent", "mixer", "ext"}
    target_params: Any
    ref_params: Any  # frozen initial parameters (regularizer reference "initial")
    opt_state: Any
    env_state: Any
    last_ts: Timestep  # [E, ...]
    carry: Any  # acting carry: (h [E, A, H], prev_action [E, A], first [E], field_carry)
    rows: buffers.EpisodeAccumulator  # episodes under way, [E, T + 1]
    buffer: buffers.EpisodeBuffer
    ext: Any
    key: jax.Array
    update_step: jax.Array
    episodes: jax.Array  # finished episodes so far
    target_episodes: jax.Array  # value of ``episodes`` at the last target copy
    hparams: HParams


def base_input_dim(spec, config: QLearningConfig) -> int:
    """Width of :func:`base_agent_inputs` for an env with ``spec``."""
    return spec.obs_dim + (spec.num_actions if config.last_action else 0) + (spec.num_agents if config.agent_ids else 0)


def base_agent_inputs(obs, prev_action, num_actions: int, last_action: bool, agent_ids: bool):
    """The agent network's standard inputs [..., A, D]: obs [..., A, o], then the one-hot
    previous action (``prev_action`` [..., A], -1: none, all zeros) and the one-hot
    agent id, each when enabled."""
    parts = [obs]
    if last_action:
        parts.append(jax.nn.one_hot(prev_action, num_actions))  # -1 -> all zeros
    if agent_ids:
        A = obs.shape[-2]
        parts.append(jnp.broadcast_to(jnp.eye(A), obs.shape[:-2] + (A, A)))
    return jnp.concatenate(parts, -1)


def previous_actions(actions):
    """Each stored slot's previous action [B, T + 1, A] (-1 at t = 0)."""
    return jnp.concatenate([jnp.full_like(actions[:, :1], -1), actions[:, :-1]], 1)


def unroll_slots(batch, config: QLearningConfig):
    """How many slots of the sampled episodes to unroll: all of them with
    ``full_unroll``, else the batch's longest episode (the same over vmapped seeds)."""
    return batch["obs"].shape[1] if config.full_unroll else max_over_seeds(batch["filled"].sum(-1).max())


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    """Everything :func:`make` fixes before tracing (static, closed over by every step):
    spec-derived sizes and scales, the config, the networks, the optimizer and the hooks.
    The functions below take it as their first argument; :func:`make` binds it."""

    env: Any
    config: QLearningConfig
    hooks: Hooks
    agent: RNNAgent
    mixer: Any
    tx: optax.GradientTransformation
    num_agents: int  # A
    num_actions: int  # n
    max_steps: int  # episode limit L; episode rows hold L + 1 slots
    in_dim: int  # agent input width
    reward_scale: float
    state_scale: jax.Array  # [state_dim], divides the mixers' state
    regularizer: reg.Regularizer  # reference, mode and the term (marl.regularizers.build)

    @property
    def num_envs(self) -> int:
        return self.config.num_envs

    @property
    def num_steps(self) -> int:
        return self.config.num_steps


def make_optimizer(config: QLearningConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then RMSprop (PyTorch's eps placement) or Adam scaling."""
    if config.optimizer == "rmsprop":
        scale = optax.scale_by_rms(decay=config.rms_alpha, eps=config.opt_eps, eps_in_sqrt=False)
    else:
        scale = optax.scale_by_adam(eps=config.opt_eps)
    return descent(optax.clip_by_global_norm(config.max_grad_norm), scale)


def default_reward_scale(spec, config: QLearningConfig) -> float:
    """``config.reward_scale``, else 20 / ``spec.max_return`` when declared, else 1."""
    if config.reward_scale is not None:
        return config.reward_scale
    return 20.0 / spec.max_return if spec.max_return else 1.0


def make_context(env, config: QLearningConfig, hooks: Hooks) -> Context:
    """The static :class:`Context` of a run on ``env``."""
    spec = env.spec
    mixer = mx.make_mixer(
        config.mixer,
        embed_dim=config.mixing_embed,
        hypernet_embed=config.hypernet_embed,
        num_heads=config.qplex_heads,
        num_kernels=config.qplex_kernels,
        out_init_scale=config.mixer_init_scale or None,
    )
    return Context(
        env=env,
        config=config,
        hooks=hooks,
        agent=RNNAgent(spec.num_actions, config.hidden),
        mixer=mixer,
        tx=make_optimizer(config),
        num_agents=spec.num_agents,
        num_actions=spec.num_actions,
        max_steps=spec.max_steps,
        in_dim=base_input_dim(spec, config) + hooks.extra_input_dim,
        reward_scale=default_reward_scale(spec, config),
        state_scale=jnp.ones((spec.state_dim,)) if spec.state_scale is None else jnp.asarray(spec.state_scale),
        regularizer=reg.build(
            config.regularizer,
            who=f"{config.mixer} Q-learning",
            cost=None if spec.action_cost is None else jnp.asarray(spec.action_cost, jnp.float32),
            references=("rollout", "initial", "uniform"),
        ),
    )


# ---------------------------------------------------------------------- inputs
def agent_inputs(ctx: Context, ext_params, obs, prev_action, fields):
    """[..., A, in_dim] from obs [..., A, o], prev_action [..., A] (-1: none), fields."""
    config = ctx.config
    parts = [base_agent_inputs(obs, prev_action, ctx.num_actions, config.last_action, config.agent_ids)]
    if ctx.hooks.agent_inputs is not None:
        parts.append(ctx.hooks.agent_inputs(ext_params, fields))
    return jnp.concatenate(parts, -1)


def step_fields(ctx: Context, params, ext_state, ts, field_carry, key, greedy):
    """The hook's per-step fields and field carry (``{}`` and the carry without one)."""
    if ctx.hooks.step_fields is None:
        return {}, field_carry
    return ctx.hooks.step_fields(params["ext"], ext_state, ts, field_carry, key, greedy)


def initial_field_carry(ctx: Context, batch_shape):
    """The hook's initial field carry for ``batch_shape`` (None without one)."""
    return None if ctx.hooks.initial_field_carry is None else ctx.hooks.initial_field_carry(batch_shape)


def initial_carry(ctx: Context, batch_shape=()):
    """Acting carry: (h [..., A, H] zeros, prev_action -1, first True, field carry)."""
    A, H = ctx.num_agents, ctx.config.hidden
    return (
        jnp.zeros(batch_shape + (A, H)),
        jnp.full(batch_shape + (A,), -1, jnp.int32),
        jnp.ones(batch_shape, bool),
        initial_field_carry(ctx, batch_shape),
    )


# ---------------------------------------------------------------------- init
def init_params(ctx: Context, key):
    """Initial ``{"agent", "mixer", "ext"}`` parameters and the hook's state."""
    A, H, spec = ctx.num_agents, ctx.config.hidden, ctx.env.spec
    k_agent, k_mixer, k_ext = jax.random.split(key, 3)
    ext_params, ext_state = ctx.hooks.init(k_ext) if ctx.hooks.init is not None else ({}, {})
    x0 = jnp.zeros((1, A, ctx.in_dim))
    params = {
        "agent": ctx.agent.init(k_agent, jnp.zeros((1, A, H)), x0),
        "mixer": mx.init_mixer(ctx.mixer, k_mixer, A, spec.state_dim, ctx.num_actions),
        "ext": ext_params,
    }
    return params, ext_state


def example_fields(ctx: Context, params, ext_state, ts):
    """Shapes of one env's step fields (for the buffer layout)."""
    one = jax.tree.map(lambda x: x[None], ts)
    fields, _ = step_fields(ctx, params, ext_state, one, initial_field_carry(ctx, (1,)), jax.random.PRNGKey(0), False)
    return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), fields)


def init_storage(ctx: Context, params, ext_state, ts):
    """Empty per-env episode rows [E, L + 1] and episode buffer, laid out from one env's
    timestep (``ts`` [E, ...])."""
    ts1 = jax.tree.map(lambda x: x[0], ts)
    step = {
        "obs": ts1.obs,
        "state": ts1.state,
        "avail": ts1.avail_actions,
        "action": jnp.zeros((ctx.num_agents,), jnp.int32),
        "reward": jnp.zeros((), jnp.float32),
        "terminated": jnp.zeros((), bool),
        "fields": example_fields(ctx, params, ext_state, ts1),
    }
    episode = {"won": jnp.zeros((), jnp.float32), "return": jnp.zeros((), jnp.float32)}
    rows = buffers.accumulator_init({"step": step, "episode": episode}, ctx.num_envs, ctx.max_steps + 1)
    row = jax.tree.map(lambda x: x[0], rows.data)
    buf = buffers.init(row, ctx.config.buffer_size, jnp.zeros((ctx.max_steps + 1,), bool))
    return rows, buf


def init_state(ctx: Context, key) -> TrainState:
    """The initial :class:`TrainState` (``Algorithm.init``)."""
    config, rcfg = ctx.config, ctx.config.regularizer
    k_param, k_env, key = jax.random.split(key, 3)
    params, ext_state = init_params(ctx, k_param)
    env_state, ts = jax.vmap(ctx.env.reset)(jax.random.split(k_env, ctx.num_envs))
    rows, buf = init_storage(ctx, params, ext_state, ts)
    hp = hparams(
        HParams,
        lr=config.lr,
        gamma=config.gamma,
        td_lambda=config.td_lambda,
        epsilon_finish=config.epsilon_finish,
        reg_coef=rcfg.coef,
        reg_epsilon=rcfg.epsilon,
    )
    z = jnp.zeros((), jnp.int32)
    return TrainState(
        params,
        params,
        params,
        ctx.tx.init(params),
        env_state,
        ts,
        initial_carry(ctx, (ctx.num_envs,)),
        rows,
        buf,
        ext_state,
        key,
        z,
        z,
        z,
        hp,
    )


# ---------------------------------------------------------------------- acting
def act_q(ctx: Context, params, ext_state, ts, carry, key, greedy):
    """Q-values of the acting network on timestep ts; restarts finished episodes."""
    h, prev, first, fcarry = carry
    first = first | ts.done
    h = jnp.where(first[..., None, None], 0.0, h)
    prev = jnp.where(first[..., None], -1, prev)
    if ctx.hooks.step_fields is not None:
        fcarry = jax.tree.map(
            lambda a, b: jnp.where(first.reshape(first.shape + (1,) * (a.ndim - first.ndim)), a, b),
            initial_field_carry(ctx, first.shape),
            fcarry,
        )
    fields, fcarry = step_fields(ctx, params, ext_state, ts, fcarry, key, greedy)
    x = agent_inputs(ctx, params["ext"], ts.obs, prev, fields)
    h, q = ctx.agent.apply(params["agent"], h, x)
    return q, fields, (h, prev, first, fcarry)


def epsilon_greedy(key, q, avail, eps):
    """Uniform over the available actions with probability ``eps``, else the greedy one."""
    k_explore, k_rand = jax.random.split(key)
    greedy_a = masked_argmax(q, avail)
    rand_a = jax.random.categorical(k_rand, jnp.where(avail, 0.0, NEG))
    explore = jax.random.uniform(k_explore, greedy_a.shape) < eps
    return jnp.where(explore, rand_a, greedy_a)


def act(ctx: Context, params, ts: Timestep, carry, key, greedy=False):
    """Greedy (or epsilon_finish-greedy) actions; ``carry`` from ``initial_carry``.

    Hook state is not available here; hooks whose ``step_fields`` need it see ``{}``.
    """
    k_f, k_a = jax.random.split(key)
    q, _, (h, prev, _, fcarry) = act_q(ctx, params, {}, ts, carry, k_f, greedy)
    a = jnp.where(
        greedy,
        masked_argmax(q, ts.avail_actions),
        epsilon_greedy(k_a, q, ts.avail_actions, ctx.config.epsilon_finish),
    )
    return a, (h, a, jnp.zeros_like(ts.done), fcarry)


def epsilon_at(ctx: Context, state: TrainState):
    """Exploration rate of this iteration: linear in env steps from epsilon_start to the
    (swept) epsilon_finish over ``epsilon_anneal_steps``."""
    config = ctx.config
    steps = (state.update_step * ctx.num_envs * ctx.num_steps).astype(jnp.float32)
    frac = jnp.clip(steps / config.epsilon_anneal_steps, 0.0, 1.0)
    return config.epsilon_start + frac * (state.hparams.epsilon_finish - config.epsilon_start)


def write_transition(rows: buffers.EpisodeAccumulator, ts, nts, action, fields, first):
    """Writes one step of every env into its episode row: the step at slot t (t = 0 for
    envs whose episode starts) and the observation after it (the final one when the
    episode ended) at slot t + 1."""
    E = action.shape[0]
    t = jnp.where(first, 0, rows.t)
    rows = rows.replace(filled=jnp.where(first[:, None], False, rows.filled))
    info = nts.info
    step = {
        "obs": ts.obs,
        "state": ts.state,
        "avail": ts.avail_actions,
        "action": action,
        "reward": nts.reward.mean(-1),
        "terminated": nts.terminated,
        "fields": fields,
    }
    episode = {
        "won": info.get("won", jnp.zeros((E,))).astype(jnp.float32),
        "return": info["episode_return"].astype(jnp.float32),
    }
    rows = buffers.write(rows, {"step": step, "episode": episode}, t)
    nxt = {
        "obs": info["final_obs"],
        "state": info["final_state"],
        "avail": info["final_avail"],
        "action": jnp.zeros_like(action),
        "reward": jnp.zeros((E,)),
        "terminated": jnp.zeros((E,), bool),
        "fields": jax.tree.map(jnp.zeros_like, fields),
    }
    rows = buffers.write(rows, {"step": nxt, "episode": episode}, t + 1)
    return rows.replace(t=t + 1)


def rollout_step(ctx: Context, carry, key):
    """One epsilon-greedy step of every env (a ``lax.scan`` body over ``(state, eps)``);
    finished episodes go to the buffer."""
    state, eps = carry
    ts = state.last_ts
    k_f, k_a, k_env = jax.random.split(key, 3)
    q, fields, (h, prev, first, fcarry) = act_q(ctx, state.params, state.ext, ts, state.carry, k_f, False)
    action = epsilon_greedy(k_a, q, ts.avail_actions, eps)
    env_state, nts = jax.vmap(ctx.env.step)(jax.random.split(k_env, ctx.num_envs), state.env_state, action)
    rows = write_transition(state.rows, ts, nts, action, fields, first)
    buf = buffers.add(state.buffer, rows.data, rows.filled, valid=nts.done)
    stats = {k: v for k, v in nts.info.items() if k not in FINAL_KEYS}
    state = state.replace(
        env_state=env_state,
        last_ts=nts,
        carry=(h, action, jnp.zeros_like(first), fcarry),
        rows=rows,
        buffer=buf,
        episodes=state.episodes + nts.done.sum(),
    )
    return (state, eps), stats


# ---------------------------------------------------------------------- learning
def unroll(ctx: Context, params, batch):
    """Q-values [B, T+1, A, n] of ``params`` along stored episodes (from t = 0); see
    ``marl.rnn.unroll_chunked``."""
    x = agent_inputs(ctx, params["ext"], batch["obs"], previous_actions(batch["action"]), batch["fields"])
    return unroll_chunked(ctx.agent, params["agent"], x, unroll_slots(batch, ctx.config), ctx.config.gru_autodiff)


def mix(ctx: Context, mixer_params, qs, states, actions, max_qs):
    """(Q_tot, attention penalty) of the chosen Q-values ``qs``; states are rescaled."""
    return mx.apply_with_aux(
        ctx.mixer, mixer_params, qs, states / ctx.state_scale, jax.nn.one_hot(actions, ctx.num_actions), max_qs
    )


def masked_mean(x, mask):
    """sum(x * mask) / max(sum(mask), 1)."""
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def regularizer_term(ctx: Context, ref_params, batch, q, q_sg, tq, avail, actions, mask, hp: HParams):
    """The policy regularizer of the Boltzmann policies softmax(Q / T) against the
    configured reference (``rollout``: the target network's; ``initial``: the frozen
    initial agent's; ``uniform``), through ``ctx.regularizer``.

    ``q``, ``q_sg`` (gradients stopped), ``tq`` (target network): [B, T+1, A, n];
    ``avail`` [B, T+1, A, n]; ``actions`` [B, T, A]; ``mask`` [B, T].
    Returns (loss term, reward penalty [B, T] or None, metrics): loss mode gives a loss
    term and no penalty; penalty mode a zero loss term and the stopped penalty
    mean_i penalty_i(a_i) to subtract from r_t; no regularizer gives (0, None, {}).
    """
    R, temp = ctx.regularizer, ctx.config.reg_temperature
    reg_loss = jnp.zeros(())
    if not R.active:
        return reg_loss, None, {}
    ref_q = R.reference(
        rollout=lambda: tq[:, :-1],
        initial=lambda: jax.lax.stop_gradient(unroll(ctx, ref_params, batch))[:, :-1],
        uniform=lambda: jnp.zeros_like(q_sg[:, :-1]),
    )
    pol = (q if R.as_loss else q_sg)[:, :-1] / temp
    if R.as_loss:
        loss, value = R.loss_term(pol, ref_q / temp, hp.reg_coef, hp.reg_epsilon, avail=avail[:, :-1])
        return masked_mean(loss.mean(-1), mask), None, {"regularizer": masked_mean(value.mean(-1), mask)}
    penalty, value = R.penalty(pol, ref_q / temp, hp.reg_coef, hp.reg_epsilon, avail=avail[:, :-1], action=actions)
    return reg_loss, jax.lax.stop_gradient(penalty.mean(-1)), {"regularizer": masked_mean(value.mean(-1), mask)}


def intrinsic_bonus(ctx: Context, params, ext_state, batch, next_tot, mask, hp: HParams):
    """The hook's intrinsic reward [B, T] (or None without one) and its metrics."""
    if ctx.hooks.intrinsic_reward is None:
        return None, {}
    bonus = ctx.hooks.intrinsic_reward(jax.lax.stop_gradient(params), ext_state, batch, next_tot, hp)
    metrics = {}
    if isinstance(bonus, tuple):  # (bonus, metrics dict)
        bonus, hook_metrics = bonus
        metrics.update(hook_metrics)
    metrics["intrinsic_reward"] = masked_mean(bonus, mask)
    return bonus, metrics


def mixed_values(ctx: Context, params, target_params, batch, q, q_sg, tq):
    """Q_tot(s_t, a_t) and its attention penalty [B, T], and the stopped double-Q target
    Qbar_{t+1} [B, T] of the target mixer."""
    avail, actions = batch["avail"], batch["action"][:, :-1]
    chosen = take(q[:, :-1], actions)
    q_tot, attention = mix(
        ctx, params["mixer"], chosen, batch["state"][:, :-1], actions, masked_max(q_sg[:, :-1], avail[:, :-1])
    )
    a_star, t_chosen, t_max = next_actions(q_sg[:, 1:], tq[:, 1:], avail[:, 1:], ctx.config.double_q)
    next_tot, _ = mix(ctx, target_params["mixer"], t_chosen, batch["state"][:, 1:], a_star, t_max)
    return q_tot, attention, jax.lax.stop_gradient(next_tot)


def td_targets(batch, reward, next_tot, hp: HParams):
    """Stopped TD(lambda) targets y_t [B, T] from the (shaped) rewards and Qbar_{t+1}."""
    valid_next = jnp.concatenate([batch["filled"][:, 2:], jnp.zeros_like(batch["filled"][:, :1])], 1)
    targets = lambda_returns(reward, batch["terminated"][:, :-1], next_tot, valid_next, hp.gamma, hp.td_lambda)
    return jax.lax.stop_gradient(targets)


def td_loss(q_tot, targets, mask):
    """Masked mean squared TD error and the masked td_error / q_taken / target metrics;
    ``q_tot`` may carry trailing per-agent axes (independent Q-learning)."""
    m = mask.reshape(mask.shape + (1,) * (q_tot.ndim - mask.ndim))
    count = jnp.maximum(m.sum() * (q_tot.size // mask.size), 1.0)
    td = (q_tot - targets) * m
    loss = (td**2).sum() / count
    metrics = dict(
        td_error=jnp.abs(td).sum() / count, q_taken=(q_tot * m).sum() / count, target=(targets * m).sum() / count
    )
    return loss, metrics


def loss_fn(ctx: Context, params, target_params, ref_params, ext_state, batch, hp: HParams, key):
    """The training loss (module docstring) and its metrics on a batch of episodes."""
    avail = batch["avail"]
    mask = batch["filled"][:, 1:].astype(jnp.float32)  # [B, T]: transition t exists
    actions = batch["action"][:, :-1]
    q = unroll(ctx, params, batch)
    tq = jax.lax.stop_gradient(unroll(ctx, target_params, batch))
    q_sg = jax.lax.stop_gradient(q)
    q_tot, attention, next_tot = mixed_values(ctx, params, target_params, batch, q, q_sg, tq)
    reward = ctx.reward_scale * batch["reward"][:, :-1]
    bonus, metrics = intrinsic_bonus(ctx, params, ext_state, batch, next_tot, mask, hp)
    if bonus is not None:
        reward = reward + bonus
    reg_loss, penalty, reg_metrics = regularizer_term(ctx, ref_params, batch, q, q_sg, tq, avail, actions, mask, hp)
    metrics.update(reg_metrics)
    if penalty is not None:
        reward = reward - penalty
    targets = td_targets(batch, reward, next_tot, hp)
    loss, td_metrics = td_loss(q_tot, targets, mask)
    loss = loss + ctx.config.attention_reg * masked_mean(attention, mask) + reg_loss
    if ctx.hooks.extra_loss is not None:
        extra, extra_metrics = ctx.hooks.extra_loss(params, target_params, ext_state, batch, key)
        loss = loss + extra
        metrics.update(extra_metrics)
    metrics.update(td_metrics)
    return loss, metrics


def sample_batch(ctx: Context, buffer, key):
    """``batch_size`` whole episodes as the batch dict of :class:`Hooks`."""
    data, filled = buffers.sample(buffer, key, ctx.config.batch_size)
    # episode statistics are written with every step; the last filled slot has the final ones
    last = jnp.maximum(filled.sum(-1) - 1, 0)
    episode = jax.tree.map(lambda x: take(x, last), data["episode"])
    return {**data["step"], "episode": episode, "filled": filled}


def train_step(ctx: Context, state: TrainState, hp: HParams, carry, key):
    """One gradient step on a sampled batch (a ``lax.scan`` body over (params, opt_state));
    a no-op until the buffer holds ``batch_size`` episodes."""
    params, opt_state = carry
    k_sample, k_loss = jax.random.split(key)
    batch = sample_batch(ctx, state.buffer, k_sample)
    (loss, metrics), grads = jax.value_and_grad(partial(loss_fn, ctx), has_aux=True)(
        params, state.target_params, state.ref_params, state.ext, batch, hp, k_loss
    )
    updates, new_opt_state = ctx.tx.update(grads, with_learning_rate(opt_state, hp.lr))
    new_params = optax.apply_updates(params, updates)
    ready = buffers.can_sample(state.buffer, ctx.config.batch_size)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(ready, new, old), (new_params, new_opt_state), (params, opt_state)
    )
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
    return (params, opt_state), metrics


def copy_target(ctx: Context, state: TrainState) -> TrainState:
    """Hard target copy once ``target_update_episodes`` episodes finished since the last."""
    copy = state.episodes - state.target_episodes >= ctx.config.target_update_episodes
    target = jax.tree.map(lambda p, t: jnp.where(copy, p, t), state.params, state.target_params)
    return state.replace(target_params=target, target_episodes=jnp.where(copy, state.episodes, state.target_episodes))


def update(ctx: Context, state: TrainState):
    """One iteration (``Algorithm.update``): rollouts, ``train_steps`` gradient steps,
    target copy, the hook's ``after_iteration``."""
    config, hooks, hp = ctx.config, ctx.hooks, state.hparams
    key, k_roll, k_train, k_hook = jax.random.split(state.key, 4)
    episodes_before = state.episodes
    eps = epsilon_at(ctx, state)
    (state, _), stats = jax.lax.scan(partial(rollout_step, ctx), (state, eps), jax.random.split(k_roll, ctx.num_steps))
    ready = buffers.can_sample(state.buffer, config.batch_size)
    (params, opt_state), metrics = jax.lax.scan(
        partial(train_step, ctx, state, hp),
        (state.params, state.opt_state),
        jax.random.split(k_train, config.train_steps),
    )
    state = state.replace(params=params, opt_state=opt_state)
    # before learning starts the losses of empty batches are reported as 0
    metrics = jax.tree.map(lambda x: jnp.where(ready, x.mean(), 0.0), metrics)
    metrics["learning"] = ready.astype(jnp.float32)
    state = copy_target(ctx, state)
    if hooks.after_iteration is not None:
        ext = hooks.after_iteration(state.ext, state.params, state.buffer, state.episodes - episodes_before, k_hook, hp)
        state = state.replace(ext=ext)
    metrics.update(episode_metrics(stats))
    metrics.update(epsilon=eps, buffer_episodes=state.buffer.size.astype(jnp.float32))
    state = state.replace(key=key, update_step=state.update_step + 1)
    return state, metrics


def make(env, config: QLearningConfig, name: str = "qlearning", hooks: Optional[Hooks] = None) -> Algorithm:
    """The Q-learning :class:`~marl.types.Algorithm` on ``env``, extended by ``hooks``."""
    if not env.spec.discrete:
        raise cfg.ConfigError("env", env.spec.name, f"{name} needs a discrete-action environment")
    ctx = make_context(env, config, hooks or Hooks())
    return Algorithm(
        name,
        config,
        env,
        partial(init_state, ctx),
        partial(update, ctx),
        partial(act, ctx),
        partial(initial_carry, ctx),
        config.num_envs * config.num_steps,
    )
