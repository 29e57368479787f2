"""Fine-tuning near a competent reference: none vs KL vs Wasserstein (WPR) on a proxy reward.

    python -m experiments.wpr_finetune --reference-run runs/ref_mappo_3m --name wpr_finetune
    python -m experiments.wpr_finetune --reference-run runs/ref_mappo_3m --name wpr_finetune --resume

WPR's claim (RLHF): while a policy optimizes a reward that can be exploited, keeping it near a
competent reference (the SFT model) with a Wasserstein penalty, which sees the geometry of the
action space, does better than a KL penalty at the same divergence. Here the reference is a
trained MAPPO run (``--reference-run``), every arm starts from it
(``regularizer.init_from_reference``) and is fine-tuned on a misspecified proxy reward
(``--env-kwargs``, default SMAX's ``reward="damage_alive"``: damage dealt plus a bonus per
living ally per step, no win bonus, so prolonging a fight pays); the true objective is the
win rate, which the environment reports whatever the reward.

Sweep programs (``marl.sweep.run_sweep``, every configuration x seed one vmapped row,
the same seeds in every row; the kind is static, so KL and Wasserstein are separate programs):

- ``kl/``: ``reg_coef`` in ``{0} + coefs``; coefficient 0 is the unregularized arm ("none")
  (its reward is exactly the proxy reward; its KL to the reference is still logged);
- ``wasserstein_eps<e>/``, one per epsilon: ``reg_coef`` in ``coefs`` (debiased centred
  potential by default; ``--overrides '{"regularizer": {"centred": false}}'`` for WPR's raw
  potential). Epsilon is sweepable too; one program per epsilon lets ``--programs`` /
  ``--epsilons`` run them as separate processes (``--resume`` with every program then
  collects the finished ones without training them again).

Every row logs ``reference_kl`` (KL(pi || reference) on its rollouts), and Wasserstein rows
``penalty_logratio_corr`` (the rollout correlation of the Wasserstein penalty with the KL
log-ratio at the taken actions). At the end every row's parameters, and the reference's, are
evaluated greedily on the true task (``--eval-episodes`` per seed, the same episode keys for
every arm and for the reference).

Outputs under ``<runs_dir>/<name>/``: the sweep run directories (each with ``eval_rows.json``),
``eval_reference.json``,
``summary.json`` / ``summary.md`` (arms, preconditions, matched-KL comparison) and
``frontier.png`` (true win rate against KL to the reference).

Preconditions reported: the unregularized arm drops by >= ``min_drop`` win rate from the
reference; the correlation of the Wasserstein penalty with the KL log-ratio is < ``max_corr``
at each epsilon. Matched KL: every Wasserstein arm is paired with the KL arms whose final KL
to the reference is within ``match_tolerance`` (relative) of its own; the IQM difference of
the true win rate (Wasserstein - KL, over seeds) gets a percentile-bootstrap CI (seeds
resampled within each arm).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from functools import partial
from typing import Optional

import numpy as np
import tyro

import algos
from experiments.cli import entry
from experiments.regularizer_study import final_per_seed, metric_arrays
from experiments.train import make_env, parse_env_kwargs
from marl import regularizers as reg
from marl.config import ConfigError, apply_overrides, json_dict_arg
from marl.stats import bootstrap_ci, iqm

ALGO = "mappo"


@dataclasses.dataclass(frozen=True)
class FinetuneArgs:
    reference_run: str
    """run directory of the trained reference (python -m experiments.train ... --run-name X -> runs/X)"""
    env: str = "smax:3m"
    env_kwargs: str = '{"reward": "damage_alive"}'
    """JSON: the fine-tuning environment (the proxy reward); the reference's env name must match"""
    coefs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    epsilons: tuple[float, ...] = (0.05, 0.2)
    total_steps: int = 200_000
    """env steps per row (accepts 2e5)"""
    num_seeds: int = 3
    seed: int = 0
    overrides: Optional[str] = '{"num_envs": 32, "num_steps": 64, "lr": 0.001}'
    """JSON dict of PPO config fields for the fine-tuning runs (network settings must match the reference)"""
    eval_episodes: int = 128
    """greedy evaluation episodes per row and for the reference (per seed)"""
    eval_seed: int = 12345
    final_fraction: float = 0.2
    """final training metrics (KL, correlation, sampled win rate) = mean over this last fraction"""
    min_drop: float = 0.10
    max_corr: float = 0.9
    match_tolerance: float = 0.10
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    programs: tuple[str, ...] = ("kl", "wasserstein")
    name: str = "wpr_finetune"
    runs_dir: str = "runs"
    chunk_iterations: int = 5
    checkpoint_every: int = 1
    resume: bool = False
    progress: bool = False
    summarize_only: bool = False
    """only (re)write the tables from the finished programs' files: no training, no compiling"""


def program_configs(args: FinetuneArgs):
    """-> {program: (PPOConfig, [sweep configurations])}, validated (nothing compiled)."""
    for p in args.programs:
        if p not in ("kl", "wasserstein"):
            raise ConfigError("programs", p, "must be kl or wasserstein")
    if not args.coefs or any(c <= 0 for c in args.coefs):
        raise ConfigError("coefs", args.coefs, "must be a non-empty list of positive coefficients")
    if not args.epsilons or any(e <= 0 for e in args.epsilons):
        raise ConfigError("epsilons", args.epsilons, "must be a non-empty list of positive epsilons")
    for field in ("total_steps", "num_seeds", "eval_episodes", "chunk_iterations", "checkpoint_every"):
        v = getattr(args, field)
        if not (isinstance(v, int) and v > 0):
            raise ConfigError(field, v, "must be a positive integer")
    values = dict(json_dict_arg("overrides", args.overrides) or {})
    reg_values = values.pop("regularizer", {})
    base = apply_overrides(algos.default_config(ALGO), {**values, "total_steps": args.total_steps}, "overrides")
    out = {}
    for kind in args.programs:
        for eps in args.epsilons[:1] if kind == "kl" else args.epsilons:
            rc = apply_overrides(
                reg.RegularizerConfig(),
                {
                    **reg_values,
                    "kind": kind,
                    "coef": float(args.coefs[0]),
                    "epsilon": float(eps),
                    "mode": "penalty",
                    "reference": "run",
                    "reference_run": args.reference_run,
                    "init_from_reference": True,
                },
                "overrides.regularizer",
            )
            cfg = dataclasses.replace(base, regularizer=rc)
            if kind == "kl":
                out["kl"] = (cfg, [{"reg_coef": c} for c in (0.0, *args.coefs)])
            else:
                out[f"wasserstein_eps{eps:g}"] = (cfg, [{"reg_epsilon": eps, "reg_coef": c} for c in args.coefs])
    return out


def arm_label(program: str, hp: dict) -> str:
    if program == "kl":
        return "none" if hp["reg_coef"] == 0 else f"KL c={hp['reg_coef']:g}"
    return f"W eps={hp['reg_epsilon']:g} c={hp['reg_coef']:g}"


def diff_ci(x, y, num_samples: int, confidence: float, seed: int = 0) -> tuple[float, float, float]:
    """IQM(x) - IQM(y) and its percentile-bootstrap CI, resampling x and y independently."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    dx = x[rng.integers(0, x.size, (num_samples, x.size))]
    dy = y[rng.integers(0, y.size, (num_samples, y.size))]
    d = iqm(dx, axis=-1) - iqm(dy, axis=-1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(d, [tail, 1 - tail])
    return float(iqm(x) - iqm(y)), float(lo), float(hi)


def matched_pairs(arms: list[dict], tolerance: float, num_samples: int, confidence: float) -> list[dict]:
    """Wasserstein arms x KL arms (coefficient > 0) whose mean final KL to the reference is
    within ``tolerance`` (relative to the Wasserstein arm's) -> IQM differences with CIs."""
    out = []
    kls = [a for a in arms if a["program"] == "kl" and a["hparams"]["reg_coef"] > 0]
    for w in (a for a in arms if a["program"] == "wasserstein"):
        for k in kls:
            if abs(k["reference_kl"] - w["reference_kl"]) <= tolerance * w["reference_kl"]:
                d, lo, hi = diff_ci(w["eval_win_rate"], k["eval_win_rate"], num_samples, confidence)
                out.append(
                    {
                        "wasserstein": w["arm"],
                        "kl": k["arm"],
                        "kl_w": w["reference_kl"],
                        "kl_kl": k["reference_kl"],
                        "iqm_diff": d,
                        "ci_low": lo,
                        "ci_high": hi,
                    }
                )
    return out


def plot_frontier(arms: list[dict], reference_win: float, path: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"none": ("k", "s"), "kl": ("tab:blue", "o"), "wasserstein": ("tab:red", "^")}
    for a in arms:
        key = "none" if a["arm"] == "none" else a["program"]
        color, marker = styles[key]
        if key == "wasserstein" and a["hparams"]["reg_epsilon"] != max(
            b["hparams"]["reg_epsilon"] for b in arms if b["program"] == "wasserstein"
        ):
            color = "tab:orange"
        x = np.asarray(a["reference_kl_per_seed"])
        y = np.asarray(a["eval_win_rate"])
        ax.scatter(x, y, color=color, marker=marker, alpha=0.25, s=12)
        ax.scatter([a["reference_kl"]], [a["eval_iqm"]], color=color, marker=marker, s=50)
        ax.annotate(
            a["arm"].replace("W ", "").replace("KL ", ""),
            (a["reference_kl"], a["eval_iqm"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axhline(reference_win, color="gray", ls="--", lw=1, label="reference")
    for key, (color, marker) in styles.items():
        ax.scatter([], [], color=color, marker=marker, label=key)
    if any(a["program"] == "wasserstein" for a in arms):
        ax.scatter([], [], color="tab:orange", marker="^", label="wasserstein (smaller eps)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(pi || reference) on rollouts (final)")
    ax.set_ylabel("true greedy win rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(summary: dict) -> str:
    pct = f"{100 * summary['confidence']:g}%"
    ref = summary["reference"]
    lines = [
        f"Reference: greedy win rate {ref['eval_iqm']:.3f} (IQM over the {len(ref['eval_win_rate'])} seeds' "
        f"episode sets, {summary['eval_episodes']} episodes each).",
        "",
        f"| arm | true greedy win rate IQM | {pct} CI | sampled training win rate (final) | KL to reference "
        "(final, mean) | corr(W penalty, log-ratio) |",
        "|---|---|---|---|---|---|",
    ]
    for a in summary["arms"]:
        corr = "" if a["corr"] is None else f"{a['corr']:.3f}"
        lines.append(
            f"| {a['arm']} | {a['eval_iqm']:.3f} | [{a['eval_ci'][0]:.3f}, {a['eval_ci'][1]:.3f}] | "
            f"{a['train_win_rate']:.3f} | {a['reference_kl']:.4f} | {corr} |"
        )
    pre = summary["preconditions"]
    lines += ["", "Preconditions:"]
    if "drop" in pre:
        lines.append(
            f"- drop of the unregularized arm: {pre['drop']:.3f} (reference {ref['eval_iqm']:.3f} -> none "
            f"{pre['none_iqm']:.3f}); required >= {summary['min_drop']}: "
            f"**{'met' if pre['drop_ok'] else 'not met'}**"
        )
    for eps, c in pre["corr"].items():
        lines.append(
            f"- correlation at eps {eps}: mean {c['mean']:.3f}, max over arms {c['max']:.3f}; required < "
            f"{summary['max_corr']}: **{'met' if c['ok'] else 'not met'}**"
        )
    lines += [
        "",
        f"Matched KL (within ±{100 * summary['match_tolerance']:g}%): IQM difference of the true win rate, "
        f"Wasserstein - KL, {pct} bootstrap CI",
    ]
    if summary["matched"]:
        lines += ["", "| Wasserstein arm | KL arm | KL (W) | KL (KL) | IQM diff | CI |", "|---|---|---|---|---|---|"]
        for m in summary["matched"]:
            lines.append(
                f"| {m['wasserstein']} | {m['kl']} | {m['kl_w']:.4f} | {m['kl_kl']:.4f} | "
                f"{m['iqm_diff']:+.3f} | [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}] |"
            )
    else:
        lines.append("\nNo Wasserstein arm has a KL arm within the tolerance.")
    return "\n".join(lines)


def _save(path: str, arrays: dict) -> dict:
    """Evaluation results (a dict of arrays) written to ``path``, so that a resumed study
    reads them back (:func:`_load`) instead of evaluating finished rows again."""
    out = {k: np.asarray(v) for k, v in arrays.items()}
    with open(path, "w") as f:
        json.dump({k: v.tolist() for k, v in out.items()}, f)
    return out


def _load(path: str) -> dict:
    with open(path) as f:
        return {k: np.asarray(v) for k, v in json.load(f).items()}


def run(args: FinetuneArgs) -> dict:
    import jax

    from marl.evaluation import evaluate
    from marl.reference import load_run_params
    from marl.sweep import run_sweep, validate

    if not 0 < args.final_fraction <= 1:
        raise ConfigError("final_fraction", args.final_fraction, "must be in (0, 1]")
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    env = make_env(args.env, env_kwargs)
    programs = program_configs(args)
    built = {p: algos.make(ALGO, env, cfg) for p, (cfg, _) in programs.items()}  # loads + checks the reference
    for p, (_, sweep) in programs.items():
        validate(built[p], sweep)
    study_dir = os.path.abspath(os.path.join(args.runs_dir, args.name))
    os.makedirs(study_dir, exist_ok=True)
    with open(os.path.join(study_dir, "study.json"), "w") as f:
        json.dump(
            {
                "args": dataclasses.asdict(args),
                "algo": ALGO,
                "configs": {p: dataclasses.asdict(c) for p, (c, _) in programs.items()},
            },
            f,
            indent=2,
            default=str,
        )

    S = args.num_seeds
    eval_keys = jax.random.split(jax.random.PRNGKey(args.eval_seed), S)
    any_algo = next(iter(built.values()))
    ref_params = load_run_params(
        args.reference_run,
        jax.eval_shape(any_algo.init, jax.random.PRNGKey(0)).params,
        env_name=env.spec.name,
        seed_index=programs[next(iter(programs))][0].regularizer.reference_seed,
    )
    ev = jax.jit(jax.vmap(lambda p, k: evaluate(any_algo, p, k, args.eval_episodes, True), in_axes=(None, 0)))
    ref_path = os.path.join(study_dir, "eval_reference.json")
    ref_eval = (
        _load(ref_path)
        if args.resume and os.path.isfile(ref_path)
        else _save(ref_path, jax.device_get(ev(ref_params, eval_keys)))
    )
    reference = {
        "eval_win_rate": np.asarray(ref_eval["win_rate"]).tolist(),
        "eval_iqm": iqm(np.asarray(ref_eval["win_rate"])),
        "eval_return_proxy": np.asarray(ref_eval["return"]).tolist(),
    }
    print(
        f"reference {args.reference_run}: greedy win rate {reference['eval_iqm']:.3f} per seed's episodes "
        f"{np.round(ref_eval['win_rate'], 3).tolist()}",
        flush=True,
    )

    for p, (cfg, sweep) in programs.items():
        algo = built[p]
        n_iter = max(1, cfg.total_steps // algo.env_steps_per_update)
        print(
            f"== {p}: {len(sweep)} configurations x {S} seeds x {n_iter * algo.env_steps_per_update:,} env steps",
            flush=True,
        )
        res = run_sweep(
            algo,
            sweep,
            num_iterations=n_iter,
            num_seeds=S,
            seed=args.seed,
            chunk_iterations=args.chunk_iterations,
            checkpoint_every=args.checkpoint_every,
            run_dir=os.path.join(study_dir, p),
            resume=args.resume,
            progress=args.progress,
            run_info={
                "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                "env_kwargs": env_kwargs,
                "study": args.name,
                "program": p,
            },
        )
        print(f"   compile {res.compile_seconds:.1f}s, train {res.train_seconds:.1f}s", flush=True)
        keys = np.tile(np.asarray(jax.device_get(eval_keys)), (len(sweep), 1))
        rows_path = os.path.join(study_dir, p, "eval_rows.json")
        if not (args.resume and os.path.isfile(rows_path)):
            _save(
                rows_path,
                jax.device_get(
                    jax.jit(jax.vmap(partial(evaluate, algo, num_episodes=args.eval_episodes)))(res.state.params, keys)
                ),
            )
    return summarize(args, programs)


def program_arms(study_dir: str, program: str, sweep: list, args: FinetuneArgs) -> list[dict]:
    """The arms of one finished sweep program, from its ``eval_rows.json`` and ``metrics.jsonl``."""
    from marl.logging import read_metrics

    S = args.num_seeds
    out = _load(os.path.join(study_dir, program, "eval_rows.json"))
    win_all = np.asarray(out["win_rate"]).reshape(len(sweep), S)
    ret_all = np.asarray(out["return"]).reshape(len(sweep), S)
    records = read_metrics(os.path.join(study_dir, program))
    kind = program.split("_")[0]
    arms = []
    for c, hp in enumerate(sweep):
        rows = [r for r in records if c * S <= r["seed"] < (c + 1) * S]
        finals = {}
        for m in ("reference_kl", "penalty_logratio_corr", "win_rate"):
            _, vals, eps = metric_arrays(rows, m)
            finals[m] = final_per_seed(vals, eps if m == "win_rate" else np.ones_like(eps), args.final_fraction)
        win = win_all[c]
        lo, hi = bootstrap_ci(win, iqm, args.bootstrap_samples, args.confidence)
        corr = finals["penalty_logratio_corr"]
        arms.append(
            {
                "program": kind,
                "hparams": hp,
                "arm": arm_label(kind, hp),
                "eval_win_rate": win.tolist(),
                "eval_iqm": iqm(win),
                "eval_ci": [lo, hi],
                "eval_return_proxy": ret_all[c].tolist(),
                "train_win_rate": float(np.nanmean(finals["win_rate"])),
                "reference_kl_per_seed": finals["reference_kl"].tolist(),
                "reference_kl": float(np.nanmean(finals["reference_kl"])),
                "corr": float(np.nanmean(corr)) if kind == "wasserstein" and np.isfinite(corr).any() else None,
            }
        )
    return arms


def summarize(args: FinetuneArgs, programs: Optional[dict] = None) -> dict:
    """Tables, preconditions, matched-KL differences and the frontier from the files of the
    finished programs (those with an ``eval_rows.json``); no training, no compilation."""
    programs = program_configs(args) if programs is None else programs
    study_dir = os.path.abspath(os.path.join(args.runs_dir, args.name))
    ref_eval = _load(os.path.join(study_dir, "eval_reference.json"))
    reference = {
        "eval_win_rate": np.asarray(ref_eval["win_rate"]).tolist(),
        "eval_iqm": iqm(np.asarray(ref_eval["win_rate"])),
        "eval_return_proxy": np.asarray(ref_eval["return"]).tolist(),
    }
    arms, done = [], []
    for p, (_, sweep) in programs.items():
        if os.path.isfile(os.path.join(study_dir, p, "eval_rows.json")):
            arms += program_arms(study_dir, p, sweep, args)
            done.append(p)
    summary = {
        "reference": reference,
        "arms": arms,
        "programs": done,
        "eval_episodes": args.eval_episodes,
        "confidence": args.confidence,
        "min_drop": args.min_drop,
        "max_corr": args.max_corr,
        "match_tolerance": args.match_tolerance,
        "preconditions": {"corr": {}},
    }
    none = [a for a in arms if a["arm"] == "none"]
    if none:
        d = reference["eval_iqm"] - none[0]["eval_iqm"]
        summary["preconditions"].update(drop=d, none_iqm=none[0]["eval_iqm"], drop_ok=bool(d >= args.min_drop))
    for eps in args.epsilons:
        cs = [
            a["corr"]
            for a in arms
            if a["program"] == "wasserstein" and a["hparams"]["reg_epsilon"] == eps and a["corr"] is not None
        ]
        if cs:
            summary["preconditions"]["corr"][str(eps)] = {
                "mean": float(np.mean(cs)),
                "max": float(np.max(cs)),
                "ok": bool(np.max(cs) < args.max_corr),
            }
    summary["matched"] = matched_pairs(arms, args.match_tolerance, args.bootstrap_samples, args.confidence)
    with open(os.path.join(study_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = markdown(summary)
    with open(os.path.join(study_dir, "summary.md"), "w") as f:
        f.write(text + "\n")
    png = plot_frontier(arms, reference["eval_iqm"], os.path.join(study_dir, "frontier.png"))
    print("\n" + text + f"\n\nstudy directory: {study_dir}\n  frontier: {png}")
    return summary


@entry
def main(argv: Optional[list[str]] = None) -> int:
    from experiments.train import _normalize_argv

    argv = sys.argv[1:] if argv is None else argv
    args = tyro.cli(FinetuneArgs, args=_normalize_argv(argv), description=__doc__.split("\n\n")[0])
    summarize(args) if args.summarize_only else run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
