"""Episode statistics as the learners log them, and the info keys of an episode's end.

Environments (``envs.wrappers.EpisodeStats`` and ``AutoReset``) write these info
entries; learners read them through :func:`episode_metrics` and :data:`FINAL_KEYS`,
so no algorithm imports the environment package.
"""

from __future__ import annotations

import jax.numpy as jnp

FINAL_KEYS = ("final_obs", "final_state", "final_avail")


def episode_metrics(info: dict) -> dict:
    """Means of the finished episodes' statistics in a batch of infos (any shape).

    Returns ``return``, ``length``, ``win_rate`` (NaN-free: 0 when no episode ended;
    listed in :data:`marl.logging.EPISODE_STATS`) and ``episodes`` (how many ended).
    """
    d = info["episode_done"].astype(jnp.float32)
    n = d.sum()
    denom = jnp.maximum(n, 1.0)
    out = {
        "return": (info["episode_return"] * d).sum() / denom,
        "length": (info["episode_length"] * d).sum() / denom,
        "win_rate": (info["won"].astype(jnp.float32) * d).sum() / denom,
        "episodes": n,
    }
    for k in sorted(info):  # per-team returns (competitive tasks)
        if k.startswith("episode_return_"):
            out["return_" + k[len("episode_return_") :]] = (info[k] * d).sum() / denom
    return out
