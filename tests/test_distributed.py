"""One runner on every placement: rows sharded over devices (and processes) give the
numbers of the unsharded program, with checkpoints and exact resume."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from marl import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = """
    import json, os, sys
    import numpy as np
    import jax
    from marl import distributed, runner, sweep
    from tests.conftest import tiny_algo

    algo = tiny_algo("ippo", "mpe:simple_spread", total_steps=32, num_envs=2, num_steps=8, hidden=16,
                     update_epochs=1, num_minibatches=1, recurrent=False)

    def leaves(state):
        return [np.asarray(x) for x in jax.tree.leaves(distributed.to_host(state.params))]
"""

# the device count must be set before jax is imported, hence subprocesses
FOUR_DEVICES = (
    textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
""")
    + textwrap.dedent(COMMON)
    + textwrap.dedent("""
    assert jax.device_count() == 4
    out = sys.argv[1]
    mesh = distributed.make_mesh()
    # a sweep: 3 configs x 2 seeds = 6 rows -> padded to 8
    configs = sweep.grid({"lr": [0.001, 0.01, 0.03]})
    kw = dict(num_iterations=2, num_seeds=2, seed=1, chunk_iterations=1)
    plain = sweep.run_sweep(algo, configs, **kw)
    sharded = sweep.run_sweep(algo, configs, mesh=mesh, **kw)
    sweep_diff = {k: float(np.abs(plain.metrics[k] - sharded.metrics[k]).max()) for k in plain.metrics}
    lr = np.asarray(jax.device_get(sharded.state.hparams.lr))

    # training: 3 seeds (padded to 4) on 4 devices, killed after one chunk and resumed
    tk = dict(num_iterations=4, num_seeds=3, seed=5, chunk_iterations=1, checkpoint_every=1, progress=False)
    ref = runner.train(algo, **tk)
    run_dir = os.path.join(out, "run")
    runner.train(algo, **tk, run_dir=run_dir, mesh=mesh, stop_after_chunks=2)
    resumed = runner.train(algo, **tk, run_dir=run_dir, mesh=mesh, resume=True)
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    param_diff = max(float(np.abs(a - b).max()) for a, b in zip(leaves(ref.state), leaves(resumed.state)))
    metric_diff = {k: float(np.abs(v[:, -2:] - resumed.metrics[k]).max()) for k, v in ref.metrics.items()}
    # resuming on another device count is refused before anything compiles
    try:
        runner.train(algo, **tk, run_dir=run_dir, resume=True)
        refused = ""
    except Exception as e:  # noqa: BLE001
        refused = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps({
        "devices": sharded.devices, "sweep_diff": sweep_diff, "shape": list(sharded.metrics["return"].shape),
        "lr": lr.tolist(), "padded": distributed.padded_size(6, mesh.size),
        "differs": bool(not np.allclose(plain.metrics["policy_loss"][0], plain.metrics["policy_loss"][2])),
        "param_diff": param_diff, "metric_diff": metric_diff,
        "state_rows": int(jax.tree.leaves(resumed.state)[0].shape[0]),
        "iterations_logged": sorted({x["iteration"] for x in lines}),
        "seeds_logged": sorted({x["seed"] for x in lines}),
        "refused": refused,
        "checkpoint_rows": json.load(open(os.path.join(run_dir, "run.json")))["checkpoint_rows"],
    }))
""")
)


def _env():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return env


def _result(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_one_runner_on_4_cpu_devices_sweeps_trains_and_resumes_exactly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES, str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = _result(out.stdout)
    assert r["devices"] == 4 and r["padded"] == 8
    assert r["shape"] == [3, 2, 2]  # padding rows are dropped
    np.testing.assert_allclose(r["lr"], [0.001, 0.001, 0.01, 0.01, 0.03, 0.03], rtol=1e-6)
    assert r["differs"]
    for k, d in r["sweep_diff"].items():
        assert d <= 1e-5, (k, d)
    # killed after 2 of 4 chunks and resumed on 4 devices: the uninterrupted unsharded run's numbers
    assert r["param_diff"] <= 1e-6, r["param_diff"]
    for k, d in r["metric_diff"].items():
        assert d <= 1e-5, (k, d)
    assert r["state_rows"] == 3 and r["checkpoint_rows"] == 4
    assert r["iterations_logged"] == [1, 2, 3, 4] and r["seeds_logged"] == [0, 1, 2]
    assert "ConfigError" in r["refused"] and "devices" in r["refused"], r["refused"]


TWO_PROCESSES = (
    textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    from marl import distributed
    assert distributed.initialize()
""")
    + textwrap.dedent(COMMON)
    + textwrap.dedent("""
    assert jax.device_count() == 4 and jax.local_device_count() == 2 and jax.process_count() == 2
    out = sys.argv[1]
    mesh = distributed.make_mesh()
    configs = sweep.grid({"lr": [0.001, 0.03]})  # 2 configs x 3 seeds = 6 rows over 4 devices
    kw = dict(num_iterations=4, num_seeds=3, seed=2, chunk_iterations=1, checkpoint_every=1,
              run_dir=os.path.join(out, "sweep"), mesh=mesh)
    keys, hparams = sweep.row_layout(configs, 3, 2)
    first = runner.train(algo, num_iterations=4, num_seeds=6, seed=2, keys=keys, hparams=hparams, chunk_iterations=1,
                         checkpoint_every=1, run_dir=os.path.join(out, "sweep"), mesh=mesh, progress=False,
                         stop_after_chunks=2)
    res = sweep.run_sweep(algo, configs, resume=True, **kw)
    params = leaves(res.state)  # a collective: every process takes part
    if jax.process_index() == 0:
        np.savez(os.path.join(out, "two_processes.npz"), *params,
                 **{"metric_" + k: v for k, v in res.metrics.items()})
        print("RESULT " + json.dumps({"processes": jax.process_count(), "devices": res.devices}))
""")
)

ONE_PROCESS = textwrap.dedent(COMMON) + textwrap.dedent("""
    out = sys.argv[1]
    res = sweep.run_sweep(algo, sweep.grid({"lr": [0.001, 0.03]}), num_iterations=4, num_seeds=3, seed=2,
                          chunk_iterations=1)
    np.savez(os.path.join(out, "one_process.npz"), *leaves(res.state),
             **{"metric_" + k: v for k, v in res.metrics.items()})
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the 4-device test covers the sharded loop and its resume in one process
def test_two_processes_sweep_checkpoint_and_resume_with_the_single_process_numbers(tmp_path):
    """2 CPU processes on localhost (jax.distributed, gloo), 2 devices each: a sweep killed
    after 2 of 4 chunks and resumed across both gives the numbers of one process."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {
            **_env(),
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", TWO_PROCESSES, str(tmp_path)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(se[-2500:] for _, se in outs)
    assert _result(outs[0][0]) == {"processes": 2, "devices": 4}
    single = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = np.load(tmp_path / "two_processes.npz"), np.load(tmp_path / "one_process.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:  # the resumed call reports the iterations it ran (the last 2 of 4)
        want = b[name][:, :, -a[name].shape[2] :] if name.startswith("metric_") else b[name]
        np.testing.assert_allclose(a[name], want, rtol=0, atol=1e-5, err_msg=name)
    lines = (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 6  # every iteration of every row, once (process 0 writes)


def test_initialize_is_a_no_op_on_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(coordinator_address="localhost:1234", num_processes=1) is False


def test_padding_rule():
    assert [distributed.padded_size(n, 4) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert distributed.padded_size(7, 1) == 7
    np.testing.assert_array_equal(distributed.pad_rows(np.arange(3), 5), [0, 1, 2, 2, 2])


def test_train_sharded_is_gone():
    with pytest.raises(AttributeError):
        distributed.train_sharded  # noqa: B018 - one runner for every placement
