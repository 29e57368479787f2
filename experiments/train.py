"""Train an algorithm on an environment from the command line.

    python -m experiments.train --algo mappo --env smax:3m --num-seeds 4 --total-steps 2e6
    python -m experiments.train --algo ippo --env mpe:simple_spread --lr 3e-4
    python -m experiments.train --algo mappo --env smax:3m --run-name my_run --resume
    python -m experiments.train --algo dec_pomfc --env swarm:aggregation --env-kwargs '{"num_agents": 100}'
    python -m experiments.train --algo mappo --env smax:3m --regularizer.kind wasserstein --regularizer.coef 0.01

The flags are generated from the algorithm's config dataclass (``--help`` after
``--algo X`` lists them); nested config fields take dotted flags (``--regularizer.kind``).
Outputs go to ``runs/<run-name>/``: ``metrics.jsonl``,
``checkpoints/`` (orbax), ``run.json``, ``eval.json`` and ``learning_curve.png``.
``--env-kwargs`` (a JSON object) is passed to ``envs.make(env, **kwargs)`` and stored
in ``run.json`` as ``env_kwargs``, so resuming and ``experiments.evaluate`` rebuild the
same environment.
Invalid input is rejected before anything compiles, naming the field, the value
and what is allowed (exit code 2): the run directory (writable, locked against a second
writer, resume compatibility), and the train state's size against available memory.
``--resume`` of a run with no checkpoint is refused (``--resume-or-start`` resumes or
starts). A non-finite metric or a loss above ``--max-loss`` stops the run (exit code 3).
With several devices the seeds are sharded over them (``--no-shard``: one device); on
several hosts, set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` and run the same command in every process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Annotated, Optional

import tyro

import algos
import envs
from experiments.cli import entry
from marl.config import ConfigError, apply_overrides


@dataclasses.dataclass(frozen=True)
class RunArgs:
    algo: str = "mappo"
    """algorithm: one of algos.registered()"""
    env: str = "smax:3m"
    """environment name: one of envs.registered()"""
    env_kwargs: str = "{}"
    """JSON object of keyword arguments for envs.make, e.g. '{"num_agents": 100}'"""
    num_seeds: int = 1
    """seeds trained in parallel (the vmapped axis)"""
    seed: int = 0
    """base seed; seed i of the run uses split(PRNGKey(seed))[i]"""
    run_name: Optional[str] = None
    """run directory name under runs_dir (default: <algo>_<env>_<time>)"""
    runs_dir: str = "runs"
    chunk_iterations: int = 10
    """iterations per compiled chunk; the host logs/checkpoints between chunks"""
    checkpoint_every: int = 5
    """checkpoint every this many chunks (and at the end)"""
    resume: bool = False
    """continue run_name from its latest intact checkpoint (refused when it has none)"""
    resume_or_start: bool = False
    """continue run_name when it has a checkpoint, start it otherwise"""
    max_loss: Optional[float] = 1e12
    """divergence guard: stop when a loss metric exceeds this magnitude (None: off)"""
    eval_episodes: int = 32
    """greedy evaluation episodes per seed at the end (0: none)"""
    progress: bool = True
    shard: bool = True
    """split the seeds over all visible devices (of every process, after
    ``marl.distributed.initialize``) when there are several; --no-shard: one device"""
    config_file: Optional[str] = None
    """JSON file of config fields (e.g. a sweep's best config), applied before flags"""


def _normalize_argv(argv: list[str]) -> list[str]:
    """Accept scientific notation for integer flags (``--total-steps 2e6``)."""
    out = []
    for tok in argv:
        if re.fullmatch(r"\d+(\.\d+)?[eE]\+?\d+", tok) and float(tok).is_integer():
            tok = str(int(float(tok)))
        out.append(tok)
    return out


def _peek(argv: list[str], flag: str, default: str) -> str:
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return default


def parse(argv: list[str]):
    """-> (RunArgs, algorithm config). Raises ConfigError on invalid input."""
    argv = _normalize_argv(argv)
    algo_name = _peek(argv, "--algo", RunArgs.algo)
    cfg_cls = algos.config_class(algo_name)  # unknown algo -> ConfigError
    defaults = algos.default_config(algo_name)
    cfg_file = _peek(argv, "--config-file", "")
    if cfg_file:
        defaults = load_config_file(cfg_file, defaults)

    # built at run time: the config class depends on --algo
    Args = dataclasses.make_dataclass(
        "Args",
        # top-level config fields as --field, nested ones dotted: --regularizer.kind
        [("run", tyro.conf.OmitArgPrefixes[RunArgs]), ("config", Annotated[cfg_cls, tyro.conf.arg(name="")])],
        frozen=True,
    )

    args = tyro.cli(
        Args, args=argv, default=Args(RunArgs(algo=algo_name), defaults), description=__doc__.split("\n\n")[0]
    )
    run = args.run
    check_run_args(run)
    return run, args.config


def check_run_args(run) -> None:
    """Bounds of the run flags (shared with the other CLIs' seed and name checks)."""
    for field in ("num_seeds", "chunk_iterations", "checkpoint_every"):
        if getattr(run, field) <= 0:
            raise ConfigError(field, getattr(run, field), "must be a positive integer")
    if run.eval_episodes < 0:
        raise ConfigError("eval_episodes", run.eval_episodes, "must be >= 0")
    check_seed("seed", run.seed)
    if run.max_loss is not None and not run.max_loss > 0:
        raise ConfigError("max_loss", run.max_loss, "must be a positive number (or None: no divergence guard)")
    if run.resume and run.resume_or_start:
        raise ConfigError("resume_or_start", True, "give either --resume or --resume-or-start, not both")
    check_name("run_name", run.run_name)
    parse_env_kwargs(run.env_kwargs)


SEED_MAX = 2**31 - 1  # evaluation keys add 10,000 and must stay below 2**32


def check_seed(field: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(field, seed, f"must be an integer in [0, {SEED_MAX}]")


def check_name(field: str, name) -> None:
    """A run or sweep name: one path component (no separators, not '.' or '..')."""
    if name is None:
        return
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(field, name, "must be a non-empty folder name without path separators")


def parse_env_kwargs(text) -> dict:
    """``--env-kwargs`` JSON (or an already-parsed dict) -> dict; ConfigError naming the field."""
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise ConfigError("env_kwargs", text, f"must be a JSON object, e.g. '{{\"num_agents\": 100}}' ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError("env_kwargs", text, "must be a JSON object (a dict of keyword arguments)")
    return value


def make_env(name: str, kwargs: dict):
    """``envs.make(name, **kwargs)``; an argument the environment does not accept raises
    ConfigError naming ``env_kwargs.<key>`` (environments that validate their own
    keywords name the field themselves)."""
    try:
        return envs.make(name, **kwargs)
    except ConfigError as e:
        if e.field in kwargs:  # the environment rejected one of our keywords
            raise ConfigError(f"env_kwargs.{e.field}", e.value, e.allowed) from None
        raise
    except TypeError as e:
        bad = re.search(r"keyword argument '(\w+)'", str(e))
        key = bad.group(1) if bad else ",".join(sorted(kwargs))
        raise ConfigError(
            f"env_kwargs.{key}", kwargs.get(key, kwargs), f"not accepted by environment {name!r} ({e})"
        ) from None


def load_config_file(path: str, defaults):
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("config_file", path, f"must be a readable JSON file ({e})") from None
    return apply_overrides(defaults, values, "config_file")


@entry
def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run, config = parse(argv)
    env_kwargs = parse_env_kwargs(run.env_kwargs)
    env = make_env(run.env, env_kwargs)
    algo = algos.make(run.algo, env, config)

    from marl import distributed
    from marl.evaluation import evaluate_seeds
    from marl.plotting import plot_run
    from marl.runner import train

    distributed.initialize()
    mesh = distributed.make_mesh() if run.shard else None

    name = run.run_name or f"{run.algo}_{run.env.replace(':', '-')}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(run.runs_dir, name)
    num_iterations = config.total_steps // algo.env_steps_per_update
    result = train(
        algo,
        num_iterations=num_iterations,
        num_seeds=run.num_seeds,
        seed=run.seed,
        chunk_iterations=run.chunk_iterations,
        run_dir=run_dir,
        checkpoint_every=run.checkpoint_every,
        resume=run.resume,
        resume_or_start=run.resume_or_start,
        max_loss=run.max_loss,
        progress=run.progress,
        mesh=mesh,
        run_info={"config": json.loads(json.dumps(dataclasses.asdict(config), default=str)), "env_kwargs": env_kwargs},
    )

    import jax

    params = result.state.params
    if jax.process_count() > 1:  # every process holds a part of the rows: gather them, process 0 reports
        params = distributed.to_host(params)
        if jax.process_index() != 0:
            return 0
    if result.train_seconds > 0:
        sps = result.env_steps * run.num_seeds / result.train_seconds
        print(
            f"trained {result.env_steps:,} env steps x {run.num_seeds} seed(s): "
            f"compile {result.compile_seconds:.1f}s, train {result.train_seconds:.1f}s ({sps:,.0f} env steps/s)"
        )
    else:  # resumed a finished run: nothing was trained in this call
        print(f"already trained: {result.env_steps:,} env steps x {run.num_seeds} seed(s)")
    if run.eval_episodes:
        ev = evaluate_seeds(algo, params, jax.random.PRNGKey(run.seed + 10_000), run.eval_episodes)
        ev = {k: [float(x) for x in v] for k, v in ev.items()}
        with open(os.path.join(result.run_dir, "eval.json"), "w") as f:
            json.dump(ev, f, indent=2)
        print(
            f"greedy evaluation ({run.eval_episodes} episodes/seed): return "
            f"{sum(ev['return']) / len(ev['return']):.3f}, "
            f"win rate {sum(ev['win_rate']) / len(ev['win_rate']):.3f} "
            f"(per seed: {[round(x, 3) for x in ev['win_rate']]})"
        )
    png = plot_run(result.run_dir)
    print(
        f"run directory: {result.run_dir}\n  metrics:    {os.path.join(result.run_dir, 'metrics.jsonl')}\n"
        f"  checkpoint: {os.path.join(result.run_dir, 'checkpoints')}\n  curve:      {png}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
