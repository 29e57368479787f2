"""Shared fixtures: tiny configurations so the default suite stays fast on 2 CPU cores."""

import dataclasses
import functools

import pytest

import algos
import envs

# tiny sizes for every family; each algorithm takes the fields its config has
TINY = dict(num_envs=4, num_steps=8, num_minibatches=2, update_epochs=2, hidden=32, total_steps=4 * 8 * 4,
            train_steps=2, batch_size=4, buffer_size=16)


def tiny_overrides(name: str, **overrides) -> dict:
    fields = {f.name for f in dataclasses.fields(algos.config_class(name))}
    merged = {**TINY, **overrides}
    if "total_steps" not in overrides:  # four iterations
        merged["total_steps"] = 4 * merged["num_envs"] * merged["num_steps"]
    return {k: v for k, v in merged.items() if k in fields}


@functools.lru_cache(maxsize=None)
def tiny_algo(name: str = "mappo", env_name: str = "smax:3m", **overrides):
    """A small, cached algorithm: the same object (and so the same compiled chunks)
    is shared by every test that asks for the same settings."""
    env = envs.make(env_name)
    return algos.make(name, env, **tiny_overrides(name, **overrides))


@pytest.fixture
def mappo_tiny():
    return tiny_algo("mappo")
