import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marl.checkpoint import Checkpointer
from marl.config import ConfigError
from marl.logging import read_metrics
from marl.runner import NonFiniteError, train


def _params_equal(a, b, atol=0.0):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.allclose(x, y, atol=atol, rtol=0) for x, y in pairs)


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(mappo_tiny):
    r1 = train(mappo_tiny, num_iterations=3, num_seeds=1, seed=3, progress=False)
    r2 = train(mappo_tiny, num_iterations=3, num_seeds=1, seed=3, progress=False)
    for k in r1.metrics:
        np.testing.assert_array_equal(r1.metrics[k], r2.metrics[k], err_msg=k)
    r3 = train(mappo_tiny, num_iterations=3, num_seeds=1, seed=4, progress=False)
    assert not np.array_equal(r1.metrics["policy_loss"], r3.metrics["policy_loss"])


@pytest.mark.slow
def test_vmapped_seeds_equal_separate_single_seed_runs(mappo_tiny):
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    both = train(mappo_tiny, num_iterations=3, num_seeds=2, keys=keys, progress=False)
    for i in range(2):
        one = train(mappo_tiny, num_iterations=3, num_seeds=1, keys=keys[i : i + 1], progress=False)
        for k in ("policy_loss", "value_loss", "entropy", "return"):
            np.testing.assert_allclose(both.metrics[k][i], one.metrics[k][0], rtol=1e-4, atol=1e-5, err_msg=k)
        single_params = jax.tree.map(lambda x: x[0], one.state.params)
        batched_params = jax.tree.map(lambda x, i=i: x[i], both.state.params)
        assert _params_equal(single_params, batched_params, atol=1e-4)


def test_kill_and_resume_equals_uninterrupted(tmp_path, mappo_tiny):
    kw = dict(num_iterations=4, num_seeds=2, seed=1, chunk_iterations=1, progress=False)
    full = train(mappo_tiny, run_dir=str(tmp_path / "full"), **kw)
    part = train(mappo_tiny, run_dir=str(tmp_path / "cut"), stop_after_chunks=2, **kw)
    assert part.env_steps == 2 * mappo_tiny.env_steps_per_update
    resumed = train(mappo_tiny, run_dir=str(tmp_path / "cut"), resume=True, **kw)
    assert _params_equal(full.state.params, resumed.state.params)
    assert _params_equal(full.state.opt_state, resumed.state.opt_state)
    m_full = read_metrics(str(tmp_path / "full"))
    m_cut = read_metrics(str(tmp_path / "cut"))
    assert [r["iteration"] for r in m_cut] == [r["iteration"] for r in m_full]
    assert m_cut == m_full
    # a finished run refuses to be overwritten silently
    with pytest.raises(ConfigError, match="run_dir"):
        train(mappo_tiny, run_dir=str(tmp_path / "full"), **kw)


def test_resume_rejects_a_different_run(tmp_path, mappo_tiny):
    train(mappo_tiny, run_dir=str(tmp_path / "r"), num_iterations=1, num_seeds=1, progress=False)
    with pytest.raises(ConfigError, match="num_seeds"):
        train(
            mappo_tiny,
            run_dir=str(tmp_path / "r"),
            num_iterations=2,
            num_seeds=2,
            resume=True,
            progress=False,
        )


def test_nonfinite_stops_with_metric_and_iteration_and_keeps_checkpoint(tmp_path, mappo_tiny):
    def poisoned_update(state):
        state, metrics = mappo_tiny.update(state)
        bad = state.update_step >= 3
        metrics = dict(metrics, value_loss=jnp.where(bad, jnp.nan, metrics["value_loss"]))
        return state, metrics

    algo = mappo_tiny._replace(update=poisoned_update)
    run_dir = str(tmp_path / "nan")
    with pytest.raises(NonFiniteError) as e:
        train(algo, run_dir=run_dir, num_iterations=6, chunk_iterations=2, progress=False)
    msg = str(e.value)
    assert "value_loss" in msg and "iteration 3" in msg and "iteration 2" in msg
    # the good iterations are kept, the last good checkpoint is restorable
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2]
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"))
    assert ck.latest_step() == 2
    ck.close()
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["algo"] == "mappo"


def test_hparams_override_is_per_seed(mappo_tiny):
    r = train(mappo_tiny, num_iterations=1, num_seeds=2, hparams={"lr": [1e-3, 2e-3]}, progress=False)
    np.testing.assert_allclose(r.state.hparams.lr, [1e-3, 2e-3])
    with pytest.raises(ConfigError, match="hparams"):
        train(mappo_tiny, num_iterations=1, num_seeds=1, hparams={"nope": 1.0}, progress=False)


def test_runner_validates_sizes(mappo_tiny, tmp_path):
    with pytest.raises(ConfigError, match="num_seeds"):
        train(mappo_tiny, num_iterations=1, num_seeds=0, progress=False)
    with pytest.raises(ConfigError, match="num_iterations"):
        train(mappo_tiny, num_iterations=0, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="run_dir"):
        train(mappo_tiny, num_iterations=1, run_dir=str(blocker / "sub"), progress=False)


def test_progress_postfix_shows_the_first_players_return_in_zero_sum_games():
    from marl.runner import _postfix

    m = {"episodes": np.array([[2.0, 0.0]]), "return": np.array([[0.0, 0.0]]), "return_agent0": np.array([[30.0, 0.0]])}
    assert _postfix(m, 100.0)["return"] == "30.000"
    assert _postfix({"episodes": np.array([1.0]), "return": np.array([4.0])}, 1.0)["return"] == "4.000"


def test_checkpoint_keeps_zero_size_arrays(tmp_path):
    """MJX states hold arrays of size 0, which orbax alone refuses to save."""
    state = {"a": jnp.arange(3.0), "empty": jnp.zeros((2, 0), jnp.float32), "n": jnp.zeros((0,), jnp.int32)}
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, state)
    back = ck.restore(jax.eval_shape(lambda: state))
    ck.close()
    np.testing.assert_array_equal(back["a"], state["a"])
    assert back["empty"].shape == (2, 0) and back["n"].shape == (0,) and back["n"].dtype == jnp.int32


def _primitive_counts(jaxpr, names=("cond", "while")) -> dict:
    """How many of each primitive a jaxpr holds, sub-jaxprs (scan, cond, while bodies) included."""
    counts = dict.fromkeys(names, 0)

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in counts:
                counts[eqn.primitive.name] += 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr)
    return counts


@pytest.mark.parametrize(
    "name, env_name", [("qmix", "smax:3m"), ("emu", "smax:3m"), ("sac", "adv:pendulum"), ("trama", "smax-mt:surComb3")]
)
def test_vmapped_seeds_keep_every_branch_a_branch(name, env_name):
    """Under the runner's seed vmap every ``lax.cond`` / ``while_loop`` of an update stays
    one (its predicate is the same for all rows, ``max_over_seeds``), instead of becoming a
    select that runs both sides (or a loop that selects its whole carry) for every row."""
    from marl.runner import init_states, make_chunk_fn
    from tests.conftest import tiny_algo

    algo = tiny_algo(name, env_name)
    state = algo.init(jax.random.PRNGKey(0))
    one = _primitive_counts(jax.make_jaxpr(algo.update)(state).jaxpr)
    assert one["cond"] > 0, f"{name}'s update has no branch to check"
    states = init_states(algo, jax.random.split(jax.random.PRNGKey(0), 3))
    batched = _primitive_counts(jax.make_jaxpr(make_chunk_fn(algo, 1))(states).jaxpr)
    assert batched == one, f"{name}: {one} unbatched, {batched} under the seed vmap"


@pytest.mark.parametrize("name", ["ippo", "mappo"])
def test_one_row_runs_unbatched_with_the_vmapped_numbers(name):
    """A single seed runs the update without the seed vmap (a vmap over one row is slower
    on CPU); its numbers are those of row 0 of a vmapped run, up to float rounding."""
    import numpy as np

    from marl.runner import init_states, make_chunk_fn
    from tests.conftest import tiny_algo

    algo = tiny_algo(name, "smax:3m")
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    chunk = make_chunk_fn(algo, 3)
    # the scan over iterations carries unbatched parameters, not [1, ...] ones
    (program,) = [
        e for e in jax.make_jaxpr(chunk)(init_states(algo, keys[:1])).eqns if e.primitive.name in ("jit", "pjit")
    ]
    scan = next(e for e in program.params["jaxpr"].eqns if e.primitive.name == "scan")
    carried = {tuple(v.aval.shape) for v in scan.invars}
    leaf = max(jax.tree.leaves(algo.init(keys[0]).params), key=lambda x: x.size)
    assert leaf.shape in carried and (1, *leaf.shape) not in carried
    one = chunk(init_states(algo, keys[:1]))
    two = chunk(init_states(algo, keys))
    assert jax.tree.map(np.shape, one[1]) == jax.tree.map(lambda x: (1,) + np.shape(x)[1:], two[1])
    for a, b in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(two[0].params), strict=True):
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], rtol=1e-4, atol=1e-5)
    for k in ("policy_loss", "value_loss", "entropy"):
        np.testing.assert_allclose(np.asarray(one[1][k])[0], np.asarray(two[1][k])[0], rtol=1e-4, atol=1e-5)


def test_first_chunk_compiles_in_a_thread_while_init_runs(monkeypatch):
    """A fresh run compiles its first chunk from the initial states' shapes in a thread
    (once: the real states hit that program), with the numbers of the sequential path.
    Under a thread-local JAX setting the chunk compiles in the caller's thread."""
    import threading

    from marl import runner
    from tests.conftest import tiny_algo

    made = []
    real = runner.make_chunk_fn

    def spy(*args, **kwargs):
        made.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "make_chunk_fn", spy)
    monkeypatch.setattr(runner, "_COMPILED", {})
    kw = dict(num_iterations=2, num_seeds=2, seed=0, chunk_iterations=1, progress=False)
    concurrent = train(tiny_algo("ippo", "smax:3m"), **kw)
    assert len(made) == 1 and made[0].startswith("marl-compile"), made
    assert concurrent.compile_seconds > 0

    made.clear()
    with jax.default_matmul_precision("highest"):  # a setting the thread would not see
        train(tiny_algo("ippo", "smax:3m"), **kw)
    assert made == [threading.current_thread().name]

    made.clear()
    runner._COMPILED.clear()
    monkeypatch.setattr(runner, "_precompile", lambda *a, **k: None)
    sequential = train(tiny_algo("ippo", "smax:3m"), **kw)
    assert made == [threading.current_thread().name]
    for k in concurrent.metrics:
        np.testing.assert_array_equal(concurrent.metrics[k], sequential.metrics[k], err_msg=k)
    assert _params_equal(concurrent.state.params, sequential.state.params)


def test_prepare_gives_states_and_their_compiled_chunk():
    from marl.runner import init_states, prepare
    from tests.conftest import tiny_algo

    algo = tiny_algo("ippo", "smax:3m")
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    state, chunk, compile_s = prepare(algo, keys, 2)
    assert compile_s > 0 and _params_equal(state.params, init_states(algo, keys).params)
    state, metrics, finite = chunk(state)
    assert np.asarray(metrics["policy_loss"]).shape[:2] == (2, 2) and bool(np.all(finite))
