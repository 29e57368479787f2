"""QARL vs RARL vs SAC on adversarial control tasks, N seeds vmapped per method.

For each environment, adversary scale (``--adversary-scales``: multiples of the task's
force bound) and method (``qarl``: the self-paced Gamma curriculum; ``rarl``: the
adversary is plain auto-tuned SAC without a temperature input; ``sac``: no adversary),
trains ``--num-seeds`` seeds in one compiled program (``marl.runner.train``), then
evaluates every seed's final protagonist (greedy)

- against its own final adversary, and against the other methods' final adversaries
  (cross play, each player with its own run's temperature input),
- against a fresh best-response adversary: SAC at the target temperature trained for
  ``--br-steps`` against the frozen protagonist (``qarl_eval.train_best_response``),
- without adversary (its force scaled by 0),
- on the task's stress grid without adversary (``qarl_eval.stress_axes``; one vmapped rollout),
  with each seed's spread (max - min) / mean.

Each figure is summarized over seeds by its IQM and a 95% percentile-bootstrap interval
(``marl.stats``). Writes under ``runs/qarl_compare_<time>/`` (or ``--out``), per
``<env>_x<scale>/``: ``<method>/`` (the runner's metrics.jsonl, run.json, checkpoints),
``returns.png`` (protagonist return vs env steps), ``curriculum_shape.{png,json}`` (the
Gamma shape per seed vs env steps), ``robustness_<method>.{png,json}``; and
``summary.json``, ``summary.md`` (tables).

    python -m experiments.qarl_compare --envs adv:cartpole --adversary-scales 1 1.5 2 --total-steps 150000 --num-seeds 5
    python -m experiments.qarl_compare --envs adv:cartpole --out runs/my_compare --resume   # after a stop
    # smoke test (seconds of training, checks the pipeline):
    python -m experiments.qarl_compare --envs adv:cartpole --total-steps 480 --num-seeds 2 --br-steps 240 \\
        --learning-starts 64 --hidden 16 --num-layers 1 --batch-size 32 --buffer-size 1024 --grid 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import algos
import envs
from algos import qarl, qarl_eval
from envs.adversarial import with_params
from experiments.cli import entry
from experiments.regularizer_study import metric_arrays
from marl import plotting, stats
from marl.checkpoint import Checkpointer
from marl.logging import read_metrics
from marl.runner import init_states, train

METHODS = {"qarl": ("qarl", {}), "rarl": ("rarl", {}), "sac": ("qarl", {"adversary": False, "curriculum": "auto"})}
SHAPE_GOAL = 2.0  # the curriculum check: the Gamma shape at or below this ...
SHAPE_BY = 0.75  # ... by this fraction of the budget


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["adv:cartpole"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--adversary-scales", nargs="+", type=float, default=[1.0])
    p.add_argument("--num-seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--total-steps", type=float, default=150_000)
    p.add_argument(
        "--br-steps",
        type=float,
        default=20_000,
        help="env steps of best-response adversary training per protagonist (0: skip)",
    )
    p.add_argument("--chunk-iterations", type=int, default=500)
    p.add_argument("--eval-episodes", type=int, default=16)
    p.add_argument("--grid", type=int, default=11, help="robustness grid size per axis (11 in the paper)")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --out from their checkpoints (finished runs are only re-evaluated)",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="no training: evaluate the latest checkpoints in --out (a stopped run: its budget so far)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="no computation: tables and plots from the evaluations saved in --out (eval.json)",
    )
    # a few QARL/SAC fields for quick runs; anything else keeps the config defaults
    for name, typ in (
        ("learning-starts", int),
        ("hidden", int),
        ("num-layers", int),
        ("batch-size", int),
        ("buffer-size", int),
        ("num-envs", int),
        ("num-steps", int),
        ("train-steps", int),
        ("threshold", float),
        ("phase-length", int),
    ):
        p.add_argument(f"--{name}", type=typ, default=None)
    args = p.parse_args(argv)
    for name in ("num_seeds", "total_steps", "chunk_iterations", "eval_episodes", "grid"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.br_steps < 0 or any(x <= 0 for x in args.adversary_scales):
        p.error("--br-steps must be >= 0 and every --adversary-scales value > 0")
    if not 0 <= args.seed <= 2**31 - 1:
        p.error(f"--seed must be in [0, {2**31 - 1}], got {args.seed}")
    import envs

    for name in args.envs:
        if name.split(":", 1)[0] != "adv":
            p.error(f"--envs: {name!r} is not a two-player task; allowed: adv:<task>")
        allowed = [n for n in envs.registered() if n.startswith("adv:")]
        if name not in allowed:
            p.error(f"--envs: unknown environment {name!r}; allowed: {allowed}")
    return args


def overrides(args) -> dict:
    keys = (
        "learning_starts",
        "hidden",
        "num_layers",
        "batch_size",
        "buffer_size",
        "num_envs",
        "num_steps",
        "train_steps",
        "threshold",
        "phase_length",
    )
    out = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    out["total_steps"] = int(args.total_steps)
    return out


def interval(values) -> dict:
    """Per-seed values, their IQM and 95% bootstrap interval."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = stats.bootstrap_ci(v)
    return {"seeds": v.tolist(), "iqm": stats.iqm(v), "ci": [lo, hi]}


def shape_check(steps, shape, budget: float) -> dict:
    """When each seed's curriculum shape first reached SHAPE_GOAL (env steps, None: never)."""
    reached = []
    for row in shape:
        hit = np.flatnonzero(np.nan_to_num(row, nan=np.inf) <= SHAPE_GOAL + 1e-6)
        reached.append(float(steps[hit[0]]) if hit.size else None)
    ok = all(r is not None and r <= SHAPE_BY * budget for r in reached)
    return {
        "goal": SHAPE_GOAL,
        "by_fraction": SHAPE_BY,
        "first_step_at_goal": reached,
        "all_seeds_in_time": ok,
        "final_shape": [float(r[np.isfinite(r)][-1]) if np.isfinite(r).any() else None for r in shape],
    }


def restore_latest(algo, run_dir: str, num_seeds: int, seed: int):
    """The seed-batched train state of ``run_dir``'s latest checkpoint (no compilation:
    the template comes from ``jax.eval_shape``) and its iteration."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num_seeds)
    shapes = jax.eval_shape(lambda k: init_states(algo, k), keys)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}")
        return ckpt.restore(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), step), int(step)
    finally:
        ckpt.close()


def run_env(env_name: str, scale: float, args, out_dir: str) -> dict:
    env = envs.make(env_name)
    if scale != 1.0:
        env = with_params(env, adversary_scale=scale)
    results, trained = {}, {}
    for method in args.methods:
        name, preset = METHODS[method]
        algo = qarl.make(env, algos.default_config(name, **preset, **overrides(args)), name=method)
        t0 = time.perf_counter()
        run_dir = os.path.join(out_dir, method)
        if args.eval_only or args.report_only:
            state, done = (None, None) if args.report_only else restore_latest(algo, run_dir, args.num_seeds, args.seed)
        else:
            res = train(
                algo,
                num_iterations=algo.config.num_updates,
                num_seeds=args.num_seeds,
                seed=args.seed,
                chunk_iterations=min(args.chunk_iterations, algo.config.num_updates),
                run_dir=run_dir,
                progress=True,
                resume=args.resume and os.path.isdir(run_dir),
                run_info={
                    "config": {k: str(v) for k, v in vars(algo.config).items()},
                    "method": method,
                    "adversary_scale": scale,
                },
            )
            state, done = res.state, algo.config.num_updates
        trained[method] = (algo, state, done)
        # the whole run from its log, resumed or not
        records = read_metrics(run_dir)
        _, curve, episodes = metric_arrays(records, "return_agent0")
        steps = (np.arange(curve.shape[1]) + 1) * algo.env_steps_per_update
        results[method] = {
            "wall_seconds": time.perf_counter() - t0,
            "steps": steps,
            "curve": curve,
            "episodes": episodes,
            "shape": metric_arrays(records, "curriculum_shape")[1]
            if algo.config.curriculum in ("gamma", "linear", "point")
            else None,
        }

    (n1, v1), (n2, v2) = axes = qarl_eval.stress_axes(next(iter(trained.values()))[0], args.grid)
    keys = jax.random.split(jax.random.PRNGKey(args.seed + 1), args.num_seeds)
    tag = {"eval_episodes": args.eval_episodes, "grid": args.grid, "num_seeds": args.num_seeds, "seed": args.seed}
    summary = {}
    for method, (algo, _, done) in trained.items():
        cache = os.path.join(out_dir, method, "eval.json")
        cached = json.load(open(cache)) if os.path.exists(cache) else None
        if args.report_only or (cached and cached["tag"] == {**tag, "iteration": done}):
            if cached is None:
                raise FileNotFoundError(f"--report-only needs {cache}: run --eval-only first")
            ev = cached["eval"]
        else:
            ev = evaluate_method(env, method, trained, axes, keys, args, os.path.join(out_dir, method))
            with open(cache, "w") as fh:
                json.dump({"tag": {**tag, "iteration": done}, "eval": ev}, fh)
            plotting.save_grid(
                ev["grid"],
                axes,
                os.path.join(out_dir, f"robustness_{method}"),
                f"{env_name} x{scale:g} {method}: protagonist return, no adversary",
            )
        grid = np.asarray(ev["grid"])
        curve, eps = results[method]["curve"], results[method]["episodes"]
        late = slice(curve.shape[1] // 2, None)  # second half, iterations where episodes ended
        w = eps[:, late]
        summary[method] = {
            "env_steps": int(results[method]["steps"][-1]),
            "budget": algo.config.total_steps,
            "final_training_return": float((curve[:, late] * w).sum() / max(w.sum(), 1)),
            "return_vs_final_adversary": ev["against"],
            "return_without_adversary": ev["without"],
            "return_vs_best_response": ev["best_response"],
            "grid_axes": [n1, n2],
            "robustness_grid_mean": grid.mean((1, 2)).tolist(),
            "robustness_grid_min": grid.min((1, 2)).tolist(),
            "robustness_grid_spread": np.asarray(qarl_eval.grid_spread(grid)).tolist(),
        }
        for k in (
            "return_without_adversary",
            "return_vs_best_response",
            "robustness_grid_mean",
            "robustness_grid_min",
            "robustness_grid_spread",
        ):
            if summary[method][k] is not None:
                summary[method][k + "_iqm"] = interval(summary[method][k])
        if method in ev["against"]:
            summary[method]["return_vs_own_adversary_iqm"] = interval(ev["against"][method])
        if results[method]["shape"] is not None:
            summary[method]["curriculum"] = shape_check(
                results[method]["steps"], results[method]["shape"], algo.config.total_steps
            )
    plot_curves(results, f"{env_name} (adversary x{scale:g})", os.path.join(out_dir, "returns.png"))
    plot_shapes(results, f"{env_name} (adversary x{scale:g})", os.path.join(out_dir, "curriculum_shape"))
    return summary


def evaluate_method(env, method: str, trained: dict, axes, keys, args, run_dir: str) -> dict:
    """One method's protagonists: against every loaded adversarial run's final adversary
    (cross play), without adversary, on the stress grid, and against a best response."""
    algo, state, _ = trained[method]
    params = state.params
    # the adversary's run holds the environment with the adversary on (SAC's has it off)
    others = {
        o: (oalgo, (algo.config.inputs[0], oalgo.config.inputs[1]))
        for o, (oalgo, _, _) in trained.items()
        if oalgo.config.adversary
    }
    crossed = {o: qarl_eval.cross_params(params, trained[o][1].params, seed_axis=True) for o in others}
    out = jax.tree.map(np.asarray, evaluate(algo, others, axes, args.eval_episodes)(params, crossed, keys))
    best = best_response(env, algo, params, keys, args, os.path.join(run_dir, "best_response.json"))
    return {
        "against": {o: out[o].tolist() for o in others},
        "without": out["without"].tolist(),
        "grid": out["grid"].tolist(),
        "best_response": best,
    }


def evaluate(algo, others: dict, axes, episodes: int):
    """One compiled, seed-vmapped program: ``(params, crossed, keys) -> {"without": [S],
    "grid": [S, M, F], <other>: [S]}``; ``others``: adversary method -> (its algorithm,
    the (protagonist, adversary) temperature inputs), ``crossed``: method -> crossed params."""

    def one(params, crossed, key):
        out = {
            "without": qarl_eval.evaluate_protagonist(algo, params, key, episodes, False),
            "grid": qarl_eval.robustness_grid(algo, params, key, axes),
        }
        for o, (oalgo, inputs) in others.items():
            out[o] = qarl_eval.evaluate_protagonist(oalgo, crossed[o], key, episodes, True, inputs=inputs)
        return out

    return jax.jit(jax.vmap(one))


def best_response(env, algo, params, keys, args, path: str) -> Optional[list]:
    """Each seed's protagonist return against a best-response adversary trained for
    ``--br-steps`` (kept in ``path``: a later call with the same budget and seeds reads it)."""
    if args.br_steps <= 0:
        return None
    tag = {
        "br_steps": int(args.br_steps),
        "seed": args.seed,
        "eval_episodes": args.eval_episodes,
        "num_seeds": args.num_seeds,
    }
    if os.path.exists(path):
        with open(path) as fh:
            done = json.load(fh)
        if done.get("tag") == tag:
            return done["returns"]
    t0 = time.perf_counter()
    br = qarl_eval.best_response_algo(env, algo.config, int(args.br_steps), algo.config.inputs[0])
    # one compiled chunk for the whole budget
    state = qarl_eval.train_best_response(br, params, jax.random.PRNGKey(args.seed + 2), br.config.num_updates)
    ev = jax.jit(jax.vmap(lambda p, k: qarl_eval.evaluate_protagonist(br, p, k, args.eval_episodes, True)))
    returns = np.asarray(ev(state.params, keys)).tolist()
    with open(path, "w") as fh:
        json.dump({"tag": tag, "returns": returns, "seconds": time.perf_counter() - t0}, fh)
    print(f"{algo.name}: best response trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return returns


def plot_shapes(results: dict, title: str, prefix: str):
    """The Gamma shape of every seed vs env steps (methods with a curriculum), PNG and JSON."""
    import matplotlib.pyplot as plt

    runs = {m: r for m, r in results.items() if r["shape"] is not None}
    if not runs:
        return
    with open(prefix + ".json", "w") as fh:
        json.dump(
            {
                m: {"env_steps": r["steps"].tolist(), "shape": np.nan_to_num(r["shape"], nan=-1).tolist()}
                for m, r in runs.items()
            },
            fh,
        )
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in runs.items():
        for s, row in enumerate(r["shape"]):
            ax.plot(r["steps"], row, lw=1, label=f"{m} seed {s}")
        budget = r["steps"][-1]
        ax.axvline(SHAPE_BY * budget, color="k", ls=":", lw=1)
    ax.axhline(SHAPE_GOAL, color="r", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("env steps")
    ax.set_ylabel("Gamma shape k (mean temperature k / 1000)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=100)
    plt.close(fig)


def plot_curves(results: dict, title: str, path: str):
    import matplotlib.pyplot as plt  # headless: matplotlib picks Agg itself; a notebook keeps its backend

    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)  # before a seed's first episode
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        curve = r["curve"].astype(float)
        # iterations without a finished episode report 0: carry the last finished value
        eps = r["episodes"] > 0
        filled = np.where(eps, curve, np.nan)
        for s in range(filled.shape[0]):
            last = np.nan
            for t in range(filled.shape[1]):
                last = filled[s, t] = filled[s, t] if np.isfinite(filled[s, t]) else last
        ax.plot(r["steps"], np.nanmean(filled, 0), label=method)
        ax.fill_between(r["steps"], np.nanmin(filled, 0), np.nanmax(filled, 0), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("protagonist return (training)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ci(d: Optional[dict]) -> str:
    return "-" if d is None else f"{d['iqm']:.1f} [{d['ci'][0]:.1f}, {d['ci'][1]:.1f}]"


def write_tables(summary: dict, out: str):
    lines = ["# QARL vs RARL vs SAC", "", "IQM over seeds [95% bootstrap interval]; grids without adversary.", ""]
    for run, per in summary.items():
        axes = next(iter(per.values()))["grid_axes"]
        lines += [
            f"## {run}",
            "",
            f"| method | vs own adversary | vs best response | no adversary | grid mean | "
            f"grid min | grid spread | ({axes[0]} x {axes[1]})",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, s in per.items():
            sp = s["robustness_grid_spread_iqm"]
            lines.append(
                f"| {method} | {_ci(s.get('return_vs_own_adversary_iqm'))} | "
                f"{_ci(s.get('return_vs_best_response_iqm'))} | {_ci(s['return_without_adversary_iqm'])} | "
                f"{_ci(s['robustness_grid_mean_iqm'])} | {_ci(s['robustness_grid_min_iqm'])} | "
                f"{sp['iqm']:.2f} [{sp['ci'][0]:.2f}, {sp['ci'][1]:.2f}] | |"
            )
        lines += ["", "Cross play (mean over seeds): protagonist (row) vs adversary (column)", ""]
        advs = sorted({o for s in per.values() for o in s["return_vs_final_adversary"]})
        lines += ["| protagonist | " + " | ".join(advs) + " |", "|---|" + "---|" * len(advs)]
        for method, s in per.items():
            a = s["return_vs_final_adversary"]
            lines.append(f"| {method} | " + " | ".join(f"{np.mean(a[o]):.1f}" if o in a else "-" for o in advs) + " |")
        for method, s in per.items():
            if "curriculum" in s:
                c = s["curriculum"]
                lines += [
                    "",
                    f"{method} curriculum: shape <= {c['goal']:g} first at env steps "
                    f"{c['first_step_at_goal']} (every seed by {c['by_fraction']:.0%} of the budget: "
                    f"{c['all_seeds_in_time']}); final shapes {[round(x, 2) for x in c['final_shape']]}",
                ]
        lines.append("")
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(lines))


def main(argv=None):
    args = parse(argv)
    out = args.out or os.path.join("runs", f"qarl_compare_{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    summary = {}
    for env_name in args.envs:
        for scale in args.adversary_scales:
            run = f"{env_name.replace(':', '_')}_x{scale:g}"
            summary[run] = run_env(env_name, scale, args, os.path.join(out, run))
            with open(os.path.join(out, "summary.json"), "w") as fh:  # after each, in case of a stop
                json.dump({"args": vars(args), "results": summary}, fh, indent=2)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({"args": vars(args), "results": summary}, fh, indent=2)
    write_tables(summary, out)
    print(open(os.path.join(out, "summary.md")).read())
    print(f"wrote {out}")
    return out


@entry
def cli(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
