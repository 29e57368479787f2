"""Adversarial MuJoCo locomotion in MJX (``mujoco-mjx``): ``adv:cheetah``, ``adv:hopper``.

The same contract as ``envs/adversarial.py`` (its :class:`AdversarialEnv` base class:
agent 0 the protagonist driving the motors, agent 1 the adversary; zero-sum rewards
``[r, -r]``; normalized actions in [-1, 1] scaled by each player's bound;
:class:`PhysicsParams` ``mass_scale``, ``friction_scale``, ``adversary_scale`` that may
be tracers, so ``vmap`` over ``with_params`` batches a robustness grid; the
``-noadv`` single-agent variants). The simulator state in ``EnvState.q`` is an
``mjx.Data``.

Adversary: a force ``(f_x, f_z)`` in the sagittal plane at the centre of mass of each
of its named bodies, written to ``data.xfrc_applied`` (world frame, zeroed every step),
each component bounded by ``force_max * adversary_scale``.

Physics parameters: ``mass_scale`` multiplies the mass *and* the rotational inertia of
the ``mass_bodies`` (the torso; its density is scaled); ``friction_scale`` multiplies
the sliding friction of every geom (MuJoCo uses the larger of two geoms' frictions
for a contact, so this scales every contact's friction). Derived constants that
``mjx.put_model`` computes once (e.g. subtree masses used only for diagnostics,
constraint regularization from the nominal inertia) are not recomputed: the usual
domain-randomization approximation.

Models: compact MJCF written here (planar cheetah and hopper in the spirit of the
classic gym / dm_control models: capsule limbs, hinge joints with limits, motors,
a plane; limbs collide only with the floor). Few solver iterations keep MJX cheap on
a CPU.

``adv:cheetah``  6 motors, adversary on torso, back foot, front foot (6 force
    components, ``|f| <= 5`` N each); timestep 0.01 s x 5 substeps; 1000 steps;
    reward ``clip(v_x / 10, 0, 1)`` (dm_control's run reward; forward speed of the
    torso); never terminates. Observation: joint positions without the root x, and all
    velocities (17). ``won``: the torso is upright at the end.
``adv:hopper``   3 motors, adversary on torso and foot (4 components, ``|f| <= 3`` N);
    timestep 0.005 s x 2 substeps; 1000 steps; reward ``v_x + 1 - 1e-3 |u|^2`` (gym's
    hopper: forward speed and an alive bonus); terminated when the torso falls below
    0.7 m, tilts more than 0.2 rad, or the state leaves [-100, 100]. Observation: joint
    positions without root x, velocities clipped to [-10, 10] (11). ``won``: survived.

Reward range and stress grid (QARL's threshold and robustness test): ``reward_range``
is (0, 1) for both, cheetah's exact bounds and hopper's alive bonus (its forward speed
adds to it), so QARL's default xi (10% of the discounted range for cheetah, 1% for
hopper) is the reference's 10 and 1. The stress grid is the default torso mass x0.35-2.8
x friction x0-5 (``stress_axes``).

Compilation of an MJX step takes tens of seconds on a CPU; a GPU runs these tasks
much faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from envs.adversarial import AdversarialEnv, PhysicsParams

CHEETAH_XML = """
<mujoco model="adv_cheetah">
  <compiler angle="radian"/>
  <option timestep="0.01" iterations="4" ls_iterations="6"/>
  <default>
    <joint type="hinge" axis="0 1 0" limited="true" armature="0.1" damping="3" stiffness="100"/>
    <geom type="capsule" size="0.046" contype="1" conaffinity="0" condim="3" friction="0.4 0.1 0.1"/>
    <motor ctrllimited="true" ctrlrange="-1 1"/>
  </default>
  <worldbody>
    <geom name="floor" type="plane" size="50 5 0.1" contype="0" conaffinity="1" friction="0.8 0.1 0.1"/>
    <body name="torso" pos="0 0 0.7">
      <joint name="rootx" type="slide" axis="1 0 0" limited="false" armature="0" damping="0" stiffness="0"/>
      <joint name="rootz" type="slide" axis="0 0 1" limited="false" armature="0" damping="0" stiffness="0"/>
      <joint name="rooty" type="hinge" axis="0 1 0" limited="false" armature="0" damping="0" stiffness="0"/>
      <geom name="torso" fromto="-0.5 0 0 0.5 0 0"/>
      <geom name="head" fromto="0.5 0 0 0.65 0 0.2"/>
      <body name="bthigh" pos="-0.5 0 0">
        <joint name="bthigh" range="-0.5 1.0" stiffness="240" damping="6"/>
        <geom name="bthigh" fromto="0 0 0 0.16 0 -0.25"/>
        <body name="bshin" pos="0.16 0 -0.25">
          <joint name="bshin" range="-0.8 0.8" stiffness="180" damping="4.5"/>
          <geom name="bshin" fromto="0 0 0 -0.28 0 -0.14"/>
          <body name="bfoot" pos="-0.28 0 -0.14">
            <joint name="bfoot" range="-0.4 0.8" stiffness="120" damping="3"/>
            <geom name="bfoot" fromto="0 0 0 0.05 0 -0.19"/>
          </body>
        </body>
      </body>
      <body name="fthigh" pos="0.5 0 0">
        <joint name="fthigh" range="-1.0 0.7" stiffness="180" damping="4.5"/>
        <geom name="fthigh" fromto="0 0 0 -0.14 0 -0.24"/>
        <body name="fshin" pos="-0.14 0 -0.24">
          <joint name="fshin" range="-1.2 0.9" stiffness="120" damping="3"/>
          <geom name="fshin" fromto="0 0 0 0.13 0 -0.18"/>
          <body name="ffoot" pos="0.13 0 -0.18">
            <joint name="ffoot" range="-0.5 0.5" stiffness="60" damping="1.5"/>
            <geom name="ffoot" fromto="0 0 0 0.09 0 -0.12"/>
          </body>
        </body>
      </body>
    </body>
  </worldbody>
  <actuator>
    <motor joint="bthigh" gear="120"/>
    <motor joint="bshin" gear="90"/>
    <motor joint="bfoot" gear="60"/>
    <motor joint="fthigh" gear="120"/>
    <motor joint="fshin" gear="60"/>
    <motor joint="ffoot" gear="30"/>
  </actuator>
</mujoco>
"""

HOPPER_XML = """
<mujoco model="adv_hopper">
  <compiler angle="radian"/>
  <option timestep="0.005" iterations="4" ls_iterations="6"/>
  <default>
    <joint type="hinge" axis="0 -1 0" limited="true" armature="1" damping="1"/>
    <geom type="capsule" contype="1" conaffinity="0" condim="3" friction="0.9 0.1 0.1"/>
    <motor ctrllimited="true" ctrlrange="-1 1" gear="200"/>
  </default>
  <worldbody>
    <geom name="floor" type="plane" size="50 5 0.1" contype="0" conaffinity="1" friction="0.9 0.1 0.1"/>
    <body name="torso" pos="0 0 1.25">
      <joint name="rootx" type="slide" axis="1 0 0" limited="false" armature="0" damping="0"/>
      <joint name="rootz" type="slide" axis="0 0 1" ref="1.25" limited="false" armature="0" damping="0"/>
      <joint name="rooty" type="hinge" axis="0 -1 0" limited="false" armature="0" damping="0"/>
      <geom name="torso" fromto="0 0 0.2 0 0 -0.2" size="0.05"/>
      <body name="thigh" pos="0 0 -0.2">
        <joint name="thigh" range="-2.6 0"/>
        <geom name="thigh" fromto="0 0 0 0 0 -0.45" size="0.05"/>
        <body name="leg" pos="0 0 -0.45">
          <joint name="leg" range="-2.6 0"/>
          <geom name="leg" fromto="0 0 0 0 0 -0.5" size="0.04"/>
          <body name="foot" pos="0 0 -0.5">
            <joint name="foot" range="-0.8 0.8"/>
            <geom name="foot" fromto="-0.13 0 0 0.26 0 0" size="0.06"/>
          </body>
        </body>
      </body>
    </body>
  </worldbody>
  <actuator>
    <motor joint="thigh"/>
    <motor joint="leg"/>
    <motor joint="foot"/>
  </actuator>
</mujoco>
"""


class MJXAdversarialEnv(AdversarialEnv):
    """Base class of the MJX tasks: model building, parameter scaling, forces, substeps."""

    xml: str = ""
    frame_skip: int = 1
    adversary_bodies: tuple[str, ...] = ()
    mass_bodies: tuple[str, ...] = ("torso",)
    reset_noise: float = 0.1

    def __init__(self, adversary: bool = True, params: PhysicsParams | None = None, **param_values):
        import mujoco
        from mujoco import mjx

        super().__init__(adversary=adversary, params=params, **param_values)
        self._mjx = mjx
        mj = mujoco.MjModel.from_xml_string(self.xml)
        self.model = mjx.put_model(mj)
        self.dt = float(mj.opt.timestep) * self.frame_skip
        body = lambda n: mujoco.mj_name2id(mj, mujoco.mjtObj.mjOBJ_BODY, n)
        self._force_bodies = np.array([body(n) for n in self.adversary_bodies], np.int32)
        self._mass_bodies = np.array([body(n) for n in self.mass_bodies], np.int32)
        self._nbody = mj.nbody
        self._qpos0 = jnp.asarray(mj.qpos0, jnp.float32)
        self._nq, self._nv = mj.nq, mj.nv

    def physics_model(self, p: PhysicsParams):
        """The MJX model with masses, inertias and frictions scaled (traced-friendly)."""
        m = self.model
        ms = jnp.asarray(p.mass_scale, jnp.float32)
        mass = m.body_mass.at[self._mass_bodies].multiply(ms)
        inertia = m.body_inertia.at[self._mass_bodies].multiply(ms)
        friction = m.geom_friction.at[:, 0].multiply(jnp.asarray(p.friction_scale, jnp.float32))
        return m.replace(body_mass=mass, body_inertia=inertia, geom_friction=friction)

    def _reset_q(self, key):
        k1, k2 = jax.random.split(key)
        n = self.reset_noise
        qpos = self._qpos0 + jax.random.uniform(k1, (self._nq,), minval=-n, maxval=n)
        qvel = n * jax.random.normal(k2, (self._nv,))
        model = self.physics_model(self.params)
        data = self._mjx.make_data(model).replace(qpos=qpos, qvel=qvel)
        return self._mjx.forward(model, data)

    def _simulate(self, data, u, f, p):
        model = self.physics_model(p)
        xfrc = jnp.zeros((self._nbody, 6), jnp.float32)
        fxz = f.reshape(-1, 2)
        xfrc = xfrc.at[self._force_bodies, 0].set(fxz[:, 0]).at[self._force_bodies, 2].set(fxz[:, 1])
        data = data.replace(ctrl=u, xfrc_applied=xfrc)
        return jax.lax.fori_loop(0, self.frame_skip, lambda _, d: self._mjx.step(model, d), data)


class Cheetah(MJXAdversarialEnv):
    task = "cheetah"
    xml = CHEETAH_XML
    obs_dim = 17
    protagonist_dim = 6
    adversary_dim = 6
    max_steps = 1000
    control_max = 1.0
    force_max = 5.0
    frame_skip = 5
    adversary_bodies = ("torso", "bfoot", "ffoot")

    def _obs(self, d):
        return jnp.concatenate([d.qpos[1:], d.qvel])

    def _dynamics(self, d, u, f, p):
        d = self._simulate(d, u, f, p)
        reward = jnp.clip(d.qvel[0] / 10.0, 0.0, 1.0)
        upright = jnp.cos(d.qpos[2]) > 0
        return d, reward, jnp.zeros((), bool), upright


class Hopper(MJXAdversarialEnv):
    task = "hopper"
    xml = HOPPER_XML
    obs_dim = 11
    protagonist_dim = 3
    adversary_dim = 4
    max_steps = 1000
    control_max = 1.0
    force_max = 3.0
    frame_skip = 2
    adversary_bodies = ("torso", "foot")
    reset_noise = 0.005

    def _obs(self, d):
        return jnp.concatenate([d.qpos[1:], jnp.clip(d.qvel, -10.0, 10.0)])

    def _dynamics(self, d, u, f, p):
        x_before = d.qpos[0]
        d = self._simulate(d, u, f, p)
        z, angle = d.qpos[1], d.qpos[2]
        state = jnp.concatenate([d.qpos[2:], d.qvel])
        healthy = (z > 0.7) & (jnp.abs(angle) < 0.2) & jnp.all(jnp.abs(state) < 100.0) & jnp.all(jnp.isfinite(state))
        reward = (d.qpos[0] - x_before) / self.dt + 1.0 - 1e-3 * jnp.sum(u**2)
        return d, reward, ~healthy, healthy


TASKS = {cls.task: cls for cls in (Cheetah, Hopper)}


def available() -> bool:
    """Whether ``mujoco`` and ``mujoco-mjx`` can be imported."""
    try:
        import mujoco  # noqa: F401
        from mujoco import mjx  # noqa: F401
    except ImportError:
        return False
    return True


def names() -> list[str]:
    """Registered names after ``adv:`` (empty when mujoco is not installed)."""
    import importlib.util

    if importlib.util.find_spec("mujoco") is None:
        return []
    return sorted(list(TASKS) + [t + "-noadv" for t in TASKS])


def make(task: str, adversary: bool | None = None, **params) -> MJXAdversarialEnv:
    """``"cheetah"``, ``"hopper"`` or their ``-noadv`` variants; ``params``: :class:`PhysicsParams` fields."""
    from marl.config import ConfigError

    base, noadv = (task[: -len("-noadv")], True) if task.endswith("-noadv") else (task, False)
    if base not in TASKS:
        raise ConfigError("task", task, f"unknown MJX adversarial task; allowed: {names()}")
    if noadv and adversary:
        raise ConfigError("adversary", adversary, f"must be False (or unset) for {task!r}")
    adversary = (not noadv) if adversary is None else adversary
    return TASKS[base](adversary=adversary, **params)
