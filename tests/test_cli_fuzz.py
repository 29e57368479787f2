"""Invalid input to every command line: exit code 2, an error naming the field and the
value, and nothing compiled. The training program is patched to fail if reached, so a
check that comes after compiling fails the test."""

import contextlib
import importlib
import io
import json
import os
import re
import shutil

import pytest

import marl.evaluation
import marl.runner
from experiments.cli import entry

TRAIN = ["--no-progress", "--eval-episodes", "0"]
PPO_TINY = [
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
    "--total-steps",
    "64",
]


def _cases():
    """(module, argv, field): ``field`` must appear in the error (tyro names the flag)."""
    t = "experiments.train"
    c = [
        (t, ["--algo", "nope"], "algo"),
        (t, ["--env", "smax:nope"], "env"),
        (t, ["--env", "nope"], "env"),
        (t, ["--env", "MPE_simple_tag_v3", "--env-kwargs", '{"bogus": 1}'], "env_kwargs.bogus"),
        (t, ["--num-envs", "0"], "num_envs"),
        (t, ["--num-envs", "-3"], "num_envs"),
        (t, ["--num-envs", "1e9", "--total-steps", "1e13"], "config"),
        (t, ["--num-envs", "6", "--num-minibatches", "4"], "num_envs"),
        (t, ["--num-envs", "abc"], "--num-envs"),
        (t, ["--num-seeds", "100000000"], "num_seeds"),
        (t, ["--num-seeds", "0"], "num_seeds"),
        (t, ["--num-seeds", "-2"], "num_seeds"),
        (t, ["--seed", "-1"], "seed"),
        (t, ["--seed", "99999999999999999999999"], "seed"),
        (t, ["--seed", "4294967296"], "seed"),
        (t, ["--total-steps", "0"], "total_steps"),
        (t, ["--total-steps", "10"], "total_steps"),
        (t, ["--total-steps", "-5"], "total_steps"),
        (t, ["--lr", "-1"], "lr"),
        (t, ["--lr", "0"], "lr"),
        (t, ["--lr", "nan"], "lr"),
        (t, ["--gamma", "1.5"], "gamma"),
        (t, ["--gamma", "-0.1"], "gamma"),
        (t, ["--gae-lambda", "2"], "gae_lambda"),
        (t, ["--clip-eps", "0"], "clip_eps"),
        (t, ["--ent-coef", "-1"], "ent_coef"),
        (t, ["--vf-coef", "-1"], "vf_coef"),
        (t, ["--max-grad-norm", "0"], "max_grad_norm"),
        (t, ["--update-epochs", "0"], "update_epochs"),
        (t, ["--num-minibatches", "0"], "num_minibatches"),
        (t, ["--num-steps", "0"], "num_steps"),
        (t, ["--hidden", "0"], "hidden"),
        (t, ["--critic", "bogus"], "critic"),
        (t, ["--regularizer.kind", "bogus"], "regularizer.kind"),
        (t, ["--regularizer.coef", "-1"], "regularizer.coef"),
        (t, ["--regularizer.epsilon", "0"], "regularizer.epsilon"),
        (t, ["--regularizer.iterations", "0"], "regularizer.iterations"),
        (t, ["--regularizer.reference", "bogus"], "regularizer.reference"),
        (t, ["--regularizer.mode", "bogus"], "regularizer.mode"),
        (t, ["--kind", "kl"], "--kind"),  # the flat form is gone: nested fields are dotted
        (t, ["--chunk-iterations", "0"], "chunk_iterations"),
        (t, ["--checkpoint-every", "0"], "checkpoint_every"),
        (t, ["--eval-episodes", "-1"], "eval_episodes"),
        (t, ["--max-loss", "0"], "max_loss"),
        (t, ["--max-loss", "-5"], "max_loss"),
        (t, ["--env-kwargs", "not json"], "env_kwargs"),
        (t, ["--env-kwargs", "[1, 2]"], "env_kwargs"),
        (t, ["--env-kwargs", '{"bogus": 1}'], "env_kwargs.bogus"),
        (t, ["--config-file", "/nonexistent/c.json"], "config_file"),
        (t, ["--config-file", "{CORRUPT}"], "config_file"),
        (t, ["--config-file", "{UNKNOWN}"], "config_file.nope"),
        (t, ["--run-name", "a/b"], "run_name"),
        (t, ["--run-name", ".."], "run_name"),
        (t, ["--runs-dir", "/proc/nope"], "run_dir"),
        (t, ["--runs-dir", "{FILE}"], "run_dir"),
        (t, ["--resume", "--run-name", "missing"], "resume"),
        (t, ["--resume", "--resume-or-start"], "resume_or_start"),
        (t, ["--run-name", "{RUN}"], "run_dir"),  # holds checkpoints, no --resume
        (t, ["--run-name", "{RUN}", "--chunk-iterations", "1", "--resume", "--lr", "0.1"], "config.lr"),
        (t, ["--run-name", "{RUN}", "--chunk-iterations", "1", "--resume", "--num-seeds", "2"], "num_seeds"),
        (t, ["--run-name", "{RUN}", "--chunk-iterations", "1", "--resume", "--seed", "3"], "seed"),
        (t, ["--bogus-flag", "1"], "--bogus-flag"),
        (t, ["--algo", "qmix", "--buffer-size", "0"], "buffer_size"),
        (t, ["--algo", "qmix", "--buffer-size", "100000000"], "config"),
        (t, ["--algo", "qmix", "--batch-size", "0"], "batch_size"),
        (t, ["--algo", "qmix", "--epsilon-start", "2"], "epsilon_start"),
        (t, ["--algo", "qmix", "--epsilon-finish", "-1"], "epsilon_finish"),
        (t, ["--algo", "qmix", "--td-lambda", "2"], "td_lambda"),
        (t, ["--algo", "qmix", "--mixer", "bogus"], "mixer"),
        (t, ["--algo", "qmix", "--optimizer", "bogus"], "optimizer"),
        (t, ["--algo", "qmix", "--target-update-episodes", "0"], "target_update_episodes"),
        (t, ["--algo", "qmix", "--train-steps", "0"], "train_steps"),
        (t, ["--algo", "emu", "--capacity", "0"], "capacity"),
        (t, ["--algo", "emu", "--delta", "-1"], "delta"),
        (t, ["--algo", "emu", "--hit-metric", "bogus"], "hit_metric"),
        (t, ["--algo", "trama", "--env", "smax-mt:surComb3", "--n-clusters", "0"], "n_clusters"),
        (t, ["--algo", "trama", "--env", "smax-mt:surComb3", "--n-codes", "0"], "n_codes"),
        (t, ["--algo", "sac", "--env", "adv:pendulum", "--tau", "2"], "tau"),
        (t, ["--algo", "sac", "--env", "adv:pendulum", "--batch-size", "0"], "batch_size"),
        (t, ["--algo", "sac", "--env", "smax:3m"], "env"),
        (t, ["--algo", "qarl", "--env", "adv:cartpole", "--kl-bound", "-1"], "kl_bound"),
        (t, ["--algo", "qarl", "--env", "adv:cartpole", "--curriculum", "bogus"], "curriculum"),
        (t, ["--algo", "dec_pomfc", "--env", "swarm:vicsek", "--representation", "bogus"], "representation"),
        (t, ["--algo", "dec_pomfc", "--env", "swarm:vicsek", "--env-kwargs", '{"num_agents": 0}'], "num_agents"),
    ]
    s = "experiments.sweep"
    grid = ["--grid", '{"lr": [0.001, 0.002]}']
    c += [
        (s, ["--algo", "nope"] + grid, "algo"),
        (s, ["--env", "nope"] + grid, "env"),
        (s, [], "grid/random"),
        (s, grid + ["--random", '{"lr": {"uniform": [0, 1]}}'], "grid/random"),
        (s, ["--grid", "not json"], "grid"),
        (s, ["--grid", '{"nope": [1]}'], "nope"),
        (s, ["--grid", '{"lr": []}'], "lr"),
        (s, ["--grid", '{"lr": ["a"]}'], "lr"),
        (s, ["--random", '{"lr": {"bogus": [1, 2]}}'], "lr"),
        (s, grid + ["--num-configs", "0"], "num_configs"),
        (s, grid + ["--num-seeds", "0"], "num_seeds"),
        (s, grid + ["--final-fraction", "2"], "final_fraction"),
        (s, grid + ["--final-fraction", "0"], "final_fraction"),
        (s, grid + ["--metric", "bogus"], "metric"),
        (s, grid + ["--seed", "-1"], "seed"),
        (s, grid + ["--sweep-seed", "-1"], "sweep_seed"),
        (s, grid + ["--name", "a/b"], "name"),
        (s, grid + ["--overrides", "x"], "overrides"),
        (s, grid + ["--overrides", '{"nope": 1}'], "overrides.nope"),
        (s, grid + ["--overrides", '{"total_steps": 64}', "--total-steps", "64"], "overrides.total_steps"),
        (s, grid + ["--total-steps", "0"], "total_steps"),
        (s, grid + ["--chunk-iterations", "0"], "chunk_iterations"),
        (s, grid + ["--checkpoint-every", "0"], "checkpoint_every"),
        (s, grid + ["--num-seeds", "100000000"], "num_seeds"),
        (s, grid + ["--env-kwargs", "x"], "env_kwargs"),
    ]
    e = "experiments.evaluate"
    c += [
        (e, ["/nonexistent/run"], "run_dir"),
        (e, ["{EMPTY}"], "run_dir"),
        (e, ["{RUN_DIR}", "--step", "999"], "step"),
        (e, ["{RUN_DIR}", "--step", "0"], "step"),
        (e, ["{RUN_DIR}", "--episodes", "0"], "episodes"),
        (e, ["{RUN_DIR}", "--seed", "-1"], "seed"),
        (e, ["{RUN_DIR}", "--env-kwargs", "x"], "env_kwargs"),
        (e, ["{RUN_DIR}", "--env-kwargs", '{"bogus": 1}'], "env_kwargs.bogus"),
        (e, [], "run-dir (required)"),
    ]
    r = "experiments.report"
    c += [
        (r, [], "dirs"),
        (r, ["/nonexistent"], "dirs"),
        (r, ["{EMPTY}"], "dirs"),
        (r, ["{RUNS}", "--metric", "bogus"], "metric"),
        (r, ["{RUNS}", "--out", "{FILE}"], "out"),
        (r, ["{RUNS}", "--final-fraction", "0"], "final_fraction"),
        (r, ["{RUNS}", "--confidence", "1"], "confidence"),
        (r, ["{RUNS}", "--bootstrap-samples", "0"], "bootstrap_samples"),
        (r, ["{RUNS}", "--group-by", "bogus"], "group_by"),
    ]
    b, bs, sb = "experiments.bench", "experiments.bench_swarms", "experiments.bench_jaxmarl"
    c += [
        (b, ["--env", "nope"], "env"),
        (b, ["--algos", "nope"], "algo"),
        (b, ["--repeats", "0"], "repeats"),
        (b, ["--iterations", "0"], "iterations"),
        (b, ["--num-envs", "0"], "num_envs"),
        (b, ["--overrides", "x"], "overrides"),
        (b, ["--trama-clustered"], "trama_clustered"),
        (bs, ["--tasks", "nope"], "task"),
        (bs, ["--sizes", "0"], "num_agents"),
        ("experiments.swarm_references", ["--episodes", "0"], "episodes"),
        (sb, ["--baselines", "/nonexistent"], "baselines"),
        (sb, ["--baselines", "{EMPTY}"], "baselines"),
        (sb, ["--baselines", "{EMPTY}", "--repeats", "0"], "repeats"),
        (sb, ["--baselines", "{EMPTY}", "--k1", "3", "--k2", "2"], "k2"),
        (sb, ["--baselines", "{EMPTY}", "--map", "3m;rm"], "map"),
        (sb, ["--baselines", "{EMPTY}", "--algos", "vdn"], "--algos"),
        ("experiments.swarm_transfer", ["/nonexistent"], "run_dirs"),
        ("experiments.swarm_transfer", ["{RUN_DIR}", "--num-agents", "0"], "num_agents"),
        ("experiments.trama_recovery", ["--episodes", "0"], "episodes"),
        ("experiments.trama_recovery", ["--env-name", "nope"], "env"),
    ]
    q = "experiments.qarl_compare"
    c += [
        (q, ["--num-seeds", "0"], "--num-seeds"),
        (q, ["--methods", "nope"], "--methods"),
        (q, ["--adversary-scales", "0"], "--adversary-scales"),
        (q, ["--seed", "-1"], "--seed"),
        (q, ["--envs", "smax:3m"], "--envs"),
        (q, ["--envs", "adv:nope"], "--envs"),
        (q, ["--total-steps", "0"], "--total-steps"),
    ]
    w, rs = "experiments.wpr_finetune", "experiments.regularizer_study"
    c += [
        (w, ["--reference-run", "/nonexistent"], "regularizer.reference_run"),
        (w, ["--reference-run", "{RUN_DIR}", "--num-seeds", "0"], "num_seeds"),
        (w, ["--reference-run", "{RUN_DIR}", "--final-fraction", "2"], "final_fraction"),
        (w, ["--reference-run", "{RUN_DIR}", "--coefs", "-1"], "coefs"),
        (rs, ["--kinds", "bogus"], "kinds"),
        (rs, ["--num-seeds", "0"], "num_seeds"),
        (rs, ["--coef", "-1"], "regularizer.coef"),
    ]
    return c


CASES = _cases()


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100 and len({m for m, _, _ in CASES}) >= 4


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A tiny trained run (for resume and evaluation cases), a folder of runs for
    reports, an empty folder, a plain file and two config files."""
    from experiments import train

    root = tmp_path_factory.mktemp("fuzz")
    assert (
        entry(train.main)(
            [
                "--algo",
                "ippo",
                "--env",
                "mpe:simple_spread",
                "--runs-dir",
                str(root / "runs"),
                "--run-name",
                "done",
                "--chunk-iterations",
                "1",
                *TRAIN,
                *PPO_TINY,
            ]
        )
        == 0
    )
    (root / "empty").mkdir()
    (root / "file").write_text("x")
    (root / "corrupt.json").write_text("{not json")
    (root / "unknown.json").write_text(json.dumps({"nope": 1}))
    return {
        "{RUN}": "done",
        "{RUN_DIR}": str(root / "runs" / "done"),
        "{RUNS}": str(root / "runs"),
        "{EMPTY}": str(root / "empty"),
        "{FILE}": str(root / "file"),
        "{CORRUPT}": str(root / "corrupt.json"),
        "{UNKNOWN}": str(root / "unknown.json"),
        "root": root,
    }


@pytest.fixture
def nothing_compiles(monkeypatch):
    """Every path into a compiled training or evaluation program fails the test."""

    def fail(*a, **k):
        raise AssertionError("a program was compiled before the input was rejected")

    import experiments.evaluate

    monkeypatch.setattr(marl.runner, "_host_loop", fail)
    monkeypatch.setattr(marl.runner, "make_chunk_fn", fail)
    monkeypatch.setattr(marl.evaluation, "evaluate_seeds", fail)
    monkeypatch.setattr(experiments.evaluate, "evaluate_seeds", fail)
    return fail


def _run(module: str, argv: list[str]) -> tuple[int, str]:
    mod = importlib.import_module(module)
    main = getattr(mod, "cli", None) or mod.main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = entry(main)(argv)
        except SystemExit as e:  # tyro / argparse parse errors
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize("module,argv,field", CASES, ids=[f"{m.split('.')[-1]}:{' '.join(a)}" for m, a, _ in CASES])
def test_invalid_input_exits_2_naming_the_field(module, argv, field, places, nothing_compiles, tmp_path, monkeypatch):
    if module in ("experiments.train", "experiments.sweep"):  # evaluation traces init for shapes only
        monkeypatch.setattr(marl.runner, "init_states", nothing_compiles)
    uses_run = "{RUN}" in argv
    argv = [places.get(a, a) for a in argv]
    before = sorted(os.listdir(places["{RUN_DIR}"]))
    if module == "experiments.train":
        runs_dir = places["{RUNS}"] if uses_run else str(tmp_path / "runs")
        argv = ["--runs-dir", runs_dir, *TRAIN, *argv] if "--runs-dir" not in argv else [*TRAIN, *argv]
        if "--algo" not in argv:
            argv = (
                ["--algo", "ippo", "--env", "mpe:simple_spread", *PPO_TINY, *argv]
                if "--env" not in argv
                else ["--algo", "ippo", *argv]
            )
    elif module == "experiments.sweep":
        argv = ["--runs-dir", str(tmp_path / "sweeps"), "--no-progress", *argv]
        if "--algo" not in argv:
            argv = ["--algo", "ippo", *argv]
        if "--env" not in argv:
            argv = ["--env", "mpe:simple_spread", *argv]
        if "--total-steps" not in argv and "--overrides" not in argv:
            argv += [
                "--overrides",
                json.dumps(
                    {
                        "num_envs": 4,
                        "num_steps": 8,
                        "num_minibatches": 2,
                        "update_epochs": 1,
                        "hidden": 16,
                        "total_steps": 64,
                    }
                ),
            ]
    code, err = _run(module, argv)
    assert code == 2, (argv, code, err[-2000:])
    assert "Traceback" not in err
    if field.startswith("--") or " " in field:  # a parse error: tyro names the flag
        assert field in err, err
    else:  # the field, possibly inside a nested one (grid.lr, env_kwargs.num_agents)
        named = re.search(rf"invalid ([\w.]+\.)?{re.escape(field)}=", err)
        assert named or f"--{field.replace('_', '-')}" in err or field.upper() in err, err
    assert sorted(os.listdir(places["{RUN_DIR}"])) == before  # the existing run is untouched
    assert not os.path.exists(os.path.join(places["{RUN_DIR}"], ".lock"))


def test_cli_errors_from_a_subprocess_have_no_traceback(places):
    import subprocess
    import sys

    root = places["root"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--algo",
            "ippo",
            "--env",
            "mpe:simple_spread",
            "--seed",
            "-1",
            "--runs-dir",
            str(root / "sub"),
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.returncode == 2 and "invalid seed=-1" in out.stderr and "Traceback" not in out.stderr
    shutil.rmtree(root / "sub", ignore_errors=True)
