"""Guard against the batched-QR deadlock of jax 0.10.x on CPU (see marl/networks.py).

Each algorithm module (its networks and initializers) runs in a subprocess under a hard
timeout: a hang fails that test instead of the suite.
"""

import subprocess
import sys
import textwrap

import pytest

import algos

PROGRAM = textwrap.dedent(
    """
    import sys
    import jax
    import algos, envs
    from marl.networks import orthogonal
    from tests.conftest import tiny_overrides
    from marl.runner import train

    # the minimal reproducer, with our initializer in place of flax's
    init = orthogonal()
    f = lambda key: [init(k, (128, 128)) for k in jax.random.split(key, 10)]
    jax.block_until_ready(jax.jit(jax.vmap(f))(jax.random.split(jax.random.key(0), 2)))

    name, env_name, env_kwargs = sys.argv[1], sys.argv[2], eval(sys.argv[3])
    env = envs.make(env_name, **env_kwargs)
    algo = algos.make(name, env, **tiny_overrides(name, num_envs=2, num_steps=4, num_minibatches=1,
                                                  update_epochs=1, hidden=16, total_steps=8,
                                                  train_steps=1, batch_size=2))
    r = train(algo, num_iterations=3, num_seeds=2, progress=False)
    assert r.metrics["return"].shape == (2, 3), name
    print("OK")
    """
)

# an env each module accepts (discrete SMAX unless the module needs another kind)
ENV_FOR = {
    "algos.sac": ("adv:pendulum", {}),
    "algos.qarl": ("adv:pendulum", {}),
    "algos.dec_pomfc": ("swarm:aggregation", {"num_agents": 4}),
    "algos.trama": ("smax-mt:surComb3", {}),
}


# the heaviest programs; their hooks are also run under jit(vmap) by their own test files
# (test_trama, test_emu, test_qarl, test_dec_pomfc, test_sac, test_qlearning), so here they are
# -m slow; PPO stays as the default suite's guard
SLOW_MODULES = {"algos.trama", "algos.emu", "algos.qarl", "algos.dec_pomfc", "algos.sac", "algos.qlearning"}


def _one_algorithm_per_module():
    seen = {}
    for name in algos.registered():
        seen.setdefault(algos.config_class(name).__module__, name)
    return [
        pytest.param(m, n, marks=pytest.mark.slow) if m in SLOW_MODULES else (m, n) for m, n in sorted(seen.items())
    ]


@pytest.mark.parametrize("module,name", _one_algorithm_per_module())
def test_vmapped_init_and_updates_do_not_hang(module, name):
    env_name, env_kwargs = ENV_FOR.get(module, ("smax:3m", {}))
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROGRAM, name, env_name, repr(env_kwargs)],
            capture_output=True,
            text=True,
            timeout=420,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{name}: vmapped init/update of 2 seeds did not finish in 420 s: the batched-QR deadlock "
            "(jax 0.10 on CPU) is probably back; see marl/networks.py"
        ) from None
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("shape", [(1536, 512), (256, 256), (300, 200)])
def test_gram_schmidt_gives_the_q_of_a_qr_decomposition(shape):
    """Block by block (from 256 columns) or column by column, the columns are the Q of
    ``a = QR`` with a positive diagonal R, as numpy's QR (LAPACK) gives it; vmapped too."""
    import jax
    import numpy as np

    from marl.networks import GS_BLOCK, _gram_schmidt

    assert (shape[1] >= 4 * GS_BLOCK and shape[1] % GS_BLOCK == 0) == (shape != (300, 200))
    a = jax.random.normal(jax.random.PRNGKey(0), (2, *shape))
    q = np.asarray(jax.jit(jax.vmap(_gram_schmidt))(a), np.float64)
    for i in range(2):
        ref, r = np.linalg.qr(np.asarray(a[i], np.float64))
        ref = ref * np.sign(np.diag(r))
        np.testing.assert_allclose(q[i], ref, atol=2e-5)
        np.testing.assert_allclose(q[i].T @ q[i], np.eye(shape[1]), atol=2e-5)
