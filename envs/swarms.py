"""Swarm tasks for mean-field control: adapted Kuramoto, Vicsek and Aggregation.

``envs.make("swarm:kuramoto", num_agents=100)`` (also ``swarm:vicsek``,
``swarm:aggregation``; keyword arguments are the fields of the task's config class).
The exact task definitions of Dec-POMFC (Cui et al., ICLR 2024) were not available;
these are our adapted versions, defined here.

Common setting
--------------
N agents (static) live on the unit torus ``[0, 1)^2``; ``delta_T(x, y)`` is the
minimum-image displacement ``y - x`` (each coordinate wrapped into ``[-1/2, 1/2)``) and
``|.|_T`` its norm. Time step ``dt``, horizon ``T = max_steps``; ``done`` is set at
``t = T`` and never ``terminated`` (the horizon is a truncation). ``xi ~ N(0, 1)``
independently per agent and step. Actions ``a_i`` are in ``[-1, 1]^action_dim``
(``EnvSpec.action_low/high``; clipped), scaled to a physical control ``u_i``. With
``action_bins = B > 0`` the action is instead an integer in ``[0, B^action_dim)``
selecting the grid point ``linspace(-1, 1, B)^action_dim`` (for discrete-action
learners; ``spec.action_cost`` is then the Euclidean distance between grid points).

The neighbourhood of i is ``N_i = {j != i : |delta_T(x_i, x_j)|_T < r}`` with
``n_i = |N_i|``; ``<f>_i = (1/max(n_i, 1)) sum_{j in N_i} f_j`` (0 when ``n_i = 0``).
Density feature ``rho_i = n_i / max(1, (N - 1) pi r^2)`` (about 1 for uniform agents
when ``(N - 1) pi r^2 >= 1``, so the observation has an N-independent scale).

The reward is shared (the same for every agent, shape [N]) and computed on the
empirical distribution of the next state, minus an action cost
``c_a * (1/N) sum_i |a_i|^2 / action_dim``.

Kuramoto (``swarm:kuramoto``), action_dim 1
    Positions ``x_i`` uniform at reset and fixed; phases ``theta_i ~ U[0, 2 pi)``;
    natural frequencies ``omega_i ~ N(omega_mean, omega_std^2)`` drawn at reset.
    ``u_i = max_rate * a_i``.
    ``theta_i <- theta_i + dt (omega_i + u_i + K c_i) + noise sqrt(dt) xi_i  (mod 2 pi)``
    with coupling ``c_i = R sin(psi - theta_i)`` (``coupling_mode="global"``: the
    classical all-to-all model, ``R e^{i psi} = (1/N) sum_j e^{i theta_j}``) or
    ``c_i = <sin(theta_j - theta_i)>_i`` (``"local"``: neighbours within r).
    Without control and noise the global model synchronizes for
    ``K > K_c = 2 / (pi g(0)) = sqrt(8 / pi) omega_std`` (Gaussian ``g``).
    Reward ``R(theta') - action cost`` (order parameter).
    Observation [7 (+4)]: ``rho_i, <cos(theta_j - theta_i)>_i, <sin(theta_j - theta_i)>_i,
    cos theta_i, sin theta_i, omega_i, t / T``.

Vicsek (``swarm:vicsek``), action_dim 1
    Positions uniform, headings ``phi_i ~ U[0, 2 pi)`` at reset; ``u_i = max_turn * a_i``.
    ``phi_i <- phi_i + dt (u_i + alignment <sin(phi_j - phi_i)>_i) + noise sqrt(dt) xi_i``,
    ``x_i <- x_i + dt speed (cos phi_i, sin phi_i)  (mod 1)`` (with the new heading).
    ``alignment = 0`` (default) leaves alignment to the agents; ``alignment > 0``
    adds a built-in (continuous-time Vicsek) alignment rule.
    Reward ``P(phi') - action cost``, polarization ``P = |(1/N) sum_j (cos phi_j, sin phi_j)|``.
    Observation [8 (+4)]: ``rho_i, <cos(phi_j - phi_i)>_i, <sin(phi_j - phi_i)>_i,
    <delta_T(x_i, x_j)>_i / r rotated into i's heading frame (2), cos phi_i, sin phi_i,
    t / T``. The own heading (a compass) is there with ``observe_heading=True`` (the
    default); without it [6 (+4)] the agents see only headings relative to their own.

Vicsek, hard partial observation (``swarm:vicsek_hard``)
    Vicsek with ``observe_heading=False`` and ``max_steps = 200`` by default
    (``VicsekHardConfig``): agents see neighbours' headings relative to their own only,
    so a common direction can emerge from local alignment alone (no compass).

Aggregation (``swarm:aggregation``), action_dim 2
    Positions uniform at reset; ``u_i = max_speed * a_i`` (a velocity, per component).
    ``x_i <- x_i + dt u_i + noise sqrt(dt) xi_i  (mod 1)``, ``xi_i ~ N(0, I_2)``.
    Swarm centre on the torus: the circular mean per coordinate,
    ``m_k = arg((1/N) sum_j e^{2 pi i x_jk}) / (2 pi)  (mod 1)``.
    Reward ``-D(x') - action cost``, ``D = (1/N) sum_i |delta_T(m, x_i)|_T``.
    Observation [4 (+4)]: ``rho_i, <delta_T(x_i, x_j)>_i / r (2), t / T``.

Rule features (``spec.rule_features``): the observation entries a mean-field decision
rule reads as an agent's input (an "observation point", every entry in [-1, 1]):
    Kuramoto     (3, 4): the own phase ``cos theta_i, sin theta_i``;
    Vicsek       (5, 6): the own heading ``cos phi_i, sin phi_i``;
    Vicsek hard  (1, 2): the neighbours' mean relative heading;
    Aggregation  (1, 2): the mean displacement to the neighbours, divided by r.

With ``observe_position=True`` every observation also holds
``cos 2 pi x_i1, sin 2 pi x_i1, cos 2 pi x_i2, sin 2 pi x_i2`` (before ``t / T``).

World state (centralized critics) is a fixed-size, N-independent summary of the
empirical distribution (``marl.mean_field`` kernel embeddings, bandwidth
``state_bandwidth``, default one grid cell):
    Kuramoto    [phase_bins + 3]: embedding of ``theta / 2 pi`` on a circle grid,
                ``R cos psi, R sin psi, t / T``.
    Vicsek      [state_bins^2 + phase_bins + 3]: embedding of positions, embedding of
                ``phi / 2 pi``, mean ``(cos phi, sin phi)``, ``t / T``.
    Aggregation [state_bins^2 + 2]: embedding of positions, ``D``, ``t / T``.
(The joint (phase, omega) or (position, heading) distribution is summarized by its
marginals.) ``env.mean_field_points(state)`` returns each task's particle
coordinates on a unit torus (``[N, 1]`` phases / 2 pi; ``[N, 3]`` position and
heading / 2 pi; ``[N, 2]`` positions) for other mean-field representations.

Neighbour statistics
--------------------
``n_i``, ``sum_{j in N_i} delta_T(x_i, x_j)`` and ``sum_{j in N_i} f_j`` (task
features such as ``cos, sin`` of the phase) are computed in one of two fixed-shape ways
(``neighbours="auto"`` picks dense for ``N <= dense_max_agents``):

* dense: all ``N x N`` pairs with masks (memory ``O(N^2)``);
* cell list: the torus is cut into ``G x G`` cells, ``G = min(floor(1 / r), floor(sqrt N))``
  (side ``>= r``, so every neighbour is in the 3 x 3 block of cells around one's
  own); agents are sorted by cell and each cell keeps the indices of its first
  ``cap`` agents (by index) in a ``[G^2, cap]`` table; every agent gathers the 3 x 3
  cells' slots (one ``[N, cap]`` block at a time): memory ``O(N cap + G^2 cap)``.
  ``cap = cell_capacity`` or, if 0, ``ceil(2 lambda) + 8`` with ``lambda = N / G^2``
  (the mean occupancy; a uniform swarm practically never overflows it).

  Overflow: a cell holding ``n_c > cap`` agents keeps ``cap`` of them, each counted
  with weight ``n_c / cap``, so neighbour counts and sums stay unbiased estimates
  (the means become sub-sample means). The number of agents left out of the table
  is reported in ``info["neighbour_overflow"]``. Without overflow both ways give the
  same statistics up to floating-point summation order. Aggregated swarms (the goal
  of ``swarm:aggregation``) concentrate in few cells: raise ``cell_capacity`` when
  exact statistics matter there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from marl import mean_field as mf
from marl.config import ConfigError, check_choice, check_nonnegative, check_positive, check_range
from marl.types import Algorithm, EnvSpec, Timestep

TASKS = ("aggregation", "kuramoto", "vicsek", "vicsek_hard")
TWO_PI = 2.0 * math.pi


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class SwarmConfig:
    """Fields shared by every swarm task (see the module docstring for their role)."""

    num_agents: int = 100
    radius: float = 0.1
    """observation (and local coupling) radius on the unit torus, in (0, 0.5]"""
    max_steps: int = 100
    dt: float = 0.1
    noise: float = 0.1
    """std of the Brownian noise per sqrt(time unit)"""
    action_cost: float = 0.01
    action_bins: int = 0
    """0: continuous actions; B > 0: B^action_dim discrete actions on a grid in [-1, 1]"""
    observe_position: bool = False
    neighbours: str = "auto"
    """auto | dense | cells"""
    dense_max_agents: int = 512
    cell_capacity: int = 0
    """agents stored per cell of the cell list; 0: ceil(2 N / G^2) + 8"""
    state_bins: int = 8
    phase_bins: int = 16
    state_bandwidth: float = 0.0
    """RBF bandwidth of the state embeddings; 0: one grid cell (1 / bins)"""

    def __post_init__(self):
        n = self.num_agents
        if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 2):
            raise ConfigError("num_agents", n, "must be an integer >= 2")
        check_range("radius", self.radius, 0.0, 0.5, lo_open=True)
        check_positive("max_steps", self.max_steps, integer=True)
        check_positive("dt", self.dt)
        check_nonnegative("noise", self.noise)
        check_nonnegative("action_cost", self.action_cost)
        if not (isinstance(self.action_bins, int) and (self.action_bins == 0 or self.action_bins >= 2)):
            raise ConfigError("action_bins", self.action_bins, "must be 0 (continuous) or an integer >= 2")
        check_choice("neighbours", self.neighbours, ("auto", "dense", "cells"))
        check_positive("dense_max_agents", self.dense_max_agents, integer=True)
        if not (isinstance(self.cell_capacity, int) and self.cell_capacity >= 0):
            raise ConfigError("cell_capacity", self.cell_capacity, "must be an integer >= 0 (0: automatic)")
        check_positive("state_bins", self.state_bins, integer=True)
        check_positive("phase_bins", self.phase_bins, integer=True)
        check_nonnegative("state_bandwidth", self.state_bandwidth)


@dataclasses.dataclass(frozen=True)
class KuramotoConfig(SwarmConfig):
    coupling: float = 0.4
    """K; the global model's critical value is sqrt(8 / pi) omega_std (0.80 by default)"""
    coupling_mode: str = "global"
    """global | local"""
    omega_mean: float = 0.0
    omega_std: float = 0.5
    max_rate: float = 1.0
    """phase-velocity control bound"""

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative("coupling", self.coupling)
        check_choice("coupling_mode", self.coupling_mode, ("global", "local"))
        check_nonnegative("omega_std", self.omega_std)
        check_positive("max_rate", self.max_rate)


@dataclasses.dataclass(frozen=True)
class VicsekConfig(SwarmConfig):
    speed: float = 0.1
    max_turn: float = 1.0
    """turn-rate bound (rad per time unit)"""
    alignment: float = 0.0
    """built-in alignment rate (0: none)"""
    observe_heading: bool = True
    """the observation holds the own heading (cos phi_i, sin phi_i); False: relative headings only"""

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.observe_heading, (bool, np.bool_)):
            raise ConfigError("observe_heading", self.observe_heading, "must be True or False")
        check_positive("speed", self.speed)
        check_positive("max_turn", self.max_turn)
        check_nonnegative("alignment", self.alignment)


@dataclasses.dataclass(frozen=True)
class VicsekHardConfig(VicsekConfig):
    """The hard partial-observation Vicsek task: relative headings only, T = 200."""

    observe_heading: bool = False
    max_steps: int = 200


@dataclasses.dataclass(frozen=True)
class AggregationConfig(SwarmConfig):
    max_speed: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_positive("max_speed", self.max_speed)


# ----------------------------------------------------------------------------- neighbours


class NeighbourSums(struct.PyTreeNode):
    """count [N]; disp [N, 2] = sum of delta_T(x_i, x_j); feats [N, F] = sum of f_j; overflow []."""

    count: jax.Array
    disp: jax.Array
    feats: jax.Array
    overflow: jax.Array


def neighbour_sums_dense(pos: jax.Array, feats: jax.Array, radius: float) -> NeighbourSums:
    """All pairs with masks. pos [N, 2], feats [N, F]; memory O(N^2)."""
    n = pos.shape[0]
    delta = mf.torus_delta(pos[:, None, :], pos[None, :, :])  # [N, N, 2], x_j - x_i
    m = (jnp.sum(delta**2, -1) < radius**2) & ~jnp.eye(n, dtype=bool)
    w = m.astype(pos.dtype)
    return NeighbourSums(w.sum(1), jnp.einsum("ij,ijk->ik", w, delta), w @ feats, jnp.zeros((), jnp.int32))


def cell_grid(num_agents: int, radius: float, capacity: int = 0) -> tuple[int, int]:
    """(cells per side G, capacity per cell) of the cell list for N agents and radius r."""
    g = max(1, min(int(math.floor(1.0 / radius)), int(math.isqrt(num_agents))))
    cap = capacity or int(math.ceil(2.0 * num_agents / g**2)) + 8
    return g, min(cap, num_agents)


def neighbour_sums_cells(pos: jax.Array, feats: jax.Array, radius: float, cells: int, capacity: int) -> NeighbourSums:
    """Fixed-capacity cell list (see the module docstring). pos [N, 2], feats [N, F]."""
    n, g, cap = pos.shape[0], cells, capacity
    cxy = jnp.clip(jnp.floor(pos * g).astype(jnp.int32), 0, g - 1)  # [N, 2]
    cid = cxy[:, 0] * g + cxy[:, 1]
    order = jnp.argsort(cid, stable=True)
    counts = jnp.zeros(g * g, jnp.int32).at[cid].add(1)
    start = jnp.cumsum(counts) - counts
    k = jnp.arange(cap, dtype=jnp.int32)
    valid = k[None, :] < counts[:, None]  # [C, cap]
    table = jnp.where(valid, order[jnp.clip(start[:, None] + k[None, :], 0, n - 1)], n)
    kept = jnp.minimum(counts, cap)
    cell_w = (counts / jnp.maximum(kept, 1)).astype(pos.dtype)  # weight of a stored agent
    overflow = jnp.sum(counts - kept)

    # Per-cell slot tables, one [C, cap] array per coordinate and feature (a trailing axis
    # of size 2 vectorizes badly on CPU), so that each stencil offset gathers whole rows.
    cols = jnp.concatenate([pos, feats], 1)
    cols = jnp.concatenate([cols, jnp.zeros((1, cols.shape[1]), cols.dtype)])[table]  # [C, cap, 2 + F]
    slots = [cols[:, :, k] for k in range(cols.shape[2])]
    slot_w = valid.astype(pos.dtype) * cell_w[:, None]  # [C, cap]
    me = jnp.arange(n, dtype=jnp.int32)[:, None]
    x, y = pos[:, 0:1], pos[:, 1:2]
    # offsets mod G, deduplicated: with G < 3 the 3 x 3 block would visit a cell twice
    offs = sorted({o % g for o in (-1, 0, 1)})
    sums = [jnp.zeros(n, pos.dtype) for _ in range(3 + feats.shape[1])]  # count, dx, dy, feats
    for da in offs:
        for db in offs:
            nc = ((cxy[:, 0] + da) % g) * g + (cxy[:, 1] + db) % g  # [N]
            dx = mf.torus_delta(x, slots[0][nc])  # [N, cap]
            dy = mf.torus_delta(y, slots[1][nc])
            near = (dx * dx + dy * dy < radius**2) & (table[nc] != me)
            w = jnp.where(near, slot_w[nc], 0.0)
            terms = [w, w * dx, w * dy] + [w * f[nc] for f in slots[2:]]
            sums = [acc + t.sum(1) for acc, t in zip(sums, terms, strict=True)]
    count, disp = sums[0], jnp.stack(sums[1:3], -1)
    fsum = jnp.stack(sums[3:], -1) if feats.shape[1] else jnp.zeros(feats.shape, feats.dtype)
    return NeighbourSums(count, disp, fsum, overflow.astype(jnp.int32))


# ----------------------------------------------------------------------------- environments


@struct.dataclass
class SwarmState:
    """pos [N, 2] (unit torus); angle [N] (phase or heading in [0, 2 pi); 0 for aggregation);
    omega [N] (natural frequencies; 0 outside Kuramoto); obs [N, obs_dim] (the current
    observation, whose neighbour statistics the next step reuses); t [] int32;
    overflow [] int32 (cell-list agents left out at the current state)."""

    pos: jax.Array
    angle: jax.Array
    omega: jax.Array
    obs: jax.Array
    t: jax.Array
    overflow: jax.Array


class _Swarm:
    """Shared machinery; subclasses define ``_init``, ``_move``, ``_task_obs``, ``_order``, ``_summary``."""

    task: str = ""
    action_dim: int = 1
    task_obs_dim: int = 0
    state_dim: int  # set by each subclass (its upper-level summary's size)

    # the task's pieces, defined by each subclass
    def _init(self, key, state):
        raise NotImplementedError

    def _move(self, key, state, a):
        raise NotImplementedError

    def _task_obs(self, state, mean_disp, mean_feats):
        raise NotImplementedError

    def _summary(self, state):
        raise NotImplementedError

    feat_dim: int = 0  # per-agent features summed over neighbours
    rule_features: tuple[int, ...] = ()  # EnvSpec.rule_features (see the module docstring)

    def __init__(self, config: SwarmConfig):
        self.config = c = config
        n = c.num_agents
        self.num_agents = n
        self.use_cells = c.neighbours == "cells" or (c.neighbours == "auto" and n > c.dense_max_agents)
        self.cells, self.capacity = cell_grid(n, c.radius, c.cell_capacity)
        self.n_ref = max(1.0, (n - 1) * math.pi * c.radius**2)
        self.bw_pos = c.state_bandwidth or 1.0 / c.state_bins
        self.bw_phase = c.state_bandwidth or 1.0 / c.phase_bins
        obs_dim = 1 + self.task_obs_dim + (4 if c.observe_position else 0) + 1  # density, task, [position], t / T
        if c.action_bins:
            levels = np.linspace(-1.0, 1.0, c.action_bins, dtype=np.float32)
            grid = np.array(np.meshgrid(*[levels] * self.action_dim, indexing="ij")).reshape(self.action_dim, -1).T
            self._action_grid = jnp.asarray(grid)  # [B^d, d]
            cost = np.linalg.norm(grid[:, None, :] - grid[None, :, :], axis=-1).astype(np.float32)
            act = dict(num_actions=grid.shape[0], action_cost=cost)
        else:
            act = dict(action_dim=self.action_dim, action_low=-1.0, action_high=1.0)
        self.spec = EnvSpec(
            name=f"swarm:{self.task}",
            num_agents=n,
            obs_dim=obs_dim,
            state_dim=self.state_dim,
            max_steps=c.max_steps,
            rule_features=self.rule_features,
            **act,
        )

    # --- accessors for mean-field code
    def positions(self, state: SwarmState) -> jax.Array:
        """[N, 2] positions on the unit torus."""
        return state.pos

    def angles(self, state: SwarmState) -> jax.Array:
        """[N] phases (Kuramoto) or headings (Vicsek) in [0, 2 pi)."""
        return state.angle

    def mean_field_points(self, state: SwarmState) -> jax.Array:
        """[N, d] particle coordinates on the unit torus that the task's mean field is over."""
        raise NotImplementedError

    def order(self, state: SwarmState) -> jax.Array:
        """[] the task's order statistic of the empirical distribution (reward without action cost)."""
        raise NotImplementedError

    def world_state(self, state: SwarmState) -> jax.Array:
        """[state_dim] fixed-size summary (see the module docstring)."""
        return jnp.concatenate([self._summary(state), (state.t / self.config.max_steps)[None]])

    # --- neighbours and observations
    def neighbour_sums(self, pos: jax.Array, feats: jax.Array) -> NeighbourSums:
        if self.use_cells:
            return neighbour_sums_cells(pos, feats, self.config.radius, self.cells, self.capacity)
        return neighbour_sums_dense(pos, feats, self.config.radius)

    def observe(self, state: SwarmState) -> tuple[jax.Array, jax.Array]:
        """(obs [N, obs_dim], overflow []) of a state (recomputes the neighbour statistics)."""
        s = self.neighbour_sums(state.pos, self._features(state))
        cnt = s.count[:, None]
        mean = lambda v: v / jnp.maximum(cnt, 1.0)  # noqa: E731 (a sum over neighbours -> mean)
        parts = [(s.count / self.n_ref)[:, None], self._task_obs(state, mean(s.disp), mean(s.feats))]
        if self.config.observe_position:
            ang = TWO_PI * state.pos
            parts.append(
                jnp.stack([jnp.cos(ang[:, 0]), jnp.sin(ang[:, 0]), jnp.cos(ang[:, 1]), jnp.sin(ang[:, 1])], -1)
            )
        tt = jnp.full((self.num_agents, 1), state.t / self.config.max_steps, jnp.float32)
        return jnp.concatenate(parts + [tt], -1).astype(jnp.float32), s.overflow

    def _features(self, state):
        return jnp.stack([jnp.cos(state.angle), jnp.sin(state.angle)], -1)

    def _timestep(self, state: SwarmState, reward: jax.Array, done) -> Timestep:
        n = self.num_agents
        na = self.spec.num_actions or 1
        return Timestep(
            obs=state.obs,
            state=self.world_state(state),
            reward=jnp.full((n,), reward, jnp.float32),
            done=jnp.asarray(done, bool),
            terminated=jnp.zeros((), bool),
            avail_actions=jnp.ones((n, na), bool),
            info={"order": self.order(state).astype(jnp.float32), "neighbour_overflow": state.overflow},
        )

    def controls(self, action: jax.Array) -> jax.Array:
        """[N, action_dim] normalized controls in [-1, 1] from an action ([N], [N, d] or indices)."""
        if self.config.action_bins:
            return self._action_grid[jnp.asarray(action).reshape(self.num_agents).astype(jnp.int32)]
        a = jnp.asarray(action, jnp.float32).reshape(self.num_agents, self.action_dim)
        return jnp.clip(a, -1.0, 1.0)

    # --- the contract
    def reset(self, key: jax.Array) -> tuple[SwarmState, Timestep]:
        n = self.num_agents
        z = jnp.zeros(n, jnp.float32)
        state = SwarmState(
            pos=z[:, None].repeat(2, 1),
            angle=z,
            omega=z,
            obs=jnp.zeros((n, self.spec.obs_dim), jnp.float32),
            t=jnp.zeros((), jnp.int32),
            overflow=jnp.zeros((), jnp.int32),
        )
        state = self._init(key, state)
        obs, ovf = self.observe(state)
        state = state.replace(obs=obs, overflow=ovf)
        return state, self._timestep(state, jnp.zeros((), jnp.float32), False)

    def step(self, key: jax.Array, state: SwarmState, action: jax.Array) -> tuple[SwarmState, Timestep]:
        a = self.controls(action)
        new = self._move(key, state, a).replace(t=state.t + 1)
        obs, ovf = self.observe(new)
        new = new.replace(obs=obs, overflow=ovf)
        reward = self.order(new) - self.config.action_cost * jnp.mean(jnp.sum(a**2, -1)) / self.action_dim
        return new, self._timestep(new, reward, new.t >= self.config.max_steps)

    def _noise(self, key, shape):
        c = self.config
        return c.noise * math.sqrt(c.dt) * jax.random.normal(key, shape)

    @property
    def unwrapped(self):
        return self


def _order_complex(angle: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.mean(jnp.cos(angle)), jnp.mean(jnp.sin(angle))


def _relative_angle_means(angle, mean_feats):
    """<cos(a_j - a_i)>, <sin(a_j - a_i)> from the neighbour means of (cos a_j, sin a_j)."""
    c, s = jnp.cos(angle), jnp.sin(angle)
    mc, ms = mean_feats[:, 0], mean_feats[:, 1]
    return c * mc + s * ms, c * ms - s * mc


class Kuramoto(_Swarm):
    task, action_dim, task_obs_dim = "kuramoto", 1, 5
    rule_features = (3, 4)  # cos theta_i, sin theta_i

    @property
    def state_dim(self):
        return self.config.phase_bins + 3

    def _init(self, key, state):
        c = self.config
        kp, ka, kw = jax.random.split(key, 3)
        n = self.num_agents
        return state.replace(
            pos=jax.random.uniform(kp, (n, 2)),
            angle=jax.random.uniform(ka, (n,), maxval=TWO_PI),
            omega=c.omega_mean + c.omega_std * jax.random.normal(kw, (n,)),
        )

    def _task_obs(self, state, mean_disp, mean_feats):
        rc, rs = _relative_angle_means(state.angle, mean_feats)
        return jnp.stack([rc, rs, jnp.cos(state.angle), jnp.sin(state.angle), state.omega], -1)

    def _move(self, key, state, a):
        c = self.config
        th = state.angle
        if c.coupling_mode == "global":
            mc, ms = _order_complex(th)
            coup = ms * jnp.cos(th) - mc * jnp.sin(th)  # R sin(psi - theta)
        else:
            coup = state.obs[:, 2]  # <sin(theta_j - theta_i)>_i of the current state
        dth = c.dt * (state.omega + c.max_rate * a[:, 0] + c.coupling * coup) + self._noise(key, th.shape)
        return state.replace(angle=jnp.mod(th + dth, TWO_PI))

    def order(self, state):
        mc, ms = _order_complex(state.angle)
        return jnp.sqrt(mc**2 + ms**2)

    def mean_field_points(self, state):
        return (state.angle / TWO_PI)[:, None]

    def _summary(self, state):
        mc, ms = _order_complex(state.angle)
        emb = mf.grid_embedding(self.mean_field_points(state), self.config.phase_bins, self.bw_phase)
        return jnp.concatenate([emb, jnp.stack([mc, ms])])


class Vicsek(_Swarm):
    task, action_dim = "vicsek", 1

    @property
    def task_obs_dim(self):
        return 6 if self.config.observe_heading else 4

    @property
    def rule_features(self):
        return (5, 6) if self.config.observe_heading else (1, 2)

    @property
    def state_dim(self):
        return self.config.state_bins**2 + self.config.phase_bins + 3

    def _init(self, key, state):
        kp, ka = jax.random.split(key)
        n = self.num_agents
        return state.replace(pos=jax.random.uniform(kp, (n, 2)), angle=jax.random.uniform(ka, (n,), maxval=TWO_PI))

    def _task_obs(self, state, mean_disp, mean_feats):
        rc, rs = _relative_angle_means(state.angle, mean_feats)
        c, s = jnp.cos(state.angle), jnp.sin(state.angle)
        fwd = (c * mean_disp[:, 0] + s * mean_disp[:, 1]) / self.config.radius
        left = (-s * mean_disp[:, 0] + c * mean_disp[:, 1]) / self.config.radius
        return jnp.stack([rc, rs, fwd, left] + ([c, s] if self.config.observe_heading else []), -1)

    def _move(self, key, state, a):
        c = self.config
        turn = c.max_turn * a[:, 0] + c.alignment * state.obs[:, 2]  # obs[:, 2] = <sin(phi_j - phi_i)>_i
        phi = jnp.mod(state.angle + c.dt * turn + self._noise(key, state.angle.shape), TWO_PI)
        vel = c.speed * jnp.stack([jnp.cos(phi), jnp.sin(phi)], -1)
        return state.replace(angle=phi, pos=mf.wrap01(state.pos + c.dt * vel))

    def order(self, state):
        mc, ms = _order_complex(state.angle)
        return jnp.sqrt(mc**2 + ms**2)

    def mean_field_points(self, state):
        return jnp.concatenate([state.pos, (state.angle / TWO_PI)[:, None]], -1)

    def _summary(self, state):
        c = self.config
        mc, ms = _order_complex(state.angle)
        return jnp.concatenate(
            [
                mf.grid_embedding(state.pos, c.state_bins, self.bw_pos),
                mf.grid_embedding((state.angle / TWO_PI)[:, None], c.phase_bins, self.bw_phase),
                jnp.stack([mc, ms]),
            ]
        )


class VicsekHard(Vicsek):
    task = "vicsek_hard"


def swarm_centre(pos: jax.Array) -> jax.Array:
    """[2] circular mean of positions on the unit torus, per coordinate."""
    ang = TWO_PI * pos
    return mf.wrap01(jnp.arctan2(jnp.mean(jnp.sin(ang), 0), jnp.mean(jnp.cos(ang), 0)) / TWO_PI)


class Aggregation(_Swarm):
    task, action_dim, task_obs_dim = "aggregation", 2, 2
    rule_features = (1, 2)  # <delta_T(x_i, x_j)>_i / r

    @property
    def state_dim(self):
        return self.config.state_bins**2 + 2

    def _features(self, state):
        return jnp.zeros((self.num_agents, 0), jnp.float32)

    def _init(self, key, state):
        return state.replace(pos=jax.random.uniform(key, (self.num_agents, 2)))

    def _task_obs(self, state, mean_disp, mean_feats):
        return mean_disp / self.config.radius

    def _move(self, key, state, a):
        c = self.config
        step = c.dt * c.max_speed * a + self._noise(key, state.pos.shape)
        return state.replace(pos=mf.wrap01(state.pos + step))

    def mean_distance(self, state):
        """[] mean torus distance to the swarm centre."""
        d = mf.torus_delta(swarm_centre(state.pos)[None, :], state.pos)
        return jnp.mean(jnp.sqrt(jnp.sum(d**2, -1)))

    def order(self, state):
        return -self.mean_distance(state)

    def mean_field_points(self, state):
        return state.pos

    def _summary(self, state):
        emb = mf.grid_embedding(state.pos, self.config.state_bins, self.bw_pos)
        return jnp.concatenate([emb, self.mean_distance(state)[None]])


_CLASSES = {
    "kuramoto": (Kuramoto, KuramotoConfig),
    "vicsek": (Vicsek, VicsekConfig),
    "vicsek_hard": (VicsekHard, VicsekHardConfig),
    "aggregation": (Aggregation, AggregationConfig),
}


def make_swarm(task: str, config: Optional[SwarmConfig] = None, **kwargs: Any) -> _Swarm:
    """An unwrapped swarm environment: ``make_swarm("vicsek", num_agents=1000, noise=0.3)``.

    ``kwargs`` are fields of the task's config class (``KuramotoConfig``, ``VicsekConfig``,
    ``AggregationConfig``); a bad name or value raises ``ConfigError``.
    """
    if task not in _CLASSES:
        raise ConfigError("task", task, f"must be one of {sorted(_CLASSES)}")
    cls, cfg_cls = _CLASSES[task]
    if config is None:
        allowed = {f.name for f in dataclasses.fields(cfg_cls)}
        for k, v in kwargs.items():
            if k not in allowed:
                raise ConfigError(k, v, f"unknown {cfg_cls.__name__} field; allowed: {sorted(allowed)}")
        config = cfg_cls(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    if not isinstance(config, cfg_cls):
        raise ConfigError("config", type(config).__name__, f"must be a {cfg_cls.__name__} for task {task!r}")
    return cls(config)  # type: ignore[arg-type]  # checked just above


# ----------------------------------------------------------------------------- reference policies

REFERENCE_POLICIES = {
    "zero": ("aggregation", "kuramoto", "vicsek", "vicsek_hard"),
    "local_alignment": ("kuramoto", "vicsek", "vicsek_hard"),
    "compass": ("vicsek", "vicsek_hard"),
    "mean_phase": ("kuramoto",),
    "local_mean": ("aggregation",),
}
"""Hand-coded policies per task (see :func:`reference_actions`)."""

REFERENCE_GAIN = 5.0


def reference_names(swarm) -> list[str]:
    """The reference policies that apply to a swarm (unwrapped or wrapped) as configured."""
    swarm = getattr(swarm, "unwrapped", swarm)
    names = [k for k, tasks in REFERENCE_POLICIES.items() if swarm.task in tasks]
    if not getattr(swarm.config, "observe_heading", True):
        names = [k for k in names if k != "compass"]
    return names


def _check_reference(swarm, kind: str) -> None:
    if kind not in reference_names(swarm):
        raise ConfigError(
            "kind", kind, f"reference policies of swarm:{swarm.task} (as configured) are {reference_names(swarm)}"
        )


def reference_actions(swarm, kind: str, obs: jax.Array, state: jax.Array, gain: float = REFERENCE_GAIN) -> jax.Array:
    """``[N, action_dim]`` actions in [-1, 1] of a hand-coded policy (proportional control,
    ``clip(gain * error, -1, 1)``) from the agents' observations ``obs [N, obs_dim]``
    and, for ``mean_phase`` only, the world state ``state`` (the broadcast mean field):

    zero             ``a_i = 0``.
    local_alignment  turn toward the neighbours' mean phase / heading: error
                     ``<sin(a_j - a_i)>_i`` (obs[2]); decentralized, relative features only.
    compass          Vicsek with the own heading: turn toward heading 0, error ``-sin phi_i``.
    mean_phase       Kuramoto: toward the swarm's mean phase psi, error ``sin(psi - theta_i)``
                     (psi from the world state's ``R cos psi, R sin psi``, as a mean-field
                     policy would receive it).
    local_mean       Aggregation: move toward the neighbours' mean position, error
                     ``<delta_T(x_i, x_j)>_i / r``.
    """
    swarm = getattr(swarm, "unwrapped", swarm)
    _check_reference(swarm, kind)
    n, d = swarm.num_agents, swarm.action_dim
    if kind == "zero":
        err = jnp.zeros((n, d), jnp.float32)
    elif kind == "local_alignment":
        err = obs[:, 2:3]
    elif kind == "compass":
        err = -obs[:, 6:7]
    elif kind == "mean_phase":
        mc, ms = state[swarm.config.phase_bins], state[swarm.config.phase_bins + 1]
        err = ((ms * obs[:, 3] - mc * obs[:, 4]) / jnp.maximum(jnp.hypot(mc, ms), 1e-6))[:, None]
    else:  # local_mean
        err = obs[:, 1:3]
    return jnp.clip(gain * err, -1.0, 1.0)


def reference_policy(env, kind: str, gain: float = REFERENCE_GAIN) -> Algorithm:
    """A hand-coded policy as an evaluable ``Algorithm`` (``marl.evaluation.evaluate(algo,
    {}, key)``): no parameters, no learning (``update`` is the identity). ``env``: a swarm as
    ``envs.make`` returns it (wrapped with auto-reset and episode statistics)."""
    swarm = getattr(env, "unwrapped", env)
    if not isinstance(swarm, _Swarm):
        raise ConfigError("env", getattr(env.spec, "name", env), "reference policies need a swarm:* environment")
    _check_reference(swarm, kind)
    check_positive("gain", gain)
    if env is swarm:
        from envs.wrappers import AutoReset, EpisodeStats

        env = EpisodeStats(AutoReset(swarm))

    def act(params, ts: Timestep, carry, key, greedy=False):
        fn = lambda o, s: reference_actions(swarm, kind, o, s, gain)  # noqa: E731
        for _ in range(ts.obs.ndim - 2):  # leading batch axes
            fn = jax.vmap(fn)
        return fn(ts.obs, ts.state), carry

    return Algorithm(
        f"reference:{kind}",
        {"kind": kind, "gain": gain},
        env,
        lambda key: {},
        lambda s: (s, {}),
        act,
        lambda batch_shape=(): jnp.zeros(batch_shape, jnp.int32),
        0,
    )
