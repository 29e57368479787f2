"""Multi-task SMAX: one team composition drawn per episode, fixed shapes throughout.

The multi-task StarCraft benchmarks of TRAMA (Na, Moon et al., ICLR 2025) are SMACv2
protoss 5 vs 5 battles whose ally team is drawn, each episode, from a small set of
compositions (the enemy mirrors it), with "surround" start positions or a mix of
reflect and surround. This module rebuilds them on JaxMARL's SMAX:

- A **task set** (:class:`TaskSet`) is a list of ally compositions (unit counts by
  SMAX unit-type name) with weights, plus the probability of reflect start
  positions (0: always surround). The enemy team mirrors the drawn composition.
- ``reset`` draws the task id from the categorical distribution over the weights
  (inside ``reset``: jittable and vmappable), the unit types, and the start
  positions with SMAX's own smacv2-style generators (``SurroundPositionDistribution``,
  ``ReflectPositionDistribution``).
- Both teams are padded to ``N`` units, the largest team of the set. A padded unit is
  absent from the start: zero health, dead, so SMAX gives it an all-zero observation,
  zero world-state features, only the stop action (action 4, SMAX's no-op for dead
  units) and no attack action can target it; it never moves, collides or shoots.
  Observation, state and action sizes are therefore the same for every task.
- The damage reward is normalized by the number of *present* enemies (SMAX divides by
  the team size), so every task has the same largest return, 1 + the win bonus.
- The true task id is in ``info["task_id"]`` (from the adapter; at the step an episode
  ends it is the finished episode's task), for analysis only. It never enters
  observations or the world state. Unit types are visible, as in SMACv2 (the agents'
  own type bits, the types of the units they see; the world state lists all types).
- Slot order as in SMACv2 (default): each team's present units are sorted by unit
  type (SMAX's type index), then start x, then start y, padded slots last. A task thus
  keeps its slot pattern (agent i has the same type in every episode of that task), and
  the enemy, mirroring the composition, has the same type in each slot.
  ``shuffle_units=True`` instead permutes the present units among the first slots each
  episode (unsorted positions), so an agent index is not tied to a unit type.

Named task sets (``TASK_SETS``), after the paper's ``surComb3`` / ``surComb4`` and
their reflect variants (``reSurComb*``: reflect or surround with probability 1/2 each):

  surComb3  {3 stalkers + 2 zealots, 3 zealots + 2 colossi, 3 stalkers + 2 colossi}
  surComb4  surComb3 + {1 colossus + 2 stalkers + 2 zealots}, equal weights

SMAX has no colossus. The substitute is the **marauder** (``COLOSSUS_SUBSTITUTE``):
like the colossus it is the slow, long-range, heavy unit of the mix (attack range 6,
the longest in SMAX with the stalker's; speed 2.25, the slowest; 125 hp), and it is a
unit type distinct from the stalker and zealot, so the three compositions stay
distinguishable. Differences that remain: no splash damage, no cliff walking, and
protoss shields are not modelled by SMAX at all.

Custom sets: ``envs.make("smax-mt:custom", tasks=[{"units": {"marine": 3}, "weight": 2},
{"units": {"marine": 2, "marauder": 3}}], reflect_prob=0.5)`` (any SMAX kwargs, e.g.
``max_steps``, pass through), or build a :class:`TaskSet` and call
:func:`make_multitask_smax`. The episode limit defaults to 200 steps, the paper's.
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.struct import dataclass

COLOSSUS_SUBSTITUTE = "marauder"
DEFAULT_MAX_STEPS = 200


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """Ally compositions with weights.

    tasks: sequence of ``{"units": {type_name: count, ...}, "weight": w}`` (weight
      defaults to 1; weights are normalized).
    reflect_prob: probability of reflect start positions; else surround.
    shuffle_units: permute the present units among their slots each episode; False
      (default): sort each team by (unit type, x, y) as SMACv2 does.
    """

    tasks: tuple
    reflect_prob: float = 0.0
    shuffle_units: bool = False

    def __post_init__(self):
        tasks = tuple(dict(units=dict(t["units"]), weight=float(t.get("weight", 1.0))) for t in self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if not tasks:
            raise ValueError("invalid tasks=(): a task set needs at least one composition")
        for t in tasks:
            if (
                not t["units"]
                or any(int(c) != c or c < 0 for c in t["units"].values())
                or sum(t["units"].values()) <= 0
            ):
                raise ValueError(
                    f"invalid tasks units={t['units']!r}: counts must be non-negative integers, at least one unit"
                )
            if not t["weight"] > 0:
                raise ValueError(f"invalid tasks weight={t['weight']!r}: must be > 0")
        if not 0.0 <= self.reflect_prob <= 1.0:
            raise ValueError(f"invalid reflect_prob={self.reflect_prob!r}: must be in [0, 1]")

    @property
    def team_size(self) -> int:
        return max(sum(t["units"].values()) for t in self.tasks)

    @property
    def weights(self) -> np.ndarray:
        w = np.array([t["weight"] for t in self.tasks], np.float64)
        return w / w.sum()

    def tables(self, unit_type_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(types [n_tasks, N] uint8, present [n_tasks, N] bool), present units first."""
        n = self.team_size
        types = np.zeros((len(self.tasks), n), np.uint8)
        present = np.zeros((len(self.tasks), n), bool)
        for i, t in enumerate(self.tasks):
            row = []
            for name, count in t["units"].items():
                if name not in unit_type_names:
                    raise ValueError(f"invalid unit type {name!r}: SMAX has {list(unit_type_names)}")
                row += [unit_type_names.index(name)] * int(count)
            types[i, : len(row)] = row
            present[i, : len(row)] = True
        return types, present


_C = COLOSSUS_SUBSTITUTE
_SUR3 = (
    dict(units={"stalker": 3, "zealot": 2}, weight=0.33),
    dict(units={"zealot": 3, _C: 2}, weight=0.33),
    dict(units={"stalker": 3, _C: 2}, weight=0.34),
)
_SUR4 = tuple(dict(t, weight=0.25) for t in _SUR3) + (dict(units={_C: 1, "stalker": 2, "zealot": 2}, weight=0.25),)

TASK_SETS: dict[str, TaskSet] = {
    "surComb3": TaskSet(_SUR3, reflect_prob=0.0),
    "surComb4": TaskSet(_SUR4, reflect_prob=0.0),
    "surComb3-reflect": TaskSet(_SUR3, reflect_prob=0.5),
    "surComb4-reflect": TaskSet(_SUR4, reflect_prob=0.5),
}


def names() -> list[str]:
    return sorted(TASK_SETS) + ["custom"]


@functools.lru_cache(maxsize=None)
def _classes():
    """The env classes, built on first use so importing this module does not import jaxmarl."""
    from jaxmarl.environments.smax.distributions import ReflectPositionDistribution, SurroundPositionDistribution
    from jaxmarl.environments.smax.heuristic_enemy import create_heuristic_policy
    from jaxmarl.environments.smax.heuristic_enemy_smax_env import HeuristicEnemySMAX
    from jaxmarl.environments.smax.smax_env import SMAX, State

    @dataclass
    class MultiTaskState(State):
        task_id: jax.Array  # [] int32
        present: jax.Array  # [2N] bool: the unit exists in this episode's task

    class MultiTaskSMAX(SMAX):
        """SMAX with a per-episode task drawn from ``task_set`` (see the module docstring)."""

        def __init__(self, task_set: TaskSet, **kwargs):
            if kwargs.get("use_self_play_reward"):
                raise ValueError(
                    "invalid use_self_play_reward=True: multi-task SMAX supports the heuristic enemy's reward only"
                )
            for k in ("num_allies", "num_enemies", "scenario"):
                if k in kwargs:
                    raise ValueError(f"invalid {k}={kwargs[k]!r}: team sizes come from the task set")
            kwargs.setdefault("max_steps", DEFAULT_MAX_STEPS)
            n = task_set.team_size
            super().__init__(num_allies=n, num_enemies=n, **kwargs)
            self.task_set = task_set
            types, present = task_set.tables(self.unit_type_names)
            self._task_types = jnp.asarray(types)
            self._task_present = jnp.asarray(present)
            self._task_logits = jnp.log(jnp.asarray(task_set.weights, jnp.float32))
            self._surround = SurroundPositionDistribution(n, n, self.map_width, self.map_height)
            self._reflect = ReflectPositionDistribution(n, n, self.map_width, self.map_height)

        @property
        def num_tasks(self) -> int:
            return len(self.task_set.tasks)

        @partial(jax.jit, static_argnums=(0,))
        def reset(self, key):
            k_task, k_perm, k_mode, k_sur, k_ref = jax.random.split(key, 5)
            task = jax.random.categorical(k_task, self._task_logits).astype(jnp.int32)
            types, present = self._task_types[task], self._task_present[task]
            if self.task_set.shuffle_units:
                # present units get keys in [0, 1), padded ones 2: they stay last
                order = jnp.argsort(jnp.where(present, jax.random.uniform(k_perm, present.shape), 2.0))
                types = types[order]
            reflect = jax.random.uniform(k_mode) < self.task_set.reflect_prob
            positions = jnp.where(reflect, self._reflect.generate(k_ref), self._surround.generate(k_sur))
            unit_types = jnp.concatenate([types, types])  # the enemy mirrors the allies
            present = jnp.concatenate([present, present])
            unit_health = jnp.where(present, self.unit_type_health[unit_types], 0.0)
            teams = jnp.zeros((self.num_agents,)).at[self.num_allies :].set(1)
            state = MultiTaskState(
                unit_positions=positions,
                unit_alive=present,
                unit_teams=teams,
                unit_health=unit_health,
                unit_types=unit_types,
                prev_movement_actions=jnp.zeros((self.num_agents, 2)),
                prev_attack_actions=jnp.zeros((self.num_agents,), dtype=jnp.int32),
                step=jnp.array(0),
                done=jnp.array(False),
                unit_weapon_cooldowns=jnp.zeros((self.num_agents,)),
                task_id=task,
                present=present,
            )
            state = self._push_units_away(state)
            if not self.task_set.shuffle_units:  # sort each team on its final start positions
                n = self.num_allies
                order = jnp.concatenate(
                    [
                        sort_slots(types, present[:n], state.unit_positions[:n]),
                        n + sort_slots(types, present[n:], state.unit_positions[n:]),
                    ]
                )
                state = state.replace(
                    unit_positions=state.unit_positions[order],
                    unit_types=state.unit_types[order],
                    unit_health=state.unit_health[order],
                )
            obs = self.get_obs(state)
            obs["world_state"] = jax.lax.stop_gradient(self.get_world_state(state))
            return obs, state

        @partial(jax.jit, static_argnums=(0,))
        def compute_reward(self, state, health_before, health_after):
            n = self.num_allies
            frac = (health_before - health_after) / self.unit_type_health[state.unit_types]
            alive = state.unit_alive

            def team(own, other):
                dmg = frac[other].sum() / jnp.maximum(state.present[other].sum(), 1)
                won = ~jnp.any(alive[other]) & jnp.any(alive[own])
                return jnp.abs(dmg) + jnp.where(won, self.won_battle_bonus, 0.0)

            allies, enemies = slice(0, n), slice(n, self.num_agents)
            r = (team(allies, enemies), team(enemies, allies))
            return {a: r[int(self.agent_ids[a] >= n)] for a in self.agents}

    class MultiTaskHeuristicEnemySMAX(HeuristicEnemySMAX):
        """JaxMARL's heuristic-enemy wrapper around :class:`MultiTaskSMAX`.

        Padded enemies are dead from the start: the heuristic sees their all-zero
        observation and picks an action that SMAX then ignores (dead units neither
        move nor shoot), as it does for any dead unit.
        """

        def __init__(self, task_set: TaskSet, enemy_shoots=True, attack_mode="closest", **env_kwargs):
            self._env = MultiTaskSMAX(task_set, **env_kwargs)
            self.num_agents = self._env.num_allies
            self.num_enemies = self._env.num_enemies
            self.num_allies = self._env.num_allies
            self.agents = [f"ally_{i}" for i in range(self.num_agents)]
            self.enemy_agents = [f"enemy_{i}" for i in range(self.num_enemies)]
            self.all_agents = self.agents + self.enemy_agents
            self.observation_spaces = {i: self._env.observation_spaces[i] for i in self.agents}
            self.action_spaces = {i: self._env.action_spaces[i] for i in self.agents}
            self.enemy_shoots = enemy_shoots
            self.attack_mode = attack_mode
            self.heuristic_policy = create_heuristic_policy(self._env, 1, shoot=enemy_shoots, attack_mode=attack_mode)

    return MultiTaskSMAX, MultiTaskHeuristicEnemySMAX


def sort_slots(types, present, positions):
    """Slot order of one team as in SMACv2: present units first, sorted by unit type,
    then x, then y. types [N], present [N] bool, positions [N, 2] -> permutation [N]."""
    return jnp.lexsort((positions[:, 1], positions[:, 0], types, ~present))


def task_set_from(
    tasks: Any = None,
    reflect_prob: Optional[float] = None,
    shuffle_units: Optional[bool] = None,
    base: Optional[TaskSet] = None,
) -> TaskSet:
    """A :class:`TaskSet` from a list of dicts (or a TaskSet), overriding ``base``'s options."""
    if isinstance(tasks, TaskSet):
        base, tasks = tasks, None
    if base is None and tasks is None:
        raise ValueError("invalid tasks=None: smax-mt:custom needs tasks=[{'units': {...}, 'weight': w}, ...]")
    fields: dict[str, Any] = {}
    if tasks is not None:
        fields["tasks"] = tuple(tasks)
    if reflect_prob is not None:
        fields["reflect_prob"] = float(reflect_prob)
    if shuffle_units is not None:
        fields["shuffle_units"] = bool(shuffle_units)
    return dataclasses.replace(base, **fields) if base is not None else TaskSet(**fields)


def make_multitask_smax(
    name: str = "surComb3",
    tasks: Any = None,
    reflect_prob: Optional[float] = None,
    shuffle_units: Optional[bool] = None,
    **kwargs,
):
    """The adapted environment ``smax-mt:<name>`` (unwrapped; the registry adds the wrappers).

    ``name``: a key of ``TASK_SETS`` or ``custom``; ``tasks`` / ``reflect_prob`` /
    ``shuffle_units`` override the named set; other kwargs go to SMAX (``max_steps``,
    ``map_width``, ``won_battle_bonus``, ...) or the heuristic enemy (``attack_mode``).
    """
    from envs.smax import smax_adapter

    if name != "custom" and name not in TASK_SETS:
        raise ValueError(f"invalid task set {name!r}: one of {names()}")
    base = None if name == "custom" else TASK_SETS[name]
    task_set = task_set_from(tasks, reflect_prob, shuffle_units, base)
    _, heuristic_cls = _classes()
    env = heuristic_cls(task_set, **kwargs)
    adapter = smax_adapter(env, f"smax-mt:{name}", info_fn=lambda inner: {"task_id": inner.state.task_id})
    adapter.spec = dataclasses.replace(adapter.spec, num_tasks=len(task_set.tasks))
    return adapter


def task_weights(env) -> np.ndarray:
    """The normalized task weights of a (wrapped) multi-task SMAX environment."""
    return env.unwrapped._env.task_set.weights


def describe(task_set: TaskSet) -> list[str]:
    """Human-readable compositions, e.g. ``['3 stalker + 2 zealot (p=0.33)', ...]``."""
    w = task_set.weights
    return [
        " + ".join(f"{c} {u}" for u, c in t["units"].items()) + f" (p={p:.2f})"
        for t, p in zip(task_set.tasks, w, strict=True)
    ]
