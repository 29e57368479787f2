"""Networks shared by the algorithms: MLP torsos, a GRU step with episode resets,
and actor/critic heads.

Initialization never calls LAPACK. jax/jaxlib 0.10.x deadlocks on this kind of
2-core CPU when a QR decomposition is batched (``jax.vmap`` over seeds of flax's
``orthogonal`` initializer never returns). :func:`orthogonal` below draws the same
distribution (Haar-orthogonal, scaled) with a Gram-Schmidt loop written in plain
``jnp`` ops, so ``jax.vmap(init)`` over seeds is safe. From 256 columns the loop runs block by
block (:func:`_gram_schmidt`): the same Q, 1.5 s -> 0.15 s for a 1536 x 512 GRU kernel on 2 CPU
cores, which made initializing a width-512 GRU take seconds. ``tests/test_init_vmap.py``
runs vmapped init and updates of every algorithm under a hard timeout so an
upgrade cannot bring the hang back silently.

Recurrent networks process one time step per call (``h, x, reset -> h, out``);
sequences are a ``lax.scan`` over that step in the algorithm, so the same module
serves acting and training. ``reset`` zeroes the hidden state *before* the step,
at the first step of each episode.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _column_gram_schmidt(a: jax.Array) -> jax.Array:
    """Orthonormalize the columns of ``a`` [m, n] (m >= n) one by one, twice for stability."""
    m, n = a.shape

    def body(j, q):
        v = q[:, j]
        mask = (jnp.arange(n) < j).astype(q.dtype)
        for _ in range(2):
            v = v - q @ (mask * (q.T @ v))
        v = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
        return q.at[:, j].set(v)

    return jax.lax.fori_loop(0, n, body, a)


GS_BLOCK = 64  # columns per block of :func:`_gram_schmidt` on wide matrices


def _gram_schmidt(a: jax.Array) -> jax.Array:
    """Orthonormalize the columns of ``a`` [m, n] (m >= n): the Q of its QR decomposition
    with a positive diagonal R. From 256 columns (a multiple of ``GS_BLOCK``) block by block:
    each block is projected off the finished ones with matrix products, twice, then
    orthonormalized column by column; the same Q, with the column loop over a block instead
    of the whole matrix (a 1536 x 512 GRU kernel: 1.5 s column by column on 2 CPU cores)."""
    m, n = a.shape
    if n < 4 * GS_BLOCK or n % GS_BLOCK:
        return _column_gram_schmidt(a)

    def body(k, q):
        start = k * GS_BLOCK
        v = jax.lax.dynamic_slice_in_dim(q, start, GS_BLOCK, axis=1)
        done = (jnp.arange(n) < start).astype(q.dtype)[:, None]
        for _ in range(2):
            v = v - q @ (done * (q.T @ v))
        return jax.lax.dynamic_update_slice_in_dim(q, _column_gram_schmidt(v), start, axis=1)

    return jax.lax.fori_loop(0, n // GS_BLOCK, body, a)


def orthogonal(scale: float = 1.0, column_axis: int = -1):
    """Orthogonal initializer without QR (see the module docstring)."""

    def init(key, shape, dtype=jnp.float32):
        if len(shape) < 2:
            raise ValueError(f"orthogonal init needs >= 2 dims, got shape {shape}")
        col = column_axis % len(shape)
        n_cols = shape[col]
        rest = tuple(s for i, s in enumerate(shape) if i != col)
        n_rows = 1
        for s in rest:
            n_rows *= s
        m, n = max(n_rows, n_cols), min(n_rows, n_cols)
        q = _gram_schmidt(jax.random.normal(key, (m, n), jnp.float32))  # orthonormal columns
        if n_rows < n_cols:
            q = q.T
        q = jnp.moveaxis(q.reshape(rest + (n_cols,)), -1, col)
        return (scale * q).astype(dtype)

    return init


def dense(features: int, scale: float = 2**0.5, name=None) -> nn.Dense:
    return nn.Dense(features, kernel_init=orthogonal(scale), bias_init=nn.initializers.zeros, name=name)


def relu_stack(x, hidden: Sequence[int], layer: Callable[[int], nn.Module] = dense):
    """``layer(width)`` -> ReLU for each width in ``hidden``, applied to ``x``; call it
    inside a compact module (the layers are that module's submodules)."""
    for h in hidden:
        x = nn.relu(layer(h)(x))
    return x


class MLP(nn.Module):
    """ReLU torso: Dense -> ReLU repeated for each width in ``hidden``."""

    hidden: Sequence[int]

    @nn.compact
    def __call__(self, x):
        return relu_stack(x, self.hidden)


class GRUStep(nn.Module):
    """One GRU step with a per-sequence reset; ``h`` and ``x`` share leading dims."""

    hidden: int

    @nn.compact
    def __call__(self, h, x, reset):
        h = jnp.where(reset[..., None], jnp.zeros_like(h), h)
        cell = nn.GRUCell(
            self.hidden,
            kernel_init=orthogonal(1.0),
            recurrent_kernel_init=orthogonal(1.0),
        )
        h, y = cell(h, x)
        return h, y


class Torso(nn.Module):
    """Dense -> ReLU -> (GRU step | Dense -> ReLU): the body of actors and critics.

    Returns ``(h, features)``; for the feed-forward variant ``h`` passes through.
    """

    hidden: int
    recurrent: bool

    @nn.compact
    def __call__(self, h, x, reset):
        x = nn.relu(dense(self.hidden)(x))
        if self.recurrent:
            return GRUStep(self.hidden)(h, x, reset)
        return h, nn.relu(dense(self.hidden)(x))


class ActorCritic(nn.Module):
    """Discrete actor (masked logits) and value head on one torso per role.

    ``shared_torso``: actor and critic read the same torso (IPPO, as in JaxMARL's
    baseline); otherwise the critic has its own torso over ``critic_x`` (MAPPO's
    centralized critic on the global state). Hidden state is ``[..., 2, hidden]``
    (actor, critic) in both cases for a uniform carry.
    """

    num_actions: int
    hidden: int = 128
    recurrent: bool = True
    shared_torso: bool = False

    def setup(self):
        self.actor_torso = Torso(self.hidden, self.recurrent)
        self.actor_head = dense(self.hidden)
        self.policy = dense(self.num_actions, 0.01)
        if not self.shared_torso:
            self.critic_torso = Torso(self.hidden, self.recurrent)
        self.critic_head = dense(self.hidden)
        self.value_out = dense(1, 1.0)

    def __call__(self, h, x, critic_x, reset, avail):
        h_a, feat_a = self.actor_torso(h[..., 0, :], x, reset)
        logits = self.policy(nn.relu(self.actor_head(feat_a)))
        logits = jnp.where(avail, logits, -1e10)
        if self.shared_torso:
            h_c, feat_c = h[..., 1, :], feat_a
        else:
            h_c, feat_c = self.critic_torso(h[..., 1, :], critic_x, reset)
        value = self.value_out(nn.relu(self.critic_head(feat_c)))[..., 0]
        return jnp.stack([h_a, h_c], axis=-2), logits, value

    def value(self, h, x, critic_x, reset):
        """The critic alone (used to bootstrap truncated episodes): skips the policy head,
        and the actor's torso when the critic has its own."""
        if self.shared_torso:
            _, feat = self.actor_torso(h[..., 0, :], x, reset)
        else:
            _, feat = self.critic_torso(h[..., 1, :], critic_x, reset)
        return self.value_out(nn.relu(self.critic_head(feat)))[..., 0]
