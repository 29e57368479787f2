"""Optimizers whose learning rate is a traced hyperparameter.

The learning rate of every learner is an array in its ``TrainState.hparams`` (sweeps vmap
it, and PPO anneals it per update), so it cannot be a Python float baked into the
optimizer. :func:`descent` builds ``optax.chain(*transforms, scale(-learning_rate))``
under ``optax.inject_hyperparams``, which keeps the rate in the optimizer state;
:func:`with_learning_rate` sets it there before each update and
``optax.apply_updates`` applies the step.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def descent(*transforms: optax.GradientTransformation) -> optax.GradientTransformation:
    """``transforms`` followed by a step of ``-learning_rate`` (an injected hyperparameter,
    initially 0: set it with :func:`with_learning_rate`)."""

    def chain(learning_rate):
        return optax.chain(*transforms, optax.scale(-learning_rate))

    return optax.inject_hyperparams(chain)(learning_rate=0.0)


def with_learning_rate(opt_state, lr):
    """``opt_state`` of :func:`descent` with the learning rate ``lr`` (a scalar, or per
    leading row when the state was built under ``vmap``: broadcast to the stored shape)."""
    stored = opt_state.hyperparams["learning_rate"]
    rate = jnp.broadcast_to(jnp.asarray(lr, stored.dtype), stored.shape)
    return opt_state._replace(hyperparams=dict(opt_state.hyperparams, learning_rate=rate))
