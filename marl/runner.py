"""The runner: ``jit(vmap(scan(update)))`` over chunks of iterations.

Seeds (and, for sweeps, hyperparameter configurations) are the vmapped axis; a single
row runs unbatched (the same numbers up to float rounding; a vmap over one row cost PPO's
update 15-27% on CPU, ``experiments.bench_ppo_parts --one-row-vmap``). The
host loop between chunks owns everything that is not pure: the progress bar,
metrics (``metrics.jsonl``, TensorBoard when installed), orbax checkpoints, the
non-finite check, and resume. ``chunk_iterations == num_iterations`` gives the
classic single-``jit`` training function.

Start-up: the initial states (:func:`init_states`, a program of its own) and the chunk
are two compilations. On one device the chunk compiles in a thread from the states'
shapes while the states are built (:func:`prepare`); both are mostly XLA compilation,
which runs in parallel. Under a thread-local JAX setting (``jax.default_device``,
``jax.default_matmul_precision``, ...), which a thread would not see, it compiles after,
in the caller's thread. Compiled chunks are cached per setting, algorithm and layout.

Resume is exact: a checkpoint holds the whole seed-batched train state (PRNG keys
included) after a chunk, and a resumed run runs the same compiled chunks from
there, so it ends with the same parameters as the run that was never stopped.
Metrics lines written after the last checkpoint are dropped on resume (they are
recomputed identically).

Safety: the run directory is checked and locked (:mod:`marl.rundir`) and the train
state's size is checked against the memory available, all before anything compiles.
Metrics are fsynced before each checkpoint; a resume restores the newest intact
checkpoint (damaged ones are moved aside with a warning). Besides the non-finite check,
an optional divergence guard (``max_loss``) stops a run whose losses exceed a bound.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from marl import rundir
from marl.checkpoint import Checkpointer
from marl.config import ConfigError
from marl.logging import MetricsWriter
from marl.types import SEED_AXIS, Algorithm

# Compiled chunks by (update function, length, state structure): the same algorithm
# object trained again in one process (tests, notebooks, sweeps) does not recompile.
_COMPILED: dict = {}


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf; the message names the metric and iteration."""


class DivergenceError(NonFiniteError):
    """A loss exceeded the divergence guard's bound (``max_loss``)."""


def state_bytes(algo: Algorithm) -> int:
    """Bytes of one seed's train state (parameters, optimizer states, buffers, env
    states), from shapes alone: nothing is compiled or allocated."""
    shapes = jax.eval_shape(algo.init, jax.random.PRNGKey(0))
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes)))


def available_memory_bytes() -> int:
    """Memory free for the train state: the default device's free memory on an
    accelerator, the host's available memory on CPU."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 1 << 62  # unknown: do not refuse


def metric_names(algo: Algorithm) -> list[str]:
    """The names of the metrics ``algo.update`` returns, from shapes alone (no compile)."""
    state = jax.eval_shape(algo.init, jax.random.PRNGKey(0))
    return sorted(jax.eval_shape(algo.update, state)[1])


MEMORY_FACTOR = 2
"""the state is held about twice at once (the chunk's donated buffers and a checkpoint's host copy)"""


def check_memory(algo: Algorithm, num_rows: int, available: Optional[int] = None) -> int:
    """ConfigError, before anything compiles, when ``num_rows`` train states do not fit
    in memory; returns the estimated bytes."""
    per = state_bytes(algo)
    need = MEMORY_FACTOR * per * num_rows
    free = available_memory_bytes() if available is None else available
    if need > free:
        gib = 1 << 30
        fits = free // max(MEMORY_FACTOR * per, 1)
        if fits >= 1:
            raise ConfigError(
                "num_seeds",
                num_rows,
                f"must be at most {fits}: each seed's train state takes {per / gib:.3g} GiB "
                f"(x{MEMORY_FACTOR} while training), {need / gib:.3g} GiB in all, and "
                f"{free / gib:.3g} GiB are available",
            )
        raise ConfigError(
            "config",
            f"{per / gib:.3g} GiB train state per seed",
            f"must fit in the {free / gib:.3g} GiB available (x{MEMORY_FACTOR} while training): "
            "lower num_envs, buffer_size, capacity or the network sizes",
        )
    return need


@dataclasses.dataclass
class TrainResult:
    state: Any  # seed-batched train state
    metrics: dict  # name -> np.ndarray [seeds, iterations]
    run_dir: Optional[str]
    compile_seconds: float
    train_seconds: float  # excluding compilation
    env_steps: int  # per seed


def init_states(algo: Algorithm, keys: jax.Array, hparams: Optional[dict] = None):
    """Seed-batched initial train states; ``hparams`` maps a field of
    ``state.hparams`` to values [num_seeds] (or a scalar) overriding the config."""
    state = jax.jit(jax.vmap(algo.init))(keys)
    # a weakly typed leaf (a Python scalar inside an env's reset) comes back strongly typed
    # from ``update``; normalizing it here saves a second compile of the chunk function
    state = jax.tree.map(lambda x: jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x, state)
    if hparams:
        hp = state.hparams
        n = keys.shape[0]
        for k, v in hparams.items():
            if k not in hp._fields:
                raise ConfigError("hparams", k, f"not a sweepable hyperparameter; allowed: {list(hp._fields)}")
            v = jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))
            hp = hp._replace(**{k: v})
        state = state.replace(hparams=hp)
    return state


def prepare(algo: Algorithm, keys: jax.Array, length: int, hparams: Optional[dict] = None):
    """(initial states of ``keys``, the compiled chunk of ``length`` iterations for them,
    seconds spent compiling it), as :func:`train` starts a run on one device: the chunk
    compiles in a thread from the states' shapes while :func:`init_states` compiles and
    runs here. Call the chunk as ``state, metrics, finite = chunk(state)``; it donates
    its input."""
    pending = _precompile(algo, length, keys, hparams)
    state = init_states(algo, keys, hparams)
    chunk, compile_s = _compiled_chunk(algo, length, None, state, pending)
    return state, chunk, compile_s


def _num_rows(state) -> int:
    return int(jax.tree.leaves(state)[0].shape[0])


def make_chunk_fn(algo: Algorithm, length: int, mesh=None) -> Callable:
    """``jit(vmap(scan(update)))`` for ``length`` iterations; also returns whether
    every float leaf of the parameters is finite. A state of one row runs
    ``jit(scan(update))`` on that row, without the vmap, and gets its row axis back.
    With a ``mesh`` (of more than one device) its inputs and outputs keep the rows split
    over the mesh (:func:`marl.distributed.row_sharding`)."""

    def one_seed(state):
        state, metrics = jax.lax.scan(lambda s, _: algo.update(s), state, None, length=length)
        params = getattr(state, "params", state)
        finite = jnp.all(
            jnp.stack(
                [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
            )
        )
        return state, metrics, finite

    batched = jax.vmap(one_seed, axis_name=SEED_AXIS)

    def fn(state):
        if _num_rows(state) > 1:
            return batched(state)
        # One row: the update unbatched, the row axis put back. The same operations, but a
        # vmap over a single row cost PPO's update 15-27% on CPU (XLA keeps the size-1 axis
        # in layouts and fusions; results/bench/README.md); ``max_over_seeds`` is the
        # identity here.
        out = one_seed(jax.tree.map(lambda x: x[0], state))
        return jax.tree.map(lambda x: x[None], out)

    if mesh is not None and mesh.size > 1:
        from marl.distributed import row_sharding

        return jax.jit(fn, in_shardings=row_sharding(mesh), out_shardings=row_sharding(mesh), donate_argnums=0)
    return jax.jit(fn, donate_argnums=0)


def train(
    algo: Algorithm,
    *,
    num_iterations: int,
    num_seeds: int = 1,
    seed: int = 0,
    chunk_iterations: int = 10,
    run_dir: Optional[str] = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    resume_or_start: bool = False,
    progress: bool = True,
    hparams: Optional[dict] = None,
    stop_after_chunks: Optional[int] = None,
    run_info: Optional[dict] = None,
    keys: Optional[jax.Array] = None,
    max_loss: Optional[float] = None,
    check_memory_fit: bool = True,
    mesh=None,
) -> TrainResult:
    """Train ``num_seeds`` seeds of ``algo`` for ``num_iterations`` updates.

    Args:
      chunk_iterations: iterations per compiled chunk (host loop granularity).
      run_dir: where ``metrics.jsonl``, ``checkpoints/`` and ``run.json`` go (None: nowhere).
      checkpoint_every: save a checkpoint every this many chunks (and at the end).
      resume: continue from the latest intact checkpoint in ``run_dir`` (refused when
        there is none, unless ``resume_or_start``).
      resume_or_start: resume when ``run_dir`` holds a checkpoint, start it otherwise.
      hparams: per-seed overrides of sweepable hyperparameters (see :func:`init_states`).
      stop_after_chunks: stop early after this many chunks of this call (simulates a
        killed run in tests).
      run_info: extra JSON-able description stored in ``run.json`` (algo, env, config).
      keys: explicit per-seed PRNG keys [num_seeds, 2] (default: split(PRNGKey(seed))).
      max_loss: divergence guard: stop (``DivergenceError``) when a metric whose name
        contains ``loss`` exceeds this magnitude (None: off).
      check_memory_fit: refuse, before compiling, train states that do not fit in memory.
      mesh: placement: a :func:`marl.distributed.make_mesh` mesh to split the rows
        (seeds) over, padded to a multiple of its size (see :mod:`marl.distributed`);
        None or a one-device mesh: one device. Several processes: every process calls
        ``train`` with the same arguments; process 0 writes metrics and holds the lock.
    """
    _check_train_args(
        num_iterations,
        num_seeds,
        chunk_iterations,
        checkpoint_every,
        resume or resume_or_start,
        run_dir,
        max_loss,
        seed,
        keys,
    )
    chunk_iterations = min(chunk_iterations, num_iterations)
    if mesh is not None and mesh.size == 1:
        mesh = None
    rows = num_seeds
    if mesh is not None:
        from marl import distributed

        rows = distributed.padded_size(num_seeds, mesh.size)
    description = _describe(algo, num_seeds, seed, num_iterations, chunk_iterations, run_info, mesh, rows)
    primary = jax.process_index() == 0
    # every check of the run directory, the lock and the memory estimate: before compiling
    run_dir, lock, resuming = _open_run_dir(run_dir, resume, resume_or_start, description, primary)
    writer = ckpt = None
    try:
        if check_memory_fit:
            # the rows this process holds (all of them on one device)
            check_memory(algo, num_seeds if mesh is None else rows * jax.local_device_count() // mesh.size)
        if keys is None:
            keys = jax.random.split(jax.random.PRNGKey(seed), num_seeds)
        # the first chunk compiles in a thread, from the initial state's shapes, while
        # init compiles and runs here (both are mostly XLA compilation, which runs in parallel)
        pending = _precompile(algo, chunk_iterations, keys, hparams) if mesh is None else None
        state = _initial_states(algo, keys, hparams, mesh, num_seeds)
        start_iter = 0
        if run_dir is not None:
            ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
            if resuming:
                state, start_iter = _restore(ckpt, state, run_dir, primary)
            if primary:
                writer = MetricsWriter(run_dir, truncate_after=start_iter, resume=resuming)
        result = _host_loop(
            algo,
            state,
            start_iter,
            num_iterations,
            num_seeds,
            chunk_iterations,
            checkpoint_every,
            progress and primary,
            stop_after_chunks,
            max_loss,
            writer,
            ckpt,
            run_dir,
            mesh,
            pending,
        )
        if rows != num_seeds:  # drop the padding rows
            result.state = jax.jit(lambda s: jax.tree.map(lambda x: x[:num_seeds], s))(result.state)
        return result
    finally:
        if writer is not None:
            writer.close()
        if ckpt is not None:
            ckpt.close()
        if lock is not None:
            lock.release()


def _open_run_dir(run_dir, resume: bool, resume_or_start: bool, description: dict, primary: bool):
    """(absolute run dir or None, its lock or None, whether the run resumes). Process 0
    checks and prepares the directory and holds the lock; the other processes of a
    multi-process run read what process 0 checks and writes."""
    if run_dir is None:
        return None, None, False
    if primary:
        return rundir.prepare(run_dir, resume, description, resume_or_start)
    run_dir = os.path.abspath(run_dir)
    return run_dir, None, (resume or resume_or_start) and rundir.has_checkpoints(run_dir)


def _initial_states(algo: Algorithm, keys, hparams, mesh, num_seeds: int):
    """The seed-batched initial train states, on one device or split over ``mesh``."""
    if mesh is None:
        return init_states(algo, keys, hparams)
    from marl import distributed

    return distributed.place_rows(lambda k, hp: init_states(algo, k, hp), mesh, keys, hparams, num_seeds)


def _check_train_args(
    num_iterations, num_seeds, chunk_iterations, checkpoint_every, resuming, run_dir, max_loss, seed, keys
) -> None:
    """:func:`train`'s argument checks: ConfigError naming the field, before anything else."""
    for field, v in (
        ("num_iterations", num_iterations),
        ("num_seeds", num_seeds),
        ("chunk_iterations", chunk_iterations),
        ("checkpoint_every", checkpoint_every),
    ):
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0):
            raise ConfigError(field, v, "must be a positive integer")
    if resuming and run_dir is None:
        raise ConfigError("resume", True, "needs a run_dir with a checkpoint")
    if max_loss is not None and not (isinstance(max_loss, (int, float)) and max_loss > 0):
        raise ConfigError("max_loss", max_loss, "must be a positive number (or None: no divergence guard)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError("seed", seed, f"must be an integer in [0, {2**32 - 1}]")
    if keys is not None and keys.shape[0] != num_seeds:
        raise ConfigError("keys", keys.shape, f"must have num_seeds={num_seeds} rows")


def _describe(algo, num_seeds, seed, num_iterations, chunk_iterations, run_info, mesh, rows) -> dict:
    """The JSON-able ``run.json`` description of a run (what an exact resume must match)."""
    description = {
        "algo": algo.name,
        "env": algo.env.spec.name,
        "num_seeds": num_seeds,
        "seed": seed,
        "num_iterations": num_iterations,
        "chunk_iterations": chunk_iterations,
        "env_steps_per_iteration": algo.env_steps_per_update,
        **(run_info or {}),
    }
    if mesh is not None:
        description["placement"] = {"devices": int(mesh.size), "processes": jax.process_count()}
    description["checkpoint_rows"] = rows
    return json.loads(json.dumps(description, default=str))


def _restore(ckpt, state, run_dir, primary):
    """(state, first iteration) from the latest intact checkpoint, or the fresh ``state``
    and 0 with a warning when there is none (damaged ones are quarantined by process 0)."""
    restored, start_iter = ckpt.restore_latest(state, quarantine=primary)
    if restored is not None:
        return restored, start_iter
    print(
        f"warning: no intact checkpoint in {ckpt.directory}; starting {run_dir} again from iteration 0", file=sys.stderr
    )
    return state, 0


def _host_loop(
    algo,
    state,
    start_iter,
    num_iterations,
    num_seeds,
    chunk_iterations,
    checkpoint_every,
    progress,
    stop_after_chunks,
    max_loss,
    writer,
    ckpt,
    run_dir,
    mesh=None,
    pending: Optional[Future] = None,
) -> TrainResult:
    steps_per_iter = algo.env_steps_per_update
    compile_s = 0.0
    if mesh is None:
        to_host = jax.device_get
    else:
        from marl.distributed import to_host

    history: dict[str, list] = {}
    bar = _progress(progress, num_iterations * steps_per_iter, start_iter * steps_per_iter, algo)
    it = start_iter
    chunks_done = 0
    train_s = 0.0
    last_saved = start_iter
    try:
        while it < num_iterations:
            length = min(chunk_iterations, num_iterations - it)
            fn, dt_compile = _compiled_chunk(algo, length, mesh, state, pending)
            pending = None
            compile_s += dt_compile
            t0 = time.perf_counter()
            new_state, metrics, finite = fn(state)
            metrics, finite = to_host((metrics, finite))
            metrics = {k: np.asarray(v)[:num_seeds] for k, v in metrics.items()}  # padding rows dropped
            finite = np.asarray(finite)[:num_seeds]
            dt = time.perf_counter() - t0
            train_s += dt
            bad = _first_nonfinite(metrics, finite, it, max_loss)
            good = bad[1] - it if bad else length
            if writer is not None:
                writer.write(metrics, it, steps_per_iter, upto=good)
            for k, v in metrics.items():
                history.setdefault(k, []).append(np.asarray(v)[:, :good])
            if bad:
                _stop_on(bad, ckpt, last_saved, steps_per_iter)
            state = new_state
            it += length
            chunks_done += 1
            if bar is not None:
                bar.update(length * steps_per_iter)
                bar.set_postfix(_postfix(metrics, num_seeds * length * steps_per_iter / max(dt, 1e-9)))
            if ckpt is not None and (chunks_done % checkpoint_every == 0 or it >= num_iterations):
                if writer is not None:  # the lines this checkpoint covers are durable before it exists
                    writer.sync()
                ckpt.save(it, state)
                last_saved = it
            if stop_after_chunks is not None and chunks_done >= stop_after_chunks:
                break
    finally:
        if bar is not None:
            bar.close()
    metrics_np = {k: np.concatenate(v, axis=1) for k, v in history.items()}
    return TrainResult(state, metrics_np, run_dir, compile_s, train_s, it * steps_per_iter)


def _chunk_key(algo: Algorithm, length: int, mesh, state) -> tuple:
    """What a compiled chunk is specific to; ``state`` may be abstract (``jax.eval_shape``)."""
    avals = tuple(
        (tuple(x.shape), np.dtype(x.dtype), bool(getattr(x, "weak_type", False))) for x in jax.tree.leaves(state)
    )
    return (algo.update, length, mesh, jax.tree.structure(state), avals, _jax_context())


def _jax_context():
    """Every JAX setting that changes a trace, thread-local ones included (None if this
    JAX does not say): a program compiled under other settings is another program."""
    try:
        from jax._src.config import trace_context  # not a public API
    except ImportError:
        return None
    return trace_context()


def _cache(key: tuple, compiled) -> None:
    if len(_COMPILED) >= 16:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = compiled


def _precompile(algo: Algorithm, length: int, keys, hparams) -> Optional[Future]:
    """Compile the chunk of ``length`` iterations for the initial states of ``keys`` in a
    thread, from their shapes alone; the caller builds the states meanwhile. The future
    gives (cache key, compiled chunk or None, seconds). None (compile as usual) when the
    caller holds thread-local JAX settings (``jax.default_device``,
    ``jax.default_matmul_precision``, ...), which a thread would not see."""
    context = _jax_context()
    if context is None:
        return None

    def compile_first():
        if _jax_context() != context:  # a setting held by the caller's thread only
            return None, None, 0.0
        t0 = time.perf_counter()
        abstract = jax.eval_shape(lambda k: init_states(algo, k, hparams), keys)
        key = _chunk_key(algo, length, None, abstract)
        if key in _COMPILED:
            return key, None, 0.0
        compiled = make_chunk_fn(algo, length).lower(abstract).compile()
        return key, compiled, time.perf_counter() - t0

    pool = ThreadPoolExecutor(1, thread_name_prefix="marl-compile")
    try:
        return pool.submit(compile_first)
    finally:
        pool.shutdown(wait=False)


def _compiled_chunk(algo: Algorithm, length: int, mesh, state, pending: Optional[Future] = None):
    """(the compiled chunk of ``length`` iterations for ``state``'s layout, the seconds
    spent compiling it now: 0 when cached). A small cache of the last 16 programs.
    ``pending``: a :func:`_precompile` future, cached first (its seconds are counted)."""
    spent = 0.0
    if pending is not None:
        key, compiled, spent = pending.result()
        if compiled is not None:
            _cache(key, compiled)
    key = _chunk_key(algo, length, mesh, state)
    if key in _COMPILED:
        return _COMPILED[key], spent
    t0 = time.perf_counter()
    chunk: Any = make_chunk_fn(algo, length, mesh)  # a jitted function: lower / compile
    _cache(key, chunk.lower(state).compile())
    return _COMPILED[key], spent + time.perf_counter() - t0


def _stop_on(bad: tuple, ckpt, last_saved: int, steps_per_iter: int):
    """Raise NonFiniteError (or DivergenceError) for ``bad = (metric name, iteration)``,
    naming the last good checkpoint."""
    name, at = bad
    cls = DivergenceError if name.startswith("diverging") else NonFiniteError
    last = f"iteration {last_saved} in {ckpt.directory}" if ckpt and last_saved else "none"
    raise cls(
        f"{name} at iteration {at + 1} (env step {(at + 1) * steps_per_iter}); "
        f"training stopped. Last good checkpoint: {last}"
    )


def _first_nonfinite(metrics: dict, params_finite: np.ndarray, it0: int, max_loss: Optional[float] = None):
    """-> (description, iteration) of the first non-finite metric, non-finite parameters
    or (with ``max_loss``) loss beyond the bound; None when the chunk is sound."""
    first = None
    for k, v in metrics.items():
        v = np.asarray(v)
        if not np.issubdtype(v.dtype, np.floating):
            continue
        flat = v.reshape(v.shape[0], v.shape[1], -1)
        bad_iters = np.where(~np.isfinite(flat).all(axis=(0, 2)))[0]
        if bad_iters.size and (first is None or bad_iters[0] + it0 < first[1]):
            first = (f"non-finite metric '{k}'", int(bad_iters[0]) + it0)
        if max_loss is not None and "loss" in k:
            size = np.abs(np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0))
            big = np.where((size > max_loss).any(axis=(0, 2)))[0]
            if big.size and (first is None or big[0] + it0 < first[1]):
                first = (f"diverging metric '{k}' (|value| > max_loss={max_loss:g})", int(big[0]) + it0)
    if first is None and not params_finite.all():
        length = next(iter(metrics.values())).shape[1]
        first = ("non-finite parameters", it0 + length - 1)
    return first


def _progress(enabled: bool, total: int, initial: int, algo: Algorithm):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        unit_scale=True,
        desc=f"{algo.name} on {algo.env.spec.name}",
        dynamic_ncols=True,
    )


def _postfix(metrics: dict, sps: float) -> dict:
    out = {"steps/s": f"{sps:,.0f}"}
    eps = np.asarray(metrics.get("episodes", 0))
    # zero-sum games log a team return of 0; show the first player's return there
    ret = "return_agent0" if "return_agent0" in metrics else "return"
    teams = [k for k in metrics if k.startswith("return_") and not k.startswith("return_agent")][:3]
    for k, label in ((ret, "return"), ("win_rate", "win"), *((t, t[len("return_") :]) for t in teams)):
        if k in metrics:
            v = np.asarray(metrics[k])
            w = eps if np.ndim(eps) else np.ones_like(v)
            out[label] = f"{(v * w).sum() / max(w.sum(), 1):.3f}" if math.isfinite(float(v.mean())) else "nan"
    return out
