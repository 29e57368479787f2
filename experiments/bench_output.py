"""The JSON a benchmark script writes: its rows beside the machine and settings they were
measured on (backend, devices, CPU count, jax version, load average), so a figure can be
read with the conditions that produced it."""

from __future__ import annotations

import dataclasses
import json
import os
import platform

import jax


def write_rows(path: str, args, rows: list) -> None:
    """Writes ``{"meta": ..., "rows": rows}`` to ``path`` (``args``: the script's dataclass)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = {
        "args": dataclasses.asdict(args),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {path}")
