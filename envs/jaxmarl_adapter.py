"""Adapter from JaxMARL's per-agent dicts to the stacked-array API of marl.types.

Dicts are converted once, here, at the boundary: learners see ``obs [A, obs_dim]``,
``state [state_dim]``, ``reward [A]``, ``done []``, ``terminated []`` and
``avail_actions [A, n]``.

The adapter calls JaxMARL's ``step_env`` (no auto-reset): auto-reset is our own
wrapper (``envs.wrappers.AutoReset``), written once for every environment, so that
the final observation of an episode is kept for bootstrapping on truncation.

Termination vs truncation: an episode that ends before ``max_steps`` is *terminated*
(a terminal state, no bootstrap); one that ends exactly at the step limit is
*truncated*. The adapter counts steps itself, so this holds for every JaxMARL env.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from marl.types import EnvSpec, Timestep


@struct.dataclass
class AdapterState:
    inner: Any
    t: jax.Array  # steps taken in the current episode


class JaxMARLAdapter:
    """Wrap one JaxMARL ``MultiAgentEnv``.

    Args:
      env: the JaxMARL environment.
      name: the registry name, for messages.
      agents: the learning agents (defaults to ``env.agents``).
      won_fn: optional ``inner_state -> bool[]`` evaluated at episode end (SMAX).
      action_cost: optional ``[n, n]`` action geometry for the spec.
      state_scale: optional ``[state_dim]`` feature scale for the spec, or a callable
        ``state_dim -> array`` (see :class:`marl.types.EnvSpec`).
      max_return: optional largest episode return, for the spec.
      info_fn: optional ``inner_state -> dict`` of extra per-step info entries.
      state_fn: optional ``(inner_state, state) -> state``, a transform of the world state
        (SMAX bounds its weapon cooldowns here); it must keep the state's size.
    """

    def __init__(
        self,
        env,
        name: str,
        agents: Optional[list] = None,
        won_fn: Optional[Callable] = None,
        action_cost: Optional[np.ndarray] = None,
        state_scale=None,
        max_return: Optional[float] = None,
        info_fn: Optional[Callable] = None,
        state_fn: Optional[Callable] = None,
    ):
        self._env = env
        self._info_fn = info_fn
        self._state_fn = state_fn
        self.agents = list(agents if agents is not None else env.agents)
        self._won_fn = won_fn
        obs_sizes = [int(np.prod(env.observation_space(a).shape)) for a in self.agents]
        obs_dim = max(obs_sizes)
        spaces = [env.action_space(a) for a in self.agents]
        discrete = [hasattr(sp, "n") for sp in spaces]
        if len(set(discrete)) > 1:
            from marl.config import ConfigError

            raise ConfigError("env", name, "must have agents whose actions are all discrete or all continuous")
        # Agents that differ (MPE simple_tag, speaker_listener, world_comm, ...): observations
        # are zero-padded to the largest size with a per-agent feature mask, discrete actions
        # padded with never-available extras, continuous actions padded with ignored dims.
        self._obs_sizes = obs_sizes
        # Probe the world state once, on the host, to learn its size.
        obs, _ = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
        self._has_world_state = "world_state" in obs
        state_dim = int(np.prod(obs["world_state"].shape)) if self._has_world_state else obs_dim * len(self.agents)
        if discrete[0]:
            self._action_counts: Optional[list[int]] = [int(sp.n) for sp in spaces]
            num_actions, action_dim, low, high = max(self._action_counts), None, -1.0, 1.0
        else:
            self._action_counts = None
            self._action_dims = [int(np.prod(sp.shape)) for sp in spaces]
            num_actions = None
            action_dim = max(self._action_dims)
            low = float(min(np.min(sp.low) for sp in spaces))
            high = float(max(np.max(sp.high) for sp in spaces))
        hetero_obs = len(set(obs_sizes)) > 1
        hetero_act = discrete[0] and len(set(self._action_counts or ())) > 1
        if hetero_act and action_cost is not None and np.shape(action_cost)[0] != num_actions:
            action_cost = None
        types = tuple(a.rsplit("_", 1)[0] if "_" in a else a for a in self.agents)
        self._has_avail = num_actions is not None and _implements(env, "get_avail_actions")
        self.spec = EnvSpec(
            name=name,
            num_agents=len(self.agents),
            obs_dim=obs_dim,
            state_dim=state_dim,
            max_steps=int(getattr(env, "max_steps", getattr(env, "max_episode_steps", 100))),
            num_actions=num_actions,
            action_dim=action_dim,
            action_low=low,
            action_high=high,
            action_cost=action_cost,
            state_scale=None
            if state_scale is None
            else np.asarray(state_scale(state_dim) if callable(state_scale) else state_scale, np.float32),
            max_return=max_return,
            agent_types=types if len(set(types)) > 1 else None,
            obs_mask=np.arange(obs_dim)[None, :] < np.asarray(obs_sizes)[:, None] if hetero_obs else None,
            action_counts=tuple(self._action_counts or ()) if hetero_act else None,
        )
        self._action_mask = (
            np.arange(num_actions or 1)[None, :] < np.asarray(self._action_counts or [])[:, None]
            if hetero_act
            else None
        )

    @property
    def unwrapped(self):
        return self._env

    def _stack(self, obs: dict, inner) -> tuple[jax.Array, jax.Array, jax.Array]:
        d = self.spec.obs_dim
        o = jnp.stack(
            [jnp.pad(obs[a].reshape(-1), (0, d - n)) for a, n in zip(self.agents, self._obs_sizes, strict=True)]
        ).astype(jnp.float32)
        s = obs["world_state"].reshape(-1) if self._has_world_state else o.reshape(-1)
        if self._state_fn is not None:
            s = self._state_fn(inner, s)
        return o, s.astype(jnp.float32), self._avail(inner)

    def _avail(self, inner) -> jax.Array:
        if self._has_avail:
            av = self._env.get_avail_actions(inner)
            n = self.spec.num_actions or 1
            avail = jnp.stack(
                [jnp.pad(jnp.asarray(av[a]).reshape(-1), (0, n - jnp.asarray(av[a]).size)) for a in self.agents]
            ).astype(bool)
        else:
            avail = jnp.ones((len(self.agents), self.spec.num_actions or 1), bool)
        if self._action_mask is not None:
            avail = avail & jnp.asarray(self._action_mask)
        return avail

    def avail_actions(self, state: AdapterState) -> jax.Array:
        """The available actions [A, n] of ``state``: what ``reset`` / ``step`` return for
        it. ``AutoReset`` calls it once on the state it keeps, so the available actions
        of a step that restarts the episode are not computed twice."""
        return self._avail(state.inner)

    def reset(self, key: jax.Array) -> tuple[AdapterState, Timestep]:
        obs, inner = self._env.reset(key)
        o, s, avail = self._stack(obs, inner)
        zero = jnp.zeros((), bool)
        ts = Timestep(
            obs=o,
            state=s,
            reward=jnp.zeros((len(self.agents),), jnp.float32),
            done=zero,
            terminated=zero,
            avail_actions=avail,
            info=self._info(inner, zero),
        )
        return AdapterState(inner, jnp.zeros((), jnp.int32)), ts

    def step(self, key: jax.Array, state: AdapterState, action: jax.Array) -> tuple[AdapterState, Timestep]:
        if self._action_counts is None and len(set(self._action_dims)) > 1:
            acts = {a: action[i, : self._action_dims[i]] for i, a in enumerate(self.agents)}
        else:
            acts = {a: action[i] for i, a in enumerate(self.agents)}
        obs, inner, rew, dones, _ = self._env.step_env(key, state.inner, acts)
        t = state.t + 1
        done = jnp.asarray(dones["__all__"], bool) | (t >= self.spec.max_steps)
        terminated = done & (t < self.spec.max_steps)
        o, s, avail = self._stack(obs, inner)
        r = jnp.stack([rew[a] for a in self.agents]).astype(jnp.float32)
        ts = Timestep(o, s, r, done, terminated, avail, self._info(inner, done))
        return AdapterState(inner, t), ts

    def _info(self, inner, done) -> dict:
        info = {}
        if self._won_fn is not None:
            info["won"] = done & self._won_fn(inner)
        if self._info_fn is not None:
            info.update(self._info_fn(inner))
        return info


def _implements(env, method: str) -> bool:
    """True when ``env`` overrides JaxMARL's ``NotImplementedError`` default."""
    from jaxmarl.environments.multi_agent_env import MultiAgentEnv

    inner = getattr(env, "_env", None)
    cls_method = getattr(type(env), method, None)
    if cls_method is not None and cls_method is not getattr(MultiAgentEnv, method, None):
        return True
    return inner is not None and _implements(inner, method)
