"""Mixers: VDN sum, QMIX monotonicity, QPLEX duplex dueling (IGM), shapes and the factory.

One set of shapes ([B, T] = [4, 5], A = 3 agents, S = 6, n = 4 actions) and a few jitted
functions reused everywhere: compilation dominates on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marl import mixers
from marl.config import ConfigError

B, T, A, S, N = 4, 5, 3, 6, 4
DRAWS = 16  # random parameter draws (vmapped)


@functools.partial(jax.jit, static_argnums=1)
def random_inputs(key, draws=DRAWS):
    """Per-agent Q tables, a random joint action, its utilities, the greedy ones, states."""
    k_table, k_act, k_state = jax.random.split(key, 3)
    tables = 3.0 * jax.random.normal(k_table, (draws, B, T, A, N))
    actions = jax.random.randint(k_act, (draws, B, T, A), 0, N)
    states = 2.0 * jax.random.normal(k_state, (draws, B, T, S))
    qs = jnp.take_along_axis(tables, actions[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(tables, axis=-1)
    return tables, actions, qs, jnp.max(tables, axis=-1), greedy, states


def init_draws(mixer, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), DRAWS)
    # vmap over the init keys: safe because no initializer here does a QR decomposition.
    return jax.jit(jax.vmap(lambda k: mixers.init_mixer(mixer, k, A, S, N)))(keys)


@pytest.fixture(scope="module")
def qplex():
    mixer = mixers.make_mixer("qplex")
    return mixer, init_draws(mixer, seed=1)


@pytest.fixture(scope="module")
def qmix():
    mixer = mixers.make_mixer("qmix")
    return mixer, init_draws(mixer, seed=2)


@pytest.mark.timeout(120)
def test_vmapped_init_over_seeds_terminates_and_differs(qmix, qplex):
    """Guards the batched-QR deadlock: the mixers init under vmap over seeds (in the fixtures)."""
    for _, params in (qmix, qplex):
        kernels = [
            x for path, x in jax.tree_util.tree_leaves_with_path(params) if "kernel" in jax.tree_util.keystr(path)
        ]
        assert kernels and all(k.shape[0] == DRAWS for k in kernels)
        assert not np.allclose(kernels[0][0], kernels[0][1])


def test_vdn_is_the_sum_and_has_no_parameters():
    mixer = mixers.make_mixer("vdn")
    variables = mixers.init_mixer(mixer, jax.random.PRNGKey(0), A, S, N)
    assert jax.tree.leaves(variables) == []
    _, _, qs, _, _, states = random_inputs(jax.random.PRNGKey(0), draws=1)
    q_tot = jax.jit(mixer.apply)(variables, qs[0], states[0])
    np.testing.assert_allclose(np.asarray(q_tot), np.asarray(qs[0].sum(-1)), rtol=1e-6)


def test_qmix_is_monotonic_in_every_agent_utility(qmix):
    mixer, params = qmix

    def dq(variables, qs, states):
        # Each q_tot[b, t] depends only on qs[b, t], so the gradient of the sum holds every partial.
        return jax.grad(lambda q: mixer.apply(variables, q, states).sum())(qs)

    dq = jax.jit(jax.vmap(dq))
    apply = jax.jit(jax.vmap(mixer.apply))
    for seed in range(3):
        _, _, qs, _, _, states = random_inputs(jax.random.PRNGKey(seed))
        qs = qs * (1 + 10 * seed)  # also far outside the init scale
        grads = np.asarray(dq(params, qs, states))
        assert grads.shape == (DRAWS, B, T, A)
        assert (grads >= 0).all()
        assert (grads > 0).mean() > 0.9
        # ... and it is not just a (weighted) sum: the mixing depends on the state.
        q_tot = apply(params, qs, states)
        assert np.std(np.asarray(q_tot - qs.sum(-1))) > 1e-3


def test_qplex_duplex_dueling_zero_advantage_at_greedy_action(qplex):
    mixer, params = qplex
    call = jax.jit(jax.vmap(lambda v, q, s, a, m: mixer.apply(v, q, s, a, m)))
    value = jax.jit(jax.vmap(lambda v, q, s: mixer.apply(v, q, s)))
    parts = jax.jit(jax.vmap(lambda v, q, s, a, m: mixer.apply(v, q, s, a, m, method=mixer.decompose)))
    onehot = lambda a: jax.nn.one_hot(a, N)  # noqa: E731
    for seed in range(3):
        tables, actions, qs, max_qs, greedy, states = random_inputs(jax.random.PRNGKey(10 + seed))
        # Random (mostly off-greedy) joint actions: A_tot <= 0, Q_tot = V_tot + A_tot.
        v_tot, a_tot = parts(params, qs, states, onehot(actions), max_qs)
        q_tot = call(params, qs, states, onehot(actions), max_qs)
        assert q_tot.shape == (DRAWS, B, T)
        np.testing.assert_allclose(np.asarray(q_tot), np.asarray(v_tot + a_tot), rtol=1e-5, atol=1e-4)
        a_tot = np.asarray(a_tot)
        off_greedy = np.asarray((actions != greedy).any(-1))
        assert (a_tot <= 0).all()
        assert (a_tot[off_greedy] < 0).mean() > 0.99 and off_greedy.mean() > 0.5
        # Greedy joint action: every Q_i == V_i, so A_tot == 0 exactly and Q_tot == V_tot.
        v_greedy, a_greedy = parts(params, max_qs, states, onehot(greedy), max_qs)
        assert (np.asarray(a_greedy) == 0).all()
        q_greedy = call(params, max_qs, states, onehot(greedy), max_qs)
        np.testing.assert_allclose(np.asarray(q_greedy), np.asarray(v_greedy), rtol=1e-6, atol=1e-5)
        # The value path (no actions: the double-Q target) is the same V_tot.
        np.testing.assert_allclose(np.asarray(value(params, max_qs, states)), np.asarray(v_greedy), rtol=1e-6)
        # IGM: the greedy joint action maximizes Q_tot (V_tot depends only on s and max_qs).
        np.testing.assert_allclose(np.asarray(v_tot), np.asarray(v_greedy), rtol=1e-6, atol=1e-5)
        assert (np.asarray(q_tot) <= np.asarray(q_greedy) + 1e-4).all()


def test_qplex_gradients_follow_the_official_stop_gradient(qplex):
    mixer, params = qplex
    params = jax.tree.map(lambda x: x[0], params)
    tables, actions, qs, max_qs, _, states = random_inputs(jax.random.PRNGKey(5), draws=1)
    qs, max_qs, states, act = qs[0], max_qs[0], states[0], jax.nn.one_hot(actions[0], N)

    def loss(variables, q):
        return mixer.apply(variables, q, states, act, max_qs).sum()

    g_params, g_qs = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, qs)
    # dQ_tot/dQ_i = w_i(s) > 0, the gradient of the value path sum_i (w_i Q_i + b_i) alone:
    # the advantage term is stop-gradiented ...
    w = jax.jit(jax.grad(lambda q: mixer.apply(params, q, states).sum()))(qs)
    assert (np.asarray(g_qs) > 0).all()
    np.testing.assert_allclose(np.asarray(g_qs), np.asarray(w), rtol=1e-5)
    # ... while the advantage weights lambda(s, a) still learn through A_tot.
    adv_grads = [
        np.abs(np.asarray(x)).sum()
        for path, x in jax.tree_util.tree_leaves_with_path(g_params)
        if "adv_action" in jax.tree_util.keystr(path)
    ]
    assert adv_grads and sum(adv_grads) > 0


def test_shapes_with_leading_batch_and_time_dims_under_jit(qplex):
    _, _, qs, max_qs, greedy, states = random_inputs(jax.random.PRNGKey(7), draws=1)
    qs, max_qs, states, act = qs[0], max_qs[0], states[0], jax.nn.one_hot(greedy[0], N)
    qplex_params = jax.tree.map(lambda x: x[0], qplex[1])
    for name in mixers.MIXERS:
        mixer = qplex[0] if name == "qplex" else mixers.make_mixer(name)
        variables = qplex_params if name == "qplex" else mixers.init_mixer(mixer, jax.random.PRNGKey(0), A, S, N)
        q_tot, reg = jax.jit(lambda v, m=mixer: mixers.apply_with_aux(m, v, qs, states, act, max_qs))(variables)
        assert q_tot.shape == ((B, T, A) if name == "none" else (B, T)), name
        assert reg.shape == (B, T) and (np.asarray(reg) >= 0).all()
        assert np.isfinite(np.asarray(q_tot)).all()
        if name == "none":  # independent Q-learning: utilities pass through
            np.testing.assert_array_equal(np.asarray(q_tot), np.asarray(qs))
        if name == "qplex":
            assert (np.asarray(reg) > 0).all()  # Qatten's attention-logit regularizer
        else:
            assert not np.asarray(reg).any()


def test_make_mixer_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(ConfigError, match="mixer") as err:
        mixers.make_mixer("qtran")
    assert err.value.field == "mixer" and "qtran" in str(err.value) and "qplex" in str(err.value)
    with pytest.raises(ConfigError) as err:
        mixers.make_mixer("qplex", adv_hypernet_layers=4)
    assert err.value.field == "adv_hypernet_layers"
    with pytest.raises(ConfigError) as err:
        mixers.make_mixer("qmix", embed_dim=0)
    assert err.value.field == "embed_dim"
    assert isinstance(mixers.make_mixer("qmix", embed_dim=8), mixers.QMIX)
