"""Statistics for comparing runs over few seeds, in the spirit of rliable
(Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice").

- :func:`iqm`: interquartile mean, the 25%-trimmed mean (robust to one bad seed,
  less noisy than the median);
- :func:`bootstrap_ci`: percentile-bootstrap interval of a statistic of one sample;
- :func:`stratified_bootstrap_ci`: the same over scores of several tasks, resampling
  the runs of each task separately (each resample keeps every task's number of runs),
  then aggregating all resampled scores;
- :func:`bootstrap_band`: pointwise interval of the mean learning curve over seeds,
  resampling whole seed curves;
- :func:`final_scores`: each seed's score over the last part of training.

All functions are numpy-only and deterministic given ``seed``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import numpy as np


def iqm(x, axis: int = -1):
    """Interquartile mean along ``axis``: drop the ``floor(n / 4)`` lowest and as many
    highest of the ``n`` values, average the rest (``scipy.stats.trim_mean(x, 0.25)``).

    ``iqm([1, ..., 8]) == mean(3, 4, 5, 6) == 4.5``; fewer than 4 values give the mean.
    NaN propagates. Returns a float for 1-D input, else an array without ``axis``.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1)
    n = a.shape[axis]
    if n == 0:
        raise ValueError("iqm of an empty array")
    cut = n // 4
    kept = np.take(np.sort(a, axis=axis), np.arange(cut, n - cut), axis=axis)
    out = kept.mean(axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def _check_interval_args(num_samples: int, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def _percentiles(stats: np.ndarray, confidence: float) -> tuple:
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(np.asarray(stats, dtype=np.float64), [tail, 1.0 - tail], axis=0)
    return lo, hi


def bootstrap_ci(
    x, stat: Callable = iqm, num_samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``stat`` for the 1-D sample ``x``.

    ``num_samples`` resamples of ``len(x)`` values drawn with replacement
    (``numpy.random.default_rng(seed)``); ``stat(resamples, axis=-1)`` must be
    vectorized. Returns the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles of the resampled statistic as floats.
    """
    sample = np.asarray(x, dtype=np.float64).ravel()
    if sample.size == 0:
        raise ValueError("bootstrap_ci of an empty sample")
    _check_interval_args(num_samples, confidence)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, sample.size, size=(num_samples, sample.size))
    lo, hi = _percentiles(stat(sample[draws], axis=-1), confidence)
    return float(lo), float(hi)


Scores = Union[np.ndarray, Sequence, Mapping]


def _strata(scores: Scores) -> list[np.ndarray]:
    """Tasks as a list of 1-D arrays of run scores: a 2-D numpy array is [runs, tasks]
    (a 1-D one is a single task); a list or tuple holds one sequence per task; a dict
    maps task -> scores."""
    if isinstance(scores, Mapping):
        groups = [np.asarray(v, dtype=np.float64).ravel() for v in scores.values()]
    elif isinstance(scores, np.ndarray):
        if scores.ndim not in (1, 2):
            raise ValueError(f"scores must be [runs, tasks] or [runs], got shape {scores.shape}")
        arr = scores.astype(np.float64).reshape(scores.shape[0], -1)
        groups = [arr[:, j] for j in range(arr.shape[1])]
    else:
        groups = [np.asarray(v, dtype=np.float64).ravel() for v in scores]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("stratified bootstrap needs at least one run in every task")
    return groups


def aggregate(scores: Scores, stat: Callable = iqm) -> float:
    """``stat`` of all run scores of all tasks pooled (rliable's aggregate IQM)."""
    return float(stat(np.concatenate(_strata(scores)), axis=-1))


def stratified_bootstrap_ci(
    scores: Scores, stat: Callable = iqm, num_samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of ``stat`` over the pooled scores of several tasks, with
    runs resampled with replacement *within* each task (stratified bootstrap).

    ``scores``: a [runs, tasks] array, a list of per-task 1-D arrays (tasks may have
    different numbers of runs), or a dict task -> 1-D array. Tasks are resampled in
    order with one ``default_rng(seed)``, so one task gives exactly
    :func:`bootstrap_ci` of its scores. Because every resample keeps each task's run
    count, differences between tasks do not widen the interval; only the spread
    of runs within tasks does.
    """
    groups = _strata(scores)
    _check_interval_args(num_samples, confidence)
    rng = np.random.default_rng(seed)
    resampled = [g[rng.integers(0, g.size, size=(num_samples, g.size))] for g in groups]
    lo, hi = _percentiles(stat(np.concatenate(resampled, axis=-1), axis=-1), confidence)
    return float(lo), float(hi)


def nanmean(x, axis: int = -1):
    """Mean ignoring NaN (NaN where every value is NaN), without numpy's warning."""
    a = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(a)
    count = ok.sum(axis=axis)
    total = np.where(ok, a, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_band(curves, num_samples: int = 1000, confidence: float = 0.95, seed: int = 0, stat: Callable = nanmean):
    """Mean curve over seeds and its pointwise percentile-bootstrap band.

    ``curves``: [seeds, points]. Each resample draws whole seed curves with
    replacement (the same draw for every point, so the band reflects seed-to-seed
    variation of the curve). NaN entries (a seed without data at a point) are
    ignored by the default statistic. Returns ``(center, lo, hi)``, each [points].
    """
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"curves must be [seeds, points] with at least one seed, got shape {c.shape}")
    _check_interval_args(num_samples, confidence)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, c.shape[0], size=(num_samples, c.shape[0]))
    stats = stat(c[draws], axis=1)  # [num_samples, points]
    with np.errstate(invalid="ignore"):
        lo, hi = _percentiles(stats, confidence)
    return stat(c, axis=0), lo, hi


def final_scores(values, episodes=None, fraction: float = 0.1) -> np.ndarray:
    """Each seed's score at the end of training: the episode-weighted mean of
    ``values [seeds, iterations]`` over the last ``fraction`` of the iterations
    (at least one). Iterations that ended no episode (``episodes == 0``) or hold NaN
    are skipped; a seed with none left in the window falls back to its last valid
    value before the window (NaN if it never had one). ``episodes=None``: equal weights.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be [seeds, iterations], got shape {v.shape}")
    e = np.ones_like(v) if episodes is None else np.asarray(episodes, dtype=np.float64)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    width = max(1, int(round(fraction * v.shape[1])))
    out = np.full(v.shape[0], np.nan)
    valid = np.isfinite(v) & (e > 0)
    for s in range(v.shape[0]):
        ok = valid[s, -width:]
        if ok.any():
            w = e[s, -width:][ok]
            out[s] = float((v[s, -width:][ok] * w).sum() / w.sum())
            continue
        before = np.flatnonzero(valid[s, :-width])
        if before.size:
            out[s] = float(v[s, before[-1]])
    return out


def overall_scores(values, episodes=None) -> np.ndarray:
    """Each seed's time-normalized score over the whole run: the mean over iterations
    (equal env steps each) of ``values [seeds, iterations]``, i.e. the area under the
    learning curve divided by the training length (EMU's "overall" win rate).
    Iterations that ended no episode (``episodes == 0``) or hold NaN carry the
    previous valid value; those before a seed's first valid value are skipped (NaN if
    it never had one)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be [seeds, iterations], got shape {v.shape}")
    e = np.ones_like(v) if episodes is None else np.asarray(episodes, dtype=np.float64)
    c = np.where(np.isfinite(v) & (e > 0), v, np.nan)
    for i in range(1, c.shape[1]):
        c[:, i] = np.where(np.isnan(c[:, i]), c[:, i - 1], c[:, i])
    out = np.full(v.shape[0], np.nan)
    for s in range(v.shape[0]):
        ok = np.isfinite(c[s])
        if ok.any():
            out[s] = float(c[s][ok].mean())
    return out
