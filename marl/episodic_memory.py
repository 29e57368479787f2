"""Episodic memory of EMU (Na, Seo, Moon; ICLR 2024) as a fixed-shape pytree.

Every function is pure, jittable and elementwise over a leading vmapped axis (seeds).
Shapes: ``C`` capacity (static), ``k`` key (embedding) size, ``S`` state size.

Contents
--------
Per entry ``j`` (slots ``0 .. size - 1`` are filled; see eviction below):

```
keys       [C, k]  x_j = f_phi(s_j, t_j / T), the embedding of the stored state
keys_norm  [C, k]  (x_j - mu) / sigma, with the memory's key statistics mu, sigma [k]
states     [C, S]  s_j, the global state (kept so keys can be recomputed after the
                   embedding is retrained, see :func:`rekey`)
H          [C]     best discounted return-to-go seen from the entry
timestep   [C]     t_j, the step of the episode the entry was written at
desirable  [C]     xi_j: the entry lies on a desirable (e.g. won) trajectory
n_call     [C]     N_call: visits (insertion counts as one)
n_xi       [C]     N_xi: desirable visits
last_used  [C]     write-clock value of the last insertion or hit (eviction order)
```

and two counters: ``clock`` (valid writes so far) and ``write_hits`` (writes that
hit an entry, i.e. revisits), so the share of writes that were revisits is their
ratio. :func:`memory_metrics` and :func:`recall_metrics` summarize a memory and a
batch of lookups as shares (EMU logs them every iteration).

Normalization
-------------
``mu, sigma`` are the per-dimension mean and standard deviation of the filled keys,
recomputed by :func:`refresh_stats` (the caller decides when; EMU does it every few
hundred episodes and after every re-keying). A dimension with ``sigma < 1e-6`` (no
spread yet, e.g. a single entry) keeps scale 1. Before the first refresh mu = 0,
sigma = 1. ``keys_norm`` always equals ``(keys - mu) / sigma`` for the current
statistics: a refresh recomputes every row, an insertion normalizes with the current
statistics. Queries are normalized with the same statistics, and both the
nearest-neighbour search and the hit test run on normalized keys under the same
metric (the official code searches raw keys with a KD-tree, then tests normalized
keys: the recalled entry need not be the nearest under the test).

Metric (static, ``metric``): ``"linf"`` d(a, b) = max_i |a_i - b_i| (the official
code's per-dimension ``allclose(atol=delta, rtol=0)`` test, the default) or ``"l2"``
d(a, b) = ||a - b||_2 (the paper's text). A hit is d(query, nearest) <= delta. The
search is exact brute force over chunks of the memory; it only visits chunks that
hold filled entries (a ``while_loop`` over ``ceil(size / chunk)`` chunks, so an
almost empty memory is cheap), and computes differences per dimension (no
``|a|^2 + |b|^2 - 2ab`` expansion, whose float32 cancellation error, ~1e-3 in
distance, would swamp delta = 1.3e-5). Ties go to the lowest index.

Write (:func:`write_episode`), after an episode, steps t scanned backwards
-------------------------------------------------------------------------------
The caller gives the keys x_t, states s_t, returns-to-go R_t = r_t + gamma R_{t+1},
timesteps and the episode's desirability xi (won, or return above a threshold).
For each valid t, from the last to the first:

- nearest entry j and distance d (normalized keys);
- hit (d <= delta and the memory is not empty):
    N_call_j += 1;  N_xi_j += xi
    if not xi_j and xi:  memory shift: entry j takes this step's key, state,
                         R_t and t, and xi_j = 1 (counts are kept, as the
                         official default ``flag_memory_cnt_reset=False``)
    else:                H_j = max(H_j, R_t)
    if xi_j (after the update) and ``propagate``: xi = 1 for the earlier steps of
    this episode ("optimality propagation" of the official code: a trajectory that
    reaches a desirable state is desirable from there on backwards);
- miss: insert (x_t, s_t, H = R_t, t, xi, N_call = 1, N_xi = xi if
  ``init_desirability`` else 0 (official default: 0)).

Every touched entry gets ``last_used = clock`` and the clock advances.

Eviction: least recently used by writes. The slot of an insertion is
``argmin(last_used)`` (computed only once the memory is full: before that it is
``size``); empty slots start at ``last_used = j - C < 0``, so slots fill
in index order (0, 1, ...) and the filled entries are always ``0 .. size - 1``; once
full, the entry whose last insertion or write-time hit is the oldest is replaced.
The official code also refreshes recency on read-only lookups during training; here
lookups are pure reads (they happen inside the loss, which cannot return state), so
recency counts writes only. One ``argmin`` over ``[C]`` per insertion keeps shapes
fixed.

Lookup (:func:`lookup`): nearest entry for a batch of raw query keys, with its
distance, hit flag, H, xi and desirability ratio p = N_xi / (N_call + 1e-3).

Hit lookup through a sorted index (:func:`build_index`, :func:`lookup_hits`)
---------------------------------------------------------------------------------
EMU only uses a recalled entry on a hit, and an entry within ``delta`` of a query
under either metric lies within ``delta`` of it in the first coordinate. So the
filled entries sorted by their first normalized coordinate (one ``argsort`` per
memory change, :class:`HitIndex`) give, per query, by binary search the range of
candidates with ``|x_0 - q_0| <= delta``; only those are compared in all
coordinates, ``window`` at a time in a ``while_loop`` that runs until the longest
range is exhausted. The result is exact: for every query with an entry within
``delta`` it is the entry :func:`lookup` returns (same distance, ties to the lowest
index); a query without one gets ``hit = False``, ``distance = inf`` and zero
``H``, ``ratio`` and ``desirable``. The cost per query is ``O(log C + candidates)``
instead of ``O(size)``. The index must be rebuilt after any change of the keys or
the statistics (writes, :func:`refresh_stats`, :func:`rekey`): :func:`build_index`
sorts the whole memory (slow on a CPU: ~50 ms at 100k entries, ~0.6 s at 1M);
after a phase of writes :func:`update_index` merges the re-keyed slots into the old
order in O(C) instead. Writes search the same way (:func:`write_episode_indexed`):
the index from before the phase plus the slots re-keyed since.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from marl.types import max_over_seeds

METRICS = ("linf", "l2")
RATIO_EPS = 1e-3  # p = N_xi / (N_call + RATIO_EPS), as in the paper
MIN_STD = 1e-6


class EpisodicMemory(struct.PyTreeNode):
    keys: jax.Array  # [C, k]
    keys_norm: jax.Array  # [C, k]
    states: jax.Array  # [C, S]
    H: jax.Array  # [C]
    timestep: jax.Array  # [C] int32
    desirable: jax.Array  # [C] bool
    n_call: jax.Array  # [C] int32
    n_xi: jax.Array  # [C] int32
    last_used: jax.Array  # [C] int32
    mean: jax.Array  # [k]
    std: jax.Array  # [k]
    size: jax.Array  # [] int32, filled entries (slots 0 .. size - 1)
    clock: jax.Array  # [] int32, write clock (valid writes so far)
    write_hits: jax.Array  # [] int32, writes that hit an entry (revisits) so far
    metric: str = struct.field(pytree_node=False, default="linf")

    @property
    def capacity(self) -> int:
        return self.H.shape[-1]


class Recall(NamedTuple):
    """Result of :func:`lookup` for queries [Q, k]; every field [Q]."""

    index: jax.Array  # type: ignore[assignment]  # nearest filled entry (0 when the memory is empty)
    distance: jax.Array  # normalized distance to it (inf when empty)
    hit: jax.Array  # distance <= delta
    H: jax.Array
    desirable: jax.Array
    ratio: jax.Array  # N_xi / (N_call + 1e-3)


def init(capacity: int, key_dim: int, state_dim: int, metric: str = "linf") -> EpisodicMemory:
    """An empty memory (static sizes)."""
    if not isinstance(capacity, int) or capacity <= 0:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    C = capacity
    zi = jnp.zeros((C,), jnp.int32)
    return EpisodicMemory(
        keys=jnp.zeros((C, key_dim)),
        keys_norm=jnp.zeros((C, key_dim)),
        states=jnp.zeros((C, state_dim)),
        H=jnp.zeros((C,)),
        timestep=zi,
        desirable=jnp.zeros((C,), bool),
        n_call=zi,
        n_xi=zi,
        last_used=jnp.arange(C, dtype=jnp.int32) - C,
        mean=jnp.zeros((key_dim,)),
        std=jnp.ones((key_dim,)),
        size=jnp.zeros((), jnp.int32),
        clock=jnp.zeros((), jnp.int32),
        write_hits=jnp.zeros((), jnp.int32),
        metric=metric,
    )


def normalize(memory: EpisodicMemory, keys: jax.Array) -> jax.Array:
    """Keys [..., k] in the memory's normalized coordinates."""
    return (keys - memory.mean) / memory.std


def filled_mask(memory: EpisodicMemory) -> jax.Array:
    return jnp.arange(memory.capacity) < memory.size


def refresh_stats(memory: EpisodicMemory) -> EpisodicMemory:
    """Recompute mu, sigma over the filled keys and every normalized key."""
    m = filled_mask(memory).astype(jnp.float32)[:, None]
    n = jnp.maximum(m.sum(), 1.0)
    mean = (memory.keys * m).sum(0) / n
    var = (((memory.keys - mean) ** 2) * m).sum(0) / n
    std = jnp.sqrt(var)
    std = jnp.where(std < MIN_STD, 1.0, std)
    memory = memory.replace(mean=mean, std=std)
    return memory.replace(keys_norm=normalize(memory, memory.keys))


def _distances(metric: str, q: jax.Array, m: jax.Array) -> jax.Array:
    """[Q, M] distances between q [Q, k] and m [M, k], one dimension at a time."""
    d = jnp.zeros((q.shape[0], m.shape[0]), q.dtype)
    for i in range(q.shape[1]):
        diff = q[:, i : i + 1] - m[None, :, i]
        d = jnp.maximum(d, jnp.abs(diff)) if metric == "linf" else d + diff * diff
    return d if metric == "linf" else jnp.sqrt(d)


def nearest(memory: EpisodicMemory, queries_norm: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Exact nearest filled entry for normalized queries [Q, k] -> (index [Q], distance [Q]).

    Brute force over chunks of ``chunk`` entries; only the chunks holding filled
    entries are visited. The last chunk's start is clamped to ``C - chunk`` (it may
    revisit entries, which cannot change a strict minimum).
    """
    C = memory.capacity
    chunk = max(1, min(int(chunk), C))
    n_active = max_over_seeds((memory.size + chunk - 1) // chunk)  # one trip count for all vmapped seeds
    Q = queries_norm.shape[0]

    def body(carry):
        c, best_d, best_i = carry
        start = jnp.minimum(c * chunk, C - chunk)
        keys = jax.lax.dynamic_slice_in_dim(memory.keys_norm, start, chunk)
        idx = start + jnp.arange(chunk)
        d = _distances(memory.metric, queries_norm, keys)
        d = jnp.where((idx < memory.size)[None], d, jnp.inf)
        j = jnp.argmin(d, axis=1)
        dj = jnp.take_along_axis(d, j[:, None], 1)[:, 0]
        better = dj < best_d
        return c + 1, jnp.where(better, dj, best_d), jnp.where(better, start + j, best_i)

    init_carry = (jnp.zeros((), jnp.int32), jnp.full((Q,), jnp.inf, queries_norm.dtype), jnp.zeros((Q,), jnp.int32))
    _, best_d, best_i = jax.lax.while_loop(lambda c: c[0] < n_active, body, init_carry)
    return best_i, best_d


def lookup(memory: EpisodicMemory, queries: jax.Array, chunk: int = 2048, delta: float = 0.0) -> Recall:
    """Recall the nearest entry of each raw query key [Q, k] (see the module docstring)."""
    idx, dist = nearest(memory, normalize(memory, queries), chunk)
    n_call = memory.n_call[idx].astype(jnp.float32)
    ratio = memory.n_xi[idx].astype(jnp.float32) / (n_call + RATIO_EPS)
    return Recall(
        index=idx, distance=dist, hit=dist <= delta, H=memory.H[idx], desirable=memory.desirable[idx], ratio=ratio
    )


def _insert_slot(memory: EpisodicMemory) -> jax.Array:
    """The slot an insertion takes: ``argmin(last_used)``, which is ``size`` until the
    memory is full (empty slots hold negative, increasing ``last_used``); the O(C)
    argmin only runs once some vmapped seed's memory is full."""
    C = memory.capacity
    return jax.lax.cond(
        max_over_seeds(memory.size) < C,
        lambda m: m.size.astype(jnp.int32),
        lambda m: jnp.argmin(m.last_used).astype(jnp.int32),
        memory,
    )


def _write_step(memory: EpisodicMemory, find: Callable, key, state, ret, t, xi, valid, delta, init_desirability):
    """One write (hit update or insertion). ``find(memory, qn [k]) -> (index, distance)``
    is exact whenever an entry lies within delta. Returns (memory, the touched entry's
    xi, the touched slot, whether that slot took a new key)."""
    qn = normalize(memory, key)
    idx, dist = find(memory, qn)
    hit = dist <= delta  # inf on an empty memory
    slot = jnp.where(hit, idx, _insert_slot(memory)).astype(jnp.int32)
    old_xi = memory.desirable[slot]
    shift = hit & xi & ~old_xi
    take_new = ~hit | shift  # the entry takes this step's key, state, return and time

    def pick(new, old):
        return jnp.where(valid, new, old)

    new_key = jnp.where(take_new, key, memory.keys[slot])
    new_norm = jnp.where(take_new, qn, memory.keys_norm[slot])
    new_state = jnp.where(take_new, state, memory.states[slot])
    new_H = jnp.where(take_new, ret, jnp.maximum(memory.H[slot], ret))
    new_t = jnp.where(take_new, t, memory.timestep[slot])
    new_xi = jnp.where(hit, old_xi | xi, xi)
    xi_i = xi.astype(jnp.int32)
    new_call = jnp.where(hit, memory.n_call[slot] + 1, 1)
    new_nxi = jnp.where(hit, memory.n_xi[slot] + xi_i, xi_i if init_desirability else 0)
    memory = memory.replace(
        keys=memory.keys.at[slot].set(pick(new_key, memory.keys[slot])),
        keys_norm=memory.keys_norm.at[slot].set(pick(new_norm, memory.keys_norm[slot])),
        states=memory.states.at[slot].set(pick(new_state, memory.states[slot])),
        H=memory.H.at[slot].set(pick(new_H, memory.H[slot])),
        timestep=memory.timestep.at[slot].set(pick(new_t, memory.timestep[slot])),
        desirable=memory.desirable.at[slot].set(pick(new_xi, old_xi)),
        n_call=memory.n_call.at[slot].set(pick(new_call, memory.n_call[slot])),
        n_xi=memory.n_xi.at[slot].set(pick(new_nxi, memory.n_xi[slot])),
        last_used=memory.last_used.at[slot].set(pick(memory.clock, memory.last_used[slot])),
        size=jnp.where(valid & ~hit, jnp.minimum(memory.size + 1, memory.capacity), memory.size),
        clock=memory.clock + valid.astype(jnp.int32),
        write_hits=memory.write_hits + (valid & hit).astype(jnp.int32),
    )
    return memory, valid & hit & new_xi, slot, valid & take_new


def _write_loop(
    memory,
    find,
    on_new_key,
    extra,
    keys,
    states,
    returns_to_go,
    timesteps,
    desirable,
    valid_mask,
    delta,
    propagate,
    init_desirability,
):
    valid_mask = valid_mask.astype(bool)
    L = valid_mask.shape[0]
    # one trip count for every vmapped seed: a per-seed count would make the loop select
    # its whole carry (the memory) at every step; steps past a seed's own last are invalid
    last = max_over_seeds(jnp.max(jnp.where(valid_mask, jnp.arange(L), -1)))

    def body(carry):
        t, mem, xi, ext = carry
        mem, reached, slot, new_key = _write_step(
            mem,
            lambda m, q: find(m, q, ext),
            keys[t],
            states[t],
            returns_to_go[t],
            timesteps[t].astype(jnp.int32),
            xi,
            valid_mask[t],
            delta,
            init_desirability,
        )
        if propagate:
            xi = xi | reached
        return t - 1, mem, xi, on_new_key(ext, slot, new_key)

    _, memory, _, extra = jax.lax.while_loop(
        lambda c: c[0] >= 0, body, (last.astype(jnp.int32), memory, jnp.asarray(desirable, bool), extra)
    )
    return memory, extra


def write_episode(
    memory: EpisodicMemory,
    keys: jax.Array,
    states: jax.Array,
    returns_to_go: jax.Array,
    timesteps: jax.Array,
    desirable: jax.Array,
    valid_mask: jax.Array,
    delta: float,
    *,
    chunk: int = 16384,
    propagate: bool = True,
    init_desirability: bool = False,
) -> EpisodicMemory:
    """Write one episode's steps, scanning t backwards (see the module docstring).

    keys [L, k], states [L, S], returns_to_go [L], timesteps [L], desirable [] (xi of
    the episode), valid_mask [L] (steps to write). The loop runs from the last valid
    step down to 0, so the cost follows the episode's length, not L. Each step's
    search is brute force over the filled entries; :func:`write_episode_indexed` gives
    the same result faster on a large memory.
    """

    def find(mem, qn, _):
        idx, dist = nearest(mem, qn[None], chunk)
        return idx[0], dist[0]

    memory, _ = _write_loop(
        memory,
        find,
        lambda e, slot, new: e,
        (),
        keys,
        states,
        returns_to_go,
        timesteps,
        desirable,
        valid_mask,
        delta,
        propagate,
        init_desirability,
    )
    return memory


class WriteCache(NamedTuple):
    """Search state for a phase of writes (:func:`write_episode_indexed`): the
    :class:`HitIndex` of the memory as it was before the phase, and the slots whose key
    changed since (insertions and memory shifts). ``count`` may exceed the buffer's
    size: the phase then falls back to brute force."""

    index: HitIndex  # type: ignore[assignment]  # a field, shadowing tuple.index
    recent: jax.Array  # [R] int32 slots given a new key in this phase
    count: jax.Array  # type: ignore[assignment]  # [] int32 slots given a new key so far


def write_cache(memory: EpisodicMemory, recent_size: int) -> WriteCache:
    """An empty :class:`WriteCache` for a phase of writes into ``memory``."""
    return WriteCache(build_index(memory), jnp.zeros((max(1, int(recent_size)),), jnp.int32), jnp.zeros((), jnp.int32))


def _hit_search(memory: EpisodicMemory, index: HitIndex, qn: jax.Array, delta, window: int = 8):
    """Nearest entry among those within delta of normalized queries [Q, k]: (index [Q],
    distance [Q], inf without one); candidates from the sorted index, each checked
    against its current normalized key."""
    C = memory.capacity
    W = max(1, min(int(window), C))
    q0 = qn[:, 0]
    # a slightly wider range than delta, so float rounding of q0 +- delta never drops
    # a candidate; the exact test below decides
    margin = delta * (1.0 + 1e-3) + 4.0 * jnp.finfo(qn.dtype).eps * (1.0 + jnp.abs(q0))
    lo = jnp.searchsorted(index.first, q0 - margin, side="left").astype(jnp.int32)
    hi = jnp.searchsorted(index.first, q0 + margin, side="right").astype(jnp.int32)
    n_windows = max_over_seeds((jnp.max(jnp.maximum(hi - lo, 0), initial=0) + W - 1) // W)
    Q = qn.shape[0]

    def body(carry):
        w, best_d, best_i = carry
        pos = lo[:, None] + w * W + jnp.arange(W)  # [Q, W]
        idx = index.order[jnp.clip(pos, 0, C - 1)]
        d = _pair_distances(memory.metric, qn[:, None, :], memory.keys_norm[idx])
        d = jnp.where((pos < hi[:, None]) & (idx < memory.size), d, jnp.inf)
        d = jnp.where(d <= delta, d, jnp.inf)
        return (w + 1,) + _merge_best(best_d, best_i, d, idx, C)

    init_carry = (jnp.zeros((), jnp.int32), jnp.full((Q,), jnp.inf, qn.dtype), jnp.full((Q,), C, jnp.int32))
    _, dist, idx = jax.lax.while_loop(lambda c: c[0] < n_windows, body, init_carry)
    return idx, dist


def _pair_distances(metric: str, a: jax.Array, b: jax.Array) -> jax.Array:
    diff = a - b
    if metric == "linf":
        return jnp.abs(diff).max(-1)
    return jnp.sqrt((diff * diff).sum(-1))


def _merge_best(best_d, best_i, d, idx, C):
    """Fold candidates d, idx [Q, W] into the running best [Q] (ties: lowest index)."""
    d_min = d.min(1)
    i_min = jnp.where(d == d_min[:, None], idx, C).min(1)
    better = (d_min < best_d) | ((d_min == best_d) & (i_min < best_i))
    return jnp.where(better, d_min, best_d), jnp.where(better, i_min, best_i)


def write_episode_indexed(
    memory: EpisodicMemory,
    cache: WriteCache,
    keys: jax.Array,
    states: jax.Array,
    returns_to_go: jax.Array,
    timesteps: jax.Array,
    desirable: jax.Array,
    valid_mask: jax.Array,
    delta: float,
    *,
    chunk: int = 16384,
    propagate: bool = True,
    init_desirability: bool = False,
) -> tuple[EpisodicMemory, WriteCache]:
    """:func:`write_episode` with the search of each step restricted to the entries
    within delta: the cache's index (built before the phase) plus the slots re-keyed
    since, so a write costs O(log C + candidates + recent) instead of O(size). The
    result equals :func:`write_episode`'s (tested); when more slots were re-keyed in
    the phase than the cache holds (in any vmapped seed), the remaining steps search
    by brute force."""
    R = cache.recent.shape[0]

    def find(mem, qn, c: WriteCache):
        def fast(_):
            i_idx, d_idx = _hit_search(mem, c.index, qn[None], delta)
            d = _pair_distances(mem.metric, qn[None, None, :], mem.keys_norm[c.recent][None])
            d = jnp.where((jnp.arange(R) < c.count)[None] & (d <= delta), d, jnp.inf)
            best_d, best_i = _merge_best(d_idx, i_idx, d, c.recent[None], mem.capacity)
            return best_i[0], best_d[0]

        def brute(_):
            i, d = nearest(mem, qn[None], chunk)
            return i[0], d[0]

        # the same branch for every vmapped seed, so it stays a branch (not both sides)
        return jax.lax.cond(max_over_seeds(c.count) <= R, fast, brute, None)

    def on_new_key(c: WriteCache, slot, new):
        recent = jnp.where(new & (c.count < R), c.recent.at[jnp.minimum(c.count, R - 1)].set(slot), c.recent)
        return c._replace(recent=recent, count=c.count + new.astype(jnp.int32))

    return _write_loop(
        memory,
        find,
        on_new_key,
        cache,
        keys,
        states,
        returns_to_go,
        timesteps,
        desirable,
        valid_mask,
        delta,
        propagate,
        init_desirability,
    )


def memory_metrics(memory: EpisodicMemory) -> dict:
    """What the memory holds, as shares of its filled entries: ``memory_size``,
    ``memory_desirable`` (xi = 1), ``memory_revisited`` (N_call > 1: reached again at
    write time) and ``memory_positive_ratio`` (N_xi > 0: desirability ratio p > 0)."""
    filled = filled_mask(memory)
    n = jnp.maximum(memory.size, 1).astype(jnp.float32)

    def share(x):
        return (x & filled).sum() / n

    return {
        "memory_size": memory.size.astype(jnp.float32),
        "memory_desirable": share(memory.desirable),
        "memory_revisited": share(memory.n_call > 1),
        "memory_positive_ratio": share(memory.n_xi > 0),
    }


def recall_metrics(recall: Recall, live: jax.Array, eta: jax.Array) -> dict:
    """How a batch of lookups went, over the ``live`` queries [Q]: ``replay_hit_rate``
    (share that hit), ``hit_positive_ratio`` (share of the hits whose entry has p > 0),
    ``incentive_positive`` (share of queries with eta [Q] > 0) and ``incentive_active``
    (1 when any query has eta > 0, else 0)."""
    live = live.astype(bool)
    hits = recall.hit & live
    n_live = jnp.maximum(live.sum(), 1).astype(jnp.float32)
    positive = (eta > 0) & live
    return {
        "replay_hit_rate": hits.sum() / n_live,
        "hit_positive_ratio": (hits & (recall.ratio > 0)).sum() / jnp.maximum(hits.sum(), 1).astype(jnp.float32),
        "incentive_positive": positive.sum() / n_live,
        "incentive_active": positive.any().astype(jnp.float32),
    }


def discounted_returns(rewards: jax.Array, valid_mask: jax.Array, gamma) -> jax.Array:
    """R_t = r_t + gamma R_{t+1} over the valid steps of one episode [L] (0 elsewhere)."""

    def back(nxt, x):
        r, ok = x
        R = jnp.where(ok, r + gamma * nxt, 0.0)
        return R, R

    _, R = jax.lax.scan(back, jnp.zeros((), rewards.dtype), (rewards, valid_mask.astype(bool)), reverse=True)
    return R


def rekey(
    memory: EpisodicMemory, embed_fn: Callable[[jax.Array, jax.Array], jax.Array], chunk: Optional[int] = 4096
) -> EpisodicMemory:
    """Recompute every filled key as ``embed_fn(states [N, S], timesteps [N]) -> [N, k]``,
    then refresh the normalization statistics. Runs over the filled chunks only."""
    C = memory.capacity
    chunk = C if chunk is None else max(1, min(int(chunk), C))
    n_active = max_over_seeds((memory.size + chunk - 1) // chunk)

    def body(carry):
        c, keys = carry
        start = jnp.minimum(c * chunk, C - chunk)
        s = jax.lax.dynamic_slice_in_dim(memory.states, start, chunk)
        t = jax.lax.dynamic_slice_in_dim(memory.timestep, start, chunk)
        new = embed_fn(s, t).astype(keys.dtype)
        return c + 1, jax.lax.dynamic_update_slice_in_dim(keys, new, start, 0)

    _, keys = jax.lax.while_loop(lambda c: c[0] < n_active, body, (jnp.zeros((), jnp.int32), memory.keys))
    keys = jnp.where(filled_mask(memory)[:, None], keys, memory.keys)
    return refresh_stats(memory.replace(keys=keys))


class HitIndex(NamedTuple):
    """Filled entries sorted by their first normalized key coordinate (see the module
    docstring); unfilled slots sort last with key +inf."""

    order: jax.Array  # [C] int32, entry indices in ascending order of keys_norm[:, 0]
    first: jax.Array  # [C] keys_norm[order, 0] (+inf for unfilled slots)


def build_index(memory: EpisodicMemory) -> HitIndex:
    """The :class:`HitIndex` of the memory's current normalized keys."""
    first = jnp.where(filled_mask(memory), memory.keys_norm[:, 0], jnp.inf)
    order = jnp.argsort(first).astype(jnp.int32)
    return HitIndex(order=order, first=first[order])


def lookup_hits(memory: EpisodicMemory, index: HitIndex, queries: jax.Array, delta: float, window: int = 8) -> Recall:
    """Recall of raw query keys [Q, k] for the hits only (module docstring): equals
    :func:`lookup` on every query with an entry within ``delta``; the others get
    ``hit = False``, ``distance = inf`` and zero H, ratio and desirability."""
    idx, dist = _hit_search(memory, index, normalize(memory, queries), delta, window)
    hit = dist <= delta
    idx = jnp.where(hit, idx, 0)
    n_call = memory.n_call[idx].astype(jnp.float32)
    ratio = memory.n_xi[idx].astype(jnp.float32) / (n_call + RATIO_EPS)
    return Recall(
        index=idx,
        distance=jnp.where(hit, dist, jnp.inf),
        hit=hit,
        H=jnp.where(hit, memory.H[idx], 0.0),
        desirable=hit & memory.desirable[idx],
        ratio=jnp.where(hit, ratio, 0.0),
    )


def update_index(memory: EpisodicMemory, index: HitIndex, cache: WriteCache) -> HitIndex:
    """The :class:`HitIndex` of ``memory`` after a phase of writes that began with
    ``cache = WriteCache(index, ...)``, without a full sort: the entries the phase did
    not re-key keep their order (a refresh of the statistics maps every first
    coordinate by the same increasing function), the re-keyed slots (deduplicated) are
    sorted among themselves and the two sorted lists are merged, O(C + R log R) with
    R = ``cache.recent``'s size. Requires ``cache.count <= R`` (else use
    :func:`build_index`). Equals :func:`build_index` up to the order of equal keys
    (tested), which no search depends on."""
    C = memory.capacity
    R = cache.recent.shape[0]
    f_all = jnp.where(filled_mask(memory), memory.keys_norm[:, 0], jnp.inf)
    listed = jnp.arange(R) < cache.count
    changed = jnp.zeros((C,), bool).at[jnp.where(listed, cache.recent, C)].set(True, mode="drop")
    # the unchanged entries of the old index, compacted, still in ascending order
    keep = jnp.isfinite(index.first) & ~changed[index.order]
    n_big = keep.sum()
    big_order = jnp.zeros((C,), jnp.int32).at[jnp.where(keep, jnp.cumsum(keep) - 1, C)].set(index.order, mode="drop")
    big_first = jnp.where(jnp.arange(C) < n_big, f_all[big_order], jnp.inf)
    # the re-keyed slots, each once, sorted by their new first coordinate
    small = jnp.sort(jnp.where(listed, cache.recent, C))
    ok = (small < C) & jnp.concatenate([jnp.ones((1,), bool), small[1:] != small[:-1]])
    small_first = jnp.where(ok, f_all[jnp.minimum(small, C - 1)], jnp.inf)
    by_key = jnp.argsort(small_first)
    small, small_first, ok = small[by_key], small_first[by_key], ok[by_key]
    # merge: each element's rank among the other list's (equal keys: old entries first)
    big_pos = jnp.arange(C) + jnp.searchsorted(small_first, big_first, side="left")
    small_pos = jnp.arange(R) + jnp.searchsorted(big_first, small_first, side="right")
    big_pos = jnp.where(jnp.arange(C) < n_big, big_pos, C)
    small_pos = jnp.where(ok, small_pos, C)
    order = jnp.zeros((C,), jnp.int32).at[big_pos].set(big_order, mode="drop").at[small_pos].set(small, mode="drop")
    first = jnp.full((C,), jnp.inf, f_all.dtype).at[big_pos].set(big_first, mode="drop")
    first = first.at[small_pos].set(small_first, mode="drop")
    return HitIndex(order=order, first=first)
