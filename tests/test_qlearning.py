"""Q-learning backbone: targets, episode storage from rollouts, hooks, vmapped updates, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import algos
import envs
from algos import qlearning as ql
from marl import losses, returns, rnn
from marl.config import ConfigError
from marl.runner import train
from tests.conftest import tiny_algo


def test_double_q_target_hand_computed():
    # one agent, three actions; action 2 unavailable at t + 1
    q_next = jnp.array([[1.0, 3.0, 9.0]])  # online: greedy available action is 1
    tq_next = jnp.array([[5.0, 2.0, 7.0]])  # target: its own greedy available action is 0
    avail = jnp.array([[True, True, False]])
    a, chosen, tmax = losses.next_actions(q_next, tq_next, avail, double_q=True)
    assert int(a[0]) == 1 and float(chosen[0]) == 2.0 and float(tmax[0]) == 5.0
    a_single, chosen_single, _ = losses.next_actions(q_next, tq_next, avail, double_q=False)
    assert int(a_single[0]) == 0 and float(chosen_single[0]) == 5.0
    # y = r + gamma (1 - term) Qbar: r = 1, gamma = 0.5, VDN over this single agent
    y = returns.lambda_returns(jnp.array([[1.0]]), jnp.array([[False]]), chosen[None], jnp.array([[False]]), 0.5, 0.0)
    assert float(y[0, 0]) == pytest.approx(1.0 + 0.5 * 2.0)


def test_gru_recurrence_matches_the_cell_and_its_autodiff_gradient():
    """The hand-written backward pass of the training unroll equals autodiff of the step cell."""
    H, n, A, D, K, B = 16, 5, 3, 7, 6, 4
    agent = rnn.RNNAgent(n, H)
    x = jax.random.normal(jax.random.PRNGKey(0), (K, B, A, D))
    params = agent.init(jax.random.PRNGKey(1), jnp.zeros((B, A, H)), x[0])
    h0 = jax.random.normal(jax.random.PRNGKey(2), (B, A, H))
    weights = jax.random.normal(jax.random.PRNGKey(3), (K, B, A, n))

    def by_cell(p, x, h0):
        return jax.lax.scan(lambda h, xt: agent.apply(p, h, xt), h0, x)[1]

    def by_sequence(p, x, h0):
        xi = agent.apply(p, x, method=rnn.RNNAgent.encode)
        hs = agent.apply(p, h0, xi, method=rnn.RNNAgent.recur_sequence)
        return agent.apply(p, hs, method=rnn.RNNAgent.head)

    np.testing.assert_allclose(by_sequence(params, x, h0), by_cell(params, x, h0), atol=1e-5)
    grad = lambda f: jax.grad(lambda *a: (f(*a) * weights).sum(), argnums=(0, 1, 2))(params, x, h0)
    for g_seq, g_cell in zip(jax.tree.leaves(grad(by_sequence)), jax.tree.leaves(grad(by_cell)), strict=True):
        np.testing.assert_allclose(g_seq, g_cell, rtol=1e-4, atol=1e-5)


def test_chunked_unroll_gives_the_same_values_and_gradients_with_plain_autodiff():
    """``gru_autodiff``: the selectable plain-autodiff path of the training unroll."""
    H, n, A, D, B, S = 16, 5, 3, 7, 4, 2 * rnn.UNROLL_CHUNK + 3
    agent = rnn.RNNAgent(n, H)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, S, A, D))
    params = agent.init(jax.random.PRNGKey(1), jnp.zeros((B, A, H)), x[:, 0])
    weights = jax.random.normal(jax.random.PRNGKey(3), (B, S, A, n))

    def loss(p, autodiff):
        return (rnn.unroll_chunked(agent, p, x, S, autodiff) * weights).sum()

    manual, autodiff = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, a) for a in (False, True))
    np.testing.assert_allclose(manual[0], autodiff[0], rtol=1e-5)
    for g_manual, g_auto in zip(jax.tree.leaves(manual[1]), jax.tree.leaves(autodiff[1]), strict=True):
        np.testing.assert_allclose(g_manual, g_auto, rtol=1e-4, atol=1e-5)
    assert algos.default_config("qmix", gru_autodiff=True).gru_autodiff


def test_lambda_returns_hand_computed():
    r = jnp.array([[1.0, 2.0, 3.0, 0.0]])
    term = jnp.array([[False, False, True, False]])
    v = jnp.array([[10.0, 20.0, 30.0, 40.0]])  # Qbar_{t+1}
    valid_next = jnp.array([[True, True, False, False]])  # three transitions, then padding
    g, lam = 0.5, 0.5
    y = np.asarray(returns.lambda_returns(r, term, v, valid_next, g, lam))[0]
    y2 = 3.0  # terminal
    y1 = 2.0 + g * ((1 - lam) * 20.0 + lam * y2)
    y0 = 1.0 + g * ((1 - lam) * 10.0 + lam * y1)
    np.testing.assert_allclose(y[:3], [y0, y1, y2], rtol=1e-6)
    # lambda = 0 is the one-step target
    y = np.asarray(returns.lambda_returns(r, term, v, valid_next, g, 0.0))[0]
    np.testing.assert_allclose(y[:3], [1 + g * 10, 2 + g * 20, 3.0], rtol=1e-6)
    # per-agent targets (independent Q-learning): rewards broadcast over the agent axis
    y = returns.lambda_returns(r, term, jnp.stack([v, 2 * v], -1), valid_next, g, 0.0)
    assert y.shape == (1, 4, 2)


def test_rollouts_store_whole_aligned_episodes():
    algo = tiny_algo("qmix", num_envs=4, num_steps=64, train_steps=1, batch_size=2, buffer_size=64)
    state = jax.jit(algo.init)(jax.random.PRNGKey(0))
    state, m = jax.jit(algo.update)(state)
    buf = state.buffer
    n = int(buf.size)
    assert n >= 4 and n == int(state.episodes) and float(m["learning"]) == 1.0
    filled = np.asarray(buf.filled[:n])
    lengths = filled.sum(-1) - 1  # transitions: the last filled slot holds the final observation
    assert (lengths >= 1).all()
    for row, length in zip(filled, lengths, strict=True):  # a prefix: steps 0..length filled, nothing after
        assert row[: length + 1].all() and not row[length + 1 :].any()
    step = buf.data["step"]
    term = np.asarray(step["terminated"][:n])
    for i, length in enumerate(lengths):  # SMAX episodes end in a terminal state or at the limit
        assert term[i, length - 1] or length == algo.env.spec.max_steps
        assert not term[i, : length - 1].any()
    avail = np.asarray(step["avail"][:n])
    act = np.asarray(step["action"][:n])
    for i, length in enumerate(lengths):  # every stored action was available
        taken = np.take_along_axis(avail[i, :length], act[i, :length, :, None], -1)
        assert taken.all()


def _toy_hooks():
    """Exercises every extension point: extra trained params, stored fields, extra agent
    inputs, an intrinsic reward and an extra loss."""
    bonus = 0.5

    def init(key):
        return {"emb": jax.random.normal(key, (3, 2))}, {"calls": jnp.zeros((), jnp.int32)}

    def step_fields(ext_params, ext_state, ts, carry, key, greedy):
        cls = jax.random.randint(key, ts.obs.shape[:-1], 0, 3)  # a "class" per agent
        return {"cls": cls}, carry

    def agent_inputs(ext_params, fields):
        return ext_params["emb"][fields["cls"]]

    def intrinsic_reward(params, ext_state, batch, target_next, hp):
        return jnp.full(target_next.shape[:2], bonus)

    def extra_loss(params, target_params, ext_state, batch, key):
        loss = 1e-3 * jnp.sum(params["ext"]["emb"] ** 2)
        return loss, {"emb_norm": loss}

    def after_iteration(ext_state, params, buffer, new_episodes, key, hp):
        return {"calls": ext_state["calls"] + 1}

    return ql.Hooks(
        init=init,
        step_fields=step_fields,
        agent_inputs=agent_inputs,
        extra_input_dim=2,
        intrinsic_reward=intrinsic_reward,
        extra_loss=extra_loss,
        after_iteration=after_iteration,
    )


def test_hooks_reach_buffer_inputs_targets_and_loss():
    env = envs.make("smax:3m")
    cfg = algos.default_config(
        "vdn",
        num_envs=2,
        num_steps=64,
        train_steps=2,
        batch_size=2,
        buffer_size=16,
        hidden=16,
        total_steps=256,
        gamma=0.0,
    )
    algo = ql.make(env, cfg, hooks=_toy_hooks())
    plain = ql.make(env, cfg)
    state = jax.jit(algo.init)(jax.random.PRNGKey(1))
    s1, m = jax.jit(algo.update)(state)
    assert s1.buffer.data["step"]["fields"]["cls"].shape[-1] == env.spec.num_agents
    assert int(s1.ext["calls"]) == 1
    assert not np.allclose(s1.params["ext"]["emb"], state.params["ext"]["emb"])  # trained
    assert float(m["emb_norm"]) > 0 and float(m["intrinsic_reward"]) == pytest.approx(0.5)
    # with gamma = 0 the target is r + bonus: exactly 0.5 above the plain backbone's
    p1, mp = jax.jit(plain.update)(jax.jit(plain.init)(jax.random.PRNGKey(1)))
    assert float(m["target"]) - float(mp["target"]) == pytest.approx(0.5, abs=0.05)
    # the deployment path uses the hook's fields too
    carry = algo.initial_carry((2,))
    _, ts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(2), 2))
    a, _ = jax.jit(algo.act, static_argnums=4)(s1.params, ts, carry, jax.random.PRNGKey(3), True)
    assert a.shape == (2, env.spec.num_agents)


@pytest.mark.parametrize(
    "name,env_name",
    [
        ("qmix", "smax:3m"),
        pytest.param("qplex", "smax:3m", marks=pytest.mark.slow),
        ("vdn", "mpe:simple_spread"),
        ("iql", "mpe:simple_spread"),
    ],
)
def test_vmapped_seeds_train_and_stay_finite(name, env_name):
    algo = tiny_algo(name, env_name, num_envs=2, num_steps=32, train_steps=2, batch_size=2, buffer_size=16)
    r = train(algo, num_iterations=3, num_seeds=2, progress=False)
    assert r.metrics["loss"].shape == (2, 3)
    assert np.isfinite(r.metrics["loss"]).all() and (r.metrics["learning"][:, -1] == 1).all()
    p = r.state.params["agent"]
    leaf = jax.tree.leaves(p)[0]
    assert not np.allclose(leaf[0], leaf[1])  # seeds differ


@pytest.mark.slow
def test_regularizer_in_qlearning_penalty_and_loss_modes():
    from marl.regularizers import RegularizerConfig

    for mode, ref in (("penalty", "rollout"), ("loss", "initial")):
        rc = RegularizerConfig(kind="wasserstein", coef=0.1, mode=mode, reference=ref, iterations=20)
        algo = tiny_algo(
            "qmix",
            "mpe:simple_spread",
            num_envs=2,
            num_steps=32,
            train_steps=2,
            batch_size=2,
            buffer_size=16,
            regularizer=rc,
        )
        r = train(algo, num_iterations=2, num_seeds=1, progress=False)
        assert np.isfinite(r.metrics["regularizer"]).all()
        assert np.isfinite(r.metrics["loss"]).all()


def test_qmix_mixing_weights_start_small():
    """The hypernetworks' output layers start near zero: Q_tot ~ V(s) at init."""
    from marl import mixers as mx

    qmix = mx.make_mixer("qmix", out_init_scale=0.01)
    v = mx.init_mixer(qmix, jax.random.PRNGKey(0), 3, 10, 5)
    qs = jnp.array([[5.0, -3.0, 2.0]])
    s = jax.random.normal(jax.random.PRNGKey(1), (1, 10))
    dq = qmix.apply(v, qs, s) - qmix.apply(v, jnp.zeros_like(qs), s)
    assert abs(float(dq[0])) < 0.05
    big = mx.make_mixer("qmix")
    vb = mx.init_mixer(big, jax.random.PRNGKey(0), 3, 10, 5)
    assert abs(float((big.apply(vb, qs, s) - big.apply(vb, jnp.zeros_like(qs), s))[0])) > 0.5


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="mixer"):
        algos.default_config("qmix", mixer="qmax")
    with pytest.raises(ConfigError, match="batch_size"):
        algos.default_config("qmix", batch_size=64, buffer_size=32)
    with pytest.raises(ConfigError, match="td_lambda"):
        algos.default_config("qmix", td_lambda=1.5)
    with pytest.raises(ConfigError, match="env"):
        algos.make("qmix", envs.make("adv:pendulum"))  # continuous actions


@pytest.mark.slow
def test_vdn_learns_to_reach_the_landmark_on_mpe_simple():
    """A short learning check on a real env: 20k steps (~800 episodes, 16 gradient steps per
    512 env steps) take the greedy return from about -46 (initial network) to above -30."""
    from marl.evaluation import evaluate_seeds

    env = envs.make("mpe:simple")
    algo = algos.make(
        "vdn",
        env,
        total_steps=20_000,
        epsilon_anneal_steps=10_000,
        target_update_episodes=50,
        buffer_size=1000,
        train_steps=16,
    )
    r = train(algo, num_iterations=algo.config.num_updates, num_seeds=1, progress=False)
    key = jax.random.PRNGKey(7)
    trained = float(evaluate_seeds(algo, r.state.params, key, 64)["return"].mean())
    initial_params = jax.tree.map(lambda x: x[None], algo.init(key).params)
    initial = float(evaluate_seeds(algo, initial_params, key, 64)["return"].mean())
    assert trained > -30.0 and trained > initial + 10.0, (trained, initial)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qmix"])
def test_qmix_learns_smax_3m(name):
    """QMIX on smax:3m, 1M env steps: greedy win rate >= 0.5 (2M steps reach >= 0.8; see README)."""
    from marl.evaluation import evaluate_seeds

    env = envs.make("smax:3m")
    algo = algos.make(name, env, train_steps=4, total_steps=1_000_000)
    r = train(algo, num_iterations=algo.config.num_updates, num_seeds=1, progress=False)
    ev = evaluate_seeds(algo, r.state.params, jax.random.PRNGKey(7), 64)
    assert float(ev["win_rate"].mean()) >= 0.5


def test_max_over_seeds_inside_and_outside_the_runner_vmap():
    from marl.types import SEED_AXIS, max_over_seeds

    x = jnp.array([3.0, 7.0, 5.0])
    np.testing.assert_array_equal(jax.vmap(max_over_seeds, axis_name=SEED_AXIS)(x), [7.0, 7.0, 7.0])
    np.testing.assert_array_equal(jax.jit(max_over_seeds)(x), x)
