"""A trained run as the regularizer's reference, SMAX's proxy rewards, and the
fine-tuning study's statistics."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import algos
import envs
from experiments import wpr_finetune as study
from marl import regularizers as reg
from marl.checkpoint import Checkpointer
from marl.config import ConfigError
from marl.reference import load_run_params
from marl.runner import init_states

TINY = {"num_envs": 2, "num_steps": 8, "num_minibatches": 1, "update_epochs": 1, "hidden": 8, "total_steps": 16}


def _write_run(path, algo_name, env, num_seeds=2, **config):
    """A run directory as the runner writes it (run.json + an orbax checkpoint of the
    seed-batched train state), here of freshly initialized states."""
    algo = algos.make(algo_name, env, algos.default_config(algo_name, **{**TINY, **config}))
    state = init_states(algo, jax.random.split(jax.random.PRNGKey(7), num_seeds))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump(
            {"algo": algo_name, "env": env.spec.name, "num_seeds": num_seeds, "seed": 7, "config": {**TINY, **config}},
            f,
        )
    ckpt = Checkpointer(os.path.join(path, "checkpoints"))
    ckpt.save(3, state)
    ckpt.close()
    return state


@pytest.fixture(scope="module")
def smax():
    return envs.make("smax:3m")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smax):
    path = str(tmp_path_factory.mktemp("ref") / "ref_run")
    state = _write_run(path, "mappo", smax)
    return path, state


def _rc(path, **kw):
    return reg.RegularizerConfig(kind="kl", coef=0.1, reference="run", reference_run=path, **kw)


def test_load_run_params_takes_one_seed_and_refuses_mismatches(run_dir, smax, tmp_path):
    path, state = run_dir
    algo = algos.make("mappo", smax, algos.default_config("mappo", **TINY))
    like = jax.eval_shape(algo.init, jax.random.PRNGKey(0)).params
    got = load_run_params(path, like, env_name="smax:3m", seed_index=1)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b[1])
    with pytest.raises(ConfigError, match="was trained on 'smax:3m'") as e:
        load_run_params(path, like, env_name="smax:8m")
    assert e.value.field == "regularizer.reference_run"
    with pytest.raises(ConfigError) as e:
        load_run_params(path, like, seed_index=2)
    assert e.value.field == "regularizer.reference_seed"
    wider = jax.eval_shape(
        algos.make("mappo", smax, algos.default_config("mappo", **{**TINY, "hidden": 16})).init, jax.random.PRNGKey(0)
    ).params
    with pytest.raises(ConfigError, match="do not fit") as e:
        load_run_params(path, wider)
    assert e.value.field == "regularizer.reference_run"
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"algo": "mappo", "env": "smax:3m", "num_seeds": 1}))
    with pytest.raises(ConfigError, match="checkpoints"):
        load_run_params(str(empty), like)


def test_algorithms_refuse_a_mismatched_reference_run_before_compiling(run_dir, smax):
    path, _ = run_dir
    # IPPO's network (shared torso) differs from the MAPPO run's
    with pytest.raises(ConfigError, match="do not fit") as e:
        algos.make("ippo", smax, algos.default_config("ippo", **TINY, regularizer=_rc(path)))
    assert e.value.field == "regularizer.reference_run"
    with pytest.raises(ConfigError, match="was trained on") as e:
        algos.make("mappo", envs.make("smax:2s3z"), algos.default_config("mappo", **TINY, regularizer=_rc(path)))
    assert e.value.field == "regularizer.reference_run"
    with pytest.raises(ConfigError) as e:
        algos.make("mappo", smax, algos.default_config("mappo", **TINY, regularizer=_rc(path, reference_seed=5)))
    assert e.value.field == "regularizer.reference_seed"
    with pytest.raises(ConfigError, match="supported by") as e:
        algos.make("qmix", smax, algos.default_config("qmix", regularizer=_rc(path)))
    assert e.value.field == "regularizer.reference"


def test_reference_run_is_frozen_in_the_train_state_and_fine_tuning_starts_from_it(run_dir, smax):
    path, state = run_dir
    cfg = algos.default_config("mappo", **TINY, regularizer=_rc(path, reference_seed=1, init_from_reference=True))
    algo = algos.make("mappo", envs.make("smax:3m", reward="damage_alive"), cfg)
    s0 = jax.jit(jax.vmap(algo.init))(jax.random.split(jax.random.PRNGKey(0), 3))  # 3 rows share the reference
    for p, r, ref in zip(
        jax.tree.leaves(s0.params), jax.tree.leaves(s0.ref_params.params), jax.tree.leaves(state.params), strict=True
    ):
        np.testing.assert_array_equal(p, np.broadcast_to(ref[1], p.shape))
        np.testing.assert_array_equal(r, p)
    update = jax.jit(jax.vmap(algo.update))
    s1, m1 = update(s0)
    # the first rollout is collected by the reference itself, from the same hidden state
    np.testing.assert_allclose(m1["reference_kl"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m1["reward_penalty"], 0.0, atol=1e-6)
    # the reference's hidden state is carried across rollouts (equal to the policy's here)
    np.testing.assert_allclose(s1.ref_params.h, s1.h, atol=1e-5)
    assert float(jnp.abs(s1.ref_params.h).max()) > 0
    s2, m2 = update(s1)
    assert (np.asarray(m2["reference_kl"]) > 0).all()  # the policy has moved, the reference has not
    for r0, r2 in zip(jax.tree.leaves(s0.ref_params.params), jax.tree.leaves(s2.ref_params.params), strict=True):
        np.testing.assert_array_equal(r0, r2)


# ------------------------------------------------------------------ SMAX proxy rewards


def test_smax_proxy_rewards_change_only_the_reward():
    default, alive = envs.make("smax:3m"), envs.make("smax:3m", reward="damage_alive", alive_bonus=0.05)
    damage = envs.make("smax:3m", reward="damage")
    assert default.spec.max_return == 2.0 and damage.spec.max_return == 1.0
    assert alive.spec.max_return == pytest.approx(1.0 + 0.05 * alive.spec.max_steps)
    assert alive.spec.name == default.spec.name == "smax:3m"

    def episode(env, key):
        def step(carry, k):
            st, ts = carry
            k_a, k_e = jax.random.split(k)
            logits = jnp.where(ts.avail_actions, 0.0, -1e9)
            act = jax.random.categorical(k_a, logits)
            st, ts = env.step(k_e, st, act)
            alive_frac = st.inner.inner.state.unit_alive[:3].mean()
            return (st, ts), (ts.reward, ts.info["won"], ts.done, alive_frac)

        carry = env.reset(jax.random.PRNGKey(0))
        return jax.lax.scan(step, carry, jax.random.split(key, 120))[1]

    key = jax.random.PRNGKey(3)
    r0, won0, done0, alive0 = jax.jit(lambda k: episode(default, k))(key)
    r1, won1, done1, _ = jax.jit(lambda k: episode(alive, k))(key)
    np.testing.assert_array_equal(won0, won1)
    np.testing.assert_array_equal(done0, done1)
    # proxy = JaxMARL's reward - the win bonus + 0.05 x the fraction of allies alive
    # (read after auto-reset, so exact only on steps that do not end an episode)
    base = r0 - 1.0 * won0[:, None]
    live = ~np.asarray(done0)
    np.testing.assert_allclose(r1[live], (base + 0.05 * alive0[:, None])[live], atol=1e-5)
    d = np.asarray(r1 - base)[~live]
    assert bool(done0.any()) and (d >= -1e-6).all() and (d <= 0.05 + 1e-6).all()
    assert float(alive0[live].min()) < 1.0  # some allies died: the bonus is a fraction


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"reward": "win_only"}, "env_kwargs.reward"),
        ({"reward": "damage", "won_battle_bonus": 2.0}, "env_kwargs.won_battle_bonus"),
        ({"alive_bonus": 0.1}, "env_kwargs.alive_bonus"),
        ({"reward": "damage_alive", "alive_bonus": -1.0}, "env_kwargs.alive_bonus"),
    ],
)
def test_smax_proxy_reward_errors_name_the_field(kwargs, field):
    from experiments.train import make_env

    with pytest.raises(ConfigError) as e:
        make_env("smax:3m", kwargs)
    assert e.value.field == field


# ------------------------------------------------------------------ study statistics


def test_matched_pairs_and_iqm_difference():
    def arm(program, kl, wins, **hp):
        return {"program": program, "hparams": hp, "arm": f"{program}{hp}", "reference_kl": kl, "eval_win_rate": wins}

    arms = [
        arm("kl", 0.5, [0.5, 0.5, 0.5], reg_coef=0.0),
        arm("kl", 0.10, [0.2, 0.3, 0.4], reg_coef=0.01),
        arm("kl", 0.02, [0.6, 0.6, 0.6], reg_coef=0.1),
        arm("wasserstein", 0.105, [0.5, 0.6, 0.7], reg_epsilon=0.2, reg_coef=0.01),
        arm("wasserstein", 0.3, [0.1, 0.1, 0.1], reg_epsilon=0.2, reg_coef=0.003),
    ]
    pairs = study.matched_pairs(arms, 0.10, 500, 0.95)
    assert len(pairs) == 1  # the 0.3 arm has no KL partner; coefficient 0 is not a KL arm
    p = pairs[0]
    assert p["kl_kl"] == 0.10 and p["kl_w"] == 0.105
    assert p["iqm_diff"] == pytest.approx(0.3)
    assert p["ci_low"] <= 0.3 <= p["ci_high"] and p["ci_low"] > 0
    d, lo, hi = study.diff_ci([1.0, 1.0], [0.0, 0.0], 100, 0.9)
    assert (d, lo, hi) == (1.0, 1.0, 1.0)


def test_study_programs_and_their_validation(run_dir):
    path, _ = run_dir
    args = study.FinetuneArgs(reference_run=path, coefs=(0.01, 0.1), epsilons=(0.05, 0.2))
    progs = study.program_configs(args)
    assert list(progs) == ["kl", "wasserstein_eps0.05", "wasserstein_eps0.2"]
    cfg, sweep = progs["kl"]
    assert sweep == [{"reg_coef": 0.0}, {"reg_coef": 0.01}, {"reg_coef": 0.1}]  # coefficient 0 = "none"
    r = cfg.regularizer
    assert (r.kind, r.reference, r.reference_run, r.init_from_reference, r.mode) == ("kl", "run", path, True, "penalty")
    cfg, sweep = progs["wasserstein_eps0.2"]
    assert cfg.regularizer.epsilon == 0.2 and sweep[-1] == {"reg_epsilon": 0.2, "reg_coef": 0.1}
    assert study.arm_label("kl", {"reg_coef": 0.0}) == "none"
    for bad, field in (
        ({"programs": ("kl", "tv")}, "programs"),
        ({"coefs": (0.0,)}, "coefs"),
        ({"reference_run": "/nonexistent"}, "regularizer.reference_run"),
    ):
        with pytest.raises(ConfigError) as e:
            study.program_configs(study.FinetuneArgs(**{"reference_run": path, **bad}))
        assert e.value.field == field
