"""Greedy (or sampled) evaluation of a finished or stopped run from its checkpoint.

    python -m experiments.evaluate runs/qmix_3m --episodes 256
    python -m experiments.evaluate runs/mappo_3m --episodes 128 --sampled

Rebuilds the algorithm from the run's ``run.json`` (algorithm, environment and its
``env_kwargs``, config),
restores the latest checkpoint (or ``--step``), evaluates every seed on
``--episodes`` episodes and writes ``eval_<episodes>.json`` next to the run's
metrics. Exit code 2 when the run directory or its checkpoint is unusable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import jax
import numpy as np
import tyro

import algos
import envs
from experiments.train import make_env, parse_env_kwargs
from marl.checkpoint import Checkpointer
from marl.config import ConfigError, apply_overrides
from marl.evaluation import evaluate_seeds
from marl.runner import init_states


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    run_dir: tyro.conf.Positional[str]
    episodes: int = 256
    """episodes per seed"""
    sampled: bool = False
    """sample actions from the policy instead of acting greedily"""
    step: Optional[int] = None
    """checkpoint step (iterations); default: the latest"""
    seed: int = 12345


def load_run(run_dir: str):
    """(algo, description) rebuilt from ``run_dir/run.json``."""
    path = os.path.join(run_dir, "run.json")
    try:
        with open(path) as f:
            desc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("run_dir", run_dir, f"must hold a readable run.json ({e})") from None
    config = apply_overrides(algos.default_config(desc["algo"]), desc.get("config", {}), "config")
    env = make_env(desc["env"], parse_env_kwargs(desc.get("env_kwargs", {})))
    return algos.make(desc["algo"], env, config), desc


def main(argv: Optional[list[str]] = None) -> int:
    args = tyro.cli(EvalArgs, args=sys.argv[1:] if argv is None else argv)
    try:
        if args.episodes < 1:
            raise ConfigError("episodes", args.episodes, "must be >= 1")
        algo, desc = load_run(args.run_dir)
        ckpt = Checkpointer(os.path.join(args.run_dir, "checkpoints"))
        step = args.step if args.step is not None else ckpt.latest_step()
        if step is None:
            raise ConfigError("run_dir", args.run_dir, "has no checkpoint")
    except (ConfigError, envs.UnknownEnvError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = jax.random.split(jax.random.PRNGKey(desc["seed"]), desc["num_seeds"])
    abstract = jax.eval_shape(lambda k: init_states(algo, k), keys)
    state = ckpt.restore(abstract, step)
    ckpt.close()
    ev = evaluate_seeds(algo, state.params, jax.random.PRNGKey(args.seed), args.episodes, greedy=not args.sampled)
    out = {k: np.asarray(v).tolist() for k, v in ev.items()}
    out.update(step=int(step), episodes_per_seed=args.episodes, greedy=not args.sampled,
               env_steps=int(step) * int(desc["env_steps_per_iteration"]))
    path = os.path.join(args.run_dir, f"eval_{args.episodes}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    wr = np.asarray(ev["win_rate"])
    print(f"{desc['algo']} on {desc['env']} at {out['env_steps']:,} env steps, "
          f"{'greedy' if not args.sampled else 'sampled'}, {args.episodes} episodes/seed: "
          f"win rate {wr.mean():.3f} (per seed: {np.round(wr, 3).tolist()}), "
          f"return {np.asarray(ev['return']).mean():.3f}")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
