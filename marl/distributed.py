"""Sharding the vmapped axis (seeds x swept configurations) over devices and hosts.

The runner's program is ``jit(vmap(scan(update)))``: every row of the vmapped axis
is independent, so spreading the rows over devices needs no change to any algorithm.
Here the row axis is laid out on a 1-D :class:`jax.sharding.Mesh` over every device
of every process (``jax.devices()``), with ``NamedSharding(mesh, P(BATCH_AXIS))``
on the leading axis of each leaf of the train state, and the chunk function is
compiled with that sharding for its inputs and outputs, so the state never moves
between devices during training.

Rows that do not divide evenly among the devices are padded: the padded program
runs ``ceil(n / D) * D`` rows, the extra rows repeat the last real row (same key,
same hyperparameters) and are dropped from every result. Padding was chosen over
rejecting such sizes so any sweep runs on any machine; its cost is at most
``D - 1`` wasted rows, and the printed/recorded figures never include them.

Several hosts: call :func:`initialize` first in every process (it wraps
``jax.distributed.initialize`` and does nothing on a single process); the mesh then
spans all hosts' devices, inputs are built identically on every host and placed
with ``jax.make_array_from_callback``, and metrics are gathered to every host
before they are written (process 0 writes files).

Numbers: a sharded run computes the same rows with the same keys as an unsharded
one; ``tests/test_distributed.py`` checks both agree on 4 forced CPU devices.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from marl.config import ConfigError
from marl.runner import NonFiniteError, TrainResult, _first_nonfinite, init_states, make_chunk_fn
from marl.types import Algorithm

BATCH_AXIS = "batch"
"""Name of the mesh axis that the vmapped rows are laid out on."""

_INITIALIZED = False
_COMPILED: dict = {}


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, **kwargs) -> bool:
    """Join a multi-process (multi-host) JAX job; a no-op for a single process.

    With no arguments it reads ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; when none is set (or ``num_processes`` is 1) nothing happens
    and False is returned. Must run before anything else touches a JAX backend. Safe
    to call twice. Returns True when this process is part of a multi-process job.
    """
    global _INITIALIZED
    if _INITIALIZED:
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address is None or num_processes in (None, 1):
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    _INITIALIZED = True
    return True


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named :data:`BATCH_AXIS` over ``devices`` (default: all devices of
    all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ConfigError("devices", devices, "must name at least one device")
    return Mesh(np.array(devices), (BATCH_AXIS,))


def padded_size(n: int, num_devices: int) -> int:
    """The smallest multiple of ``num_devices`` that is >= ``n``."""
    return -(-n // num_devices) * num_devices


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Repeat the last row of ``x`` until it has ``size`` rows."""
    x = np.asarray(x)
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)


def shard_rows(tree, mesh: Mesh):
    """Host arrays -> global arrays split along their leading axis over ``mesh``.

    Every process passes the same full values (multi-host safe); the leading axis must
    already be a multiple of the mesh size.
    """
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def _to_host(tree):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _compiled_init(algo: Algorithm, mesh: Mesh, keys, hparams):
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    # init_states under an outer jit: its hparams replacement is traced too, and every
    # leaf of the resulting state gets the row sharding
    fn = jax.jit(lambda k, hp: init_states(algo, k, hp), out_shardings=sharding)
    return fn(keys, hparams)


def _compiled_chunk(algo: Algorithm, length: int, mesh: Mesh, state):
    key = (algo.update, length, mesh, jax.tree.structure(state),
           tuple((x.shape, x.dtype) for x in jax.tree.leaves(state)))
    if key not in _COMPILED:
        sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        fn = jax.jit(make_chunk_fn(algo, length), in_shardings=sharding, out_shardings=sharding,
                     donate_argnums=0)
        t0 = time.perf_counter()
        compiled = fn.lower(state).compile()
        if len(_COMPILED) >= 16:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = (compiled, time.perf_counter() - t0)
        return compiled, _COMPILED[key][1]
    return _COMPILED[key][0], 0.0


def train_sharded(
    algo: Algorithm,
    *,
    num_iterations: int,
    keys,
    hparams: Optional[dict] = None,
    mesh: Optional[Mesh] = None,
    chunk_iterations: int = 10,
    run_dir: Optional[str] = None,
    run_info: Optional[dict] = None,
    progress: bool = False,
) -> TrainResult:
    """:func:`marl.runner.train` with the vmapped rows sharded over ``mesh``.

    ``keys``: [n, 2] PRNG keys, one per row; ``hparams``: name -> [n] values (see
    :func:`marl.runner.init_states`). Rows are padded to a multiple of the device count
    (see the module docstring) and the padding is removed from the returned metrics
    and state. With ``run_dir``, ``metrics.jsonl`` and ``run.json`` are written as the
    runner writes them (process 0 only); there are no checkpoints on this path.
    """
    from marl.logging import MetricsWriter
    from marl.runner import _prepare_run_dir

    for field, v in (("num_iterations", num_iterations), ("chunk_iterations", chunk_iterations)):
        if not (isinstance(v, (int, np.integer)) and v > 0):
            raise ConfigError(field, v, "must be a positive integer")
    mesh = make_mesh() if mesh is None else mesh
    keys = np.asarray(jax.device_get(keys))
    n = keys.shape[0]
    if n == 0:
        raise ConfigError("keys", keys.shape, "must hold at least one row")
    size = padded_size(n, mesh.size)
    hp = {k: _pad_rows(np.broadcast_to(np.asarray(v, np.float32), (n,)), size)
          for k, v in (hparams or {}).items()}
    state = _compiled_init(algo, mesh, shard_rows(_pad_rows(keys, size), mesh), shard_rows(hp, mesh))

    steps_per_iter = algo.env_steps_per_update
    writer = None
    if run_dir is not None and jax.process_index() == 0:
        description = {"algo": algo.name, "env": algo.env.spec.name, "num_seeds": n, "seed": None,
                       "num_iterations": num_iterations, "chunk_iterations": chunk_iterations,
                       "env_steps_per_iteration": steps_per_iter,
                       "sharding": {"devices": mesh.size, "padded_rows": size, "processes": jax.process_count()},
                       **(run_info or {})}
        run_dir = _prepare_run_dir(run_dir, False, json.loads(json.dumps(description, default=str)))
        writer = MetricsWriter(run_dir)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_iterations * steps_per_iter, unit="step", unit_scale=True,
                   desc=f"{algo.name} on {algo.env.spec.name} ({mesh.size} devices)", dynamic_ncols=True)
    chunk_iterations = min(chunk_iterations, num_iterations)
    history: dict = {}
    compile_s = train_s = 0.0
    it = 0
    try:
        while it < num_iterations:
            length = min(chunk_iterations, num_iterations - it)
            fn, c = _compiled_chunk(algo, length, mesh, state)
            compile_s += c
            t0 = time.perf_counter()
            state, metrics, finite = fn(state)
            metrics, finite = _to_host((metrics, finite))
            train_s += time.perf_counter() - t0
            metrics = {k: np.asarray(v)[:n] for k, v in metrics.items()}
            finite = np.asarray(finite)[:n]
            bad = _first_nonfinite(metrics, finite, it)
            good = bad[1] - it if bad else length
            if writer is not None:
                writer.write(metrics, it, steps_per_iter, upto=good)
            for k, v in metrics.items():
                history.setdefault(k, []).append(v[:, :good])
            if bad:
                raise NonFiniteError(f"{bad[0]} at iteration {bad[1] + 1} "
                                     f"(env step {(bad[1] + 1) * steps_per_iter}); training stopped")
            it += length
            if bar is not None:
                bar.update(length * steps_per_iter)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if size != n:
        state = jax.jit(lambda s: jax.tree.map(lambda x: x[:n], s))(state)
    metrics_np = {k: np.concatenate(v, axis=1) for k, v in history.items()}
    return TrainResult(state, metrics_np, run_dir, compile_s, train_s, it * steps_per_iter)


def device_summary(mesh: Optional[Mesh] = None) -> dict:
    """What the rows are spread over: device count, kinds and processes."""
    mesh = make_mesh() if mesh is None else mesh
    return {"devices": int(mesh.size), "platform": jax.devices()[0].platform,
            "processes": jax.process_count(), "local_devices": jax.local_device_count()}


__all__ = ["BATCH_AXIS", "initialize", "make_mesh", "padded_size", "shard_rows", "train_sharded",
           "device_summary"]
