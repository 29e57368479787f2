"""Config validation helpers.

Configs are frozen dataclasses validated before anything compiles. A bad value
raises :class:`ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable


class ConfigError(ValueError):
    """A configuration value is invalid: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"invalid {field}={value!r}: {allowed}")


def check_positive(field: str, value, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value) == int(value)
    if not ok:
        raise ConfigError(field, value, "must be a positive " + ("integer" if integer else "number"))


def check_nonnegative(field: str, value) -> None:
    if not (isinstance(value, (int, float)) and value >= 0):
        raise ConfigError(field, value, "must be >= 0")


def check_range(field: str, value, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    ok = isinstance(value, (int, float))
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(field, value, f"must be in {lb}{lo}, {hi}{rb}")


def check_choice(field: str, value, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(field, value, f"must be one of {choices}")


def check_total_steps(total_steps: int, num_envs: int, num_steps: int) -> None:
    """A run must hold at least one iteration of ``num_envs * num_steps`` env steps."""
    if total_steps < num_envs * num_steps:
        raise ConfigError(
            "total_steps",
            total_steps,
            f"must be at least one iteration = num_envs * num_steps = {num_envs * num_steps}",
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fields every on-line learner's config shares: the budget and the rollout shape.

    Each algorithm's config subclasses it and may redeclare a field to change its default
    (the field keeps its place); each validates these fields in its own ``__post_init__``
    (:func:`check_total_steps` among them)."""

    total_steps: int = 1_000_000
    """env steps per seed, all parallel environments together; accepts 1e6 on the CLI"""
    num_envs: int = 8
    """parallel environments per seed"""
    num_steps: int = 64
    """env steps per environment per iteration"""

    @property
    def num_updates(self) -> int:
        """Iterations of ``update`` in a run: ``total_steps // (num_envs * num_steps)``."""
        return self.total_steps // (self.num_envs * self.num_steps)


def replace(config, **changes):
    """``dataclasses.replace`` that re-runs validation (``__post_init__``)."""
    return dataclasses.replace(config, **changes)


def apply_overrides(config, values: dict, prefix: str):
    """``dataclasses.replace`` of ``config`` with ``values``, nested dicts going into
    nested dataclasses. An unknown field raises ConfigError naming ``prefix.field`` and
    the allowed names; the config's own checks (``__post_init__``) run as usual."""
    names = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"{prefix}.{k}", v, f"unknown field; allowed: {sorted(names)}")
        cur = getattr(config, k)
        nested = dataclasses.is_dataclass(cur) and isinstance(v, dict)
        changes[k] = apply_overrides(cur, v, f"{prefix}.{k}") if nested else v
    try:
        return dataclasses.replace(config, **changes)
    except TypeError as e:
        raise ConfigError(prefix, values, f"invalid value ({e})") from None


def json_dict_arg(field: str, text):
    """A command-line JSON dict given inline or as a path to a JSON file -> dict (None
    for None); ConfigError naming ``field`` otherwise."""
    if text is None:
        return None
    src = text
    if not text.lstrip().startswith(("{", "[")) and os.path.isfile(text):
        try:
            with open(text) as f:
                src = f.read()
        except OSError as e:
            raise ConfigError(field, text, f"must be JSON or a readable JSON file ({e})") from None
    try:
        value = json.loads(src)
    except json.JSONDecodeError as e:
        raise ConfigError(field, text, f"must be a JSON dict or a JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(field, text, "must be a JSON dict")
    return value
