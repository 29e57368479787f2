"""Mean-field representations: permutation invariance, normalization, torus awareness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marl import mean_field as mf


@pytest.fixture(scope="module")
def points():
    return jax.random.uniform(jax.random.PRNGKey(0), (500, 2))


def test_histogram_sums_to_one_and_counts_cells(points):
    h = mf.histogram(points, 4)
    assert h.shape == (16,)
    np.testing.assert_allclose(float(h.sum()), 1.0, rtol=1e-6)
    p = np.asarray(points)
    cell = (np.floor(p[:, 0] * 4) * 4 + np.floor(p[:, 1] * 4)).astype(int)
    np.testing.assert_allclose(np.asarray(h), np.bincount(cell, minlength=16) / len(p), atol=1e-6)
    # a point on the upper edge (1.0 == 0.0 on the torus) lands in the first cell
    np.testing.assert_allclose(mf.histogram(jnp.array([[1.0, 0.3]]), 4)[1], 1.0)


def test_permutation_invariance(points):
    perm = jax.random.permutation(jax.random.PRNGKey(1), points.shape[0])
    centres = mf.grid_centres(5, 2)
    for fn in (
        lambda p: mf.histogram(p, 5),
        lambda p: mf.kernel_embedding(p, centres, 0.1),
        lambda p: mf.grid_embedding(p, 5, 0.1),
    ):
        np.testing.assert_allclose(fn(points), fn(points[perm]), rtol=1e-5, atol=1e-7)


def test_kernel_embedding_of_one_particle_on_a_centre_is_torus_aware():
    bins, bw = 4, 0.2
    centres = mf.grid_centres(bins, 2)  # (k + 0.5) / 4
    x = jnp.asarray(centres[:1])  # (0.125, 0.125)
    emb = mf.kernel_embedding(x, centres, bw).reshape(bins, bins)
    assert float(emb[0, 0]) == pytest.approx(1.0)
    # the neighbouring centre across the boundary (0.875 ~ -0.125) is as close as the one at 0.375
    one_cell = np.exp(-((1 / bins) ** 2) / (2 * bw**2))
    assert float(emb[3, 0]) == pytest.approx(one_cell, rel=1e-5)
    assert float(emb[1, 0]) == pytest.approx(one_cell, rel=1e-5)
    assert float(emb[2, 0]) == pytest.approx(np.exp(-((2 / bins) ** 2) / (2 * bw**2)), rel=1e-5)


def test_grid_embedding_equals_generic_embedding(points):
    for dim in (1, 2, 3):
        p = points[:, :1] if dim == 1 else points if dim == 2 else jnp.concatenate([points, points[:, :1] ** 2], 1)
        np.testing.assert_allclose(
            mf.grid_embedding(p, 4, 0.15), mf.kernel_embedding(p, mf.grid_centres(4, dim), 0.15), rtol=1e-5, atol=1e-6
        )


def test_weights_and_large_n():
    # weights select a sub-population; N = 10,000 runs through the factorized embedding
    p = jax.random.uniform(jax.random.PRNGKey(2), (10_000, 2))
    w = jnp.zeros(10_000).at[:10].set(0.1)
    np.testing.assert_allclose(mf.histogram(p, 8, w), mf.histogram(p[:10], 8), atol=1e-6)
    np.testing.assert_allclose(mf.grid_embedding(p, 8, 0.1, w), mf.grid_embedding(p[:10], 8, 0.1), atol=1e-6)
    # a uniform swarm's embedding is flat: every centre sees about 2 pi sigma^2 of mass
    emb = jax.jit(lambda q: mf.grid_embedding(q, 8, 0.1))(p)
    assert emb.shape == (64,)
    np.testing.assert_allclose(np.asarray(emb), 2 * np.pi * 0.01, rtol=0.15)


def test_interpolation_weights_are_a_partition_of_unity():
    centres = mf.grid_centres(3, 2)
    values = jnp.arange(9.0)[:, None]
    w = mf.kernel_weights(jnp.asarray(centres), centres, 0.05)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    # with a narrow kernel, evaluating at a centre returns (nearly) that centre's value
    np.testing.assert_allclose(mf.interpolate(jnp.asarray(centres), centres, values, 0.05), values, atol=1e-3)
