"""Do TRAMA's trajectory embeddings recover the tasks of multi-task SMAX?

Random-policy episodes of a ``smax-mt:*`` set (each env's first episode), a VQ-VAE
trained alone on them with TRAMA's losses and settings (:func:`algos.trama.fit_vq`),
trajectory embeddings (mean code vectors), k-means with K clusters, and the adjusted
Rand index (ARI) of the clusters against the true tasks. Variants switch the codebook
start, the dead-code restarts and the slot order, one at a time::

    python -m experiments.trama_recovery                          # surComb3, 300 episodes, limit 50, 640 steps
    python -m experiments.trama_recovery --episodes 600 --max-steps 100 --out results/trama_study/recovery.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import algos
import envs
from algos import trama
from experiments.cli import entry
from marl import clustering


def random_policy_episodes(env, key, n: int):
    """First episodes of n envs under the uniform policy over available actions: scaled
    states [n, T+1, S], transition mask [n, T+1] (step t has a transition t -> t + 1) and
    task ids [n]."""
    state, ts = jax.vmap(env.reset)(jax.random.split(key, n))
    scale = jnp.asarray(env.spec.state_scale, jnp.float32)

    def step(carry, k):
        state, ts, alive = carry
        k_a, k_s = jax.random.split(k)
        a = jax.random.categorical(k_a, jnp.where(ts.avail_actions, 0.0, -1e9))
        s = ts.state / scale
        state, ts = jax.vmap(env.step)(jax.random.split(k_s, n), state, a)
        return (state, ts, alive & ~ts.done), (s, alive)

    task = ts.info["task_id"]
    _, (s, valid) = jax.lax.scan(step, (state, ts, jnp.ones(n, bool)), jax.random.split(key, env.spec.max_steps + 1))
    return s.swapaxes(0, 1), valid.swapaxes(0, 1), task


def task_recovery(env, s, valid, task, seeds=(1,), vq_steps: int = 640, config=None) -> list[dict]:
    """Per seed (vmapped VQ-VAEs): ARI of k-means on the trajectory embeddings against the
    true tasks after ``vq_steps`` VQ-VAE steps (TRAMA's ``config``, default its defaults),
    the codes the episodes use and the cluster sizes."""
    cfg = config or algos.default_config("trama")
    vq = trama.VQVAE(env.spec.state_dim, cfg.latent_dim, cfg.vq_hidden, cfg.n_codes)
    tx = optax.chain(optax.clip_by_global_norm(trama.GRAD_CLIP), optax.adam(cfg.vq_lr))
    table = jnp.asarray(trama.coverage_table(cfg.n_codes, cfg.n_clusters, env.spec.max_steps + 1), jnp.float32)
    coefs = (cfg.recon_coef, cfg.vq_coef, cfg.commit_coef, cfg.coverage_coef)
    mask = jnp.ones(s.shape[0], bool)
    n_tasks = int(jnp.max(task)) + 1

    @jax.jit
    @jax.vmap
    def run(seed):
        params, in_use = trama.fit_vq(
            vq,
            tx,
            s,
            valid,
            jax.random.PRNGKey(seed),
            vq_steps,
            cfg.batch_size,
            table,
            coefs,
            cfg.dead_code_window,
            cfg.codebook_from_data,
        )
        codes = trama.state_codes(vq, params, s)
        emb = trama.trajectory_embedding(params["params"]["codebook"], codes, valid)
        init = clustering.kmeans_pp_init(jax.random.PRNGKey(seed + 1), emb, mask, cfg.n_clusters)
        _, assign, counts = clustering.kmeans(emb, mask, init, cfg.kmeans_iterations)
        ari = clustering.adjusted_rand_index(assign, task, mask, cfg.n_clusters, n_tasks)
        used = (jax.nn.one_hot(codes, cfg.n_codes) * valid[..., None]).sum((0, 1)) > 0
        return ari, used.sum(), in_use[-1], counts

    ari, used, last, counts = map(np.asarray, run(jnp.asarray(seeds)))
    return [
        {
            "seed": int(sd),
            "ari": float(a),
            "codes_used": int(u),
            "codes_in_use_last_batch": float(b),
            "cluster_sizes": [int(c) for c in cs],
        }
        for sd, a, u, b, cs in zip(seeds, ari, used, last, counts, strict=True)
    ]


def main(
    env_name: str = "smax-mt:surComb3",
    episodes: int = 300,
    max_steps: int = 50,
    vq_steps: int = 640,
    seeds: tuple = (1, 2, 3),
    out: Optional[str] = None,
) -> dict:
    """Every variant x seed; the rollout key is fixed (PRNGKey(0)), seeds vary the VQ-VAE."""
    from marl.config import ConfigError, check_positive

    for field, v in (("episodes", episodes), ("max_steps", max_steps), ("vq_steps", vq_steps)):
        check_positive(field, v, integer=True)
    if not seeds:
        raise ConfigError("seeds", seeds, "must name at least one seed")
    base = algos.default_config("trama")
    variants = {
        "sorted slots, codebook from data, restarts": (False, base),
        "sorted slots, codebook from data, no restarts": (False, dataclasses.replace(base, dead_code_window=0)),
        "sorted slots, uniform codebook, no restarts": (
            False,
            dataclasses.replace(base, codebook_from_data=False, dead_code_window=0),
        ),
        "shuffled slots, codebook from data, restarts": (True, base),
    }
    data = {}
    result = {
        "env": env_name,
        "episodes": episodes,
        "max_steps": max_steps,
        "vq_steps": vq_steps,
        "seeds": list(seeds),
        "variants": {},
    }
    for name, (shuffle, cfg) in variants.items():
        if shuffle not in data:
            env = envs.make(env_name, max_steps=max_steps, shuffle_units=shuffle)
            data[shuffle] = (
                env,
                *jax.jit(random_policy_episodes, static_argnums=(0, 2))(env, jax.random.PRNGKey(0), episodes),
            )
        env, s, valid, task = data[shuffle]
        t0 = time.perf_counter()
        rows = task_recovery(env, s, valid, task, seeds, vq_steps, cfg)
        result["variants"][name] = rows
        print(
            f"{name:<48} ARI {[round(r['ari'], 3) for r in rows]}  codes used "
            f"{[r['codes_used'] for r in rows]}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    return result


@entry
def cli(argv=None) -> int:
    import tyro

    tyro.cli(main, args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
