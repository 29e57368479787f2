"""Guard against the batched-QR deadlock of jax 0.10.x on CPU (see marl/networks.py).

Runs in a subprocess under a hard timeout: a hang fails the test instead of the suite.
"""

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent(
    """
    import jax
    import algos, envs
    from marl.networks import orthogonal
    from tests.conftest import tiny_overrides
    from marl.runner import train

    # the minimal reproducer, with our initializer in place of flax's
    init = orthogonal()
    f = lambda key: [init(k, (128, 128)) for k in jax.random.split(key, 10)]
    jax.block_until_ready(jax.jit(jax.vmap(f))(jax.random.split(jax.random.key(0), 2)))

    # an env each module accepts (discrete SMAX unless the module needs another kind)
    env_for = {"algos.sac": ("adv:pendulum", {}), "algos.dec_pomfc": ("swarm:aggregation", {"num_agents": 4})}
    seen = set()  # one algorithm per module (the networks and inits are per module)
    for name in algos.registered():
        module = algos.config_class(name).__module__
        if module in seen:
            continue
        seen.add(module)
        env_name, env_kwargs = env_for.get(module, ("smax:3m", {}))
        env = envs.make(env_name, **env_kwargs)
        algo = algos.make(name, env, **tiny_overrides(name, num_envs=2, num_steps=4, num_minibatches=1,
                                                      update_epochs=1, hidden=16, total_steps=8,
                                                      train_steps=1, batch_size=2))
        r = train(algo, num_iterations=3, num_seeds=2, progress=False)
        assert r.metrics["return"].shape == (2, 3), name
    print("OK")
    """
)


def test_vmapped_init_and_updates_do_not_hang():
    try:
        out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            "vmapped init/update of 2 seeds did not finish in 420 s: the batched-QR deadlock "
            "(jax 0.10 on CPU) is probably back; see marl/networks.py"
        ) from None
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
