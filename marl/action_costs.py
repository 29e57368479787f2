"""Ground costs between discrete actions, for the Wasserstein regularizer.

The entropic-OT regularizer (:mod:`marl.regularizers`) compares two action
distributions under a cost ``C[i, j]`` of replacing action ``i`` by action ``j``.
The cost is what makes the regularizer "semantic": moving probability mass
between similar actions (turning slightly) costs less than between unrelated
ones (stopping vs attacking). Every matrix here is a ``numpy`` ``float32``
array of shape ``[n, n]``: symmetric, zero on the diagonal, nonnegative, and
scaled so that its largest entry is 1 (so ``epsilon`` has the same meaning
across environments: costs are comparable to ``epsilon`` when ``epsilon`` is
a fraction of 1, see specs/wpr.md on why that matters).

Matrices are built on the host, once, and belong to the environment spec
(``EnvSpec.action_cost``); the regularizer receives them as constants.

- :func:`uniform_cost`: 0 on the diagonal, 1 off it. No geometry; the OT
  distance then behaves like a total-variation distance. The default for
  environments without an action geometry.
- :func:`smax_cost`: JaxMARL SMAX (moves, stop, attacks).
- :func:`mpe_cost`: JaxMARL MPE discrete actions (no-op and four directions).
- :func:`validate_cost`: checks a user-supplied matrix.
"""

from __future__ import annotations

import numpy as np

from marl.config import ConfigError, check_positive, check_range

__all__ = ["uniform_cost", "smax_cost", "smax_move_directions", "mpe_cost", "validate_cost"]


def uniform_cost(n: int) -> np.ndarray:
    """``[n, n]`` cost with 0 on the diagonal and 1 elsewhere (no action geometry)."""
    check_positive("action_cost.n", n, integer=True)
    return (1.0 - np.eye(int(n))).astype(np.float32)


def smax_move_directions() -> np.ndarray:
    """``[4, 2]`` unit vectors of SMAX movement actions 0..3, decoded as JaxMARL does.

    JaxMARL's ``SMAX._decode_discrete_actions`` maps action ``k`` in 0..3 to
    ``((-1)**(k//2) / sqrt2, (-1)**(k//2 + k%2) / sqrt2)`` and then rotates it by
    45 degrees counter-clockwise. The result is 0 = north (+y), 1 = east (+x),
    2 = south (-y), 3 = west (-x).
    """
    s = 1.0 / np.sqrt(2.0)
    rotation = np.array([[s, -s], [s, s]])
    vecs = []
    for k in range(4):
        vec = np.array([(-1.0) ** (k // 2) * s, (-1.0) ** (k // 2 + k % 2) * s])
        vecs.append(rotation @ vec)
    return np.stack(vecs)


def smax_cost(
    num_enemies: int,
    num_movement_actions: int = 5,
    *,
    stop_cost: float = 0.5,
    attack_cost: float = 0.25,
) -> np.ndarray:
    """Cost between SMAX discrete actions, ``[5 + num_enemies, 5 + num_enemies]``.

    SMAX actions: 0..3 move (north, east, south, west, see
    :func:`smax_move_directions`), 4 = stop, ``5 + j`` = attack enemy ``j``.

    - move <-> move: angle between the two directions / pi, so adjacent
      directions cost 0.5 and opposite ones 1.
    - move <-> stop: ``stop_cost`` (0.5): stopping is "half way" between any two
      moves, like the origin between unit vectors.
    - attack <-> attack (different targets): ``attack_cost`` (0.25). Without
      unit positions the targets are interchangeable (enemy indices carry no
      geometry the cost could use), so all attacks form one tight cluster:
      switching target is a small change of intent.
    - attack <-> move or stop: 1 (the largest cost): firing and manoeuvring are
      different intents.

    Position-dependent costs (nearby vs far targets) would need the state and
    are out of scope for a static matrix.
    """
    check_positive("action_cost.num_enemies", num_enemies, integer=True)
    if num_movement_actions != 5:
        raise ConfigError(
            "action_cost.num_movement_actions",
            num_movement_actions,
            "SMAX has exactly 5 movement actions (4 moves + stop)",
        )
    check_range("action_cost.stop_cost", stop_cost, 0.0, 1.0)
    check_range("action_cost.attack_cost", attack_cost, 0.0, 1.0)
    n = num_movement_actions + int(num_enemies)
    cost = np.ones((n, n), dtype=np.float64)
    dirs = smax_move_directions()
    cosines = np.clip(dirs @ dirs.T, -1.0, 1.0)
    cost[:4, :4] = np.arccos(cosines) / np.pi
    cost[:4, 4] = cost[4, :4] = stop_cost
    cost[5:, 5:] = attack_cost
    np.fill_diagonal(cost, 0.0)
    # arccos(1) is ~1e-8 off zero in floating point; snap tiny values.
    cost[np.abs(cost) < 1e-6] = 0.0
    return cost.astype(np.float32)


def mpe_cost(num_actions: int = 5) -> np.ndarray:
    """Cost between MPE discrete actions, ``[5, 5]``.

    JaxMARL MPE discrete actions: 0 no-op, 1 left (-x), 2 right (+x), 3 down (-y),
    4 up (+y). The cost is the Euclidean distance between their 2-D force
    directions (no-op = origin), divided by the largest (2, opposite moves):
    no-op <-> move 0.5, perpendicular moves sqrt(2)/2, opposite moves 1.
    """
    if num_actions != 5:
        raise ConfigError("action_cost.num_actions", num_actions, "MPE discrete actions are exactly 5")
    vecs = np.array([[0.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    cost = np.linalg.norm(vecs[:, None, :] - vecs[None, :, :], axis=-1)
    return (cost / cost.max()).astype(np.float32)


def validate_cost(cost, n: int, field: str = "action_cost") -> np.ndarray:
    """Check a ground cost for ``n`` actions; return it as ``float32`` ``[n, n]``.

    Raises :class:`ConfigError` (naming ``field``) unless the matrix is finite,
    ``[n, n]``, symmetric, nonnegative, with a zero diagonal.
    """
    arr = np.asarray(cost, dtype=np.float64)
    if arr.shape != (n, n):
        raise ConfigError(field, f"array of shape {arr.shape}", f"must have shape ({n}, {n})")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(field, "matrix with non-finite entries", "must be finite")
    if np.any(arr < 0):
        raise ConfigError(field, f"matrix with min {arr.min():.4g}", "must be nonnegative")
    if not np.allclose(arr, arr.T, atol=1e-6):
        raise ConfigError(field, "asymmetric matrix", "must be symmetric (C == C.T)")
    if np.any(np.abs(np.diag(arr)) > 1e-6):
        raise ConfigError(field, "matrix with nonzero diagonal", "must have a zero diagonal")
    return arr.astype(np.float32)
