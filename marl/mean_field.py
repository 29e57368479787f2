"""Mean-field representations of a set of particles on the unit torus ``[0, 1)^d``.

The empirical distribution of N particles ``mu_N = (1/N) sum_i delta_{x_i}`` is
represented by a fixed-size vector that does not depend on N and is invariant to
permutations of the particles:

* **kernel embedding** at M fixed centres ``c_b``::

      mu_tilde_b = sum_i w_i k(x_i, c_b),   k(x, c) = exp(-|x - c|_T^2 / (2 sigma^2)),

  with ``w_i = 1/N`` by default and ``|.|_T`` the torus (minimum-image) distance:
  each coordinate of ``x - c`` is wrapped into ``[-1/2, 1/2)``. ``k(c, c) = 1``, so a
  single particle sitting on a centre gives 1 there. The embedding is not normalized
  to sum to 1 (it is the kernel mean embedding of Dec-POMFC). The wrapped RBF is not
  exactly positive definite on the torus; for ``sigma`` well below 1/2 the
  difference is negligible.
* **histogram**: fraction of particles in each of the ``bins^d`` cells of side
  ``1/bins`` (the nearest grid centre), so it sums to 1 (to ``sum_i w_i``).

Grid centres are ``(k + 1/2) / bins`` per dimension; a flattened index runs in
C order (the last dimension fastest), the same for both representations.

Shapes: ``points [N, d]``, ``centres [M, d]``, ``weights [N]``; the embeddings are
``[M]``. :func:`kernel_embedding` with arbitrary centres materializes ``[N, M]``
(fine for N = 10,000 and M in the hundreds); :func:`grid_embedding` uses that the
wrapped RBF factorizes over dimensions on a product grid and needs only
``[N, bins]`` per dimension, so M = bins^d can be large.

:func:`kernel_weights` / :func:`interpolate` give the kernel-weighted interpolation
of per-centre parameters at a particle's own point (a decision rule that each
particle evaluates on its own observation).
"""

from __future__ import annotations

import itertools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def wrap01(x: jax.Array) -> jax.Array:
    """Points mapped into ``[0, 1)`` (``mod 1`` can round up to exactly 1 in float32)."""
    y = x - jnp.floor(x)
    return jnp.where(y >= 1.0, 0.0, y)


def torus_delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """Minimum-image displacement ``b - a`` on the unit torus, each coordinate in ``[-1/2, 1/2)``."""
    d = b - a
    return d - jnp.floor(d + 0.5)


def torus_sq_dist(a: jax.Array, b: jax.Array) -> jax.Array:
    """Squared torus distance (sums the last axis)."""
    return jnp.sum(torus_delta(a, b) ** 2, axis=-1)


def grid_centres(bins: int, dim: int) -> np.ndarray:
    """``[bins^dim, dim]`` centres of the cells of a regular grid, C order."""
    if bins < 1 or dim < 1:
        raise ValueError(f"bins and dim must be >= 1 (got bins={bins}, dim={dim})")
    axis = (np.arange(bins) + 0.5) / bins
    return np.array(list(itertools.product(axis, repeat=dim)), np.float32).reshape(-1, dim)


def _weights(points: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
    n = points.shape[0]
    if weights is None:
        return jnp.full((n,), 1.0 / n, points.dtype)
    return weights


def kernel_embedding(
    points: jax.Array, centres: jax.Array, bandwidth: float, weights: Optional[jax.Array] = None
) -> jax.Array:
    """``[M]`` kernel mean embedding ``sum_i w_i k(x_i, c_b)`` at arbitrary centres.

    points [N, d], centres [M, d]; builds an ``[N, M]`` array.
    """
    w = _weights(points, weights)
    d2 = torus_sq_dist(points[:, None, :], jnp.asarray(centres)[None, :, :])  # [N, M]
    return w @ jnp.exp(-d2 / (2.0 * bandwidth**2))


def grid_embedding(points: jax.Array, bins: int, bandwidth: float, weights: Optional[jax.Array] = None) -> jax.Array:
    """``[bins^d]`` kernel embedding at :func:`grid_centres` ``(bins, d)``.

    Equal to ``kernel_embedding(points, grid_centres(bins, d), bandwidth)`` but uses
    ``k(x, c) = prod_k k_1(x_k, c_k)``: memory ``N * bins`` per dimension plus the result.
    """
    w = _weights(points, weights)
    axis = (jnp.arange(bins, dtype=points.dtype) + 0.5) / bins
    # per-dimension factors [N, bins]
    factors = [
        jnp.exp(-(torus_delta(points[:, k : k + 1], axis[None, :]) ** 2) / (2.0 * bandwidth**2))
        for k in range(points.shape[1])
    ]
    out = w[:, None] * factors[0]  # [N, bins]
    for f in factors[1:]:
        if f is factors[-1]:
            # contract the particle axis with the last factor: [N, B^k] x [N, B] -> [B^k, B]
            return jnp.einsum("nm,nb->mb", out, f).reshape(-1)
        out = (out[:, :, None] * f[:, None, :]).reshape(out.shape[0], -1)
    return out.sum(axis=0)


def histogram(points: jax.Array, bins: int, weights: Optional[jax.Array] = None) -> jax.Array:
    """``[bins^d]`` fraction of particles per grid cell (sums to ``sum_i w_i``, 1 by default)."""
    w = _weights(points, weights)
    cell = jnp.clip(jnp.floor(wrap01(points) * bins).astype(jnp.int32), 0, bins - 1)  # [N, d]
    flat = jnp.zeros(cell.shape[0], jnp.int32)
    for k in range(cell.shape[1]):
        flat = flat * bins + cell[:, k]
    return jax.ops.segment_sum(w, flat, num_segments=bins ** cell.shape[1])


def kernel_weights(points: jax.Array, centres: jax.Array, bandwidth: float) -> jax.Array:
    """``[N, M]`` normalized kernel weights ``k(x_i, c_b) / sum_b' k(x_i, c_b')`` (rows sum to 1)."""
    d2 = torus_sq_dist(points[:, None, :], jnp.asarray(centres)[None, :, :])
    return jax.nn.softmax(-d2 / (2.0 * bandwidth**2), axis=-1)


def interpolate(points: jax.Array, centres: jax.Array, values: jax.Array, bandwidth: float) -> jax.Array:
    """``[N, P]`` kernel-weighted interpolation of per-centre values ``[M, P]`` at each point."""
    return kernel_weights(points, centres, bandwidth) @ values
