"""Side-by-side speed and agreement of the project's statistics (``marl.stats``) and
rliable's (``rliable.metrics.aggregate_iqm``, ``rliable.library.get_interval_estimates``)
at the sizes the studies use: 3 to 10 seeds per arm, 1 to 3 tasks, 2,000 to 10,000
bootstrap resamples, and a learning-curve band of 5 seeds x 200 points.

    pip install rliable==1.2.0   # bench only; not a project dependency
    python -m experiments.bench_stats
    python -m experiments.bench_stats --seeds 3 10 --resamples 2000 --repeats 9

Per size: (a) the IQM of the pooled scores, ours ``iqm`` against ``aggregate_iqm``
(``scipy.stats.trim_mean(x, 0.25)``); (b) the 95% stratified-bootstrap percentile interval
of that IQM, ours ``stratified_bootstrap_ci`` against ``get_interval_estimates`` (runs
resampled within each task, ``method="percentile"``). The two draw different resamples, so
their bounds differ by bootstrap noise: the table gives the largest bound difference over
the score range beside the same figure for ours at two seeds (the noise it should match),
and, as an exact check of the definitions, the difference when our IQM and quantiles are
applied to rliable's own resamples (rliable draws them with ``numpy.random.choice`` from
the global state, so reseeding replays them). (c) Time per call, point estimate and
interval together as a study computes them: timed calls alternate, median of ``repeats``,
so both come from the same window.

The band row compares ours ``bootstrap_band`` (mean curve over seeds, whole seed curves
resampled) with ``get_interval_estimates`` on ``[seeds, 1, points]`` scores with the mean
over seeds per point as the statistic (rliable's sample-efficiency curves); rliable draws
the seed independently per point, which leaves each point's interval the same in
distribution.

Exits with code 2 and an install hint when rliable is not importable.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import sys
import time
from typing import Callable, Optional

import numpy as np
import tyro

from experiments.bench_output import write_rows
from experiments.cli import EXIT_INVALID, entry
from marl import stats

INSTALL_HINT = "rliable is not installed; it is a bench-only dependency: pip install rliable==1.2.0"


@dataclasses.dataclass(frozen=True)
class Args:
    seeds: tuple[int, ...] = (3, 5, 10)
    """runs per task (the studies use 3 to 10 seeds per arm)"""
    tasks: tuple[int, ...] = (1, 3)
    """tasks pooled in one aggregate IQM"""
    resamples: tuple[int, ...] = (2000, 10000)
    """bootstrap resamples (report.py's default: 2000)"""
    band_seeds: int = 5
    band_points: int = 200
    band_resamples: int = 1000
    """report.py draws its learning-curve bands with min(bootstrap_samples, 1000)"""
    confidence: float = 0.95
    repeats: int = 5
    seed: int = 0
    out: Optional[str] = "runs/bench/bench_stats.json"


def load_rliable():
    """``(library, metrics)`` from rliable, or ``None`` when it is not importable."""
    try:
        from rliable import library, metrics
    except ImportError:
        return None
    return library, metrics


# ---------------------------------------------------------------- data


def make_scores(seeds: int, tasks: int, seed: int = 0) -> np.ndarray:
    """Final win rates, [seeds, tasks]: a different level per task, one weak seed per task."""
    rng = np.random.default_rng(seed)
    level = np.linspace(0.3, 0.8, tasks)
    x = level + 0.12 * rng.standard_normal((seeds, tasks))
    x[0] -= 0.25  # the seed an IQM is meant to be robust to
    return np.clip(x, 0.0, 1.0)


def make_curves(seeds: int, points: int, seed: int = 0) -> np.ndarray:
    """Learning curves, [seeds, points]: a noisy rise from 0 at a seed-specific rate."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, points)
    rate = rng.uniform(2.0, 6.0, size=(seeds, 1))
    return np.clip(1.0 - np.exp(-rate * t) + 0.05 * rng.standard_normal((seeds, points)), 0.0, 1.0)


# ---------------------------------------------------------------- our side


def ours_iqm_ci(scores: np.ndarray, num_samples: int, confidence: float, seed: int):
    """Point estimate and interval as a study computes them with ``marl.stats``."""
    point = stats.aggregate(scores, stats.iqm)
    lo, hi = stats.stratified_bootstrap_ci(scores, stats.iqm, num_samples, confidence, seed)
    return point, np.array([lo, hi])


def ours_draws(scores: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """The run indices ``stratified_bootstrap_ci`` draws, [num_samples, runs, tasks]."""
    rng = np.random.default_rng(seed)
    runs, tasks = scores.shape
    return np.stack([rng.integers(0, runs, size=(num_samples, runs)) for _ in range(tasks)], axis=-1)


def iqm_ci_from_draws(scores: np.ndarray, draws: np.ndarray, confidence: float) -> np.ndarray:
    """Our IQM and percentile rule applied to given run indices [num_samples, runs, tasks]
    (resample ``b`` of task ``j`` takes the runs ``draws[b, :, j]``)."""
    num_samples, runs, tasks = draws.shape
    resampled = scores[draws, np.arange(tasks)].reshape(num_samples, runs * tasks)
    tail = (1.0 - confidence) / 2.0
    return np.quantile(stats.iqm(resampled, axis=-1), [tail, 1.0 - tail])


def ours_band(curves: np.ndarray, num_samples: int, confidence: float, seed: int):
    center, lo, hi = stats.bootstrap_band(curves, num_samples, confidence, seed)
    return center, np.stack([lo, hi])


# ---------------------------------------------------------------- rliable's side


def rliable_iqm_ci(rl, scores: np.ndarray, num_samples: int, confidence: float, seed: int):
    library, metrics = rl
    np.random.seed(seed)  # StratifiedBootstrap draws from numpy's global state
    point, interval = library.get_interval_estimates(
        {"arm": scores},
        lambda x: np.array([metrics.aggregate_iqm(x)]),
        method="percentile",
        reps=num_samples,
        confidence_interval_size=confidence,
    )
    return float(point["arm"][0]), interval["arm"][:, 0]


def rliable_draws(scores: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """The run indices ``rliable_iqm_ci`` draws (``StratifiedBootstrap.update_indices``)."""
    np.random.seed(seed)
    return np.stack([np.random.choice(scores.shape[0], scores.shape, replace=True) for _ in range(num_samples)])


def rliable_band(rl, curves: np.ndarray, num_samples: int, confidence: float, seed: int):
    library, _ = rl
    np.random.seed(seed)
    point, interval = library.get_interval_estimates(
        {"arm": curves[:, None, :]},
        lambda x: x.mean(axis=(0, 1)),
        method="percentile",
        reps=num_samples,
        confidence_interval_size=confidence,
    )
    return point["arm"], interval["arm"]


# ---------------------------------------------------------------- timing


def interleaved_median(fns: dict[str, Callable[[], object]], repeats: int, calls: int = 1) -> dict[str, float]:
    """Median seconds per call of each function; the functions alternate (order flipped
    every repeat) so that all medians come from the same window."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[n]()
            times[n].append((time.perf_counter() - t0) / calls)
    return {n: statistics.median(t) for n, t in times.items()}


def bench_iqm(rl, seeds: int, tasks: int, num_samples: int, args: Args) -> dict:
    _, metrics = rl
    scores = make_scores(seeds, tasks, args.seed)
    span = float(scores.max() - scores.min())
    conf, s = args.confidence, args.seed

    point, ci = ours_iqm_ci(scores, num_samples, conf, s)
    _, ci_other_seed = ours_iqm_ci(scores, num_samples, conf, s + 1)
    rl_point, rl_ci = rliable_iqm_ci(rl, scores, num_samples, conf, s)
    replay = iqm_ci_from_draws(scores, rliable_draws(scores, num_samples, s), conf)

    point_t = interleaved_median(
        {"ours": lambda: stats.aggregate(scores, stats.iqm), "rliable": lambda: metrics.aggregate_iqm(scores)},
        args.repeats,
        calls=200,
    )
    ci_t = interleaved_median(
        {
            "ours": lambda: ours_iqm_ci(scores, num_samples, conf, s),
            "rliable": lambda: rliable_iqm_ci(rl, scores, num_samples, conf, s),
        },
        args.repeats,
    )
    return {
        "kind": "iqm_ci",
        "seeds": seeds,
        "tasks": tasks,
        "resamples": num_samples,
        "iqm_ours_us": 1e6 * point_t["ours"],
        "iqm_rliable_us": 1e6 * point_t["rliable"],
        "ours_ms": 1e3 * ci_t["ours"],
        "rliable_ms": 1e3 * ci_t["rliable"],
        "rliable_over_ours": ci_t["rliable"] / ci_t["ours"],
        "iqm_abs_diff": abs(point - rl_point),
        "ci_ours": ci.tolist(),
        "ci_rliable": rl_ci.tolist(),
        "ci_diff_over_range": float(np.max(np.abs(ci - rl_ci)) / span),
        "ci_seed_noise_over_range": float(np.max(np.abs(ci - ci_other_seed)) / span),
        "same_draws_abs_diff": float(np.max(np.abs(replay - rl_ci))),
    }


def bench_band(rl, args: Args) -> dict:
    curves = make_curves(args.band_seeds, args.band_points, args.seed)
    span = float(curves.max() - curves.min())
    n, conf, s = args.band_resamples, args.confidence, args.seed
    center, band = ours_band(curves, n, conf, s)
    _, band_other_seed = ours_band(curves, n, conf, s + 1)
    rl_center, rl_band = rliable_band(rl, curves, n, conf, s)
    t = interleaved_median(
        {"ours": lambda: ours_band(curves, n, conf, s), "rliable": lambda: rliable_band(rl, curves, n, conf, s)},
        args.repeats,
    )
    return {
        "kind": "band",
        "seeds": args.band_seeds,
        "points": args.band_points,
        "resamples": n,
        "ours_ms": 1e3 * t["ours"],
        "rliable_ms": 1e3 * t["rliable"],
        "rliable_over_ours": t["rliable"] / t["ours"],
        "center_abs_diff": float(np.max(np.abs(center - rl_center))),
        "ci_diff_over_range": float(np.max(np.abs(band - rl_band)) / span),
        "ci_seed_noise_over_range": float(np.max(np.abs(band - band_other_seed)) / span),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| seeds x tasks | resamples | ours ms | rliable ms | rliable / ours | IQM ours / rliable us "
        "| IQM diff | CI diff / range | ours seed-to-seed / range | same draws diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "iqm_ci":
            lines.append(
                f"| {r['seeds']} x {r['tasks']} | {r['resamples']:,} | {r['ours_ms']:.2f} | {r['rliable_ms']:.1f} "
                f"| {r['rliable_over_ours']:.0f} | {r['iqm_ours_us']:.1f} / {r['iqm_rliable_us']:.1f} "
                f"| {r['iqm_abs_diff']:.0e} | {r['ci_diff_over_range']:.3f} | {r['ci_seed_noise_over_range']:.3f} "
                f"| {r['same_draws_abs_diff']:.0e} |"
            )
        else:
            lines.append(
                f"| band {r['seeds']} x {r['points']} pts | {r['resamples']:,} | {r['ours_ms']:.2f} "
                f"| {r['rliable_ms']:.1f} | {r['rliable_over_ours']:.0f} | - | {r['center_abs_diff']:.0e} "
                f"| {r['ci_diff_over_range']:.3f} | {r['ci_seed_noise_over_range']:.3f} | - |"
            )
    return "\n".join(lines)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("rliable", "arch", "numpy", "scipy", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(args: Args, rl=None, command: Optional[str] = None) -> list[dict]:
    rl = rl if rl is not None else load_rliable()
    rows = [
        bench_iqm(rl, seeds, tasks, n, args) for seeds in args.seeds for tasks in args.tasks for n in args.resamples
    ]
    rows.append(bench_band(rl, args))
    print(markdown(rows))
    if args.out:
        write_rows(args.out, args, rows)
        with open(args.out) as f:  # the command and library versions beside write_rows' meta
            written = json.load(f)
        written["meta"]["command"] = command
        written["meta"]["versions"] = _versions()
        with open(args.out, "w") as f:
            json.dump(written, f, indent=2)
    return rows


@entry(compile_cache=False)
def cli(argv=None) -> int:
    args = tyro.cli(Args, args=argv)
    rl = load_rliable()
    if rl is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_INVALID
    argv = sys.argv[1:] if argv is None else list(argv)
    main(args, rl, shlex.join(["python", "-m", "experiments.bench_stats", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
