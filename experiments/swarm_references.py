"""Returns of the hand-coded swarm reference policies (``envs.swarms.reference_policy``).

    python -m experiments.swarm_references --envs 'swarm:vicsek={"num_agents": 100, "max_steps": 50}'
    python -m experiments.swarm_references --envs swarm:kuramoto swarm:vicsek_hard --seeds 3 --episodes 32

For every environment (a name, optionally ``=`` and a JSON object of env arguments)
every reference policy that applies to it (zero, local alignment, compass, mean phase,
local mean) is evaluated, greedily, over ``--episodes`` episodes for each of ``--seeds``
evaluation keys. Outputs (``--out``): ``references.json`` (``{"args", "rows",
"lines"}``; ``lines`` maps an env name to ``{"reference:<kind>": mean return}``, the
format ``experiments.report --references`` draws) and ``references.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import numpy as np
import tyro

from experiments.cli import entry
from marl.config import ConfigError, check_positive


@dataclasses.dataclass(frozen=True)
class RefArgs:
    envs: tuple[str, ...] = ("swarm:kuramoto", "swarm:vicsek", "swarm:vicsek_hard", "swarm:aggregation")
    """environments, each NAME or NAME=JSON env arguments"""
    seeds: int = 3
    episodes: int = 32
    """episodes per seed"""
    gain: float = 5.0
    """proportional gain of the controllers (actions clip(gain * error, -1, 1))"""
    seed: int = 0
    out: str = "runs/swarm_references"


def parse_env(text: str) -> tuple[str, dict]:
    from experiments.train import parse_env_kwargs

    name, _, kw = text.partition("=")
    return name, parse_env_kwargs(kw or "{}")


def evaluate_references(args: RefArgs) -> dict:
    import jax

    from envs.swarms import reference_names, reference_policy
    from experiments.train import make_env
    from marl.evaluation import evaluate

    check_positive("seeds", args.seeds, integer=True)
    check_positive("episodes", args.episodes, integer=True)
    rows, lines = [], {}
    for text in args.envs:
        name, kwargs = parse_env(text)
        if not name.startswith("swarm:"):
            raise ConfigError("envs", text, "reference policies exist for swarm:* environments only")
        env = make_env(name, kwargs)
        for kind in reference_names(env):
            algo = reference_policy(env, kind, args.gain)
            run = jax.jit(jax.vmap(lambda k, a=algo: evaluate(a, {}, k, args.episodes)["return"]))
            ret = np.asarray(run(jax.random.split(jax.random.PRNGKey(args.seed), args.seeds)), np.float64)
            rows.append(
                {
                    "env": name,
                    "env_kwargs": kwargs,
                    "policy": kind,
                    "gain": args.gain,
                    "per_seed": ret.tolist(),
                    "mean": float(ret.mean()),
                }
            )
            lines.setdefault(name, {})[f"reference:{kind}"] = float(ret.mean())
            print(f"{name} {kwargs}: {kind}: {ret.mean():.2f} (per seed {np.round(ret, 2).tolist()})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "references.json"), "w") as f:
        json.dump({"args": dataclasses.asdict(args), "rows": rows, "lines": lines}, f, indent=2)
    md = [
        f"Reference policies: greedy return, mean over {args.seeds} seeds x {args.episodes} episodes "
        f"(per-seed means in brackets), gain {args.gain:g}.",
        "",
        "| env | env arguments | policy | return | per seed |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['env']} | `{json.dumps(r['env_kwargs'])}` | {r['policy']} | {r['mean']:.2f} | "
        f"{', '.join(f'{v:.2f}' for v in r['per_seed'])} |"
        for r in rows
    ]
    with open(os.path.join(args.out, "references.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return {"rows": rows, "lines": lines}


@entry
def main(argv: Optional[list[str]] = None) -> int:
    args = tyro.cli(RefArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__.split("\n\n")[0])
    evaluate_references(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
