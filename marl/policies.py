"""Action distributions of a policy network's output, one interface for discrete and
continuous actions, so a learner has one code path for both.

- :class:`Categorical`: the network outputs logits ``[..., n]``; unavailable actions
  already carry logits of ``-1e10`` (never sampled).
- :class:`Gaussian`: the network outputs ``[..., 2d] = [mean, log_std]`` of a diagonal
  Gaussian; the sample is kept unclipped (scored as a proper density) and clipped to the
  environment's box only when sent to it (:meth:`Gaussian.to_env`).

Both are static descriptions (no arrays that change during training): build one from
the env spec with :func:`for_spec`. The formulas are those of ``marl.losses`` (our own
rather than distrax's ``Categorical``, whose log-probability is a one-hot product, so
that the numbers stay those the learners have always produced).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from marl.losses import gaussian_entropy, gaussian_log_prob, split_gaussian


@dataclasses.dataclass(frozen=True)
class Categorical:
    """A softmax policy over ``num_actions`` actions."""

    num_actions: int

    @property
    def discrete(self) -> bool:
        return True

    @property
    def mask_width(self) -> int:
        """Width of the availability mask the learner stores per agent."""
        return self.num_actions

    def sample(self, key, out):
        """(actions [...], their log-probabilities [...])."""
        a = jax.random.categorical(key, out)
        return a, jnp.take_along_axis(jax.nn.log_softmax(out), a[..., None], -1)[..., 0]

    def log_prob_and_entropy(self, out, action, avail):
        """(log pi(action) [...], entropy over the available actions [...]) from one
        log-softmax (one backward pass through it)."""
        logp_all = jax.nn.log_softmax(out)
        logp = jnp.take_along_axis(logp_all, action[..., None], -1)[..., 0]
        entropy = -(jnp.exp(logp_all) * jnp.where(avail, logp_all, 0.0)).sum(-1)
        return logp, entropy

    def mode(self, out):
        return jnp.argmax(out, -1)

    def to_env(self, action):
        return action

    def reg_view(self, out):
        """The policy as :class:`marl.regularizers.Regularizer` reads it: the logits."""
        return out

    def no_reference(self, avail):
        """Zero logits, the placeholder reference of a regularizer that reads none."""
        return jnp.zeros(avail.shape, jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Gaussian:
    """A diagonal Gaussian over ``action_dim`` dimensions, clipped to ``[low, high]``
    by the environment."""

    action_dim: int
    low: Any
    high: Any

    @property
    def discrete(self) -> bool:
        return False

    @property
    def mask_width(self) -> int:
        return 1

    def sample(self, key, out):
        """(the unclipped sample [..., d], its log-density [...])."""
        mean, log_std = split_gaussian(out)
        a = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
        return a, gaussian_log_prob(mean, log_std, a)

    def log_prob_and_entropy(self, out, action, avail=None):
        mean, log_std = split_gaussian(out)
        return gaussian_log_prob(mean, log_std, action), gaussian_entropy(log_std)

    def mode(self, out):
        return split_gaussian(out)[0]

    def to_env(self, action):
        """The action the environment receives: the sample clipped to its box."""
        return jnp.clip(action, self.low, self.high)

    def reg_view(self, out):
        """(mean, log_std), as :class:`marl.regularizers.Regularizer` reads a Gaussian."""
        return split_gaussian(out)

    def no_reference(self, avail):
        return jnp.zeros(avail.shape[:-1] + (2 * self.action_dim,), jnp.float32)


def for_spec(spec) -> Categorical | Gaussian:
    """The distribution family of an env spec's action space."""
    if spec.discrete:
        return Categorical(spec.num_actions)
    return Gaussian(spec.action_dim, spec.action_low, spec.action_high)
