"""Episode-aligned replay storage for Q-learning with recurrent agents.

Layout
------
An :class:`EpisodeBuffer` keeps whole episodes, one per row of a ring of fixed
``capacity`` ``C``:

```
data     pytree; per-step leaves [C, T + 1, ...] (obs, actions, rewards, avail_actions,
         state, any extra field such as per-step codes or classes), per-episode
         leaves [C, ...] (a task id, a won flag, ...)
filled   [C, T + 1] bool    which steps of a row hold a real step of the episode
insert_pos []  int32        ring slot the next episode goes to
size     []  int32          number of stored episodes, <= C
```

``T`` is the episode limit; the extra step holds the observation/state after the
last transition, for bootstrapping. Rows are written at ``insert_pos`` with
wrap-around, so after ``n`` insertions the ``j``-th inserted episode (0-based) lives
in slot ``j % C`` as long as it is among the last ``C``. Storage is zero-initialised:
never-written rows are all zeros with ``filled`` all False.

Why not flashbax
----------------
flashbax (not a dependency here) is built around transition / trajectory *item*
buffers with its own state and sampling types (fixed-length sequences cut from a
time-major stream). Recurrent Q-learning in the pymarl tradition (QMIX, QPLEX, EMU,
TRAMA) trains on whole episodes with a filled mask. A plain pytree keeps that fixed
``[C, T + 1, ...]`` episode layout, accepts arbitrary extra fields (per-step or
per-episode) without declaring them anywhere, and is trivially ``vmap``-able over a
leading seed axis: every function here is pure, jittable and elementwise in the
seed axis, so ``jax.vmap(init)``, ``jax.vmap(add)`` and ``jax.vmap(sample)`` give
per-seed buffers.

Collecting episodes
-------------------
Q-learning rollouts usually step ``B`` environments synchronously for exactly ``T``
steps and mask what follows each env's first ``done`` with :func:`mask_after_done`.
:class:`EpisodeAccumulator` supports the other style (episodes of different
lengths written step by step at per-env time indices, handed to the buffer when
they end, with :func:`add`'s ``valid`` mask choosing which rows to store).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

__all__ = [
    "EpisodeBuffer",
    "init",
    "add",
    "can_sample",
    "sample",
    "sample_indices",
    "gather",
    "mask_after_done",
    "EpisodeAccumulator",
    "accumulator_init",
    "write",
    "reset_envs",
]


class EpisodeBuffer(struct.PyTreeNode):
    """Ring buffer of whole episodes (see the module docstring for the layout)."""

    data: Any
    filled: jax.Array  # [C, T + 1] bool
    insert_pos: jax.Array  # [] int32
    size: jax.Array  # [] int32

    @property
    def capacity(self) -> int:
        # shape[-2] rather than shape[0] so that it also reads right on a buffer batched over seeds.
        return self.filled.shape[-2]

    @property
    def num_slots(self) -> int:
        """``T + 1``, the number of step slots per episode row."""
        return self.filled.shape[-1]


def _zeros_like_leaf(leaf, lead: tuple) -> jax.Array:
    # Works for arrays, jax.ShapeDtypeStruct and Python scalars alike.
    if not hasattr(leaf, "dtype"):
        leaf = jnp.asarray(leaf)
    # canonicalize: a float64 numpy example becomes float32 unless x64 is enabled, without a warning.
    return jnp.zeros(lead + tuple(leaf.shape), jax.dtypes.canonicalize_dtype(leaf.dtype))


def init(example_episode: Any, capacity: int, example_filled: Union[jax.Array, int, None] = None) -> EpisodeBuffer:
    """An empty buffer for ``capacity`` episodes shaped like ``example_episode``.

    Args:
      example_episode: pytree describing ONE episode: per-step leaves ``[T + 1, ...]``,
        per-episode leaves of any shape. Only shapes and dtypes are read (arrays or
        ``jax.ShapeDtypeStruct``).
      capacity: number of episode rows ``C`` (static Python int).
      example_filled: the ``[T + 1]`` filled mask of one episode, or the int ``T + 1``.
        When omitted, ``T + 1`` is the leading dimension of the first leaf (in pytree
        order) that has one; pass it explicitly when a per-episode leaf comes first.

    Returns:
      An :class:`EpisodeBuffer` of zeros, ``filled`` all False, ``size == 0``.
    """
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise ValueError(f"capacity must be a positive Python int, got {capacity!r}")
    if example_filled is None:
        leading = [jnp.shape(leaf)[0] for leaf in jax.tree.leaves(example_episode) if jnp.ndim(leaf) >= 1]
        if not leading:
            raise ValueError("cannot infer T + 1 from example_episode: pass example_filled")
        num_slots = int(leading[0])
    elif isinstance(example_filled, int):
        num_slots = example_filled
    else:
        num_slots = int(example_filled.shape[-1])
    data = jax.tree.map(lambda leaf: _zeros_like_leaf(leaf, (capacity,)), example_episode)
    return EpisodeBuffer(
        data=data,
        filled=jnp.zeros((capacity, num_slots), bool),
        insert_pos=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
    )


def add(buffer: EpisodeBuffer, episodes: Any, filled: jax.Array, valid: Optional[jax.Array] = None) -> EpisodeBuffer:
    """Insert a batch of episodes at the ring position, wrapping around.

    Args:
      buffer: the buffer.
      episodes: pytree with the structure of the buffer's ``data``, leaves ``[B, ...]``.
      filled: ``[B, T + 1]`` bool mask of valid steps.
      valid: optional ``[B]`` bool; only rows where it is True are stored, packed in
        batch order (the ring advances by ``valid.sum()``). Lets a rollout with a
        dynamic number of finished episodes keep fixed shapes.

    Any ``B`` is allowed. When more than ``C`` episodes arrive at once only the last
    ``C`` of them are kept, in the slots a sequence of one-episode insertions would
    have put them in. Jittable (``B`` static, contents dynamic).
    """
    capacity = buffer.capacity
    batch = filled.shape[0]
    valid = jnp.ones((batch,), bool) if valid is None else valid.astype(bool)
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1  # position of each stored row among the stored ones
    count = jnp.sum(valid.astype(jnp.int32))
    keep = valid & (rank >= count - capacity)
    # Index `capacity` is out of bounds: rows not kept are dropped by the scatter.
    idx = jnp.where(keep, (buffer.insert_pos + rank) % capacity, capacity)

    def put(store, new):
        return store.at[idx].set(new.astype(store.dtype), mode="drop")

    return buffer.replace(
        data=jax.tree.map(put, buffer.data, episodes),
        filled=put(buffer.filled, filled),
        insert_pos=((buffer.insert_pos + count) % capacity).astype(jnp.int32),
        size=jnp.minimum(buffer.size + count, capacity).astype(jnp.int32),
    )


def can_sample(buffer: EpisodeBuffer, batch_size: int) -> jax.Array:
    """``[]`` bool: at least ``batch_size`` episodes are stored (pymarl's rule)."""
    return buffer.size >= batch_size


def sample_indices(buffer: EpisodeBuffer, key: jax.Array, batch_size: int) -> jax.Array:
    """``[batch_size]`` int32 row indices drawn uniformly, with replacement, from ``[0, size)``.

    With an empty buffer every index is 0.
    """
    return jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1), dtype=jnp.int32)


def gather(buffer: EpisodeBuffer, idx: jax.Array) -> tuple[Any, jax.Array]:
    """Rows ``idx`` ``[N]`` of the buffer: (episodes pytree ``[N, ...]``, filled ``[N, T + 1]``)."""
    return jax.tree.map(lambda x: x[idx], buffer.data), buffer.filled[idx]


def sample(buffer: EpisodeBuffer, key: jax.Array, batch_size: int) -> tuple[Any, jax.Array]:
    """Sample ``batch_size`` stored episodes uniformly with replacement.

    Returns ``(episodes, filled)``: per-step leaves ``[batch_size, T + 1, ...]``,
    per-episode leaves ``[batch_size, ...]``, ``filled`` ``[batch_size, T + 1]``.

    ``batch_size`` must be static under jit. Sampling never fails: on an empty
    buffer it returns copies of row 0 (zeros, ``filled`` all False, so a masked loss
    is zero). Callers gate learning on :func:`can_sample` (e.g. with ``lax.cond`` or
    by multiplying the update by it).
    """
    return gather(buffer, sample_indices(buffer, key, batch_size))


def mask_after_done(dones: jax.Array) -> jax.Array:
    """Filled mask ``[B, T + 1]`` of synchronously collected episodes.

    Convention: ``dones[b, t]`` is the episode-end flag returned by the ``t``-th
    transition (``s_t -> s_{t+1}``). Step ``t`` is valid iff the episode had not ended
    before ``t``, i.e. ``not any(dones[b, :t])``. So step 0 is always valid, the
    terminal transition itself is valid, and every step after it (including the slot
    holding the post-terminal observation) is not. The last slot ``T`` is valid only
    when the episode did not end within the ``T`` transitions. A transition mask for
    the TD loss is ``filled[:, :-1]``; its bootstrap uses slot ``t + 1`` whatever its
    flag (masked by ``1 - terminated`` when the episode really terminated).
    """
    dones = dones.astype(bool)
    ended_before = jnp.cumsum(dones.astype(jnp.int32), axis=-1) > 0  # [B, T]: ended at or before t
    first = jnp.zeros(dones.shape[:-1] + (1,), bool)
    return ~jnp.concatenate([first, ended_before], axis=-1)


class EpisodeAccumulator(struct.PyTreeNode):
    """Per-env episodes under construction in ``B`` vectorized environments.

    data: pytree, per-step leaves ``[B, T + 1, ...]``; filled ``[B, T + 1]`` bool;
    t: ``[B]`` int32, the slot the next :func:`write` goes to in each env.
    """

    data: Any
    filled: jax.Array
    t: jax.Array


def accumulator_init(example_step: Any, num_envs: int, num_slots: int) -> EpisodeAccumulator:
    """Empty accumulator; ``example_step`` is one env's step (leaves ``[...]``), ``num_slots = T + 1``."""
    data = jax.tree.map(lambda leaf: _zeros_like_leaf(leaf, (num_envs, num_slots)), example_step)
    return EpisodeAccumulator(
        data=data, filled=jnp.zeros((num_envs, num_slots), bool), t=jnp.zeros((num_envs,), jnp.int32)
    )


def write(acc: EpisodeAccumulator, step_data: Any, t: Optional[jax.Array] = None) -> EpisodeAccumulator:
    """Write ``step_data`` (leaves ``[B, ...]``) at slot ``t[b]`` of env ``b`` and mark it filled.

    ``t`` defaults to ``acc.t``; the accumulator's counter becomes ``t + 1`` (it stops
    at the last slot, where further writes overwrite it).
    """
    t = acc.t if t is None else t
    num_envs, num_slots = acc.filled.shape
    t = jnp.clip(t, 0, num_slots - 1)
    rows = jnp.arange(num_envs)
    data = jax.tree.map(lambda store, new: store.at[rows, t].set(new.astype(store.dtype)), acc.data, step_data)
    return acc.replace(
        data=data,
        filled=acc.filled.at[rows, t].set(True),
        t=jnp.minimum(t + 1, num_slots - 1).astype(jnp.int32),
    )


def reset_envs(acc: EpisodeAccumulator, mask: jax.Array) -> EpisodeAccumulator:
    """Clear the rows of envs where ``mask`` ``[B]`` is True (their episode ended) and rewind them to t = 0.

    Hand the finished rows to the buffer first: ``add(buffer, acc.data, acc.filled, valid=mask)``.
    """
    mask = mask.astype(bool)

    def clear(x):
        return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x)

    return acc.replace(
        data=jax.tree.map(clear, acc.data),
        filled=clear(acc.filled),
        t=jnp.where(mask, 0, acc.t).astype(jnp.int32),
    )


# ------------------------------------------------------------------ transition replay


class Replay(struct.PyTreeNode):
    """Ring buffer of single transitions (any pytree): ``data`` leaves ``[C, ...]``."""

    data: Any
    pos: jax.Array  # [] int32, the slot the next transition goes to
    size: jax.Array  # [] int32


def replay_init(example: Any, capacity: int) -> Replay:
    """An empty buffer of ``capacity`` transitions shaped like ``example``."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + x.shape, x.dtype), example)
    return Replay(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def replay_add(buf: Replay, batch: Any) -> Replay:
    """Insert ``[N, ...]`` transitions in order; with N > C only the last C stay."""
    capacity = jax.tree.leaves(buf.data)[0].shape[0]
    n = jax.tree.leaves(batch)[0].shape[0]
    rank = jnp.arange(n)
    idx = jnp.where(rank >= n - capacity, (buf.pos + rank) % capacity, capacity)  # capacity: dropped
    data = jax.tree.map(lambda s, x: s.at[idx].set(x.astype(s.dtype), mode="drop"), buf.data, batch)
    return Replay(
        data, ((buf.pos + n) % capacity).astype(jnp.int32), jnp.minimum(buf.size + n, capacity).astype(jnp.int32)
    )


def replay_sample(buf: Replay, key, batch_size: int) -> Any:
    """``batch_size`` transitions drawn uniformly with replacement from the stored ones."""
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buf.size, 1))
    return jax.tree.map(lambda x: x[idx], buf.data)
