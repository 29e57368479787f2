"""Learning curves from ``metrics.jsonl``: mean over seeds with a min-max band."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from marl.logging import read_metrics


def curves(records: list[dict], metric: str, min_episodes: bool = True):
    """-> (env_steps [I], values [seeds, I]) for ``metric``; iterations where a seed
    finished no episode carry that seed's previous value forward."""
    its = sorted({r["iteration"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    idx = {it: i for i, it in enumerate(its)}
    vals = np.full((len(seeds), len(its)), np.nan)
    steps = np.zeros(len(its))
    for r in records:
        if metric not in r:
            continue
        i = idx[r["iteration"]]
        steps[i] = r["env_steps"]
        v = r[metric]
        if min_episodes and r.get("episodes", 1) == 0:
            continue
        vals[r["seed"], i] = float(v)
    for s in range(len(seeds)):  # carry forward
        for i in range(1, len(its)):
            if np.isnan(vals[s, i]):
                vals[s, i] = vals[s, i - 1]
    return steps, vals


def plot_run(run_dir: str, metrics=("return", "win_rate"), path: str | None = None) -> str:
    import matplotlib.pyplot as plt  # headless: matplotlib picks Agg itself; a notebook keeps its backend

    records = read_metrics(run_dir)
    metrics = [m for m in metrics if any(m in r for r in records)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        steps, vals = curves(records, m)
        with warnings.catch_warnings():  # iterations before any episode ended are NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
        ax.plot(steps, mean, label=f"mean of {vals.shape[0]} seeds")
        ax.fill_between(steps, lo, hi, alpha=0.25, label="min-max")
        ax.set_xlabel("env steps (per seed)")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    path = path or os.path.join(run_dir, "learning_curve.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_grid(grid, axes, path_prefix: str, title: str = "") -> tuple[str, str]:
    """Writes ``<prefix>.json`` (the two axes, returns [M][F]) and a heatmap ``<prefix>.png``;
    returns both paths. ``axes``: ``((field, values), (field, values))`` (:func:`stress_axes`);
    ``grid``: ``[M, F]`` (or ``[S, M, F]``: the heatmap shows the mean over seeds, the JSON
    keeps every seed)."""
    import matplotlib.pyplot as plt  # headless: matplotlib picks Agg itself; a notebook keeps its backend

    (n1, v1), (n2, v2) = axes
    grid = np.asarray(grid, np.float64)
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    with open(path_prefix + ".json", "w") as fh:
        json.dump(
            {
                "title": title,
                n1: list(map(float, v1)),
                n2: list(map(float, v2)),
                "axes": (["seed"] if grid.ndim == 3 else []) + [n1, n2],
                "returns": grid.tolist(),
            },
            fh,
        )
    mean = grid.mean(0) if grid.ndim == 3 else grid
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(mean, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(v2)), [f"{v:g}" for v in v2], rotation=45)
    ax.set_yticks(range(len(v1)), [f"{v:g}" for v in v1])
    ax.set_xlabel(n2)
    ax.set_ylabel(n1)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="protagonist return")
    fig.tight_layout()
    fig.savefig(path_prefix + ".png", dpi=100)
    plt.close(fig)
    return path_prefix + ".json", path_prefix + ".png"
