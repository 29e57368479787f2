"""MAPPO with no regularizer vs KL vs Wasserstein (WPR), over environments and seeds.

    python -m experiments.regularizer_study                                    # smax:3m + mpe:simple_spread, 4 seeds
    python -m experiments.regularizer_study --envs smax:3m --total-steps 2e6 --coef 0.05
    python -m experiments.regularizer_study --mode loss --reference rollout    # Wasserstein trust region
    python -m experiments.regularizer_study --overrides '{"lr": 0.001, "hidden": 64}'

One vmapped run (``num_seeds`` seeds, ``marl.runner.train``) per (environment, kind);
every kind uses the same seeds, so the seeds share their initial parameters across
kinds. Outputs under ``<runs_dir>/<name>/``:

- ``<env>_<kind>/``: the run directory of each run (``metrics.jsonl``, ``checkpoints/``,
  ``run.json``), as written by the runner;
- ``curve_<env>.png``: learning curve per environment, one line per kind (mean over
  seeds, min-max band over seeds);
- ``final.json`` and ``final.md``: final performance per (env, kind): the interquartile
  mean (IQM) over seeds of each seed's episode-weighted mean of the metric over the last
  ``final_fraction`` of the iterations, and a percentile-bootstrap confidence interval of
  that IQM (resampling seeds);
- ``study.json``: the study's arguments and the PPO config of every run.

The metric is the training win rate on SMAX (``win_rate``) and the training episode
return elsewhere (``--metric`` overrides). Regularizer defaults are WPR's setting for PPO:
``mode=penalty`` (the regularizer's per-action gradient becomes a reward penalty) with the
frozen ``initial`` policy as reference; a penalty toward the rollout policy would be
identically zero, so PPO rejects it. ``--mode loss --reference rollout`` gives a
trust region instead. The same mode, reference and coefficient apply to every kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Optional

import numpy as np
import tyro

import algos
import envs
from experiments.cli import entry
from marl import regularizers as reg
from marl.config import ConfigError, apply_overrides, json_dict_arg
from marl.stats import bootstrap_ci, iqm

ALGO = "mappo"


# ------------------------------------------------------------------ arguments


@dataclasses.dataclass(frozen=True)
class StudyArgs:
    envs: tuple[str, ...] = ("smax:3m", "mpe:simple_spread")
    """environments, each one of envs.registered()"""
    kinds: tuple[str, ...] = ("none", "kl", "wasserstein")
    """regularizer kinds, each one of marl.regularizers.KINDS"""
    total_steps: int = 1_000_000
    """env steps per seed of every run (accepts 1e6)"""
    num_seeds: int = 4
    """seeds per run, trained as one vmapped program"""
    seed: int = 0
    """base seed; seed i uses split(PRNGKey(seed))[i] in every run"""
    coef: float = 0.01
    """regularizer coefficient beta (kinds other than none)"""
    epsilon: float = 0.05
    """entropic OT regularization (Wasserstein), in units of the action cost (max 1)"""
    mode: str = "penalty"
    """penalty (WPR: reward penalty) | loss (added to the PPO loss)"""
    reference: str = "initial"
    """initial | uniform (any mode) | rollout (trust region, mode loss only)"""
    overrides: Optional[str] = None
    """JSON dict (or a path to a JSON file) of PPO config fields, e.g. '{"lr": 0.001}';
    a "regularizer" dict may set iterations / centred (kind, coef, epsilon, mode and
    reference come from the flags above)"""
    metric: str = "auto"
    """final-performance metric: auto (win_rate on SMAX, else return) | return | win_rate"""
    final_fraction: float = 0.1
    """final performance = mean over this last fraction of the iterations"""
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0
    name: Optional[str] = None
    """study directory name under runs_dir (default: study_<time>)"""
    runs_dir: str = "runs/regularizer_study"
    chunk_iterations: int = 10
    checkpoint_every: int = 5
    """checkpoint every this many chunks (and at the end)"""
    resume: bool = False
    """continue the runs of an existing study (finished runs are not retrained)"""
    progress: bool = True


# ------------------------------------------------------------------ config building


def study_configs(args: StudyArgs) -> dict:
    """-> {(env, kind): PPOConfig}, every config validated (nothing compiled).

    Raises ConfigError naming the field for unknown kinds, bad overrides and invalid
    regularizer settings (e.g. ``mode=penalty`` with ``reference=rollout``).
    """
    if not args.kinds:
        raise ConfigError("kinds", args.kinds, f"must name at least one of {list(reg.KINDS)}")
    for k in args.kinds:
        if k not in reg.KINDS:
            raise ConfigError("kinds", k, f"unknown regularizer kind; allowed: {list(reg.KINDS)}")
    if len(set(args.kinds)) != len(args.kinds):
        raise ConfigError("kinds", args.kinds, "must not repeat a kind")
    values = dict(json_dict_arg("overrides", args.overrides) or {})
    if "total_steps" in values:
        raise ConfigError("overrides.total_steps", values["total_steps"], "set it with --total-steps")
    reg_values = values.pop("regularizer", {})
    if not isinstance(reg_values, dict):
        raise ConfigError("overrides.regularizer", reg_values, "must be a dict of regularizer fields")
    base_reg = apply_overrides(reg.RegularizerConfig(), reg_values, "overrides.regularizer")
    base = apply_overrides(algos.default_config(ALGO), values, "overrides")
    out = {}
    for kind in args.kinds:
        rc = dataclasses.replace(
            base_reg,
            kind=kind,
            coef=0.0 if kind == "none" else args.coef,
            epsilon=args.epsilon,
            mode=args.mode,
            reference=args.reference,
        )  # validated by RegularizerConfig.__post_init__
        cfg = dataclasses.replace(base, total_steps=args.total_steps, regularizer=rc)  # PPOConfig checks
        for env in args.envs:
            out[(env, kind)] = cfg
    return out


def _check_args(args: StudyArgs) -> None:
    if not args.envs:
        raise ConfigError("envs", args.envs, "must name at least one environment")
    if len(set(args.envs)) != len(args.envs):
        raise ConfigError("envs", args.envs, "must not repeat an environment")
    for field in ("total_steps", "num_seeds", "bootstrap_samples", "chunk_iterations", "checkpoint_every"):
        v = getattr(args, field)
        if not (isinstance(v, int) and v > 0):
            raise ConfigError(field, v, "must be a positive integer")
    if not 0.0 < args.final_fraction <= 1.0:
        raise ConfigError("final_fraction", args.final_fraction, "must be in (0, 1]")
    if not 0.0 < args.confidence < 1.0:
        raise ConfigError("confidence", args.confidence, "must be in (0, 1)")
    if args.metric not in ("auto", "return", "win_rate"):
        raise ConfigError("metric", args.metric, "must be one of ['auto', 'return', 'win_rate']")


def _make_env(name: str):
    try:
        return envs.make(name)
    except envs.UnknownEnvError as e:
        msg = str(e)
        msg = msg.split(": ", 1)[1] if msg.startswith("invalid env=") and ": " in msg else msg
        raise ConfigError("envs", name, msg) from None


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def metric_for(env_name: str, choice: str) -> str:
    if choice != "auto":
        return choice
    return "win_rate" if env_name.lower().startswith("smax") else "return"


# ------------------------------------------------------------------ analysis


def metric_arrays(records: list[dict], metric: str):
    """-> (env_steps [I], values [S, I], episodes [S, I]) from metrics.jsonl records."""
    its = sorted({r["iteration"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    ii = {it: i for i, it in enumerate(its)}
    si = {s: i for i, s in enumerate(seeds)}
    steps = np.zeros(len(its))
    vals = np.full((len(seeds), len(its)), np.nan)
    eps = np.zeros((len(seeds), len(its)))
    for r in records:
        i, s = ii[r["iteration"]], si[r["seed"]]
        steps[i] = r["env_steps"]
        if metric in r:
            vals[s, i] = float(r[metric])
        eps[s, i] = float(r.get("episodes", 1))
    return steps, vals, eps


def final_per_seed(vals: np.ndarray, eps: np.ndarray, fraction: float) -> np.ndarray:
    """Each seed's episode-weighted mean of ``vals [S, I]`` over the last ``fraction``
    of the iterations (at least one). A seed that finished no episode there falls back
    to its last iteration with episodes before the window (NaN if none)."""
    n_it = vals.shape[1]
    w = max(1, int(round(fraction * n_it)))
    out = np.full(vals.shape[0], np.nan)
    for s in range(vals.shape[0]):
        v, e = vals[s, -w:], eps[s, -w:]
        ok = np.isfinite(v) & (e > 0)
        if ok.any():
            out[s] = float((v[ok] * e[ok]).sum() / e[ok].sum())
            continue
        earlier = np.where(np.isfinite(vals[s, :-w]) & (eps[s, :-w] > 0))[0]
        if earlier.size:
            out[s] = float(vals[s, earlier[-1]])
    return out


def curve(vals: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """``vals [S, I]`` with iterations that ended no episode carrying the previous value."""
    out = np.where(eps > 0, vals, np.nan)
    for i in range(1, out.shape[1]):
        out[:, i] = np.where(np.isnan(out[:, i]), out[:, i - 1], out[:, i])
    return out


def plot_env(env: str, runs: dict, metrics: list[str], path: str) -> str:
    """runs: kind -> records. One panel per metric, one line per kind, min-max band."""
    import matplotlib.pyplot as plt  # headless: matplotlib picks Agg itself; a notebook keeps its backend

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for kind, records in runs.items():
            steps, vals, eps = metric_arrays(records, m)
            c = curve(vals, eps)
            with warnings.catch_warnings():  # iterations before any episode ended are NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(c, 0), np.nanmin(c, 0), np.nanmax(c, 0)
            marker = "o" if steps.size < 20 else None
            (line,) = ax.plot(steps, mean, marker=marker, label=f"{kind} (n={c.shape[0]})")
            ax.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
        ax.set_xlabel("env steps (per seed)")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8, title="mean, min-max band", title_fontsize=8)
    fig.suptitle(f"MAPPO on {env}: regularizer kinds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(args: StudyArgs, records: dict) -> list[dict]:
    """records: (env, kind) -> metrics.jsonl records. -> one table row per (env, kind)."""
    rows = []
    for (env, kind), recs in records.items():
        metric = metric_for(env, args.metric)
        if not any(metric in r for r in recs):
            metric = "return"
        _, vals, eps = metric_arrays(recs, metric)
        finals = final_per_seed(vals, eps, args.final_fraction)
        ok = finals[np.isfinite(finals)]
        if ok.size:
            point = iqm(ok)
            lo, hi = bootstrap_ci(ok, iqm, args.bootstrap_samples, args.confidence, args.bootstrap_seed)
        else:
            point = lo = hi = float("nan")
        rows.append(
            {
                "env": env,
                "kind": kind,
                "metric": metric,
                "iqm": point,
                "ci_low": lo,
                "ci_high": hi,
                "confidence": args.confidence,
                "num_seeds": int(finals.size),
                "num_finite_seeds": int(ok.size),
                "per_seed": [None if not np.isfinite(v) else float(v) for v in finals],
                "mean": float(ok.mean()) if ok.size else float("nan"),
                "iterations": int(vals.shape[1]),
            }
        )
    return rows


def markdown_table(rows: list[dict], args: StudyArgs) -> str:
    pct = f"{100 * args.confidence:g}%"
    lines = [
        f"Final performance: IQM over seeds of the mean over the last {100 * args.final_fraction:g}% of "
        f"iterations, {pct} percentile-bootstrap CI ({args.bootstrap_samples} resamples, seed {args.bootstrap_seed}).",
        "",
        f"| env | kind | metric | IQM | {pct} CI | mean | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['env']} | {r['kind']} | {r['metric']} | {r['iqm']:.3f} | "
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['mean']:.3f} | {r['num_finite_seeds']} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def parse(argv: list[str]) -> StudyArgs:
    from experiments.train import _normalize_argv

    return tyro.cli(StudyArgs, args=_normalize_argv(argv), description=__doc__.split("\n\n")[0])


def run_study(args: StudyArgs) -> dict:
    """Validate everything, train every (env, kind), write curves and tables.

    Returns {"dir", "rows", "table", "curves"}. Raises ConfigError before compiling
    anything on invalid input.
    """
    _check_args(args)
    if args.kinds and set(args.kinds) - set(reg.KINDS):
        study_configs(args)  # names the unknown kind before building any environment
    env_objs = {name: _make_env(name) for name in args.envs}
    configs = study_configs(args)
    built = {(e, k): algos.make(ALGO, env_objs[e], cfg) for (e, k), cfg in configs.items()}

    name = args.name or f"study_{time.strftime('%Y%m%d-%H%M%S')}"
    study_dir = os.path.abspath(os.path.join(args.runs_dir, name))
    try:
        os.makedirs(study_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError("runs_dir", args.runs_dir, f"must be a writable directory ({e.strerror})") from None
    run_dirs = {ek: os.path.join(study_dir, f"{slug(ek[0])}_{ek[1]}") for ek in built}
    if not args.resume:
        for d in run_dirs.values():
            ck = os.path.join(d, "checkpoints")
            if os.path.isdir(ck) and os.listdir(ck):
                raise ConfigError("name", name, f"{study_dir} already holds runs: pass --resume or choose a new name")
    with open(os.path.join(study_dir, "study.json"), "w") as f:
        json.dump(
            {
                "args": dataclasses.asdict(args),
                "algo": ALGO,
                "configs": {f"{e}/{k}": dataclasses.asdict(c) for (e, k), c in configs.items()},
            },
            f,
            indent=2,
            default=str,
        )

    from marl.logging import read_metrics
    from marl.runner import train

    records = {}
    for (env, kind), algo in built.items():
        cfg = configs[(env, kind)]
        n_iter = cfg.total_steps // algo.env_steps_per_update
        steps = n_iter * algo.env_steps_per_update
        print(
            f"== {ALGO} on {env}, regularizer {kind}: {args.num_seeds} seeds x {steps:,} env steps "
            f"-> {run_dirs[(env, kind)]}",
            flush=True,
        )
        res = train(
            algo,
            num_iterations=n_iter,
            num_seeds=args.num_seeds,
            seed=args.seed,
            chunk_iterations=args.chunk_iterations,
            run_dir=run_dirs[(env, kind)],
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            progress=args.progress,
            run_info={
                "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                "study": name,
                "kind": kind,
            },
        )
        if res.train_seconds:
            print(f"   compile {res.compile_seconds:.1f}s, train {res.train_seconds:.1f}s", flush=True)
        records[(env, kind)] = read_metrics(run_dirs[(env, kind)])

    curves = []
    for env in args.envs:
        metric = metric_for(env, args.metric)
        panels = [metric] + (["return"] if metric != "return" else [])
        runs = {k: records[(env, k)] for k in args.kinds}
        panels = [m for m in panels if any(m in r for recs in runs.values() for r in recs)] or ["return"]
        curves.append(plot_env(env, runs, panels, os.path.join(study_dir, f"curve_{slug(env)}.png")))

    rows = summarize(args, records)
    table = markdown_table(rows, args)
    with open(os.path.join(study_dir, "final.json"), "w") as f:
        json.dump(
            {
                "rows": rows,
                "final_fraction": args.final_fraction,
                "bootstrap_samples": args.bootstrap_samples,
                "bootstrap_seed": args.bootstrap_seed,
                "confidence": args.confidence,
                "statistic": "IQM over seeds (25% trimmed mean)",
            },
            f,
            indent=2,
        )
    with open(os.path.join(study_dir, "final.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table + "\n")
    print(
        f"study directory: {study_dir}\n  table:  {os.path.join(study_dir, 'final.json')}\n"
        + "".join(f"  curve:  {c}\n" for c in curves),
        end="",
    )
    return {"dir": study_dir, "rows": rows, "table": table, "curves": curves}


@entry
def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_study(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
