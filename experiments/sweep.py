"""Sweep an algorithm's array hyperparameters x seeds in one compiled program.

    python -m experiments.sweep --algo ippo --env smax:3m --grid '{"lr": [1e-3, 3e-3], "ent_coef": [0.0, 0.01]}'
    python -m experiments.sweep --algo mappo --env smax:3m --random '{"lr": {"log_uniform": [1e-4, 1e-2]},
        "reg_coef": {"uniform": [0.0, 0.1]}}' --num-configs 16 --overrides '{"regularizer": {"kind": "wasserstein"}}'
    python -m experiments.sweep --algo qmix --env smax:3m --grid sweep.json --num-seeds 4 --total-steps 5e5

Sweepable names are the fields of the algorithm's ``HParams`` (``--list`` prints them):
PPO ``lr clip_eps ent_coef vf_coef gamma gae_lambda reg_coef reg_epsilon``; Q-learning
``lr gamma td_lambda epsilon_finish reg_coef reg_epsilon``. Every configuration x seed
is a row of the runner's vmapped axis, all rows in one program; with several devices
(or hosts, after ``marl.distributed.initialize``) the rows are sharded over them.

Outputs under ``<runs-dir>/<name>/``: ``run/`` (the runner's directory: ``metrics.jsonl``
with ``seed`` = row ``config * num_seeds + seed``, ``run.json``, checkpoints),
``results.md`` / ``results.json`` (configurations ranked by final win rate, then
return: mean over seeds and over the last ``--final-fraction`` of iterations),
``best_config.json`` (the best configuration as config fields), and the command that
trains it: ``python -m experiments.train --algo A --env E --config-file best_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional

import tyro

import algos
import envs
from experiments.cli import entry
from marl.config import ConfigError, apply_overrides, json_dict_arg


@dataclasses.dataclass(frozen=True)
class SweepArgs:
    algo: str = "ippo"
    """algorithm: one of algos.registered()"""
    env: str = "smax:3m"
    """environment: one of envs.registered()"""
    env_kwargs: str = "{}"
    """JSON object of keyword arguments for envs.make, e.g. '{"num_agents": 100}'"""
    grid: Optional[str] = None
    """JSON dict (or JSON file) {name: [values]}: the Cartesian product is swept"""
    random: Optional[str] = None
    """JSON dict (or JSON file) {name: {"uniform"|"log_uniform"|"choice": [...]}}: random search"""
    num_configs: int = 16
    """configurations drawn by --random"""
    sweep_seed: int = 0
    """seed of the random search"""
    num_seeds: int = 2
    """seeds per configuration"""
    seed: int = 0
    """base seed: seed s of every configuration uses split(PRNGKey(seed), num_seeds)[s]"""
    total_steps: Optional[int] = None
    """env steps per row (default: the algorithm's config); accepts 1e6"""
    overrides: Optional[str] = None
    """JSON dict (or JSON file) of fixed config fields, e.g. '{"num_envs": 64, "regularizer": {"kind": "kl"}}'"""
    metric: str = "auto"
    """ranking metric: auto (win_rate, then return) or any reported metric"""
    final_fraction: float = 0.1
    """final performance = mean over this last fraction of the iterations"""
    name: Optional[str] = None
    """sweep directory name under runs_dir (default: sweep_<algo>_<env>_<time>)"""
    runs_dir: str = "runs/sweeps"
    chunk_iterations: int = 10
    checkpoint_every: int = 5
    shard: bool = True
    """shard the rows over all devices when there are several (--no-shard: one device)"""
    resume: bool = False
    """continue the sweep --name from its checkpoint (one device)"""
    progress: bool = True
    list: bool = False
    """print the sweepable hyperparameters of --algo and exit"""


def build(args: SweepArgs):
    """-> (algorithm, configurations, base config). Everything validated, nothing compiled."""
    from experiments.train import check_name, check_seed
    from marl import sweep

    for field in ("num_seeds", "num_configs", "chunk_iterations", "checkpoint_every"):
        v = getattr(args, field)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(field, v, "must be a positive integer")
    check_seed("seed", args.seed)
    check_seed("sweep_seed", args.sweep_seed)
    check_name("name", args.name)
    if not 0.0 < args.final_fraction <= 1.0:
        raise ConfigError("final_fraction", args.final_fraction, "must be in (0, 1]")
    if (args.grid is None) == (args.random is None):
        raise ConfigError("grid/random", (args.grid, args.random), "give exactly one of --grid and --random")
    base = algos.default_config(args.algo)  # unknown algorithm -> ConfigError
    overrides = json_dict_arg("overrides", args.overrides) or {}
    if "total_steps" in overrides and args.total_steps is not None:
        raise ConfigError("overrides.total_steps", overrides["total_steps"], "set it with --total-steps only")
    base = apply_overrides(base, overrides, "overrides")
    if args.total_steps is not None:
        base = dataclasses.replace(base, total_steps=args.total_steps)
    if args.grid is not None:
        configs = sweep.grid(json_dict_arg("grid", args.grid))
    else:
        configs = sweep.random_search(json_dict_arg("random", args.random), args.num_configs, args.sweep_seed)
    from experiments.train import make_env, parse_env_kwargs

    try:
        env = make_env(args.env, parse_env_kwargs(args.env_kwargs))
    except envs.UnknownEnvError as e:
        raise ConfigError("env", args.env, str(e)) from None
    algo = algos.make(args.algo, env, base)
    sweep.validate(algo, configs)
    if args.metric != "auto":
        from marl.runner import metric_names

        names = metric_names(algo)
        if args.metric not in names:
            raise ConfigError("metric", args.metric, f"must be 'auto' or a metric {args.algo} reports: {names}")
    return algo, configs, base


def run(args: SweepArgs) -> dict:
    """Run the sweep and write its outputs; returns paths, rows and timings."""
    from marl import distributed, sweep

    distributed.initialize()
    algo, configs, base = build(args)
    name = args.name or f"sweep_{args.algo}_{args.env.replace(':', '-')}_{time.strftime('%Y%m%d-%H%M%S')}"
    out = os.path.abspath(os.path.join(args.runs_dir, name))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError("runs_dir", args.runs_dir, f"must be a writable directory ({e.strerror})") from None
    mesh = distributed.make_mesh() if args.shard else None
    if mesh is not None and mesh.size == 1:
        mesh = None
    num_iterations = base.total_steps // algo.env_steps_per_update
    rows = len(configs) * args.num_seeds
    print(
        f"== sweep {args.algo} on {args.env}: {len(configs)} configurations x {args.num_seeds} seeds = {rows} rows "
        f"in one program, {num_iterations} iterations ({num_iterations * algo.env_steps_per_update:,} env steps "
        f"per row), {1 if mesh is None else mesh.size} device(s) -> {out}",
        flush=True,
    )
    config_json = json.loads(json.dumps(dataclasses.asdict(base), default=str))
    res = sweep.run_sweep(
        algo,
        configs,
        num_iterations=num_iterations,
        num_seeds=args.num_seeds,
        seed=args.seed,
        chunk_iterations=args.chunk_iterations,
        checkpoint_every=args.checkpoint_every,
        run_dir=os.path.join(out, "run"),
        resume=args.resume,
        progress=args.progress,
        mesh=mesh,
        run_info={"config": config_json, "env_kwargs": json.loads(args.env_kwargs)},
    )
    summary = sweep.summarize(res, args.final_fraction, args.metric)
    table = sweep.markdown_table(summary, args.final_fraction, args.num_seeds)
    best = summary[0]
    best_path = os.path.join(out, "best_config.json")
    with open(best_path, "w") as f:
        json.dump(sweep.best_config_dict(base, best["hparams"]), f, indent=2)
    command = (
        f"python -m experiments.train --algo {args.algo} --env {args.env} --num-seeds {args.num_seeds} "
        f"--seed {args.seed} --config-file {best_path}"
    )
    if json.loads(args.env_kwargs):
        command += f" --env-kwargs '{json.dumps(json.loads(args.env_kwargs))}'"
    timings = {
        "compile_s": res.compile_seconds,
        "train_s": res.train_seconds,
        "devices": res.devices,
        "num_rows": rows,
        "env_steps_per_row": res.env_steps,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "algo": args.algo,
                "env": args.env,
                "args": dataclasses.asdict(args),
                "base_config": config_json,
                "rows": summary,
                "best": best,
                "best_config_file": best_path,
                "train_command": command,
                "timings": timings,
                "final_fraction": args.final_fraction,
            },
            f,
            indent=2,
        )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(
            f"# Sweep: {args.algo} on {args.env}\n\n{table}\n\nBest configuration: `{best_path}`\n\n"
            f"```bash\n{command}\n```\n"
        )
    print(f"   compile {res.compile_seconds:.1f}s, train {res.train_seconds:.1f}s\n\n{table}\n")
    print(
        f"sweep directory: {out}\n  table: {os.path.join(out, 'results.md')}\n  best:  {best_path}\n"
        f"train the best configuration:\n  {command}"
    )
    return {
        "dir": out,
        "rows": summary,
        "table": table,
        "best_config": best_path,
        "command": command,
        "result": res,
        **timings,
    }


def parse(argv: list[str]) -> SweepArgs:
    from experiments.train import _normalize_argv

    return tyro.cli(SweepArgs, args=_normalize_argv(argv), description=__doc__.split("\n\n")[0])


@entry
def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.list:
        from experiments.train import make_env, parse_env_kwargs
        from marl.sweep import sweepable

        algo = algos.make(args.algo, make_env(args.env, parse_env_kwargs(args.env_kwargs)))
        print(" ".join(sweepable(algo)))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
