"""Fixed-seed fingerprints of every registered algorithm, to show that a refactor keeps
behaviour: each case trains a tiny configuration for a few iterations (2 vmapped seeds,
fixed key) and hashes its metrics and final parameters (SHA-256 of the float32 bytes, in
tree order). Equal hashes mean bitwise-equal numbers on this machine and jax version.

    python -m experiments.behaviour_hash --out results/behaviour/hashes.json
    python -m experiments.behaviour_hash --check results/behaviour/hashes.json   # exit 1 on a change
    python -m experiments.behaviour_hash --cases mappo qmix-kl-loss             # a subset

Cases: every registered algorithm at its preset on an env it accepts, plus the
regularizer wirings (KL / Wasserstein, loss / penalty) of each family that has one.
A hash depends on the jax/XLA version and the CPU: compare files made on one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Optional, Sequence

import numpy as np

from experiments.cli import entry
from marl.config import ConfigError

# tiny sizes, the same for every family (each config takes the fields it has)
TINY = dict(
    num_envs=4, num_steps=8, num_minibatches=2, update_epochs=2, hidden=32, train_steps=2, batch_size=4, buffer_size=16
)
ITERATIONS = 3
SEEDS = 2

# case name -> (algorithm, env, env kwargs, config overrides)
CASES: dict[str, tuple[str, str, dict, dict]] = {
    "ippo": ("ippo", "smax:3m", {}, {}),
    "mappo": ("mappo", "smax:3m", {}, {}),
    "mappo-continuous": ("mappo", "swarm:aggregation", {"num_agents": 4}, {}),
    "qmix": ("qmix", "smax:3m", {}, {"num_steps": 32}),
    "vdn": ("vdn", "mpe:simple_spread", {}, {"num_steps": 32}),
    "qplex": ("qplex", "smax:3m", {}, {"num_steps": 32}),
    "iql": ("iql", "mpe:simple_spread", {}, {"num_steps": 32}),
    "sac": ("sac", "adv:pendulum", {}, {"learning_starts": 32}),
    "emu": ("emu", "smax:3m", {}, {"num_steps": 32}),
    "trama": (
        "trama",
        "smax-mt:surComb3",
        {},
        {"cluster_start": 0, "min_cluster_episodes": 4, "cluster_interval": 64, "num_steps": 32},
    ),
    "dec_pomfc": ("dec_pomfc", "swarm:aggregation", {"num_agents": 4}, {}),
    "qarl": ("qarl", "adv:pendulum", {}, {"learning_starts": 32}),
    "rarl": ("rarl", "adv:pendulum", {}, {"learning_starts": 32}),
    "mappo-wasserstein-penalty": (
        "mappo",
        "smax:3m",
        {},
        {
            "regularizer": {
                "kind": "wasserstein",
                "coef": 0.1,
                "mode": "penalty",
                "reference": "initial",
                "iterations": 20,
            }
        },
    ),
    "ippo-kl-loss": (
        "ippo",
        "smax:3m",
        {},
        {"regularizer": {"kind": "kl", "coef": 0.1, "mode": "loss", "reference": "rollout"}},
    ),
    "qmix-kl-loss": (
        "qmix",
        "mpe:simple_spread",
        {},
        {"regularizer": {"kind": "kl", "coef": 0.1, "mode": "loss", "reference": "initial"}, "num_steps": 32},
    ),
    "qmix-wasserstein-penalty": (
        "qmix",
        "mpe:simple_spread",
        {},
        {
            "regularizer": {
                "kind": "wasserstein",
                "coef": 0.1,
                "mode": "penalty",
                "reference": "rollout",
                "iterations": 20,
            },
            "num_steps": 32,
        },
    ),
    "sac-wasserstein-loss": (
        "sac",
        "adv:pendulum",
        {},
        {
            "regularizer": {
                "kind": "wasserstein",
                "coef": 0.1,
                "mode": "loss",
                "reference": "initial",
                "iterations": 20,
            },
            "learning_starts": 32,
        },
    ),
    "sac-kl-loss": (
        "sac",
        "adv:pendulum",
        {},
        {"regularizer": {"kind": "kl", "coef": 0.1, "mode": "loss", "reference": "initial"}, "learning_starts": 32},
    ),
    "dec_pomfc-kl-loss": (
        "dec_pomfc",
        "swarm:aggregation",
        {"num_agents": 4},
        {"regularizer": {"kind": "kl", "coef": 0.1, "mode": "loss", "reference": "rollout"}},
    ),
}


def digest(tree) -> str:
    """SHA-256 over the leaves of ``tree`` (float32/int32 bytes, their shapes, tree order)."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        if a.dtype.kind == "f":
            a = a.astype(np.float32)
        elif a.dtype.kind in "iub":
            a = a.astype(np.int64)
        else:  # PRNG keys and other opaque leaves
            a = np.asarray(jax.random.key_data(leaf)) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else a
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def build(case: str):
    import algos
    import envs
    from marl.regularizers import RegularizerConfig

    name, env_name, env_kwargs, overrides = CASES[case]
    fields = {f.name for f in dataclasses.fields(algos.config_class(name))}
    kw = {k: v for k, v in TINY.items() if k in fields}
    for k, v in overrides.items():
        kw[k] = RegularizerConfig(**v) if k == "regularizer" else v
    kw["total_steps"] = ITERATIONS * kw["num_envs"] * kw["num_steps"]
    return algos.make(name, envs.make(env_name, **env_kwargs), **kw)


def run_case(case: str) -> dict:
    from marl.runner import train

    algo = build(case)
    r = train(algo, num_iterations=ITERATIONS, num_seeds=SEEDS, seed=3, progress=False)
    if "learning" in r.metrics and not np.asarray(r.metrics["learning"])[:, -1].all():  # replay learners
        raise RuntimeError(
            f"case {case}: the replay learner never trained within {ITERATIONS} iterations; "
            "give it more env steps per iteration so the hash covers its loss"
        )
    metrics = {k: r.metrics[k] for k in sorted(r.metrics)}
    return {
        "metrics": digest(metrics),
        "params": digest(r.state.params),
        "metric_names": sorted(r.metrics),
        "return": float(np.asarray(r.metrics["return"]).mean()),
    }


@dataclasses.dataclass
class HashArgs:
    """Fixed-seed fingerprints of every registered algorithm (see the module docstring)."""

    cases: tuple[str, ...] = tuple(CASES)
    """case names (default: all)"""
    out: Optional[str] = None
    """write the hashes to this JSON file"""
    check: Optional[str] = None
    """compare with the hashes in this JSON file; exit 1 on any difference"""


def parse(argv: Sequence[str] | None = None) -> HashArgs:
    import tyro

    a = tyro.cli(HashArgs, args=argv)
    unknown = [c for c in a.cases if c not in CASES]
    if unknown:
        raise ConfigError("cases", unknown, f"known cases are {list(CASES)}")
    return a


@entry
def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    expected = None
    if a.check:
        try:
            with open(a.check) as f:
                expected = json.load(f)["cases"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError("check", a.check, f"a hashes file written by --out ({e})") from None
    import jax

    out, changed = {}, []
    for case in a.cases:
        out[case] = run_case(case)
        same = None
        if expected is not None and case in expected:
            same = all(out[case][k] == expected[case][k] for k in ("metrics", "params"))
            if not same:
                changed.append(case)
        tag = "" if same is None else ("  same" if same else "  CHANGED")
        print(f"{case:28s} metrics {out[case]['metrics'][:12]} params {out[case]['params'][:12]}{tag}", flush=True)
    if a.out:
        import os

        from marl.rundir import atomic_write

        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        atomic_write(
            a.out,
            json.dumps(
                {"jax": jax.__version__, "iterations": ITERATIONS, "seeds": SEEDS, "tiny": TINY, "cases": out}, indent=1
            )
            + "\n",
        )
    if changed:
        print(f"changed: {changed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
