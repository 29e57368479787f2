"""A per-episode adversary temperature drawn from a Gamma distribution and appended to
the observations (QARL's quantal adversary, RARL's baseline and the best responses)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs.wrappers import Wrapper
from marl import config as cfg

LOG_ALPHA_MIN = float(np.log(1e-8))


@struct.dataclass
class TemperatureState:
    inner: Any
    log_alpha: jax.Array  # [] this episode's adversary temperature (log)
    drawn_shape: jax.Array  # [] the shape it was drawn from
    shape: jax.Array  # [] the shape the next episode's temperature is drawn from
    discounted: jax.Array  # [] the protagonist's discounted return so far in this episode
    discount: jax.Array  # [] gamma^t for the next reward


class TemperatureObs(Wrapper):
    """Draws a temperature per episode from Gamma(shape, rate) (or its mean, with
    ``deterministic``) and appends its log to the observation of every agent whose
    ``inputs`` entry is True (0 for the others: the feature carries nothing, so a
    network reading it is one without a temperature input, and players from runs
    with and without it can meet in one environment).

    Goes outside ``EpisodeStats(AutoReset(env))``. ``info`` gains ``episode_log_alpha``
    and ``episode_shape``: the temperature of the episode that ended at this step and
    the shape it was drawn from, and ``episode_discounted_return``: the protagonist's
    (agent 0's) return sum_t gamma^t r_t of that episode (read where ``done``).
    ``final_obs`` carries the ended episode's temperature. The shape for new episodes
    is ``state.shape`` (an algorithm may set it); the initial one is ``self.shape``.
    """

    def __init__(
        self,
        env,
        shape: float,
        rate: float,
        deterministic: bool = False,
        gamma: float = 0.99,
        inputs: Sequence[bool] = (True, True),
    ):
        super().__init__(env)
        self.shape, self.rate, self.deterministic = float(shape), float(rate), bool(deterministic)
        self.gamma = float(gamma)
        self.inputs = tuple(bool(i) for i in inputs)
        if len(self.inputs) != env.spec.num_agents:
            raise cfg.ConfigError("inputs", inputs, f"needs one entry per agent ({env.spec.num_agents})")
        self.spec = dataclasses.replace(env.spec, obs_dim=env.spec.obs_dim + 1)

    def with_temperature(
        self,
        shape: Optional[float] = None,
        deterministic: Optional[bool] = None,
        inputs: Optional[Sequence[bool]] = None,
    ):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        if shape is not None:
            new.shape = float(shape)
        if deterministic is not None:
            new.deterministic = bool(deterministic)
        if inputs is not None:
            new.inputs = tuple(bool(i) for i in inputs)
        return new

    def _draw(self, key, shape):
        if self.deterministic:
            alpha = shape / self.rate
        else:
            alpha = jax.random.gamma(key, shape) / self.rate
        return jnp.maximum(jnp.log(alpha), LOG_ALPHA_MIN).astype(jnp.float32)

    def _append(self, obs, log_alpha):
        feature = jnp.where(jnp.asarray(self.inputs)[:, None], log_alpha, 0.0)  # [A, 1]
        return jnp.concatenate([obs, jnp.broadcast_to(feature, obs.shape[:-1] + (1,)).astype(obs.dtype)], -1)

    def _ts(self, ts, log_alpha, ended_log_alpha, ended_shape, ended_discounted):
        info = dict(
            ts.info,
            episode_log_alpha=ended_log_alpha,
            episode_shape=ended_shape,
            episode_discounted_return=ended_discounted,
        )
        if "final_obs" in info:
            info["final_obs"] = self._append(info["final_obs"], ended_log_alpha)
        return ts._replace(obs=self._append(ts.obs, log_alpha), info=info)

    def reset(self, key):
        k_env, k_alpha = jax.random.split(key)
        inner, ts = self._env.reset(k_env)
        shape = jnp.asarray(self.shape, jnp.float32)
        la = self._draw(k_alpha, shape)
        zero, one = jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
        return TemperatureState(inner, la, shape, shape, zero, one), self._ts(ts, la, la, shape, zero)

    def step(self, key, state: TemperatureState, action):
        k_env, k_alpha = jax.random.split(key)
        inner, ts = self._env.step(k_env, state.inner, action)
        discounted = state.discounted + state.discount * ts.reward[0]
        la = jnp.where(ts.done, self._draw(k_alpha, state.shape), state.log_alpha)
        drawn = jnp.where(ts.done, state.shape, state.drawn_shape)
        out = self._ts(ts, la, state.log_alpha, state.drawn_shape, discounted)
        return TemperatureState(
            inner,
            la,
            drawn,
            state.shape,
            jnp.where(ts.done, 0.0, discounted),
            jnp.where(ts.done, 1.0, state.discount * self.gamma),
        ), out
