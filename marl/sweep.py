"""Hyperparameter sweeps: every configuration x every seed in one compiled program.

An algorithm's sweepable hyperparameters are the fields of ``train_state.hparams``
(arrays, see each algorithm's ``HParams``: learning rates, regularizer coefficient and
epsilon, discount, ...). A sweep is a list of configurations, each a dict
``{hyperparameter: value}``; with ``C`` configurations and ``S`` seeds the runner's
vmapped axis holds ``C * S`` rows, row ``c * S + s`` = configuration ``c`` with seed
``s``. Seed ``s`` uses ``split(PRNGKey(seed), S)[s]`` for every configuration, the
key that seed ``s`` of a plain ``train(..., num_seeds=S, seed=seed)`` run gets, so a
row reproduces the single run of its configuration (tested).

The sweep is one call of :func:`marl.runner.train` (metrics, checkpoints and exact
resume come with it), on one device or with its rows sharded over a mesh of several
devices or hosts (:mod:`marl.distributed`).

Building configurations: :func:`grid` (Cartesian product) and :func:`random_search`
(``uniform``, ``log_uniform`` or ``choice`` per hyperparameter, fixed seed).
:func:`validate` checks names and values before anything compiles: each configuration
is applied to the algorithm's config dataclass, whose own checks name the field, the
value and what is allowed (e.g. a non-positive learning rate).

Results: :func:`summarize` gives each configuration's final return and win rate
(per seed, the episode-weighted mean over the last ``final_fraction`` of the
iterations; then mean, standard deviation and IQM over seeds), ranked;
:func:`best_config_dict` is the winning configuration as a JSON dict of config fields,
the format ``python -m experiments.train --config-file`` reads.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np

from marl.config import ConfigError
from marl.stats import final_scores, iqm
from marl.types import Algorithm

DISTRIBUTIONS = ("uniform", "log_uniform", "choice")


# ------------------------------------------------------------------ names and values


def sweepable(algo: Algorithm) -> list[str]:
    """Names of the hyperparameters ``algo`` keeps as arrays in ``state.hparams``."""
    shapes = jax.eval_shape(algo.init, jax.random.PRNGKey(0))
    hp = getattr(shapes, "hparams", None)
    if hp is None or not hasattr(hp, "_fields"):
        return []
    return list(hp._fields)


def config_path(name: str, config) -> tuple[str, ...]:
    """Where hyperparameter ``name`` lives in the config dataclass: a field of the same
    name, or ``reg_<x>`` -> ``regularizer.<x>``. Raises ConfigError if neither exists."""
    fields = {f.name for f in dataclasses.fields(config)}
    if name in fields:
        return (name,)
    if name.startswith("reg_") and "regularizer" in fields:
        sub = config.regularizer
        if dataclasses.is_dataclass(sub) and name[4:] in {f.name for f in dataclasses.fields(sub)}:
            return ("regularizer", name[4:])
    raise ConfigError(f"sweep.{name}", name, f"has no field in {type(config).__name__} to write it to")


def apply_values(config, values: dict):
    """``config`` with hyperparameter ``values`` written to their config fields; the
    config's validation runs (a bad value raises its ConfigError)."""
    nested: dict[str, Any] = {}
    for name, v in values.items():
        path = config_path(name, config)
        if len(path) == 1:
            nested[path[0]] = v
        else:
            nested.setdefault(path[0], {})[path[1]] = v
    changes = {}
    for k, v in nested.items():
        changes[k] = dataclasses.replace(getattr(config, k), **v) if isinstance(v, dict) else v
    return dataclasses.replace(config, **changes)


def _as_number(field: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise ConfigError(field, v, "must be a finite number")
    return float(v)


def grid(params: dict) -> list[dict]:
    """Cartesian product of ``{name: [values]}`` (the first name varies slowest)."""
    if not isinstance(params, dict) or not params:
        raise ConfigError("grid", params, "must map at least one hyperparameter to a list of values")
    names = list(params)
    lists = []
    for name in names:
        vals = params[name]
        if not isinstance(vals, (list, tuple)) or not vals:
            raise ConfigError(f"grid.{name}", vals, "must be a non-empty list of numbers")
        lists.append([_as_number(f"grid.{name}", v) for v in vals])
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*lists)]


def random_search(params: dict, num_configs: int, seed: int = 0) -> list[dict]:
    """``num_configs`` configurations drawn independently (numpy ``default_rng(seed)``).

    ``params``: name -> ``{"uniform": [lo, hi]}`` | ``{"log_uniform": [lo, hi]}`` (lo > 0)
    | ``{"choice": [v, ...]}``; a plain list means ``choice``.
    """
    if not isinstance(params, dict) or not params:
        raise ConfigError("random", params, f"must map at least one hyperparameter to one of {list(DISTRIBUTIONS)}")
    if isinstance(num_configs, bool) or not isinstance(num_configs, int) or num_configs <= 0:
        raise ConfigError("num_configs", num_configs, "must be a positive integer")
    rng = np.random.default_rng(seed)
    columns = {}
    for name, spec in params.items():
        field = f"random.{name}"
        if isinstance(spec, (list, tuple)):
            spec = {"choice": list(spec)}
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ConfigError(field, spec, f"must be {{kind: arguments}} with kind one of {list(DISTRIBUTIONS)}")
        kind, arg = next(iter(spec.items()))
        if not isinstance(arg, (list, tuple)) or not arg:
            raise ConfigError(f"{field}.{kind}", arg, "must be a non-empty list")
        vals = [_as_number(f"{field}.{kind}", v) for v in arg]
        if kind == "choice":
            columns[name] = [vals[i] for i in rng.integers(0, len(vals), size=num_configs)]
            continue
        if len(vals) != 2 or not vals[0] < vals[1]:
            raise ConfigError(f"{field}.{kind}", arg, "must be [low, high] with low < high")
        if kind == "log_uniform":
            if vals[0] <= 0:
                raise ConfigError(f"{field}.{kind}", arg, "needs 0 < low < high")
            columns[name] = np.exp(rng.uniform(np.log(vals[0]), np.log(vals[1]), size=num_configs)).tolist()
        else:
            columns[name] = rng.uniform(vals[0], vals[1], size=num_configs).tolist()
    return [{name: float(columns[name][i]) for name in params} for i in range(num_configs)]


def validate(algo: Algorithm, configs: Sequence[dict], names: Optional[Sequence[str]] = None) -> list:
    """Check a sweep before compiling; returns the full config of every configuration.

    Raises ConfigError for an empty sweep, configurations that set different
    hyperparameters, unknown names (listing the allowed ones), non-numbers, values the
    algorithm's config rejects (its own message: field, value, allowed), and a swept
    regularizer coefficient or epsilon while ``regularizer.kind`` is ``none``.
    """
    if not configs:
        raise ConfigError("sweep", list(configs), "must hold at least one configuration")
    allowed = list(names) if names is not None else sweepable(algo)
    keys = list(configs[0])
    if not keys:
        raise ConfigError("sweep", configs[0], "a configuration must set at least one hyperparameter")
    for i, c in enumerate(configs):
        if list(c) != keys:
            raise ConfigError(f"sweep[{i}]", sorted(c), f"must set the same hyperparameters as the first: {keys}")
    for k in keys:
        if k not in allowed:
            raise ConfigError(f"sweep.{k}", k, f"not a sweepable hyperparameter of {algo.name}; allowed: {allowed}")
    reg = getattr(algo.config, "regularizer", None)
    if reg is not None and getattr(reg, "kind", None) == "none":
        for k in keys:
            if k.startswith("reg_"):
                raise ConfigError(
                    f"sweep.{k}",
                    [c[k] for c in configs],
                    "has no effect with regularizer.kind='none'; set the kind first "
                    '(e.g. overrides {"regularizer": {"kind": "wasserstein"}})',
                )
    full = []
    for c in configs:
        values = {k: _as_number(f"sweep.{k}", v) for k, v in c.items()}
        full.append(apply_values(algo.config, values))
    return full


# ------------------------------------------------------------------ running


@dataclasses.dataclass
class SweepResult:
    configs: list  # list of {hyperparameter: value}, C entries
    num_seeds: int
    seed: int
    metrics: dict  # name -> np.ndarray [C, S, iterations]
    state: Any  # train state batched over the C * S rows (row c * S + s)
    run_dir: Optional[str]
    compile_seconds: float
    train_seconds: float
    env_steps: int  # per row
    devices: int


def row_layout(configs: Sequence[dict], num_seeds: int, seed: int = 0):
    """-> (keys [C * S, 2], hparams {name: [C * S]}) with row ``c * S + s`` =
    configuration ``c``, seed ``s``."""
    seed_keys = jax.random.split(jax.random.PRNGKey(seed), num_seeds)
    keys = np.tile(np.asarray(jax.device_get(seed_keys)), (len(configs), 1))
    hparams = {k: np.repeat(np.asarray([c[k] for c in configs], np.float32), num_seeds) for k in configs[0]}
    return keys, hparams


def run_sweep(
    algo: Algorithm,
    configs: Sequence[dict],
    *,
    num_iterations: int,
    num_seeds: int = 1,
    seed: int = 0,
    chunk_iterations: int = 10,
    checkpoint_every: int = 1,
    run_dir: Optional[str] = None,
    resume: bool = False,
    progress: bool = False,
    mesh=None,
    run_info: Optional[dict] = None,
) -> SweepResult:
    """Train every configuration x seed as one vmapped program.

    ``mesh``: a :func:`marl.distributed.make_mesh` mesh to shard the rows over (None: one
    device); the runner's checkpoints and exact ``resume`` work on every placement.
    """
    import jax

    from marl.runner import check_memory, train

    validate(algo, configs)
    if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds <= 0:
        raise ConfigError("num_seeds", num_seeds, "must be a positive integer")
    # the rows must fit before their keys are made (a huge num_seeds fails here, at once)
    rows = len(configs) * num_seeds
    check_memory(algo, rows if mesh is None else -(-rows // int(mesh.size)) * jax.local_device_count())
    configs = [dict(c) for c in configs]
    keys, hparams = row_layout(configs, num_seeds, seed)
    info = {
        **(run_info or {}),
        "sweep": {
            "configs": configs,
            "num_seeds": num_seeds,
            "seed": seed,
            "rows": "row c * num_seeds + s = configuration c, seed s",
        },
    }
    devices = 1 if mesh is None else int(mesh.size)
    res = train(
        algo,
        num_iterations=num_iterations,
        num_seeds=keys.shape[0],
        seed=seed,
        keys=keys,
        hparams=hparams,
        chunk_iterations=chunk_iterations,
        checkpoint_every=checkpoint_every,
        run_dir=run_dir,
        resume=resume,
        progress=progress,
        run_info=info,
        mesh=mesh,
    )
    C = len(configs)
    metrics = {k: np.asarray(v).reshape((C, num_seeds) + np.shape(v)[1:]) for k, v in res.metrics.items()}
    return SweepResult(
        configs,
        num_seeds,
        seed,
        metrics,
        res.state,
        res.run_dir,
        res.compile_seconds,
        res.train_seconds,
        res.env_steps,
        devices,
    )


# ------------------------------------------------------------------ results


def summarize(result: SweepResult, final_fraction: float = 0.1, metric: str = "auto") -> list[dict]:
    """One row per configuration, best first.

    Each seed's score is its episode-weighted mean over the last ``final_fraction`` of
    the iterations (:func:`marl.stats.final_scores`), for ``return`` and ``win_rate``
    when the algorithm reports them; rows give the mean, standard deviation and IQM
    over seeds. Ranking: by ``metric`` (descending); ``auto`` ranks by win rate, then
    return, so environments without wins (win rate 0 everywhere) rank by return.
    """
    if not 0.0 < final_fraction <= 1.0:
        raise ConfigError("final_fraction", final_fraction, "must be in (0, 1]")
    m = result.metrics
    reported = [k for k in ("win_rate", "return") if k in m]
    if metric not in ("auto", *m.keys()):
        raise ConfigError("metric", metric, f"must be 'auto' or a reported metric: {sorted(m)}")
    episodes = m.get("episodes")
    rows = []
    for c, values in enumerate(result.configs):
        row: dict[str, Any] = {"config": c, "hparams": dict(values)}
        for k in dict.fromkeys(reported + ([metric] if metric != "auto" else [])):
            per_seed = final_scores(m[k][c], None if episodes is None else episodes[c], final_fraction)
            ok = per_seed[np.isfinite(per_seed)]
            row[k] = {
                "mean": float(ok.mean()) if ok.size else float("nan"),
                "std": float(ok.std()) if ok.size else float("nan"),
                "iqm": iqm(ok) if ok.size else float("nan"),
                "per_seed": [None if not np.isfinite(v) else float(v) for v in per_seed],
            }
        rows.append(row)
    order = ["win_rate", "return"] if metric == "auto" else [metric]
    order = [k for k in order if k in reported or k == metric]

    def sort_key(row):
        return tuple(-row[k]["mean"] if np.isfinite(row[k]["mean"]) else math.inf for k in order)

    rows.sort(key=sort_key)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def best_config_dict(config, hparams: dict) -> dict:
    """The config with ``hparams`` applied, as a JSON-able dict of config fields (the
    ``--config-file`` format of ``experiments.train``)."""
    return json.loads(json.dumps(dataclasses.asdict(apply_values(config, hparams)), default=str))


def markdown_table(rows: list[dict], final_fraction: float, num_seeds: int) -> str:
    names = list(rows[0]["hparams"]) if rows else []
    metrics = [k for k in ("win_rate", "return") if rows and k in rows[0]]
    extra = [
        k
        for k in (rows[0] if rows else {})
        if isinstance(rows[0][k], dict) and "mean" in rows[0][k] and k not in metrics
    ]
    metrics += extra
    head = ["rank", "config", *names, *[f"{k} mean ± std" for k in metrics], *[f"{k} IQM" for k in metrics]]
    lines = [
        f"Final performance per configuration: each seed's episode-weighted mean over the last "
        f"{100 * final_fraction:g}% of iterations; mean ± std and IQM over {num_seeds} seed(s).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            str(r["rank"]),
            str(r["config"]),
            *[f"{r['hparams'][n]:.4g}" for n in names],
            *[f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in metrics],
            *[f"{r[k]['iqm']:.4f}" for k in metrics],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
