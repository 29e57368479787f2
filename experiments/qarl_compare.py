"""QARL vs RARL vs SAC on adversarial control tasks, N seeds vmapped per method.

For each environment and method (``qarl``: the self-paced Gamma curriculum; ``rarl``:
the adversary at its target temperature from the start; ``sac``: no adversary), trains
``--num-seeds`` seeds in one compiled program (``marl.runner.train``), then evaluates
every seed's final protagonist

- against its own final adversary, and against the other methods' final adversaries
  (cross play, the adversary's temperature fixed at the target mean),
- without adversary (its force scaled by 0),
- on the 11 x 11 mass x friction grid without adversary (one vmapped rollout).

Writes under ``runs/qarl_compare_<time>/`` (or ``--out``):
``<env>/<method>/`` (the runner's metrics.jsonl, run.json, checkpoints),
``<env>/returns.png`` (protagonist return vs env steps, mean and min-max over seeds),
``<env>/robustness_<method>.{png,json}``, ``summary.json`` and ``summary.md`` (tables).

    python -m experiments.qarl_compare --envs adv:cartpole --total-steps 300000 --num-seeds 4
    python -m experiments.qarl_compare --envs adv:cartpole adv:hopper --total-steps 1000000
    python -m experiments.qarl_compare --envs adv:cartpole --out runs/my_compare --resume   # after a stop
    # smoke test (seconds of training, checks the pipeline):
    python -m experiments.qarl_compare --envs adv:cartpole --total-steps 480 --num-seeds 2 \\
        --learning-starts 64 --hidden 16 --num-layers 1 --batch-size 32 --buffer-size 1024 --grid 3
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import jax
import numpy as np

import algos
import envs
from algos import qarl
from experiments.regularizer_study import metric_arrays
from marl.logging import read_metrics
from marl.runner import train

METHODS = {"qarl": ("qarl", {}), "rarl": ("rarl", {}), "sac": ("qarl", {"adversary": False})}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["adv:cartpole"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--num-seeds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--total-steps", type=float, default=300_000)
    p.add_argument("--chunk-iterations", type=int, default=500)
    p.add_argument("--eval-episodes", type=int, default=16)
    p.add_argument("--grid", type=int, default=11, help="robustness grid size per axis (11 in the paper)")
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --out from their checkpoints (finished runs are only re-evaluated)")
    # a few QARL/SAC fields for quick runs; anything else keeps the config defaults
    for name, typ in (("learning-starts", int), ("hidden", int), ("num-layers", int), ("batch-size", int),
                      ("buffer-size", int), ("num-envs", int), ("num-steps", int), ("train-steps", int),
                      ("threshold", float), ("phase-length", int)):
        p.add_argument(f"--{name}", type=typ, default=None)
    return p.parse_args(argv)


def overrides(args) -> dict:
    keys = ("learning_starts", "hidden", "num_layers", "batch_size", "buffer_size", "num_envs", "num_steps",
            "train_steps", "threshold", "phase_length")
    out = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    out["total_steps"] = int(args.total_steps)
    return out


def grid_values(n: int):
    if n == 11:
        return qarl.DEFAULT_MASSES, qarl.DEFAULT_FRICTIONS
    return (tuple(float(x) for x in np.round(2.0 ** np.linspace(-1.5, 1.5, n), 3)),
            tuple(float(x) for x in np.round(np.linspace(0.0, 5.0, n), 3)))


def evaluators(algo, episodes: int, masses, frictions):
    """Seed-vmapped, jitted ``ev(params, keys, adversary) -> [S]`` and ``grid(params, keys) -> [S, M, F]``."""
    fns = {adv: jax.jit(jax.vmap(lambda p, k, adv=adv: qarl.evaluate_protagonist(algo, p, k, episodes, adv)))
           for adv in (True, False)}
    grid = jax.jit(jax.vmap(lambda p, k: qarl.robustness_grid(algo, p, k, masses, frictions)))
    return (lambda p, k, adv: fns[adv](p, k)), grid


def run_env(env_name: str, args, out_dir: str) -> dict:
    env = envs.make(env_name)
    results, trained = {}, {}
    for method in args.methods:
        name, preset = METHODS[method]
        algo = qarl.make(env, algos.default_config(name, **preset, **overrides(args)), name=method)
        t0 = time.perf_counter()
        run_dir = os.path.join(out_dir, method)
        res = train(algo, num_iterations=algo.config.num_updates, num_seeds=args.num_seeds, seed=args.seed,
                    chunk_iterations=min(args.chunk_iterations, algo.config.num_updates),
                    run_dir=run_dir, progress=True, resume=args.resume and os.path.isdir(run_dir),
                    run_info={"config": {k: str(v) for k, v in vars(algo.config).items()}, "method": method})
        trained[method] = (algo, res)
        # the whole run from its log, resumed or not
        _, curve, episodes = metric_arrays(read_metrics(run_dir), "return_agent0")
        steps = (np.arange(curve.shape[1]) + 1) * algo.env_steps_per_update
        results[method] = {"wall_seconds": time.perf_counter() - t0, "compile_seconds": res.compile_seconds,
                           "steps": steps, "curve": curve, "episodes": episodes,
                           # SAC has no adversary, so no temperature to draw: no curriculum
                           "final_shape": (np.asarray(res.state.ext.curriculum.shape).tolist()
                                           if algo.config.adversary else None)}

    masses, frictions = grid_values(args.grid)
    key = jax.random.PRNGKey(args.seed + 1)
    summary = {}
    for method, (algo, res) in trained.items():
        params = res.state.params
        S = args.num_seeds
        keys = jax.random.split(key, S)
        ev, grid_fn = evaluators(algo, args.eval_episodes, masses, frictions)
        against = {}
        for other, (_, ores) in trained.items():
            if other == "sac":
                continue  # its adversary never learned
            crossed = qarl.cross_params(params, ores.state.params, seed_axis=True)
            against[other] = np.asarray(ev(crossed, keys, True)).tolist()
        without = np.asarray(ev(params, keys, False)).tolist()
        grid = np.asarray(grid_fn(params, keys))
        qarl.save_grid(grid, masses, frictions, os.path.join(out_dir, f"robustness_{method}"),
                       f"{env_name} {method}: protagonist return, no adversary")
        curve, eps = results[method]["curve"], results[method]["episodes"]
        late = slice(curve.shape[1] // 2, None)  # second half, iterations where episodes ended
        w = eps[:, late]
        summary[method] = {
            "final_training_return": float((curve[:, late] * w).sum() / max(w.sum(), 1)),
            "return_vs_final_adversary": against, "return_without_adversary": without,
            "robustness_grid_mean": grid.mean((1, 2)).tolist(), "robustness_grid_min": grid.min((1, 2)).tolist(),
            "final_curriculum_shape": results[method]["final_shape"],
            "wall_seconds": results[method]["wall_seconds"], "compile_seconds": results[method]["compile_seconds"],
        }
    plot_curves(results, env_name, os.path.join(out_dir, "returns.png"))
    return summary


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


def write_tables(summary: dict, out: str):
    lines = ["# QARL vs RARL vs SAC", ""]
    for env_name, per in summary.items():
        lines += [f"## {env_name}", "", "| method | training return | vs own adversary | vs QARL adversary | "
                  "vs RARL adversary | no adversary | grid mean | grid min |", "|---|---|---|---|---|---|---|---|"]
        for method, s in per.items():
            f = lambda v: "-" if v is None else f"{np.mean(v):.1f} +- {np.std(v):.1f}"
            a = s["return_vs_final_adversary"]
            own = a.get(method)
            lines.append(f"| {method} | {s['final_training_return']:.1f} | {f(own)} | {f(a.get('qarl'))} | "
                         f"{f(a.get('rarl'))} | {f(s['return_without_adversary'])} | "
                         f"{f(s['robustness_grid_mean'])} | {f(s['robustness_grid_min'])} |")
        lines.append("")
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(lines))


def main(argv=None):
    args = parse(argv)
    out = args.out or os.path.join("runs", f"qarl_compare_{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    summary = {}
    for env_name in args.envs:
        summary[env_name] = run_env(env_name, args, os.path.join(out, env_name.replace(":", "_")))
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({"args": vars(args), "results": summary}, fh, indent=2)
    write_tables(summary, out)
    print(open(os.path.join(out, "summary.md")).read())
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
