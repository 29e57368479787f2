"""Returns and advantages along a time axis, as pure jittable functions.

- :func:`gae`: generalized advantage estimation (Schulman et al. 2016). A truncated
  episode can bootstrap from its true last observation.
- :func:`lambda_returns`: TD(lambda) targets over stored episodes [B, T], as used by
  the value-factorization learners (Q-learning, EMU, TRAMA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(reward, value, done, terminated, final_value, last_value, gamma, gae_lambda, bootstrap_truncation: bool = True):
    """Generalized advantage estimation along the leading time axis.

    reward, value, final_value: [T, ...]; done, terminated: [T, ...] broadcastable to
    them; last_value: [...] (the value after the last step). ``final_value`` is the
    value of the episode's true last observation, used where ``done`` when
    ``bootstrap_truncation`` (a terminated step is never bootstrapped); otherwise
    every episode end is treated as a termination. Returns (advantages, targets).
    """
    next_values = jnp.concatenate([value[1:], last_value[None]], 0)
    done = done.astype(jnp.float32)
    term = terminated.astype(jnp.float32)
    if bootstrap_truncation:
        next_values = jnp.where(done > 0, final_value, next_values)
    else:
        term = done
    deltas = reward + gamma * (1 - term) * next_values - value

    def back(adv, xs):
        delta, d = xs
        adv = delta + gamma * gae_lambda * (1 - d) * adv
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros_like(last_value), (deltas, done), reverse=True)
    return adv, adv + value


def lambda_returns(reward, terminated, next_value, valid_next, gamma, lam):
    """TD(lambda) targets [B, T] (see the module docstring).

    reward, terminated, next_value (Qbar_{t+1}): [B, T, ...]; valid_next [B, T]: the
    transition t + 1 exists (the recursion only continues through valid steps).
    """

    def expand(x):
        return x.reshape(x.shape + (1,) * (next_value.ndim - x.ndim))

    reward, terminated, valid_next = expand(reward), expand(terminated).astype(jnp.float32), expand(valid_next)

    def back(nxt, xs):
        r, term, v, ok = xs
        cont = jnp.where(ok, nxt, v)
        y = r + gamma * (1.0 - term) * ((1.0 - lam) * v + lam * cont)
        return y, y

    swap = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
    xs = tuple(swap(x) for x in (reward, terminated, next_value, valid_next))
    _, ys = jax.lax.scan(back, xs[2][-1], xs, reverse=True)
    return swap(ys)
