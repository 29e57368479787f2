"""Shared fixtures: tiny configurations so the default suite stays fast on 2 CPU cores."""

import dataclasses
import functools
import os
import pathlib

# A persistent XLA compilation cache shared by the xdist workers and the subprocesses the
# tests start (resumed runs, CLIs, the 2-process run): many tests build the same programs
# again (a resumed run recompiles its chunk), and a hit replaces a compile of several
# seconds with a file read. Set JAX_COMPILATION_CACHE_DIR to move it, or to "" to turn it off.
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite's programs are tiny, so XLA's compile time dominates most tests: LLVM at -O0
# halves it (the few tests that train longer run somewhat slower). Applies to the
# subprocesses too; an optimization level already in XLA_FLAGS is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

import algos  # noqa: E402
import envs  # noqa: E402

# tiny sizes for every family; each algorithm takes the fields its config has
TINY = dict(
    num_envs=4,
    num_steps=8,
    num_minibatches=2,
    update_epochs=2,
    hidden=32,
    total_steps=4 * 8 * 4,
    train_steps=2,
    batch_size=4,
    buffer_size=16,
)


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
