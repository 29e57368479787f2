"""Throughput benchmark, all figures from one run on one machine.

    python -m experiments.bench                       # smax:3m, ippo + mappo, 128 envs x 128 steps
    python -m experiments.bench --env mpe:simple_spread --algos ippo --num-envs 64
    python -m experiments.bench --seeds-check 4       # also: 4 vmapped seeds vs 4 in a row
    python -m experiments.bench --algos mappo --regularizer-share   # + cost of KL / Wasserstein
    python -m experiments.bench --algos ippo --num-envs 16 --num-steps 32 --iterations 4 --sweep-check 2
    python -m experiments.bench --algos qmix emu --num-envs 8 --num-steps 64   # + EMU / backbone ratio
    python -m experiments.bench --algos qmix emu --num-envs 8 --num-steps 64 --iterations 4 --warmup-updates 40
    python -m experiments.bench --algos --num-envs 8 --emu-memory 1000000      # EMU's 1M-entry memory
    python -m experiments.bench --env adv:cartpole --algos sac qarl rarl --num-envs 4 --num-steps 3 --iterations 500
    python -m experiments.bench --env smax-mt:surComb3 --algos qplex trama --num-envs 8 --num-steps 64 \
        --iterations 4 --trama-clustered                 # TRAMA before and after its first clustering
    python -m experiments.bench --algos ippo mappo qmix --num-steps 64 --num-envs-scan 1 16 256 4096 16384

Measures:
- random-policy environment throughput (env steps/s): uniform random valid actions
  (uniform in the action box for continuous actions), ``jit(scan(vmap(env.step)))``
  over the same num_envs x num_steps as the learners;
- each algorithm's training throughput (env steps/s through ``update``, i.e. acting +
  learning) and its ratio to the random-policy figure; compile time, excluded; learners
  with ``learning_starts`` (SAC, QARL, RARL) are first run past it, so the timed updates
  take gradient steps;
- optionally, one program with S vmapped seeds vs S single-seed programs run one after
  another (wall time of the same number of updates);
- optionally (``--sweep-check N``), a sweep of 16 learning rates x N seeds as one program
  (``marl.sweep``'s row layout) vs the same 16 runs of N seeds one after another, and the
  compile time of each program (see :func:`sweep_check`);
- optionally (``--emu-memory C``), one EMU lookup batch against a full memory of C
  entries, indexed and brute force, and the memory's footprint (:func:`emu_memory_bench`);
- EMU's and TRAMA's throughput as a share of their backbone's (its mixer, e.g. qmix),
  when the backbone is benched in the same run; with ``--trama-clustered`` also TRAMA
  after its first clustering (``trama (clustered)``: class loss on, VQ-VAE every 10
  episodes), which the default timing (the start of training) does not reach;
- optionally (``--num-envs-scan N1 N2 ...``), throughput and the compiled update's memory
  against num_envs, to show where an accelerator saturates (:func:`num_envs_scan`);
- optionally (``--regularizer-share``), MAPPO's update time with each regularizer vs none,
  as the added share ``(t_reg - t_none) / t_none`` (see :func:`regularizer_share`).
Each timing is the median of ``--repeats`` runs. Prints a table and writes JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import tyro

import algos
import envs
from experiments.cli import entry
from marl.runner import init_states, make_chunk_fn


@dataclasses.dataclass(frozen=True)
class BenchArgs:
    env: str = "smax:3m"
    algos: tuple[str, ...] = ("ippo", "mappo")
    num_envs: int = 128
    num_steps: int = 128
    iterations: int = 2
    """updates per timed call"""
    warmup_updates: int = 0
    """updates run before timing (at least one call of --iterations); e.g. to fill EMU's memory"""
    repeats: int = 3
    seeds_check: int = 0
    """if > 0: compare this many vmapped seeds with as many single-seed runs"""
    overrides: Optional[str] = None
    """JSON dict of config overrides applied to every algorithm, e.g. '{"hidden": 64}'"""
    out: str = "runs/bench/bench.json"
    regularizer_share: bool = False
    """also time MAPPO's update with regularizer none vs kl vs wasserstein (penalty mode with
    reference initial, loss mode with reference rollout) and report each one's added share"""
    sweep_check: int = 0
    """if > 0: a sweep of 16 configurations x this many seeds in one program vs the same 16 runs in a row"""
    emu_memory: int = 0
    """if > 0: EMU's episodic memory at this capacity, full, for --emu-memory-env's states: the time
    of one lookup batch (32 episodes x the env's step limit), indexed and brute force, the index
    rebuild, and the memory's footprint (see :func:`emu_memory_bench`)"""
    emu_memory_env: str = "smax:5m_vs_6m"
    trama_clustered: bool = False
    """with trama in --algos: also time TRAMA after its first clustering (see TRAMA_CLUSTERED)"""
    num_envs_scan: tuple[int, ...] = ()
    """if given: for each of these num_envs, the random policy's and every --algos learner's
    throughput and the compiled update's memory (XLA's memory analysis), to show where a device
    saturates (see :func:`num_envs_scan`); the main table is skipped"""


MAX_EXTRA_WARMUP_CALLS = 50

# TRAMA's schedule reaches the clustered phase after 100k env steps; these settings get
# there within the warm-up (one accepted clustering, none during the timed calls) while
# keeping the per-step work of that phase (class loss, VQ-VAE every 10 episodes)
TRAMA_CLUSTERED = {
    "cluster_start": 0,
    "vq_every_step_until": 0,
    "cluster_interval": 10**9,
    "cluster_interval_episodes": 10**9,
}


def _median_time(fn, arg, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_rollout(env, num_envs: int, num_steps: int):
    """A compiled random-policy rollout ``fn(carry) -> carry`` of num_envs x num_steps env
    steps (``jit(scan(vmap(env.step)))``), and a warmed-up carry to feed it: uniform random
    valid actions, uniform in the action box for continuous actions.

    The loop carries what a decentralized policy reads, the observations and the available
    actions (and the env state), as JaxMARL's baselines carry observations and env state:
    the rest of the timestep (the global state, ``info``) is left for XLA to drop, as it is
    in a learner that does not read it."""
    spec = env.spec

    def rollout(carry):
        key, state, obs, avail = carry

        def step(c, k):
            state, _, avail = c
            k1, k2 = jax.random.split(k)
            if spec.num_actions is None:  # continuous: uniform in the action box
                a = jax.random.uniform(
                    k1, (num_envs, spec.num_agents, spec.action_dim), minval=spec.action_low, maxval=spec.action_high
                )
            else:
                a = jax.random.categorical(k1, jnp.where(avail, 0.0, -1e9))
            state, ts = jax.vmap(env.step)(jax.random.split(k2, num_envs), state, a)
            return (state, ts.obs, ts.avail_actions), ts.reward.sum()

        key, sub = jax.random.split(key)
        (state, obs, avail), _ = jax.lax.scan(step, (state, obs, avail), jax.random.split(sub, num_steps))
        return key, state, obs, avail

    state, ts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), num_envs))
    carry = (jax.random.PRNGKey(1), state, ts.obs, ts.avail_actions)
    fn = jax.jit(rollout).lower(carry).compile()
    return fn, jax.block_until_ready(fn(carry))  # warm


def random_policy_sps(env, num_envs, num_steps, repeats) -> float:
    fn, carry = random_rollout(env, num_envs, num_steps)
    t = _median_time(fn, carry, repeats)
    return num_envs * num_steps / t


def algo_bench(algo, iterations, repeats, num_seeds=1, warmup_updates=0):
    keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
    state = init_states(algo, keys)
    t0 = time.perf_counter()
    fn = make_chunk_fn(algo, iterations).lower(state).compile()
    compile_s = time.perf_counter() - t0
    state, m, _ = jax.block_until_ready(fn(state))  # warm-up (and past any learning start)
    for _ in range(max(0, -(-warmup_updates // iterations) - 1)):
        state, m, _ = fn(state)
    # learners that report "learning" (replay learners start once the buffer holds a batch):
    # time only calls in which every update learns
    for _ in range(MAX_EXTRA_WARMUP_CALLS):
        if float(jnp.min(m.get("learning", jnp.ones(())))) >= 1.0:
            break
        state, m, _ = fn(state)
    state = jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m, _ = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {
        "compile_s": compile_s,
        "seconds_per_call": t,
        "memory": compiled_memory(fn),
        "env_steps_per_s": num_seeds * iterations * algo.env_steps_per_update / t,
        "last_metrics": {k: float(jnp.mean(v)) for k, v in m.items()},
    }


def compiled_memory(compiled) -> dict:
    """Bytes of a compiled program's arguments, outputs and temporaries (XLA's memory
    analysis; empty where the backend does not report it)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    return {
        k: int(getattr(m, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "temp", "generated_code")
        if hasattr(m, f"{k}_size_in_bytes")
    }


def num_envs_scan(env, names, sizes, args, overrides: dict) -> list[dict]:
    """Throughput (env steps/s and its ratio to the random policy at the same size) and the
    compiled update's memory, per num_envs: where the device stops gaining from more
    parallel environments. A size an algorithm refuses (e.g. fewer envs than minibatches)
    is recorded with the reason."""
    from marl.config import ConfigError

    rows = []
    for n in sizes:
        rand = random_policy_sps(env, n, args.num_steps, args.repeats)
        row = {"num_envs": n, "random_sps": rand, "algos": {}}
        for name in names:
            try:
                algo = algos.make(
                    name,
                    env,
                    num_envs=n,
                    num_steps=args.num_steps,
                    total_steps=n * args.num_steps * args.iterations,
                    **overrides,
                )
            except ConfigError as e:
                row["algos"][name] = {"skipped": str(e)}
                continue
            r = algo_bench(algo, args.iterations, args.repeats, warmup_updates=args.warmup_updates)
            r["ratio_to_random"] = r["env_steps_per_s"] / rand
            row["algos"][name] = r
        rows.append(row)
        gib = 1 << 30
        cells = []
        for name, r in row["algos"].items():
            if "skipped" in r:
                cells.append(f"{name} skipped")
            else:
                mem = sum(r["memory"].get(k, 0) for k in ("argument", "output", "temp")) / gib
                cells.append(f"{name} {r['env_steps_per_s']:,.0f} ({100 * r['ratio_to_random']:.1f}%, {mem:.2f} GiB)")
        print(f"num_envs {n:>6}: random {rand:,.0f}; " + "; ".join(cells), flush=True)
    return rows


def trama_clustered_bench(env, args: BenchArgs, overrides: dict) -> dict:
    """TRAMA's throughput after its first clustering (:data:`TRAMA_CLUSTERED`); the
    warm-up runs until the buffer holds ``min_cluster_episodes`` (the batch size) episodes
    and checks that the clustering was accepted."""
    from algos.trama import TRAMAConfig

    min_episodes = overrides.get("batch_size", TRAMAConfig.batch_size)
    algo = algos.make(
        "trama",
        env,
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        total_steps=args.num_envs * args.num_steps * args.iterations,
        **{"min_cluster_episodes": min_episodes, **overrides, **TRAMA_CLUSTERED},
    )
    # every env finishes an episode at least every max_steps steps
    E = args.num_envs
    steps = (-(-algo.config.min_cluster_episodes // E) + 1) * env.spec.max_steps * E
    warmup = max(args.warmup_updates, -(-steps // algo.env_steps_per_update))
    r = algo_bench(algo, args.iterations, args.repeats, warmup_updates=warmup)
    if r["last_metrics"].get("clustered", 0.0) < 1.0:
        raise RuntimeError(
            f"trama_clustered: no accepted clustering after {warmup} warm-up updates "
            f"(nonempty clusters: {r['last_metrics'].get('nonempty_clusters')}); "
            "the timing would be of the phase before it"
        )
    r["warmup_updates"] = warmup
    r["algo"] = "trama"
    return r


def check_args(args: BenchArgs) -> None:
    from marl.config import ConfigError, check_positive

    for field in ("num_envs", "num_steps", "iterations", "repeats"):
        check_positive(field, getattr(args, field), integer=True)
    for n in args.num_envs_scan:
        check_positive("num_envs_scan", n, integer=True)
    for field in ("warmup_updates", "seeds_check", "sweep_check", "emu_memory"):
        if getattr(args, field) < 0:
            raise ConfigError(field, getattr(args, field), "must be >= 0")
    if args.trama_clustered and "trama" not in args.algos:
        raise ConfigError("trama_clustered", True, f"needs trama in --algos, got {list(args.algos)}")


def _bench_algo(algo, args: BenchArgs, rand: float) -> dict:
    """One algorithm's throughput (and the optional seeds / sweep checks) for :func:`main`."""
    warmup = args.warmup_updates
    starts = getattr(algo.config, "learning_starts", 0)  # SAC-style learners: time updates that learn
    if starts:
        warmup = max(warmup, -(-starts // algo.env_steps_per_update) + args.iterations)
    r = algo_bench(algo, args.iterations, args.repeats, warmup_updates=warmup)
    r["warmup_updates"] = warmup
    r["ratio_to_random"] = r["env_steps_per_s"] / rand
    if args.seeds_check:
        s = args.seeds_check
        vm = algo_bench(algo, args.iterations, args.repeats, num_seeds=s)
        r["seeds_check"] = {
            "num_seeds": s,
            "vmapped_seconds": vm["seconds_per_call"],
            "sequential_seconds": s * r["seconds_per_call"],
            "speedup_vmapped_vs_sequential": s * r["seconds_per_call"] / vm["seconds_per_call"],
            "vmapped_compile_s": vm["compile_s"],
        }
    if args.sweep_check:
        r["sweep_check"] = sweep_check(algo, args.sweep_check, args.iterations, args.repeats)
    return r


def main(args: BenchArgs) -> dict:
    from marl.config import json_dict_arg

    check_args(args)
    env = envs.make(args.env)
    overrides = json_dict_arg("overrides", args.overrides) or {}
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
    }
    if args.num_envs_scan:
        result = {
            "env": args.env,
            "num_steps": args.num_steps,
            "machine": machine,
            "command": sys.argv,
            "num_envs_scan": num_envs_scan(env, args.algos, args.num_envs_scan, args, overrides),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"JSON: {args.out}")
        return result
    rand = random_policy_sps(env, args.num_envs, args.num_steps, args.repeats)
    result = {
        "env": args.env,
        "num_envs": args.num_envs,
        "num_steps": args.num_steps,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
        },
        "random_policy_env_steps_per_s": rand,
        "algos": {},
    }
    rows = [("random policy", f"{rand:,.0f}", "100.0%", "-")]
    for name in args.algos:
        algo = algos.make(
            name,
            env,
            num_envs=args.num_envs,
            num_steps=args.num_steps,
            total_steps=args.num_envs * args.num_steps * args.iterations,
            **overrides,
        )
        r = _bench_algo(algo, args, rand)
        result["algos"][name] = r
        rows.append(
            (name, f"{r['env_steps_per_s']:,.0f}", f"{100 * r['ratio_to_random']:.2f}%", f"{r['compile_s']:.1f}")
        )
    print(
        f"\n{args.env}: {args.num_envs} envs x {args.num_steps} steps, median of {args.repeats}, "
        f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}"
    )
    print(f"{'':<16}{'env steps/s':>14}{'vs random':>12}{'compile s':>12}")
    for row in rows:
        print(f"{row[0]:<16}{row[1]:>14}{row[2]:>12}{row[3]:>12}")
    for name, r in result["algos"].items():
        if "seeds_check" in r:
            c = r["seeds_check"]
            print(
                f"{name}: {c['num_seeds']} vmapped seeds {c['vmapped_seconds']:.2f}s vs "
                f"{c['num_seeds']} sequential {c['sequential_seconds']:.2f}s "
                f"(x{c['speedup_vmapped_vs_sequential']:.2f})"
            )
    for name, r in result["algos"].items():
        if "sweep_check" in r:
            print_sweep_check(name, r["sweep_check"])
    if args.trama_clustered:
        r = trama_clustered_bench(env, args, overrides)
        r["ratio_to_random"] = r["env_steps_per_s"] / rand
        result["algos"]["trama (clustered)"] = r
        print(
            f"{'trama (clustered)':<16}{r['env_steps_per_s']:>14,.0f}{100 * r['ratio_to_random']:>11.2f}%"
            f"{r['compile_s']:>12.1f}"
        )
    for name, r in result["algos"].items():
        algo_name = r.get("algo", name)
        backbone = (
            getattr(
                algos.make(
                    algo_name,
                    env,
                    num_envs=args.num_envs,
                    num_steps=args.num_steps,
                    total_steps=args.num_envs * args.num_steps * args.iterations,
                    **overrides,
                ).config,
                "mixer",
                None,
            )
            if algo_name in ("emu", "trama")
            else None
        )
        if backbone in result["algos"]:
            r["ratio_to_backbone"] = r["env_steps_per_s"] / result["algos"][backbone]["env_steps_per_s"]
            print(f"{name}: {100 * r['ratio_to_backbone']:.0f}% of its backbone {backbone}'s throughput")
    if args.emu_memory:
        result["emu_memory"] = emu_memory_bench(args.emu_memory, args.emu_memory_env, args.repeats)
    if args.regularizer_share:
        result["regularizer_share"] = regularizer_share(env, args, overrides)
        print_regularizer_share(result["regularizer_share"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"JSON: {args.out}")
    return result


# --------------------------------------------------------------- EMU's memory


def emu_memory_bench(
    capacity: int, env_name: str, repeats: int, batch_episodes: int = 32, delta: float = 1.3e-5
) -> dict:
    """A full EMU memory of ``capacity`` entries with ``env_name``'s global state: keys
    standard normal in 4-d (the dCAE's key size), so each query's candidate range is
    realistic; one lookup batch of ``batch_episodes x max_steps`` queries, half of them
    stored keys moved by less than delta (hits), half fresh keys (misses). Times (median
    of ``repeats``, compile excluded): the indexed lookup EMU uses, the brute-force
    lookup (one timing: it is slow at this size), and the index rebuild done once per
    iteration. Footprint: bytes of every memory array plus the index."""
    from marl import episodic_memory as em

    spec = envs.make(env_name).spec
    S, T, k = spec.state_dim, spec.max_steps, 4
    keys = jax.random.normal(jax.random.PRNGKey(0), (capacity, k))
    memory = em.init(capacity, k, S)
    memory = em.refresh_stats(
        memory.replace(keys=keys, size=jnp.asarray(capacity, jnp.int32), n_call=jnp.ones((capacity,), jnp.int32))
    )
    Q = batch_episodes * T
    q_hit = keys[: Q // 2] + delta * 0.1 * memory.std
    q_miss = jax.random.normal(jax.random.PRNGKey(1), (Q - Q // 2, k))
    queries = jnp.concatenate([q_hit, q_miss])
    index = jax.block_until_ready(jax.jit(em.build_index)(memory))
    build = jax.jit(em.build_index).lower(memory).compile()
    indexed = jax.jit(lambda m, i, q: em.lookup_hits(m, i, q, delta)).lower(memory, index, queries).compile()
    brute = jax.jit(lambda m, q: em.lookup(m, q, 2048, delta)).lower(memory, queries).compile()
    rec = jax.block_until_ready(indexed(memory, index, queries))
    t_indexed = statistics.median(_time_calls(lambda: indexed(memory, index, queries), repeats))
    t_build = statistics.median(_time_calls(lambda: build(memory), repeats))
    t0 = time.perf_counter()
    rec_b = jax.block_until_ready(brute(memory, queries))
    t_brute = time.perf_counter() - t0
    same = bool(jnp.all(rec.hit == rec_b.hit) & jnp.all(jnp.where(rec.hit, rec.index == rec_b.index, True)))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    out = {
        "env": env_name,
        "capacity": capacity,
        "state_dim": S,
        "queries": Q,
        "hits": int(rec.hit.sum()),
        "indexed_lookup_s": t_indexed,
        "brute_force_lookup_s": t_brute,
        "index_rebuild_s": t_build,
        "indexed_equals_brute_force": same,
        "memory_bytes": nbytes(memory),
        "index_bytes": nbytes(index),
        "bytes_per_entry": (nbytes(memory) + nbytes(index)) / capacity,
    }
    print(
        f"EMU memory, {capacity:,} entries of {env_name} states (S = {S}): lookup of {Q:,} queries "
        f"({batch_episodes} episodes x {T} steps, {out['hits']:,} hits): indexed {1e3 * t_indexed:.2f} ms, "
        f"brute force {1e3 * t_brute:,.0f} ms, index rebuild {1e3 * t_build:.0f} ms; same recall: {same}; "
        f"footprint {out['memory_bytes'] / 2**20:,.0f} MiB + index {out['index_bytes'] / 2**20:.1f} MiB "
        f"({out['bytes_per_entry']:.0f} B/entry)"
    )
    return out


def _time_calls(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------- sweep check

SWEEP_CONFIGS = 16


def sweep_check(algo, num_seeds: int, iterations: int, repeats: int) -> dict:
    """16 configurations x ``num_seeds`` seeds as one program vs 16 runs in a row.

    The configurations scale the algorithm's learning rate (its first sweepable
    hyperparameter if it has no ``lr``) by 16 factors from 1/4 to 4. A run is
    ``iterations`` updates from a fresh initial state. One program: all 16 x N rows in
    one call of the chunk function; in a row: 16 calls of the N-seed chunk function
    (compiled once, reused for every configuration since only hyperparameter values
    differ). Both are warmed up once, then each timing is the median of ``repeats``.
    ``speedup`` compares execution only; ``speedup_with_compile`` adds one compilation
    to the sweep and 16 to the runs in a row, as 16 separate training commands would.
    """
    import numpy as np

    from marl.sweep import config_path, row_layout, sweepable

    names = sweepable(algo)
    name = "lr" if "lr" in names else names[0]
    base = algo.config
    for part in config_path(name, algo.config):
        base = getattr(base, part)
    factors = np.geomspace(0.25, 4.0, SWEEP_CONFIGS)
    configs = [{name: float(base * f)} for f in factors]

    keys, hparams = row_layout(configs, num_seeds)
    # initial states are built once (init_states compiles init again on every call) and
    # copied before each timed call, since the chunk function donates its input; the 16
    # single runs differ from one another only in their hyperparameter values
    sweep_state = init_states(algo, keys, hparams)
    base_state = init_states(algo, keys[:num_seeds])
    single_states = [
        base_state.replace(hparams=base_state.hparams._replace(**{name: jnp.full((num_seeds,), c[name], jnp.float32)}))
        for c in configs
    ]
    t0 = time.perf_counter()
    sweep_fn = make_chunk_fn(algo, iterations).lower(sweep_state).compile()
    sweep_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    single_fn = make_chunk_fn(algo, iterations).lower(single_states[0]).compile()
    single_compile = time.perf_counter() - t0

    def fresh(s):  # a real copy (a jitted identity may hand back the donated buffers)
        return jax.tree.map(lambda x: jnp.array(x, copy=True), s)

    def one_program():
        state = jax.block_until_ready(fresh(sweep_state))
        t = time.perf_counter()
        jax.block_until_ready(sweep_fn(state))
        return time.perf_counter() - t

    def in_a_row():
        total = 0.0
        for s in single_states:
            state = jax.block_until_ready(fresh(s))
            t = time.perf_counter()
            jax.block_until_ready(single_fn(state))
            total += time.perf_counter() - t
        return total

    one_program()  # warm-up
    in_a_row()
    sweep_times, row_times = [], []
    for _ in range(repeats):  # interleaved, so a slow stretch of a shared machine hits both
        sweep_times.append(one_program())
        row_times.append(in_a_row())
    t_sweep, t_row = statistics.median(sweep_times), statistics.median(row_times)
    return {
        "configs": SWEEP_CONFIGS,
        "num_seeds": num_seeds,
        "hyperparameter": name,
        "values": [c[name] for c in configs],
        "iterations": iterations,
        "env_steps_per_run": iterations * algo.env_steps_per_update,
        "one_program_seconds": t_sweep,
        "in_a_row_seconds": t_row,
        "one_program_seconds_all": sweep_times,
        "in_a_row_seconds_all": row_times,
        "speedup": t_row / t_sweep,
        "one_program_compile_s": sweep_compile,
        "single_run_compile_s": single_compile,
        "speedup_with_compile": (t_row + SWEEP_CONFIGS * single_compile) / (t_sweep + sweep_compile),
    }


def print_sweep_check(name: str, c: dict) -> None:
    n = c["configs"]
    print(
        f"{name}: sweep of {n} configs x {c['num_seeds']} seeds ({c['iterations']} updates each), median of "
        f"{len(c['one_program_seconds_all'])}: one program {c['one_program_seconds']:.2f}s vs {n} runs in a row "
        f"{c['in_a_row_seconds']:.2f}s (x{c['speedup']:.2f}); compile: one program "
        f"{c['one_program_compile_s']:.1f}s, one run {c['single_run_compile_s']:.1f}s; "
        f"with compilation (1 vs {n} compiles) x{c['speedup_with_compile']:.2f}"
    )


# --------------------------------------------------------------- regularizer share

# (label, regularizer kind, mode, reference); the first is the baseline.
REGULARIZER_VARIANTS = (
    ("none", "none", "penalty", "initial"),
    ("kl penalty/initial", "kl", "penalty", "initial"),
    ("kl loss/rollout", "kl", "loss", "rollout"),
    ("wasserstein penalty/initial", "wasserstein", "penalty", "initial"),
    ("wasserstein loss/rollout", "wasserstein", "loss", "rollout"),
)


def regularizer_share(env, args: BenchArgs, overrides: dict, algo_name: str = "mappo", coef: float = 0.01) -> dict:
    """MAPPO's update time with each regularizer variant vs none, same env and settings.

    Every variant is compiled and warmed up first; then the repeats are interleaved
    (variant 1, 2, ..., 1, 2, ...) so a slow stretch of a shared machine hits every
    variant alike. Time per update = median over repeats of one call's time / iterations.
    Share = (t_variant - t_none) / t_none. Regularizer settings other than kind, mode,
    reference and coef (epsilon, iterations, centred) are the config defaults.
    """
    from marl.regularizers import RegularizerConfig

    fns, states, compile_s = {}, {}, {}
    base_reg = overrides.get("regularizer", {})
    rest = {k: v for k, v in overrides.items() if k != "regularizer"}
    for label, kind, mode, reference in REGULARIZER_VARIANTS:
        rc = RegularizerConfig(
            **{**base_reg, "kind": kind, "coef": 0.0 if kind == "none" else coef, "mode": mode, "reference": reference}
        )
        algo = algos.make(
            algo_name,
            env,
            num_envs=args.num_envs,
            num_steps=args.num_steps,
            total_steps=args.num_envs * args.num_steps * args.iterations,
            **rest,
            regularizer=rc,
        )
        state = init_states(algo, jax.random.split(jax.random.PRNGKey(0), 1))
        t0 = time.perf_counter()
        fns[label] = make_chunk_fn(algo, args.iterations).lower(state).compile()
        compile_s[label] = time.perf_counter() - t0
        states[label], _, _ = jax.block_until_ready(fns[label](state))  # warm-up
    times = {label: [] for label in fns}
    for _ in range(args.repeats):
        for label, fn in fns.items():
            t0 = time.perf_counter()
            states[label], _, _ = jax.block_until_ready(fn(states[label]))
            times[label].append((time.perf_counter() - t0) / args.iterations)
    base = statistics.median(times["none"])
    variants = {}
    for label, kind, mode, reference in REGULARIZER_VARIANTS:
        t = statistics.median(times[label])
        variants[label] = {
            "kind": kind,
            "mode": mode,
            "reference": reference,
            "seconds_per_update": t,
            "seconds_per_update_all": times[label],
            "added_share": (t - base) / base,
            "compile_s": compile_s[label],
        }
    return {
        "algo": algo_name,
        "coef": coef,
        "repeats": args.repeats,
        "iterations_per_call": args.iterations,
        "timing": "median over interleaved repeats",
        "variants": variants,
    }


def print_regularizer_share(r: dict) -> None:
    print(
        f"\n{r['algo']} update time by regularizer (median of {r['repeats']} interleaved repeats, "
        f"{r['iterations_per_call']} updates per call)"
    )
    print(f"{'':<30}{'s/update':>10}{'min-max s':>16}{'added share':>13}{'compile s':>11}")
    for label, v in r["variants"].items():
        share = "-" if v["kind"] == "none" else f"{100 * v['added_share']:+.1f}%"
        spread = f"{min(v['seconds_per_update_all']):.3f}-{max(v['seconds_per_update_all']):.3f}"
        print(f"{label:<30}{v['seconds_per_update']:>10.3f}{spread:>16}{share:>13}{v['compile_s']:>11.1f}")


@entry(compile_cache=False)
def cli(argv=None) -> int:
    main(tyro.cli(BenchArgs, args=argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
