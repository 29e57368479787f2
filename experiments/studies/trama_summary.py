"""TRAMA vs its QPLEX backbone, from the runs of ``trama_vs_qplex.sh``: the clustering's
engagement per seed and the return comparison, paired by seed.

    python -m experiments.studies.trama_summary runs/trama_study --sets surComb3 surComb4 \\
        --out results/trama_study

For each task set it reads ``<set>_trama`` and ``<set>_qplex`` (cut to the iterations
both have) and writes ``summary.md`` / ``summary.json``:
- per TRAMA seed at the end: ``cluster_ari`` (k-means labels vs the true tasks),
  ``class_accuracy`` of the class predictor next to ``class_majority_rate`` (the accuracy
  of a constant guess), codes in use, cluster sizes, accepted clusterings, and the env
  steps of the first accepted clustering;
- the return of both methods per seed, final (episode-weighted mean of the last 10% of
  iterations) and overall (mean over all iterations, time-normalized), the IQM of each
  with its 95% percentile-bootstrap CI, and the mean paired difference TRAMA - QPLEX with
  its bootstrap CI.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from experiments.regularizer_study import final_per_seed, metric_arrays
from experiments.studies.emu_engagement import cut
from marl import stats
from marl.logging import read_metrics as read

ENGAGEMENT = ("cluster_ari", "class_accuracy", "class_majority_rate", "codes_in_use", "clusterings")


def engagement(records: list[dict]) -> dict:
    """The clustering metrics of each seed at the last iteration, and when the first
    accepted clustering happened."""
    steps, clustered, _ = metric_arrays(records, "clustered")
    out = {}
    for name in ENGAGEMENT + tuple(k for k in sorted(records[-1]) if k.startswith("cluster_size_")):
        out[name] = metric_arrays(records, name)[1][:, -1].tolist()
    first = [float(steps[np.argmax(c > 0)]) if (c > 0).any() else None for c in clustered]
    out["first_clustering_env_steps"] = first
    return out


def interval(x: np.ndarray, stat=stats.iqm) -> dict:
    lo, hi = stats.bootstrap_ci(x, stat=stat)
    return {"value": float(stat(x)), "ci95": [float(lo), float(hi)]}


def compare(trama: list[dict], base: list[dict], metric: str = "return") -> dict:
    """Final and overall scores of both methods per seed, their IQMs and the paired difference."""
    _, vt, et = metric_arrays(trama, metric)
    _, vb, eb = metric_arrays(base, metric)
    out = {"metric": metric}
    for kind, ft, fb in (
        ("final", final_per_seed(vt, et, 0.1), final_per_seed(vb, eb, 0.1)),
        ("overall", stats.overall_scores(vt, et), stats.overall_scores(vb, eb)),
    ):
        out[kind] = {
            "trama": ft.tolist(),
            "qplex": fb.tolist(),
            "trama_iqm": interval(ft),
            "qplex_iqm": interval(fb),
            "diff_mean": interval(ft - fb, stat=np.mean),
        }
    return out


def summarize(runs: str, task_set: str) -> dict:
    trama, base = read(os.path.join(runs, f"{task_set}_trama")), read(os.path.join(runs, f"{task_set}_qplex"))
    n = min(len({r["iteration"] for r in trama}), len({r["iteration"] for r in base}))
    trama, base = cut(trama, n), cut(base, n)
    return {
        "set": task_set,
        "iterations": n,
        "env_steps_per_seed": float(max(r["env_steps"] for r in trama)),
        "seeds": len({r["seed"] for r in trama}),
        "engagement": engagement(trama),
        "return": compare(trama, base, "return"),
        "win_rate": compare(trama, base, "win_rate"),
    }


def _fmt(xs, digits=3):
    return ", ".join("-" if x is None else f"{x:.{digits}f}" for x in xs)


def _ci(d):
    return f"{d['value']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def markdown(results: list[dict]) -> str:
    lines = ["# TRAMA vs QPLEX on multi-task SMAX", ""]
    for r in results:
        e = r["engagement"]
        lines += [
            f"## {r['set']}: {r['seeds']} seeds, {r['iterations']} iterations = {r['env_steps_per_seed']:,.0f} "
            "env steps per seed",
            "",
            "| seed | first clustering (env steps) | clusterings | cluster_ari | class_accuracy | "
            "class_majority_rate | codes in use | cluster sizes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        sizes = sorted(k for k in e if k.startswith("cluster_size_"))
        for s in range(r["seeds"]):
            first = e["first_clustering_env_steps"][s]
            lines.append(
                f"| {s} | {'-' if first is None else f'{first:,.0f}'} | {e['clusterings'][s]:.0f} | "
                f"{e['cluster_ari'][s]:.3f} | {e['class_accuracy'][s]:.3f} | "
                f"{e['class_majority_rate'][s]:.3f} | {e['codes_in_use'][s]:.0f} | "
                f"{', '.join(f'{e[k][s]:.2f}' for k in sizes)} |"
            )
        lines += [
            "",
            "| metric | score | TRAMA per seed | QPLEX per seed | TRAMA IQM [95% CI] | QPLEX IQM [95% CI] | "
            "mean difference TRAMA - QPLEX [95% CI, paired by seed] |",
            "|---|---|---|---|---|---|---|",
        ]
        for metric in ("return", "win_rate"):
            for kind in ("final", "overall"):
                c = r[metric][kind]
                d = c["diff_mean"]
                lines.append(
                    f"| {metric} | {kind} | {_fmt(c['trama'])} | {_fmt(c['qplex'])} | {_ci(c['trama_iqm'])} | "
                    f"{_ci(c['qplex_iqm'])} | {d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |"
                )
        lines.append("")
    lines += [
        "Final: each seed's episode-weighted mean over the last 10% of iterations. Overall: its mean over all "
        "iterations (time-normalized). IQM over seeds; percentile bootstrap, 2000 resamples, seed 0.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", help="the study's runs directory")
    p.add_argument("--sets", nargs="+", default=["surComb3", "surComb4"])
    p.add_argument("--out", default="results/trama_study")
    a = p.parse_args(argv)
    missing = [
        f"{s}_{m}"
        for s in a.sets
        for m in ("trama", "qplex")
        if not os.path.exists(os.path.join(a.runs, f"{s}_{m}", "metrics.jsonl"))
    ]
    if missing:
        print(f"error: invalid runs={a.runs!r}: no metrics.jsonl for {missing}", file=sys.stderr)
        return 2
    results = [summarize(a.runs, s) for s in a.sets]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
