"""Diversity strategies: core-set (k-center), cluster-then-uncertainty, and cold start."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import _columns as col
from ._base import (
    Pool,
    Ranking,
    Strategy,
    StrategySpec,
    build_member,
    check_number,
    descending_order,
    register_strategy,
    top_order,
)
from ._geometry import k_center_greedy, kmeans

log = logging.getLogger(__name__)


def k_center_ranking(
    points: np.ndarray, centers: np.ndarray | None, budget: int, rng: np.random.Generator, label: str
) -> Ranking:
    """Greedy k-center picks first; the rest by distance to the nearest center after the picks.

    ``priority`` is the distance to the nearest center when picked (the rest: after the last pick);
    a random first center (nothing labeled) gets the largest other priority so it stays finite.
    """
    result = k_center_greedy(points, centers, budget, rng)
    priority = result.final_distance.copy()
    priority[result.picked] = result.pick_distance
    random_start = ~np.isfinite(priority)
    if random_start.any():
        finite = priority[~random_start]
        priority[random_start] = finite.max() if len(finite) else 1.0
    picked = {int(p): float(d) for p, d in zip(result.picked, result.pick_distance)}

    def explain(positions: np.ndarray, ranks: np.ndarray) -> list[str]:
        out = []
        for p in positions:
            d = picked.get(int(p))
            if d is None:
                out.append(f"{label}: distance {priority[p]:.3g} to the nearest center")
            elif np.isinf(d):
                out.append(f"{label}: random first center (nothing labeled)")
            else:
                out.append(f"{label}: farthest, distance {d:.3g}")
        return out

    return Ranking(priority=priority, head=result.picked, explain=explain)


@register_strategy("coreset")
class CoreSetStrategy(Strategy):
    """Core-set by greedy k-center on the embeddings (Sener & Savarese 2018).

    Centers start as the labeled rows' embeddings (one random pick when nothing is labeled); each
    step picks the candidate farthest from every center and makes it a center.
    """

    needs_embeddings = True

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> Ranking:
        assert pool.candidate_embeddings is not None
        return k_center_ranking(pool.candidate_embeddings, pool.labeled_embeddings, budget, rng, "core-set")


@register_strategy("cluster_uncertainty")
class ClusterUncertaintyStrategy(Strategy):
    """Hybrid diversity + uncertainty: k-means on the pool's embeddings, then the most uncertain
    sample of each cluster, clusters taken in order of that sample's uncertainty.

    Options: ``uncertainty`` the strategy whose priority measures uncertainty (default ``entropy``,
    any spec such as ``{"name": "margin", "aggregation": "topk"}``); ``num_clusters`` (default: the
    budget); ``kmeans_iterations`` Lloyd iterations. When there are fewer non-empty clusters than the
    budget, the shortfall is filled by global uncertainty.
    """

    needs_embeddings = True

    def __init__(
        self,
        *,
        uncertainty: StrategySpec = "entropy",
        num_clusters: int | None = None,
        kmeans_iterations: int = 10,
    ) -> None:
        self.uncertainty = build_member(uncertainty, self.name, "uncertainty")
        self.members = (self.uncertainty,)
        if num_clusters is not None:
            check_number(self.name, "num_clusters", num_clusters, minimum=1, integer=True)
        self.num_clusters = num_clusters
        self.kmeans_iterations = int(check_number(self.name, "kmeans_iterations", kmeans_iterations,
                                                  minimum=0, integer=True))

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> Ranking:
        assert pool.candidate_embeddings is not None
        inner = self.uncertainty.rank(pool, budget, rng)
        u = inner.priority
        n = len(u)
        labels = kmeans(pool.candidate_embeddings, self.num_clusters or budget, rng, self.kmeans_iterations)
        by_uncertainty = descending_order(u)
        # First occurrence of each cluster along the uncertainty order = its most uncertain member;
        # first occurrences come in uncertainty order, so the clusters are ranked by it too.
        _, first = np.unique(labels[by_uncertainty], return_index=True)
        representatives = by_uncertainty[np.sort(first)][:budget]
        head = representatives
        if len(head) < budget:
            taken = np.zeros(n, dtype=bool)
            taken[head] = True
            rest = by_uncertainty[~taken[by_uncertainty]]
            head = np.concatenate([head, rest[: budget - len(head)]])
        sizes = np.bincount(labels)
        is_rep = set(representatives.tolist())

        def explain(positions: np.ndarray, ranks: np.ndarray) -> list[str]:
            base = inner.reasons(positions, self.uncertainty.name)
            out = []
            for p, why in zip(positions, base):
                c = int(labels[p])
                if int(p) in is_rep:
                    out.append(f"cluster {c} ({sizes[c]} samples): most uncertain, {why}")
                else:
                    out.append(f"fill by uncertainty (cluster {c}), {why}")
            return out

        return Ranking(priority=u, head=head.astype(np.int64), explain=explain)


@register_strategy("cold_start")
class ColdStartStrategy(Strategy):
    """First selection without a model: greedy k-center on cheap image features (``feat_*`` columns,
    e.g. colour histograms), standardised per feature, labeled rows as the first centers.

    Falls back to random when the table has no ``feat_*`` column. Option ``standardize``: z-score each
    feature over all rows first (default True), so no feature dominates by its unit.
    """

    optional_column_prefixes = (col.FEATURE_PREFIX,)

    def __init__(self, *, standardize: bool = True) -> None:
        if not isinstance(standardize, bool):
            raise ValueError(f"strategy '{self.name}': option 'standardize' must be true or false, got {standardize!r}")
        self.standardize = standardize

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> Ranking:
        features = pool.prefixed_columns(col.FEATURE_PREFIX)
        if not features:
            log.warning("cold_start: no %s* columns in the table; selecting at random", col.FEATURE_PREFIX)
            priority = rng.random(len(pool))
            return Ranking(
                priority=priority,
                head=top_order(priority, budget),
                explain=lambda positions, ranks: [f"cold start: random, no {col.FEATURE_PREFIX}* features (rank {r})" for r in ranks],
            )
        cand = pool.candidates[features].to_numpy(np.float64)
        lab = pool.labeled[features].to_numpy(np.float64) if len(pool.labeled) else np.zeros((0, len(features)))
        both = np.concatenate([cand, lab])
        mean = np.nanmean(both, axis=0) if len(both) else np.zeros(len(features))
        mean = np.where(np.isfinite(mean), mean, 0.0)
        scale: Any = 1.0
        if self.standardize:
            std = np.nanstd(both, axis=0)
            scale = np.where(np.isfinite(std) & (std > 0), std, 1.0)

        def prepare(x: np.ndarray) -> np.ndarray:
            # A missing feature sits at the mean: it neither attracts nor repels picks.
            z = (np.where(np.isfinite(x), x, mean) - mean) / scale
            return np.ascontiguousarray(z, dtype=np.float32)

        return k_center_ranking(prepare(cand), prepare(lab), budget, rng, "cold start (features)")
