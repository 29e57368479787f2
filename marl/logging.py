"""Metrics output: one JSON line per (iteration, seed) in ``metrics.jsonl``, and
TensorBoard scalars (mean over seeds) when ``tensorboardX`` is installed
(``pip install -e .[tensorboard]``).

Lines carry ``iteration`` (completed updates, 1-based), ``env_steps`` (per seed),
``seed`` (index on the vmapped axis) and every metric the update returned.

The file survives a kill at any moment: new lines are appended and flushed after each
chunk (a kill can at worst cut the last line, which readers skip), and a resume that
drops the lines past its checkpoint replaces the file atomically (temp file, fsync,
rename), so no step destroys data before its replacement is durable. Readers skip
damaged lines with a warning that counts them; a resume keeps a copy of a file that
had damaged lines (``metrics.jsonl.damaged-<time>``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from marl.rundir import atomic_write

EPISODE_STATS = ("return", "length", "win_rate")
"""metrics averaged over the episodes that ended in an iteration (``marl.episodes.episode_metrics``)"""


def parse_metrics_lines(lines, source: str = "metrics.jsonl", warn: bool = True) -> tuple[list[dict], int]:
    """-> (records, number of damaged lines skipped). A line is damaged when it is not a
    JSON object with an integer ``iteration`` (a cut last line, garbage, ...)."""
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int):
            bad += 1
            continue
        records.append(rec)
    if bad and warn:
        print(f"warning: skipped {bad} damaged line(s) of {source}", file=sys.stderr)
    return records, bad


def read_metrics(run_dir: str, warn: bool = True) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (damaged lines skipped, with a warning)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return parse_metrics_lines(f, path, warn)[0]


class MetricsWriter:
    def __init__(self, run_dir: str, truncate_after: int = 0, resume: bool | None = None):
        """``resume`` (default: ``truncate_after > 0``): keep the lines up to iteration
        ``truncate_after``, which the checkpoint covers, replacing the file atomically;
        the later ones are recomputed identically. Otherwise start a new file."""
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume is None:
            resume = truncate_after > 0
        if resume:
            kept, bad = [], 0
            if os.path.exists(self.path):
                with open(self.path, errors="replace") as f:
                    records, bad = parse_metrics_lines(f, self.path)
                kept = [r for r in records if r["iteration"] <= truncate_after]
                if bad:  # keep the original for inspection: nothing written is lost
                    shutil.copyfile(self.path, f"{self.path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self._f = open(self.path, "a")
        else:
            self._f = open(self.path, "w")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
        except ImportError:
            pass

    def sync(self) -> None:
        """Make every line written so far durable (called before each checkpoint)."""
        self._f.flush()
        os.fsync(self._f.fileno())

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
