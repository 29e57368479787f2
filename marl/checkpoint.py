"""Orbax checkpoints of the whole (seed-batched) train state.

A checkpoint holds every array of the train state: parameters, optimizer states,
replay buffers, environment states, counters and the per-seed PRNG keys, so a
resumed run continues bit-for-bit where the saved one stopped. The step number is
the number of completed iterations. Orbax does not store arrays of size 0 (MJX states
hold some, e.g. the activations of a model without actuator dynamics): they are saved
as one-element placeholders and rebuilt from ``state_like``'s shapes on restore.

Integrity: :meth:`Checkpointer.restore_latest` restores the newest checkpoint that
reads back whole. A damaged one (a file cut short, garbage metadata) is moved aside to
``<run_dir>/damaged_checkpoints/<step>-<time>`` (never deleted) with a warning naming
it and the reason, and the next older one is tried. A checkpoint that reads back but holds a
train state of another layout (written by another version of an algorithm) is not damage: it
raises ConfigError and stays where it is. A step that does not exist raises ConfigError
listing the steps that do.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from marl.config import ConfigError


def _empty(x) -> bool:
    return getattr(x, "size", 1) == 0


def _replicated(x):
    """The sharding of a placeholder for ``x``: replicated over ``x``'s mesh when it has
    one (several processes need global arrays), else None (the default device)."""
    sharding = getattr(x, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    return NamedSharding(mesh, PartitionSpec()) if mesh is not None else None


def _placeholder(x):
    s = _replicated(x)
    return jnp.zeros((1,), x.dtype) if s is None else jax.device_put(np.zeros((1,), x.dtype), s)


def _layout_mismatch(error: Exception) -> bool:
    """The checkpoint reads back, but its tree is not the one asked for (another layout of
    the train state, e.g. from another version): not damage, and never quarantined."""
    text = str(error)
    signs = ("Structure mismatch", "not found in metadata_tree", "tree structures do not match")
    return isinstance(error, ValueError) and any(s in text for s in signs)


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._max_to_keep = max_to_keep
        self._open()

    def _open(self):
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True),
        )

    def save(self, step: int, state) -> None:
        state = jax.tree.map(lambda x: _placeholder(x) if _empty(x) else x, state)
        self._mgr.save(step, args=ocp.args.StandardSave(state))
        self._mgr.wait_until_finished()

    def latest_step(self):
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._mgr.all_steps())

    def restore(self, state_like, step: int | None = None):
        """Restore into the structure (and shardings) of ``state_like``."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise ConfigError(
                "step", step, f"must be one of the checkpointed steps {self.all_steps()} in {self.directory}"
            )
        abstract = jax.tree.map(
            lambda x: (
                jax.ShapeDtypeStruct((1,), x.dtype, sharding=_replicated(x))
                if _empty(x)
                else ocp.utils.to_shape_dtype_struct(x)
            ),
            state_like,
        )
        restored = self._mgr.restore(step, args=ocp.args.StandardRestore(abstract))
        # an empty leaf is rebuilt as state_like's own (empty, already placed) array
        return jax.tree.map(
            lambda r, x: (x if isinstance(x, jax.Array) else jnp.zeros(x.shape, x.dtype)) if _empty(x) else r,
            restored,
            state_like,
        )

    def restore_latest(self, state_like, quarantine: bool = True):
        """-> (state, step) from the newest checkpoint that restores, or (None, 0) when
        none does. A damaged checkpoint is skipped with a warning and, with
        ``quarantine`` (the run's own writer), moved aside so the run can save that step
        again; readers (evaluation) leave the files where they are."""
        for step in reversed(self.all_steps()):
            try:
                return self.restore(state_like, step), step
            except Exception as e:  # noqa: BLE001 - any failure to read back means damaged
                if _layout_mismatch(e):
                    raise ConfigError(
                        "checkpoint",
                        os.path.join(self.directory, str(step)),
                        "holds a train state of another layout than this version of the algorithm builds "
                        f"({_reason(e)}); it was written by another version of the project: restore it with "
                        "that version. Nothing was moved or deleted",
                    ) from None
                if quarantine:
                    self._quarantine(step, e)
                else:
                    print(
                        f"warning: skipped damaged checkpoint {step} in {self.directory} ({_reason(e)})",
                        file=sys.stderr,
                    )
        return None, 0

    def _quarantine(self, step: int, error: Exception) -> None:
        src = os.path.join(self.directory, str(step))
        dst_root = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        dst = os.path.join(dst_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(dst_root, exist_ok=True)
        self._mgr.close()
        shutil.move(src, dst)
        self._open()
        print(
            f"warning: checkpoint {step} in {self.directory} is damaged ({_reason(error)}); moved it to {dst} "
            "and fell back to the previous checkpoint",
            file=sys.stderr,
        )

    def close(self):
        self._mgr.close()
