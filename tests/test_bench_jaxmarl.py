"""The side-by-side benchmark against JaxMARL's baseline scripts (experiments/bench_jaxmarl.py)
reads the scripts where they lie, at their own configs, and sizes ours to match."""

import json
import os

import pytest

from experiments import bench_jaxmarl as sb
from marl.config import ConfigError

BASELINES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "jaxmarl_baselines")
needs_baselines = pytest.mark.skipif(not os.path.isdir(BASELINES), reason="JaxMARL baseline scripts not beside")


@needs_baselines
@pytest.mark.parametrize("algo", ["ippo", "mappo", "qmix"])
def test_baseline_configs_load_and_our_variants_match_their_sizes(algo):
    if algo == "qmix" and not sb._importable("flashbax"):
        with pytest.raises(ConfigError, match="flashbax"):
            sb.check_args(sb.SideBySideArgs(baselines=BASELINES, algos=("qmix",)))
        return
    module, config = sb.load_baseline(BASELINES, algo)
    assert callable(module.make_train)
    assert "${" not in json.dumps(config)  # interpolations removed
    variants = sb.our_variants(algo, config)
    assert len(variants) == 2
    for overrides in variants.values():
        assert overrides["num_envs"] == config["NUM_ENVS"] and overrides["num_steps"] == config["NUM_STEPS"]
    if algo == "qmix":
        base, equal = variants.values()
        assert base["hidden"] == config["HIDDEN_SIZE"] and base["train_steps"] == config["NUM_EPOCHS"]
        assert equal["full_unroll"] and not base.get("full_unroll", False)
    else:
        base, equal = variants.values()
        assert base["hidden"] == config["GRU_HIDDEN_DIM"] and base["update_epochs"] == config["UPDATE_EPOCHS"]
        assert equal["bootstrap_truncation"] is False


def test_files_are_found_anywhere_below_the_folder(tmp_path):
    (tmp_path / "IPPO" / "config").mkdir(parents=True)
    (tmp_path / "IPPO" / "config" / "ippo_rnn_smax.yaml").write_text("NUM_ENVS: 4\n")
    assert sb.find_file(str(tmp_path), "ippo_rnn_smax.yaml").endswith("IPPO/config/ippo_rnn_smax.yaml")
    with pytest.raises(ConfigError, match="ippo_rnn_smax.py"):
        sb.find_file(str(tmp_path), "ippo_rnn_smax.py")


def test_table_reports_ratios_from_one_window():
    r = {
        "algo": "ippo",
        "k1": 1,
        "jaxmarl_compile_s_k1": 50.0,
        "jaxmarl_sps": 1000.0,
        "jaxmarl_pct_of_random": 10.0,
        "random_jaxmarl_sps": 10000.0,
        "random_ours_sps": 8000.0,
        "wrapped_env_ratio": 0.8,
        "ours": {"default": {"sps": 800.0, "pct_of_random": 10.0, "ratio_to_jaxmarl": 0.8, "ready_s": 40.0}},
    }
    text = sb.table([r])
    assert "| ippo | 1,000 (10.0%) | default | 800 (10.0%) | x0.80 | 50.0 / 40.0 |" in text
    assert "| ippo | 10,000 | 8,000 | x0.80 |" in text


def test_decomposition_splits_an_update_into_epochs_and_the_rest():
    # 4 epochs take 2.2 s per update, 1 epoch 0.7 s: each epoch 0.5 s, the rest 0.2 s
    d = sb._decomposition({4: 2.2, 1: 0.7}, 4)
    assert d["per_epoch_s"] == pytest.approx(0.5) and d["learner_s"] == pytest.approx(2.0)
    assert d["rest_s"] == pytest.approx(0.2) and d["per_update_s"] == 2.2
    r = {
        "algo": "ippo",
        "k1": 1,
        "jaxmarl_compile_s_k1": 1.0,
        "jaxmarl_sps": 1.0,
        "jaxmarl_pct_of_random": 1.0,
        "random_jaxmarl_sps": 1.0,
        "random_ours_sps": 1.0,
        "wrapped_env_ratio": 1.0,
        "ours": {},
        "decomposition": {"jaxmarl": d, "ours (equal)": sb._decomposition({4: 2.8, 1: 1.0}, 4)},
    }
    assert "| ippo | 2.20 / 2.80 | 2.00 / 2.40 | 0.20 / 0.40 |" in sb.table([r])


def test_repeats_interleave_jaxmarl_and_ours():
    jm = {"jaxmarl": {1: "p1", 3: "p3"}, "jaxmarl, 1 epoch": {1: "q1", 3: "q3"}}
    ours = {"default": {}, "equal": {}, sb.ONE_EPOCH: {}}
    names = [n for n, _ in sb._interleaved(jm, ours, 1, 3)]
    assert names == [
        "random ours",
        "random JaxMARL",
        "jaxmarl k1",
        "default",
        "jaxmarl k3",
        "equal",
        "jaxmarl, 1 epoch k1",
        sb.ONE_EPOCH,
        "jaxmarl, 1 epoch k3",
    ]


@pytest.mark.slow  # test_qlearning checks the chunked unroll's values and gradients alone
def test_full_unroll_gives_the_same_loss():
    """QMIX's equal-work variant unrolls every slot; the extra slots are masked, so the
    learning is the same."""
    import jax
    import numpy as np

    import algos
    import envs
    from marl.runner import init_states, make_chunk_fn

    env = envs.make("mpe:simple_spread")
    out = []
    for full in (False, True):
        a = algos.make(
            "qmix",
            env,
            num_envs=2,
            num_steps=8,
            total_steps=64,
            batch_size=2,
            buffer_size=8,
            hidden=8,
            mixing_embed=4,
            hypernet_embed=4,
            train_steps=1,
            full_unroll=full,
        )
        state = init_states(a, jax.random.split(jax.random.PRNGKey(0), 1))
        state, m, _ = make_chunk_fn(a, 4)(state)
        out.append((jax.tree.leaves(state.params), m))
    for x, y in zip(out[0][0], out[1][0], strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert float(out[0][1]["learning"].max()) == 1.0  # the comparison covered learning updates


@needs_baselines
@pytest.mark.slow
def test_smoke_run_writes_json_and_table(tmp_path):
    out = tmp_path / "sbs.json"
    args = sb.SideBySideArgs(baselines=BASELINES, algos=("ippo",), smoke=True, repeats=1, decompose=True, out=str(out))
    sb.main(args)
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert r["jaxmarl_sps"] > 0 and r["random_jaxmarl_sps"] > 0
    assert all(o["sps"] > 0 for o in r["ours"].values())
    assert sb.ONE_EPOCH not in r["ours"] and r["decomposition"]["epochs"] == 2  # the smoke config
    assert "x JaxMARL" in (tmp_path / "sbs.md").read_text()


@needs_baselines
def test_env_only_times_both_env_stacks_and_no_learner(tmp_path):
    out = tmp_path / "env.json"
    args = sb.SideBySideArgs(
        baselines=BASELINES, algos=("ippo",), smoke=True, repeats=2, random_calls=2, env_only=True, out=str(out)
    )
    sb.main(args)
    (r,) = json.loads(out.read_text())["results"]
    assert r["random_ours_sps"] > 0 and r["random_jaxmarl_sps"] > 0
    t = r["times"]
    paired = sorted(j / o for o, j in zip(t["random ours"], t["random JaxMARL"], strict=True))
    assert r["wrapped_env_ratio"] == pytest.approx(sum(paired) / 2)  # the median of 2 repeats' ratios
    assert "jaxmarl_sps" not in r and r["ours"] == {} and len(r["times"]["random ours"]) == 2
    assert "| ippo |" in (tmp_path / "env.md").read_text()
    for stack in ("random ours", "random JaxMARL"):
        assert r["random_hlo_cost"][stack]["flops"] > 0 and r["random_hlo_cost"][stack]["bytes accessed"] > 0


@pytest.mark.parametrize("env_name", ["smax:3m", "adv:pendulum"])
def test_random_rollout_carries_what_a_policy_reads(env_name):
    """The random-policy baseline's loop carries the env state, the observations and the
    available actions (SMAX masks some), and advances its key."""
    import numpy as np

    import envs
    from experiments.bench import random_rollout

    env = envs.make(env_name)
    fn, carry = random_rollout(env, 4, 6)
    key, state, obs, avail = fn(carry)
    assert obs.shape == (4, env.spec.num_agents, env.spec.obs_dim) and np.isfinite(np.asarray(obs)).all()
    assert not np.array_equal(np.asarray(key), np.asarray(carry[0]))
    if env.spec.num_actions is not None:
        assert avail.shape == (4, env.spec.num_agents, env.spec.num_actions) and not np.asarray(avail).all()


def test_odd_repeats_run_the_order_backwards(monkeypatch):
    calls = []
    monkeypatch.setattr(sb, "_call", lambda fn, arg: calls.append(fn) or (arg, 1.0))
    args = sb.SideBySideArgs(baselines=".", repeats=3, random_calls=2)
    order = [("random ours", None), ("random JaxMARL", None), ("jaxmarl k1", "p1")]
    randoms = {"random ours": ("ro", 0), "random JaxMARL": ("rj", 0)}
    times = sb._time_repeats(args, order, {}, randoms, 0, log=lambda *a: None)
    forward = ["ro", "ro", "rj", "rj", "p1"]
    assert calls == forward + forward[::-1] + forward
    assert all(v == [1.0, 1.0, 1.0] for v in times.values())


@needs_baselines
def test_compile_only_times_start_up_of_both(tmp_path):
    out = tmp_path / "compile.json"
    args = sb.SideBySideArgs(
        baselines=BASELINES, algos=("ippo",), smoke=True, repeats=2, compile_only=True, out=str(out)
    )
    sb.main(args)
    (r,) = json.loads(out.read_text())["results"]
    for name in ("jaxmarl", "ours, in sequence", "ours, as the runner starts"):
        assert len(r["times"][name]) == 2 and min(r["times"][name]) > 0
    assert r["ratio_to_jaxmarl"]["ours, in sequence"] == pytest.approx(
        r["median_s"]["ours, in sequence"] / r["median_s"]["jaxmarl"]
    )
    assert "| ippo |" in (tmp_path / "compile.md").read_text()
    with pytest.raises(ConfigError, match="compile_only"):
        sb.check_args(sb.SideBySideArgs(baselines=BASELINES, compile_only=True, env_only=True))
