import json
import os

import jax
import numpy as np
import pytest

from experiments import train as cli
from marl.config import ConfigError

TINY = [
    "--num-envs",
    "4",
    "--num-steps",
    "8",
    "--num-minibatches",
    "2",
    "--update-epochs",
    "1",
    "--hidden",
    "16",
    "--no-progress",
]


def test_cli_end_to_end_and_resume(tmp_path, capsys):
    args = [
        "--algo",
        "ippo",
        "--env",
        "mpe:simple_spread",
        "--total-steps",
        "64",
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        "tiny",
        "--eval-episodes",
        "2",
        "--chunk-iterations",
        "1",
        "--checkpoint-every",
        "1",
    ] + TINY
    assert cli.main(args) == 0
    run = tmp_path / "tiny"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["env_steps"] == 64
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert os.listdir(run / "checkpoints")
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) >= {"return", "win_rate"} and len(ev["return"]) == 1
    out = capsys.readouterr().out
    assert str(run) in out and "greedy evaluation" in out
    # resuming a finished run is a no-op that keeps what was written
    assert cli.main(args + ["--resume"]) == 0
    assert (run / "metrics.jsonl").read_text().splitlines() == lines
    # resuming with another config would not be an exact resume: rejected, naming the field
    assert cli.main(args + ["--resume", "--lr", "0.1"]) == 2
    assert "config.lr" in capsys.readouterr().err
    # re-evaluating the run from its checkpoint with more episodes
    from experiments import evaluate

    assert evaluate.main([str(run), "--episodes", "3"]) == 0
    ev3 = json.loads((run / "eval_3.json").read_text())
    assert ev3["episodes_per_seed"] == 3 and ev3["env_steps"] == 64 and len(ev3["win_rate"]) == 1
    assert evaluate.main([str(tmp_path / "missing")]) == 2
    assert "run_dir" in capsys.readouterr().err


def test_scientific_notation_and_config_file(tmp_path):
    cfg = tmp_path / "best.json"
    cfg.write_text(json.dumps({"lr": 0.00123, "regularizer": {"kind": "kl", "coef": 0.1, "reference": "uniform"}}))
    run, config = cli.parse(["--algo", "mappo", "--total-steps", "2e6", "--config-file", str(cfg)])
    assert config.total_steps == 2_000_000 and config.lr == 0.00123 and config.regularizer.kind == "kl"
    assert run.algo == "mappo"


@pytest.mark.parametrize(
    "argv,field",
    [
        (["--algo", "nope"], "algo"),
        (["--env", "smax:nope"], "env"),
        (["--num-envs", "0"], "num_envs"),
        (["--num-envs", "6", "--num-minibatches", "4"], "num_envs"),
        (["--total-steps", "100"], "total_steps"),
        (["--num-seeds", "0"], "num_seeds"),
        (["--lr", "-1"], "lr"),
    ],
)
def test_cli_rejects_bad_input_naming_the_field(argv, field, capsys):
    try:
        rc = cli.main(argv + ["--no-progress"])
    except SystemExit as e:  # tyro reports errors raised while building the config
        rc = e.code
    assert rc == 2
    err = capsys.readouterr()
    text = err.err + err.out
    assert field in text.replace("-", "_"), text


def test_cli_rejects_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("")
    argv = ["--algo", "ippo", "--env", "mpe:simple_spread", "--total-steps", "32", "--runs-dir", str(blocker)] + TINY
    assert cli.main(argv) == 2
    assert "run_dir" in capsys.readouterr().err


def test_env_kwargs_are_used_recorded_and_restored(tmp_path, capsys):
    args = [
        "--algo",
        "ippo",
        "--env",
        "swarm:aggregation",
        "--env-kwargs",
        '{"num_agents": 5, "max_steps": 8}',
        "--total-steps",
        "32",
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        "swarm",
        "--eval-episodes",
        "0",
        "--no-recurrent",
        "--no-agent-ids",
    ] + TINY
    assert cli.main(args) == 0
    desc = json.loads((tmp_path / "swarm" / "run.json").read_text())
    assert desc["env_kwargs"] == {"num_agents": 5, "max_steps": 8}
    from experiments import evaluate

    algo, _ = evaluate.load_run(str(tmp_path / "swarm"))
    assert algo.env.spec.num_agents == 5 and algo.env.spec.max_steps == 8
    # the trained parameters run at another N (no agent ids: they do not depend on N)
    assert evaluate.main([str(tmp_path / "swarm"), "--episodes", "2", "--env-kwargs", '{"num_agents": 7}']) == 0
    ev = json.loads((tmp_path / "swarm" / "eval_2_num_agents7.json").read_text())
    assert ev["env_kwargs"] == {"num_agents": 7, "max_steps": 8} and np.isfinite(ev["return"]).all()
    assert evaluate.main([str(tmp_path / "swarm"), "--env-kwargs", '{"num_agentz": 7}']) == 2
    assert "env_kwargs.num_agentz" in capsys.readouterr().err
    # parameters whose shapes do not fit the changed environment are refused, naming env_kwargs
    algo, desc, params, _ = evaluate.restore_params(str(tmp_path / "swarm"))
    with pytest.raises(ConfigError, match="env_kwargs"):
        evaluate.with_env(algo, desc, jax.tree.map(lambda x: x[..., :1], params), {"num_agents": 7})
    # the transfer table: one row per N, returns finite, table and plot written
    from experiments import swarm_transfer

    res = swarm_transfer.transfer(
        swarm_transfer.TransferArgs(
            run_dirs=(str(tmp_path / "swarm"),),
            num_agents=(3, 9),
            episodes=2,
            large_n=9,
            large_env_kwargs='{"cell_capacity": 4}',
            out=str(tmp_path / "tr"),
        )
    )
    assert [r["n"] for r in res["rows"]] == [3, 9] and all(np.isfinite(r["mean"]) for r in res["rows"])
    assert [r["episodes_per_seed"] for r in res["rows"]] == [2, 1]  # N >= large_n: 1 episode, seeds in sequence
    assert "cell_capacity" not in res["rows"][0]["env_kwargs"] and res["rows"][1]["env_kwargs"]["cell_capacity"] == 4
    seq = evaluate.evaluate_run(str(tmp_path / "swarm"), 2, env_kwargs={"num_agents": 9}, sequential_seeds=True)
    vm = evaluate.evaluate_run(str(tmp_path / "swarm"), 2, env_kwargs={"num_agents": 9})
    np.testing.assert_allclose(seq["return"], vm["return"], rtol=1e-5)
    assert "N=9" in (tmp_path / "tr" / "transfer.md").read_text()
    assert (tmp_path / "tr" / "transfer_swarm-aggregation.png").stat().st_size > 1000
    assert swarm_transfer.main([str(tmp_path / "swarm"), "--num-agents", "1"]) == 2
    assert "num_agents" in capsys.readouterr().err
    assert swarm_transfer.main([str(tmp_path / "swarm"), "--large-env-kwargs", '{"num_agents": 5}']) == 2
    assert "large_env_kwargs" in capsys.readouterr().err
    # resuming with other environment arguments is not an exact resume
    other = [a if a != '{"num_agents": 5, "max_steps": 8}' else '{"num_agents": 6, "max_steps": 8}' for a in args]
    assert cli.main(other + ["--resume"]) == 2
    assert "env_kwargs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ("{num_agents: 5}", "env_kwargs"),
        ("[5]", "env_kwargs"),
        ('{"num_agentz": 5}', "env_kwargs.num_agentz"),
        ('{"num_agents": 1}', "env_kwargs.num_agents"),
    ],
)
def test_env_kwargs_errors_name_the_field(kwargs, field, capsys):
    rc = cli.main(["--algo", "ippo", "--env", "swarm:aggregation", "--env-kwargs", kwargs, "--no-progress"])
    assert rc == 2
    assert field in capsys.readouterr().err


def test_commands_keep_compiled_programs_in_a_cache_the_next_run_loads(tmp_path):
    """Without JAX_COMPILATION_CACHE_DIR, a command compiles into $XDG_CACHE_HOME/marl/...;
    the same command with another seed loads every program from there (no new entry)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny programs count too
    base = ["--algo", "ippo", "--env", "mpe:simple_spread", "--total-steps", "64", "--runs-dir", str(tmp_path)]
    base += ["--eval-episodes", "1"] + TINY
    entries = []
    for seed in ("0", "1"):
        cmd = [sys.executable, "-m", "experiments.train", *base, "--seed", seed, "--run-name", f"s{seed}"]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)
        cache = os.path.join(env["XDG_CACHE_HOME"], "marl", "jax-compilation")
        entries.append(sorted(os.listdir(cache)))
    assert entries[0], "the first run wrote no compiled program"
    assert entries[1] == entries[0], "the second run compiled a program the first one had cached"
