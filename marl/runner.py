"""The runner: ``jit(vmap(scan(update)))`` over chunks of iterations.

Seeds (and, for sweeps, hyperparameter configurations) are the vmapped axis. The
host loop between chunks owns everything that is not pure: the progress bar,
metrics (``metrics.jsonl``, TensorBoard when installed), orbax checkpoints, the
non-finite check, and resume. ``chunk_iterations == num_iterations`` gives the
classic single-``jit`` training function.

Resume is exact: a checkpoint holds the whole seed-batched train state (PRNG keys
included) after a chunk, and a resumed run runs the same compiled chunks from
there, so it ends with the same parameters as the run that was never stopped.
Metrics lines written after the last checkpoint are dropped on resume (they are
recomputed identically).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from marl.checkpoint import Checkpointer
from marl.config import ConfigError
from marl.logging import MetricsWriter
from marl.types import SEED_AXIS, Algorithm

# Compiled chunks by (update function, length, state structure): the same algorithm
# object trained again in one process (tests, notebooks, sweeps) does not recompile.
_COMPILED: dict = {}


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf; the message names the metric and iteration."""


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


def make_chunk_fn(algo: Algorithm, length: int) -> Callable:
    """``jit(vmap(scan(update)))`` for ``length`` iterations; also returns whether
    every float leaf of the parameters is finite."""

    def one_seed(state):
        state, metrics = jax.lax.scan(lambda s, _: algo.update(s), state, None, length=length)
        params = getattr(state, "params", state)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)
                                    if jnp.issubdtype(x.dtype, jnp.floating)]))
        return state, metrics, finite

    return jax.jit(jax.vmap(one_seed, axis_name=SEED_AXIS), donate_argnums=0)


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
    progress: bool = True,
    hparams: Optional[dict] = None,
    stop_after_chunks: Optional[int] = None,
    run_info: Optional[dict] = None,
    keys: Optional[jax.Array] = None,
) -> TrainResult:
    """Train ``num_seeds`` seeds of ``algo`` for ``num_iterations`` updates.

    Args:
      chunk_iterations: iterations per compiled chunk (host loop granularity).
      run_dir: where ``metrics.jsonl``, ``checkpoints/`` and ``run.json`` go (None: nowhere).
      checkpoint_every: save a checkpoint every this many chunks (and at the end).
      resume: continue from the latest checkpoint in ``run_dir``.
      hparams: per-seed overrides of sweepable hyperparameters (see :func:`init_states`).
      stop_after_chunks: stop early after this many chunks of this call (simulates a
        killed run in tests).
      run_info: extra JSON-able description stored in ``run.json`` (algo, env, config).
      keys: explicit per-seed PRNG keys [num_seeds, 2] (default: split(PRNGKey(seed))).
    """
    for field, v in (("num_iterations", num_iterations), ("num_seeds", num_seeds),
                     ("chunk_iterations", chunk_iterations), ("checkpoint_every", checkpoint_every)):
        if not (isinstance(v, (int, np.integer)) and v > 0):
            raise ConfigError(field, v, "must be a positive integer")
    if resume and run_dir is None:
        raise ConfigError("resume", resume, "needs a run_dir with a checkpoint")
    chunk_iterations = min(chunk_iterations, num_iterations)
    steps_per_iter = algo.env_steps_per_update
    if keys is None:
        keys = jax.random.split(jax.random.PRNGKey(seed), num_seeds)
    elif keys.shape[0] != num_seeds:
        raise ConfigError("keys", keys.shape, f"must have num_seeds={num_seeds} rows")

    writer = ckpt = None
    start_iter = 0
    description = {
        "algo": algo.name, "env": algo.env.spec.name, "num_seeds": num_seeds, "seed": seed,
        "num_iterations": num_iterations, "chunk_iterations": chunk_iterations,
        "env_steps_per_iteration": steps_per_iter, **(run_info or {}),
    }
    state = init_states(algo, keys, hparams)
    if run_dir is not None:
        run_dir = _prepare_run_dir(run_dir, resume, description)
        ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
        if resume:
            start_iter = ckpt.latest_step() or 0
            if start_iter:
                state = ckpt.restore(state, start_iter)
        writer = MetricsWriter(run_dir, truncate_after=start_iter if resume else 0)

    compile_s = 0.0

    def get_chunk(length):
        nonlocal compile_s
        key = (algo.update, length, jax.tree.structure(state),
               tuple((x.shape, x.dtype) for x in jax.tree.leaves(state)))
        if key not in _COMPILED:
            t0 = time.perf_counter()
            if len(_COMPILED) >= 16:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = make_chunk_fn(algo, length).lower(state).compile()
            compile_s += time.perf_counter() - t0
        return _COMPILED[key]

    history: dict[str, list] = {}
    bar = _progress(progress, num_iterations * steps_per_iter, start_iter * steps_per_iter, algo)
    it = start_iter
    chunks_done = 0
    train_s = 0.0
    last_saved = start_iter
    try:
        while it < num_iterations:
            length = min(chunk_iterations, num_iterations - it)
            fn = get_chunk(length)
            t0 = time.perf_counter()
            new_state, metrics, finite = fn(state)
            metrics = jax.device_get(metrics)
            finite = np.asarray(jax.device_get(finite))
            dt = time.perf_counter() - t0
            train_s += dt
            bad = _first_nonfinite(metrics, finite, it)
            good = bad[1] - it if bad else length
            if writer is not None:
                writer.write(metrics, it, steps_per_iter, upto=good)
            for k, v in metrics.items():
                history.setdefault(k, []).append(np.asarray(v)[:, :good])
            if bad:
                name, at = bad
                raise NonFiniteError(
                    f"non-finite {name} at iteration {at + 1} (env step {(at + 1) * steps_per_iter}); "
                    f"training stopped. Last good checkpoint: "
                    f"{'iteration ' + str(last_saved) + ' in ' + ckpt.directory if ckpt and last_saved else 'none'}"
                )
            state = new_state
            it += length
            chunks_done += 1
            if bar is not None:
                bar.update(length * steps_per_iter)
                bar.set_postfix(_postfix(metrics, num_seeds * length * steps_per_iter / max(dt, 1e-9)))
            if ckpt is not None and (chunks_done % checkpoint_every == 0 or it >= num_iterations):
                ckpt.save(it, state)
                last_saved = it
            if stop_after_chunks is not None and chunks_done >= stop_after_chunks:
                break
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if ckpt is not None:
            ckpt.close()
    metrics_np = {k: np.concatenate(v, axis=1) for k, v in history.items()}
    return TrainResult(state, metrics_np, run_dir, compile_s, train_s, it * steps_per_iter)


def _first_nonfinite(metrics: dict, params_finite: np.ndarray, it0: int):
    first = None
    for k, v in metrics.items():
        v = np.asarray(v)
        if not np.issubdtype(v.dtype, np.floating):
            continue
        bad_iters = np.where(~np.isfinite(v).all(axis=0))[0]
        if bad_iters.size and (first is None or bad_iters[0] + it0 < first[1]):
            first = (f"metric '{k}'", int(bad_iters[0]) + it0)
    if first is None and not params_finite.all():
        length = next(iter(metrics.values())).shape[1]
        first = ("parameters", it0 + length - 1)
    return first


def _prepare_run_dir(run_dir: str, resume: bool, description: dict) -> str:
    run_dir = os.path.abspath(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise ConfigError("run_dir", run_dir, f"must be a writable directory ({e.strerror})") from None
    path = os.path.join(run_dir, "run.json")
    if resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for k in ("algo", "env", "env_kwargs", "num_seeds", "seed", "chunk_iterations"):
            if k in old and k in description and old[k] != description[k]:
                raise ConfigError(
                    k, description[k], f"must match the run being resumed ({old[k]!r}) for an exact resume"
                )
        old_cfg, new_cfg = old.get("config", {}), description.get("config", {})
        for k in sorted(set(old_cfg) | set(new_cfg)):
            # a field added to the config class after the run was written is not a change
            if k in new_cfg and k not in old_cfg:
                continue
            if old_cfg.get(k) != new_cfg.get(k):
                raise ConfigError(
                    f"config.{k}", new_cfg.get(k),
                    f"must match the run being resumed ({old_cfg.get(k)!r}) for an exact resume",
                )
    elif not resume and os.path.exists(os.path.join(run_dir, "checkpoints")) and os.listdir(
        os.path.join(run_dir, "checkpoints")
    ):
        raise ConfigError(
            "run_dir", run_dir, "already holds checkpoints: pass --resume to continue it, or choose a new name"
        )
    with open(path, "w") as f:
        json.dump(description, f, indent=2, default=str)
    return run_dir


def _progress(enabled: bool, total: int, initial: int, algo: Algorithm):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", unit_scale=True,
                desc=f"{algo.name} on {algo.env.spec.name}", dynamic_ncols=True)


def _postfix(metrics: dict, sps: float) -> dict:
    out = {"steps/s": f"{sps:,.0f}"}
    eps = np.asarray(metrics.get("episodes", 0))
    # zero-sum games log a team return of 0; show the first player's return there
    ret = "return_agent0" if "return_agent0" in metrics else "return"
    for k, label in ((ret, "return"), ("win_rate", "win")):
        if k in metrics:
            v = np.asarray(metrics[k])
            w = eps if np.ndim(eps) else np.ones_like(v)
            out[label] = f"{(v * w).sum() / max(w.sum(), 1):.3f}" if math.isfinite(float(v.mean())) else "nan"
    return out
