"""Greedy (or sampled) evaluation of a finished or stopped run from its checkpoint.

    python -m experiments.evaluate runs/qmix_3m --episodes 256
    python -m experiments.evaluate runs/mappo_3m --episodes 128 --sampled

Rebuilds the algorithm from the run's ``run.json`` (algorithm, environment and its
``env_kwargs``, config),
restores the latest checkpoint (or ``--step``), evaluates every seed on
``--episodes`` episodes and writes ``eval_<episodes>.json`` next to the run's
metrics. Exit code 2 when the run directory or its checkpoint is unusable.

``--env-kwargs '{"num_agents": 1000}'`` evaluates the trained parameters on a changed
environment (merged into the run's ``env_kwargs``; written to
``eval_<episodes>_<kwargs>.json``): a swarm policy trained at one N, run at another.
The parameters must not depend on what changed (e.g. no one-hot agent ids when N
changes); otherwise a ConfigError names ``env_kwargs``.

    python -m experiments.evaluate runs/agg_dec_pomfc --env-kwargs '{"num_agents": 10000}' --episodes 4
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
from experiments.cli import entry
from experiments.train import check_seed, make_env, parse_env_kwargs
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
    env_kwargs: Optional[str] = None
    """JSON object merged into the run's env_kwargs, e.g. '{"num_agents": 1000}'"""


def load_run(run_dir: str):
    """(algo, description) rebuilt from ``run_dir/run.json``."""
    path = os.path.join(run_dir, "run.json")
    try:
        with open(path) as f:
            desc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("run_dir", run_dir, f"must hold a readable run.json ({e})") from None
    return build(desc), desc


def build(desc: dict, env_overrides: Optional[dict] = None):
    """The algorithm of a run description (``run.json``), its env arguments updated
    with ``env_overrides``."""
    config = apply_overrides(algos.default_config(desc["algo"]), desc.get("config", {}), "config")
    kwargs = {**parse_env_kwargs(desc.get("env_kwargs", {})), **(env_overrides or {})}
    return algos.make(desc["algo"], make_env(desc["env"], kwargs), config)


def restore_params(run_dir: str, step: Optional[int] = None):
    """-> (algo, description, seed-batched params [S, ...], step) from a run's latest
    (or ``step``) checkpoint. ConfigError when the directory or checkpoint is unusable."""
    algo, desc = load_run(run_dir)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        keys = jax.random.split(jax.random.PRNGKey(desc["seed"]), desc["num_seeds"])
        abstract = jax.eval_shape(lambda k: init_states(algo, k), keys)
        if step is None:
            state, step = ckpt.restore_latest(abstract, quarantine=False)
            if state is None:
                raise ConfigError("run_dir", run_dir, "has no intact checkpoint")
        else:
            state = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    return algo, desc, state.params, int(step)


def with_env(algo, desc: dict, params, env_kwargs: dict):
    """The run's algorithm rebuilt on its environment with ``env_kwargs`` merged in.
    Raises ConfigError naming ``env_kwargs`` when the trained parameters do not fit the
    changed environment (their shapes depend on what changed)."""
    if not env_kwargs:
        return algo
    new = build(desc, env_kwargs)
    abstract = jax.eval_shape(lambda k: new.init(k), jax.random.PRNGKey(0)).params
    got = jax.tree.map(lambda x: x.shape[1:], params)
    want = jax.tree.map(lambda x: x.shape, abstract)
    if jax.tree.structure(got) != jax.tree.structure(want) or jax.tree.leaves(got) != jax.tree.leaves(want):
        raise ConfigError(
            "env_kwargs",
            env_kwargs,
            f"the parameters trained on {desc['env']} {desc.get('env_kwargs', {})} do not fit "
            "this environment (their shapes depend on the changed arguments, e.g. one-hot agent ids)",
        )
    return new


def evaluate_run(
    run_dir: str,
    episodes: int = 256,
    greedy: bool = True,
    step: Optional[int] = None,
    seed: int = 12345,
    env_kwargs: Optional[dict] = None,
    sequential_seeds: bool = False,
) -> dict:
    """Evaluate every seed of a run from its checkpoint -> dict of per-seed lists plus
    ``step``, ``env_steps``, ``episodes_per_seed``, ``greedy``, ``env_kwargs``.
    ``sequential_seeds``: one seed after another (a seed's memory; large swarms)."""
    if episodes < 1:
        raise ConfigError("episodes", episodes, "must be >= 1")
    algo, desc, params, step = restore_params(run_dir, step)
    algo = with_env(algo, desc, params, env_kwargs or {})
    ev = evaluate_seeds(algo, params, jax.random.PRNGKey(seed), episodes, greedy=greedy, sequential=sequential_seeds)
    out = {k: np.asarray(v).tolist() for k, v in ev.items()}
    out.update(
        step=step,
        episodes_per_seed=episodes,
        greedy=greedy,
        env_steps=step * int(desc["env_steps_per_iteration"]),
        env_kwargs={**parse_env_kwargs(desc.get("env_kwargs", {})), **(env_kwargs or {})},
        algo=desc["algo"],
        env=desc["env"],
    )
    return out


def _suffix(env_kwargs: dict) -> str:
    if not env_kwargs:
        return ""
    text = "_".join(f"{k}{v}" for k, v in sorted(env_kwargs.items()))
    return "_" + "".join(c if c.isalnum() or c in "-._" else "-" for c in text)


@entry
def main(argv: Optional[list[str]] = None) -> int:
    args = tyro.cli(EvalArgs, args=sys.argv[1:] if argv is None else argv)
    check_seed("seed", args.seed)
    if args.step is not None and args.step < 1:
        raise ConfigError("step", args.step, "must be a positive checkpoint step (iterations)")
    if not os.path.isdir(args.run_dir):
        raise ConfigError("run_dir", args.run_dir, "must be an existing run directory")
    overrides = parse_env_kwargs(args.env_kwargs) if args.env_kwargs is not None else {}
    out = evaluate_run(args.run_dir, args.episodes, not args.sampled, args.step, args.seed, overrides)
    path = os.path.join(args.run_dir, f"eval_{args.episodes}{_suffix(overrides)}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    wr = np.asarray(out["win_rate"])
    where = f" with {overrides}" if overrides else ""
    print(
        f"{out['algo']} on {out['env']}{where} at {out['env_steps']:,} env steps, "
        f"{'greedy' if not args.sampled else 'sampled'}, {args.episodes} episodes/seed: "
        f"win rate {wr.mean():.3f} (per seed: {np.round(wr, 3).tolist()}), "
        f"return {np.asarray(out['return']).mean():.3f}"
    )
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
