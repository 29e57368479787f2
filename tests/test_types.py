"""Typed contracts in marl.types: hyperparameter tuples built by field name."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from marl.types import hparams
from tests.conftest import tiny_algo


class _HP(NamedTuple):
    lr: jax.Array
    gamma: jax.Array


def test_hparams_by_field_name_as_float32_arrays():
    hp = hparams(_HP, gamma=0.9, lr=3)  # keyword order does not matter
    assert float(hp.lr) == 3.0 and float(hp.gamma) == pytest.approx(0.9)
    assert hp.lr.dtype == jnp.float32 and hp.gamma.dtype == jnp.float32


def test_hparams_names_missing_and_unknown_fields():
    with pytest.raises(TypeError, match=r"missing fields \['gamma'\]"):
        hparams(_HP, lr=1.0)
    with pytest.raises(TypeError, match=r"unknown fields \['lam'\]"):
        hparams(_HP, lr=1.0, gamma=0.9, lam=0.5)


@pytest.mark.parametrize("name, env_name", [("ippo", "smax:3m"), ("qmix", "smax:3m"), ("sac", "adv:cartpole")])
def test_learners_fill_hparams_from_the_config_fields_of_the_same_name(name, env_name):
    algo = tiny_algo(name, env_name)
    hp = jax.eval_shape(algo.init, jax.random.PRNGKey(0)).hparams
    assert all(leaf.dtype == jnp.float32 and leaf.shape == () for leaf in hp)
    values = jax.jit(lambda k: algo.init(k).hparams)(jax.random.PRNGKey(0))
    for field in hp._fields:
        if getattr(algo.config, field, None) is not None:
            assert float(getattr(values, field)) == pytest.approx(float(getattr(algo.config, field))), field


@pytest.mark.parametrize(
    "env_name, kwargs",
    [
        ("smax:3m", {}),
        ("mpe:simple_tag", {}),
        ("swarm:vicsek", {"num_agents": 8}),
        ("adv:cartpole", {}),
        ("smax-mt:surComb3", {}),
    ],
)
def test_timesteps_match_their_spec_after_reset_and_step(env_name, kwargs):
    import envs
    from marl.types import assert_timestep

    env = envs.make(env_name, **kwargs)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    state, ts = jax.vmap(env.reset)(keys)
    assert_timestep(ts, env.spec, batch=(3,))
    spec = env.spec
    if spec.discrete:
        action = jnp.zeros((3, spec.num_agents), jnp.int32)
    else:
        action = jnp.zeros((3, spec.num_agents, spec.action_dim), jnp.float32)
    _, ts = jax.vmap(env.step)(keys, state, action)
    assert_timestep(ts, env.spec, batch=(3,))
    with pytest.raises(AssertionError, match="Timestep.obs"):
        assert_timestep(ts._replace(obs=ts.obs[..., :-1]), env.spec, batch=(3,))


@pytest.mark.parametrize(
    "name, env_name",
    [("mappo", "smax:3m"), ("qmix", "smax:3m"), ("sac", "adv:pendulum"), ("dec_pomfc", "swarm:kuramoto")],
)
def test_train_states_keep_their_shapes_and_the_seed_axis_through_updates(name, env_name):
    """Fixed shapes: every leaf of the seed-batched train state has the seed axis first, and
    two updates give back a state of the same tree, shapes and dtypes (chex)."""
    import chex

    from marl.runner import init_states, make_chunk_fn

    kwargs = {"num_agents": 6} if env_name.startswith("swarm") else {}
    algo = tiny_algo(name, env_name) if not kwargs else _swarm_algo(name, env_name, kwargs)
    state = init_states(algo, jax.random.split(jax.random.PRNGKey(0), 2))
    chex.assert_tree_shape_prefix(state, (2,))
    before = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)  # the chunk donates state
    after, metrics, finite = make_chunk_fn(algo, 2)(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(after, before)
    assert bool(finite.all()) and all(v.shape[:2] == (2, 2) for v in jax.tree.leaves(metrics))


def _swarm_algo(name, env_name, env_kwargs):
    import algos
    import envs
    from tests.conftest import tiny_overrides

    return algos.make(name, envs.make(env_name, **env_kwargs), **tiny_overrides(name))


@pytest.mark.parametrize(
    "name, env_name, kwargs",
    [("ippo", "smax:3m", {}), ("mappo", "smax:3m", {}), ("mappo", "swarm:aggregation", {"num_agents": 4})],
)
def test_ppo_transitions_match_their_declared_fields(name, env_name, kwargs):
    """A rollout step's Transition has the shapes and dtypes ``ppo.transition_fields``
    declares, for discrete and continuous actions; a wrong one is named."""
    import algos
    import envs
    from algos import ppo
    from marl.types import assert_fields
    from tests.conftest import tiny_overrides

    env = envs.make(env_name, **kwargs)
    algo = algos.make(name, env, **tiny_overrides(name))
    m = ppo.make_parts(env.spec, algo.config, name)
    state = ppo.init(m, env, None, jax.random.PRNGKey(0))
    _, tr = ppo.rollout_step(m, env, state, jax.random.PRNGKey(1))
    fields = ppo.transition_fields(m)
    assert set(fields) == set(tr._fields) - {"info"}
    assert_fields(tr, fields, (algo.config.num_envs,), "ppo.Transition")
    with pytest.raises(AssertionError, match="ppo.Transition.action"):
        assert_fields(
            tr._replace(action=tr.action.astype(jnp.float32)[..., None, None]),
            fields,
            (algo.config.num_envs,),
            "ppo.Transition",
        )


def test_sac_replay_holds_transitions_of_the_declared_fields():
    """After an update, SAC's replay buffer rows have ``sac.transition_fields``' shapes."""
    from algos import sac
    from marl.types import assert_fields

    algo = tiny_algo("sac", "adv:pendulum")
    state, _ = jax.jit(algo.update)(algo.init(jax.random.PRNGKey(0)))
    data = state.buffer.data
    assert_fields(data, sac.transition_fields(algo.env.spec), (data.obs.shape[0],), "sac.Transition")


def test_dec_pomfc_transitions_match_their_declared_fields():
    """Dec-POMFC's upper-level Transition (mean field, decision rule) has the shapes and
    dtypes ``dec_pomfc.transition_fields`` declares."""
    from algos import dec_pomfc
    from marl.types import assert_fields

    algo = _swarm_algo("dec_pomfc", "swarm:kuramoto", {"num_agents": 6})
    m = algo.update.args[0]  # the Learner the update is bound to
    state = algo.init(jax.random.PRNGKey(0))
    _, tr = dec_pomfc.rollout_step(m, state, jax.random.PRNGKey(1))
    fields = dec_pomfc.transition_fields(m)
    assert set(fields) == set(tr._fields) - {"info"}
    assert_fields(tr, fields, (algo.config.num_envs,), "dec_pomfc.Transition")
