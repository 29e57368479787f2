"""Loss pieces shared by the learners, as pure jittable functions.

- PPO: the clipped surrogate and the clipped value loss (Schulman et al. 2017).
- Diagonal Gaussian policies: splitting head outputs, log-densities, entropies.
- Q-learning: masked greedy actions and maxima over available actions, and the
  double-Q bootstrap (van Hasselt et al. 2016).
"""

from __future__ import annotations

import distrax
import jax.numpy as jnp


def clipped_policy_loss(logp, old_logp, adv, clip_eps):
    """PPO's clipped surrogate with advantages normalized over the batch.

    Returns (loss, ratio, approx_kl, clip_frac)."""
    ratio = jnp.exp(logp - old_logp)
    adv_n = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg = -jnp.minimum(ratio * adv_n, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv_n).mean()
    approx_kl = ((ratio - 1) - (logp - old_logp)).mean()
    clip_frac = (jnp.abs(ratio - 1) > clip_eps).mean()
    return pg, ratio, approx_kl, clip_frac


def clipped_value_loss(value, old_value, targets, clip_eps):
    """``E[max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)] / 2``."""
    v_clip = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
    return 0.5 * jnp.maximum((value - targets) ** 2, (v_clip - targets) ** 2).mean()


def split_gaussian(pol):
    """``[..., 2d]`` policy outputs -> (mean [..., d], log_std [..., d])."""
    d = pol.shape[-1] // 2
    return pol[..., :d], pol[..., d:]


def gaussian_log_prob(mean, log_std, x):
    """``[...]`` log-density of a diagonal Gaussian at ``x`` [..., d] (summed over d)."""
    return distrax.MultivariateNormalDiag(mean, jnp.exp(log_std)).log_prob(x)


def gaussian_entropy(log_std):
    """``[...]`` entropy of a diagonal Gaussian (depends only on the log-std)."""
    return jnp.sum(log_std + 0.5 * (1.0 + jnp.log(2.0 * jnp.pi)), -1)


NEG = -1e10  # Q value given to unavailable actions before a max / argmax


def masked_argmax(q, avail):
    return jnp.argmax(jnp.where(avail, q, NEG), -1)


def masked_max(q, avail):
    return jnp.max(jnp.where(avail, q, NEG), -1)


def take(q, a):
    """q[..., a] for integer actions a [...]."""
    return jnp.take_along_axis(q, a[..., None], -1)[..., 0]


def next_actions(q_next, tq_next, avail_next, double_q=True):
    """Bootstrap actions and their target values at t + 1.

    q_next / tq_next: online / target Q-values [..., A, n]; avail_next [..., A, n].
    Returns (a* [..., A], Qbar_i(a*) [..., A], max_a Qbar_i [..., A]): with double Q
    a* is the online network's greedy available action, otherwise the target's.
    """
    a_star = masked_argmax(q_next if double_q else tq_next, avail_next)
    return a_star, take(tq_next, a_star), masked_max(tq_next, avail_next)
