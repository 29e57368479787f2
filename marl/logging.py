"""Metrics output: one JSON line per (iteration, seed) in ``metrics.jsonl``, and
TensorBoard scalars (mean over seeds) when ``tensorboardX`` is installed
(``pip install -e .[tensorboard]``).

Lines carry ``iteration`` (completed updates, 1-based), ``env_steps`` (per seed),
``seed`` (index on the vmapped axis) and every metric the update returned.
"""

from __future__ import annotations

import json
import os

import numpy as np

EPISODE_STATS = ("return", "length", "win_rate")
"""metrics averaged over the episodes that ended in an iteration (``envs.wrappers.episode_metrics``)"""


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    def __init__(self, run_dir: str, truncate_after: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if truncate_after > 0:
            # resume: keep what the checkpoint covers; later lines are recomputed
            kept = [r for r in read_metrics(run_dir) if r["iteration"] <= truncate_after]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self._f = open(self.path, "a")
        else:
            self._f = open(self.path, "w")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
        except ImportError:
            pass

    def write(self, metrics: dict, it0: int, steps_per_iter: int, upto: int | None = None) -> None:
        """metrics: name -> [seeds, chunk]; writes iterations it0+1 .. it0+upto."""
        arrays = {k: np.asarray(v) for k, v in metrics.items()}
        seeds, length = next(iter(arrays.values())).shape[:2]
        upto = length if upto is None else upto
        lines = []
        for j in range(upto):
            it = it0 + j + 1
            for s in range(seeds):
                rec = {"iteration": it, "env_steps": it * steps_per_iter, "seed": s}
                rec.update({k: _py(v[s, j]) for k, v in arrays.items()})
                lines.append(json.dumps(rec))
            if self._tb is not None:
                for k, v in arrays.items():
                    self._tb.add_scalar(k, float(np.mean(v[:, j])), it * steps_per_iter)
        self._f.write("\n".join(lines) + ("\n" if lines else ""))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _py(x):
    x = np.asarray(x)
    if x.ndim:
        return x.tolist()
    v = x.item()
    return v if not isinstance(v, float) or np.isfinite(v) else str(v)
