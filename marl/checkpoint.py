"""Orbax checkpoints of the whole (seed-batched) train state.

A checkpoint holds every array of the train state: parameters, optimizer states,
replay buffers, environment states, counters and the per-seed PRNG keys, so a
resumed run continues bit-for-bit where the saved one stopped. The step number is
the number of completed iterations. Orbax does not store arrays of size 0 (MJX states
hold some, e.g. the activations of a model without actuator dynamics): they are saved
as one-element placeholders and rebuilt from ``state_like``'s shapes on restore.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _empty(x) -> bool:
    return getattr(x, "size", 1) == 0


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state) -> None:
        state = jax.tree.map(lambda x: jnp.zeros((1,), x.dtype) if _empty(x) else x, state)
        self._mgr.save(step, args=ocp.args.StandardSave(state))
        self._mgr.wait_until_finished()

    def latest_step(self):
        return self._mgr.latest_step()

    def restore(self, state_like, step: int | None = None):
        """Restore into the structure (and shardings) of ``state_like``."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((1,), x.dtype) if _empty(x) else ocp.utils.to_shape_dtype_struct(x),
            state_like)
        restored = self._mgr.restore(step, args=ocp.args.StandardRestore(abstract))
        return jax.tree.map(lambda r, x: jnp.zeros(x.shape, x.dtype) if _empty(x) else r, restored, state_like)

    def close(self):
        self._mgr.close()
