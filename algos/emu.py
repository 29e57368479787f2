"""EMU: Efficient episodic Memory Utilization for cooperative MARL.

Paper: Na, Seo, Moon, "Efficient Episodic Memory Utilization of Cooperative
Multi-Agent Reinforcement Learning", ICLR 2024 (arXiv 2403.01112); official PyTorch
code: github.com/HyunghoNa/EMU (EMU_release_pymarl). Built on the Q-learning backbone
(:mod:`algos.qlearning`, mixer qmix by default, any of vdn | qmix | qplex) through
its hooks; the memory itself is :mod:`marl.episodic_memory`.

Equations (s_t global state, T the env's step limit, tau = t / T)
------------------------------------------------------------------
State embedding, a deterministic conditional autoencoder (dCAE):
  encoder   x_t = f_phi(s~_t, tau)                 [s~, tau] -> 64 -> ReLU -> 64 -> ReLU -> 4
  decoder   (s^_t, H^_t) = g_psi(x_t, tau)         [x, tau] -> 64 -> ReLU -> 64 -> ReLU,
                                                   heads: state (S) and return (1)
  loss      L(phi, psi) = sum_n (H_n - H^_n)^2 + lambda_rcon * sum_n sum_f (s~_nf - s^_nf)^2
            over a minibatch (the official MSELoss(reduction="sum"); lambda_rcon = 0.1;
            ``embed_loss_reduction="mean"`` averages over samples and features instead),
            Adam lr 5e-4, gradient norm clip 10 (:func:`embedding_loss_terms`).
  s~ = s / env.spec.state_scale (the normalized state the mixers read).
Episodic memory (marl/episodic_memory.py): keys x, states s, best return-to-go H
  (R_t = r'_t + gamma R_{t+1} with r' the backbone's scaled team reward, so H is on
  the scale of Q_tot), desirability xi, visit counts N_call and N_xi; written after
  every episode, scanning steps backwards: hit (normalized distance <= write_delta)
  -> N_call += 1, N_xi += xi, memory shift when an undesirable entry is reached by a
  desirable trajectory, else H = max(H, R_t); miss -> insertion (N_call = 1,
  N_xi = 0, or xi with ``init_desirability``).
Episodic incentive, in the TD target of the backbone (its ``intrinsic_reward`` hook):
  x^ = nearest entry to f_phi(s~_{t+1}, (t + 1) / T); on a hit (within ``delta``)
  p = N_xi / (N_call + 1e-3),  eta_t = p * max(H(x^) - Qbar_tot(s_{t+1}, a*), 0), else 0
  y_t = r'_t + gamma * incentive_scale * eta_t + gamma (1 - term_t) Qbar_tot(s_{t+1}, a*)
  with a* the online argmax (double Q) and Qbar the target network; loss: masked
  mean (Q_tot(s_t, a_t) - sg(y_t))^2 (the backbone's).

Desirability on continuous, jittered states
-------------------------------------------
p rises only through revisits at write time: an insertion has N_call = 1, N_xi = 0,
and only a later write that hits the entry adds to N_call and N_xi. SMAC restarts
from identical states, so exact revisits (the official delta 1.3e-5, in effect
"the same state") happen there. SMAX jitters every unit's start position, so they
never do: with the official settings p stays 0 and the incentive is 0 wherever no
episode wins, while replay lookups still hit (a replayed state finds its own entry).
Three options, each off by default (the official configuration):
- ``init_desirability=True``: an insertion counts its own visit, N_xi = xi (the
  official ``flag_init_desirability``, set in its super-hard-map configs only): the
  states of desirable episodes get p ~ 1 at once.
- ``write_delta``: a separate, wider hit threshold for writes, so a state near an
  entry counts as a revisit of it (N_call += 1, N_xi += xi, H = max) instead of being
  inserted. Lookups keep ``delta``; a replayed state that was merged into a neighbour
  then misses at the official delta (set ``delta >= write_delta`` to recall the
  neighbour). Neither the paper nor the official code separates the two thresholds;
  choose write_delta from the measured spacing of distinct keys
  (experiments/studies/emu_key_spacing.py; results/emu_study/README.md) so that a
  small share of writes (5-20%) are revisits.
- ``desirable_quantile=q``: an episode is also desirable when its return exceeds the
  q-quantile of the last ``desirable_window`` written episodes' returns (from 10 known
  returns on), for maps where nobody wins yet. The paper defines xi by a return
  threshold (the maximum return), the official code by the win flag.

Memory behaviour metrics (logged every iteration, averaged over its gradient steps)
----------------------------------------------------------------------------------
``replay_hit_rate`` (share of the replayed live transitions whose s_{t+1} hits),
``hit_positive_ratio`` (share of those hits whose entry has p > 0), ``incentive``
(mean eta), ``incentive_positive`` (share of transitions with eta > 0),
``incentive_active`` (share of gradient steps with some eta > 0), ``memory_size``,
``memory_desirable`` (share of entries with xi = 1), ``memory_revisited`` (share
with N_call > 1), ``memory_positive_ratio`` (share with N_xi > 0) and
``write_revisits`` (share of the previous iteration's writes that hit an entry).
The memory shares are those at the start of the iteration.

Schedule (inside the jitted ``update``, ``after_iteration`` hook, fixed shapes)
------------------------------------------------------------------------------
1. The episodes that entered the replay buffer this iteration are written into the
   memory (a ``while_loop`` over them, each a backward loop over its steps).
2. Every ``stats_interval`` env steps (official ``ec_buffer_stats_update_interval``
   = 200; with 8 envs x 64 steps per iteration that is every iteration) the key
   statistics (mean, std) are refreshed; ``stats_interval_episodes`` counts written
   episodes instead.
3. Every ``embed_interval`` env steps (official configs: 10k; the paper's table says
   1k), once the memory holds ``embed_min_entries`` entries (default embed_steps x
   embed_batch = 102,400, the official), the dCAE trains for ``embed_steps`` Adam
   steps on minibatches of ``embed_batch`` distinct entries (official: 100 x 1024
   drawn without replacement), then every stored key is re-encoded from its stored
   state and the statistics are refreshed. The dCAE parameters and their Adam state
   are part of the non-trained hook state (``TrainState.ext``), not of the backbone's
   optimizer: the dCAE is trained on memory samples on its own schedule, never by the
   TD loss. The phase is a ``lax.cond`` on a step count that is equal for every seed
   (``max_over_seeds``), so vmapped seeds branch rather than select; a seed whose
   memory is still too small keeps its parameters.

Deviations and choices (paper / official code)
----------------------------------------------
- Mixer: qmix by default (registry preset ``emu``); the official configs use QPLEX,
  available with ``--mixer qplex``. Independent Q-learning (mixer none) is rejected.
- Hit test: per-dimension (L-inf) on normalized keys by default, as the official
  code; the paper's L2 test with ``hit_metric=l2``. The nearest-neighbour search uses
  the same metric and the same normalized keys as the test (the official code
  searches raw keys). Exact brute-force search, never a stale index.
- Time input: t / T with T = env.spec.max_steps everywhere (the official code mixes
  t / (limit + 1) and t / limit).
- Capacity: buffer_size x episode limit by default (5000 x 100 = 500k entries on
  SMAX), so a replayed state is never evicted; the paper's 1M is ``capacity=1000000``.
- Eviction: least recently written (insertions and write-time hits refresh recency;
  the official LRU also counts read-only lookups). See marl/episodic_memory.py.
- Counts are not reset on a memory shift (official default). Optimality propagation
  (a trajectory becomes desirable backwards from a desirable entry it hit) is on
  (``propagate_desirability``), as in the official code.
- The incentive is zero at terminal transitions: s_{t+1} is terminal, its value is 0
  and Qbar there is not a value estimate (the official code applies it there too).
- Final observations (the state after an episode's last transition) are not written;
  the official code writes pymarl's zero-reward padding slot with H = 0.
- The returns H and the incentive use the run's ``gamma`` hyperparameter (a swept
  value reaches them through the hooks' ``hp``; ``config.gamma`` when a hook is
  called without it). A memory written under one gamma holds returns of that gamma.
- The dCAE minibatches are drawn fresh for each phase from the whole memory
  (distinct entries, a random permutation); with ``embed_min_entries`` below
  embed_steps x embed_batch the entries past the memory's size are drawn with
  replacement.
- Curiosity: the official code's EMC-style curiosity reward (a separate VDN learner, a
  soft-updated copy of its agent network and a predictor of 10 x its Q-values; the
  prediction error, scale 1e-3 decaying by 0.9 every 100k steps, is added to the
  reward) is ``curiosity_scale=1e-3`` (:mod:`algos.curiosity`, with its own
  deviations; its VDN network uses ``config.gamma``, not a swept gamma). Off by default
  (the official configs turn it on): it adds four GRU unrolls of every sampled batch,
  about three times the backbone's learner work on this kind of machine, and the
  paper finds it adds little.
- Not implemented: the official code's extra memory updates from replayed batches.
- Lookup: the incentive only uses hits, so by default (``lookup="index"``) each
  gradient step searches a sorted index of the first normalized key coordinate,
  rebuilt at the end of every iteration (one argsort of the memory), for the entries
  within delta and compares only those: O(B * T * (log C + candidates)) instead of
  the brute force's O(B * T * size * k) (``lookup="brute"``, slots beyond the fill
  never visited). Both give the same recall on every hit (tested). The memory does
  not change between an iteration's gradient steps, so the index is never stale.
  Writes search the same way: the index as it was before the iteration's writes plus
  the slots re-keyed since (``marl.episodic_memory.write_episode_indexed``, equal to
  the brute-force write, tested). After the writes the re-keyed slots are merged into
  the index in O(C) (``update_index``); a full sort happens only after re-keying.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from algos import curiosity as cur
from algos import qlearning as ql
from marl import config as cfg
from marl import episodic_memory as em
from marl.networks import dense
from marl.types import Algorithm, max_over_seeds

LOOKUPS = ("index", "brute")
REDUCTIONS = ("sum", "mean")
WRITE_CHUNK = 16384  # memory entries per distance block when writing (one query at a time)
EMBED_GRAD_CLIP = 10.0


@dataclasses.dataclass(frozen=True)
class EMUConfig(ql.QLearningConfig):
    """EMU settings: the Q-learning backbone's fields plus the memory and embedding."""

    capacity: Optional[int] = None
    """episodic memory entries; None: buffer_size x the env's episode limit, so every
    replayed state can still be in the memory (the paper uses 1_000_000)"""
    delta: float = 1.3e-5
    """hit threshold on normalized keys for lookups (official: 1.3e-5; 1.3e-3 on the
    super-hard maps)"""
    write_delta: Optional[float] = None
    """hit threshold of the writes: a written step within it of an entry counts as a
    revisit of that entry (N_call += 1, N_xi += xi) instead of being inserted; None:
    ``delta`` (the official code uses one threshold for both)"""
    hit_metric: Literal["linf", "l2"] = "linf"
    """linf (official code, per dimension) | l2 (paper)"""
    key_dim: int = 4
    embed_hidden: int = 64
    lambda_rcon: float = 0.1
    """weight of the state reconstruction in the dCAE loss"""
    embed_loss_reduction: Literal["sum", "mean"] = "sum"
    """sum (official: squared errors summed over the minibatch, and over the state
    features in the reconstruction term) | mean (mean over samples and features)"""
    embed_interval: int = 10_000
    """env steps between embedding training phases"""
    embed_steps: int = 100
    """Adam steps per embedding phase"""
    embed_batch: int = 1024
    """memory entries per embedding minibatch"""
    embed_min_entries: Optional[int] = None
    """entries the memory must hold before the embedding trains; None: embed_steps x
    embed_batch (official: 102,400, sampled without replacement)"""
    embed_lr: float = 5e-4
    stats_interval: int = 200
    """env steps between refreshes of the key normalization (official: 200)"""
    stats_interval_episodes: Optional[int] = None
    """if set: refresh every this many written episodes instead of ``stats_interval``"""
    incentive: bool = True
    """add the episodic incentive gamma * eta to the TD target"""
    incentive_scale: float = 1.0
    lookup: Literal["index", "brute"] = "index"
    """index: binary search of the hit candidates in a sorted index rebuilt after every
    iteration's writes (exact for hits, marl.episodic_memory.lookup_hits) | brute: exact
    brute-force nearest neighbour over the whole memory at every gradient step"""
    lookup_chunk: int = 2048
    """memory entries per distance block of the brute-force lookup"""
    desirable_return: Optional[float] = None
    """None: an episode is desirable when won; else when its (unscaled) return >= this"""
    desirable_quantile: Optional[float] = None
    """if set (e.g. 0.9): an episode is also desirable when its return exceeds this
    quantile of the last ``desirable_window`` written episodes' returns (for maps where
    nobody wins yet)"""
    desirable_window: int = 1000
    """episodes whose returns the running quantile covers"""
    propagate_desirability: bool = True
    init_desirability: bool = False
    """count the inserting visit in N_xi (official: False; True on the super-hard maps)"""
    curiosity_scale: float = 0.0
    """EMC curiosity reward scale beta_0 (:mod:`algos.curiosity`; official: 1e-3; 0: off)"""
    curiosity_decay_rate: float = 0.9
    curiosity_decay_interval: int = 100_000
    """env steps between multiplications of the curiosity scale by ``curiosity_decay_rate``"""
    curiosity_decay_stop: float = 0.0
    curiosity_tau: float = 0.005
    """soft-copy rate of the curiosity's VDN network per gradient step"""
    curiosity_target_scale: float = 10.0

    @property
    def curiosity(self) -> cur.CuriositySettings:
        return cur.CuriositySettings(
            self.curiosity_scale,
            self.curiosity_decay_rate,
            self.curiosity_decay_interval,
            self.curiosity_decay_stop,
            self.curiosity_tau,
            self.curiosity_target_scale,
        )

    def __post_init__(self):
        super().__post_init__()
        if self.mixer == "none":
            raise cfg.ConfigError("mixer", self.mixer, "EMU needs a mixer: one of ['vdn', 'qmix', 'qplex']")
        for f in (
            "key_dim",
            "embed_hidden",
            "embed_interval",
            "embed_steps",
            "embed_batch",
            "stats_interval",
            "lookup_chunk",
            "desirable_window",
        ):
            cfg.check_positive(f, getattr(self, f), integer=True)
        for f in ("capacity", "embed_min_entries", "stats_interval_episodes"):
            if getattr(self, f) is not None:
                cfg.check_positive(f, getattr(self, f), integer=True)
        cfg.check_positive("embed_lr", self.embed_lr)
        for f in ("delta", "lambda_rcon", "incentive_scale"):
            cfg.check_nonnegative(f, getattr(self, f))
        if self.write_delta is not None:
            cfg.check_nonnegative("write_delta", self.write_delta)
        cfg.check_choice("hit_metric", self.hit_metric, em.METRICS)
        cfg.check_choice("lookup", self.lookup, LOOKUPS)
        cfg.check_choice("embed_loss_reduction", self.embed_loss_reduction, REDUCTIONS)
        if self.desirable_return is not None and not isinstance(self.desirable_return, (int, float)):
            raise cfg.ConfigError("desirable_return", self.desirable_return, "must be a number or None")
        if self.desirable_quantile is not None:
            cfg.check_range("desirable_quantile", self.desirable_quantile, 0.0, 1.0)
        self.curiosity.validate()


class StateEmbedding(nn.Module):
    """dCAE: encoder [s, tau] -> key, decoder [key, tau] -> (state, return)."""

    state_dim: int
    key_dim: int
    hidden: int

    def setup(self):
        self.enc = [dense(self.hidden), dense(self.hidden)]
        self.enc_out = dense(self.key_dim, scale=1.0)
        self.dec = [dense(self.hidden), dense(self.hidden)]
        self.dec_state = dense(self.state_dim, scale=1.0)
        self.dec_ret = dense(1, scale=1.0)

    def encode(self, s, tau):
        x = jnp.concatenate([s, tau[..., None]], -1)
        for layer in self.enc:
            x = nn.relu(layer(x))
        return self.enc_out(x)

    def decode(self, x, tau):
        h = jnp.concatenate([x, tau[..., None]], -1)
        for layer in self.dec:
            h = nn.relu(layer(h))
        return self.dec_state(h), self.dec_ret(h)[..., 0]

    def __call__(self, s, tau):
        x = self.encode(s, tau)
        return x, self.decode(x, tau)


@struct.dataclass
class EMUState:
    memory: em.EpisodicMemory
    embed_params: Any
    embed_opt: Any
    env_steps: jax.Array  # [] env steps so far
    last_embed: jax.Array  # env_steps at the last embedding phase
    written: jax.Array  # episodes written into the memory
    last_stats: jax.Array  # env_steps (or ``written``) at the last statistics refresh
    embed_loss: jax.Array  # mean dCAE loss of the last phase
    index: em.HitIndex  # sorted first key coordinate of the memory as it is now
    recent_returns: jax.Array  # [desirable_window] returns of the last written episodes (NaN: none yet)
    write_revisits: jax.Array  # share of the last iteration's writes that hit an entry
    curiosity_soft: Any  # the curiosity's soft copy of its VDN network ({} when off)


class EMUParts(NamedTuple):
    """The backbone hooks and the embedding functions they use, bound to one :class:`EMUContext`."""

    hooks: ql.Hooks
    encode: Callable  # (embed_params, states [N, S], t [N]) -> keys [N, k]
    embedding_loss: Callable  # (embed_params, states [N, S], t [N], H [N]) -> []


def make(env, config: EMUConfig, name: str = "emu") -> Algorithm:
    return ql.make(env, config, name=name, hooks=make_parts(env.spec, config).hooks)


def memory_capacity(config: EMUConfig, max_steps: int) -> int:
    """``config.capacity``, or buffer_size x the episode limit when it is None."""
    return config.capacity if config.capacity is not None else config.buffer_size * max_steps


def embedding_loss_terms(s, s_hat, H, h_hat, lambda_rcon, reduction="sum"):
    """dCAE loss: (H - H^)^2 + lambda_rcon * ||s - s^||^2, summed over the minibatch
    (and the state features) with ``reduction="sum"`` (the official MSELoss(reduction
    "sum")), averaged over samples and features with ``"mean"``."""
    if reduction == "sum":
        return jnp.sum((H - h_hat) ** 2) + lambda_rcon * jnp.sum((s - s_hat) ** 2)
    return jnp.mean((H - h_hat) ** 2) + lambda_rcon * jnp.mean((s - s_hat) ** 2)


def desirability(won, ret, recent_returns, desirable_return=None, quantile=None):
    """xi of a finished episode: won (or ``ret >= desirable_return`` when that is set),
    or, with ``quantile``, ``ret`` above that quantile of ``recent_returns`` (NaN slots
    are empty; no quantile rule before 10 returns are known)."""
    xi = (won > 0.5) if desirable_return is None else (ret >= desirable_return)
    if quantile is None:
        return xi
    known = jnp.isfinite(recent_returns)
    threshold = jnp.nanquantile(jnp.where(known, recent_returns, jnp.nan), quantile)
    return xi | ((known.sum() >= 10) & (ret > threshold))


class EMUContext(NamedTuple):
    """What EMU's pieces share: constants derived once from the env spec and the config,
    the dCAE network, its optimizer and the curiosity (None when off)."""

    config: EMUConfig
    state_dim: int  # S
    max_steps: int  # L, the env's step limit (tau = t / L)
    capacity: int  # memory entries
    write_delta: float  # hit threshold of the writes
    embed_min: int  # entries the memory must hold before the dCAE trains
    steps_per_iteration: int  # env steps per iteration (all envs)
    recent_size: int  # slots one iteration's writes can re-key (the write cache's length)
    reward_scale: float  # the backbone's team-reward scale, so H is on the scale of Q_tot
    state_scale: jax.Array  # [S] divisor of the state (s~ = s / state_scale)
    net: StateEmbedding
    tx: optax.GradientTransformation  # the dCAE's optimizer
    curiosity: Optional[cur.Curiosity]


def make_context(spec, config: EMUConfig) -> EMUContext:
    """The :class:`EMUContext` of an env with ``spec`` (reads state_dim, max_steps,
    state_scale, max_return)."""
    L, S = spec.max_steps, spec.state_dim
    reward_scale = config.reward_scale
    if reward_scale is None:  # the backbone's rule, so H is on the scale of Q_tot
        reward_scale = 20.0 / spec.max_return if spec.max_return else 1.0
    if config.embed_min_entries is None:
        embed_min = config.embed_steps * config.embed_batch
    else:
        embed_min = config.embed_min_entries
    curious = config.curiosity_scale > 0
    return EMUContext(
        config=config,
        state_dim=S,
        max_steps=L,
        capacity=memory_capacity(config, L),
        write_delta=config.delta if config.write_delta is None else config.write_delta,
        embed_min=embed_min,
        steps_per_iteration=config.num_envs * config.num_steps,
        # at most the steps of the episodes that end in one iteration (past that the
        # writes fall back to brute force, still exact)
        recent_size=config.num_envs * (config.num_steps + L),
        reward_scale=reward_scale,
        state_scale=jnp.ones((S,)) if spec.state_scale is None else jnp.asarray(spec.state_scale, jnp.float32),
        net=StateEmbedding(S, config.key_dim, config.embed_hidden),
        tx=optax.chain(optax.clip_by_global_norm(EMBED_GRAD_CLIP), optax.adam(config.embed_lr)),
        curiosity=cur.make(spec, config, config.curiosity, reward_scale) if curious else None,
    )


def make_parts(spec, config: EMUConfig) -> EMUParts:
    """EMU's hooks for an env with ``spec`` (reads state_dim, max_steps, state_scale, max_return)."""
    ctx = make_context(spec, config)
    hooks = ql.Hooks(
        init=functools.partial(init_state, ctx),
        intrinsic_reward=functools.partial(intrinsic_reward, ctx),
        extra_loss=functools.partial(extra_loss, ctx),
        after_iteration=functools.partial(after_iteration, ctx),
    )
    return EMUParts(hooks, functools.partial(encode, ctx), functools.partial(embedding_loss, ctx))


# ---------------------------------------------------------------------------- embedding


def tau(ctx: EMUContext, t: jax.Array) -> jax.Array:
    """The time input t / L."""
    return t.astype(jnp.float32) / ctx.max_steps


def encode(ctx: EMUContext, params, states: jax.Array, t: jax.Array) -> jax.Array:
    """Keys [N, k] of raw states [N, S] at steps t [N] under the dCAE ``params``."""
    return ctx.net.apply(params, states / ctx.state_scale, tau(ctx, t), method=StateEmbedding.encode)


def embedding_loss(ctx: EMUContext, params, states: jax.Array, t: jax.Array, H: jax.Array) -> jax.Array:
    """The dCAE loss (:func:`embedding_loss_terms`) of raw states [N, S], steps t [N] and
    returns H [N]."""
    s = states / ctx.state_scale
    _, (s_hat, h_hat) = ctx.net.apply(params, s, tau(ctx, t))
    return embedding_loss_terms(s, s_hat, H, h_hat, ctx.config.lambda_rcon, ctx.config.embed_loss_reduction)


def embedding_batches(ctx: EMUContext, mem: em.EpisodicMemory, key) -> jax.Array:
    """Entry indices [embed_steps, embed_batch] of one dCAE phase: distinct filled entries
    (a random permutation's first ones); with fewer filled entries than the phase needs
    (a small ``embed_min_entries``) the rest are drawn with replacement."""
    config = ctx.config
    n = config.embed_steps * config.embed_batch
    k_perm, k_fill = jax.random.split(key)
    scores = jnp.where(em.filled_mask(mem), jax.random.uniform(k_perm, (mem.capacity,)), 2.0)
    order = jnp.argsort(scores)[:n] if n <= mem.capacity else jnp.zeros((n,), jnp.int32)
    extra = jax.random.randint(k_fill, (n,), 0, jnp.maximum(mem.size, 1))
    idx = jnp.where(jnp.arange(n) < mem.size, order if n <= mem.capacity else extra, extra)
    return idx.reshape(config.embed_steps, config.embed_batch)


def train_embedding(ctx: EMUContext, ext: EMUState, key) -> EMUState:
    """One dCAE phase: ``embed_steps`` Adam steps on memory minibatches (kept only where
    the memory holds ``embed_min`` entries), then every stored key re-encoded."""
    mem = ext.memory
    loss_fn = functools.partial(embedding_loss, ctx)

    def step(carry, ids):
        params, opt = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, mem.states[ids], mem.timestep[ids], mem.H[ids])
        updates, opt = ctx.tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    idx = embedding_batches(ctx, mem, key)
    (params, opt), losses = jax.lax.scan(step, (ext.embed_params, ext.embed_opt), idx)
    ready = mem.size >= ctx.embed_min
    params, opt = jax.tree.map(lambda a, b: jnp.where(ready, a, b), (params, opt), (ext.embed_params, ext.embed_opt))
    memory = em.rekey(mem, lambda s, t: encode(ctx, params, s, t), ctx.config.lookup_chunk)
    return ext.replace(
        memory=memory,
        embed_params=params,
        embed_opt=opt,
        embed_loss=jnp.where(ready, losses.mean(), ext.embed_loss),
        last_embed=ext.env_steps,
    )


# ---------------------------------------------------------------------------- hooks


def init_state(ctx: EMUContext, key) -> tuple[Any, EMUState]:
    """The ``init`` hook: (the curiosity's trained parameters or {}, the initial EMUState)."""
    config, S = ctx.config, ctx.state_dim
    params = ctx.net.init(key, jnp.zeros((1, S)), jnp.zeros((1,)))
    memory = em.init(ctx.capacity, config.key_dim, S, config.hit_metric)
    z = jnp.zeros((), jnp.int32)
    k_cur = jax.random.fold_in(key, 1)
    ext_params, soft = ctx.curiosity.init(k_cur) if ctx.curiosity is not None else ({}, {})
    state = EMUState(
        memory,
        params,
        ctx.tx.init(params),
        z,
        z,
        z,
        z,
        jnp.zeros(()),
        em.build_index(memory),
        jnp.full((config.desirable_window,), jnp.nan),
        jnp.zeros(()),
        soft,
    )
    return ext_params, state


def gamma_of(config: EMUConfig, hp) -> Any:
    """The run's gamma: the swept value in ``hp``, else ``config.gamma``."""
    return config.gamma if hp is None else hp.gamma


def lookup_keys(ctx: EMUContext, ext: EMUState, keys: jax.Array) -> em.Recall:
    """Recall of the nearest memory entries of keys [N, k] (``config.lookup``'s search)."""
    if ctx.config.lookup == "index":
        return em.lookup_hits(ext.memory, ext.index, keys, ctx.config.delta)
    return em.lookup(ext.memory, keys, ctx.config.lookup_chunk, ctx.config.delta)


def intrinsic_reward(ctx: EMUContext, params, ext: EMUState, batch, target_next, hp=None):
    """The ``intrinsic_reward`` hook: (gamma * scale * eta_t [B, T] plus the curiosity
    reward when on, lookup metrics) for the transitions of ``batch``; ``params``: the
    backbone's full parameters."""
    config = ctx.config
    s_next = batch["state"][:, 1:]
    B, T = s_next.shape[:2]
    live = batch["filled"][:, 1:] & ~batch["terminated"][:, :-1].astype(bool)
    t_next = jnp.broadcast_to(jnp.arange(1, T + 1), (B, T))
    keys = encode(ctx, ext.embed_params, s_next.reshape(B * T, ctx.state_dim), t_next.reshape(-1))
    rec = lookup_keys(ctx, ext, keys)
    eta = jnp.where(live, incentive(rec, target_next.reshape(B * T)).reshape(B, T), 0.0)
    metrics = em.recall_metrics(rec, live.reshape(-1), eta.reshape(-1))
    metrics["incentive"] = (eta * live).sum() / jnp.maximum(live.sum(), 1)
    bonus = gamma_of(config, hp) * config.incentive_scale * eta if config.incentive else jnp.zeros((B, T))
    if ctx.curiosity is not None:
        r_c, c_metrics = ctx.curiosity.reward(params["ext"], ext.curiosity_soft, batch, ext.env_steps)
        bonus = bonus + r_c
        metrics.update(c_metrics)
    return bonus, metrics


def extra_loss(ctx: EMUContext, params, target_params, ext: EMUState, batch, key):
    """The ``extra_loss`` hook: reports the memory's state with the training metrics; the
    only loss term is the curiosity's (its VDN network and predictor), when on."""
    metrics = {**em.memory_metrics(ext.memory), "embed_loss": ext.embed_loss, "write_revisits": ext.write_revisits}
    if ctx.curiosity is None:
        return jnp.zeros(()), metrics
    loss, c_metrics = ctx.curiosity.loss(
        params["ext"], target_params["ext"], ext.curiosity_soft, batch, ctx.config.gamma
    )
    return loss, {**metrics, **c_metrics}


def write_row(ctx: EMUContext, params, memory, cache, row, filled, gamma, recent):
    """Write one stored episode ``row`` (slots ``filled`` [L + 1]) into the memory: returns
    (memory, write cache, the episode's return); ``recent``: the last written returns."""
    config, L = ctx.config, ctx.max_steps
    step = row["step"]
    valid = jnp.concatenate([filled[1:], jnp.zeros((1,), bool)])  # transition t exists
    last = jnp.maximum(filled.sum() - 1, 0)
    ret = row["episode"]["return"][last]
    xi = desirability(row["episode"]["won"][last], ret, recent, config.desirable_return, config.desirable_quantile)
    t = jnp.arange(L + 1)
    returns = em.discounted_returns(ctx.reward_scale * step["reward"], valid, gamma)
    keys = encode(ctx, params, step["state"], t)
    kw = dict(chunk=WRITE_CHUNK, propagate=config.propagate_desirability, init_desirability=config.init_desirability)
    if config.lookup == "index":
        memory, cache = em.write_episode_indexed(
            memory, cache, keys, step["state"], returns, t, xi, valid, ctx.write_delta, **kw
        )
    else:
        memory = em.write_episode(memory, keys, step["state"], returns, t, xi, valid, ctx.write_delta, **kw)
    return memory, cache, ret


def write_new_episodes(ctx: EMUContext, ext: EMUState, buffer, new_episodes, gamma):
    """Write the episodes that entered the buffer this iteration (the newest
    ``new_episodes`` rows); returns (ext, the write cache: () with ``lookup="brute"``)."""
    cap = buffer.capacity
    n = jnp.minimum(new_episodes, cap).astype(jnp.int32)

    def body(carry):
        j, memory, cache, recent = carry
        r = (buffer.insert_pos - n + j) % cap
        row = jax.tree.map(lambda x: x[r], buffer.data)
        filled = buffer.filled[r] & (j < n)  # rows past this seed's count write nothing
        memory, cache, ret = write_row(ctx, ext.embed_params, memory, cache, row, filled, gamma, recent)
        recent = jnp.where(j < n, jnp.roll(recent, 1).at[0].set(ret), recent)
        return j + 1, memory, cache, recent

    if ctx.config.lookup == "index":
        cache = em.WriteCache(ext.index, jnp.zeros((ctx.recent_size,), jnp.int32), jnp.zeros((), jnp.int32))
    else:
        cache = ()
    # one trip count for all vmapped seeds (a per-seed count would select the whole memory
    # at every step)
    n_max = max_over_seeds(n)
    _, memory, cache, recent = jax.lax.while_loop(
        lambda c: c[0] < n_max, body, (jnp.zeros((), jnp.int32), ext.memory, cache, ext.recent_returns)
    )
    writes = (memory.clock - ext.memory.clock).astype(jnp.float32)
    revisits = (memory.write_hits - ext.memory.write_hits).astype(jnp.float32)
    return ext.replace(
        memory=memory,
        written=ext.written + n,
        recent_returns=recent,
        write_revisits=revisits / jnp.maximum(writes, 1.0),
    ), cache


def refresh_stats_if_due(ctx: EMUContext, ext: EMUState) -> EMUState:
    """Refresh the key normalization when ``stats_interval`` env steps (or
    ``stats_interval_episodes`` written episodes) passed since the last refresh."""
    config = ctx.config
    if config.stats_interval_episodes is None:
        clock, interval = ext.env_steps, config.stats_interval
    else:
        clock, interval = ext.written, config.stats_interval_episodes
    due_stats = clock - ext.last_stats >= interval
    fresh, mem = em.refresh_stats(ext.memory), ext.memory
    memory = mem.replace(
        mean=jnp.where(due_stats, fresh.mean, mem.mean),
        std=jnp.where(due_stats, fresh.std, mem.std),
        keys_norm=jnp.where(due_stats, fresh.keys_norm, mem.keys_norm),
    )
    return ext.replace(memory=memory, last_stats=jnp.where(due_stats, clock, ext.last_stats))


def embedding_due(ctx: EMUContext, ext: EMUState) -> jax.Array:
    """Whether a dCAE phase runs: the memory is big enough and the interval has passed in
    some seed (the others keep their parameters); [] bool, equal for every seed."""
    own = (ext.env_steps - ext.last_embed >= ctx.config.embed_interval) & (ext.memory.size >= ctx.embed_min)
    return max_over_seeds(own.astype(jnp.int32)) > 0


def after_iteration(ctx: EMUContext, ext: EMUState, params, buffer, new_episodes, key, hp=None) -> EMUState:
    """The ``after_iteration`` hook: the curiosity's soft copy, the memory writes, the
    statistics refresh, the dCAE phase when due and the lookup index."""
    ext = ext.replace(env_steps=ext.env_steps + ctx.steps_per_iteration)
    if ctx.curiosity is not None:
        ext = ext.replace(curiosity_soft=ctx.curiosity.after_iteration(ext.curiosity_soft, params["ext"]))
    ext, cache = write_new_episodes(ctx, ext, buffer, new_episodes, gamma_of(ctx.config, hp))
    ext = refresh_stats_if_due(ctx, ext)
    due = embedding_due(ctx, ext)
    ext = jax.lax.cond(due, functools.partial(train_embedding, ctx), lambda e, k: e, ext, key)
    if ctx.config.lookup != "index":
        return ext
    # after re-keying (or more re-keyed slots than the cache lists) sort again, else
    # merge this iteration's re-keyed slots into the old order
    resort = due | (max_over_seeds(cache.count) > ctx.recent_size)
    index = jax.lax.cond(resort, lambda m, i, c: em.build_index(m), em.update_index, ext.memory, ext.index, cache)
    return ext.replace(index=index)


def incentive(recall: em.Recall, target_next: jax.Array) -> jax.Array:
    """eta = p * max(H(x^) - Qbar_tot(s_{t+1}, a*), 0) on a hit, 0 on a miss ([Q])."""
    return jnp.where(recall.hit, recall.ratio * jnp.maximum(recall.H - target_next, 0.0), 0.0)
