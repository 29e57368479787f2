"""Evaluation of a trained policy: one episode in each of ``num_episodes`` parallel
environments, greedy or sampled, jittable and vmappable over seeds' parameters.

Uses only the algorithm's ``act`` and ``initial_carry`` (the deployment path), so it
works for every algorithm. Each environment runs ``spec.max_steps`` steps and the
statistics of its first finished episode are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marl.types import Algorithm


def evaluate(algo: Algorithm, params, key: jax.Array, num_episodes: int = 32, greedy: bool = True) -> dict:
    """Returns means over episodes: ``return``, ``win_rate``, ``length``."""
    env = algo.env
    n = num_episodes
    k_reset, k_run = jax.random.split(key)
    env_state, ts = jax.vmap(env.reset)(jax.random.split(k_reset, n))
    carry = algo.initial_carry((n,))
    zeros = jnp.zeros((n,), jnp.float32)

    def step(c, key):
        env_state, ts, carry, finished, ret, won, length = c
        k_act, k_env = jax.random.split(key)
        action, carry = algo.act(params, ts, carry, k_act, greedy)
        env_state, ts = jax.vmap(env.step)(jax.random.split(k_env, n), env_state, action)
        new = ts.info["episode_done"] & ~finished
        ret = jnp.where(new, ts.info["episode_return"], ret)
        won = jnp.where(new, ts.info["won"].astype(jnp.float32), won)
        length = jnp.where(new, ts.info["episode_length"].astype(jnp.float32), length)
        return (env_state, ts, carry, finished | new, ret, won, length), None

    init = (env_state, ts, carry, jnp.zeros((n,), bool), zeros, zeros, zeros)
    (_, _, _, finished, ret, won, length), _ = jax.lax.scan(step, init, jax.random.split(k_run, env.spec.max_steps))
    return {"return": ret.mean(), "win_rate": won.mean(), "length": length.mean(), "finished": finished.mean()}


def evaluate_seeds(
    algo: Algorithm,
    batched_params,
    key: jax.Array,
    num_episodes: int = 32,
    greedy: bool = True,
    sequential: bool = False,
) -> dict:
    """:func:`evaluate` for seed-batched parameters [S, ...]; returns arrays [S].

    ``sequential=True`` evaluates the seeds one after another (``lax.map``) instead of
    vmapped: the same results with a seed's memory instead of S seeds' (large swarms)."""
    num_seeds = jax.tree.leaves(batched_params)[0].shape[0]

    def one(p, k):
        return evaluate(algo, p, k, num_episodes, greedy)

    if sequential:
        fn = jax.jit(lambda ps, ks: jax.lax.map(lambda pk: one(*pk), (ps, ks)))
    else:
        fn = jax.jit(jax.vmap(one))
    return jax.device_get(fn(batched_params, jax.random.split(key, num_seeds)))
