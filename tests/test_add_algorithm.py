"""The "add an algorithm" guide, end to end: a toy algorithm defined in the tests alone
(tests/toy_algo.py) and registered with one line trains through the CLI, sweeps and is
evaluated from its checkpoint."""

import json

import pytest

import algos


@pytest.fixture
def toy_registered():
    algos.register("toy_pg", "tests.toy_algo", "ToyConfig")  # the one registry line
    yield "toy_pg"
    algos._REGISTRY.pop("toy_pg", None)  # keep the other tests' registry as it was


def test_a_registered_toy_algorithm_trains_sweeps_and_evaluates(toy_registered, tmp_path, capsys):
    from experiments import evaluate, sweep, train

    common = ["--algo", toy_registered, "--env", "mpe:simple_spread", "--no-progress"]
    # the CLI's flags come from the config dataclass
    assert (
        train.main(
            common
            + [
                "--total-steps",
                "256",
                "--lr",
                "0.1",
                "--num-seeds",
                "2",
                "--runs-dir",
                str(tmp_path),
                "--run-name",
                "toy",
                "--eval-episodes",
                "2",
            ]
        )
        == 0
    )
    run = tmp_path / "toy"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 4 and lines[-1]["env_steps"] == 256 and "loss" in lines[-1]
    desc = json.loads((run / "run.json").read_text())
    assert desc["algo"] == toy_registered and desc["config"]["lr"] == 0.1
    # evaluation from the checkpoint
    assert evaluate.main([str(run), "--episodes", "3"]) == 0
    assert json.loads((run / "eval_3.json").read_text())["episodes_per_seed"] == 3
    # a sweep over its HParams (lr, gamma): two configurations x two seeds in one program
    assert (
        sweep.main(
            common
            + [
                "--grid",
                '{"lr": [0.01, 0.1]}',
                "--num-seeds",
                "2",
                "--total-steps",
                "128",
                "--runs-dir",
                str(tmp_path),
                "--name",
                "sw",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "sw" / "results.json").read_text())
    rows = results["rows"] if isinstance(results, dict) else results
    assert sorted(r["hparams"]["lr"] for r in rows) == pytest.approx([0.01, 0.1])
    assert (tmp_path / "sw" / "best_config.json").exists()
    # bad input names the field before anything compiles
    assert train.main(common + ["--lr", "-1", "--runs-dir", str(tmp_path)]) == 2
    assert "lr" in capsys.readouterr().err
