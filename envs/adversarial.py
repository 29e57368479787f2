"""Two-player zero-sum continuous-control tasks in pure JAX (robust / adversarial RL).

Agent 0 is the *protagonist*: it controls the system. Agent 1 is the *adversary*:
it applies a bounded disturbance force to a named body. Rewards are zero-sum,
``reward = [r, -r]``. Agents are an array axis, as everywhere in this project.

Tasks (``envs.make("adv:<task>")``)
-----------------------------------
``adv:pendulum``  gym's Pendulum swing-up (g = 10, m = l = 1, dt = 0.05, torque
    <= 2, speed <= 8, cost ``angle^2 + 0.1 thdot^2 + 0.001 u^2`` on the state before
    the step, 200 steps, start ``theta ~ U(-pi, pi)``, ``thdot ~ U(-1, 1)``).
    Adversary: a horizontal force on the pole tip, ``|F| <= 0.5`` N (torque
    ``F l cos(theta)``). Deviation from gym: a viscous joint damping
    ``0.05 * friction_scale`` N m s (gym has none; a robustness grid needs a friction
    to scale).
``adv:cartpole``  cart-pole *balance* (gym's CartPole constants: cart 1 kg, pole 0.1 kg,
    half-length 0.5 m, dt = 0.02, semi-implicit Euler) with a continuous cart force
    ``<= 10`` N, reward 1 per step, terminated when ``|x| > 2.4`` or
    ``|theta| > 12 deg``, 500 steps. Balance rather than swing-up: cheap to learn,
    and its failure (falling, a termination) is a clear aim for the adversary.
    Adversary: a horizontal force on the pole tip, ``|F| <= 0.1`` N. The pole is light:
    against a constant tip force ``F`` (countered at the cart) the pole can only rest
    tilted by ``atan(2 F / (m g))``, so ``F > 0.104`` N cannot be held inside the 12 deg
    termination: the bound at scale 1 is at that limit, and scales 1.5-2 are beyond it,
    like the reference setup (dm_control cart-pole, 2 N at the centre of a 0.1 kg pole:
    about twice what its 10 N cart can counter; dm_control does not terminate, its
    smooth upright reward still pays a tilted pole). Viscous friction: cart
    ``0.5 * friction_scale`` N s/m, hinge ``0.01 * friction_scale`` N m s. Stress grid:
    pole mass 0.1-20 kg (``mass_scale`` 1-200, the reference's 1-20 kg pole range plus
    the nominal) x cart mass 0.5-5 kg (``cart_mass_scale``), both log-spaced.
``adv:pointmass`` a 2-D point mass (1 kg, viscous friction ``1.0 * friction_scale``)
    in ``[-1, 1]^2`` must pass a wall at ``x = 0`` (half-thickness 0.05) through
    a gap ``|y| < 0.15`` to the goal ``(0.75, 0)`` (radius 0.1). Start
    ``(-0.75 + U(-0.05, 0.05), U(-0.6, 0.6))`` at rest; force ``<= 1`` N per axis,
    dt = 0.05, 200 steps, reward ``-||p - goal||`` per step, terminated at the goal.
    The wall is inelastic (the normal velocity is zeroed). Adversary: a "wind" force
    ``<= 0.3`` N per axis.

The protagonist's return is ``reward[..., 0]``. Note that the generic
``EpisodeStats`` return is the mean over agents, which is 0 for a zero-sum game.

Action layout
-------------
Actions are normalized: ``action [A, action_dim]`` in ``[-1, 1]`` (``spec.action_low``/
``action_high``), clipped there, then scaled by each player's bound, so no action,
however large, exceeds a bound. ``action_dim = max(protagonist_dim, adversary_dim)``;
each player reads the *first* ``protagonist_dim`` / ``adversary_dim`` entries of
its row and ignores the rest (in the three tasks here both sizes are equal: 1, 1
and 2). ``info["adversary_force"]`` holds the disturbance actually applied,
in physical units.

Physical parameters and robustness grids
----------------------------------------
:class:`PhysicsParams` (``mass_scale``, ``friction_scale``, ``adversary_scale``,
``cart_mass_scale``) multiplies the nominal mass of the named body (pendulum: the pole;
cart-pole: the pole; point mass: the mass), the nominal friction coefficients, the
adversary's force bound, and cart-pole's cart mass (the other tasks ignore it). Each
task names its robustness grid, ``stress_axes`` (``stress_grid(n)`` gives the values):
mass x0.35-2.8 x friction x0-5 by default, pole x cart mass for cart-pole; and the
per-step bounds of the protagonist's reward, ``reward_range`` (pendulum: -16.27..0,
cart-pole: 0..1, point mass: -2.02..0), from which QARL sets its threshold. The
parameters belong to the environment object (so auto-reset keeps them) and are
arrays inside the traced step, so they may be tracers::

    from envs.adversarial import with_params
    env = envs.make("adv:pendulum")
    def episode(mass, friction, key):
        e = with_params(env, mass_scale=mass, friction_scale=friction, adversary_scale=0.0)
        ...  # reset/step e in a lax.scan
    jax.vmap(episode)(masses, frictions, keys)        # a whole grid in one program

:func:`with_params` works on a wrapped environment (``envs.make``'s
``EpisodeStats(AutoReset(env))``) and returns the same wrappers around the new
environment; ``env.unwrapped.with_params(...)`` does the same for a bare one.
``envs.make("adv:pendulum", mass_scale=2.0)`` sets them at construction.

Without the adversary
---------------------
- ``with_params(env, adversary_scale=0.0)``: still two agents, the adversary's
  action has no effect (evaluate a protagonist trained in the game, "return without
  adversary"; vmappable like the other parameters).
- ``adv:<task>-noadv`` (or ``envs.make("adv:<task>", adversary=False)``): the
  protagonist alone, a single-agent environment (``num_agents = 1``,
  ``reward = [r]``) with the same dynamics and observations; a plain single-agent
  benchmark for SAC.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from marl.config import ConfigError
from marl.types import EnvSpec, Timestep

__all__ = [
    "PhysicsParams",
    "EnvState",
    "AdversarialEnv",
    "Pendulum",
    "CartPole",
    "PointMass",
    "TASKS",
    "names",
    "make",
    "with_params",
]


class PhysicsParams(struct.PyTreeNode):
    """Multipliers of the nominal physics (each a float or a ``[]`` array; may be traced)."""

    mass_scale: Union[float, jax.Array] = 1.0
    friction_scale: Union[float, jax.Array] = 1.0
    adversary_scale: Union[float, jax.Array] = 1.0
    cart_mass_scale: Union[float, jax.Array] = 1.0
    """cart-pole's cart; the other tasks have no second body and ignore it"""


PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(PhysicsParams))
_PARAM_LOWER = {
    "mass_scale": (0.0, True),
    "friction_scale": (0.0, False),
    "adversary_scale": (0.0, False),
    "cart_mass_scale": (0.0, True),
}


def log_grid(lo: float, hi: float, n: int = 11) -> tuple[float, ...]:
    """``n`` values log-spaced from ``lo`` to ``hi`` (rounded to 3 decimals)."""
    return tuple(float(x) for x in np.round(np.exp(np.linspace(np.log(lo), np.log(hi), n)), 3))


def lin_grid(lo: float, hi: float, n: int = 11) -> tuple[float, ...]:
    return tuple(float(x) for x in np.round(np.linspace(lo, hi, n), 3))


# the default stress grid: the named body's mass x0.35..x2.8 (log-spaced, 1 in the middle), friction x0..x5
DEFAULT_STRESS = (("mass_scale", 2.0**-1.5, 2.0**1.5, "log"), ("friction_scale", 0.0, 5.0, "lin"))


def _check_param(name: str, value) -> None:
    if name not in PARAM_FIELDS:
        raise ConfigError(name, value, f"unknown physics parameter; allowed: {list(PARAM_FIELDS)}")
    if isinstance(value, jax.core.Tracer):
        return  # traced (vmapped grid): cannot be checked here
    v = np.asarray(value)
    lo, strict = _PARAM_LOWER[name]
    if v.dtype == bool or not np.issubdtype(v.dtype, np.number) or not np.all(np.isfinite(v)):
        raise ConfigError(name, value, "must be a finite number")
    if np.any(v <= lo) if strict else np.any(v < lo):
        raise ConfigError(name, value, f"must be {'>' if strict else '>='} {lo}")


class EnvState(struct.PyTreeNode):
    q: jax.Array  # [n] generalized positions and velocities of the task
    t: jax.Array  # [] int32, steps taken in this episode


class AdversarialEnv:
    """Base class: the agent axis, action clipping and scaling, zero-sum rewards.

    Subclasses set the class attributes and implement ``_reset_q``, ``_obs`` and
    ``_dynamics(q, u, f, p) -> (q_next, r, terminated, won)`` for a protagonist
    control ``u [protagonist_dim]`` and a disturbance ``f [adversary_dim]``, both in
    physical units and already within their bounds.
    """

    task: str = ""
    obs_dim: int = 0
    protagonist_dim: int = 1
    adversary_dim: int = 1
    max_steps: int = 200
    control_max: float = 1.0  # protagonist: action 1 -> this many N (or N m)
    force_max: float = 1.0  # adversary bound at adversary_scale = 1
    reward_range: tuple[float, float] = (0.0, 1.0)
    """per-step bounds of the protagonist's reward (QARL's threshold is a fraction of the discounted range)"""
    stress_axes = DEFAULT_STRESS
    """the robustness grid: two (PhysicsParams field, low, high, "log" | "lin") axes"""

    @classmethod
    def stress_grid(cls, n: int = 11):
        """The robustness grid's two axes ``((field, values), (field, values))``, ``n``
        values each over the task's ``stress_axes`` ranges."""
        spaced = {"log": log_grid, "lin": lin_grid}
        return tuple((field, spaced[spacing](lo, hi, n)) for field, lo, hi, spacing in cls.stress_axes)

    def __init__(self, adversary: bool = True, params: Optional[PhysicsParams] = None, **param_values):
        if not isinstance(adversary, bool):
            raise ConfigError("adversary", adversary, "must be a bool")
        self.adversary = adversary
        params = PhysicsParams() if params is None else params
        for k, v in param_values.items():
            _check_param(k, v)
        self.params = params.replace(**param_values)
        num_agents = 2 if adversary else 1
        action_dim = max(self.protagonist_dim, self.adversary_dim) if adversary else self.protagonist_dim
        self.spec = EnvSpec(
            name=f"adv:{self.task}" + ("" if adversary else "-noadv"),
            num_agents=num_agents,
            obs_dim=self.obs_dim,
            state_dim=self.obs_dim,
            max_steps=self.max_steps,
            action_dim=action_dim,
            action_low=-1.0,
            action_high=1.0,
        )

    @property
    def unwrapped(self):
        return self

    def with_params(self, **values) -> "AdversarialEnv":
        """A copy of this environment with some :class:`PhysicsParams` replaced."""
        for k, v in values.items():
            _check_param(k, v)
        new = copy.copy(self)
        new.params = self.params.replace(**values)
        return new

    # ------------------------------------------------------------------ contract
    def reset(self, key):
        q = self._reset_q(key)
        obs = self._obs(q)
        no = jnp.zeros((), bool)
        ts = self._timestep(obs, jnp.zeros((self.spec.num_agents,)), no, no, jnp.zeros((self.adversary_dim,)), no)
        return EnvState(q, jnp.zeros((), jnp.int32)), ts

    def step(self, key, state: EnvState, action):
        """``action [A, action_dim]`` in [-1, 1] (clipped); returns zero-sum rewards."""
        del key  # the dynamics are deterministic
        p = self.params
        a = jnp.clip(jnp.asarray(action, jnp.float32), -1.0, 1.0)
        u = a[0, : self.protagonist_dim] * self.control_max
        if self.adversary:
            bound = self.force_max * jnp.asarray(p.adversary_scale, jnp.float32)
            f = a[1, : self.adversary_dim] * bound
        else:
            f = jnp.zeros((self.adversary_dim,), jnp.float32)
        q, r, terminated, won = self._dynamics(state.q, u, f, p)
        t = state.t + 1
        done = terminated | (t >= self.max_steps)
        reward = jnp.stack([r, -r]) if self.adversary else r[None]
        ts = self._timestep(self._obs(q), reward, done, terminated, f, won & done)
        return EnvState(q, t), ts

    def _timestep(self, obs, reward, done, terminated, force, won) -> Timestep:
        A = self.spec.num_agents
        obs = jnp.broadcast_to(obs.astype(jnp.float32), (A, self.obs_dim))
        return Timestep(
            obs=obs,
            state=obs[0],
            reward=reward.astype(jnp.float32),
            done=jnp.asarray(done, bool),
            terminated=jnp.asarray(terminated, bool),
            avail_actions=jnp.ones((A, 1), bool),
            info={"adversary_force": force.astype(jnp.float32), "won": jnp.asarray(won, bool)},
        )

    # ------------------------------------------------------------------ task hooks
    def _reset_q(self, key):
        raise NotImplementedError

    def _obs(self, q):
        raise NotImplementedError

    def _dynamics(self, q, u, f, p: PhysicsParams):
        raise NotImplementedError


def _angle_normalize(x):
    return ((x + jnp.pi) % (2 * jnp.pi)) - jnp.pi


class Pendulum(AdversarialEnv):
    """gym Pendulum swing-up; theta = 0 is upright. q = [theta, theta_dot]."""

    task = "pendulum"
    obs_dim = 3
    max_steps = 200
    control_max = 2.0
    force_max = 0.5
    reward_range = (-(math.pi**2 + 0.1 * 8.0**2 + 0.001 * 2.0**2), 0.0)
    g, mass, length, dt, max_speed, damping = 10.0, 1.0, 1.0, 0.05, 8.0, 0.05

    def _reset_q(self, key):
        return jax.random.uniform(key, (2,), minval=jnp.array([-jnp.pi, -1.0]), maxval=jnp.array([jnp.pi, 1.0]))

    def _obs(self, q):
        return jnp.stack([jnp.cos(q[0]), jnp.sin(q[0]), q[1]])

    def _dynamics(self, q, u, f, p):
        th, thdot = q[0], q[1]
        m, length = self.mass * p.mass_scale, self.length
        u = u[0]
        torque = u + f[0] * length * jnp.cos(th) - self.damping * p.friction_scale * thdot
        cost = _angle_normalize(th) ** 2 + 0.1 * thdot**2 + 0.001 * u**2
        thdot = thdot + (3 * self.g / (2 * length) * jnp.sin(th) + 3.0 / (m * length**2) * torque) * self.dt
        thdot = jnp.clip(thdot, -self.max_speed, self.max_speed)
        th = th + thdot * self.dt
        won = jnp.abs(_angle_normalize(th)) < 0.2
        return jnp.stack([th, thdot]), -cost, jnp.zeros((), bool), won


class CartPole(AdversarialEnv):
    """Cart-pole balance with a continuous cart force. q = [x, theta, x_dot, theta_dot]."""

    task = "cartpole"
    obs_dim = 5
    max_steps = 500
    control_max = 10.0
    force_max = 0.1
    # pole mass 0.1 .. 20 kg (x1 .. x200: nominal up to the official grid's 20 kg), cart mass 0.5 .. 5 kg
    stress_axes = (("mass_scale", 1.0, 200.0, "log"), ("cart_mass_scale", 0.5, 5.0, "log"))
    g, cart_mass, pole_mass, half_length, dt = 9.8, 1.0, 0.1, 0.5, 0.02
    cart_friction, pole_friction = 0.5, 0.01
    x_limit, theta_limit = 2.4, 12 * 2 * math.pi / 360

    def _reset_q(self, key):
        return jax.random.uniform(key, (4,), minval=-0.05, maxval=0.05)

    def _obs(self, q):
        x, th, xd, thd = q
        return jnp.stack([x, jnp.cos(th), jnp.sin(th), xd, thd])

    def _dynamics(self, q, u, f, p):
        x, th, xd, thd = q
        M, m, h = self.cart_mass * p.cart_mass_scale, self.pole_mass * p.mass_scale, self.half_length
        sin, cos = jnp.sin(th), jnp.cos(th)
        # generalized forces; the tip (at 2 h from the hinge) takes the horizontal force f
        qx = u[0] + f[0] - self.cart_friction * p.friction_scale * xd + m * h * sin * thd**2
        qth = f[0] * 2 * h * cos - self.pole_friction * p.friction_scale * thd + m * self.g * h * sin
        # [[M + m, m h cos], [m h cos, 4/3 m h^2]] @ [xdd, thdd] = [qx, qth]   (h: half-length)
        a, b, d = M + m, m * h * cos, 4.0 / 3.0 * m * h**2
        det = a * d - b * b
        xdd = (d * qx - b * qth) / det
        thdd = (a * qth - b * qx) / det
        xd = xd + self.dt * xdd
        thd = thd + self.dt * thdd
        x = x + self.dt * xd
        th = th + self.dt * thd
        fallen = (jnp.abs(x) > self.x_limit) | (jnp.abs(th) > self.theta_limit)
        return jnp.stack([x, th, xd, thd]), jnp.ones((), jnp.float32), fallen, ~fallen


class PointMass(AdversarialEnv):
    """Point mass through a gap in a wall, with wind. q = [x, y, vx, vy]."""

    task = "pointmass"
    obs_dim = 4
    protagonist_dim = 2
    adversary_dim = 2
    max_steps = 200
    control_max = 1.0
    force_max = 0.3
    reward_range = (-math.hypot(1.75, 1.0), 0.0)  # the arena's farthest point from the goal
    mass, friction, dt = 1.0, 1.0, 0.05
    wall_half_width, gap_half_width = 0.05, 0.15
    goal, goal_radius = (0.75, 0.0), 0.1

    def _reset_q(self, key):
        k1, k2 = jax.random.split(key)
        x = -0.75 + jax.random.uniform(k1, (), minval=-0.05, maxval=0.05)
        y = jax.random.uniform(k2, (), minval=-0.6, maxval=0.6)
        return jnp.stack([x, y, 0.0, 0.0])

    def _obs(self, q):
        return q

    def _dynamics(self, q, u, f, p):
        x0, y0, vx, vy = q
        m = self.mass * p.mass_scale
        acc = (u + f - self.friction * p.friction_scale * jnp.stack([vx, vy])) / m
        vx, vy = vx + self.dt * acc[0], vy + self.dt * acc[1]
        x1, y1 = x0 + self.dt * vx, y0 + self.dt * vy
        # the wall occupies |x| < w except the gap |y| < g: stop at its face when the
        # segment enters it outside the gap; inside the gap, the gap's sides bound y
        w, g = self.wall_half_width, self.gap_half_width
        from_left, from_right = (x0 <= -w) & (x1 > -w), (x0 >= w) & (x1 < w)
        face = jnp.where(from_left, -w, w)
        s = (face - x0) / jnp.where(x1 == x0, 1.0, x1 - x0)
        blocked = (from_left | from_right) & (jnp.abs(y0 + s * (y1 - y0)) >= g)
        x1 = jnp.where(blocked, face, x1)
        vx = jnp.where(blocked, 0.0, vx)
        in_gap = jnp.abs(x1) < w
        y_in = jnp.clip(y1, -g, g)
        vy = jnp.where(in_gap & (y_in != y1), 0.0, vy)
        y1 = jnp.where(in_gap, y_in, y1)
        # arena walls
        xc, yc = jnp.clip(x1, -1.0, 1.0), jnp.clip(y1, -1.0, 1.0)
        vx, vy = jnp.where(xc != x1, 0.0, vx), jnp.where(yc != y1, 0.0, vy)
        dist = jnp.hypot(xc - self.goal[0], yc - self.goal[1])
        reached = dist < self.goal_radius
        return jnp.stack([xc, yc, vx, vy]), -dist, reached, reached


TASKS = {cls.task: cls for cls in (Pendulum, CartPole, PointMass)}


def names() -> list[str]:
    """The registered names after ``adv:``: each task and its ``-noadv`` variant."""
    return sorted(list(TASKS) + [t + "-noadv" for t in TASKS])


def make(task: str, adversary: Optional[bool] = None, **params) -> AdversarialEnv:
    """A bare task by name (``"pendulum"``, ``"cartpole-noadv"``, ...).

    ``params``: :class:`PhysicsParams` fields. ``adversary=False`` (or the ``-noadv``
    suffix) gives the single-agent protagonist-alone environment.
    """
    base, noadv = (task[: -len("-noadv")], True) if task.endswith("-noadv") else (task, False)
    if base not in TASKS:
        raise ConfigError("task", task, f"unknown adversarial task; allowed: {names()}")
    if noadv and adversary:
        raise ConfigError("adversary", adversary, f"must be False (or unset) for {task!r}")
    adversary = (not noadv) if adversary is None else adversary
    return TASKS[base](adversary=adversary, **params)


def with_params(env, **values):
    """``env`` (bare or wrapped) with some :class:`PhysicsParams` replaced; the values
    may be tracers (vmap a grid of parameters). Wrappers are kept."""
    inner = getattr(env, "_env", None)
    if inner is None:
        if not isinstance(env, AdversarialEnv):
            raise ConfigError(
                "env",
                getattr(getattr(env, "spec", None), "name", env),
                "has no physics parameters; use an adv:<task> environment",
            )
        return env.with_params(**values)
    new = object.__new__(type(env))  # copy.copy would probe the wrapper's __getattr__ before _env exists
    new.__dict__.update(env.__dict__, _env=with_params(inner, **values))
    return new
