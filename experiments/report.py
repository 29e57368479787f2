"""Learning curves and final-performance tables from a directory of runs.

    python -m experiments.report runs/regularizer_study/wpr_3m
    python -m experiments.report runs/sweeps/my_sweep --out runs/sweeps/my_sweep/report
    python -m experiments.report runs --group-by run --metric return --final-fraction 0.2
    python -m experiments.report runs/trama_study --metric return --panels cluster_ari class_accuracy

Every directory below the given ones that holds ``run.json`` and ``metrics.jsonl`` (as
the runner writes them) is read. Runs are grouped into *methods* per *task*
(environment): by default a method is the run's algorithm, plus the regularizer kind
of a study run and the configuration of a sweep (a sweep directory yields one method
per configuration, its rows split back into configurations and seeds); runs with the
same method and task pool their seeds. ``--group-by run`` makes every run directory a
method of its own.

Outputs (``--out``, default ``<first dir>/report``):

- ``curves_<task>.png``: one panel per metric, one line per method: the mean over seeds
  with a pointwise percentile-bootstrap band (whole seed curves resampled);
- ``report.md`` / ``report.json``: per (task, method), the interquartile mean over seeds
  of each seed's final score (episode-weighted mean over the last ``--final-fraction``
  of the iterations) with a percentile-bootstrap CI over seeds; per method over all its
  tasks, the IQM of all (task, seed) scores with a stratified-bootstrap CI (seeds
  resampled within each task, rliable-style). Scores are raw: aggregate across tasks
  only when their scales are comparable (win rates are). Also per (task, method): the
  IQM of each seed's overall (time-normalized) score, its mean over all iterations.

Metric ``auto``: the win rate when any run of the task won an episode, else the return.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import numpy as np
import tyro

from experiments.cli import entry
from marl.logging import EPISODE_STATS, read_metrics
from marl.stats import bootstrap_band, bootstrap_ci, final_scores, iqm, overall_scores, stratified_bootstrap_ci


@dataclasses.dataclass(frozen=True)
class ReportArgs:
    dirs: tyro.conf.Positional[tuple[str, ...]]
    """directories holding runs (searched recursively)"""
    out: Optional[str] = None
    """output directory (default: <first dir>/report)"""
    metric: str = "auto"
    """auto (win_rate where any episode was won, else return) or any logged metric"""
    panels: tuple[str, ...] = ()
    """further logged metrics to plot, one panel each (e.g. cluster_ari class_accuracy); a task
    where no run logged one skips it"""
    group_by: str = "label"
    """label (algorithm [/ kind] [/ sweep config]: equal labels pool seeds) | run (one method per directory)"""
    final_fraction: float = 0.1
    """a seed's final score = its mean over this last fraction of the iterations"""
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0
    references: Optional[str] = None
    """JSON file of fixed reference values of the return per task, ``{task: {label: value}}``
    (or under the key ``lines``, as ``experiments.swarm_references`` writes it): drawn as
    horizontal lines in the return panels and listed in report.md"""


# ------------------------------------------------------------------ reading


@dataclasses.dataclass
class Group:
    """The seeds of one method on one task."""

    task: str
    method: str
    steps: np.ndarray  # [I] env steps per seed
    values: dict  # metric -> [S, I]
    episodes: np.ndarray  # [S, I]
    sources: list


def find_runs(dirs) -> list[str]:
    found = []
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"not a directory: {d}")
        for root, subdirs, files in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if s not in ("checkpoints", "tb"))
            if "run.json" in files and "metrics.jsonl" in files:
                found.append(root)
    return sorted(dict.fromkeys(os.path.abspath(f) for f in found))


def _arrays(records: list[dict], seed_of, num_seeds: int):
    """records -> (steps [I], {metric: [S, I]}, episodes [S, I])."""
    its = sorted({r["iteration"] for r in records})
    col = {it: i for i, it in enumerate(its)}
    steps = np.zeros(len(its))
    names = sorted(
        {
            k
            for r in records
            for k, v in r.items()
            if k not in ("iteration", "env_steps", "seed") and isinstance(v, (int, float, str))
        }
    )
    values = {k: np.full((num_seeds, len(its)), np.nan) for k in names}
    episodes = np.ones((num_seeds, len(its)))
    for r in records:
        s, i = seed_of(r["seed"]), col[r["iteration"]]
        steps[i] = r["env_steps"]
        for k in names:
            if k in r:
                try:
                    values[k][s, i] = float(r[k])
                except (TypeError, ValueError):
                    pass
        if "episodes" in r:
            episodes[s, i] = float(r["episodes"])
    return steps, values, episodes


def _label(info: dict) -> str:
    label = str(info.get("algo", "?"))
    if info.get("kind"):
        label += f"/{info['kind']}"
    return label


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def load_groups(run_dirs: list[str], group_by: str = "label", root: Optional[str] = None) -> list[Group]:
    """Read runs and pool them into (task, method) groups."""
    parts = []  # (task, method, steps, values, episodes, source)
    for d in run_dirs:
        with open(os.path.join(d, "run.json")) as f:
            info = json.load(f)
        records = read_metrics(d)
        if not records:
            continue
        task = str(info.get("env", "?"))
        base = _label(info) if group_by == "label" else os.path.relpath(d, root or os.path.dirname(d))
        sweep = info.get("sweep")
        if sweep:
            S = int(sweep["num_seeds"])
            for c, cfg in enumerate(sweep["configs"]):
                recs = [r for r in records if r["seed"] // S == c]
                if not recs:
                    continue
                desc = ", ".join(f"{k}={_fmt(v)}" for k, v in cfg.items())
                steps, values, eps = _arrays(recs, lambda s, n=S: s % n, S)
                parts.append((task, f"{base}[c{c}: {desc}]", steps, values, eps, d))
        else:
            seeds = sorted({r["seed"] for r in records})
            index = {s: i for i, s in enumerate(seeds)}
            steps, values, eps = _arrays(records, index.__getitem__, len(seeds))
            parts.append((task, base, steps, values, eps, d))
    groups: dict = {}
    for task, method, steps, values, eps, src in parts:
        g = groups.get((task, method))
        if g is None:
            groups[(task, method)] = Group(task, method, steps, values, eps, [src])
            continue
        n = min(g.steps.size, steps.size)  # pooled runs: keep the common prefix of iterations
        g.steps = g.steps[:n]
        g.values = {k: np.concatenate([g.values[k][:, :n], values[k][:, :n]]) for k in g.values if k in values}
        g.episodes = np.concatenate([g.episodes[:, :n], eps[:, :n]])
        g.sources.append(src)
    return list(groups.values())


def task_metric(groups: list[Group], choice: str) -> str:
    if choice != "auto":
        return choice
    for g in groups:
        w = g.values.get("win_rate")
        if w is not None and np.nan_to_num(w).any():
            return "win_rate"
    return "return"


# ------------------------------------------------------------------ outputs


def iteration_weights(metric: str, episodes: np.ndarray) -> np.ndarray:
    """Weights [S, I] of a metric's iterations: episode statistics (``return``, ``length``,
    ``win_rate``, per-agent ``return_*``) count the episodes that ended in the iteration;
    every other metric (losses, TRAMA's cluster_ari, ...) is logged each iteration and
    counts once."""
    if metric in EPISODE_STATS or metric.startswith("return_"):
        return episodes
    return np.ones_like(episodes)


def curve(values: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """[S, I] with iterations that ended no episode carrying the previous value."""
    out = np.where(episodes > 0, values, np.nan)
    for i in range(1, out.shape[1]):
        out[:, i] = np.where(np.isnan(out[:, i]), out[:, i - 1], out[:, i])
    return out


def plot_task(task: str, groups: list[Group], metrics: list[str], path: str, args: ReportArgs) -> str:
    import matplotlib.pyplot as plt  # headless: matplotlib picks Agg itself; a notebook keeps its backend

    pct = f"{100 * args.confidence:g}%"
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for g in groups:
            if m not in g.values:
                continue
            c = curve(g.values[m], iteration_weights(m, g.episodes))
            mean, lo, hi = bootstrap_band(c, min(args.bootstrap_samples, 1000), args.confidence, args.bootstrap_seed)
            marker = "o" if g.steps.size < 20 else None
            (line,) = ax.plot(g.steps, mean, marker=marker, label=f"{g.method} (n={c.shape[0]})")
            ax.fill_between(g.steps, lo, hi, alpha=0.2, color=line.get_color())
        if m == "return":
            for k, (label, value) in enumerate(reference_lines(args).get(task, {}).items()):
                ax.axhline(value, color="0.35", lw=1, ls=("--", ":", "-.")[k % 3], label=f"{label} ({value:.2f})")
        ax.set_xlabel("env steps (per seed)")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7, title=f"mean over seeds, {pct} bootstrap band", title_fontsize=7)
    fig.suptitle(task)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reference_lines(args: ReportArgs) -> dict:
    """``{task: {label: value}}`` from ``args.references`` (empty without one)."""
    if not args.references:
        return {}
    with open(args.references) as f:
        data = json.load(f)
    return data.get("lines", data)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def build_tables(groups: list[Group], args: ReportArgs) -> dict:
    tasks = sorted({g.task for g in groups})
    per_task, scores = [], {}
    ci = dict(num_samples=args.bootstrap_samples, confidence=args.confidence, seed=args.bootstrap_seed)
    for task in tasks:
        tg = [g for g in groups if g.task == task]
        metric = task_metric(tg, args.metric)
        for g in sorted(tg, key=lambda g: g.method):
            if metric not in g.values:
                continue
            weights = iteration_weights(metric, g.episodes)
            finals = final_scores(g.values[metric], weights, args.final_fraction)
            overall = overall_scores(g.values[metric], weights)
            overall = overall[np.isfinite(overall)]
            ok = finals[np.isfinite(finals)]
            point = iqm(ok) if ok.size else float("nan")
            lo, hi = bootstrap_ci(ok, iqm, **ci) if ok.size else (float("nan"), float("nan"))
            per_task.append(
                {
                    "task": task,
                    "method": g.method,
                    "metric": metric,
                    "iqm": point,
                    "ci_low": lo,
                    "ci_high": hi,
                    "mean": float(ok.mean()) if ok.size else float("nan"),
                    "num_seeds": int(ok.size),
                    "per_seed": [float(v) for v in finals],
                    "overall_iqm": iqm(overall) if overall.size else float("nan"),
                    "overall_per_seed": [float(v) for v in overall],
                    "sources": g.sources,
                }
            )
            if ok.size:
                scores.setdefault(g.method, {})[task] = (metric, ok)
    aggregate = []
    for method, by_task in sorted(scores.items()):
        metrics = sorted({m for m, _ in by_task.values()})
        strata = {t: v for t, (_, v) in sorted(by_task.items())}
        pooled = np.concatenate(list(strata.values()))
        lo, hi = stratified_bootstrap_ci(strata, iqm, **ci)
        aggregate.append(
            {
                "method": method,
                "tasks": sorted(strata),
                "metrics": metrics,
                "iqm": iqm(pooled),
                "ci_low": lo,
                "ci_high": hi,
                "num_scores": int(pooled.size),
            }
        )
    return {"per_task": per_task, "aggregate": aggregate}


def markdown(tables: dict, args: ReportArgs) -> str:
    pct = f"{100 * args.confidence:g}%"
    lines = [
        "# Final performance",
        "",
        f"Each seed's score: its episode-weighted mean over the last {100 * args.final_fraction:g}% of iterations. "
        f"IQM = interquartile mean over seeds; {pct} percentile-bootstrap CI ({args.bootstrap_samples} resamples, "
        f"seed {args.bootstrap_seed}). Overall: IQM over seeds of each seed's mean over all iterations (area under "
        "the learning curve / training length, a time-normalized score).",
        "",
        f"| task | method | metric | IQM | {pct} CI | mean | overall | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in tables["per_task"]:
        lines.append(
            f"| {r['task']} | {r['method']} | {r['metric']} | {r['iqm']:.4f} | "
            f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}] | {r['mean']:.4f} | {r['overall_iqm']:.4f} | "
            f"{r['num_seeds']} |"
        )
    if tables["aggregate"]:
        lines += [
            "",
            "## Across tasks",
            "",
            f"IQM over all (task, seed) scores of a method; {pct} stratified-bootstrap CI (seeds resampled within "
            "each task). Raw scores: compare across tasks only when their scales agree.",
            "",
            f"| method | tasks | metric | IQM | {pct} CI | scores |",
            "|---|---|---|---|---|---|",
        ]
        for r in tables["aggregate"]:
            lines.append(
                f"| {r['method']} | {len(r['tasks'])} | {'/'.join(r['metrics'])} | {r['iqm']:.4f} | "
                f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}] | {r['num_scores']} |"
            )
    refs = reference_lines(args)
    if refs:
        lines += ["", "## Reference values", "", "| task | reference | return |", "|---|---|---|"]
        lines += [f"| {t} | {label} | {v:.4f} |" for t, by in sorted(refs.items()) for label, v in by.items()]
    return "\n".join(lines) + "\n"


def check_args(args: ReportArgs) -> None:
    from marl.config import ConfigError

    if not args.dirs:
        raise ConfigError("dirs", args.dirs, "name at least one directory of runs")
    for d in args.dirs:
        if not os.path.isdir(d):
            raise ConfigError("dirs", d, "must be an existing directory")
    if args.group_by not in ("label", "run"):
        raise ConfigError("group_by", args.group_by, "must be one of ['label', 'run']")
    if not 0.0 < args.final_fraction <= 1.0:
        raise ConfigError("final_fraction", args.final_fraction, "must be in (0, 1]")
    if not 0.0 < args.confidence < 1.0:
        raise ConfigError("confidence", args.confidence, "must be in (0, 1)")
    if args.bootstrap_samples <= 0:
        raise ConfigError("bootstrap_samples", args.bootstrap_samples, "must be a positive integer")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError("out", args.out, "must be a directory (this path is an existing file)")
    if args.references is not None:
        try:
            refs = reference_lines(args)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError("references", args.references, f"must be a readable JSON file ({e})") from None
        if not (isinstance(refs, dict) and all(isinstance(v, dict) for v in refs.values())):
            raise ConfigError("references", args.references, "must map each task to {label: value}")


def check_metrics(groups: list[Group], args: ReportArgs) -> None:
    """``--metric`` must name a metric that some run logged (``--panels`` that a task's runs
    did not log are skipped, as documented)."""
    from marl.config import ConfigError

    logged = sorted({k for g in groups for k in g.values})
    if args.metric != "auto" and args.metric not in logged:
        raise ConfigError("metric", args.metric, f"must be 'auto' or a logged metric: {logged}")


def report(args: ReportArgs) -> dict:
    """Write the curves and tables; returns {"dir", "curves", "panels" (task -> plotted metrics),
    "markdown", "tables"}."""
    from marl.config import ConfigError

    check_args(args)
    runs = find_runs(args.dirs)
    if not runs:
        raise ConfigError("dirs", args.dirs, "hold no run (a directory with run.json and metrics.jsonl)")
    # --group-by run labels each run by its path below the runs' common parent folder
    root = os.path.commonpath([os.path.dirname(os.path.abspath(r)) for r in runs])
    groups = load_groups(runs, args.group_by, root=root)
    check_metrics(groups, args)
    out = os.path.abspath(args.out or os.path.join(args.dirs[0], "report"))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError("out", out, f"must be a writable directory ({e.strerror})") from None
    curves, panels_of = [], {}
    for task in sorted({g.task for g in groups}):
        tg = [g for g in groups if g.task == task]
        metric = task_metric(tg, args.metric)
        panels = [metric] + (["return"] if metric != "return" and any("return" in g.values for g in tg) else [])
        panels += [m for m in dict.fromkeys(args.panels) if m not in panels and any(m in g.values for g in tg)]
        panels_of[task] = panels
        curves.append(plot_task(task, tg, panels, os.path.join(out, f"curves_{_slug(task)}.png"), args))
    tables = build_tables(groups, args)
    text = markdown(tables, args)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"args": dataclasses.asdict(args), "runs": runs, **tables}, f, indent=2)
    print(text)
    print(f"report: {os.path.join(out, 'report.md')}\n" + "".join(f"curve:  {c}\n" for c in curves), end="")
    return {
        "dir": out,
        "curves": curves,
        "panels": panels_of,
        "markdown": os.path.join(out, "report.md"),
        "tables": tables,
    }


@entry
def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    report(tyro.cli(ReportArgs, args=argv, description=__doc__.split("\n\n")[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
