"""Orbax checkpoints of the whole (seed-batched) train state.

A checkpoint holds every array of the train state: parameters, optimizer states,
replay buffers, environment states, counters and the per-seed PRNG keys, so a
resumed run continues bit-for-bit where the saved one stopped. The step number is
the number of completed iterations.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state) -> None:
        self._mgr.save(step, args=ocp.args.StandardSave(state))
        self._mgr.wait_until_finished()

    def latest_step(self):
        return self._mgr.latest_step()

    def restore(self, state_like, step: int | None = None):
        """Restore into the structure (and shardings) of ``state_like``."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        return self._mgr.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self):
        self._mgr.close()
