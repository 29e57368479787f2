"""The environment registry: ``envs.make("smax:3m")``.

Names:
  ``smax:<map>``     JaxMARL SMAX against its heuristic enemy (maps: JaxMARL's scenarios);
                     ``reward="damage"|"damage_alive"``: misspecified proxy rewards
  ``smax-mt:<set>``  multi-task SMAX (``envs/multitask_smax.py``): ``surComb3``, ``surComb4``,
                     ``surComb3-reflect``, ``surComb4-reflect``, or ``custom`` with ``tasks=[...]``
  ``mpe:<task>``     JaxMARL MPE, e.g. ``mpe:simple_spread`` (-> ``MPE_simple_spread_v3``)
  ``swarm:<task>``   Kuramoto, Vicsek and Aggregation swarms (``envs/swarms.py``), e.g.
                     ``envs.make("swarm:vicsek", num_agents=1000)``
  ``adv:<task>``     two-player zero-sum control (``envs/adversarial.py``): ``pendulum``,
                     ``cartpole``, ``pointmass``, and with mujoco-mjx ``cheetah``, ``hopper``
                     (``envs/mjx_adversarial.py``); ``adv:<task>-noadv`` = protagonist alone
  ``<jaxmarl id>``   any JaxMARL environment id, e.g. ``MPE_simple_reference_v3``
  anything added with :func:`register`.

Every environment returned is wrapped in ``EpisodeStats(AutoReset(env))`` unless
``wrap=False``. A custom environment only needs ``spec``, ``reset`` and ``step`` as
in ``marl.types.Environment``; register a factory for it and every algorithm runs
on it.
"""

from __future__ import annotations

import difflib
from typing import Callable

from envs.wrappers import AutoReset, EpisodeStats

_FACTORIES: dict[str, Callable] = {}
_PREFIXES: dict[str, tuple[Callable, Callable]] = {}


def register(name: str, factory: Callable) -> None:
    """Register ``factory(**kwargs) -> env`` under ``name`` (an exact name)."""
    _FACTORIES[name] = factory


def register_prefix(prefix: str, factory: Callable, names: Callable) -> None:
    """Register a family ``prefix:<rest>``; ``names()`` lists the valid ``rest`` values."""
    _PREFIXES[prefix] = (factory, names)


def registered() -> list[str]:
    out = sorted(_FACTORIES)
    for prefix, (_, names) in sorted(_PREFIXES.items()):
        out += [f"{prefix}:{n}" for n in names()]
    return out


class UnknownEnvError(ValueError):
    pass


def make(name: str, wrap: bool = True, **kwargs):
    """Build a registered environment by name; raises UnknownEnvError listing the options."""
    if name in _FACTORIES:
        env = _FACTORIES[name](**kwargs)
    elif ":" in name and name.split(":", 1)[0] in _PREFIXES:
        prefix, rest = name.split(":", 1)
        factory, names = _PREFIXES[prefix]
        if rest not in names():
            _unknown(name)
        env = factory(rest, **kwargs)
    else:
        _unknown(name)
    return EpisodeStats(AutoReset(env)) if wrap else env


def _unknown(name: str):
    options = registered()
    close = difflib.get_close_matches(name, options, n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise UnknownEnvError(f"invalid env={name!r}: unknown environment.{hint} Registered: {', '.join(options)}")


# ----------------------------------------------------------------------------- JaxMARL


def check_jaxmarl_kwargs(env, kwargs: dict, name: str) -> None:
    """JaxMARL constructors pass ``**kwargs`` down their class chain and some swallow
    unknown names silently: refuse a keyword that no ``__init__`` in the chain names."""
    import inspect

    from marl.config import ConfigError

    accepted = set()
    for cls in type(env).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        accepted |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    else:
        return  # the chain ends in a catch-all: nothing to check against
    for k, v in kwargs.items():
        if k not in accepted:
            raise ConfigError(k, v, f"not accepted by environment {name!r}; allowed: {sorted(accepted)}")


_MPE_IDS = {
    "simple": "MPE_simple_v3",
    "simple_spread": "MPE_simple_spread_v3",
    "simple_reference": "MPE_simple_reference_v3",
    "simple_speaker_listener": "MPE_simple_speaker_listener_v4",
    # agents that differ in observation size or action count: padded by the adapter
    "simple_tag": "MPE_simple_tag_v3",
    "simple_adversary": "MPE_simple_adversary_v3",
    "simple_push": "MPE_simple_push_v3",
    "simple_crypto": "MPE_simple_crypto_v3",
    "world_comm": "MPE_simple_world_comm_v3",
}
_MPE_DEFAULTS = {"world_comm": {"action_type": "Discrete"}}  # JaxMARL's default there is continuous


def _make_mpe(task: str, **kwargs):
    import jaxmarl

    from envs.jaxmarl_adapter import JaxMARLAdapter
    from marl.action_costs import mpe_cost

    kwargs = {**_MPE_DEFAULTS.get(task, {}), **kwargs}
    env = jaxmarl.make(_MPE_IDS[task], **kwargs)
    check_jaxmarl_kwargs(env, kwargs, f"mpe:{task}")
    counts = {getattr(env.action_space(a), "n", None) for a in env.agents}
    # The compass geometry holds for MPE's 5 movement actions only (not for
    # communication, continuous actions, or agents whose actions differ).
    cost = mpe_cost(5) if counts == {5} else None
    return JaxMARLAdapter(env, f"mpe:{task}", action_cost=cost)


_NEEDS_BRAX = {"ant_4x2", "halfcheetah_6x1", "hopper_3x1", "humanoid_9|8", "walker2d_2x3"}


def _make_jaxmarl_id(env_id: str):
    def factory(**kwargs):
        import jaxmarl

        from envs.jaxmarl_adapter import JaxMARLAdapter

        env = jaxmarl.make(env_id, **kwargs)
        check_jaxmarl_kwargs(env, kwargs, env_id)
        return JaxMARLAdapter(env, env_id)

    return factory


def _swarm_tasks() -> list[str]:
    from envs.swarms import TASKS

    return list(TASKS)


def _make_swarm(task: str, **kwargs):
    from envs.swarms import make_swarm

    return make_swarm(task, **kwargs)


def _make_adversarial(task: str, **kwargs):
    from envs import mjx_adversarial
    from envs.adversarial import make as make_adversarial

    if task in mjx_adversarial.names():  # adv:cheetah, adv:hopper (MJX)
        return mjx_adversarial.make(task, **kwargs)
    return make_adversarial(task, **kwargs)


def _adversarial_names() -> list[str]:
    from envs import mjx_adversarial
    from envs.adversarial import names

    return sorted(names() + mjx_adversarial.names())


def _make_smax_mt(task_set: str, **kwargs):
    from envs.multitask_smax import make_multitask_smax

    return make_multitask_smax(task_set, **kwargs)


def _smax_mt_names() -> list[str]:
    from envs.multitask_smax import names

    return names()


def _register_builtin():
    from envs.smax import make_smax, smax_maps

    register_prefix("smax", make_smax, smax_maps)
    register_prefix("smax-mt", _make_smax_mt, _smax_mt_names)  # envs/multitask_smax.py
    register_prefix("swarm", _make_swarm, _swarm_tasks)  # swarm:kuramoto | vicsek | aggregation
    register_prefix("mpe", _make_mpe, lambda: sorted(_MPE_IDS))
    register_prefix("adv", _make_adversarial, _adversarial_names)  # envs/adversarial.py
    from jaxmarl.registration import registered_envs

    for env_id in registered_envs:
        if env_id in ("SMAX", "HeuristicEnemySMAX", "LearnedPolicyEnemySMAX"):
            continue  # SMAX needs a scenario: use smax:<map>
        if env_id.startswith("JaxRobotarium") or env_id in _NEEDS_BRAX:
            continue  # need packages outside the pinned stack
        register(env_id, _make_jaxmarl_id(env_id))


_register_builtin()
