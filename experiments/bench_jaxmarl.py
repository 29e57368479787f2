"""Throughput side by side with JaxMARL's own baseline scripts, in one process and one window.

    python -m experiments.bench_jaxmarl --baselines PATH/TO/JaxMARL/baselines --algos ippo mappo
    python -m experiments.bench_jaxmarl --baselines PATH --algos qmix --out results/bench/qmix.json

``--baselines`` is a folder holding JaxMARL's baseline scripts and their yaml configs, as in
a JaxMARL checkout (``baselines/``) or any flat copy: the files are found by name anywhere
below it (``ippo_rnn_smax.py`` + ``ippo_rnn_smax.yaml``, ``mappo_rnn_smax.py`` +
``mappo_homogenous_rnn_smax.yaml``, ``qmix_rnn.py`` + ``config.yaml`` + ``ql_rnn_smax.yaml``).
They are imported as they are, never copied or edited; wandb, hydra and omegaconf, which
they import at the top, are replaced by inert modules when not installed (wandb.log does
nothing, as with ``WANDB_MODE=disabled``). ``qmix_rnn.py`` needs flashbax
(``pip install --no-deps flashbax==0.1.3``).

What is timed, per algorithm, at the baseline's own default config with ``MAP_NAME`` set
to ``--map`` (HeuristicEnemySMAX, as our ``smax:<map>`` uses):

- JaxMARL: its ``make_train(config)`` returns one program (init + ``NUM_UPDATES``
  updates). It is compiled for K1 and K2 updates and throughput is
  ``(K2 - K1) * NUM_ENVS * NUM_STEPS / median(t(K2) - t(K1))``: init and compile cancel.
  For QMIX, K1 = 32: its buffer samples from the 32nd update on, so every timed update
  learns (8 gradient steps of 32 x 128-step segments). Its periodic greedy test is off
  (ours does not evaluate while training either).
- Ours: ``marl.runner.make_chunk_fn`` (``jit(scan(update))`` for one seed) for
  ``--iterations`` updates at the same num_envs, num_steps and network sizes, on an
  initialized state, first run until every update learns (replay learners).
  Variants: PPO ``default`` and ``equal`` (``bootstrap_truncation=False``, the work
  JaxMARL does); QMIX ``default`` (the unroll stops after the batch's longest episode)
  and ``equal`` (``full_unroll=True``: all ``max_steps + 1`` slots of each sampled
  episode, against JaxMARL's ``NUM_STEPS`` slots per segment).
- A random policy (uniform valid actions) through each environment stack at the same
  num_envs x num_steps: JaxMARL's raw env (+ its log wrapper) and our wrapped env. Their
  ratio is the median over repeats of each repeat's ratio (the two run back to back).
  XLA's cost analysis of both compiled rollouts (flops, bytes accessed) gives their
  work without timing noise.
- With ``--env-only``: the random-policy rollouts alone (no learners), for the wrapped-env
  ratio with more repeats in a few minutes.
- With ``--compile-only``: start-up alone, repeated from fresh objects: JaxMARL's program
  compiled (its init is inside it) against ours initialized and compiled, in sequence and
  as the runner starts (the chunk compiling in a thread while init runs).
- With ``--decompose`` (PPO): JaxMARL's programs and our equal-work variant at 1 update
  epoch too, so that each update splits into the learner's epochs
  (``epochs x (t(epochs) - t(1)) / (epochs - 1)``) and the rest (rollout, returns),
  side by side.

Every repeat runs each timed program once, in one order (random-ours, random-JaxMARL,
JaxMARL K1, ours variant 1, JaxMARL K2, ours variant 2, ...), backwards on odd repeats,
so drift in the machine's speed reaches all of them alike; medians over ``--repeats``. The random-policy
rollouts, a fraction of a second each, run ``--random-calls`` times per repeat and count
their median. Ours runs one seed, which the runner steps without its seed vmap, as
JaxMARL's program does. Compile times
(JaxMARL: its K1 program, init included; ours: init + chunk, and each alone) are reported too.
Writes JSON and a markdown table beside it (same name, ``.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
import types
from typing import Literal, Optional

import tyro

from experiments.cli import entry
from marl.config import ConfigError, check_positive
from marl.rundir import atomic_write

Algo = Literal["ippo", "mappo", "qmix"]
SCRIPTS = {
    "ippo": ("ippo_rnn_smax.py", ["ippo_rnn_smax.yaml"]),
    "mappo": ("mappo_rnn_smax.py", ["mappo_homogenous_rnn_smax.yaml"]),
    "qmix": ("qmix_rnn.py", ["config.yaml", "ql_rnn_smax.yaml"]),
}
QMIX_FIRST_LEARNING_UPDATE = 32  # JaxMARL's buffer samples once it holds BUFFER_BATCH_SIZE rollouts
ONE_EPOCH = "equal, 1 epoch"  # our variant timed only for --decompose


@dataclasses.dataclass(frozen=True)
class SideBySideArgs:
    baselines: str
    """folder holding JaxMARL's baseline scripts and yaml configs (searched recursively)"""
    algos: tuple[Algo, ...] = ("ippo", "mappo", "qmix")
    map: str = "3m"
    repeats: int = 3
    iterations: int = 2
    """our updates per timed call"""
    random_calls: int = 5
    """random-policy rollouts per repeat (their median is the repeat's time)"""
    k1: Optional[int] = None
    """JaxMARL's shorter program, in updates (default 1; QMIX 32)"""
    k2: Optional[int] = None
    """JaxMARL's longer program, in updates (default K1 + 2; QMIX K1 + 4)"""
    warmup_updates: int = 0
    """our updates run before timing (e.g. to time QMIX later in training, episodes longer)"""
    env_only: bool = False
    """only the random-policy rollouts of both env stacks (the wrapped-env ratio), no learners"""
    compile_only: bool = False
    """only the start-up, repeated: JaxMARL's program compiled (init included) against ours
    initialized and compiled, in sequence and as the runner starts (chunk compiled in a
    thread while init runs), each time from fresh objects; no throughput"""
    decompose: bool = False
    """PPO: also time both at 1 update epoch, to split an update into the learner's epochs and
    the rest (rollout, returns); ours at the equal-work config"""
    smoke: bool = False
    """tiny sizes (4 envs x 16 steps, small networks, 2 updates): checks the code paths only"""
    out: str = "runs/bench/side_by_side.json"


def check_args(args: SideBySideArgs) -> None:
    if not os.path.isdir(args.baselines):
        raise ConfigError("baselines", args.baselines, "must be a folder holding JaxMARL's baseline scripts")
    for field in ("repeats", "iterations", "random_calls"):
        check_positive(field, getattr(args, field), integer=True)
    for field in ("k1", "k2"):
        if getattr(args, field) is not None:
            check_positive(field, getattr(args, field), integer=True)
    if args.k1 is not None and args.k2 is not None and args.k2 <= args.k1:
        raise ConfigError("k2", args.k2, f"must be > k1={args.k1}")
    if args.warmup_updates < 0:
        raise ConfigError("warmup_updates", args.warmup_updates, "must be >= 0")
    if not args.algos:
        raise ConfigError("algos", args.algos, "name at least one of ippo, mappo, qmix")
    if args.compile_only and args.env_only:
        raise ConfigError("compile_only", True, "times start-up only; it cannot be combined with env_only")
    if not re.fullmatch(r"\w+", args.map):
        raise ConfigError("map", args.map, "must be a SMAX map name such as 3m or 2s3z")
    for algo in args.algos:
        for name in [SCRIPTS[algo][0], *SCRIPTS[algo][1]]:
            find_file(args.baselines, name)
    if "qmix" in args.algos and not _importable("flashbax"):
        raise ConfigError(
            "algos", "qmix", "JaxMARL's qmix_rnn.py needs flashbax: pip install --no-deps flashbax==0.1.3"
        )


def find_file(root: str, name: str) -> str:
    for folder, _, files in sorted(os.walk(root)):
        if name in files:
            return os.path.join(folder, name)
    raise ConfigError("baselines", root, f"must hold {name} (searched every folder below it)")


# --------------------------------------------------------------------------- loading
def _importable(name: str) -> bool:
    return name in sys.modules or importlib.util.find_spec(name) is not None


def _inert_modules() -> None:
    """wandb, hydra and omegaconf as inert modules, where not installed: the baseline
    scripts import them at the top but ``make_train`` needs only ``wandb.log``."""
    if not _importable("wandb"):
        m = types.ModuleType("wandb")
        m.log = m.init = m.finish = lambda *a, **k: None
        sys.modules.setdefault("wandb", m)
    if not _importable("hydra"):
        m = types.ModuleType("hydra")
        m.main = lambda *a, **k: lambda f: f
        sys.modules.setdefault("hydra", m)
    if not _importable("omegaconf"):
        m = types.ModuleType("omegaconf")
        m.OmegaConf = type(
            "OmegaConf",
            (),
            {
                "to_container": staticmethod(lambda c, **k: c),
                "to_yaml": staticmethod(str),
                "save": staticmethod(lambda *a, **k: None),
            },
        )
        sys.modules.setdefault("omegaconf", m)


def load_baseline(root: str, algo: str):
    """(module, config dict) of a baseline script, at its yaml's defaults."""
    import yaml

    _inert_modules()
    script, yamls = SCRIPTS[algo]
    spec = importlib.util.spec_from_file_location(f"jaxmarl_baseline_{algo}", find_file(root, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = {}
    for name in yamls:
        with open(find_file(root, name)) as f:
            text = re.sub(r"\$\{[^}]*\}", "", f.read())  # OmegaConf interpolations (wandb entity)
        loaded = yaml.safe_load(text)
        loaded.pop("defaults", None)  # hydra's composition list
        config.update(loaded)
    config.pop("alg", None)
    return module, config


def jaxmarl_train_fn(module, algo: str, config: dict, updates: int):
    cfg = copy.deepcopy(config)
    cfg["TOTAL_TIMESTEPS"] = updates * cfg["NUM_ENVS"] * cfg["NUM_STEPS"]  # NUM_UPDATES = updates
    if algo == "qmix":
        env, _ = module.env_from_config(copy.deepcopy(cfg))
        return module.make_train(cfg, env)
    return module.make_train(cfg)


def jaxmarl_random_rollout(map_name: str, env_kwargs: dict, num_envs: int, num_steps: int):
    """Random valid actions through JaxMARL's own stack (HeuristicEnemySMAX + SMAXLogWrapper,
    with its auto-reset), as its baselines step it: compiled fn(carry) -> carry, warm carry."""
    import jax
    import jax.numpy as jnp
    from jaxmarl.environments.smax import HeuristicEnemySMAX, map_name_to_scenario
    from jaxmarl.wrappers.baselines import SMAXLogWrapper

    env = SMAXLogWrapper(HeuristicEnemySMAX(scenario=map_name_to_scenario(map_name), **env_kwargs))
    agents = env.agents

    def rollout(carry):
        key, obs, state = carry

        def step(c, k):
            obs, state = c
            k_act, k_env = jax.random.split(k)
            avail = jax.vmap(env.get_avail_actions)(state.env_state)
            keys = jax.random.split(k_act, len(agents))
            actions = {
                a: jax.random.categorical(keys[i], jnp.where(avail[a] > 0, 0.0, -1e9)) for i, a in enumerate(agents)
            }
            obs, state, reward, _, _ = jax.vmap(env.step)(jax.random.split(k_env, num_envs), state, actions)
            return (obs, state), reward[agents[0]].sum()

        key, sub = jax.random.split(key)
        (obs, state), _ = jax.lax.scan(step, (obs, state), jax.random.split(sub, num_steps))
        return key, obs, state

    obs, state = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), num_envs))
    carry = (jax.random.PRNGKey(1), obs, state)
    fn = jax.jit(rollout).lower(carry).compile()
    return fn, jax.block_until_ready(fn(carry))


def our_variants(algo: str, config: dict) -> dict[str, dict]:
    """Our config overrides matching the baseline's sizes, per variant."""
    E, T = int(config["NUM_ENVS"]), int(config["NUM_STEPS"])
    total = max(1, 10_000_000 // (E * T)) * E * T  # only schedules depend on it
    if algo in ("ippo", "mappo"):
        base = dict(
            num_envs=E,
            num_steps=T,
            total_steps=total,
            hidden=int(config["GRU_HIDDEN_DIM"]),
            update_epochs=int(config["UPDATE_EPOCHS"]),
            num_minibatches=int(config["NUM_MINIBATCHES"]),
        )
        return {"default": base, "equal (bootstrap_truncation=False)": {**base, "bootstrap_truncation": False}}
    base = dict(
        num_envs=E,
        num_steps=T,
        total_steps=total,
        hidden=int(config["HIDDEN_SIZE"]),
        train_steps=int(config["NUM_EPOCHS"]),
        batch_size=int(config["BUFFER_BATCH_SIZE"]),
        buffer_size=int(config["BUFFER_SIZE"]),
        mixing_embed=int(config["MIXER_EMBEDDING_DIM"]),
        hypernet_embed=int(config["MIXER_HYPERNET_HIDDEN_DIM"]),
    )
    return {"default": base, "equal (full_unroll=True)": {**base, "full_unroll": True}}


def smoke_config(algo: str, config: dict) -> dict:
    config = {**config, "NUM_ENVS": 4, "NUM_STEPS": 16}
    if algo == "qmix":
        config.update(
            HIDDEN_SIZE=16,
            BUFFER_SIZE=64,
            BUFFER_BATCH_SIZE=4,
            NUM_EPOCHS=1,
            LEARNING_STARTS=0,
            MIXER_EMBEDDING_DIM=8,
            MIXER_HYPERNET_HIDDEN_DIM=8,
        )
    else:
        config.update(GRU_HIDDEN_DIM=16, FC_DIM_SIZE=16, UPDATE_EPOCHS=2, NUM_MINIBATCHES=2)
    return config


# --------------------------------------------------------------------------- timing
def _call(fn, arg):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(arg))
    return out, time.perf_counter() - t0


def _compile(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _jaxmarl_programs(module, algo, config, k1, k2, rng) -> tuple[dict, dict]:
    """JaxMARL's compiled K1 / K2 programs at ``config`` (each called once to warm), and
    their compile times."""
    import jax

    programs, compile_s = {}, {}
    for k in (k1, k2):
        programs[k], compile_s[k] = _compile(jax.jit(jaxmarl_train_fn(module, algo, config, k)), rng)
    for k in (k1, k2):  # warm: a program's first call is slower than the next ones
        _call(programs[k], rng)
    return programs, compile_s


def _our_program(args: SideBySideArgs, algo: str, env, overrides: dict) -> dict:
    """Our compiled chunk for one variant, on a state past the warm-up (every update learns)."""
    import jax
    import jax.numpy as jnp

    import algos
    from marl.runner import prepare

    a = algos.make(algo, env, **overrides)
    t0 = time.perf_counter()  # as the runner starts a run: the chunk compiles while init runs
    state, fn, compile_s = prepare(a, jax.random.split(jax.random.PRNGKey(0), 1), args.iterations)
    state = jax.block_until_ready(state)
    ready_s = time.perf_counter() - t0
    calls = 0
    while True:  # past the warm-up and until every update learns
        state, metrics, _ = jax.block_until_ready(fn(state))
        calls += 1
        learning = float(jnp.min(metrics["learning"])) if "learning" in metrics else 1.0
        if (learning >= 1.0 and calls * args.iterations >= args.warmup_updates) or calls >= 500:
            break
    return {
        "fn": fn,
        "state": state,
        "overrides": overrides,
        "compile_s": compile_s,
        "ready_s": ready_s,
        "warmup_calls": calls,
        "learning": learning,
    }


def _ours_ready_s(algo: str, env, overrides: dict, iterations: int, concurrent: bool) -> float:
    """Seconds from a fresh algorithm object to its initial state and compiled chunk:
    ``runner.prepare`` (the runner's start) or init, then the chunk, in sequence."""
    import jax

    import algos
    from marl.runner import init_states, make_chunk_fn, prepare

    a = algos.make(algo, env, **overrides)  # a fresh object: nothing cached
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    t0 = time.perf_counter()
    if concurrent:
        state, _, _ = prepare(a, keys, iterations)
        jax.block_until_ready(state)
    else:
        state = jax.block_until_ready(init_states(a, keys))
        make_chunk_fn(a, iterations).lower(state).compile()
    return time.perf_counter() - t0


def compile_times(args: SideBySideArgs, algo: str, log=print) -> dict:
    """Start-up seconds, ``--repeats`` times in an alternating order: JaxMARL's one program
    (lower and compile, init included) and ours at the default variant, in sequence and
    concurrent; medians."""
    import jax

    import envs

    module, config, k1, _ = _baseline_config(args, algo)
    env = envs.make(f"smax:{args.map}")
    overrides = our_variants(algo, config)["default"]
    rng = jax.random.PRNGKey(0)
    programs = {
        "jaxmarl": lambda: _compile(jax.jit(jaxmarl_train_fn(module, algo, config, k1)), rng)[1],
        "ours, in sequence": lambda: _ours_ready_s(algo, env, overrides, args.iterations, False),
        "ours, as the runner starts": lambda: _ours_ready_s(algo, env, overrides, args.iterations, True),
    }
    programs["jaxmarl"]()  # a first compile in the process is slower than the next ones
    names = list(programs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(programs[name]())
        log(f"  repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "algo": algo,
        "map": args.map,
        "jaxmarl_updates": k1,
        "ours_overrides": overrides,
        "times": times,
        "median_s": med,
        "ratio_to_jaxmarl": {k: v / med["jaxmarl"] for k, v in med.items() if k != "jaxmarl"},
    }


def compile_table(results: list[dict]) -> str:
    lines = [
        "| algorithm | JaxMARL: compile, init included | ours: init, then compile | ours: as the runner starts |",
        "|---|---|---|---|",
    ]
    for r in results:
        m, x = r["median_s"], r["ratio_to_jaxmarl"]
        lines.append(
            f"| {r['algo']} | {m['jaxmarl']:.1f} s | {m['ours, in sequence']:.1f} s (x{x['ours, in sequence']:.2f}) "
            f"| {m['ours, as the runner starts']:.1f} s (x{x['ours, as the runner starts']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def _decomposition(per_update_s: dict, epochs: int) -> dict:
    """Seconds per update split into the learner's epochs and the rest (rollout, returns,
    bookkeeping), from the per-update times at ``epochs`` epochs and at 1 epoch."""
    full, one = per_update_s[epochs], per_update_s[1]
    per_epoch = (full - one) / max(epochs - 1, 1)
    return {
        "per_update_s": full,
        "per_update_s_1_epoch": one,
        "per_epoch_s": per_epoch,
        "learner_s": epochs * per_epoch,
        "rest_s": one - per_epoch,
    }


def _baseline_config(args: SideBySideArgs, algo: str):
    """(module, config, k1, k2) of the baseline at its defaults on ``--map``."""
    module, config = load_baseline(args.baselines, algo)
    config["MAP_NAME"] = args.map
    config["WANDB_MODE"] = "disabled"
    if algo == "qmix":
        config["TEST_DURING_TRAINING"] = False
    if args.smoke:
        config = smoke_config(algo, config)
    k1 = args.k1 or (min(QMIX_FIRST_LEARNING_UPDATE, max(1, config["BUFFER_BATCH_SIZE"])) if algo == "qmix" else 1)
    k2 = args.k2 or k1 + (4 if algo == "qmix" else 2)
    if k2 <= k1:
        raise ConfigError("k2", k2, f"must be > k1={k1}")
    return module, config, k1, k2


def _interleaved(jm: dict, ours: dict, k1: int, k2: int) -> list[tuple[str, object]]:
    """One repeat's order: both random rollouts, then JaxMARL's programs and ours alternately
    (an entry's program is None for ours and the random rollouts)."""
    jm_items = [(f"{n} k{k}", programs[k]) for n, programs in jm.items() for k in (k1, k2)]
    ours_items = [(name, None) for name in ours]
    order: list[tuple[str, object]] = [("random ours", None), ("random JaxMARL", None)]
    for i in range(max(len(jm_items), len(ours_items))):
        order += jm_items[i : i + 1] + ours_items[i : i + 1]
    return order


def _time_repeats(args, order, ours, randoms, rng, log) -> dict[str, list[float]]:
    carries = {name: carry for name, (_, carry) in randoms.items()}
    times: dict[str, list[float]] = {name: [] for name, _ in order}
    for r in range(args.repeats):
        # odd repeats run the order backwards: a drift of the machine's speed within a
        # repeat then favours no program over the others
        for name, program in order if r % 2 == 0 else order[::-1]:
            if name in randoms:
                # a random rollout is short (a fraction of a second): the median of several calls
                calls = []
                for _ in range(args.random_calls):
                    carries[name], dt = _call(randoms[name][0], carries[name])
                    calls.append(dt)
                t = statistics.median(calls)
            elif program is not None:
                _, t = _call(program, rng)
            else:
                o = ours[name]
                (o["state"], o["metrics"], _), t = _call(o["fn"], o["state"])
            times[name].append(t)
        log(f"  repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return times


def _random_rates(times: dict, steps: int) -> dict:
    """Random-policy env steps/s of both stacks (medians) and their ratio: the median over
    repeats of each repeat's ratio, as the two rollouts of a repeat run back to back and
    the machine's speed drifts between repeats more than within one."""
    ours = steps / statistics.median(times["random ours"])
    jm = steps / statistics.median(times["random JaxMARL"])
    paired = statistics.median(j / o for o, j in zip(times["random ours"], times["random JaxMARL"], strict=True))
    return {"random_ours_sps": ours, "random_jaxmarl_sps": jm, "wrapped_env_ratio": paired}


def hlo_cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program: flops, transcendentals and bytes accessed
    (a loop's body counted once), a measure of its work that no timing noise reaches."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {k: float(cost.get(k, 0.0)) for k in ("flops", "transcendentals", "bytes accessed")}


def bench_one(args: SideBySideArgs, algo: str, log=print) -> dict:
    import jax

    import envs
    from experiments.bench import random_rollout

    module, config, k1, k2 = _baseline_config(args, algo)
    E, T = int(config["NUM_ENVS"]), int(config["NUM_STEPS"])
    decompose = args.decompose and algo != "qmix"
    log(f"[{algo}] smax:{args.map}: {E} envs x {T} steps; JaxMARL programs of {k1} and {k2} updates")

    env = envs.make(f"smax:{args.map}")
    randoms = {
        "random ours": random_rollout(env, E, T),
        "random JaxMARL": jaxmarl_random_rollout(args.map, config["ENV_KWARGS"], E, T),
    }
    rng = jax.random.PRNGKey(0)
    result: dict = {"algo": algo, "map": args.map, "num_envs": E, "num_steps": T, "k1": k1, "k2": k2}
    result["jaxmarl_config"] = {k: v for k, v in config.items() if k not in ("ENTITY", "PROJECT")}
    result["random_hlo_cost"] = {name: hlo_cost(fn) for name, (fn, _) in randoms.items()}
    if args.env_only:
        times = _time_repeats(args, [("random ours", None), ("random JaxMARL", None)], {}, randoms, rng, log)
        return {**result, **_random_rates(times, E * T), "times": times, "ours": {}}
    jm_configs = {"jaxmarl": config, **({"jaxmarl, 1 epoch": {**config, "UPDATE_EPOCHS": 1}} if decompose else {})}
    jm = {}
    for name, c in jm_configs.items():
        jm[name], compile_s = _jaxmarl_programs(module, algo, c, k1, k2, rng)
        if name == "jaxmarl":
            result.update({f"jaxmarl_compile_s_k{k}": s for k, s in compile_s.items()})
    variants = our_variants(algo, config)
    if decompose:
        equal_name = next(n for n in variants if n.startswith("equal"))
        variants[ONE_EPOCH] = {**variants[equal_name], "update_epochs": 1}
    ours = {}
    for name, overrides in variants.items():
        o = ours[name] = _our_program(args, algo, env, overrides)
        log(
            f"  ours {name}: ready in {o['ready_s']:.1f} s (compile {o['compile_s']:.1f} s), "
            f"{o['warmup_calls']} warm-up calls"
        )

    times = _time_repeats(args, _interleaved(jm, ours, k1, k2), ours, randoms, rng, log)
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = E * T
    rates = _random_rates(times, steps)
    rand_ours, rand_jm = rates["random_ours_sps"], rates["random_jaxmarl_sps"]

    def jm_per_update(name):
        diffs = [b - a for a, b in zip(times[f"{name} k{k1}"], times[f"{name} k{k2}"], strict=True)]
        return max(statistics.median(diffs), 1e-9) / (k2 - k1)

    jm_sps = steps / jm_per_update("jaxmarl")
    result.update(
        times=times,
        **rates,
        jaxmarl_sps=jm_sps,
        jaxmarl_pct_of_random=100 * jm_sps / rand_jm,
        ours={},
    )
    for name, o in ours.items():
        if name == ONE_EPOCH:  # only for the decomposition: not the baseline's work
            continue
        sps = args.iterations * steps / med[name]
        result["ours"][name] = {
            "sps": sps,
            "ratio_to_jaxmarl": sps / jm_sps,
            "pct_of_random": 100 * sps / rand_ours,
            **{k: o[k] for k in ("compile_s", "ready_s", "warmup_calls", "overrides")},
            "last_metrics": {k: float(jax.numpy.mean(v)) for k, v in o["metrics"].items()},
        }
    if decompose:
        epochs = int(config["UPDATE_EPOCHS"])
        per_update = {epochs: med[equal_name] / args.iterations, 1: med[ONE_EPOCH] / args.iterations}
        result["decomposition"] = {
            "epochs": epochs,
            "jaxmarl": _decomposition({epochs: jm_per_update("jaxmarl"), 1: jm_per_update("jaxmarl, 1 epoch")}, epochs),
            "ours (equal)": _decomposition(per_update, epochs),
        }
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| algorithm | JaxMARL steps/s (% of its random) | ours | steps/s (% of our random) | x JaxMARL "
        "| compile s, JaxMARL / ours (init and compile) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "jaxmarl_sps" not in r:  # --env-only
            continue
        jm_compile = r[f"jaxmarl_compile_s_k{r['k1']}"]
        for i, (name, o) in enumerate(r["ours"].items()):
            jm = f"{r['jaxmarl_sps']:,.0f} ({r['jaxmarl_pct_of_random']:.1f}%)" if i == 0 else ""
            lines.append(
                f"| {r['algo'] if i == 0 else ''} | {jm} | {name} | {o['sps']:,.0f} "
                f"({o['pct_of_random']:.1f}%) | x{o['ratio_to_jaxmarl']:.2f} "
                f"| {jm_compile:.1f} / {o['ready_s']:.1f} |"
            )
    lines += [
        "",
        "| algorithm's window | random policy, JaxMARL env | random policy, our wrapped env | x raw (paired) |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['algo']} | {r['random_jaxmarl_sps']:,.0f} | {r['random_ours_sps']:,.0f} "
            f"| x{r['wrapped_env_ratio']:.2f} |"
        )
    lines += _pairs_table(
        results,
        "random_hlo_cost",
        ("random JaxMARL", "random ours"),
        "| algorithm's window | random rollout's XLA cost, JaxMARL / ours: flops | transcendentals | bytes |",
        {"flops": ".3g", "transcendentals": ".3g", "bytes accessed": ".3g"},
    )
    lines += _pairs_table(
        results,
        "decomposition",
        ("jaxmarl", "ours (equal)"),
        "| algorithm | s per update, JaxMARL / ours (equal) | learner epochs | rest (rollout, returns) |",
        {"per_update_s": ".2f", "learner_s": ".2f", "rest_s": ".2f"},
    )
    return "\n".join(lines) + "\n"


def _pairs_table(results: list[dict], key: str, sides: tuple[str, str], header: str, fields: dict) -> list[str]:
    """A table of "JaxMARL / ours" cells, one row per result holding ``key``: ``r[key][side][field]``
    for each field (formatted as ``fields[field]``); nothing when no result holds it."""
    rows = [r for r in results if key in r]
    if not rows:
        return []
    lines = ["", header, "|---" * (len(fields) + 1) + "|"]
    for r in rows:
        j, o = (r[key][side] for side in sides)
        cells = " | ".join(f"{j[f]:{fmt}} / {o[f]:{fmt}}" for f, fmt in fields.items())
        lines.append(f"| {r['algo']} | {cells} |")
    return lines


def main(args: SideBySideArgs) -> list[dict]:
    import jax

    check_args(args)
    results = []
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    run_one, render = (compile_times, compile_table) if args.compile_only else (bench_one, table)
    for algo in args.algos:
        results.append(run_one(args, algo, log=lambda *a: print(*a, flush=True)))
        payload = {
            "command": "python -m experiments.bench_jaxmarl " + " ".join(sys.argv[1:]),
            "args": dataclasses.asdict(args),
            "machine": machine,
            "results": results,
        }
        # after each algorithm, atomically: a later failure or kill loses nothing written
        atomic_write(args.out, json.dumps(payload, indent=2, default=str))
        atomic_write(os.path.splitext(args.out)[0] + ".md", render(results))
    print(render(results))
    return results


@entry(compile_cache=False)
def cli(argv=None) -> int:
    main(tyro.cli(SideBySideArgs, args=argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
