"""Sharding the vmapped rows over devices gives the numbers of the unsharded program."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from marl import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the device count must be set before jax is imported, hence a subprocess
SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    import numpy as np
    from marl import distributed, sweep
    from tests.conftest import tiny_algo

    assert jax.device_count() == 4
    algo = tiny_algo("ippo", "mpe:simple_spread", total_steps=32, num_envs=2, num_steps=8, hidden=16,
                     update_epochs=1, num_minibatches=1, recurrent=False)
    configs = sweep.grid({"lr": [0.001, 0.01, 0.03]})  # 3 configs x 2 seeds = 6 rows -> padded to 8
    kw = dict(num_iterations=2, num_seeds=2, seed=1, chunk_iterations=1)
    plain = sweep.run_sweep(algo, configs, **kw)
    mesh = distributed.make_mesh()
    sharded = sweep.run_sweep(algo, configs, mesh=mesh, **kw)
    diff = {k: float(np.abs(plain.metrics[k] - sharded.metrics[k]).max()) for k in plain.metrics}
    lr = np.asarray(jax.device_get(sharded.state.hparams.lr))
    print("RESULT " + json.dumps({
        "devices": sharded.devices, "diff": diff, "shape": list(sharded.metrics["return"].shape),
        "lr": lr.tolist(), "padded": distributed.padded_size(6, mesh.size),
        "differs": bool(not np.allclose(plain.metrics["policy_loss"][0], plain.metrics["policy_loss"][2])),
    }))
""")


def test_sharded_equals_unsharded_on_4_cpu_devices():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert r["devices"] == 4 and r["padded"] == 8
    assert r["shape"] == [3, 2, 2]  # padding rows are dropped
    np.testing.assert_allclose(r["lr"], [0.001, 0.001, 0.01, 0.01, 0.03, 0.03], rtol=1e-6)
    assert r["differs"]
    for k, d in r["diff"].items():
        assert d <= 1e-5, (k, d)


def test_initialize_is_a_no_op_on_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(coordinator_address="localhost:1234", num_processes=1) is False


def test_padding_rule():
    assert [distributed.padded_size(n, 4) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert distributed.padded_size(7, 1) == 7
