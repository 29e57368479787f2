"""Runs that never lose data: locks, atomic metrics, damaged files, checks before compiling."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marl import rundir
from marl.checkpoint import Checkpointer
from marl.config import ConfigError
from marl.logging import MetricsWriter, read_metrics
from marl.runner import DivergenceError, check_memory, state_bytes, train


def _lines(n, seeds=1):
    return [
        json.dumps({"iteration": i, "env_steps": 8 * i, "seed": s, "return": float(i)})
        for i in range(1, n + 1)
        for s in range(seeds)
    ]


def test_resume_rewrite_of_metrics_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = "\n".join(_lines(6)) + "\n"
    path.write_text(original)

    def killed(src, dst):  # the process dies between writing the temp file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsWriter(str(tmp_path), truncate_after=4, resume=True)
    assert path.read_text() == original  # nothing destroyed before its replacement is durable
    monkeypatch.undo()
    MetricsWriter(str(tmp_path), truncate_after=4, resume=True).close()
    assert path.read_text() == "\n".join(_lines(4)) + "\n"
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


def test_damaged_metrics_lines_are_skipped_counted_and_kept(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = _lines(5)
    path.write_text("\n".join(lines[:2] + ["garbage{", lines[2], "[1, 2]"] + lines[3:]) + '\n{"iteration": 6, "ret')
    assert [r["iteration"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
    assert "skipped 3 damaged line(s)" in capsys.readouterr().err
    MetricsWriter(str(tmp_path), truncate_after=4, resume=True).close()
    assert [r["iteration"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    backups = [p for p in os.listdir(tmp_path) if p.startswith("metrics.jsonl.damaged-")]
    assert len(backups) == 1 and "garbage{" in (tmp_path / backups[0]).read_text()


def test_report_reads_a_run_with_damaged_lines(tmp_path, capsys):
    from experiments import report

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"algo": "ippo", "env": "mpe:simple_spread", "num_seeds": 1}))
    (run / "metrics.jsonl").write_text("\n".join(_lines(10)) + "\nnot json\n")
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists()
    assert "damaged" in capsys.readouterr().err


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    d = str(tmp_path)
    first = rundir.RunLock(d).acquire()
    with pytest.raises(rundir.RunLockedError) as e:
        rundir.RunLock(d).acquire()
    assert f"process {os.getpid()}" in str(e.value) and "run_dir" in str(e.value)
    first.release()
    assert not os.path.exists(os.path.join(d, rundir.LOCK_NAME))
    # a lock left by a process that no longer runs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    with open(os.path.join(d, rundir.LOCK_NAME), "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}, f)
    lock = rundir.RunLock(d).acquire()
    assert f"left by process {dead.pid}" in capsys.readouterr().err
    assert json.load(open(os.path.join(d, rundir.LOCK_NAME)))["pid"] == os.getpid()
    lock.release()


def test_train_refuses_a_locked_run_before_compiling(tmp_path, mappo_tiny, monkeypatch):
    import marl.runner as runner

    monkeypatch.setattr(runner, "init_states", _no_compile)
    lock = rundir.RunLock(str(tmp_path / "r"))
    os.makedirs(tmp_path / "r")
    lock.acquire()
    try:
        with pytest.raises(rundir.RunLockedError, match="is being written by process"):
            train(mappo_tiny, num_iterations=2, run_dir=str(tmp_path / "r"), progress=False)
    finally:
        lock.release()


def _no_compile(*a, **k):
    raise AssertionError("compiled before the input was checked")


def test_resume_of_a_missing_run_is_refused(tmp_path, mappo_tiny, monkeypatch):
    import marl.runner as runner

    monkeypatch.setattr(runner, "init_states", _no_compile)
    with pytest.raises(ConfigError, match="resume-or-start"):
        train(mappo_tiny, num_iterations=2, run_dir=str(tmp_path / "nope"), resume=True, progress=False)


def test_memory_estimate_refuses_before_compiling(mappo_tiny):
    per = state_bytes(mappo_tiny)
    assert per > 0
    with pytest.raises(ConfigError, match="num_seeds=.*must be at most 3"):
        check_memory(mappo_tiny, 10, available=7 * per)
    with pytest.raises(ConfigError, match="must fit"):
        check_memory(mappo_tiny, 1, available=per)
    assert check_memory(mappo_tiny, 2, available=100 * per) == 4 * per


def test_damaged_checkpoint_falls_back_and_resume_stays_exact(tmp_path, mappo_tiny, capsys):
    kw = dict(num_iterations=4, chunk_iterations=1, checkpoint_every=1, progress=False)
    ref = train(mappo_tiny, **kw)
    run_dir = str(tmp_path / "r")
    train(mappo_tiny, run_dir=run_dir, stop_after_chunks=3, **kw)
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"))
    assert ck.all_steps() == [2, 3]
    ck.close()
    # cut every file of the newest checkpoint's metadata short
    newest = os.path.join(run_dir, "checkpoints", "3")
    cut = 0
    for root, _, files in os.walk(newest):
        for name in files:
            if "METADATA" in name.upper() or name.endswith(".json"):
                p = os.path.join(root, name)
                with open(p, "r+b") as f:
                    f.truncate(max(1, os.path.getsize(p) // 2))
                cut += 1
    assert cut
    res = train(mappo_tiny, run_dir=run_dir, resume=True, **kw)
    err = capsys.readouterr().err
    assert "checkpoint 3" in err and "damaged" in err
    assert os.listdir(os.path.join(run_dir, "damaged_checkpoints"))  # moved aside, not deleted
    for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(res.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_divergence_guard_stops_a_run_whose_loss_explodes(tmp_path, mappo_tiny):
    import jax.numpy as jnp

    def exploding(state):
        state, metrics = mappo_tiny.update(state)
        big = jnp.where(state.update_step >= 3, 1e28, metrics["value_loss"])
        return state, dict(metrics, value_loss=big)

    algo = mappo_tiny._replace(update=exploding)
    with pytest.raises(DivergenceError, match="value_loss.*max_loss.*iteration 3"):
        train(algo, num_iterations=4, chunk_iterations=2, max_loss=1e12, progress=False, run_dir=str(tmp_path / "d"))
    assert [r["iteration"] for r in read_metrics(str(tmp_path / "d"))] == [1, 2]
    # off by default in the runner: finite values never stop it
    train(algo, num_iterations=4, chunk_iterations=2, progress=False)


def _train_cmd(runs_dir, name, extra=()):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--algo",
        "ippo",
        "--env",
        "mpe:simple_spread",
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
        str(40 * 32),
        "--chunk-iterations",
        "1",
        "--checkpoint-every",
        "1",
        "--eval-episodes",
        "0",
        "--no-progress",
        "--runs-dir",
        str(runs_dir),
        "--run-name",
        name,
        *extra,
    ]


@pytest.mark.slow
def test_chained_kills_end_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """kill -9 at random moments (while starting, compiling, training, checkpointing and
    rewriting metrics on resume), resume each time: the final parameters are bitwise
    those of the run that was never stopped, and metrics.jsonl is equal line for line."""
    import signal
    import time

    from experiments.evaluate import restore_params

    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(_train_cmd(tmp_path, "ref"), cwd=cwd, check=True, capture_output=True)
    rng = np.random.default_rng(0)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    kills = 0
    for attempt in range(12):
        proc = subprocess.Popen(
            _train_cmd(tmp_path, "killed", ["--resume-or-start"]),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if attempt < 8:
            size0 = metrics.stat().st_size if metrics.exists() else -1
            if attempt % 2 == 0:  # somewhere in start-up: imports, the resume rewrite, compiling
                deadline = time.time() + rng.uniform(2.0, 12.0)
                while time.time() < deadline and proc.poll() is None:
                    time.sleep(0.05)
            else:  # somewhere in training: chunks, metrics lines, checkpoints
                while proc.poll() is None and (not metrics.exists() or metrics.stat().st_size <= max(size0, 0)):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert proc.returncode == 0 and kills >= 4
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    _, _, ref, step_a = restore_params(str(tmp_path / "ref"))
    _, _, got, step_b = restore_params(str(tmp_path / "killed"))
    assert step_a == step_b == 40
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_of_another_layout_is_refused_clearly_and_kept(tmp_path):
    """A checkpoint that reads back but holds another train-state layout (another version
    of an algorithm) is not damage: a clear error, and the files stay where they are."""
    from marl.checkpoint import Checkpointer

    old = {"params": {"w": jnp.ones((2, 3))}, "opt_state": (jnp.zeros((2, 3)),)}
    new = {"params": {"w": jnp.ones((2, 3))}, "opt_state": {"count": jnp.zeros((), jnp.int32), "mu": jnp.zeros((2, 3))}}
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(5, old)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    with pytest.raises(ConfigError, match="checkpoint") as e:
        ckpt.restore_latest(new, quarantine=True)
    assert "another layout" in str(e.value)
    assert ckpt.all_steps() == [5] and not (tmp_path / "damaged_checkpoints").exists()
    state, step = ckpt.restore_latest(old)
    assert step == 5 and float(state["params"]["w"].sum()) == 6.0
    ckpt.close()
