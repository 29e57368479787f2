"""Wrappers written once for every environment: auto-reset and episode statistics.

``AutoReset`` resets an environment when its episode ends and keeps the last
observation, state and available actions of the finished episode in
``info["final_obs"]``, ``info["final_state"]`` and ``info["final_avail"]`` (the keys
in ``marl.episodes.FINAL_KEYS``; equal to the step's own when the episode goes on), so learners
can bootstrap a *truncated* episode from its true final state (``terminated``
stays False there) while a *terminated* one is not bootstrapped.

``EpisodeStats`` accumulates the return (mean over agents of the summed reward) and
length of the running episode and reports, at every step, the statistics of the
episode that ended at this step: ``info["episode_done"]`` (bool),
``info["episode_return"]``, ``info["episode_length"]`` and ``info["won"]`` when the
environment reports it. Metrics are averages of these weighted by ``episode_done``.
When agents form several teams (``spec.teams``: adversaries vs good agents), each
team's return (mean over its agents) is reported too, as ``episode_return_<team>``
and the metric ``return_<team>``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from marl.types import Timestep


class Wrapper:
    def __init__(self, env):
        self._env = env
        self.spec = env.spec

    @property
    def unwrapped(self):
        return getattr(self._env, "unwrapped", self._env)

    def __getattr__(self, name):
        return getattr(self._env, name)


def _select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


class AutoReset(Wrapper):
    def __init__(self, env):
        super().__init__(env)
        # an env whose class offers ``avail_actions(state)`` (the JaxMARL adapter) gets it
        # called once, on the state kept after the reset select, instead of selecting
        # between the stepped and the reset state's (equal values, one computation fewer
        # where ``final_avail`` is unused)
        self._avail_of_state = callable(getattr(type(env), "avail_actions", None))

    def reset(self, key):
        state, ts = self._env.reset(key)
        info = dict(ts.info, final_obs=ts.obs, final_state=ts.state, final_avail=ts.avail_actions)
        return state, ts._replace(info=info)

    def step(self, key, state, action):
        key_step, key_reset = jax.random.split(key)
        state_st, ts_st = self._env.step(key_step, state, action)
        state_re, ts_re = self._env.reset(key_reset)
        done = ts_st.done
        state = _select(done, state_re, state_st)
        info = dict(ts_st.info, final_obs=ts_st.obs, final_state=ts_st.state, final_avail=ts_st.avail_actions)
        if self._avail_of_state:
            avail = self._env.avail_actions(state)
        else:
            avail = jnp.where(done, ts_re.avail_actions, ts_st.avail_actions)
        ts = ts_st._replace(
            obs=jnp.where(done, ts_re.obs, ts_st.obs),
            state=jnp.where(done, ts_re.state, ts_st.state),
            avail_actions=avail,
            info=info,
        )
        return state, ts


@struct.dataclass
class StatsState:
    inner: Any
    ret: jax.Array
    length: jax.Array
    team_ret: jax.Array  # [teams] (size 0 with one team)


class EpisodeStats(Wrapper):
    def __init__(self, env):
        super().__init__(env)
        teams = self.spec.teams
        self._teams = teams
        # [teams, agents]: each team's mean over its agents
        ids = self.spec.agent_type_ids
        onehot = np.eye(max(len(teams), 1), dtype=np.float32)[ids].T if teams else np.zeros((0, self.spec.num_agents))
        self._team_avg = onehot / np.maximum(onehot.sum(1, keepdims=True), 1.0)

    def reset(self, key):
        state, ts = self._env.reset(key)
        z = jnp.zeros((), jnp.float32)
        team = jnp.zeros((len(self._teams),), jnp.float32)
        return StatsState(state, z, jnp.zeros((), jnp.int32), team), ts._replace(info=self._info(ts, z, 0, False, team))

    def step(self, key, state: StatsState, action):
        inner, ts = self._env.step(key, state.inner, action)
        ret = state.ret + ts.reward.mean()
        team = state.team_ret + jnp.asarray(self._team_avg, jnp.float32) @ ts.reward
        length = state.length + 1
        info = self._info(ts, ret, length, ts.done, team)
        keep = 1 - ts.done.astype(jnp.float32)
        return (StatsState(inner, ret * keep, (length * keep).astype(jnp.int32), team * keep), ts._replace(info=info))

    def _info(self, ts: Timestep, ret, length, done, team) -> dict:
        info = dict(ts.info)
        info["episode_done"] = jnp.asarray(done, bool)
        info["episode_return"] = jnp.asarray(ret, jnp.float32)
        info["episode_length"] = jnp.asarray(length, jnp.int32)
        info["won"] = jnp.asarray(info.get("won", False), bool)
        for i, name in enumerate(self._teams):
            info[f"episode_return_{name}"] = team[i]
        return info
