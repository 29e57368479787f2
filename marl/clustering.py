"""Clustering and its scores, jittable with static sizes: k-means++ seeding, Lloyd's
k-means, the adjusted Rand index and the majority-label rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kmeans_pp_init(key, x, mask, k: int):
    """k-means++ seeding over the rows of x [N, D] where mask [N]."""
    keys = jax.random.split(key, k)
    logits = jnp.where(mask, 0.0, -jnp.inf)
    first = jax.random.categorical(keys[0], logits)
    cents = jnp.zeros((k, x.shape[-1]), x.dtype).at[0].set(x[first])
    d2 = ((x - x[first]) ** 2).sum(-1)
    for i in range(1, k):
        p = jnp.where(mask, d2, 0.0)
        lg = jnp.where(p > 0, jnp.log(jnp.maximum(p, 1e-30)), -jnp.inf)
        lg = jnp.where(jnp.any(p > 0), lg, logits)  # every point coincides: pick any
        j = jax.random.categorical(keys[i], lg)
        cents = cents.at[i].set(x[j])
        d2 = jnp.minimum(d2, ((x - x[j]) ** 2).sum(-1))
    return cents


def kmeans(x, mask, init, iterations: int):
    """Lloyd's algorithm from ``init`` [K, D] over rows x [N, D] where mask [N].

    Returns (centroids [K, D], assignment [N], counts [K]). An empty cluster keeps its
    previous centroid.
    """
    k = init.shape[0]
    m = mask.astype(x.dtype)

    def assign(c):
        d = (x**2).sum(-1, keepdims=True) - 2.0 * x @ c.T + (c**2).sum(-1)
        a = jnp.argmin(d, -1)
        oh = jax.nn.one_hot(a, k, dtype=x.dtype) * m[:, None]
        return a, oh

    def body(c, _):
        _, oh = assign(c)
        cnt = oh.sum(0)
        new = (oh.T @ x) / jnp.maximum(cnt, 1.0)[:, None]
        return jnp.where(cnt[:, None] > 0, new, c), None

    c, _ = jax.lax.scan(body, init, None, length=iterations)
    a, oh = assign(c)
    return c, a.astype(jnp.int32), oh.sum(0)


def adjusted_rand_index(labels_a, labels_b, mask, num_a: int, num_b: int):
    """Adjusted Rand index (Hubert and Arabie 1985) of two labelings of the items where
    ``mask``: labels_a [N] in [0, num_a), labels_b [N] in [0, num_b) (static sizes).

    With the contingency table n_ij, its row sums a_i, column sums b_j and n masked
    items: index = sum C(n_ij, 2), expected = sum C(a_i, 2) sum C(b_j, 2) / C(n, 2),
    max = (sum C(a_i, 2) + sum C(b_j, 2)) / 2, ARI = (index - expected) / (max - expected).
    When max == expected (fewer than 2 items, both labelings a single cluster, or both
    all singletons) the index is undefined; this returns 0 there (never NaN). Labels
    outside their range count in no cell. Jittable; float32 [].
    """
    w = mask.astype(jnp.float32)
    oh_a = jax.nn.one_hot(labels_a, num_a, dtype=jnp.float32) * w[:, None]
    oh_b = jax.nn.one_hot(labels_b, num_b, dtype=jnp.float32)
    table = oh_a.T @ oh_b  # [num_a, num_b]

    def pairs(x):
        return (x * (x - 1.0) / 2.0).sum()

    index = pairs(table)
    sum_a, sum_b = pairs(table.sum(1)), pairs(table.sum(0))
    total = pairs(table.sum())
    # sum_b / total is exactly 1 or 0 in the degenerate cases, so max - expected is exactly 0
    expected = sum_a * (sum_b / jnp.maximum(total, 1.0))
    denom = 0.5 * (sum_a + sum_b) - expected
    return jnp.where(denom > 0, (index - expected) / jnp.where(denom > 0, denom, 1.0), 0.0)


def majority_rate(labels, weight, num: int):
    """Share of the total weight [B] (e.g. valid steps per episode) carried by the most
    common of labels [B] in [0, num): the accuracy of always guessing that label."""
    w = weight.astype(jnp.float32)
    per = (jax.nn.one_hot(labels, num) * w[:, None]).sum(0)
    return per.max() / jnp.maximum(w.sum(), 1.0)
