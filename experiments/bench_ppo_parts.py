"""Where the time of a PPO update goes: the rollout against the learner (the epochs of
minibatch gradient steps), each timed alone from PPO's module-level pieces.

    python -m experiments.bench_ppo_parts
    python -m experiments.bench_ppo_parts --algos ippo mappo --num-envs 128 --num-steps 128 --repeats 3

For each algorithm: ``ppo.rollout_step`` scanned over ``num_steps`` (acting, env steps, the
truncation bootstrap), ``ppo.minibatch_epochs`` over ``ppo.loss_fn`` on that rollout (the
learner: ``update_epochs`` x ``num_minibatches`` forward and backward passes over whole
sequences), and the whole ``update``; each jitted, compile excluded, repeats interleaved,
medians reported; with ``--one-row-vmap`` each also under a vmap over one row, the cost
of a seed axis of size 1 (why the runner steps a single seed unbatched). The learner gets
the rollout's rewards and values as stand-in advantages and targets (GAE is a negligible
scan), so its cost is the real one.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from typing import Optional

import jax
import tyro

import algos
import envs
from algos import ppo
from experiments.bench_output import write_rows
from experiments.cli import entry


@dataclasses.dataclass(frozen=True)
class Args:
    algos: tuple[str, ...] = ("ippo", "mappo")
    env: str = "smax:3m"
    num_envs: int = 128
    num_steps: int = 128
    repeats: int = 3
    one_row_vmap: bool = False
    """also time each piece under a vmap over a single row, as a 1-seed vmapped runner ran it"""
    out: Optional[str] = None
    """JSON file for the rows (with the machine and arguments)"""


def time_parts(name: str, args: Args) -> dict:
    """Median seconds of the rollout, the learner and the whole update of ``name``."""
    env = envs.make(args.env)
    E, T = args.num_envs, args.num_steps
    algo = algos.make(name, env, num_envs=E, num_steps=T, total_steps=E * T * 100)
    m = ppo.make_parts(env.spec, algo.config, name)
    state = algo.init(jax.random.PRNGKey(0))
    config = algo.config

    def rollout(s):
        return jax.lax.scan(functools.partial(ppo.rollout_step, m, env), s, jax.random.split(s.key, T))

    def learner(s, traj):
        data = (traj._replace(info={}), m.policy.no_reference(traj.avail), traj.reward, traj.value)

        def grad_fn(params, idx):
            mb = jax.tree.map(lambda z: z[:, idx], data)
            return jax.grad(functools.partial(ppo.loss_fn, m), has_aux=True)(params, s.h[idx], *mb, s.hparams)

        return ppo.minibatch_epochs(
            grad_fn, m.tx, s.params, s.opt_state, s.key, config.update_epochs, E, config.num_minibatches
        )

    pieces = {"rollout": rollout, "learner": learner, "update": algo.update}
    fns = {k: jax.jit(f) for k, f in pieces.items()}
    _, traj = fns["rollout"](state)
    inputs = {"rollout": (state,), "learner": (state, traj), "update": (state,)}
    if args.one_row_vmap:  # the same pieces under a vmap over one row (a 1-seed runner axis)
        row1 = functools.partial(jax.tree.map, lambda x: x[None])
        for k in ("rollout", "learner", "update"):
            fns[f"{k}_vmap1"] = jax.jit(jax.vmap(pieces[k]))
            inputs[f"{k}_vmap1"] = tuple(row1(x) for x in inputs[k])
    for k, f in fns.items():  # compile and warm up
        jax.block_until_ready(f(*inputs[k]))
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*inputs[k]))
            times[k].append(time.perf_counter() - t0)
    row = {"algorithm": name, "env": args.env, "num_envs": E, "num_steps": T}
    row.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
    row.update({f"{k}_s_all": v for k, v in times.items()})
    row["learner_share"] = row["learner_s"] / row["update_s"]
    if args.one_row_vmap:
        row.update(
            {f"{k}_vmap1_cost": row[f"{k}_vmap1_s"] / row[f"{k}_s"] - 1 for k in ("rollout", "learner", "update")}
        )
    return row


def main(args: Args) -> list[dict]:
    rows = [time_parts(name, args) for name in args.algos]
    print(f"{'algorithm':>10} {'rollout s':>10} {'learner s':>10} {'update s':>9} {'learner / update':>17}")
    for r in rows:
        print(
            f"{r['algorithm']:>10} {r['rollout_s']:>10.2f} {r['learner_s']:>10.2f} {r['update_s']:>9.2f} "
            f"{r['learner_share']:>17.0%}"
        )
        if args.one_row_vmap:
            print(
                f"{'':>10} under a one-row vmap: rollout {r['rollout_vmap1_cost']:+.0%}, learner "
                f"{r['learner_vmap1_cost']:+.0%}, update {r['update_vmap1_cost']:+.0%}"
            )
    if args.out:
        write_rows(args.out, args, rows)
    return rows


@entry(compile_cache=False)
def cli(argv=None) -> int:
    main(tyro.cli(Args, args=argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
