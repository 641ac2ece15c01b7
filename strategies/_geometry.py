"""Distance routines on embedding matrices, numpy only, never an N x N matrix.

Squared distances use ``|x|^2 - 2 x.c + |c|^2`` so the work is matrix products; blocks are at most
``BLOCK_ELEMENTS`` floats (16 MiB of float32) and the per-step state is one vector of length N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_ELEMENTS = 1 << 22


def squared_norms(points: np.ndarray) -> np.ndarray:
    """float32 [n]: |x_i|^2 of the rows of ``points`` [n, D]."""
    return np.einsum("ij,ij->i", points, points)


def min_squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """float32 [n]: squared distance of every row of ``points`` [n, D] to its nearest ``centers`` row."""
    n, m = len(points), len(centers)
    out = np.full(n, np.inf, dtype=np.float32)
    pn, cn = squared_norms(points), squared_norms(centers)
    rows = max(1, BLOCK_ELEMENTS // max(1, min(m, BLOCK_ELEMENTS)))
    cols = max(1, BLOCK_ELEMENTS // rows)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        for c0 in range(0, m, cols):
            c1 = min(m, c0 + cols)
            block = points[r0:r1] @ centers[c0:c1].T
            block *= -2
            block += pn[r0:r1, None]
            block += cn[None, c0:c1]
            np.minimum(out[r0:r1], block.min(axis=1), out=out[r0:r1])
    return np.maximum(out, 0, out=out)


def nearest_center(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """int64 [n]: index of the nearest ``centers`` row for every row of ``points``."""
    n, k = len(points), len(centers)
    labels = np.empty(n, dtype=np.int64)
    cn = squared_norms(centers)
    rows = max(1, BLOCK_ELEMENTS // k)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        # |x|^2 is the same for every center of a row, so it does not change the argmin.
        block = points[r0:r1] @ centers.T
        block *= -2
        block += cn[None, :]
        labels[r0:r1] = block.argmin(axis=1)
    return labels


@dataclass(frozen=True)
class KCenterResult:
    """picked: int64 [budget] positions in pick order; pick_distance: float64 [budget] Euclidean
    distance of each pick to its nearest center when picked (inf for a random first center);
    final_distance: float64 [n] distance of every point to its nearest center after the last pick
    (0 for picked points)."""

    picked: np.ndarray
    pick_distance: np.ndarray
    final_distance: np.ndarray


def k_center_greedy(
    points: np.ndarray, centers: np.ndarray | None, budget: int, rng: np.random.Generator
) -> KCenterResult:
    """Greedy k-center (core-set): ``budget`` rows of ``points`` [n, D], each the farthest from the
    centers so far (``centers`` [m, D], e.g. the labeled set, plus the earlier picks).

    With no centers the first pick is a random point. Keeps a running min-distance vector [n] and
    updates it with one new center per step: O(n D) per step, O(n) memory besides ``points``.
    Ties go to the lowest position.
    """
    n = len(points)
    if not 0 < budget <= n:
        raise ValueError(f"k-center budget {budget} must be in 1..{n}")
    pn = squared_norms(points)
    picked = np.empty(budget, dtype=np.int64)
    pick_distance = np.empty(budget, dtype=np.float64)
    if centers is not None and len(centers):
        dist = min_squared_distances(points, centers)
        start = 0
    else:
        first = int(rng.integers(n))
        picked[0], pick_distance[0] = first, np.inf
        dist = _squared_distances_to(points, pn, first)
        dist[first] = -1.0
        start = 1
    for step in range(start, budget):
        i = int(np.argmax(dist))
        picked[step], pick_distance[step] = i, np.sqrt(max(float(dist[i]), 0.0))
        # Picked points sit at -1, below any real squared distance (even one rounded below 0).
        np.minimum(dist, _squared_distances_to(points, pn, i), out=dist)
        dist[i] = -1.0
    final = np.sqrt(np.maximum(dist, 0.0)).astype(np.float64)
    return KCenterResult(picked, pick_distance, final)


def _squared_distances_to(points: np.ndarray, pn: np.ndarray, i: int) -> np.ndarray:
    """float32 [n]: squared distance of every row to row ``i``.

    einsum, not ``@``: a matrix-vector product is memory-bound, and on a busy machine a threaded
    BLAS gemv measured 1.7-2.2x slower than einsum's single-threaded loop.
    """
    sq = np.einsum("ij,j->i", points, points[i] * np.float32(-2))
    sq += pn
    sq += pn[i]
    return sq


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """int64 [n]: cluster labels 0..k-1 of the rows of ``points`` [n, D] after k-means.

    k-means++ initialisation and a fixed number of Lloyd ``iterations``, all draws from ``rng``; an
    empty cluster keeps its previous center. ``k`` is capped at n.
    """
    n, dim = points.shape
    k = min(k, n)
    pn = squared_norms(points)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    dist = np.maximum(_squared_distances_to(points, pn, int(chosen[0])), 0)
    dist[chosen[0]] = 0
    for j in range(1, k):
        total = float(dist.sum(dtype=np.float64))
        if total > 0:
            cumulative = np.cumsum(dist, dtype=np.float64)
            i = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
            i = min(i, n - 1)
        else:  # every point coincides with a center: any unchosen point will do
            free = np.ones(n, dtype=bool)
            free[chosen[:j]] = False
            i = int(rng.choice(np.flatnonzero(free)))
        chosen[j] = i
        np.minimum(dist, np.maximum(_squared_distances_to(points, pn, i), 0), out=dist)
        dist[i] = 0
    centers = points[chosen].astype(np.float32, copy=True)
    labels = nearest_center(points, centers)
    for _ in range(iterations):
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=points[:, d], minlength=k) for d in range(dim)], axis=1)
        filled = counts > 0
        centers[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        labels = nearest_center(points, centers)
    return labels
