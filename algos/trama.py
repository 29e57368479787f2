"""TRAMA: TRajectory-class-Aware Multi-Agent reinforcement learning.

Paper: Na, Moon et al., "Trajectory-Class-Aware Multi-Agent Reinforcement Learning",
ICLR 2025; official PyTorch code: github.com/aailab-kaist/TRAMA (TRAMA_release_pymarl,
built on LAGMA). Built on the Q-learning backbone (:mod:`algos.qlearning`, mixer qplex
by default as in the official configs) through its hooks; the multi-task environments
are ``smax-mt:*`` (:mod:`envs.multitask_smax`).

Equations (s_t global state, s~ = s / env.spec.state_scale, b: episode, i: agent)
---------------------------------------------------------------------------------
(a) Quantized latent space, a VQ-VAE on the state:
  z_e = f_phi(s~_t)           s~ -> 64 -> ReLU -> 64 -> ReLU -> D (= 4)
  x_t = argmin_j ||z_e - e_j||_2, e_j the codebook (``n_codes`` = 256 codes)
  z_q = z_e + sg(e_x - z_e)   (straight-through estimator: dz_q/dz_e = I)
  s^ = g_psi(z_q)             D -> 64 -> ReLU -> 64 -> ReLU -> S
  L_VQ = recon_coef mean_f (s^ - s~)^2 + 0.25 ||e_x - sg(z_e)||^2 + 0.125 ||z_e - sg(e_x)||^2
         + 0.125 L_cov,
  L_cov = mean_{j in J(t, k_b)} ||sg(z_e) - e_j||^2 (coverage loss): class k owns the
  codes [k n_k, (k + 1) n_k), n_k = n_codes / K; with dn = n_k / (L + 1) the codes of
  time slot t are J(t, k) = {k n_k + floor(dn t), ..., k n_k + floor(dn (t + 1)) - 1}
  when dn >= 1, else {k n_k + floor(dn t)} (:func:`coverage_table`). k_b is the
  episode's trajectory class, uniform at random before the first clustering.
  Separate Adam (lr 5e-4, grad-norm clip 10). :func:`vq_loss` is the loss,
  :func:`vq_update` one step of it plus the dead-code check.
  Codebook start: at the first VQ-VAE phase the codes are set to encoder outputs of
  randomly drawn valid states of a buffer batch (``codebook_from_data``). Dead codes:
  every ``dead_code_window`` (20) VQ-VAE steps, each code that no valid state of those
  steps' batches was assigned to restarts at a random encoder output of the current
  batch (:func:`restart_dead_codes`).
(b) Trajectory clustering:
  embedding  phi_b = (1 / |V_b|) sum_{t in V_b} e_{x_{b,t}}   (V_b: the episode's steps)
  with x_{b,t} the codes of the stored states under the current encoder and codebook
  (recomputed at each clustering, and on each training batch for the classifier).
  k-means (K = 4) on the embeddings of every stored episode, warm-started from the
  previous centroids (k-means++ the first time), a fixed number of Lloyd iterations;
  the result is accepted only when >= ``min_clusters`` (3) clusters are non-empty.
  Classifier  phi -> 64 -> ReLU -> 32 -> ReLU -> K, cross-entropy on the clustered
  embeddings, Adam 1e-3: labels the episodes stored after the last clustering.
(c) Trajectory-class-aware agents:
  predictor  p_i(k | tau_i) = softmax(W GRU_64(ReLU(W_in [o_i, onehot(i)])))  (shared)
  class      k_i,t ~ p_i during rollouts, argmax greedy; stored with the step and fed
             to both the online and the target network.
  repr.      g(k) = W_2 ReLU(W_1 onehot(k))   (32 -> 32)
  agent      Q_i(tau_i, . ; g(k_i,t)): g joins the agent input (backbone's agent_inputs)
  loss       L = L_TD + 0.1 * mean_{b,t,i valid} CE(p_i(. | tau_{i,t}), y_b)
             with y_b the episode's cluster label (0 before the first clustering).

Schedule (all inside the jitted ``update``; counts in env steps / finished episodes)
--------------------------------------------------------------------------------
- VQ-VAE: one Adam step per backbone gradient step while env steps <=
  ``vq_every_step_until`` (50k, official ``buffer_update_time``), afterwards one step
  per ``vq_update_episodes`` (10) finished episodes (at most ``train_steps`` per
  iteration; the remainder and owed steps carry over, up to two iterations' worth:
  :func:`vq_schedule`), each on a batch of ``batch_size`` episodes sampled from the buffer.
- Clustering: first at ``cluster_start`` (100k) env steps, then whenever
  ``cluster_interval`` (50k) env steps or ``cluster_interval_episodes`` (500) episodes
  passed since the last attempt, if >= ``min_cluster_episodes`` (1000) episodes are
  stored. An accepted clustering relabels every stored episode and trains the
  classifier for ``classifier_steps`` minibatches.
- Each phase is a ``lax.cond`` on a condition maximized over the runner's seed axis
  (``max_over_seeds``), so vmapped seeds branch instead of computing both sides; inside,
  each seed applies its own decision.
- The class predictor is the agents' network shape with K outputs and trains with the
  agents' unroll (:func:`algos.qlearning.unroll_chunked`: chunks of ``UNROLL_CHUNK``
  slots, hand-written GRU backward, chunks past the batch's longest episode skipped).
  Before the first accepted clustering its loss has weight 0 and is not computed.

Deviations and choices (paper / official code)
----------------------------------------------
- Code indices are not stored: as in the official code they are computed from the
  stored states with the current VQ-VAE, on each training batch (the classifier's
  labels for the coverage classes and the class loss) and, over the whole buffer, at
  each clustering (the official code writes the batch's codes back to its buffer and
  clusters those).
- Codebook start from encoder outputs and dead-code restarts are not in the paper or
  the official code. From the uniform [-1, 1] start about 10 of the 256 codes stayed in
  use on multi-task SMAX at 200k steps, too few for embeddings that separate the tasks.
  Adam's moments of a restarted code are kept.
- Labels: each episode carries a random 31-bit id (a stored field); the hook state
  keeps a label table over the buffer rows (k-means label, or -1 for episodes stored
  since the last clustering), and the training batch looks its episodes up by id;
  unlabelled episodes are labelled by the classifier, as in the official code (the
  backbone's hooks see neither sampled row indices nor a writable buffer).
- The VQ-VAE trains on its own batches from the replay buffer (same distribution as
  the RL batch), in the per-iteration hook; the official code reuses the RL batch.
- Padded slots after an episode's end are masked out of every loss; the official code
  instead maps all-zero states to a reserved extra code and averages over them. No
  reserved code is needed here.
- Coverage indexing uses the env's limit L + 1 slots (official ``ref_max_time=2``);
  the official default divides by the batch's longest episode.
- The class predictor reads [o_i, onehot(i)]: the backbone does not pass the previous
  action to the hooks' per-step fields, so unlike the paper's predictor (and the Q
  agents) it does not see a_{i,t-1}.
- The class representation g is trained through the TD loss, as in the paper; the
  official code detaches it (never trained): ``detach_class_repr=True``.
- The classifier trains ``classifier_steps`` (500) minibatches after an accepted
  clustering and keeps its parameters between clusterings; the official code trains
  N / 32 epochs over the N clustered episodes.
- Not implemented: LAGMA's latent-goal incentive (the official TRAMA release keeps
  LAGMA's codebook statistics, but the TRAMA objective does not use them).
- Hook state does not see the backbone's swept hyperparameters (lr, gamma).

Logged diagnostics
------------------
``codes_in_use``: distinct codes among the valid states of the last VQ-VAE batch.
``cluster_size_k``: share of the clustered episodes in cluster k (last accepted
clustering). ``class_majority_rate``: share of the class loss's (step, agent) entries
whose label is the batch's most common one (``marl.clustering.majority_rate``), the accuracy of a
constant guess, to read ``class_accuracy`` against.

Task-recovery metric (analysis only)
------------------------------------
On environments that report the true task (``info["task_id"]``, multi-task SMAX;
detected once at ``make`` time from the reset timestep), each step also stores the
task id as the buffer field ``task``; it never enters the agents' or the predictor's
inputs, nor any loss. At the first step of an auto-reset episode the info still holds
the finished episode's task, so that step stores -1 (as every step does on
environments without task ids), and an episode's task is the id of its transition
steps (:func:`episode_task`; -1 for a one-step episode after an auto-reset, left out).
Each accepted clustering computes the adjusted Rand index between the k-means labels
and the true tasks of the stored episodes (``marl.clustering.adjusted_rand_index``), logged as
``cluster_ari``: 1 when the clusters are exactly the tasks (up to renaming), about 0
for clusters unrelated to the tasks, 0 before the first clustering. Environments
without task ids do not log it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from algos import qlearning as ql
from marl import buffers, rnn
from marl import config as cfg
from marl.clustering import adjusted_rand_index, kmeans, kmeans_pp_init, majority_rate
from marl.networks import dense
from marl.types import Algorithm, max_over_seeds

GRAD_CLIP = 10.0
CODE_CHUNK = 64
"""buffer rows encoded at once when a clustering recomputes the stored episodes' codes"""


@dataclasses.dataclass(frozen=True)
class TRAMAConfig(ql.QLearningConfig):
    """TRAMA settings: the Q-learning backbone's fields plus the latent space, clustering
    and class-aware agents (official defaults)."""

    mixer: str = "qplex"
    n_codes: int = 256
    latent_dim: int = 4
    vq_hidden: int = 64
    vq_lr: float = 5e-4
    recon_coef: float = 1.0
    vq_coef: float = 0.25
    commit_coef: float = 0.125
    coverage_coef: float = 0.125
    vq_every_step_until: int = 50_000
    """env steps during which the VQ-VAE trains at every backbone gradient step"""
    vq_update_episodes: int = 10
    """afterwards: finished episodes per VQ-VAE step"""
    codebook_from_data: bool = True
    """initialize the codebook from encoder outputs of buffer states at the first VQ-VAE
    phase (False: keep the uniform [-1, 1] start)"""
    dead_code_window: int = 20
    """every this many VQ-VAE steps, codes no valid state was assigned to since the last
    check are restarted at encoder outputs of the current batch (0: never)"""
    n_clusters: int = 4
    min_clusters: int = 3
    """accept a clustering only with at least this many non-empty clusters"""
    cluster_start: int = 100_000
    """env steps before the first clustering"""
    cluster_interval: int = 50_000
    cluster_interval_episodes: int = 500
    min_cluster_episodes: int = 1000
    """stored episodes needed to cluster"""
    kmeans_iterations: int = 20
    classifier_lr: float = 1e-3
    classifier_steps: int = 500
    predictor_hidden: int = 64
    class_repr_dim: int = 32
    class_loss_coef: float = 0.1
    detach_class_repr: bool = False
    """True: the official code's variant, g is never trained"""
    sample_class: bool = True
    """sample the predicted class during rollouts (False: argmax)"""

    def __post_init__(self):
        super().__post_init__()
        for f in (
            "n_codes",
            "latent_dim",
            "vq_hidden",
            "vq_update_episodes",
            "n_clusters",
            "min_clusters",
            "cluster_interval",
            "cluster_interval_episodes",
            "min_cluster_episodes",
            "kmeans_iterations",
            "classifier_steps",
            "predictor_hidden",
            "class_repr_dim",
        ):
            cfg.check_positive(f, getattr(self, f), integer=True)
        for f in ("vq_lr", "classifier_lr"):
            cfg.check_positive(f, getattr(self, f))
        for f in (
            "recon_coef",
            "vq_coef",
            "commit_coef",
            "coverage_coef",
            "class_loss_coef",
            "vq_every_step_until",
            "cluster_start",
            "dead_code_window",
        ):
            cfg.check_nonnegative(f, getattr(self, f))
        if self.n_codes % self.n_clusters:
            raise cfg.ConfigError(
                "n_codes", self.n_codes, f"must be a multiple of n_clusters={self.n_clusters} (each class owns a slice)"
            )
        if self.min_clusters > self.n_clusters:
            raise cfg.ConfigError("min_clusters", self.min_clusters, f"must be <= n_clusters={self.n_clusters}")
        if self.min_cluster_episodes < self.n_clusters:
            raise cfg.ConfigError(
                "min_cluster_episodes", self.min_cluster_episodes, f"must be >= n_clusters={self.n_clusters}"
            )


# ---------------------------------------------------------------------------- networks


class VQVAE(nn.Module):
    """Encoder, codebook and decoder; see the module docstring."""

    state_dim: int
    latent_dim: int
    hidden: int
    n_codes: int

    def setup(self):
        self.enc = [dense(self.hidden), dense(self.hidden), dense(self.latent_dim, scale=1.0)]
        self.dec = [dense(self.hidden), dense(self.hidden), dense(self.state_dim, scale=1.0)]
        self.codebook = self.param(
            "codebook",
            lambda key, shape: jax.random.uniform(key, shape, minval=-1.0, maxval=1.0),
            (self.n_codes, self.latent_dim),
        )

    def encode(self, s):
        x = nn.relu(self.enc[0](s))
        x = nn.relu(self.enc[1](x))
        return self.enc[2](x)

    def decode(self, z):
        x = nn.relu(self.dec[0](z))
        x = nn.relu(self.dec[1](x))
        return self.dec[2](x)

    def codes(self):
        return self.codebook

    def __call__(self, s):
        """(z_e, z_q straight-through, code index, s^) for states s [..., S]."""
        z_e = self.encode(s)
        book = self.codes()
        idx = nearest_code(z_e, book)
        e = book[idx]
        z_q = z_e + jax.lax.stop_gradient(e - z_e)
        return z_e, z_q, idx, self.decode(z_q)


def nearest_code(z, book):
    """Index of the nearest codebook row (L2) for z [..., D]; book [n, D]."""
    d = (z**2).sum(-1, keepdims=True) - 2.0 * z @ book.T + (book**2).sum(-1)
    return jnp.argmin(d, -1).astype(jnp.int32)


def vq_loss(vq: VQVAE, params, s, valid, cover, coefs):
    """Masked L_VQ (module docstring, (a)) of scaled states s [..., S].

    valid [...]: the steps that count; cover [..., n_codes]: the coverage mask J(t, k) of
    each step's time slot and class; coefs: (recon, vq, commit, coverage) weights.
    Returns (total, (parts [5] = total, recon, vq, commit, coverage; code index [...];
    z_e [..., D])).
    """
    z_e, _, idx, s_hat = vq.apply(params, s)
    codes = vq.apply(params, method=VQVAE.codes)
    total, parts = vq_loss_terms(s, s_hat, z_e, idx, codes, valid, cover, coefs)
    return total, (parts, idx, z_e)


def vq_loss_terms(s, s_hat, z_e, idx, codes, valid, cover, coefs):
    """L_VQ from the VQ-VAE's outputs: scaled states s and reconstructions s_hat [..., S],
    encoder outputs z_e [..., D], code indices idx [...], codebook codes [n_codes, D];
    valid, cover and coefs as in :func:`vq_loss`. Each term is averaged over the valid
    steps; the stop-gradients are those of the formula. Returns (total, parts [5] =
    total, recon, vq, commit, coverage)."""
    e = codes[idx]
    w = valid.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)

    def mean(x):
        return (x * w).sum() / n

    z_sg = jax.lax.stop_gradient(z_e)
    recon = mean(((s_hat - s) ** 2).mean(-1))
    vq_term = mean(((e - z_sg) ** 2).sum(-1))
    commit = mean(((z_e - jax.lax.stop_gradient(e)) ** 2).sum(-1))
    d_all = ((z_sg[..., None, :] - codes) ** 2).sum(-1)  # [..., n_codes]
    coverage = mean((d_all * cover).sum(-1) / jnp.maximum(cover.sum(-1), 1.0))
    c_recon, c_vq, c_commit, c_cov = coefs
    total = c_recon * recon + c_vq * vq_term + c_commit * commit + c_cov * coverage
    return total, jnp.stack([total, recon, vq_term, commit, coverage])


def sample_latents(key, z_e, valid, n: int):
    """n rows of z_e [..., D] drawn uniformly from the valid [...] steps (with
    replacement; any step when none is valid): the data a code starts or restarts at."""
    flat, ok = z_e.reshape(-1, z_e.shape[-1]), valid.reshape(-1)
    logits = jnp.where(ok | ~ok.any(), 0.0, -jnp.inf)
    return flat[jax.random.categorical(key, logits, shape=(n,))]


def restart_dead_codes(book, usage, z_e, valid, key):
    """Codes with zero usage [n_codes] move to encoder outputs z_e of valid steps drawn at
    random; used codes stay. Returns the new codebook [n_codes, D]."""
    fresh = sample_latents(key, jax.lax.stop_gradient(z_e), valid, book.shape[0])
    return jnp.where((usage > 0)[:, None], book, fresh)


def state_codes(vq: VQVAE, params, s, chunk: int = 0):
    """Code indices of scaled states s [R, ..., S] with the current encoder and codebook;
    ``chunk`` > 0 maps over the leading axis in chunks of that many rows (bounded memory)."""
    book = vq.apply(params, method=VQVAE.codes)

    def codes(x):
        return nearest_code(vq.apply(params, x, method=VQVAE.encode), book)

    return jax.lax.map(codes, s, batch_size=chunk) if chunk else codes(s)


def with_codebook(params, book):
    """VQ-VAE parameters with the codebook replaced."""
    return {**params, "params": {**params["params"], "codebook": book}}


def codebook_from_data(vq: VQVAE, params, s, valid, key):
    """Parameters whose codebook rows are encoder outputs of valid scaled states s [..., S]
    drawn at random (the first VQ-VAE phase's start)."""
    z_e = vq.apply(params, s, method=VQVAE.encode)
    return with_codebook(params, sample_latents(key, z_e, valid, vq.n_codes))


def vq_update(vq: VQVAE, tx, params, opt, usage, vq_steps, s, valid, cover, coefs, dead_code_window: int, key):
    """One VQ-VAE step on scaled states s [..., S] (``vq_loss``'s valid, cover, coefs) with
    the optax transform tx, then the dead-code check: usage [n_codes] counts the valid
    states assigned to each code; every ``dead_code_window``-th step (0: never) the codes
    with zero usage restart at encoder outputs of this batch and the counts reset.

    Returns (params, opt, usage, vq_steps, parts [5], codes in use in this batch).
    """
    (_, (parts, idx, z_e)), grads = jax.value_and_grad(vq_loss, argnums=1, has_aux=True)(
        vq, params, s, valid, cover, coefs
    )
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    count = (jax.nn.one_hot(idx, vq.n_codes) * valid[..., None]).reshape(-1, vq.n_codes).sum(0)
    usage, vq_steps = usage + count, vq_steps + 1
    if dead_code_window:
        check = vq_steps % dead_code_window == 0
        book = vq.apply(params, method=VQVAE.codes)
        params = with_codebook(params, jnp.where(check, restart_dead_codes(book, usage, z_e, valid, key), book))
        usage = jnp.where(check, 0.0, usage)
    return params, opt, usage, vq_steps, parts, (count > 0).sum().astype(jnp.float32)


def fit_vq(
    vq: VQVAE,
    tx,
    s,
    valid,
    key,
    num_steps: int,
    batch_size: int,
    cover_table,
    coefs,
    dead_code_window: int,
    from_data: bool = True,
):
    """A VQ-VAE trained alone on episodes of scaled states s [N, T+1, S] (valid [N, T+1]):
    ``num_steps`` :func:`vq_update` steps on batches of ``batch_size`` episodes drawn
    uniformly, coverage classes uniform at random (TRAMA before its first clustering),
    codebook started from encoder outputs when ``from_data``. Jittable with the int and
    bool arguments static. Returns (params, codes in use per step [num_steps])."""
    k_init, k_first, k_steps = jax.random.split(key, 3)
    n = s.shape[0]
    params = vq.init(k_init, s[:1, 0])
    if from_data:
        rows = jax.random.choice(k_first, n, (batch_size,))
        params = codebook_from_data(vq, params, s[rows], valid[rows], k_first)

    def step(carry, k):
        k_b, k_c, k_r = jax.random.split(k, 3)
        rows = jax.random.choice(k_b, n, (batch_size,))
        classes = jax.random.randint(k_c, (batch_size,), 0, cover_table.shape[1])
        *carry, _, in_use = vq_update(
            vq,
            tx,
            *carry,
            s[rows],
            valid[rows],
            coverage_mask(cover_table, classes, s.shape[1]),
            coefs,
            dead_code_window,
            k_r,
        )
        return tuple(carry), in_use

    carry = (params, tx.init(params), jnp.zeros(vq.n_codes), jnp.zeros((), jnp.int32))
    (params, *_), in_use = jax.lax.scan(step, carry, jax.random.split(k_steps, num_steps))
    return params, in_use


def class_predictor(hidden: int, n_classes: int) -> rnn.RNNAgent:
    """[o_i, onehot(i)] -> hidden -> ReLU -> GRU hidden -> K logits (parameters shared): the
    backbone's agent network with K outputs (small output init), so its training unroll
    is the backbone's (:func:`algos.qlearning.unroll_chunked`)."""
    return rnn.RNNAgent(n_classes, hidden, out_scale=0.01)


class ClassRepr(nn.Module):
    """g(k) = W_2 ReLU(W_1 onehot(k))."""

    dim: int

    @nn.compact
    def __call__(self, onehot):
        return dense(self.dim, scale=1.0)(nn.relu(dense(self.dim)(onehot)))


class Classifier(nn.Module):
    """Trajectory embedding -> 64 -> ReLU -> 32 -> ReLU -> K logits."""

    n_classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(dense(64)(x))
        x = nn.relu(dense(32)(x))
        return dense(self.n_classes, scale=0.01)(x)


# ---------------------------------------------------------------------------- pieces


def coverage_table(n_codes: int, n_classes: int, num_slots: int) -> np.ndarray:
    """J as a mask [num_slots, K, n_codes]: code j belongs to class k at time slot t."""
    nk = n_codes // n_classes
    dn = nk / num_slots
    table = np.zeros((num_slots, n_classes, n_codes), bool)
    for t in range(num_slots):
        for k in range(n_classes):
            lo = nk * k + int(dn * t)
            hi = nk * k + int(dn * (t + 1)) if dn >= 1 else lo + 1
            table[t, k, lo:hi] = True
    return table


def coverage_mask(table, classes, num_steps: int):
    """J(t, k_b) of every step of episodes of classes [B] from :func:`coverage_table`'s
    table [L + 1, K, n_codes]: [B, num_steps, n_codes]."""
    return table[:num_steps, classes].transpose(1, 0, 2)


def trajectory_embedding(book, codes, valid):
    """Mean codebook vector over the valid steps: codes [..., T], valid [..., T] -> [..., D]."""
    v = valid.astype(book.dtype)
    total = (book[codes] * v[..., None]).sum(-2)
    return total / jnp.maximum(v.sum(-1, keepdims=True), 1.0)


def vq_schedule(env_steps, episodes, last_vq_episode, can_sample, config: TRAMAConfig):
    """VQ-VAE steps due this iteration and the new ``last_vq_episode``: ``train_steps``
    while env_steps <= ``vq_every_step_until``, afterwards one per
    ``vq_update_episodes`` finished episodes since ``last_vq_episode``, at most
    ``train_steps``; the remainder carries over, and so do owed steps beyond
    ``train_steps`` (up to two iterations' worth). None while the buffer cannot be sampled."""
    early = env_steps <= config.vq_every_step_until
    owed = (episodes - last_vq_episode) // config.vq_update_episodes
    n = jnp.where(can_sample, jnp.where(early, config.train_steps, jnp.minimum(owed, config.train_steps)), 0)
    later = jnp.maximum(
        last_vq_episode + n * config.vq_update_episodes, episodes - 2 * config.train_steps * config.vq_update_episodes
    )
    return n, jnp.where(early, episodes, later)


def episode_task(task, valid):
    """True task of stored episodes: task [..., T+1] per-step ids (-1: unknown), valid
    [..., T+1] the transition steps -> [...] (-1 when no step knows it)."""
    return jnp.where(valid, task, -1).max(-1)


def env_num_tasks(env) -> int:
    """Number of true tasks the environment reports in ``info["task_id"]``
    (``spec.num_tasks``; multi-task SMAX), else 0."""
    return int(getattr(env.spec, "num_tasks", 0) or 0)


@struct.dataclass
class TRAMAState:
    vq_params: Any
    vq_opt: Any
    clf_params: Any
    clf_opt: Any
    centroids: jax.Array  # [K, D]
    clustered: jax.Array  # [] bool: a clustering was accepted
    clusterings: jax.Array  # [] accepted clusterings
    label: jax.Array  # [C] cluster label of buffer row r (-1: none yet)
    label_uid: jax.Array  # [C] episode id the label belongs to
    env_steps: jax.Array
    episodes: jax.Array
    last_vq_episode: jax.Array
    last_cluster_step: jax.Array
    last_cluster_episode: jax.Array
    vq_loss: jax.Array  # last VQ-VAE phase: total, recon, vq, commit, coverage [5]
    clf_loss: jax.Array
    nonempty: jax.Array  # non-empty clusters of the last attempt
    ari: jax.Array  # [] adjusted Rand index of the last accepted clustering vs the true tasks (0: none)
    book_ready: jax.Array  # [] bool: the codebook was initialized (from encoder outputs)
    usage: jax.Array  # [n_codes] valid states assigned to each code since the last dead-code check
    vq_steps: jax.Array  # [] VQ-VAE steps taken
    codes_in_use: jax.Array  # [] distinct codes of the valid states of the last VQ-VAE batch
    cluster_sizes: jax.Array  # [K] share of the stored episodes in each cluster (last accepted clustering)


def make(env, config: TRAMAConfig, name: str = "trama") -> Algorithm:
    return ql.make(env, config, name=name, hooks=make_hooks(env, config))


class TRAMAContext(NamedTuple):
    """What TRAMA's pieces share: constants derived once from the env and the config, the
    networks and their optimizers."""

    config: TRAMAConfig
    num_agents: int  # A
    obs_dim: int
    state_dim: int  # S
    steps_per_iteration: int  # env steps per iteration (all envs)
    n_tasks: int  # true tasks the env reports (0: none, no cluster_ari)
    state_scale: jax.Array  # [S] divisor of the state (s~ = s / state_scale)
    ids: jax.Array  # [A, A] agent one-hots of the predictor's input ([A, 0] without agent ids)
    cover: jax.Array  # [L + 1, K, n_codes] coverage mask (:func:`coverage_table`)
    coefs: tuple  # (recon, vq, commit, coverage) weights of L_VQ
    vq: VQVAE
    predictor: rnn.RNNAgent  # trajectory-class predictor (:func:`class_predictor`)
    g_net: ClassRepr
    classifier: Classifier
    vq_tx: optax.GradientTransformation
    clf_tx: optax.GradientTransformation


def make_context(env, config: TRAMAConfig) -> TRAMAContext:
    """The :class:`TRAMAContext` of ``env`` (reads its spec)."""
    spec = env.spec
    A, L, S = spec.num_agents, spec.max_steps, spec.state_dim
    K = config.n_clusters
    return TRAMAContext(
        config=config,
        num_agents=A,
        obs_dim=spec.obs_dim,
        state_dim=S,
        steps_per_iteration=config.num_envs * config.num_steps,
        n_tasks=env_num_tasks(env),
        state_scale=jnp.ones((S,)) if spec.state_scale is None else jnp.asarray(spec.state_scale, jnp.float32),
        ids=jnp.eye(A) if config.agent_ids else jnp.zeros((A, 0)),
        cover=jnp.asarray(coverage_table(config.n_codes, K, L + 1), jnp.float32),
        coefs=(config.recon_coef, config.vq_coef, config.commit_coef, config.coverage_coef),
        vq=VQVAE(S, config.latent_dim, config.vq_hidden, config.n_codes),
        predictor=class_predictor(config.predictor_hidden, K),
        g_net=ClassRepr(config.class_repr_dim),
        classifier=Classifier(K),
        vq_tx=optax.chain(optax.clip_by_global_norm(GRAD_CLIP), optax.adam(config.vq_lr)),
        clf_tx=optax.adam(config.classifier_lr),
    )


def make_hooks(env, config: TRAMAConfig) -> ql.Hooks:
    """The backbone hooks implementing TRAMA on ``env`` (see the module docstring)."""
    ctx = make_context(env, config)
    return ql.Hooks(
        init=functools.partial(init_state, ctx),
        initial_field_carry=functools.partial(initial_field_carry, ctx),
        step_fields=functools.partial(step_fields, ctx),
        agent_inputs=functools.partial(agent_inputs, ctx),
        extra_input_dim=config.class_repr_dim,
        extra_loss=functools.partial(extra_loss, ctx),
        after_iteration=functools.partial(after_iteration, ctx),
    )


def predictor_inputs(ctx: TRAMAContext, obs: jax.Array) -> jax.Array:
    """The class predictor's input [o_i, onehot(i)] of observations obs [..., A, o]."""
    return jnp.concatenate([obs, jnp.broadcast_to(ctx.ids, obs.shape[:-2] + ctx.ids.shape)], -1)


def codebook_of(ctx: TRAMAContext, vq_params) -> jax.Array:
    """The codebook [n_codes, D] of the VQ-VAE parameters."""
    return ctx.vq.apply(vq_params, method=VQVAE.codes)


def transitions(filled: jax.Array) -> jax.Array:
    """The steps an episode's embedding averages over: t with a transition t -> t + 1."""
    return jnp.concatenate([filled[..., 1:], jnp.zeros_like(filled[..., :1])], -1)


def episode_labels(ctx: TRAMAContext, ext: TRAMAState, vq_params, s, valid, uid) -> jax.Array:
    """Cluster labels [B] of episodes (scaled states s [B, T+1, S], valid, uid [B]): the
    stored k-means label, else the classifier's on the embedding of the codes that
    the VQ-VAE ``vq_params`` gives the states now."""
    emb = trajectory_embedding(codebook_of(ctx, vq_params), state_codes(ctx.vq, vq_params, s), valid)
    predicted = jnp.argmax(ctx.classifier.apply(ext.clf_params, emb), -1).astype(jnp.int32)
    match = (ext.label_uid[None, :] == uid[:, None]) & (ext.label[None, :] >= 0)
    stored = ext.label[jnp.argmax(match, -1)]
    return jnp.where(match.any(-1), stored, predicted)


# ---------------------------------------------------------------------------- VQ-VAE phase


def vq_start(ctx: TRAMAContext, ext: TRAMAState, buffer, n_steps, key):
    """The VQ-VAE parameters a phase starts from: at the first phase (with
    ``codebook_from_data``) the codes start at encoder outputs of stored states."""
    params = ext.vq_params
    if not ctx.config.codebook_from_data:
        return params
    k_b, k_z = jax.random.split(key)
    data, filled = buffers.sample(buffer, k_b, ctx.config.batch_size)
    fresh = codebook_from_data(ctx.vq, params, data["step"]["state"] / ctx.state_scale, filled, k_z)
    keep = ext.book_ready | (n_steps == 0)
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b), params, fresh)


def vq_phase_step(ctx: TRAMAContext, ext: TRAMAState, buffer, n_steps, carry, inp):
    """One step of :func:`vq_phase`'s scan: a :func:`vq_update` on a fresh buffer batch
    (coverage classes: the episodes' labels once clustered, else uniform at random),
    kept only for the first ``n_steps`` steps. carry: (params, opt, usage, vq_steps,
    codes in use); inp: (step index, key). Outputs (loss parts [5], step taken)."""
    config = ctx.config
    params, opt, usage, vq_steps, _ = carry
    i, k = inp
    k_s, k_c, k_r = jax.random.split(k, 3)
    data, filled = buffers.sample(buffer, k_s, config.batch_size)
    st = data["step"]
    s = st["state"] / ctx.state_scale
    labels = episode_labels(ctx, ext, params, s, transitions(filled), st["fields"]["uid"][:, 0])
    classes = jnp.where(ext.clustered, labels, jax.random.randint(k_c, labels.shape, 0, config.n_clusters))
    cov = coverage_mask(ctx.cover, classes, s.shape[1])
    *new, parts, in_use = vq_update(
        ctx.vq, ctx.vq_tx, params, opt, usage, vq_steps, s, filled, cov, ctx.coefs, config.dead_code_window, k_r
    )
    on = i < n_steps
    carry = jax.tree.map(lambda a, b: jnp.where(on, a, b), (*new, in_use), carry)
    return carry, (parts, on)


def vq_phase(ctx: TRAMAContext, ext: TRAMAState, buffer, n_steps, key) -> TRAMAState:
    """``n_steps`` VQ-VAE steps (of at most ``train_steps``) on buffer batches."""
    k_init, k_steps = jax.random.split(key)
    params = vq_start(ctx, ext, buffer, n_steps, k_init)
    train_steps = ctx.config.train_steps
    steps = (jnp.arange(train_steps), jax.random.split(k_steps, train_steps))
    carry = (params, ext.vq_opt, ext.usage, ext.vq_steps, ext.codes_in_use)
    step = functools.partial(vq_phase_step, ctx, ext, buffer, n_steps)
    (params, opt, usage, vq_steps, in_use), (parts, on) = jax.lax.scan(step, carry, steps)
    w = on.astype(jnp.float32)
    loss = jnp.where(w.sum() > 0, (parts * w[:, None]).sum(0) / jnp.maximum(w.sum(), 1.0), ext.vq_loss)
    return ext.replace(
        vq_params=params,
        vq_opt=opt,
        vq_loss=loss,
        usage=usage,
        vq_steps=vq_steps,
        codes_in_use=in_use,
        book_ready=ext.book_ready | (n_steps > 0),
    )


# ---------------------------------------------------------------------------- clustering


def train_classifier(ctx: TRAMAContext, params, opt, emb, labels, rows, key):
    """``classifier_steps`` Adam steps of the classifier's cross-entropy on minibatches of
    the stored episodes' embeddings emb [C, D] with k-means labels [C] (rows [C]: the
    stored ones). Returns ((params, opt), losses [classifier_steps])."""
    config = ctx.config
    C = config.buffer_size

    def clf_step(carry, k):
        params, opt = carry
        idx = jax.random.choice(k, C, (config.batch_size,), p=rows / jnp.maximum(rows.sum(), 1))

        def loss_fn(p):
            logits = ctx.classifier.apply(p, emb[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = ctx.clf_tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    return jax.lax.scan(clf_step, (params, opt), jax.random.split(key, config.classifier_steps))


def cluster_phase(ctx: TRAMAContext, ext: TRAMAState, buffer, due, key) -> TRAMAState:
    """A clustering attempt where ``due``: k-means of the stored episodes' embeddings
    under the current VQ-VAE; an accepted one (>= ``min_clusters`` non-empty clusters)
    relabels the stored episodes and trains the classifier."""
    config, K = ctx.config, ctx.config.n_clusters
    k_init, k_clf = jax.random.split(key)
    st = buffer.data["step"]
    trans = transitions(buffer.filled)
    rows = buffer.filled[:, 0]
    # codes of the stored states with the current encoder and codebook
    codes = state_codes(ctx.vq, ext.vq_params, st["state"] / ctx.state_scale, chunk=CODE_CHUNK)  # [C, T+1]
    emb = trajectory_embedding(codebook_of(ctx, ext.vq_params), codes, trans)  # [C, D]
    init = jnp.where(ext.clustered, ext.centroids, kmeans_pp_init(k_init, emb, rows, K))
    cents, assign, counts = kmeans(emb, rows, init, config.kmeans_iterations)
    nonempty = (counts > 0).sum()
    accept = due & (nonempty >= config.min_clusters)
    if ctx.n_tasks:
        task = episode_task(st["fields"]["task"], trans)
        ari = jnp.where(accept, adjusted_rand_index(assign, task, rows & (task >= 0), K, ctx.n_tasks), ext.ari)
    else:
        ari = ext.ari
    (clf_params, clf_opt), losses = train_classifier(ctx, ext.clf_params, ext.clf_opt, emb, assign, rows, k_clf)

    def pick(new, old):
        return jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)

    return ext.replace(
        centroids=pick(cents, ext.centroids),
        clustered=ext.clustered | accept,
        clusterings=ext.clusterings + accept.astype(jnp.int32),
        label=pick(jnp.where(rows, assign, -1), ext.label),
        label_uid=pick(st["fields"]["uid"][:, 0], ext.label_uid),
        clf_params=pick(clf_params, ext.clf_params),
        clf_opt=pick(clf_opt, ext.clf_opt),
        clf_loss=jnp.where(accept, losses[-1], ext.clf_loss),
        nonempty=jnp.where(due, nonempty, ext.nonempty).astype(jnp.int32),
        ari=ari,
        cluster_sizes=pick(counts / jnp.maximum(counts.sum(), 1.0), ext.cluster_sizes),
        last_cluster_step=jnp.where(due, ext.env_steps, ext.last_cluster_step),
        last_cluster_episode=jnp.where(due, ext.episodes, ext.last_cluster_episode),
    )


def cluster_due(config: TRAMAConfig, ext: TRAMAState, buffer) -> jax.Array:
    """Whether each seed attempts a clustering: from ``cluster_start`` env steps, first
    or once ``cluster_interval`` env steps or ``cluster_interval_episodes`` episodes
    passed since the last attempt, with >= ``min_cluster_episodes`` stored episodes."""
    return (
        (ext.env_steps >= config.cluster_start)
        & (
            ~ext.clustered
            | (ext.env_steps - ext.last_cluster_step >= config.cluster_interval)
            | (ext.episodes - ext.last_cluster_episode >= config.cluster_interval_episodes)
        )
        & (buffer.size >= config.min_cluster_episodes)
    )


# ---------------------------------------------------------------------------- hooks


def init_state(ctx: TRAMAContext, key) -> tuple[Any, TRAMAState]:
    """The ``init`` hook: (the predictor's and g's parameters, the initial TRAMAState)."""
    config = ctx.config
    K, D, C = config.n_clusters, config.latent_dim, config.buffer_size
    k_vq, k_p, k_g, k_c = jax.random.split(key, 4)
    vq_params = ctx.vq.init(k_vq, jnp.zeros((1, ctx.state_dim)))
    clf_params = ctx.classifier.init(k_c, jnp.zeros((1, D)))
    x0 = predictor_inputs(ctx, jnp.zeros((1, ctx.num_agents, ctx.obs_dim)))
    ext_params = {
        "predictor": ctx.predictor.init(k_p, jnp.zeros((1, ctx.num_agents, config.predictor_hidden)), x0),
        "repr": ctx.g_net.init(k_g, jnp.zeros((1, K))),
    }
    z = jnp.zeros((), jnp.int32)
    state = TRAMAState(
        vq_params=vq_params,
        vq_opt=ctx.vq_tx.init(vq_params),
        clf_params=clf_params,
        clf_opt=ctx.clf_tx.init(clf_params),
        centroids=jnp.zeros((K, D)),
        clustered=jnp.zeros((), bool),
        clusterings=z,
        label=jnp.full((C,), -1, jnp.int32),
        label_uid=jnp.full((C,), -1, jnp.int32),
        env_steps=z,
        episodes=z,
        last_vq_episode=z,
        last_cluster_step=z,
        last_cluster_episode=z,
        vq_loss=jnp.zeros((5,)),
        clf_loss=jnp.zeros(()),
        nonempty=z,
        ari=jnp.zeros(()),
        book_ready=jnp.zeros((), bool),
        usage=jnp.zeros((config.n_codes,)),
        vq_steps=z,
        codes_in_use=jnp.zeros(()),
        cluster_sizes=jnp.zeros((K,)),
    )
    return ext_params, state


def initial_field_carry(ctx: TRAMAContext, batch_shape):
    """The ``initial_field_carry`` hook: (predictor GRU state, episode id -1: none yet)."""
    return (
        jnp.zeros(batch_shape + (ctx.num_agents, ctx.config.predictor_hidden)),
        jnp.full(batch_shape, -1, jnp.int32),
    )


def step_task(ctx: TRAMAContext, ts, shape) -> jax.Array:
    """The true task of a step, for analysis only (never an input): -1 at an auto-reset
    step (the info still describes the finished episode) or without task ids."""
    info = ts.info if isinstance(getattr(ts, "info", None), dict) else {}
    if ctx.n_tasks and "task_id" in info:
        return jnp.where(ts.done, -1, info["task_id"]).astype(jnp.int32)
    return jnp.full(shape, -1, jnp.int32)


def step_fields(ctx: TRAMAContext, ext_params, ext_state, ts, carry, key, greedy):
    """The ``step_fields`` hook: the predicted class per agent (sampled, or argmax when
    greedy), the episode's random id and its true task."""
    h, uid = carry
    k_cls, k_uid = jax.random.split(key)
    h, logits = ctx.predictor.apply(ext_params["predictor"], h, predictor_inputs(ctx, ts.obs))
    sampled = jax.random.categorical(k_cls, logits) if ctx.config.sample_class else jnp.argmax(logits, -1)
    cls = jnp.where(greedy, jnp.argmax(logits, -1), sampled).astype(jnp.int32)
    fresh = jax.random.randint(k_uid, uid.shape, 0, jnp.iinfo(jnp.int32).max, jnp.int32)
    uid = jnp.where(uid < 0, fresh, uid)
    return {"cls": cls, "uid": uid, "task": step_task(ctx, ts, uid.shape)}, (h, uid)


def agent_inputs(ctx: TRAMAContext, ext_params, fields) -> jax.Array:
    """The ``agent_inputs`` hook: g(k) of the stored classes."""
    g = ctx.g_net.apply(ext_params["repr"], jax.nn.one_hot(fields["cls"], ctx.config.n_clusters))
    return jax.lax.stop_gradient(g) if ctx.config.detach_class_repr else g


def class_loss(ctx: TRAMAContext, ext: TRAMAState, batch, pred_params):
    """The predictor's masked cross-entropy against the episodes' cluster labels:
    (loss, (accuracy, majority rate)) over the valid (step, agent) entries."""
    filled = batch["filled"]
    valid = filled[:, 1:]  # [B, T]: transition t exists
    labels = episode_labels(
        ctx, ext, ext.vq_params, batch["state"] / ctx.state_scale, transitions(filled), batch["fields"]["uid"][:, 0]
    )  # [B]
    # the agents' chunked unroll: chunks past the batch's longest episode are skipped
    logits = rnn.unroll_chunked(
        ctx.predictor,
        pred_params,
        predictor_inputs(ctx, batch["obs"]),
        max_over_seeds(filled.sum(-1).max()),
        ctx.config.gru_autodiff,
    )[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(labels[:, None, None], logits.shape[:-1])
    )
    w = valid.astype(jnp.float32)[..., None]
    n = jnp.maximum(w.sum() * ctx.num_agents, 1.0)
    acc = ((jnp.argmax(logits, -1) == labels[:, None, None]) * w).sum() / n
    return (ce * w).sum() / n, (acc, majority_rate(labels, valid.sum(-1), ctx.config.n_clusters))


def training_metrics(ctx: TRAMAContext, ext: TRAMAState, ce, acc, majority) -> dict:
    """The metrics ``extra_loss`` logs: the class loss's (0 before the first clustering)
    and the hook state's."""
    on = ext.clustered.astype(jnp.float32)
    metrics = {
        "class_loss": ce * on,
        "class_accuracy": acc * on,
        "class_majority_rate": majority * on,
        "codes_in_use": ext.codes_in_use,
        "clustered": on,
        "clusterings": ext.clusterings.astype(jnp.float32),
        "nonempty_clusters": ext.nonempty.astype(jnp.float32),
        "classifier_loss": ext.clf_loss,
        "vq_loss": ext.vq_loss[0],
        "vq_recon": ext.vq_loss[1],
        "vq_coverage": ext.vq_loss[4],
        **{f"cluster_size_{k}": ext.cluster_sizes[k] for k in range(ctx.config.n_clusters)},
    }
    if ctx.n_tasks:
        metrics["cluster_ari"] = ext.ari
    return metrics


def extra_loss(ctx: TRAMAContext, params, target_params, ext: TRAMAState, batch, key):
    """The ``extra_loss`` hook: class_loss_coef x the class loss, once clustered."""
    # before the first clustering the loss has weight 0: its unroll is skipped (the
    # condition is maximized over vmapped seeds; a seed not yet clustered weighs it 0)
    ce, (acc, majority) = jax.lax.cond(
        max_over_seeds(ext.clustered.astype(jnp.int32)) > 0,
        functools.partial(class_loss, ctx, ext, batch),
        lambda p: (jnp.zeros(()), (jnp.zeros(()), jnp.zeros(()))),
        params["ext"]["predictor"],
    )
    on = ext.clustered.astype(jnp.float32)
    return ctx.config.class_loss_coef * on * ce, training_metrics(ctx, ext, ce, acc, majority)


def after_iteration(ctx: TRAMAContext, ext: TRAMAState, params, buffer, new_episodes, key, hp=None) -> TRAMAState:
    """The ``after_iteration`` hook: the new rows' labels cleared, the VQ-VAE phase and
    the clustering attempt when due."""
    config, C = ctx.config, ctx.config.buffer_size
    k_vq, k_cl = jax.random.split(key)
    ext = ext.replace(env_steps=ext.env_steps + ctx.steps_per_iteration, episodes=ext.episodes + new_episodes)
    # the rows stored this iteration have no cluster label yet
    n = jnp.minimum(new_episodes, C)
    age = (buffer.insert_pos - 1 - jnp.arange(C)) % C
    new = age < n
    ext = ext.replace(
        label=jnp.where(new, -1, ext.label),
        label_uid=jnp.where(new, buffer.data["step"]["fields"]["uid"][:, 0], ext.label_uid),
    )
    # VQ-VAE
    n_vq, last = vq_schedule(
        ext.env_steps, ext.episodes, ext.last_vq_episode, buffers.can_sample(buffer, config.batch_size), config
    )
    ext = ext.replace(last_vq_episode=last)
    ext = jax.lax.cond(max_over_seeds(n_vq) > 0, lambda e: vq_phase(ctx, e, buffer, n_vq, k_vq), lambda e: e, ext)
    # clustering
    due = cluster_due(config, ext, buffer)
    return jax.lax.cond(
        max_over_seeds(due.astype(jnp.int32)) > 0,
        lambda e: cluster_phase(ctx, e, buffer, due, k_cl),
        lambda e: e,
        ext,
    )
