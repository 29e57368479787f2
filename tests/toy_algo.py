"""A toy algorithm that lives in the tests alone: independent REINFORCE with a linear
softmax policy shared by all agents. It is the example of ``docs/guide/add_algorithm.md``:
one module and one registry line give it the CLI, sweeps and evaluation.

Equations: G_t = sum_k gamma^k r_{t+k} (cut at episode ends), the advantage is G
normalized over the batch, and the loss is -E[log pi(a_t | o_t) (G_t - mean) / std].
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from marl import config as cfg
from marl.episodes import episode_metrics
from marl.types import Algorithm, hparams


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    total_steps: int = 4096
    num_envs: int = 4
    num_steps: int = 16
    lr: float = 0.05
    gamma: float = 0.95

    def __post_init__(self):  # validated before anything compiles
        cfg.check_positive("num_envs", self.num_envs, integer=True)
        cfg.check_positive("num_steps", self.num_steps, integer=True)
        cfg.check_positive("lr", self.lr)
        cfg.check_range("gamma", self.gamma, 0.0, 1.0)
        cfg.check_total_steps(self.total_steps, self.num_envs, self.num_steps)


class HParams(NamedTuple):  # what a sweep may vary: arrays in the train state
    lr: jax.Array
    gamma: jax.Array


class TrainState(struct.PyTreeNode):
    params: dict
    env_state: Any
    ts: Any
    key: jax.Array
    hparams: HParams


def policy_logits(params, obs, avail):
    """[..., A, n] logits of the linear policy, unavailable actions masked."""
    return jnp.where(avail, obs @ params["w"] + params["b"], -1e10)


def discounted_returns(reward, done, gamma):
    """[T, E] returns-to-go along the leading time axis, cut where ``done``."""

    def back(g, x):
        r, d = x
        g = r + gamma * (1.0 - d) * g
        return g, g

    return jax.lax.scan(back, jnp.zeros_like(reward[0]), (reward, done), reverse=True)[1]


def reinforce_loss(params, obs, avail, action, advantage):
    logp = jax.nn.log_softmax(policy_logits(params, obs, avail))
    taken = jnp.take_along_axis(logp, action[..., None], -1)[..., 0]  # [T, E, A]
    return -(taken * advantage[..., None]).mean()


def make(env, config: ToyConfig, name: str = "toy_pg") -> Algorithm:
    spec = env.spec
    if not spec.discrete:
        raise cfg.ConfigError("env", spec.name, f"{name} needs a discrete-action environment")
    E, T = config.num_envs, config.num_steps

    def init(key):
        k_env, key = jax.random.split(key)
        params = {"w": jnp.zeros((spec.obs_dim, spec.num_actions)), "b": jnp.zeros((spec.num_actions,))}
        env_state, ts = jax.vmap(env.reset)(jax.random.split(k_env, E))
        return TrainState(params, env_state, ts, key, hparams(HParams, lr=config.lr, gamma=config.gamma))

    def act(params, ts, carry, key, greedy=False):
        logits = policy_logits(params, ts.obs, ts.avail_actions)
        return jnp.where(greedy, jnp.argmax(logits, -1), jax.random.categorical(key, logits)), carry

    def initial_carry(batch_shape=()):
        return jnp.zeros(batch_shape)

    def step(state, key):
        k_act, k_env = jax.random.split(key)
        action, _ = act(state.params, state.ts, None, k_act)
        env_state, ts = jax.vmap(env.step)(jax.random.split(k_env, E), state.env_state, action)
        data = (state.ts.obs, state.ts.avail_actions, action, ts.reward.mean(-1), ts.done, ts.info)
        return state.replace(env_state=env_state, ts=ts), data

    def update(state):
        key, k_roll = jax.random.split(state.key)
        state, (obs, avail, action, reward, done, info) = jax.lax.scan(step, state, jax.random.split(k_roll, T))
        g = discounted_returns(reward, done.astype(jnp.float32), state.hparams.gamma)
        advantage = (g - g.mean()) / (g.std() + 1e-8)
        loss, grads = jax.value_and_grad(reinforce_loss)(state.params, obs, avail, action, advantage)
        params = jax.tree.map(lambda p, d: p - state.hparams.lr * d, state.params, grads)
        return state.replace(params=params, key=key), dict(episode_metrics(info), loss=loss)

    return Algorithm(name, config, env, init, update, act, initial_carry, E * T)
