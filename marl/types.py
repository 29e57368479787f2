"""Types shared by environments, algorithms and the runner.

Everything that is traced is a pytree of fixed shape. Shapes use the letters
``B`` (batch / parallel envs), ``T`` (time), ``A`` (agents).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class EnvSpec:
    """Static description of an environment, as the learners see it.

    Attributes:
      name: the registry name (``"smax:3m"``).
      num_agents: number of learning agents ``A``.
      obs_dim: per-agent observation size.
      state_dim: size of the global (world) state for centralized critics/mixers.
      num_actions: number of discrete actions, or ``None`` for continuous actions.
      action_dim: size of a continuous action (``None`` for discrete).
      action_low / action_high: bounds of a continuous action.
      max_steps: episode limit (truncation).
      action_cost: optional ``[n, n]`` ground cost between discrete actions
        (the action geometry used by the Wasserstein regularizer).
      state_scale: optional ``[state_dim]`` typical magnitude of each state feature;
        ``state / state_scale`` is roughly in [-1, 1] (SMAX positions are in map units).
        Mixers' hypernetworks read the state scaled this way.
      max_return: optional largest achievable episode return (SMAX: all enemy health
        plus the win bonus); value-based learners can normalize rewards with it.
      agent_types: optional type name of each agent (``("adversary", "adversary",
        "agent")``); agents of one type form a team, whose return is reported apart.
      obs_mask: optional ``[A, obs_dim]`` bool, the features each agent really has when
        agents differ in observation size (observations are zero-padded to ``obs_dim``).
      action_counts: optional per-agent number of discrete actions when agents differ
        (actions are padded to ``num_actions`` and the extra ones are never available).
      rule_features: optional indices of the per-agent observation features (each in
        [-1, 1]) that a mean-field decision rule reads as an agent's input (Dec-POMFC's
        observation point); ``None``: the task defines none.
      num_tasks: number of true tasks when the env reports each episode's task id in
        ``info["task_id"]`` (multi-task SMAX); 0 when it reports none.
    """

    name: str
    num_agents: int
    obs_dim: int
    state_dim: int
    max_steps: int
    num_actions: Optional[int] = None
    action_dim: Optional[int] = None
    action_low: float = -1.0
    action_high: float = 1.0
    action_cost: Optional[np.ndarray] = None
    state_scale: Optional[np.ndarray] = None
    max_return: Optional[float] = None
    agent_types: Optional[tuple[str, ...]] = None
    obs_mask: Optional[np.ndarray] = None
    action_counts: Optional[tuple[int, ...]] = None
    rule_features: Optional[tuple[int, ...]] = None
    num_tasks: int = 0

    @property
    def discrete(self) -> bool:
        return self.num_actions is not None

    @property
    def teams(self) -> tuple[str, ...]:
        """The distinct agent types in order of first appearance (empty: one team)."""
        if not self.agent_types or len(set(self.agent_types)) < 2:
            return ()
        return tuple(dict.fromkeys(self.agent_types))

    @property
    def agent_type_ids(self) -> np.ndarray:
        """``[A]`` int: each agent's index in :attr:`teams` (zeros when there is one team)."""
        teams = self.teams
        if not teams:
            return np.zeros(self.num_agents, np.int32)
        return np.asarray([teams.index(t) for t in self.agent_types or ()], np.int32)

    def __hash__(self):  # specs are compared by identity; arrays are not hashable
        return id(self)


class Timestep(NamedTuple):
    """What an environment returns after ``reset`` and ``step``.

    obs: [A, obs_dim]; state: [state_dim]; reward: [A]; done: [] (episode ended,
    either way); terminated: [] (ended in a terminal state: do not bootstrap);
    avail_actions: [A, n] bool (all True for continuous envs, n = 1);
    info: dict of fixed-shape arrays (episode statistics, ``won``, ...).
    """

    obs: jax.Array
    state: jax.Array
    reward: jax.Array
    done: jax.Array
    terminated: jax.Array
    avail_actions: jax.Array
    info: dict


def assert_timestep(ts: Timestep, spec: EnvSpec, batch: tuple = ()) -> None:
    """Check a (possibly batched) Timestep against its spec with chex: shapes
    ``obs [*batch, A, obs_dim]``, ``state [*batch, state_dim]``, ``reward [*batch, A]``,
    ``done, terminated [*batch]`` (bool), ``avail_actions [*batch, A, n]`` (bool; n = 1
    for continuous actions), float32 observations, state and rewards. Raises
    AssertionError naming the field. Host-side: for tests, adapters and debugging."""
    A, n = spec.num_agents, spec.num_actions or 1
    f32 = jnp.float32
    shapes = {
        "obs": ((A, spec.obs_dim), f32),
        "state": ((spec.state_dim,), f32),
        "reward": ((A,), f32),
        "done": ((), bool),
        "terminated": ((), bool),
        "avail_actions": ((A, n), bool),
    }
    assert_fields(ts, shapes, batch, "Timestep", where=spec.name)


def assert_fields(
    obj: Any, fields: dict[str, tuple[tuple, Any]], batch: tuple = (), what: str = "", where: str = ""
) -> None:
    """Check named fields of ``obj`` (a NamedTuple, dataclass or anything with those
    attributes) with chex: ``fields[name] = (shape after the batch dims, dtype)``.
    Raises AssertionError naming ``what``, the field and ``where``. Host-side: tests and debugging;
    the learners' ``transition_fields`` give theirs."""
    import chex

    for field, (shape, dtype) in fields.items():
        value = getattr(obj, field)
        try:
            chex.assert_shape(value, tuple(batch) + tuple(shape))
            chex.assert_type(value, dtype)
        except AssertionError as e:
            of = f" of {where}" if where else ""
            raise AssertionError(f"{what}.{field}{of}: {e}") from None


class Environment(Protocol):
    """The environment contract (one environment; batching is ``vmap``)."""

    spec: EnvSpec

    def reset(self, key: jax.Array) -> tuple[Any, Timestep]: ...

    def step(self, key: jax.Array, env_state: Any, action: jax.Array) -> tuple[Any, Timestep]: ...


InitFn = Callable[[jax.Array], Any]
"""``init(key) -> train_state``."""
UpdateFn = Callable[[Any], tuple[Any, dict]]
"""``update(train_state) -> (train_state, metrics)``."""
ActFn = Callable[[Any, Timestep, Any, jax.Array, Any], tuple[jax.Array, Any]]
"""``act(params, timestep, carry, key, greedy) -> (actions, carry)``."""
CarryFn = Callable[..., Any]
"""``initial_carry(batch_shape) -> carry``."""


class Algorithm(NamedTuple):
    """The algorithm contract, as the runner sees it.

    ``algos.make(name, env, config)`` returns one of these; env and config are
    closed over (static), so every function takes and returns only arrays.

    init(key) -> train_state
    update(train_state) -> (train_state, metrics)   one iteration; pure, jittable
    act(params, timestep, carry, key, greedy) -> (actions, carry)
    initial_carry(batch_shape) -> carry               recurrent state for ``act``
    env_steps_per_update: env transitions (summed over parallel envs) per ``update``
    """

    name: str
    config: Any
    env: Any
    init: InitFn
    update: UpdateFn
    act: ActFn
    initial_carry: CarryFn
    env_steps_per_update: int


def hparams(cls: type, **values: Any) -> Any:
    """A hyperparameter NamedTuple ``cls`` built by field name, every value a float32
    array (traced, so sweeps can vmap over them).

    Raises TypeError naming the fields that are missing or unknown, so adding, removing
    or reordering a field can never silently swap values.
    """
    fields = tuple(getattr(cls, "_fields", ()))
    missing = [f for f in fields if f not in values]
    unknown = [k for k in values if k not in fields]
    if missing or unknown:
        raise TypeError(
            f"{cls.__name__}: missing fields {missing}, unknown fields {unknown}; the fields are {list(fields)}"
        )
    return cls(**{f: jnp.asarray(values[f], jnp.float32) for f in fields})


SEED_AXIS = "seed"
"""Axis name of the runner's ``vmap`` over seeds."""


def max_over_seeds(x: jax.Array) -> jax.Array:
    """``x`` maximized over the runner's seed axis (``x`` itself outside that vmap).

    Lets an update make a decision that is the same for every seed of a vmapped
    program (e.g. how many time steps of a batch need computing), so ``lax.cond``
    on it stays a real branch instead of becoming a select.
    """
    try:
        return jax.lax.pmax(x, SEED_AXIS)
    except NameError:  # not inside the runner's vmap
        return x
