"""Sweeps: rows of one program equal single runs; the best config trains from the CLI."""

import json
import os

import numpy as np
import pytest

from experiments import sweep as sweep_cli
from experiments import train as train_cli
from marl import sweep
from marl.config import ConfigError
from marl.logging import read_metrics
from marl.runner import train
from marl.stats import final_scores
from tests.conftest import tiny_algo

# small enough to compile quickly; 4 iterations of 8 steps end one 25-step episode per env
ENV = "mpe:simple_spread"
SIZES = {"num_envs": 2, "num_steps": 8, "hidden": 16, "update_epochs": 1, "num_minibatches": 1, "recurrent": False}
TOTAL = 4 * 2 * 8
GRID = {"lr": [0.001, 0.02], "ent_coef": [0.0]}
SEEDS, SEED = 2, 3


def _algo():
    return tiny_algo("ippo", ENV, total_steps=TOTAL, **SIZES)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep CLI run once; shared by the tests below."""
    runs = tmp_path_factory.mktemp("sweeps")
    args = sweep_cli.parse(
        [
            "--algo",
            "ippo",
            "--env",
            ENV,
            "--grid",
            json.dumps(GRID),
            "--num-seeds",
            str(SEEDS),
            "--seed",
            str(SEED),
            "--total-steps",
            str(TOTAL),
            "--overrides",
            json.dumps(SIZES),
            "--runs-dir",
            str(runs),
            "--name",
            "s",
            "--no-progress",
            "--chunk-iterations",
            "4",
            "--final-fraction",
            "0.25",
        ]
    )
    return sweep_cli.run(args)


def test_sweep_rows_equal_single_runs(swept):
    res = swept["result"]
    algo = _algo()
    assert (
        algo.config
        == sweep_cli.build(
            sweep_cli.SweepArgs(
                algo="ippo", env=ENV, grid=json.dumps(GRID), total_steps=TOTAL, overrides=json.dumps(SIZES)
            )
        )[2]
    )
    assert len(res.configs) == 2 and res.metrics["return"].shape == (2, SEEDS, 4)
    for c, values in enumerate(res.configs):
        single = train(
            algo, num_iterations=4, num_seeds=SEEDS, seed=SEED, hparams=values, chunk_iterations=4, progress=False
        )
        for k, v in single.metrics.items():
            np.testing.assert_allclose(res.metrics[k][c], v, rtol=1e-5, atol=1e-6, err_msg=f"config {c}, {k}")
    # the two learning rates really give different runs
    assert not np.allclose(res.metrics["policy_loss"][0], res.metrics["policy_loss"][1])
    # the table's numbers are each seed's final-window score
    for row in swept["rows"]:
        c = row["config"]
        expect = final_scores(res.metrics["return"][c], res.metrics["episodes"][c], 0.25)
        np.testing.assert_allclose(row["return"]["per_seed"], expect)
        assert row["return"]["mean"] == pytest.approx(expect.mean())
    assert [r["rank"] for r in swept["rows"]] == [1, 2]
    means = [r["return"]["mean"] for r in swept["rows"]]
    assert means[0] >= means[1]  # win rate is 0 on MPE, so return decides
    text = open(os.path.join(swept["dir"], "results.md")).read()
    assert f"{swept['rows'][0]['return']['mean']:.4f}" in text
    saved = json.load(open(os.path.join(swept["dir"], "results.json")))
    assert saved["best"]["hparams"] == swept["rows"][0]["hparams"]


def test_best_config_trains_from_the_cli_with_the_swept_values(swept, tmp_path):
    best = swept["rows"][0]
    cfg = json.load(open(swept["best_config"]))
    assert cfg["lr"] == best["hparams"]["lr"] and cfg["hidden"] == 16 and cfg["total_steps"] == TOTAL
    rc = train_cli.main(
        [
            "--algo",
            "ippo",
            "--env",
            ENV,
            "--config-file",
            swept["best_config"],
            "--num-seeds",
            str(SEEDS),
            "--seed",
            str(SEED),
            "--runs-dir",
            str(tmp_path),
            "--run-name",
            "best",
            "--eval-episodes",
            "0",
            "--no-progress",
            "--chunk-iterations",
            "4",
        ]
    )
    assert rc == 0
    run = json.load(open(tmp_path / "best" / "run.json"))
    for k, v in best["hparams"].items():
        assert run["config"][k] == pytest.approx(v), k
    # the CLI run reproduces the sweep's rows of that configuration
    recs = read_metrics(str(tmp_path / "best"))
    got = np.array([[r["return"] for r in recs if r["seed"] == s] for s in range(SEEDS)])
    np.testing.assert_allclose(got, swept["result"].metrics["return"][best["config"]], rtol=1e-5, atol=1e-6)


def test_sweep_run_dir_records_the_row_layout(swept):
    info = json.load(open(os.path.join(swept["dir"], "run", "run.json")))
    assert info["num_seeds"] == 2 * SEEDS
    assert info["sweep"]["configs"] == sweep.grid(GRID) and info["sweep"]["num_seeds"] == SEEDS


def test_grid_and_random_search():
    g = sweep.grid({"lr": [1, 2], "gamma": [0.9, 0.99, 0.999]})
    assert len(g) == 6 and g[0] == {"lr": 1.0, "gamma": 0.9} and g[-1] == {"lr": 2.0, "gamma": 0.999}
    r = sweep.random_search(
        {"lr": {"log_uniform": [1e-4, 1e-2]}, "gamma": {"uniform": [0.9, 0.99]}, "ent_coef": [0.0, 0.01]}, 50, seed=1
    )
    assert len(r) == 50 and r == sweep.random_search(
        {"lr": {"log_uniform": [1e-4, 1e-2]}, "gamma": {"uniform": [0.9, 0.99]}, "ent_coef": [0.0, 0.01]}, 50, seed=1
    )
    lrs = np.array([c["lr"] for c in r])
    assert (lrs >= 1e-4).all() and (lrs <= 1e-2).all() and (lrs < 1e-3).any() and (lrs > 1e-3).any()
    assert {c["ent_coef"] for c in r} == {0.0, 0.01}
    keys, hp = sweep.row_layout([g[0], g[3]], 3, seed=5)
    assert keys.shape == (6, 2) and np.array_equal(keys[0], keys[3]) and not np.array_equal(keys[0], keys[1])
    np.testing.assert_allclose(hp["lr"], [1, 1, 1, 2, 2, 2])


@pytest.mark.parametrize(
    "configs, field, text",
    [
        ([], "sweep", "at least one"),
        ([{"nope": 1.0}], "sweep.nope", "allowed: ['lr', 'clip_eps'"),
        ([{"lr": -0.001}], "lr", "positive"),
        ([{"lr": 0.0}], "lr", "positive"),
        ([{"gamma": 1.5}], "gamma", "[0.0, 1.0]"),
        ([{"lr": float("nan")}], "sweep.lr", "finite"),
        ([{"lr": 0.1}, {"gamma": 0.9}], "sweep[1]", "same hyperparameters"),
        ([{"reg_coef": 0.1}], "sweep.reg_coef", "regularizer.kind='none'"),
    ],
)
def test_bad_sweeps_name_field_value_and_allowed(configs, field, text):
    with pytest.raises(ConfigError) as e:
        sweep.validate(_algo(), configs)
    assert e.value.field == field and text in str(e.value)


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: sweep.grid({}), "grid"),
        (lambda: sweep.grid({"lr": []}), "grid.lr"),
        (lambda: sweep.random_search({"lr": {"log_uniform": [0.0, 1.0]}}, 4), "random.lr.log_uniform"),
        (lambda: sweep.random_search({"lr": {"normal": [0.0, 1.0]}}, 4), "random.lr"),
        (lambda: sweep.random_search({"lr": {"uniform": [1.0, 0.5]}}, 4), "random.lr.uniform"),
        (lambda: sweep.random_search({"lr": [0.1]}, 0), "num_configs"),
    ],
)
def test_bad_search_spaces(call, field):
    with pytest.raises(ConfigError) as e:
        call()
    assert e.value.field == field


def test_cli_rejects_bad_input_before_compiling(capsys, tmp_path):
    base = ["--algo", "ippo", "--env", ENV, "--runs-dir", str(tmp_path), "--overrides", json.dumps(SIZES)]
    assert sweep_cli.main(base + ["--grid", '{"learning_rate": [0.1]}']) == 2
    assert "sweep.learning_rate" in capsys.readouterr().err
    assert sweep_cli.main(base + ["--grid", '{"lr": [0.1, -1]}']) == 2
    assert "invalid lr=-1.0" in capsys.readouterr().err
    assert sweep_cli.main(base + ["--grid", "{}"]) == 2
    assert sweep_cli.main(base) == 2  # neither --grid nor --random
    assert "exactly one" in capsys.readouterr().err
    assert sweep_cli.main(["--algo", "nope", "--grid", '{"lr": [0.1]}']) == 2
    assert not os.listdir(tmp_path)  # nothing was written
