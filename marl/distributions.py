"""Closed-form distribution math used by the curricula: the Gamma distribution's
log-density and the KL divergence between two Gammas (shape k, rate b)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln


def gamma_kl(k1, rate1, k2, rate2):
    """KL(Gamma(k1, rate1) || Gamma(k2, rate2)) (shape, rate), closed form; broadcasts."""
    return (
        (k1 - k2) * digamma(k1)
        - gammaln(k1)
        + gammaln(k2)
        + k2 * (jnp.log(rate1) - jnp.log(rate2))
        + k1 * (rate2 - rate1) / rate1
    )


def gamma_log_prob(alpha, k, rate):
    """log density of Gamma(k, rate) at alpha > 0; broadcasts."""
    return k * jnp.log(rate) + (k - 1) * jnp.log(alpha) - rate * alpha - gammaln(k)
