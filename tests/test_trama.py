"""TRAMA: quantizer, coverage indices, k-means, classifier and class predictor, vmapped hooks.

The hook-level tests run on a spec-only environment and synthetic buffers, so they
compile in seconds; the end-to-end training run is marked slow.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import algos
from algos import trama
from marl import buffers, clustering
from marl.config import ConfigError
from marl.types import SEED_AXIS, EnvSpec

A, OBS, S, L = 3, 6, 8, 7  # agents, obs size, state size, episode limit
C, K = 64, 4  # buffer rows, classes


class SpecOnly:
    spec = EnvSpec(name="toy", num_agents=A, obs_dim=OBS, state_dim=S, max_steps=L, num_actions=5)


def small_config(**kw):
    base = dict(
        num_envs=2,
        num_steps=8,
        train_steps=2,
        batch_size=16,
        buffer_size=C,
        hidden=16,
        total_steps=16,
        n_codes=16,
        n_clusters=K,
        predictor_hidden=16,
        class_repr_dim=8,
        cluster_start=0,
        min_cluster_episodes=8,
        classifier_steps=200,
        kmeans_iterations=10,
        vq_every_step_until=10**9,
    )
    return trama.TRAMAConfig(**{**base, **kw})


def synthetic_buffer(key, n_rows=C):
    """Episodes of 4 kinds: kind c's states are 3 e_c at every step and its agents see c
    in their obs."""
    k_len, k_kind, k_uid = jax.random.split(key, 3)
    kind = jax.random.randint(k_kind, (n_rows,), 0, K)
    length = jax.random.randint(k_len, (n_rows,), 3, L + 1)  # transitions
    t = jnp.arange(L + 1)
    filled = t[None] <= length[:, None]
    obs = jnp.zeros((n_rows, L + 1, A, OBS)).at[..., :K].set(jax.nn.one_hot(kind, K)[:, None, None])
    state = jnp.broadcast_to(3.0 * jax.nn.one_hot(kind, S)[:, None], (n_rows, L + 1, S))
    uid = jnp.broadcast_to(jax.random.randint(k_uid, (n_rows, 1), 0, 2**30), (n_rows, L + 1))
    fields = {"cls": jnp.zeros((n_rows, L + 1, A), jnp.int32), "uid": uid.astype(jnp.int32)}
    step = {"obs": obs, "state": state, "fields": fields}
    buf = buffers.EpisodeBuffer(
        data={"step": step}, filled=filled, insert_pos=jnp.zeros((), jnp.int32), size=jnp.asarray(n_rows, jnp.int32)
    )
    return buf, kind


def as_batch(buf, rows):
    data, filled = buffers.gather(buf, rows)
    return {**data["step"], "filled": filled}


def test_straight_through_gradient_of_the_quantizer():
    vq = trama.VQVAE(S, 4, 16, 16)
    p = vq.init(jax.random.PRNGKey(0), jnp.zeros((1, S)))
    s = jax.random.normal(jax.random.PRNGKey(1), (5, S))
    w = jax.random.normal(jax.random.PRNGKey(2), (5, 4))
    z_e, z_q, idx, _ = vq.apply(p, s)
    book = vq.apply(p, method=trama.VQVAE.codes)
    np.testing.assert_allclose(z_q, book[idx], atol=1e-6)  # forward: the nearest code
    d = jnp.linalg.norm(z_e[:, None] - book[None], axis=-1)
    np.testing.assert_array_equal(idx, jnp.argmin(d, -1))
    # backward: dz_q/dz_e = I, so the encoder gets the gradient it would get from z_e
    g_q = jax.grad(lambda x: (w * vq.apply(p, x)[1]).sum())(s)
    g_e = jax.grad(lambda x: (w * vq.apply(p, x, method=trama.VQVAE.encode)).sum())(s)
    np.testing.assert_allclose(g_q, g_e, rtol=1e-5, atol=1e-6)
    assert np.abs(g_q).sum() > 0


def test_coverage_table():
    # 16 codes, 4 classes -> 4 codes per class; 8 slots -> dn = 0.5: one code per (t, k)
    j = trama.coverage_table(16, 4, 8)
    assert j.shape == (8, 4, 16) and (j.sum(-1) == 1).all()
    for t in range(8):
        for k in range(4):
            assert np.flatnonzero(j[t, k]).tolist() == [4 * k + t // 2]
    # 2 slots -> dn = 2: two codes per (t, k); time slices partition each class's slice
    j = trama.coverage_table(16, 4, 2)
    assert np.flatnonzero(j[0, 1]).tolist() == [4, 5] and np.flatnonzero(j[1, 1]).tolist() == [6, 7]
    assert (j.sum(0) == np.repeat(np.eye(4, dtype=bool), 4, axis=1)).all()


def test_kmeans_recovers_separated_blobs():
    key = jax.random.PRNGKey(3)
    centres = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = jnp.repeat(jnp.arange(4), 50)
    x = centres[truth] + 0.5 * jax.random.normal(key, (200, 2))
    x = jnp.concatenate([x, jnp.full((20, 2), 1e3)])  # masked-out rows must not count
    mask = jnp.arange(220) < 200
    run = jax.jit(lambda k, init: clustering.kmeans(x, mask, init, 10))
    init = clustering.kmeans_pp_init(jax.random.PRNGKey(4), x, mask, 4)
    cents, assign, counts = run(key, init)
    assign = np.asarray(assign[:200])
    # each blob is one cluster, and the clusters differ
    mapping = [np.unique(assign[np.asarray(truth) == b]) for b in range(4)]
    assert all(len(m) == 1 for m in mapping) and len({int(m[0]) for m in mapping}) == 4
    np.testing.assert_allclose(np.sort(np.asarray(cents), 0), np.sort(np.asarray(centres), 0), atol=0.3)
    assert int(counts.sum()) == 200
    # warm start from the previous centroids keeps the labels
    _, again, _ = run(key, cents)
    np.testing.assert_array_equal(np.asarray(again[:200]), assign)


CONFIG = small_config(vq_lr=1e-2, classifier_steps=100)


@pytest.fixture(scope="module")
def clustered():
    """One clustering of the synthetic buffer (shared: compiled once)."""
    hooks = trama.make_hooks(SpecOnly, CONFIG)
    params, ext0 = hooks.init(jax.random.PRNGKey(0))
    buf, kind = synthetic_buffer(jax.random.PRNGKey(1))
    ext1 = jax.jit(hooks.after_iteration)(ext0, None, buf, jnp.asarray(0), jax.random.PRNGKey(2))
    return hooks, params, ext0, ext1, buf, kind


def test_clustering_trains_the_classifier_and_labels_the_buffer(clustered):
    _, _, ext, new, buf, kind = clustered
    assert bool(new.clustered) and int(new.nonempty) >= 3
    # labels agree with the episode kinds up to a permutation
    lab, kind = np.asarray(new.label), np.asarray(kind)
    assert (lab >= 0).all()
    for c in range(K):
        assert len(np.unique(lab[kind == c])) == 1
    # the classifier learned them: its loss fell from chance
    trans = jnp.concatenate([buf.filled[:, 1:], jnp.zeros_like(buf.filled[:, :1])], 1)
    vq = trama.VQVAE(S, CONFIG.latent_dim, CONFIG.vq_hidden, CONFIG.n_codes)
    codes = trama.state_codes(vq, new.vq_params, buf.data["step"]["state"])
    emb = trama.trajectory_embedding(new.vq_params["params"]["codebook"], codes, trans)
    clf = trama.Classifier(K)

    def ce(p):
        return float(optax.softmax_cross_entropy_with_integer_labels(clf.apply(p, emb), new.label).mean())

    assert ce(ext.clf_params) > 1.0  # about log 4 before training
    assert ce(new.clf_params) < 0.5 * ce(ext.clf_params)


def test_class_predictor_loss_falls(clustered):
    hooks, params, _, ext, buf, _ = clustered
    batch = as_batch(buf, jnp.arange(16))
    full = {"ext": params}
    tx = optax.adam(1e-2)
    opt = tx.init(full)

    @jax.jit
    def step(full, opt):
        (loss, m), g = jax.value_and_grad(hooks.extra_loss, has_aux=True)(full, None, ext, batch, None)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(full, u), opt, m

    losses = []
    for _ in range(60):
        full, opt, m = step(full, opt)
        losses.append(float(m["class_loss"]))
    assert losses[0] > 1.0 and losses[-1] < 0.3 * losses[0], losses[::10]
    assert float(m["class_accuracy"]) > 0.9
    assert "cluster_ari" not in m  # the spec-only env reports no task ids


def test_hooks_under_jit_and_vmap_over_two_seeds():
    """after_iteration (VQ-VAE phase + clustering, lax.cond on seed-maximized conditions)
    and the extra loss's gradient, vmapped over seeds with the runner's axis name."""
    config = CONFIG
    hooks = trama.make_hooks(SpecOnly, config)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params, ext = jax.vmap(hooks.init)(keys)
    bufs, _ = jax.vmap(synthetic_buffer)(keys)

    @jax.jit
    def one(ext, params, buf, key):
        def seed(ext, params, buf, key):
            ext = hooks.after_iteration(ext, None, buf, jnp.asarray(4), key)
            batch = as_batch(buf, jnp.arange(8))
            g = jax.grad(lambda p: hooks.extra_loss(p, None, ext, batch, key)[0])({"ext": params})
            return ext, g

        return jax.vmap(seed, axis_name=SEED_AXIS)(ext, params, buf, key)

    recon = []
    for i in range(8):
        ext, g = one(ext, params, bufs, jax.random.split(jax.random.PRNGKey(10 + i), 2))
        recon.append(np.asarray(ext.vq_loss[:, 1]))
    assert ext.clustered.shape == (2,) and bool(ext.clustered.all())
    assert int(ext.env_steps[0]) == 8 * config.num_envs * config.num_steps
    leaves = jax.tree.leaves(g)
    assert all(np.isfinite(x).all() for x in leaves)
    assert sum(float(np.abs(x).sum()) for x in leaves) > 0  # the class loss reaches the predictor
    assert (recon[-1] < recon[0]).all()  # the VQ-VAE trains (its own Adam)
    assert not np.allclose(ext.vq_params["params"]["codebook"][0], ext.vq_params["params"]["codebook"][1])
    assert bool(ext.book_ready.all()) and (np.asarray(ext.codes_in_use) >= 1).all()
    np.testing.assert_allclose(np.asarray(ext.cluster_sizes).sum(-1), 1.0, rtol=1e-5)


def test_class_representation_detached_variant():
    for detach in (False, True):
        hooks = trama.make_hooks(SpecOnly, small_config(detach_class_repr=detach))
        params, _ = hooks.init(jax.random.PRNGKey(0))
        fields = {"cls": jnp.array([[0, 1, 3]])}

        def total(p, hooks=hooks, fields=fields):
            return hooks.agent_inputs(p, fields).sum()

        g = jax.grad(total)(params)
        norm = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(g["repr"]))
        assert (norm == 0) == detach


def ari_numpy(a, b, mask):
    """Adjusted Rand index from the pair counts of the contingency table (0 when undefined)."""
    a, b = np.asarray(a)[np.asarray(mask)], np.asarray(b)[np.asarray(mask)]
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max(initial=-1) + 1, ib.max(initial=-1) + 1))
    np.add.at(table, (ia, ib), 1)

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    index, sa, sb, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array(len(a)))
    expected = sa * sb / total if total else 0.0
    top = (sa + sb) / 2
    return 0.0 if top == expected else (index - expected) / (top - expected)


def test_adjusted_rand_index_matches_numpy():
    ari = jax.jit(clustering.adjusted_rand_index, static_argnums=(3, 4))
    rng = np.random.default_rng(0)
    n, na, nb = 60, 4, 3
    for trial in range(6):
        a, b = rng.integers(0, na, n), rng.integers(0, nb, n)
        if trial % 2:  # correlated labelings: b mostly a function of a
            b = np.where(rng.random(n) < 0.8, a % nb, b)
        mask = rng.random(n) < (1.0 if trial < 2 else 0.7)
        got = float(ari(jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask), na, nb))
        np.testing.assert_allclose(got, ari_numpy(a, b, mask), atol=1e-5)
        # masked-out items do not count, whatever their labels
        a2 = np.where(mask, a, rng.integers(0, na, n))
        assert abs(float(ari(jnp.asarray(a2), jnp.asarray(b), jnp.asarray(mask), na, nb)) - got) < 1e-6
    # a renamed copy of a labeling agrees perfectly
    a = rng.integers(0, 4, n)
    perm = np.array([2, 0, 3, 1])
    assert abs(float(ari(jnp.asarray(a), jnp.asarray(perm[a]), jnp.ones(n, bool), 4, 4)) - 1.0) < 1e-6
    # undefined cases give a finite 0: one cluster each, all singletons, fewer than 2 items
    one = jnp.zeros(n, jnp.int32)
    for args in (
        (one, one, jnp.ones(n, bool), 4, 3),
        (jnp.arange(5), jnp.arange(5), jnp.ones(5, bool), 5, 5),
        (one, one, jnp.arange(n) < 1, 4, 3),
        (one, one, jnp.zeros(n, bool), 4, 3),
    ):
        v = float(ari(*args))
        assert np.isfinite(v) and v == 0.0
    # one side a single cluster: no agreement beyond chance
    assert abs(float(ari(one, jnp.asarray(b), jnp.ones(n, bool), 4, 3))) < 1e-6


def test_episode_task_skips_unknown_and_padding_steps():
    task = jnp.array([[-1, 1, 1, 0, 0], [2, 2, 0, 0, 0], [-1, 0, 0, 0, 0]])
    valid = jnp.array(
        [[True, True, True, False, False], [True, True, False, False, False], [True, False, False, False, False]]
    )
    np.testing.assert_array_equal(trama.episode_task(task, valid), [1, 2, -1])


@pytest.mark.slow
def test_multitask_env_task_ids_in_the_buffer_and_cluster_ari():
    """A tiny TRAMA run on a two-task SMAX: task ids are stored per step (unknown at an
    auto-reset step), never reach the agents' inputs, and cluster_ari is logged."""
    import envs
    from marl.runner import train

    # task 0: two marines, task 1: two marauders; the world state ends with the 4 unit type ids
    env = envs.make("smax-mt:custom", tasks=[{"units": {"marine": 2}}, {"units": {"marauder": 2}}], max_steps=5)
    config = small_config(
        num_envs=4,
        num_steps=8,
        batch_size=4,
        buffer_size=16,
        n_clusters=2,
        min_clusters=1,
        min_cluster_episodes=4,
        cluster_interval=1,
        classifier_steps=5,
        kmeans_iterations=5,
        n_codes=8,
        mixer="vdn",
        total_steps=3 * 32,
    )
    hooks = trama.make_hooks(env, config)
    params, _ = hooks.init(jax.random.PRNGKey(0))
    fields = {"cls": jnp.array([[0, 1]]), "task": jnp.array([0])}
    np.testing.assert_array_equal(
        hooks.agent_inputs(params, fields), hooks.agent_inputs(params, {**fields, "task": jnp.array([1])})
    )

    algo = algos.make("trama", env, config)
    r = train(algo, num_iterations=3, progress=False)
    assert r.metrics["cluster_ari"].shape == (1, 3) and np.isfinite(r.metrics["cluster_ari"]).all()
    ext, buf = r.state.ext, r.state.buffer
    assert bool(ext.clustered[0])
    filled = np.asarray(buf.filled[0])
    task = np.asarray(buf.data["step"]["fields"]["task"][0])
    state = np.asarray(buf.data["step"]["state"][0])
    rows = filled[:, 0]
    assert rows.sum() >= 4
    trans = np.concatenate([filled[:, 1:], np.zeros_like(filled[:, :1])], 1)
    ep_task = np.asarray(trama.episode_task(jnp.asarray(task), jnp.asarray(trans)))
    truth = state[:, 0, -1].astype(int)  # marine is SMAX unit type 0, marauder 1
    assert set(ep_task[rows].tolist()) <= {-1, 0, 1}
    known = rows & (ep_task >= 0)
    assert known.sum() >= 4
    np.testing.assert_array_equal(ep_task[known], truth[known])
    # every known step of an episode holds its task; unknown (-1) only at slot 0
    for r_ in np.flatnonzero(known):
        steps = task[r_][trans[r_]]
        assert set(steps[1:].tolist()) == {ep_task[r_]} or len(steps) == 1
        assert steps[0] in (-1, ep_task[r_])
    assert (task[known, 0] == -1).any()  # episodes after an auto-reset
    # the logged index is the one of the stored labels against the true tasks
    label = np.asarray(ext.label[0])
    expected = ari_numpy(label, ep_task, rows & (ep_task >= 0) & (label >= 0))
    np.testing.assert_allclose(float(ext.ari[0]), expected, atol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_codes"):
        small_config(n_codes=10)
    with pytest.raises(ConfigError, match="min_clusters"):
        small_config(min_clusters=5)
    with pytest.raises(ConfigError, match="classifier_lr"):
        small_config(classifier_lr=0.0)
    assert algos.default_config("trama").mixer == "qplex"


@pytest.mark.slow
def test_trama_trains_end_to_end_vmapped():
    import envs
    from marl.runner import train

    env = envs.make(
        "smax-mt:custom", tasks=[{"units": {"marine": 2}}, {"units": {"marine": 1, "marauder": 2}}], max_steps=20
    )
    config = dataclasses.replace(
        algos.default_config("trama"),
        num_envs=4,
        num_steps=16,
        train_steps=2,
        batch_size=4,
        buffer_size=32,
        hidden=16,
        total_steps=4 * 16 * 6,
        cluster_start=0,
        min_cluster_episodes=8,
        cluster_interval=64,
        classifier_steps=20,
        n_codes=16,
        predictor_hidden=16,
    )
    algo = algos.make("trama", env, config)
    r = train(algo, num_iterations=6, num_seeds=2, progress=False)
    assert r.metrics["loss"].shape == (2, 6) and np.isfinite(r.metrics["loss"]).all()
    assert (r.metrics["clustered"][:, -1] == 1).all() and (r.metrics["class_loss"][:, -1] > 0).all()
    fields = r.state.buffer.data["step"]["fields"]
    assert "code" not in fields and fields["cls"].max() < 4  # codes come from the stored states
    assert (r.metrics["codes_in_use"][:, -1] > 1).all()


def tiny_vq():
    vq = trama.VQVAE(3, 2, 8, 4)
    params = vq.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
    book = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    return vq, trama.with_codebook(params, book)


def test_vq_loss_terms_masks_and_gradients():
    vq, params = tiny_vq()
    s = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3))
    valid = jnp.arange(5)[None] < jnp.array([[3], [5]])
    cover = jnp.zeros((2, 5, 4)).at[..., 2].set(1.0)  # every step is pulled toward code 2
    z_e = vq.apply(params, s, method=trama.VQVAE.encode)
    book = params["params"]["codebook"]
    idx = trama.nearest_code(z_e, book)
    s_hat = vq.apply(params, book[idx], method=trama.VQVAE.decode)
    w = np.asarray(valid, np.float32)

    def mean(x):
        return float((np.asarray(x) * w).sum() / w.sum())

    total, (parts, got_idx, _) = trama.vq_loss(vq, params, s, valid, cover, (1.0, 0.25, 0.125, 0.5))
    d2 = ((book[idx] - z_e) ** 2).sum(-1)
    expected = [mean(((s_hat - s) ** 2).mean(-1)), mean(d2), mean(d2), mean(((z_e - book[2]) ** 2).sum(-1))]
    np.testing.assert_allclose(parts[1:], expected, rtol=1e-5)
    np.testing.assert_allclose(
        total, expected[0] + 0.25 * expected[1] + 0.125 * expected[2] + 0.5 * expected[3], rtol=1e-5
    )
    np.testing.assert_array_equal(got_idx, idx)
    # padded steps do not count
    s2 = jnp.where(valid[..., None], s, 100.0)
    np.testing.assert_allclose(
        trama.vq_loss(vq, params, s2, valid, cover, (1.0, 0.25, 0.125, 0.5))[0], total, rtol=1e-5
    )

    def grads(coefs):
        g = jax.grad(lambda p: trama.vq_loss(vq, p, s, valid, cover, coefs)[0])(params)["params"]
        enc = sum(float(np.abs(x).sum()) for k, v in g.items() if k.startswith("enc") for x in jax.tree.leaves(v))
        return enc, float(np.abs(g["codebook"]).sum())

    enc, cb = grads((0.0, 1.0, 0.0, 0.0))  # codebook term: codes move, the encoder does not
    assert enc == 0 and cb > 0
    enc, cb = grads((0.0, 0.0, 1.0, 0.0))  # commitment: the encoder moves, the codes do not
    assert enc > 0 and cb == 0
    enc, cb = grads((0.0, 0.0, 0.0, 1.0))  # coverage: only code 2 moves
    g = jax.grad(lambda p: trama.vq_loss(vq, p, s, valid, cover, (0.0, 0.0, 0.0, 1.0))[0])(params)
    assert enc == 0 and np.abs(np.asarray(g["params"]["codebook"]))[[0, 1, 3]].sum() == 0 and cb > 0


def test_vq_loss_terms_by_hand():
    """L_VQ of the module docstring on hand-picked arrays (D = 1, two codes, a padded step)."""
    codes = jnp.array([[0.0], [2.0]])
    z_e = jnp.array([[0.5], [1.2], [3.0]])
    idx = jnp.array([0, 1, 1])
    s = jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    s_hat = jnp.array([[1.0, 1.0], [0.0, 3.0], [0.0, 0.0]])
    valid = jnp.array([True, True, False])
    cover = jnp.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # J(t, k) of each step
    coefs = (1.0, 0.25, 0.125, 0.5)
    # recon: mean_f (s^ - s)^2 = 0.5 and 2.0; vq = commit: (e_x - z_e)^2 = 0.25 and 0.64;
    # coverage: 2.25 (code 1) and (1.44 + 0.64) / 2 = 1.04 (codes 0, 1); the padded step
    # does not count
    recon, vq_term, coverage = (0.5 + 2.0) / 2, (0.25 + 0.64) / 2, (2.25 + 1.04) / 2
    expected_total = 1.0 * recon + 0.25 * vq_term + 0.125 * vq_term + 0.5 * coverage
    total, parts = trama.vq_loss_terms(s, s_hat, z_e, idx, codes, valid, cover, coefs)
    np.testing.assert_allclose(total, expected_total, rtol=1e-6)
    np.testing.assert_allclose(parts, [expected_total, recon, vq_term, vq_term, coverage], rtol=1e-6)

    # stop-gradients: the codebook term moves only the codes, the commitment only z_e
    def grads(c):
        return jax.grad(lambda z, b: trama.vq_loss_terms(s, s_hat, z, idx, b, valid, cover, c)[0], (0, 1))(z_e, codes)

    g_z, g_b = grads((0.0, 1.0, 0.0, 0.0))
    np.testing.assert_array_equal(g_z, 0.0)
    np.testing.assert_allclose(g_b[:, 0], [2 * (0.0 - 0.5) / 2, 2 * (2.0 - 1.2) / 2], rtol=1e-6)
    g_z, g_b = grads((0.0, 0.0, 1.0, 0.0))
    np.testing.assert_array_equal(g_b, 0.0)
    np.testing.assert_allclose(g_z[:, 0], [2 * (0.5 - 0.0) / 2, 2 * (1.2 - 2.0) / 2, 0.0], rtol=1e-6)


def test_dead_codes_restart_at_encoder_outputs_and_codebook_starts_from_data():
    vq, params = tiny_vq()
    book = params["params"]["codebook"]
    z_e = jnp.arange(12.0).reshape(6, 2) + 10.0
    valid = jnp.array([True, True, False, True, False, False])
    new = trama.restart_dead_codes(book, jnp.array([0.0, 3.0, 0.0, 1.0]), z_e, valid, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(new[1], book[1])
    np.testing.assert_array_equal(new[3], book[3])
    for j in (0, 2):  # restarted at a valid step's encoder output
        assert any(np.array_equal(new[j], z_e[i]) for i in (0, 1, 3))
    s = jax.random.normal(jax.random.PRNGKey(2), (40, 3))
    ok = jnp.arange(40) < 30
    started = trama.codebook_from_data(vq, params, s, ok, jax.random.PRNGKey(3))["params"]["codebook"]
    z = np.asarray(vq.apply(params, s[:30], method=trama.VQVAE.encode))
    assert all(np.abs(z - np.asarray(c)).sum(-1).min() < 1e-6 for c in started)
    # vq_update: the check runs every dead_code_window steps and resets the counts
    tx = optax.adam(1e-3)
    cover = jnp.zeros((40, 4))
    state = (params, tx.init(params), jnp.zeros(4), jnp.zeros((), jnp.int32))
    for i in range(3):
        *state, parts, in_use = trama.vq_update(
            vq, tx, *state, s, ok, cover, (1.0, 0.25, 0.125, 0.0), 3, jax.random.PRNGKey(i)
        )
        assert 1 <= float(in_use) <= 4 and np.isfinite(np.asarray(parts)).all()
    assert int(state[3]) == 3 and float(np.asarray(state[2]).sum()) == 0.0


def test_vq_cadence_keeps_the_remainder():
    """One VQ-VAE step per vq_update_episodes finished episodes: 60 episodes arriving 6 per
    iteration give 6 steps (not one per two iterations); every step early on."""
    config = small_config(vq_every_step_until=1000, vq_update_episodes=10, train_steps=2)
    episodes, last, total = 0, 0, 0
    for it in range(10):
        episodes += 6
        n, last = trama.vq_schedule(2000 + it, episodes, last, True, config)
        total += int(n)
    assert total == 6 and int(last) == 60
    n, last = trama.vq_schedule(500, 66, 60, True, config)  # early: every iteration, owed count restarts
    assert int(n) == 2 and int(last) == 66
    assert int(trama.vq_schedule(2000, 100, 0, False, config)[0]) == 0  # buffer too small
    n, last = trama.vq_schedule(2000, 1000, 0, True, config)  # a long backlog is capped
    assert int(n) == 2 and int(last) == 1000 - 40


def test_majority_rate():
    labels = jnp.array([0, 1, 1, 2])
    np.testing.assert_allclose(clustering.majority_rate(labels, jnp.array([5, 1, 1, 1]), 3), 5 / 8)
    np.testing.assert_allclose(clustering.majority_rate(labels, jnp.ones(4), 3), 0.5)


@pytest.mark.slow
def test_vq_embeddings_recover_the_tasks_on_surcomb3():
    """300 random-policy surComb3 episodes (fixed key, limit 50): 640 VQ-VAE steps with
    TRAMA's defaults (random coverage classes, as before a first clustering), then
    trajectory embeddings and k-means with K = 4 match the true tasks (ARI >= 0.7)."""
    import envs
    from experiments.trama_recovery import random_policy_episodes, task_recovery

    env = envs.make("smax-mt:surComb3", max_steps=50)
    s, valid, task = jax.jit(random_policy_episodes, static_argnums=(0, 2))(env, jax.random.PRNGKey(0), 300)
    (r,) = task_recovery(env, s, valid, task, seeds=(1,), vq_steps=640)
    assert r["codes_used"] > 20  # the codebook did not collapse
    assert r["ari"] >= 0.7, r
