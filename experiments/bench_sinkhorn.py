"""Side-by-side speed of the two Sinkhorn backends of the Wasserstein regularizer.

    python -m experiments.bench_sinkhorn                       # the sizes the learners use
    python -m experiments.bench_sinkhorn --batches 3072 --actions 9 --repeats 9

``marl.regularizers.wasserstein`` (debiased: three solves per state, as the learners call
it) runs with ``backend="fast"`` (the batched log-domain loop) and ``backend="ott"``
(ott-jax's Sinkhorn, ``vmap``-ed over states, lse mode, the same fixed iteration count) on
random masked policies, and with ott-jax in kernel mode (``ott_kernel``: the same three
``vmap``-ed solves, scaling updates; bench only). Each call is jitted; compile time is reported apart; timed calls
alternate between the backends (interleaved repeats) and the median is taken, so both
numbers come from the same window. The outputs of the two backends are compared too
(they implement the same updates from the same initialization).

Sizes: states per call = rollout rows x agents (PPO on smax:3m: 128 steps x 16 envs x 3
agents = 6,144; a Q-learning batch of 32 episodes x 60 steps x 3 agents = 5,760; MPE's
simple_spread: 3 agents, 5 actions), actions per state n (MPE 5, smax:3m 9, smax:2s3z 11).
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

from experiments.bench_output import write_rows
from experiments.cli import entry
from marl import regularizers as reg


@dataclasses.dataclass(frozen=True)
class Args:
    batches: tuple[int, ...] = (768, 6144)
    """states per regularizer call"""
    actions: tuple[int, ...] = (5, 9, 11)
    """actions per state"""
    iterations: int = 10
    """Sinkhorn iterations (the regularizer's default)"""
    epsilon: float = 0.05
    repeats: int = 7
    """timed calls per backend (interleaved); the median is reported"""
    out: Optional[str] = "runs/bench/bench_sinkhorn.json"


def _inputs(batch: int, n: int, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    logits_p = jax.random.normal(k1, (batch, n))
    logits_q = jax.random.normal(k2, (batch, n))
    mask = jax.random.uniform(k3, (batch, n)) < 0.8
    mask = mask.at[:, 0].set(True)  # at least one available action
    pos = jnp.arange(n, dtype=jnp.float32)
    cost = jnp.abs(pos[:, None] - pos[None]) / max(n - 1, 1)
    return logits_p, logits_q, mask, cost


def _ott_kernel_potentials(logits_p, logits_q, mask, cost, args: Args):
    """The debiased centred penalty with ott-jax in kernel (scaling) mode: the same three
    solves per state as ``reg.wasserstein``, each ``vmap``-ed ``sinkhorn_ott(lse_mode=False)``."""
    p, q = reg.probs(logits_p, mask), reg.probs(logits_q, mask)
    solve = jax.vmap(lambda a, b: reg.sinkhorn_ott(a, b, cost, args.epsilon, args.iterations, lse_mode=False))
    res = solve(jnp.concatenate([p, p, q]), jnp.concatenate([q, p, q]))
    n = p.shape[0]
    f_pq, f_pp = res.f[:n], res.f[n : 2 * n]
    div = res.distance[:n] - 0.5 * res.distance[n : 2 * n] - 0.5 * res.distance[2 * n :]
    d = f_pq - f_pp
    centred = d - jnp.sum(p * d, -1, keepdims=True) + div[:, None]
    return jnp.where(p > 0, centred, 0.0)


def bench_size(batch: int, n: int, args: Args) -> dict:
    lp, lq, mask, cost = _inputs(batch, n)
    fns, compile_s, outs = {}, {}, {}
    for backend in reg.BACKENDS + ("ott_kernel",):
        if backend == "ott_kernel":
            fn = jax.jit(lambda a, b, m, c: _ott_kernel_potentials(a, b, m, c, args))
        else:
            fn = jax.jit(
                lambda a, b, m, c, backend=backend: (
                    reg.wasserstein(a, b, c, args.epsilon, args.iterations, m, backend=backend).centred_penalty
                )
            )
        t0 = time.perf_counter()
        outs[backend] = np.asarray(jax.block_until_ready(fn(lp, lq, mask, cost)))
        compile_s[backend] = time.perf_counter() - t0
        fns[backend] = fn
    times = {b: [] for b in fns}
    for _ in range(args.repeats):
        for backend, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(lp, lq, mask, cost))
            times[backend].append(time.perf_counter() - t0)
    med = {b: statistics.median(t) for b, t in times.items()}
    return {
        "batch": batch,
        "actions": n,
        "fast_ms": 1e3 * med["fast"],
        "ott_ms": 1e3 * med["ott"],
        "ott_kernel_ms": 1e3 * med["ott_kernel"],
        "ott_over_fast": med["ott"] / med["fast"],
        "ott_kernel_over_fast": med["ott_kernel"] / med["fast"],
        "compile_fast_s": compile_s["fast"],
        "compile_ott_s": compile_s["ott"],
        "compile_ott_kernel_s": compile_s["ott_kernel"],
        "max_abs_diff": float(np.max(np.abs(outs["fast"] - outs["ott"]))),
        "max_abs_diff_kernel": float(np.max(np.abs(outs["fast"] - outs["ott_kernel"]))),
    }


def main(args: Args) -> list[dict]:
    rows = [bench_size(b, n, args) for b in args.batches for n in args.actions]
    print(
        f"{'states':>7} {'n':>3} {'fast ms':>9} {'ott ms':>9} {'kernel ms':>10} {'ott/fast':>9} "
        f"{'kernel/fast':>12} {'compile s (fast/ott/kernel)':>28} {'max |diff| (ott/kernel)':>24}"
    )
    for r in rows:
        compile_s = f"{r['compile_fast_s']:.2f}/{r['compile_ott_s']:.2f}/{r['compile_ott_kernel_s']:.2f}"
        diff = f"{r['max_abs_diff']:.1e}/{r['max_abs_diff_kernel']:.1e}"
        print(
            f"{r['batch']:>7,} {r['actions']:>3} {r['fast_ms']:>9.2f} {r['ott_ms']:>9.2f} "
            f"{r['ott_kernel_ms']:>10.2f} {r['ott_over_fast']:>9.2f} {r['ott_kernel_over_fast']:>12.2f} "
            f"{compile_s:>28} {diff:>24}"
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
