"""Algorithms: ``algos.make(name, env, config)`` returns a :class:`marl.types.Algorithm`.

Each family is one module (``ppo``, ``qlearning``; later ``sac`` and the methods
built on them). A registered name maps to (module, config class, preset overrides).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from marl.config import ConfigError

# name -> (module, config class name, preset overrides)
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "ippo": ("algos.ppo", "PPOConfig", {"critic": "independent"}),
    "mappo": ("algos.ppo", "PPOConfig", {"critic": "centralized"}),
    "qmix": ("algos.qlearning", "QLearningConfig", {"mixer": "qmix"}),
    "vdn": ("algos.qlearning", "QLearningConfig", {"mixer": "vdn"}),
    "qplex": ("algos.qlearning", "QLearningConfig", {"mixer": "qplex"}),
    "iql": ("algos.qlearning", "QLearningConfig", {"mixer": "none"}),
    "sac": ("algos.sac", "SACConfig", {}),
    "emu": ("algos.emu", "EMUConfig", {"mixer": "qmix"}),
    "dec_pomfc": ("algos.dec_pomfc", "DecPOMFCConfig", {}),
    "trama": ("algos.trama", "TRAMAConfig", {"mixer": "qplex"}),
    "qarl": ("algos.qarl", "QARLConfig", {"curriculum": "gamma"}),
    "rarl": ("algos.qarl", "QARLConfig", {"curriculum": "auto"}),
}


def register(name: str, module: str, config_cls: str, preset: dict | None = None) -> None:
    _REGISTRY[name] = (module, config_cls, dict(preset or {}))


def registered() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str):
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, registered(), n=2)
        hint = f" (did you mean {close}?)" if close else ""
        raise ConfigError("algo", name, f"unknown algorithm{hint}; registered: {registered()}")
    module, cls, preset = _REGISTRY[name]
    return importlib.import_module(module), cls, preset


def config_class(name: str):
    mod, cls, _ = _entry(name)
    return getattr(mod, cls)


def default_config(name: str, **overrides: Any):
    """The algorithm's config with its preset and ``overrides`` applied (validated)."""
    mod, cls, preset = _entry(name)
    return getattr(mod, cls)(**{**preset, **overrides})


# modules whose regularizer accepts a trained run as reference (regularizer.reference "run")
_RUN_REFERENCE = ("algos.ppo",)


def make(name: str, env, config=None, **overrides: Any):
    """Build algorithm ``name`` on ``env``; ``config`` defaults to its preset."""
    mod, cls, preset = _entry(name)
    if config is None:
        config = default_config(name, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    reg = getattr(config, "regularizer", None)
    if getattr(reg, "reference", None) == "run" and mod.__name__ not in _RUN_REFERENCE:
        allowed = sorted(n for n, (m, _, _) in _REGISTRY.items() if m in _RUN_REFERENCE)
        raise ConfigError(
            "regularizer.reference",
            "run",
            f"a trained run as reference is supported by {allowed}, not {name!r}; use initial, rollout or uniform",
        )
    return mod.make(env, config, name=name)
