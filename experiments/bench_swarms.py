"""Throughput of the swarm environments: agent-steps per second of random-action rollouts.

    python -m experiments.bench_swarms                          # N = 1,000 and 10,000, every task
    python -m experiments.bench_swarms --sizes 100 1000 --tasks vicsek --steps 200
    python -m experiments.bench_swarms --neighbours dense --sizes 1000

One unwrapped environment (no auto-reset) steps ``--steps`` times under
``jit(scan(step))`` with actions uniform in [-1, 1]; agent-steps/s = N * steps / time,
median of ``--repeats`` timed calls after one compiling call (compile time reported
separately). Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Optional

import jax
import tyro

from envs.swarms import TASKS, make_swarm
from experiments.bench_output import write_rows
from experiments.cli import entry


@dataclasses.dataclass(frozen=True)
class Args:
    tasks: tuple[str, ...] = TASKS
    sizes: tuple[int, ...] = (1_000, 10_000)
    steps: int = 50
    """environment steps per timed call"""
    repeats: int = 3
    neighbours: str = "auto"
    """auto | dense | cells (auto: dense up to dense_max_agents = 512)"""
    cell_capacity: int = 0
    out: Optional[str] = "runs/bench/bench_swarms.json"


def bench_one(task: str, n: int, args: Args) -> dict:
    env = make_swarm(task, num_agents=n, max_steps=10**6, neighbours=args.neighbours, cell_capacity=args.cell_capacity)
    shape = (n, env.action_dim)

    def body(state, key):
        k_act, k_step = jax.random.split(key)
        state, ts = env.step(k_step, state, jax.random.uniform(k_act, shape, minval=-1.0, maxval=1.0))
        return state, ts.info["neighbour_overflow"]

    @jax.jit
    def rollout(state, key):
        return jax.lax.scan(body, state, jax.random.split(key, args.steps))

    state, _ = jax.jit(env.reset)(jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    state, overflow = jax.block_until_ready(rollout(state, jax.random.PRNGKey(1)))
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        state, overflow = jax.block_until_ready(rollout(state, jax.random.PRNGKey(2 + r)))
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {
        "task": task,
        "num_agents": n,
        "neighbours": "cells" if env.use_cells else "dense",
        "cells_per_side": env.cells if env.use_cells else None,
        "cell_capacity": env.capacity if env.use_cells else None,
        "agent_steps_per_s": n * args.steps / t,
        "env_steps_per_s": args.steps / t,
        "seconds_per_call": t,
        "compile_plus_first_call_s": compile_s,
        "max_overflow": int(overflow.max()),
    }


def main(args: Args) -> list[dict]:
    rows = [bench_one(task, n, args) for task in args.tasks for n in args.sizes]
    print(
        f"{'task':<12} {'N':>7} {'neighbours':>10} {'cap':>5} {'agent-steps/s':>14} {'env steps/s':>12} "
        f"{'compile s':>10} {'overflow':>8}"
    )
    for r in rows:
        print(
            f"{r['task']:<12} {r['num_agents']:>7,} {r['neighbours']:>10} {r['cell_capacity'] or '-':>5} "
            f"{r['agent_steps_per_s']:>14,.0f} {r['env_steps_per_s']:>12,.1f} "
            f"{r['compile_plus_first_call_s']:>10.1f} {r['max_overflow']:>8}"
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
