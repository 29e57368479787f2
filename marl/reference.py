"""Policy parameters of a trained run, loaded as a frozen regularizer reference.

A run directory (written by :func:`marl.runner.train`, e.g. through
``python -m experiments.train``) holds ``run.json`` and orbax checkpoints of the
whole seed-batched train state. :func:`load_run_params` reads the ``params`` of
one seed of its latest checkpoint, without rebuilding the run's algorithm (``marl``
does not import ``algos``), and checks them against the parameters the caller
expects: the same environment (``run.json``'s ``env`` = ``spec.name``) and the same
parameter tree with the same shapes. Any mismatch raises a :class:`ConfigError`
naming the field, the value and what is allowed, before anything compiles.

Environment keyword arguments (``env_kwargs`` in ``run.json``) may differ: fine-tuning
on a changed reward (SMAX's ``reward="damage_alive"``) is the point of a reference.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from marl.config import ConfigError

__all__ = ["read_run_description", "load_run_params"]


def read_run_description(run_dir: str, field: str = "regularizer.reference_run") -> dict:
    """``run_dir/run.json`` as a dict; ConfigError naming ``field`` when unreadable."""
    path = os.path.join(run_dir, "run.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(field, run_dir, f"must be a run directory holding a readable run.json ({e})") from None


def _shapes(tree) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in flat}


def load_run_params(
    run_dir: str,
    params_like: Any,
    *,
    env_name: Optional[str] = None,
    seed_index: int = 0,
    step: Optional[int] = None,
    field: str = "regularizer.reference_run",
) -> Any:
    """Parameters of seed ``seed_index`` of the run in ``run_dir`` (latest checkpoint, or ``step``).

    Args:
      params_like: the caller's parameter pytree (arrays or ``ShapeDtypeStruct``s,
        one seed): the result has its structure and dtypes.
      env_name: when given, the run must have been trained on this environment.
      seed_index: which seed of a seed-batched run (``run.json``'s ``num_seeds``).
      field: the config field named in errors.

    Raises:
      ConfigError: no run.json or checkpoint, another environment, a seed out of
        range, or parameters of another structure or shape (e.g. another hidden
        size, critic type, recurrent flag or agent count).
    """
    import orbax.checkpoint as ocp

    desc = read_run_description(run_dir, field)
    if env_name is not None and desc.get("env") != env_name:
        raise ConfigError(field, run_dir, f"was trained on {desc.get('env')!r}; allowed: a run of {env_name!r}")
    num_seeds = int(desc.get("num_seeds", 1))
    if not (isinstance(seed_index, int) and 0 <= seed_index < num_seeds):
        raise ConfigError(
            "regularizer.reference_seed",
            seed_index,
            f"must be in [0, {num_seeds - 1}] (the run {run_dir} has {num_seeds} seed(s))",
        )
    ckpt_dir = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(field, run_dir, "must hold a checkpoints/ directory (a run trained with a run_dir)")
    mgr = ocp.CheckpointManager(ckpt_dir)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise ConfigError(field, run_dir, "has no checkpoint")
        raw = mgr.restore(step, args=ocp.args.StandardRestore())
    finally:
        mgr.close()
    if not isinstance(raw, dict) or "params" not in raw:
        raise ConfigError(field, run_dir, "its checkpoint holds no 'params' (not a policy-gradient run?)")
    got, want = _shapes(raw["params"]), _shapes(params_like)
    got_one = {k: s[1:] for k, s in got.items()}  # drop the seed axis
    if got_one != want:
        missing = sorted(set(want) - set(got_one))[:3]
        extra = sorted(set(got_one) - set(want))[:3]
        cfg = desc.get("config", {})
        net = {k: cfg[k] for k in ("critic", "hidden", "recurrent", "agent_ids", "shared_params") if k in cfg}
        differ = [f"{k}: {got_one[k]} vs {want[k]}" for k in sorted(set(want) & set(got_one)) if got_one[k] != want[k]][
            :3
        ]
        raise ConfigError(
            field,
            run_dir,
            f"its policy parameters (algo {desc.get('algo')!r}, network {net}) do not fit this "
            f"algorithm's: missing {missing}, unexpected {extra}, shape (run vs here) {differ}; allowed: a run of "
            "the same algorithm family with the same network settings (hidden, recurrent, critic, agent_ids, "
            "shared_params) on the same environment",
        )
    flat_raw = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(raw["params"])[0])
    paths, treedef = jax.tree_util.tree_flatten_with_path(params_like)
    leaves = [jnp.asarray(np.asarray(flat_raw[jax.tree_util.keystr(p)])[seed_index], like.dtype) for p, like in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)
