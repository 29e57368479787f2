"""Return of trained swarm policies as the number of agents changes.

    python -m experiments.swarm_transfer runs/swarm_study/aggregation_dec_pomfc runs/swarm_study/aggregation_ippo
    python -m experiments.swarm_transfer runs/swarm_study/*_dec_pomfc --num-agents 10 100 1000 10000 --episodes 8

Every run (trained at its own N, as written by ``experiments.train``) is restored from
its latest checkpoint and evaluated, greedily, at every N of ``--num-agents``; nothing
is retrained. With ``--references`` the hand-coded reference policies of each
run's environment are evaluated at every N too (rows ``reference:<kind>``). Policies
whose parameters do not depend on N (Dec-POMFC; IPPO / MAPPO without one-hot agent
ids) run unchanged; a run whose parameters do depend on N is
reported as such and skipped. Returns of the swarm tasks are sums over the episode of
a reward on the empirical distribution (order parameter, polarization, minus the mean
distance to the centre), so they are comparable across N.

Outputs (``--out``, default ``<parent of the first run>/transfer``): ``transfer.json``
(per run and N: per-seed returns, their mean and min / max over seeds, seconds),
``transfer.md`` (one table per task: runs x N) and ``transfer_<task>.png`` (return vs N,
log scale, one line per run, min-max band over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import tyro

from experiments.cli import entry
from marl.config import ConfigError


@dataclasses.dataclass(frozen=True)
class TransferArgs:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """run directories (each with run.json and checkpoints/)"""
    num_agents: tuple[int, ...] = (10, 100, 1000, 10000)
    """swarm sizes to evaluate at"""
    episodes: int = 8
    """greedy episodes per seed at each N"""
    large_episodes: int = 1
    """episodes per seed at N >= large_n, seeds evaluated one after another to bound memory
    (a large swarm's return varies little between episodes)"""
    large_n: int = 5000
    large_env_kwargs: str = "{}"
    """JSON object of extra env arguments at N >= large_n, e.g. '{"cell_capacity": 64}' (a
    swarm whose radius holds thousands of neighbours per agent then averages over a subsample)"""
    seed: int = 12345
    references: bool = False
    """also evaluate the hand-coded reference policies of each run's environment at every N"""
    references_gain: float = 5.0
    out: Optional[str] = None


def check_args(args: TransferArgs) -> None:
    if not args.run_dirs:
        raise ConfigError("run_dirs", args.run_dirs, "must name at least one run directory")
    for n in args.num_agents:
        if not (isinstance(n, int) and n >= 2):
            raise ConfigError("num_agents", n, "must be integers >= 2")
    for field in ("episodes", "large_episodes", "large_n"):
        v = getattr(args, field)
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(field, v, "must be a positive integer")
    from experiments.train import parse_env_kwargs

    extra = parse_env_kwargs(args.large_env_kwargs)
    if "num_agents" in extra:
        raise ConfigError("large_env_kwargs", args.large_env_kwargs, "must not set num_agents (use --num-agents)")
    for d in args.run_dirs:
        if not os.path.isfile(os.path.join(d, "run.json")):
            raise ConfigError("run_dirs", d, "must be a run directory holding run.json")


def transfer(args: TransferArgs) -> dict:
    """Evaluate every run at every N -> {"rows": [...], "out": dir, "table": markdown}."""
    from experiments.evaluate import evaluate_run
    from experiments.regularizer_study import slug
    from experiments.train import parse_env_kwargs

    check_args(args)
    large_kwargs = parse_env_kwargs(args.large_env_kwargs)
    rows = []
    for d in args.run_dirs:
        with open(os.path.join(d, "run.json")) as f:
            desc = json.load(f)
        trained_n = desc.get("env_kwargs", {}).get("num_agents")
        for n in args.num_agents:
            large = n >= args.large_n
            episodes = args.large_episodes if large else args.episodes
            t0 = time.perf_counter()
            try:
                kwargs = {"num_agents": n, **(large_kwargs if large else {})}
                ev = evaluate_run(d, episodes, True, None, args.seed, kwargs, sequential_seeds=large)
            except ConfigError as e:
                if e.field != "env_kwargs":
                    raise
                print(f"  {d} at N={n}: skipped ({e})", flush=True)
                rows.append(
                    {
                        "run": d,
                        "algo": desc["algo"],
                        "env": desc["env"],
                        "trained_n": trained_n,
                        "n": n,
                        "skipped": str(e),
                    }
                )
                continue
            ret = np.asarray(ev["return"], np.float64)
            row = {
                "run": d,
                "algo": desc["algo"],
                "env": desc["env"],
                "trained_n": trained_n,
                "n": n,
                "env_kwargs": ev["env_kwargs"],
                "episodes_per_seed": episodes,
                "returns": ret.tolist(),
                "mean": float(ret.mean()),
                "min": float(ret.min()),
                "max": float(ret.max()),
                "seconds": time.perf_counter() - t0,
                "env_steps": ev["env_steps"],
            }
            rows.append(row)
            print(
                f"  {desc['algo']} on {desc['env']} (trained at N={trained_n}) at N={n}: "
                f"return {row['mean']:.3f} [{row['min']:.3f}, {row['max']:.3f}] ({row['seconds']:.0f}s)",
                flush=True,
            )

    if args.references:
        rows += reference_rows(args, large_kwargs)
    out = os.path.abspath(args.out or os.path.join(os.path.dirname(os.path.abspath(args.run_dirs[0])), "transfer"))
    os.makedirs(out, exist_ok=True)
    table = markdown(rows, args.num_agents)
    with open(os.path.join(out, "transfer.json"), "w") as f:
        json.dump({"args": dataclasses.asdict(args), "rows": rows}, f, indent=2)
    with open(os.path.join(out, "transfer.md"), "w") as f:
        f.write(table + "\n")
    plots = [
        plot(env, [r for r in rows if r["env"] == env], os.path.join(out, f"transfer_{slug(env)}.png"))
        for env in dict.fromkeys(r["env"] for r in rows)
    ]
    print("\n" + table + f"\n\nwritten: {out}")
    return {"rows": rows, "out": out, "table": table, "plots": plots}


def reference_rows(args: TransferArgs, large_kwargs: dict) -> list[dict]:
    """Rows of the reference policies (``envs.swarms.reference_policy``) of every run's
    environment (its env arguments, N replaced), one evaluation key per seed of the runs."""
    import jax

    from envs.swarms import reference_names, reference_policy
    from experiments.train import make_env, parse_env_kwargs
    from marl.evaluation import evaluate_seeds

    envs_seen = {}
    for d in args.run_dirs:
        with open(os.path.join(d, "run.json")) as f:
            desc = json.load(f)
        kw = {k: v for k, v in parse_env_kwargs(desc.get("env_kwargs", {})).items() if k != "num_agents"}
        envs_seen.setdefault((desc["env"], json.dumps(kw, sort_keys=True)), desc.get("num_seeds", 3))
    rows = []
    for (name, kw_text), seeds in envs_seen.items():
        kw = json.loads(kw_text)
        for n in args.num_agents:
            large = n >= args.large_n
            episodes = args.large_episodes if large else args.episodes
            env = make_env(name, {**kw, "num_agents": n, **(large_kwargs if large else {})})
            for kind in reference_names(env):
                t0 = time.perf_counter()
                algo = reference_policy(env, kind, args.references_gain)
                ev = evaluate_seeds(
                    algo, {"_": jax.numpy.zeros((seeds,))}, jax.random.PRNGKey(args.seed), episodes, sequential=large
                )
                ret = np.asarray(ev["return"], np.float64)
                rows.append(
                    {
                        "run": f"reference:{kind}:{name}:{kw_text}",
                        "algo": f"reference:{kind}",
                        "env": name,
                        "trained_n": None,
                        "n": n,
                        "env_kwargs": {**kw, "num_agents": n},
                        "episodes_per_seed": episodes,
                        "returns": ret.tolist(),
                        "mean": float(ret.mean()),
                        "min": float(ret.min()),
                        "max": float(ret.max()),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(f"  reference {kind} on {name} at N={n}: return {ret.mean():.3f}", flush=True)
    return rows


def _label(r: dict) -> str:
    if r["trained_n"] is None:
        return f"{r['algo']} (hand-coded)"
    return f"{r['algo']} (trained N={r['trained_n']})"


def markdown(rows: list[dict], ns) -> str:
    lines = ["Greedy return (mean over seeds, [min, max] over seeds) at each N; each policy trained at one N only.", ""]
    for env in dict.fromkeys(r["env"] for r in rows):
        lines += [
            f"**{env}**",
            "",
            "| policy | " + " | ".join(f"N={n:,}" for n in ns) + " |",
            "|---|" + "---|" * len(ns),
        ]
        for run in dict.fromkeys(r["run"] for r in rows if r["env"] == env):
            cells = {r["n"]: r for r in rows if r["run"] == run}
            first = next(iter(cells.values()))
            txt = [
                (
                    "n/a"
                    if "skipped" in cells[n]
                    else f"{cells[n]['mean']:.2f} [{cells[n]['min']:.2f}, {cells[n]['max']:.2f}]"
                )
                if n in cells
                else ""
                for n in ns
            ]
            lines.append(f"| {_label(first)} | " + " | ".join(txt) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(env: str, rows: list[dict], path: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for run in dict.fromkeys(r["run"] for r in rows):
        rs = sorted((r for r in rows if r["run"] == run and "skipped" not in r), key=lambda r: r["n"])
        if not rs:
            continue
        n = [r["n"] for r in rs]
        (line,) = ax.plot(n, [r["mean"] for r in rs], marker="o", label=_label(rs[0]))
        ax.fill_between(n, [r["min"] for r in rs], [r["max"] for r in rs], alpha=0.2, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("number of agents N at evaluation")
    ax.set_ylabel("greedy episode return")
    ax.set_title(f"{env}: policies evaluated across N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@entry
def main(argv: Optional[list[str]] = None) -> int:
    args = tyro.cli(TransferArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__.split("\n\n")[0])
    transfer(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
