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


def make(env, config: QLearningConfig, name: str = "qlearning", hooks: Optional[Hooks] = None) -> Algorithm:  # noqa: C901
    spec = env.spec
    if not spec.discrete:
        raise cfg.ConfigError("env", spec.name, f"{name} needs a discrete-action environment")
    hooks = hooks or Hooks()
    A, n, E, T = spec.num_agents, spec.num_actions, config.num_envs, config.num_steps
    L = spec.max_steps  # episode limit; rows hold L + 1 slots
    H = config.hidden
    agent = RNNAgent(n, H)
    mixer = mx.make_mixer(
        config.mixer,
        embed_dim=config.mixing_embed,
        hypernet_embed=config.hypernet_embed,
        num_heads=config.qplex_heads,
        num_kernels=config.qplex_kernels,
        out_init_scale=config.mixer_init_scale or None,
    )
    in_dim = base_input_dim(spec, config) + hooks.extra_input_dim
    reward_scale = config.reward_scale
    if reward_scale is None:
        reward_scale = 20.0 / spec.max_return if spec.max_return else 1.0
    state_scale = jnp.ones((spec.state_dim,)) if spec.state_scale is None else jnp.asarray(spec.state_scale)
    rcfg = config.regularizer
    cost = None if spec.action_cost is None else jnp.asarray(spec.action_cost, jnp.float32)
    if config.optimizer == "rmsprop":
        scale = optax.scale_by_rms(decay=config.rms_alpha, eps=config.opt_eps, eps_in_sqrt=False)
    else:
        scale = optax.scale_by_adam(eps=config.opt_eps)
    tx = descent(optax.clip_by_global_norm(config.max_grad_norm), scale)

    # ------------------------------------------------------------------ inputs
    def agent_inputs(ext_params, obs, prev_action, fields):
        """[..., A, in_dim] from obs [..., A, o], prev_action [..., A] (-1: none), fields."""
        parts = [base_agent_inputs(obs, prev_action, n, config.last_action, config.agent_ids)]
        if hooks.agent_inputs is not None:
            parts.append(hooks.agent_inputs(ext_params, fields))
        return jnp.concatenate(parts, -1)

    def step_fields(params, ext_state, ts, field_carry, key, greedy):
        if hooks.step_fields is None:
            return {}, field_carry
        return hooks.step_fields(params["ext"], ext_state, ts, field_carry, key, greedy)

    def initial_field_carry(batch_shape):
        return None if hooks.initial_field_carry is None else hooks.initial_field_carry(batch_shape)

    def initial_carry(batch_shape=()):
        return (
            jnp.zeros(batch_shape + (A, H)),
            jnp.full(batch_shape + (A,), -1, jnp.int32),
            jnp.ones(batch_shape, bool),
            initial_field_carry(batch_shape),
        )

    # ------------------------------------------------------------------ init
    def init_params(key):
        k_agent, k_mixer, k_ext = jax.random.split(key, 3)
        ext_params, ext_state = hooks.init(k_ext) if hooks.init is not None else ({}, {})
        x0 = jnp.zeros((1, A, in_dim))
        params = {
            "agent": agent.init(k_agent, jnp.zeros((1, A, H)), x0),
            "mixer": mx.init_mixer(mixer, k_mixer, A, spec.state_dim, n),
            "ext": ext_params,
        }
        return params, ext_state

    def example_fields(params, ext_state, ts):
        """Shapes of one env's step fields (for the buffer layout)."""
        one = jax.tree.map(lambda x: x[None], ts)
        fields, _ = step_fields(params, ext_state, one, initial_field_carry((1,)), jax.random.PRNGKey(0), False)
        return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), fields)

    def init(key) -> TrainState:
        k_param, k_env, key = jax.random.split(key, 3)
        params, ext_state = init_params(k_param)
        env_state, ts = jax.vmap(env.reset)(jax.random.split(k_env, E))
        ts1 = jax.tree.map(lambda x: x[0], ts)
        step = {
            "obs": ts1.obs,
            "state": ts1.state,
            "avail": ts1.avail_actions,
            "action": jnp.zeros((A,), jnp.int32),
            "reward": jnp.zeros((), jnp.float32),
            "terminated": jnp.zeros((), bool),
            "fields": example_fields(params, ext_state, ts1),
        }
        episode = {"won": jnp.zeros((), jnp.float32), "return": jnp.zeros((), jnp.float32)}
        rows = buffers.accumulator_init({"step": step, "episode": episode}, E, L + 1)
        row = jax.tree.map(lambda x: x[0], rows.data)
        buf = buffers.init(row, config.buffer_size, jnp.zeros((L + 1,), bool))
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
            tx.init(params),
            env_state,
            ts,
            initial_carry((E,)),
            rows,
            buf,
            ext_state,
            key,
            z,
            z,
            z,
            hp,
        )

    # ------------------------------------------------------------------ acting
    def act_q(params, ext_state, ts, carry, key, greedy):
        """Q-values of the acting network on timestep ts; restarts finished episodes."""
        h, prev, first, fcarry = carry
        first = first | ts.done
        h = jnp.where(first[..., None, None], 0.0, h)
        prev = jnp.where(first[..., None], -1, prev)
        if hooks.step_fields is not None:
            fcarry = jax.tree.map(
                lambda a, b: jnp.where(first.reshape(first.shape + (1,) * (a.ndim - first.ndim)), a, b),
                initial_field_carry(first.shape),
                fcarry,
            )
        fields, fcarry = step_fields(params, ext_state, ts, fcarry, key, greedy)
        x = agent_inputs(params["ext"], ts.obs, prev, fields)
        h, q = agent.apply(params["agent"], h, x)
        return q, fields, (h, prev, first, fcarry)

    def epsilon_greedy(key, q, avail, eps):
        k_explore, k_rand = jax.random.split(key)
        greedy_a = masked_argmax(q, avail)
        rand_a = jax.random.categorical(k_rand, jnp.where(avail, 0.0, NEG))
        explore = jax.random.uniform(k_explore, greedy_a.shape) < eps
        return jnp.where(explore, rand_a, greedy_a)

    def act(params, ts: Timestep, carry, key, greedy=False):
        """Greedy (or epsilon_finish-greedy) actions; ``carry`` from ``initial_carry``.

        Hook state is not available here; hooks whose ``step_fields`` need it see ``{}``.
        """
        k_f, k_a = jax.random.split(key)
        q, _, (h, prev, _, fcarry) = act_q(params, {}, ts, carry, k_f, greedy)
        a = jnp.where(
            greedy, masked_argmax(q, ts.avail_actions), epsilon_greedy(k_a, q, ts.avail_actions, config.epsilon_finish)
        )
        return a, (h, a, jnp.zeros_like(ts.done), fcarry)

    def epsilon_at(state: TrainState):
        steps = (state.update_step * E * T).astype(jnp.float32)
        frac = jnp.clip(steps / config.epsilon_anneal_steps, 0.0, 1.0)
        return config.epsilon_start + frac * (state.hparams.epsilon_finish - config.epsilon_start)

    def rollout_step(carry, key):
        state, eps = carry
        ts = state.last_ts
        k_f, k_a, k_env = jax.random.split(key, 3)
        q, fields, (h, prev, first, fcarry) = act_q(state.params, state.ext, ts, state.carry, k_f, False)
        action = epsilon_greedy(k_a, q, ts.avail_actions, eps)
        env_state, nts = jax.vmap(env.step)(jax.random.split(k_env, E), state.env_state, action)
        rows = state.rows
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
        # the observation after the transition (the final one when the episode ended)
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
        rows = rows.replace(t=t + 1)
        buf = buffers.add(state.buffer, rows.data, rows.filled, valid=nts.done)
        stats = {k: v for k, v in info.items() if k not in FINAL_KEYS}
        state = state.replace(
            env_state=env_state,
            last_ts=nts,
            carry=(h, action, jnp.zeros_like(first), fcarry),
            rows=rows,
            buffer=buf,
            episodes=state.episodes + nts.done.sum(),
        )
        return (state, eps), stats

    # ------------------------------------------------------------------ learning
    def unroll(params, batch):
        """Q-values [B, T+1, A, n] of ``params`` along stored episodes (from t = 0); see
        ``marl.rnn.unroll_chunked``."""
        x = agent_inputs(params["ext"], batch["obs"], previous_actions(batch["action"]), batch["fields"])
        return unroll_chunked(agent, params["agent"], x, unroll_slots(batch, config), config.gru_autodiff)

    def mix(mixer_params, qs, states, actions, max_qs):
        return mx.apply_with_aux(mixer, mixer_params, qs, states / state_scale, jax.nn.one_hot(actions, n), max_qs)

    def policy_regularizer(q, ref_q, avail, hp):
        temp = config.reg_temperature
        return reg.regularize(
            rcfg.kind,
            q / temp,
            ref_q / temp,
            hp.reg_coef,
            mask=avail,
            cost=cost,
            epsilon=hp.reg_epsilon,
            iterations=rcfg.iterations,
            centred=rcfg.centred,
            backend=rcfg.backend,
        )

    def loss_fn(params, target_params, ref_params, ext_state, batch, hp: HParams, key):
        avail = batch["avail"]
        mask = batch["filled"][:, 1:].astype(jnp.float32)  # [B, T]: transition t exists
        actions = batch["action"][:, :-1]
        q = unroll(params, batch)
        tq = jax.lax.stop_gradient(unroll(target_params, batch))
        q_sg = jax.lax.stop_gradient(q)
        chosen = take(q[:, :-1], actions)
        q_tot, attention = mix(
            params["mixer"], chosen, batch["state"][:, :-1], actions, masked_max(q_sg[:, :-1], avail[:, :-1])
        )
        a_star, t_chosen, t_max = next_actions(q_sg[:, 1:], tq[:, 1:], avail[:, 1:], config.double_q)
        next_tot, _ = mix(target_params["mixer"], t_chosen, batch["state"][:, 1:], a_star, t_max)
        next_tot = jax.lax.stop_gradient(next_tot)
        reward = reward_scale * batch["reward"][:, :-1]
        metrics = {}
        if hooks.intrinsic_reward is not None:
            bonus = hooks.intrinsic_reward(jax.lax.stop_gradient(params), ext_state, batch, next_tot, hp)
            if isinstance(bonus, tuple):  # (bonus, metrics dict)
                bonus, hook_metrics = bonus
                metrics.update(hook_metrics)
            reward = reward + bonus
            metrics["intrinsic_reward"] = (bonus * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        reg_loss = jnp.zeros(())
        if rcfg.kind != "none":
            if rcfg.reference == "rollout":
                ref_q = tq[:, :-1]
            elif rcfg.reference == "initial":
                ref_q = jax.lax.stop_gradient(unroll(ref_params, batch))[:, :-1]
            else:
                ref_q = jnp.zeros_like(q_sg[:, :-1])
            out = policy_regularizer(q[:, :-1] if rcfg.mode == "loss" else q_sg[:, :-1], ref_q, avail[:, :-1], hp)
            metrics["regularizer"] = (out.value.mean(-1) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
            if rcfg.mode == "loss":
                reg_loss = (out.loss.mean(-1) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
            else:
                reward = reward - jax.lax.stop_gradient(take(out.penalty, actions).mean(-1))
        valid_next = jnp.concatenate([batch["filled"][:, 2:], jnp.zeros_like(batch["filled"][:, :1])], 1)
        targets = lambda_returns(reward, batch["terminated"][:, :-1], next_tot, valid_next, hp.gamma, hp.td_lambda)
        targets = jax.lax.stop_gradient(targets)
        m = mask.reshape(mask.shape + (1,) * (q_tot.ndim - mask.ndim))
        count = jnp.maximum(m.sum() * (q_tot.size // mask.size), 1.0)
        td = (q_tot - targets) * m
        loss = (td**2).sum() / count
        att = (attention * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        loss = loss + config.attention_reg * att + reg_loss
        if hooks.extra_loss is not None:
            extra, extra_metrics = hooks.extra_loss(params, target_params, ext_state, batch, key)
            loss = loss + extra
            metrics.update(extra_metrics)
        metrics.update(
            td_error=jnp.abs(td).sum() / count, q_taken=(q_tot * m).sum() / count, target=(targets * m).sum() / count
        )
        return loss, metrics

    def sample_batch(buffer, key):
        data, filled = buffers.sample(buffer, key, config.batch_size)
        # episode statistics are written with every step; the last filled slot has the final ones
        last = jnp.maximum(filled.sum(-1) - 1, 0)
        episode = jax.tree.map(lambda x: take(x, last), data["episode"])
        return {**data["step"], "episode": episode, "filled": filled}

    def train_step(state: TrainState, hp: HParams, carry, key):
        params, opt_state = carry
        k_sample, k_loss = jax.random.split(key)
        batch = sample_batch(state.buffer, k_sample)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state.target_params, state.ref_params, state.ext, batch, hp, k_loss
        )
        updates, new_opt_state = tx.update(grads, with_learning_rate(opt_state, hp.lr))
        new_params = optax.apply_updates(params, updates)
        ready = buffers.can_sample(state.buffer, config.batch_size)
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(ready, new, old), (new_params, new_opt_state), (params, opt_state)
        )
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
        return (params, opt_state), metrics

    def update(state: TrainState):
        hp = state.hparams
        key, k_roll, k_train, k_hook = jax.random.split(state.key, 4)
        episodes_before = state.episodes
        eps = epsilon_at(state)
        (state, _), stats = jax.lax.scan(rollout_step, (state, eps), jax.random.split(k_roll, T))
        ready = buffers.can_sample(state.buffer, config.batch_size)
        (params, opt_state), metrics = jax.lax.scan(
            lambda c, k: train_step(state, hp, c, k),
            (state.params, state.opt_state),
            jax.random.split(k_train, config.train_steps),
        )
        state = state.replace(params=params, opt_state=opt_state)
        # before learning starts the losses of empty batches are reported as 0
        metrics = jax.tree.map(lambda x: jnp.where(ready, x.mean(), 0.0), metrics)
        metrics["learning"] = ready.astype(jnp.float32)
        copy = state.episodes - state.target_episodes >= config.target_update_episodes
        target = jax.tree.map(lambda p, t: jnp.where(copy, p, t), state.params, state.target_params)
        state = state.replace(
            target_params=target, target_episodes=jnp.where(copy, state.episodes, state.target_episodes)
        )
        if hooks.after_iteration is not None:
            ext = hooks.after_iteration(
                state.ext, state.params, state.buffer, state.episodes - episodes_before, k_hook, hp
            )
            state = state.replace(ext=ext)
        metrics.update(episode_metrics(stats))
        metrics.update(epsilon=eps, buffer_episodes=state.buffer.size.astype(jnp.float32))
        state = state.replace(key=key, update_step=state.update_step + 1)
        return state, metrics

    return Algorithm(name, config, env, init, update, act, initial_carry, E * T)
