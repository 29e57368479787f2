"""Placement: the vmapped rows (seeds x swept configurations) over devices and hosts.

The runner's program is ``jit(vmap(scan(update)))``: every row of the vmapped axis
is independent, so spreading the rows over devices needs no change to any algorithm.
:func:`marl.runner.train` takes a ``mesh`` (a 1-D :class:`jax.sharding.Mesh` over
every device of every process, :func:`make_mesh`); the row axis of each leaf of the
train state is laid out with ``NamedSharding(mesh, P(BATCH_AXIS))`` and the chunk
function is compiled with that sharding for its inputs and outputs, so the state
never moves between devices during training. Progress, metrics, the NaN and
divergence checks, checkpoints (orbax saves and restores the sharded arrays) and
exact resume are the runner's own, on every placement.

Rows that do not divide evenly among the devices are padded: the padded program
runs ``ceil(n / D) * D`` rows, the extra rows repeat the last real row (same key,
same hyperparameters) and are dropped from every result. Padding was chosen over
rejecting such sizes so any sweep runs on any machine; its cost is at most
``D - 1`` wasted rows, and the printed/recorded figures never include them.

Several hosts: call :func:`initialize` first in every process (it wraps
``jax.distributed.initialize`` and does nothing on a single process); the mesh then
spans all hosts' devices, inputs are built identically on every host and placed
with ``jax.make_array_from_callback``, and metrics are gathered to every host
before they are written (process 0 writes metrics and holds the run lock; every
process takes part in orbax's checkpoint saves). On CPU, several processes need
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` before
:func:`initialize` (done here; it does not affect GPU or TPU clients).

Numbers: a sharded run computes the same rows with the same keys as an unsharded
one; ``tests/test_distributed.py`` checks both agree on 4 forced CPU devices, killed
and resumed, and across 2 processes.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from marl.config import ConfigError

BATCH_AXIS = "batch"
"""Name of the mesh axis that the vmapped rows are laid out on."""

_INITIALIZED = False


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    **kwargs,
) -> bool:
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
    # CPU devices of several processes talk through gloo (no effect on GPU/TPU clients)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
    )
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


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
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
    sharding = row_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Gather row-sharded arrays to every process as host numpy arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (row) axis split over the mesh, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def place_rows(init_fn, mesh: Mesh, keys, hparams: Optional[dict], num_rows: int):
    """Initial states of ``num_rows`` rows padded to a multiple of the mesh size and
    laid out over it: ``init_fn(keys, hparams)`` runs under one jit whose outputs carry
    the row sharding, so no state is ever gathered on one device."""
    size = padded_size(num_rows, mesh.size)
    keys = pad_rows(np.asarray(jax.device_get(keys)), size)
    hp = {
        k: pad_rows(np.broadcast_to(np.asarray(v, np.float32), (num_rows,)), size) for k, v in (hparams or {}).items()
    }
    fn = jax.jit(init_fn, out_shardings=row_sharding(mesh))
    return fn(shard_rows(keys, mesh), shard_rows(hp, mesh))


def device_summary(mesh: Optional[Mesh] = None) -> dict:
    """What the rows are spread over: device count, kinds and processes."""
    mesh = make_mesh() if mesh is None else mesh
    return {
        "devices": int(mesh.size),
        "platform": jax.devices()[0].platform,
        "processes": jax.process_count(),
        "local_devices": jax.local_device_count(),
    }


__all__ = [
    "BATCH_AXIS",
    "initialize",
    "make_mesh",
    "padded_size",
    "pad_rows",
    "shard_rows",
    "row_sharding",
    "place_rows",
    "to_host",
    "device_summary",
]
