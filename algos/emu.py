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
  loss      L(phi, psi) = mean (H_t - H^_t)^2 + lambda_rcon * mean (s~_t - s^_t)^2
            (mean over samples and state features, as the official MSE criterion;
            lambda_rcon = 0.1), Adam lr 5e-4, gradient norm clip 10.
  s~ = s / env.spec.state_scale (the normalized state the mixers read).
Episodic memory (marl/episodic_memory.py): keys x, states s, best return-to-go H
  (R_t = r'_t + gamma R_{t+1} with r' the backbone's scaled team reward, so H is on
  the scale of Q_tot), desirability xi (the episode was won, or its return reached
  ``desirable_return``), visit counts N_call and N_xi; written after every episode,
  scanning steps backwards: hit (normalized distance <= delta) -> N_call += 1,
  N_xi += xi, memory shift when an undesirable entry is reached by a desirable
  trajectory, else H = max(H, R_t); miss -> insertion.
Episodic incentive, in the TD target of the backbone (its ``intrinsic_reward`` hook):
  x^ = nearest entry to f_phi(s~_{t+1}, (t + 1) / T); on a hit
  p = N_xi / (N_call + 1e-3),  eta_t = p * max(H(x^) - Qbar_tot(s_{t+1}, a*), 0), else 0
  y_t = r'_t + gamma * incentive_scale * eta_t + gamma (1 - term_t) Qbar_tot(s_{t+1}, a*)
  with a* the online argmax (double Q) and Qbar the target network; loss: masked
  mean (Q_tot(s_t, a_t) - sg(y_t))^2 (the backbone's).

Schedule (inside the jitted ``update``, ``after_iteration`` hook, fixed shapes)
------------------------------------------------------------------------------
1. The episodes that entered the replay buffer this iteration are written into the
   memory (a ``while_loop`` over them, each a backward loop over its steps).
2. Every ``stats_interval_episodes`` written episodes the key statistics (mean, std)
   are refreshed (official ``ec_buffer_stats_update_interval`` = 200).
3. Every ``embed_interval`` env steps (official configs: 10k; the paper's table says
   1k) the dCAE trains for ``embed_steps`` Adam steps on minibatches of
   ``embed_batch`` entries drawn uniformly (with replacement) from the memory
   (official: 100 minibatches of 1024), then every stored key is re-encoded from its
   stored state and the statistics are refreshed. A seed whose memory holds fewer
   than ``embed_batch`` entries skips the phase. The dCAE parameters and their Adam
   state are part of the non-trained hook state (``TrainState.ext``), not of the
   backbone's optimizer: the dCAE is trained on memory samples on its own schedule,
   never by the TD loss. The phase is a ``lax.cond`` on a step count that is equal
   for every seed (``max_over_seeds``), so vmapped seeds branch rather than select.

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
- Capacity: 100k entries by default (CPU-sized); the paper's 1M is ``capacity=1000000``.
- Eviction: least recently written (insertions and write-time hits refresh recency;
  the official LRU also counts read-only lookups). See marl/episodic_memory.py.
- N_xi of a new entry is 0 (official ``flag_init_desirability=False``);
  ``init_desirability=True`` counts the inserting visit. Counts are not reset on a
  memory shift (official default). Optimality propagation (a trajectory becomes
  desirable backwards from a desirable entry it hit) is on (``propagate_desirability``).
- The incentive is zero at terminal transitions: s_{t+1} is terminal, its value is 0
  and Qbar there is not a value estimate (the official code applies it there too).
- Final observations (the state after an episode's last transition) are not written;
  the official code writes pymarl's zero-reward padding slot with H = 0.
- The returns H and the incentive use the run's ``gamma`` hyperparameter (a swept
  value reaches them through the hooks' ``hp``; ``config.gamma`` when a hook is
  called without it). A memory written under one gamma holds returns of that gamma.
- Not implemented: the official code's EMC-style curiosity reward (scale 1e-3; the
  paper finds it adds little) and its extra memory updates from replayed batches.
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
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from algos import qlearning as ql
from marl import config as cfg
from marl import episodic_memory as em
from marl.networks import dense
from marl.types import Algorithm, max_over_seeds

LOOKUPS = ("index", "brute")
WRITE_CHUNK = 16384  # memory entries per distance block when writing (one query at a time)
EMBED_GRAD_CLIP = 10.0


@dataclasses.dataclass(frozen=True)
class EMUConfig(ql.QLearningConfig):
    """EMU settings: the Q-learning backbone's fields plus the memory and embedding."""

    capacity: int = 100_000
    """episodic memory entries (the paper uses 1_000_000)"""
    delta: float = 1.3e-5
    """hit threshold on normalized keys (1.3e-3 on the paper's super-hard maps)"""
    hit_metric: str = "linf"
    """linf (official code, per dimension) | l2 (paper)"""
    key_dim: int = 4
    embed_hidden: int = 64
    lambda_rcon: float = 0.1
    """weight of the state reconstruction in the dCAE loss"""
    embed_interval: int = 10_000
    """env steps between embedding training phases"""
    embed_steps: int = 100
    """Adam steps per embedding phase"""
    embed_batch: int = 1024
    """memory entries per embedding minibatch"""
    embed_lr: float = 5e-4
    stats_interval_episodes: int = 200
    """written episodes between refreshes of the key normalization"""
    incentive: bool = True
    """add the episodic incentive gamma * eta to the TD target"""
    incentive_scale: float = 1.0
    lookup: str = "index"
    """index: binary search of the hit candidates in a sorted index rebuilt after every
    iteration's writes (exact for hits, marl.episodic_memory.lookup_hits) | brute: exact
    brute-force nearest neighbour over the whole memory at every gradient step"""
    lookup_chunk: int = 2048
    """memory entries per distance block of the brute-force lookup"""
    desirable_return: Optional[float] = None
    """None: an episode is desirable when won; else when its (unscaled) return >= this"""
    propagate_desirability: bool = True
    init_desirability: bool = False
    """count the inserting visit in N_xi (official default: no)"""

    def __post_init__(self):
        super().__post_init__()
        if self.mixer == "none":
            raise cfg.ConfigError("mixer", self.mixer, "EMU needs a mixer: one of ['vdn', 'qmix', 'qplex']")
        for f in ("capacity", "key_dim", "embed_hidden", "embed_interval", "embed_steps", "embed_batch",
                  "stats_interval_episodes", "lookup_chunk"):
            cfg.check_positive(f, getattr(self, f), integer=True)
        cfg.check_positive("embed_lr", self.embed_lr)
        for f in ("delta", "lambda_rcon", "incentive_scale"):
            cfg.check_nonnegative(f, getattr(self, f))
        cfg.check_choice("hit_metric", self.hit_metric, em.METRICS)
        cfg.check_choice("lookup", self.lookup, LOOKUPS)
        if self.desirable_return is not None and not isinstance(self.desirable_return, (int, float)):
            raise cfg.ConfigError("desirable_return", self.desirable_return, "must be a number or None")


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
    last_stats: jax.Array  # ``written`` at the last statistics refresh
    embed_loss: jax.Array  # mean dCAE loss of the last phase
    index: em.HitIndex  # sorted first key coordinate of the memory as it is now


class EMUParts(NamedTuple):
    """The backbone hooks and the embedding functions they close over."""

    hooks: ql.Hooks
    encode: Callable  # (embed_params, states [N, S], t [N]) -> keys [N, k]
    embedding_loss: Callable  # (embed_params, states [N, S], t [N], H [N]) -> []


def make(env, config: EMUConfig, name: str = "emu") -> Algorithm:
    return ql.make(env, config, name=name, hooks=make_parts(env.spec, config).hooks)


def make_parts(spec, config: EMUConfig) -> EMUParts:
    """EMU's hooks for an env with ``spec`` (reads state_dim, max_steps, state_scale, max_return)."""
    L = spec.max_steps
    S = spec.state_dim
    steps_per_iteration = config.num_envs * config.num_steps
    # slots re-keyed by one iteration's writes: at most the steps of the episodes that end
    # in it (past that the writes fall back to brute force, still exact)
    recent_size = config.num_envs * (config.num_steps + L)
    reward_scale = config.reward_scale
    if reward_scale is None:  # the backbone's rule, so H is on the scale of Q_tot
        reward_scale = 20.0 / spec.max_return if spec.max_return else 1.0
    state_scale = jnp.ones((S,)) if spec.state_scale is None else jnp.asarray(spec.state_scale, jnp.float32)
    net = StateEmbedding(S, config.key_dim, config.embed_hidden)
    tx = optax.chain(optax.clip_by_global_norm(EMBED_GRAD_CLIP), optax.adam(config.embed_lr))

    def tau(t):
        return t.astype(jnp.float32) / L

    def encode(params, states, t):
        return net.apply(params, states / state_scale, tau(t), method=StateEmbedding.encode)

    def embedding_loss(params, states, t, H):
        s = states / state_scale
        _, (s_hat, h_hat) = net.apply(params, s, tau(t))
        return jnp.mean((H - h_hat) ** 2) + config.lambda_rcon * jnp.mean((s - s_hat) ** 2)

    # ------------------------------------------------------------------ hooks
    def init(key):
        params = net.init(key, jnp.zeros((1, S)), jnp.zeros((1,)))
        memory = em.init(config.capacity, config.key_dim, S, config.hit_metric)
        z = jnp.zeros((), jnp.int32)
        state = EMUState(memory, params, tx.init(params), z, z, z, z, jnp.zeros(()), em.build_index(memory))
        return {}, state

    def gamma_of(hp):
        return config.gamma if hp is None else hp.gamma

    def intrinsic_reward(ext: EMUState, batch, target_next, hp=None):
        """gamma * scale * eta_t [B, T] for the transitions of ``batch``."""
        s_next = batch["state"][:, 1:]
        B, T = s_next.shape[:2]
        if not config.incentive:
            return jnp.zeros((B, T))
        t_next = jnp.broadcast_to(jnp.arange(1, T + 1), (B, T))
        keys = encode(ext.embed_params, s_next.reshape(B * T, S), t_next.reshape(-1))
        if config.lookup == "index":
            rec = em.lookup_hits(ext.memory, ext.index, keys, config.delta)
        else:
            rec = em.lookup(ext.memory, keys, config.lookup_chunk, config.delta)
        eta = incentive(rec, target_next.reshape(B * T)).reshape(B, T)
        live = batch["filled"][:, 1:] & ~batch["terminated"][:, :-1].astype(bool)
        return gamma_of(hp) * config.incentive_scale * jnp.where(live, eta, 0.0)

    def extra_loss(params, ext: EMUState, batch, key):
        # no loss term: the hook reports the memory's state with the training metrics
        mem = ext.memory
        n = jnp.maximum(mem.size, 1).astype(jnp.float32)
        filled = em.filled_mask(mem)
        return jnp.zeros(()), {
            "memory_size": mem.size.astype(jnp.float32),
            "memory_desirable": (mem.desirable & filled).sum() / n,
            "embed_loss": ext.embed_loss,
        }

    def write_new_episodes(ext: EMUState, buffer, new_episodes, gamma):
        cap = buffer.capacity
        n = jnp.minimum(new_episodes, cap).astype(jnp.int32)

        def body(carry):
            j, memory, cache = carry
            r = (buffer.insert_pos - n + j) % cap
            row = jax.tree.map(lambda x: x[r], buffer.data)
            filled = buffer.filled[r] & (j < n)  # rows past this seed's count write nothing
            memory, cache = write_row(ext.embed_params, memory, cache, row, filled, gamma)
            return j + 1, memory, cache

        if config.lookup == "index":
            cache = em.WriteCache(ext.index, jnp.zeros((recent_size,), jnp.int32), jnp.zeros((), jnp.int32))
        else:
            cache = ()
        # one trip count for all vmapped seeds (a per-seed count would select the whole memory
        # at every step)
        n_max = max_over_seeds(n)
        _, memory, cache = jax.lax.while_loop(lambda c: c[0] < n_max, body,
                                              (jnp.zeros((), jnp.int32), ext.memory, cache))
        return ext.replace(memory=memory, written=ext.written + n), cache

    def write_row(params, memory, cache, row, filled, gamma):
        step = row["step"]
        valid = jnp.concatenate([filled[1:], jnp.zeros((1,), bool)])  # transition t exists
        last = jnp.maximum(filled.sum() - 1, 0)
        if config.desirable_return is None:
            xi = row["episode"]["won"][last] > 0.5
        else:
            xi = row["episode"]["return"][last] >= config.desirable_return
        t = jnp.arange(L + 1)
        returns = em.discounted_returns(reward_scale * step["reward"], valid, gamma)
        keys = encode(params, step["state"], t)
        kw = dict(chunk=WRITE_CHUNK, propagate=config.propagate_desirability,
                  init_desirability=config.init_desirability)
        if config.lookup == "index":
            return em.write_episode_indexed(memory, cache, keys, step["state"], returns, t, xi, valid,
                                            config.delta, **kw)
        return em.write_episode(memory, keys, step["state"], returns, t, xi, valid, config.delta, **kw), cache

    def train_embedding(ext: EMUState, key):
        mem = ext.memory
        idx = jax.random.randint(key, (config.embed_steps, config.embed_batch), 0, jnp.maximum(mem.size, 1))

        def step(carry, ids):
            params, opt = carry
            loss, grads = jax.value_and_grad(embedding_loss)(params, mem.states[ids], mem.timestep[ids], mem.H[ids])
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), loss

        (params, opt), losses = jax.lax.scan(step, (ext.embed_params, ext.embed_opt), idx)
        ready = mem.size >= config.embed_batch
        params, opt = jax.tree.map(lambda a, b: jnp.where(ready, a, b), (params, opt),
                                   (ext.embed_params, ext.embed_opt))
        memory = em.rekey(mem, lambda s, t: encode(params, s, t), config.lookup_chunk)
        return ext.replace(memory=memory, embed_params=params, embed_opt=opt,
                           embed_loss=jnp.where(ready, losses.mean(), ext.embed_loss),
                           last_embed=ext.env_steps)

    def after_iteration(ext: EMUState, params, buffer, new_episodes, key, hp=None):
        ext = ext.replace(env_steps=ext.env_steps + steps_per_iteration)
        ext, cache = write_new_episodes(ext, buffer, new_episodes, gamma_of(hp))
        due_stats = ext.written - ext.last_stats >= config.stats_interval_episodes
        fresh, mem = em.refresh_stats(ext.memory), ext.memory
        memory = mem.replace(mean=jnp.where(due_stats, fresh.mean, mem.mean),
                             std=jnp.where(due_stats, fresh.std, mem.std),
                             keys_norm=jnp.where(due_stats, fresh.keys_norm, mem.keys_norm))
        ext = ext.replace(memory=memory, last_stats=jnp.where(due_stats, ext.written, ext.last_stats))
        due = max_over_seeds((ext.env_steps - ext.last_embed >= config.embed_interval).astype(jnp.int32)) > 0
        ext = jax.lax.cond(due, train_embedding, lambda e, k: e, ext, key)
        if config.lookup != "index":
            return ext
        # after re-keying (or more re-keyed slots than the cache lists) sort again, else
        # merge this iteration's re-keyed slots into the old order
        resort = due | (max_over_seeds(cache.count) > recent_size)
        index = jax.lax.cond(resort, lambda m, i, c: em.build_index(m), em.update_index, ext.memory, ext.index, cache)
        return ext.replace(index=index)

    hooks = ql.Hooks(init=init, intrinsic_reward=intrinsic_reward, extra_loss=extra_loss,
                     after_iteration=after_iteration)
    return EMUParts(hooks, encode, embedding_loss)


def incentive(recall: em.Recall, target_next: jax.Array) -> jax.Array:
    """eta = p * max(H(x^) - Qbar_tot(s_{t+1}, a*), 0) on a hit, 0 on a miss ([Q])."""
    return jnp.where(recall.hit, recall.ratio * jnp.maximum(recall.H - target_next, 0.0), 0.0)
