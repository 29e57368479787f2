"""Spacing of EMU's memory keys on a SMAX map, to choose the write-time neighbourhood.

    python -m experiments.studies.emu_key_spacing --env smax:2s3z --steps 10240 --out results/emu_study/key_spacing.json

Trains EMU with exact revisits only (the official delta) for ``--steps`` env steps
(one seed), then, for every stored entry in write order, the per-dimension (L-inf)
distance in normalized key space to the nearest entry written before it. The share of
entries whose distance is <= d is the share of writes a write-time neighbourhood d
would have counted as revisits; the script prints the d giving 5%, 10% and 20%.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import algos
import envs
from marl.runner import train


def nearest_earlier(keys: np.ndarray, order: np.ndarray, block: int = 512) -> np.ndarray:
    """L-inf distance of each key (taken in ``order``) to the nearest key before it."""
    k = jnp.asarray(keys[order])
    n = k.shape[0]
    out = np.full(n, np.inf)

    @jax.jit
    def dist(q, i0):
        d = jnp.abs(q[:, None, :] - k[None]).max(-1)  # [b, n]
        before = jnp.arange(n)[None] < (i0 + jnp.arange(q.shape[0]))[:, None]
        return jnp.where(before, d, jnp.inf).min(1)

    for i in range(0, n, block):
        q = k[i : i + block]
        q = jnp.pad(q, ((0, block - q.shape[0]), (0, 0)))
        out[i : i + block] = np.asarray(dist(q, i))[: min(block, n - i)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--env", default="smax:2s3z")
    ap.add_argument("--steps", type=int, default=10240)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    env = envs.make(a.env)
    algo = algos.make("emu", env, total_steps=a.steps, capacity=a.steps + 1000, train_steps=4)
    it = algo.config.num_updates
    r = train(algo, num_iterations=it, num_seeds=1, chunk_iterations=it, progress=False)
    mem = jax.tree.map(lambda x: np.asarray(x)[0], r.state.ext.memory)
    size = int(mem.size)
    order = np.argsort(mem.last_used[:size], kind="stable")  # no hits: write order
    d = nearest_earlier(mem.keys_norm[:size], order)[1:]
    qs = {f"q{int(q * 100):02d}": float(np.quantile(d, q)) for q in (0.05, 0.10, 0.20, 0.50)}
    res = {
        "env": a.env,
        "env_steps": a.steps,
        "entries": size,
        "write_hits": int(mem.write_hits),
        "min": float(d.min()),
        **qs,
    }
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
