"""Robustness evaluation of QARL / RARL / SAC protagonists on the adversarial tasks: the
evaluation environment (adversary at its target temperature, physics multipliers), returns
against the trained adversary or none, the stress grid over two physics axes, and a fresh
best-response adversary trained against each frozen protagonist. Jittable pieces, vmapped
over seeds by the callers (``experiments.qarl_compare``)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from algos import sac
from algos.qarl import QARLConfig, make
from envs.adversarial import with_params
from marl.types import SEED_AXIS, Algorithm

# masses 0.354 .. 2.828 (log-spaced, 1 in the middle), frictions 0 .. 5
DEFAULT_MASSES = tuple(float(x) for x in np.round(2.0 ** np.linspace(-1.5, 1.5, 11), 3))


DEFAULT_FRICTIONS = tuple(float(x) for x in np.round(np.linspace(0.0, 5.0, 11), 3))


def eval_env(
    algo: Algorithm,
    adversary: bool = True,
    mass=None,
    friction=None,
    deterministic: bool = True,
    inputs: Optional[Sequence[bool]] = None,
    **physics,
):
    """The training environment with the adversary at its target temperature (its mean
    with ``deterministic``), the adversary on (at the training force bound) or off (scale
    0), physics multipliers set (``mass``, ``friction`` or any :class:`PhysicsParams`
    field), and optionally other temperature ``inputs`` per player (cross play between
    runs with and without a temperature input)."""
    env = algo.env.with_temperature(shape=algo.config.target_shape, deterministic=deterministic, inputs=inputs)
    if mass is not None:
        physics["mass_scale"] = mass
    if friction is not None:
        physics["friction_scale"] = friction
    if not adversary:
        physics["adversary_scale"] = 0.0
    return with_params(env, **physics) if physics else env


def protagonist_returns(algo: Algorithm, params, env, key, num_episodes: int, greedy: bool = True):
    """``[num_episodes]`` protagonist returns of the first episode in each of
    ``num_episodes`` parallel copies of ``env`` (``spec.max_steps`` steps)."""
    n = num_episodes
    k_reset, k_run = jax.random.split(key)
    env_state, ts = jax.vmap(env.reset)(jax.random.split(k_reset, n))

    def step(c, key):
        env_state, ts, finished, ret = c
        k_act, k_env = jax.random.split(key)
        action, _ = algo.act(params, ts, None, k_act, greedy)
        env_state, ts = jax.vmap(env.step)(jax.random.split(k_env, n), env_state, action)
        ret = ret + jnp.where(finished, 0.0, ts.reward[:, 0])
        return (env_state, ts, finished | ts.done, ret), None

    init = (env_state, ts, jnp.zeros((n,), bool), jnp.zeros((n,), jnp.float32))
    (_, _, _, ret), _ = jax.lax.scan(step, init, jax.random.split(k_run, env.spec.max_steps))
    return ret


def evaluate_protagonist(
    algo: Algorithm,
    params,
    key,
    num_episodes: int = 16,
    adversary: bool = True,
    greedy: bool = True,
    inputs: Optional[Sequence[bool]] = None,
):
    """Mean protagonist return against the (final) adversary in ``params``, or without
    adversary (``adversary=False``: its force scaled by 0). Jittable; vmap over seeds."""
    env = eval_env(algo, adversary=adversary, inputs=inputs)
    return protagonist_returns(algo, params, env, key, num_episodes, greedy).mean()


def stress_axes(algo: Algorithm, n: int = 11):
    """The task's robustness grid axes ``((field, values), (field, values))``."""
    return algo.env.unwrapped.stress_grid(n)


def robustness_grid(algo: Algorithm, params, key, axes=None, num_episodes: int = 1, greedy: bool = True):
    """``[M, F]`` mean protagonist return without adversary on the task's stress grid
    (``axes``: two ``(PhysicsParams field, values)`` pairs, default :func:`stress_axes`:
    mass x friction, or cart-pole's pole mass x cart mass), ``num_episodes`` per cell,
    all cells in one vmapped rollout over the physics parameters (``with_params`` with
    traced values). Every cell uses the same ``key`` (the same initial states):
    differences between cells come from the physics only. Jittable; vmap over seeds."""
    (f1, v1), (f2, v2) = stress_axes(algo) if axes is None else axes
    m, f = jnp.meshgrid(jnp.asarray(v1, jnp.float32), jnp.asarray(v2, jnp.float32), indexing="ij")

    def cell(a, b):
        env = eval_env(algo, adversary=False, **{f1: a, f2: b})
        return protagonist_returns(algo, params, env, key, num_episodes, greedy).mean()

    return jax.vmap(cell)(m.reshape(-1), f.reshape(-1)).reshape(m.shape)


def grid_spread(grid):
    """(max - min) / mean over the last two axes of a robustness grid: how much the
    physics changes the return (0: not at all)."""
    grid = jnp.asarray(grid)
    return (grid.max((-2, -1)) - grid.min((-2, -1))) / jnp.abs(grid.mean((-2, -1)))


def best_response_algo(env, config: QARLConfig, total_steps: int, protagonist_input: bool) -> Algorithm:
    """A fresh adversary to train against a frozen protagonist: ``env``'s adversary at
    the target temperature (alpha = target_shape / gamma_rate every episode), SAC with
    ``config``'s networks, only the adversary learning for ``total_steps``.
    ``protagonist_input``: whether the protagonist reads log alpha (its own run's setting)."""
    c = dataclasses.replace(
        config,
        curriculum="fixed",
        adversary=True,
        total_steps=int(total_steps),
        buffer_size=min(config.buffer_size, int(total_steps)),
        phase_unit="iterations",
        phase_length=2**30,
        temperature_inputs=(bool(protagonist_input), True),
    )
    return make(env, c, name="best_response")


def train_best_response(br: Algorithm, protagonist_params: sac.Params, key, chunk_iterations: int = 500):
    """Trains ``br``'s fresh adversary against each seed's frozen protagonist
    (``protagonist_params``: seed-batched ``[S, A, ...]``; agent 0 is used) for
    ``br.config.num_updates`` iterations, seeds vmapped; returns the final train states."""
    S = jax.tree.leaves(protagonist_params)[0].shape[0]

    def init(k, prot):
        state = br.init(k)
        return state.replace(params=cross_params(prot, state.params))

    state = jax.jit(jax.vmap(init))(jax.random.split(key, S), protagonist_params)
    run = lambda n: jax.jit(
        jax.vmap(lambda s: jax.lax.scan(lambda s, _: (br.update(s)[0], None), s, None, n)[0], axis_name=SEED_AXIS)
    )
    total = br.config.num_updates
    chunk = min(chunk_iterations, total)
    step = run(chunk)
    for _ in range(total // chunk):
        state = step(state)
    if total % chunk:
        state = run(total % chunk)(state)
    return state


def cross_params(protagonist_params: sac.Params, adversary_params: sac.Params, seed_axis: bool = False) -> sac.Params:
    """Agent 0 (actor, critics, temperature) from one run and agent 1 from another:
    a protagonist against another method's adversary. Parameters are one seed's
    (agent axis first) or, with ``seed_axis=True``, seed-batched ``[S, A, ...]`` (seed i
    against the other run's seed i)."""
    if seed_axis:
        return jax.vmap(cross_params)(protagonist_params, adversary_params)
    return jax.tree.map(lambda p, a: p.at[1].set(a[1]), protagonist_params, adversary_params)
