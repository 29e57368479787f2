"""Shared fixtures: tiny configurations so the default suite stays fast on 2 CPU cores."""

import functools

import pytest

import algos
import envs


@functools.lru_cache(maxsize=None)
def tiny_algo(name: str = "mappo", env_name: str = "smax:3m", **overrides):
    """A small, cached algorithm: the same object (and so the same compiled chunks)
    is shared by every test that asks for the same settings."""
    env = envs.make(env_name)
    base = dict(num_envs=4, num_steps=8, num_minibatches=2, update_epochs=2, hidden=32, total_steps=4 * 8 * 4)
    base.update(overrides)
    return algos.make(name, env, **base)


@pytest.fixture
def mappo_tiny():
    return tiny_algo("mappo")
