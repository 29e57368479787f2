"""Side-by-side speed of TRAMA's k-means (``marl.clustering.kmeans``) and ott-jax's
``ott.tools.k_means.k_means`` at the sizes TRAMA clusters.

    python -m experiments.bench_kmeans
    python -m experiments.bench_kmeans --rows 1000 5000 --iterations 20 --repeats 9

Both start from the same k-means++ centroids (``marl.clustering.kmeans_pp_init``; ott-jax
takes them as its ``init`` callable, one initialization) and run a fixed number of Lloyd
iterations (ott-jax: ``min_iterations = max_iterations``) over the masked rows (ott-jax:
weight 0 for the masked ones). Each is jitted; compile time is reported apart; timed calls
alternate and the median is taken, so both come from the same window. The two assignments
are compared with the adjusted Rand index (1: the same partition).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from ott.tools import k_means as ott_k_means

from experiments.bench_output import write_rows
from experiments.cli import entry
from marl import clustering


@dataclasses.dataclass(frozen=True)
class Args:
    rows: tuple[int, ...] = (1000, 5000)
    """episodes clustered (TRAMA: the episode buffer, 5000 by default)"""
    dim: int = 4
    """trajectory-embedding size (TRAMA's latent_dim)"""
    clusters: int = 4
    """k (TRAMA's n_clusters)"""
    iterations: int = 20
    """Lloyd iterations (TRAMA's kmeans_iterations)"""
    repeats: int = 9
    out: Optional[str] = "runs/bench/bench_kmeans.json"


def _data(n: int, args: Args, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    centres = 3.0 * jax.random.normal(k1, (args.clusters, args.dim))
    labels = jax.random.randint(k2, (n,), 0, args.clusters)
    x = centres[labels] + jax.random.normal(k3, (n, args.dim))
    mask = jnp.arange(n) < int(0.9 * n)  # a partly filled buffer
    return x, mask


def bench_size(n: int, args: Args) -> dict:
    x, mask = _data(n, args)
    init = clustering.kmeans_pp_init(jax.random.PRNGKey(1), x, mask, args.clusters)

    def ours(x, mask, init):
        return clustering.kmeans(x, mask, init, args.iterations)[1]

    def ott(x, mask, init):
        out = ott_k_means.k_means(
            x,
            args.clusters,
            weights=mask.astype(x.dtype),
            init=lambda geom, k, rng: init,
            n_init=1,
            min_iterations=args.iterations,
            max_iterations=args.iterations,
            rng=jax.random.PRNGKey(0),
        )
        return out.assignment

    fns, compile_s, outs = {}, {}, {}
    for name, fn in (("ours", ours), ("ott", ott)):
        fn = jax.jit(fn)
        t0 = time.perf_counter()
        outs[name] = np.asarray(jax.block_until_ready(fn(x, mask, init)))
        compile_s[name] = time.perf_counter() - t0
        fns[name] = fn
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, mask, init))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    ari = float(
        clustering.adjusted_rand_index(
            jnp.asarray(outs["ours"]), jnp.asarray(outs["ott"]), mask, args.clusters, args.clusters
        )
    )
    return {
        "rows": n,
        "ours_ms": 1e3 * med["ours"],
        "ott_ms": 1e3 * med["ott"],
        "ott_over_ours": med["ott"] / med["ours"],
        "compile_ours_s": compile_s["ours"],
        "compile_ott_s": compile_s["ott"],
        "agreement_ari": ari,
    }


def main(args: Args) -> list[dict]:
    rows = [bench_size(n, args) for n in args.rows]
    print(f"{'rows':>6} {'ours ms':>9} {'ott ms':>9} {'ott/ours':>9} {'compile s (ours/ott)':>21} {'ARI':>6}")
    for r in rows:
        compile_s = f"{r['compile_ours_s']:.2f}/{r['compile_ott_s']:.2f}"
        print(
            f"{r['rows']:>6,} {r['ours_ms']:>9.3f} {r['ott_ms']:>9.3f} {r['ott_over_ours']:>9.2f} {compile_s:>21} "
            f"{r['agreement_ari']:>6.3f}"
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
