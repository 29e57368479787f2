"""EMU's memory behaviour and EMU vs its backbone, from two runs' ``metrics.jsonl``.

    python -m experiments.studies.emu_engagement runs/emu_study/2s3z_emu runs/emu_study/2s3z_qmix \\
        --out results/emu_study

Both runs are cut to the iterations they have in common (same env steps). Writes
``engagement.md`` / ``engagement.json`` (per seed: env steps of the first desirable
entry, share of iterations after it with a positive incentive, desirable entries by
50k steps, the memory metrics at the end; the overall (time-normalized) win rate of
both runs per seed and the 95% bootstrap CI of the mean paired difference) and
``memory_metrics.png`` (the memory metrics' curves, one line per seed).
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.regularizer_study import metric_arrays  # noqa: E402
from marl import stats  # noqa: E402

MEMORY_METRICS = (
    "replay_hit_rate",
    "hit_positive_ratio",
    "incentive",
    "incentive_positive",
    "memory_desirable",
    "memory_revisited",
    "memory_positive_ratio",
    "write_revisits",
    "memory_size",
    "embed_loss",
)


def read(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def engagement(records: list[dict], by_steps: float = 50_000) -> dict:
    steps, desirable, _ = metric_arrays(records, "memory_desirable")
    _, incentive, _ = metric_arrays(records, "incentive")
    out = []
    for s in range(desirable.shape[0]):
        has = np.flatnonzero(np.nan_to_num(desirable[s]) > 0)
        first = int(has[0]) if has.size else None
        after = incentive[s, first + 1 :] if first is not None else np.zeros(0)
        last = {m: float(metric_arrays(records, m)[1][s, -1]) for m in MEMORY_METRICS}
        out.append(
            {
                "seed": s,
                "first_desirable_step": None if first is None else float(steps[first]),
                "desirable_by_50k": bool(first is not None and steps[first] <= by_steps),
                "iterations_after_first": int(after.size),
                "incentive_positive_share": float((np.nan_to_num(after) > 0).mean()) if after.size else None,
                "write_revisits_median": float(np.nanmedian(metric_arrays(records, "write_revisits")[1][s])),
                "end": last,
            }
        )
    return {"env_steps": float(steps[-1]), "iterations": int(len(steps)), "seeds": out}


def compare(emu: list[dict], base: list[dict], metric: str = "win_rate") -> dict:
    _, ve, ee = metric_arrays(emu, metric)
    _, vb, eb = metric_arrays(base, metric)
    oe, ob = stats.overall_scores(ve, ee), stats.overall_scores(vb, eb)
    diff = oe - ob
    lo, hi = stats.bootstrap_ci(diff, stat=np.mean)
    return {
        "metric": metric,
        "emu_overall": oe.tolist(),
        "backbone_overall": ob.tolist(),
        "emu_mean": float(np.mean(oe)),
        "backbone_mean": float(np.mean(ob)),
        "diff_mean": float(np.mean(diff)),
        "diff_ci95": [float(lo), float(hi)],
    }


def cut(records: list[dict], iterations: int) -> list[dict]:
    its = sorted({r["iteration"] for r in records})[:iterations]
    keep = set(its)
    return [r for r in records if r["iteration"] in keep]


def plot(records: list[dict], path: str) -> None:
    fig, axes = plt.subplots(2, 5, figsize=(20, 7))
    for ax, m in zip(axes.ravel(), MEMORY_METRICS, strict=True):
        steps, v, _ = metric_arrays(records, m)
        for s in range(v.shape[0]):
            ax.plot(steps, v[s], label=f"seed {s}")
        ax.set_title(m)
        ax.set_xlabel("env steps")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("emu_run")
    ap.add_argument("backbone_run")
    ap.add_argument("--out", default="results/emu_study")
    a = ap.parse_args()
    emu, base = read(a.emu_run), read(a.backbone_run)
    n = min(len({r["iteration"] for r in emu}), len({r["iteration"] for r in base}))
    emu, base = cut(emu, n), cut(base, n)
    res = {"engagement": engagement(emu), "win_rate": compare(emu, base), "return": compare(emu, base, "return")}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "engagement.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(emu, os.path.join(a.out, "memory_metrics.png"))
    e = res["engagement"]
    lines = [
        f"EMU memory behaviour, {e['iterations']} iterations ({e['env_steps']:.0f} env steps per seed)",
        "",
        "| seed | first desirable entry (env steps) | desirable by 50k | iterations after it | "
        "incentive > 0 on | median write revisits | end: hit rate | end: hits with p > 0 | "
        "end: desirable entries | end: N_call > 1 | end: N_xi > 0 | end: entries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in e["seeds"]:
        z = s["end"]
        share = "-" if s["incentive_positive_share"] is None else f"{s['incentive_positive_share']:.1%}"
        lines.append(
            f"| {s['seed']} | {s['first_desirable_step']} | {s['desirable_by_50k']} | "
            f"{s['iterations_after_first']} | {share} | {s['write_revisits_median']:.3f} | "
            f"{z['replay_hit_rate']:.3f} | {z['hit_positive_ratio']:.3f} | {z['memory_desirable']:.3f} | "
            f"{z['memory_revisited']:.3f} | {z['memory_positive_ratio']:.3f} | {z['memory_size']:.0f} |"
        )
    for m in ("win_rate", "return"):
        c = res[m]
        lines += [
            "",
            f"Overall (time-normalized) {m}, per seed: EMU "
            + ", ".join(f"{x:.4f}" for x in c["emu_overall"])
            + "; backbone "
            + ", ".join(f"{x:.4f}" for x in c["backbone_overall"])
            + f". Mean EMU {c['emu_mean']:.4f}, backbone {c['backbone_mean']:.4f}; "
            f"difference {c['diff_mean']:+.4f}, 95% bootstrap CI [{c['diff_ci95'][0]:+.4f}, "
            f"{c['diff_ci95'][1]:+.4f}] (paired by seed).",
        ]
    with open(os.path.join(a.out, "engagement.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
