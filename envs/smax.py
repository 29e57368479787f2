"""SMAX (JaxMARL's heuristic-enemy StarCraft) behind the project's environment contract:
map names, reward variants, and the adapter that bounds the world state.

``envs.registry`` registers ``smax:<map>`` from here and ``envs.multitask_smax`` builds
its adapter from :func:`smax_adapter`; neither imports the other.
"""

from __future__ import annotations

import numpy as np


def smax_maps() -> list[str]:
    from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO

    return sorted(MAP_NAME_TO_SCENARIO)


SMAX_REWARDS = ("default", "damage", "damage_alive")


def make_smax(map_name: str, reward: str = "default", alive_bonus: float = 0.02, **kwargs):
    """``reward``: ``default`` (JaxMARL's: enemy health removed + the win bonus),
    ``damage`` (enemy health removed only: no win bonus), or ``damage_alive`` (damage
    plus ``alive_bonus`` x the fraction of allies alive, every step). The last two are
    misspecified proxies of winning, for fine-tuning studies: ``damage_alive`` pays for
    prolonging the fight, since a win ends the episode. The ``won`` flag (win rate) is
    the true outcome whatever the reward. Errors name ``reward`` / ``alive_bonus``."""
    import jaxmarl
    from jaxmarl.environments.smax import map_name_to_scenario

    from marl.config import ConfigError, check_choice, check_nonnegative

    check_choice("reward", reward, SMAX_REWARDS)
    check_nonnegative("alive_bonus", alive_bonus)
    if reward != "default":
        if "won_battle_bonus" in kwargs:
            raise ConfigError(
                "won_battle_bonus",
                kwargs["won_battle_bonus"],
                f"is set by reward={reward!r} (no win bonus); pass only one of them",
            )
        kwargs["won_battle_bonus"] = 0.0
    elif alive_bonus != 0.02:
        raise ConfigError("alive_bonus", alive_bonus, "is only used with reward='damage_alive'")
    scenario = map_name_to_scenario(map_name)
    env = jaxmarl.make("HeuristicEnemySMAX", scenario=scenario, **kwargs)
    adapter = smax_adapter(env, f"smax:{map_name}")
    return AliveBonus(adapter, alive_bonus) if reward == "damage_alive" else adapter


class AliveBonus:
    """Adds ``bonus`` x (fraction of allies alive after the step) to every agent's reward
    of a SMAX adapter (``reward="damage_alive"``); ``spec.max_return`` grows by
    ``bonus * max_steps``."""

    def __init__(self, env, bonus: float):
        import dataclasses

        self._env, self._bonus = env, float(bonus)
        self._allies = env.unwrapped.num_allies
        self.spec = dataclasses.replace(
            env.spec, max_return=(env.spec.max_return or 0.0) + self._bonus * env.spec.max_steps
        )

    def __getattr__(self, name):
        return getattr(self._env, name)

    def reset(self, key):
        return self._env.reset(key)

    def avail_actions(self, state):
        return self._env.avail_actions(state)

    def step(self, key, state, action):
        import jax.numpy as jnp

        state, ts = self._env.step(key, state, action)
        alive = jnp.mean(state.inner.state.unit_alive[: self._allies].astype(jnp.float32))
        return state, ts._replace(reward=ts.reward + self._bonus * alive)


def smax_adapter(env, name: str, info_fn=None):
    """The adapter for a heuristic-enemy SMAX env: won flag, bounded world state, state scale,
    action geometry, largest return; ``info_fn(inner_state) -> dict`` adds per-step info
    (multi-task SMAX).

    JaxMARL's ``get_world_state`` emits each unit's raw weapon cooldown, which falls by the
    step time on every step a unit does not fire and has no floor (-49.5 within 100 steps):
    left alone it carries almost all of the state's variance, and every mixer, embedding and
    clustering tracks it instead of the units. The adapter replaces that column with
    ``clip(cooldown / cooldown of the unit's type, 0, 1)``, as SMACv2's state and SMAX's own
    observations do (dead units keep their zero features).
    """
    import jax.numpy as jnp

    from envs.jaxmarl_adapter import JaxMARLAdapter
    from marl.action_costs import smax_cost

    n_allies = env.num_allies
    feats, units = len(env.own_features), env.num_allies + env.num_enemies
    type_cooldowns = np.asarray(env.unit_type_weapon_cooldowns, np.float32)

    def won(inner):
        alive = inner.state.unit_alive
        return jnp.all(~alive[n_allies:]) & jnp.any(alive[:n_allies])

    def bounded_state(inner, s):
        if s.shape[0] != units * (feats + 2):
            return s  # an unknown layout: leave the state as it is
        st = inner.state
        cd = jnp.clip(st.unit_weapon_cooldowns / jnp.asarray(type_cooldowns)[st.unit_types], 0.0, 1.0)
        cd = jnp.where(st.unit_alive, cd, 0.0)
        per_unit = s[: units * feats].reshape(units, feats).at[:, 3].set(cd)
        return jnp.concatenate([per_unit.reshape(-1), s[units * feats :]])

    def state_scale(state_dim):
        # world state: per unit [health, x, y, cooldown, type one-hot...], then teams and types
        scale = np.ones(state_dim, np.float32)
        if state_dim != units * (feats + 2):
            return scale  # an unknown layout: leave the state as it is
        for u in range(units):
            scale[u * feats + 1] = env.map_width
            scale[u * feats + 2] = env.map_height
        scale[units * (feats + 1) :] = max(1, len(env.unit_type_names) - 1)  # unit type ids
        return scale

    return JaxMARLAdapter(
        env,
        name,
        won_fn=won,
        action_cost=smax_cost(env.num_enemies),
        state_scale=state_scale,
        max_return=1.0 + float(env.won_battle_bonus),  # all enemy health (normalized to 1) + the win bonus
        info_fn=info_fn,
        state_fn=bounded_state,
    )
