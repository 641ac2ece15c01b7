"""Hand-checkable cases for diversity, class balance and the composing strategies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pytest

import strategies._balance as balance
import strategies._geometry as geometry
from strategies import Pool, build_strategy, columns
from tests.test_strategies import score_table


def blobs(centers: list[list[float]], per_blob: int, spread: float = 0.01, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.asarray(c) + spread * rng.normal(size=(per_blob, len(c))) for c in centers]).astype(np.float32)


def id_table(n: int, cols: Mapping[str, Any] | None = None, labeled: list[int] | None = None) -> pd.DataFrame:
    flags = np.zeros(n, dtype=bool)
    flags[labeled or []] = True
    return pd.DataFrame({"sample_id": [f"x{i:02d}" for i in range(n)], "labeled": flags, **(cols or {})})


def pool_of(frame: pd.DataFrame) -> Pool:
    """All rows as candidates, nothing labeled: for calling rank() many times without table checks."""
    return Pool(frame.reset_index(drop=True), frame.iloc[:0])


# -- core-set ------------------------------------------------------------------------------------------


def test_coreset_takes_one_point_per_tight_cluster() -> None:
    emb = blobs([[0, 0], [10, 0], [0, 10]], per_blob=5)  # rows 0-4, 5-9, 10-14
    picked = build_strategy("coreset").select(id_table(15), 3, np.random.default_rng(0), embeddings=emb)
    assert sorted(int(p[1:]) // 5 for p in picked) == [0, 1, 2]


def test_coreset_picks_the_farthest_from_the_labeled_set_first() -> None:
    emb = np.array([[0, 0], [1, 0], [0, 2], [3, 4], [-1, 0]], dtype=np.float32)  # row 0 labeled
    table = id_table(5, labeled=[0])
    frame = build_strategy("coreset").select_with_reasons(table, 2, np.random.default_rng(0), embeddings=emb)
    # |(3,4)| = 5; then (0,2): 2 from x00 and 3.6 from x03, while (1,0) and (-1,0) are 1 from x00.
    assert frame.sample_id.tolist() == ["x03", "x02"]
    assert frame.reason.tolist() == ["core-set: farthest, distance 5", "core-set: farthest, distance 2"]
    assert frame.priority.tolist() == pytest.approx([5.0, 2.0])


def test_coreset_with_a_labeled_cluster_covers_the_other_clusters() -> None:
    emb = blobs([[0, 0], [10, 0], [0, 10]], per_blob=5)
    picked = build_strategy("coreset").select(id_table(15, labeled=[0, 1]), 2, np.random.default_rng(0), embeddings=emb)
    assert sorted(int(p[1:]) // 5 for p in picked) == [1, 2]


def test_k_center_matches_brute_force_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 5)).astype(np.float32)
    centers = rng.normal(size=(7, 5)).astype(np.float32)

    dist = np.linalg.norm(points[:, None] - centers[None], axis=2).min(axis=1)
    expected = []
    for _ in range(20):
        i = int(np.argmax(dist))
        expected.append(i)
        dist = np.minimum(dist, np.linalg.norm(points - points[i], axis=1))
        dist[i] = -1

    whole = geometry.k_center_greedy(points, centers, 20, rng)
    monkeypatch.setattr(geometry, "BLOCK_ELEMENTS", 16)  # blocks of a few rows and centers
    chunked = geometry.k_center_greedy(points, centers, 20, rng)
    assert whole.picked.tolist() == expected == chunked.picked.tolist()
    assert np.all(np.diff(whole.pick_distance) <= 1e-5)  # greedy k-center distances never grow


def test_kmeans_separates_blobs() -> None:
    points = blobs([[0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]], per_blob=30, spread=0.3)
    labels = geometry.kmeans(points, 4, np.random.default_rng(1), iterations=10)
    per_blob = labels.reshape(4, 30)
    assert all(len(set(row)) == 1 for row in per_blob.tolist())
    assert len(set(per_blob[:, 0].tolist())) == 4


# -- cluster + uncertainty ----------------------------------------------------------------------------


def test_cluster_uncertainty_takes_the_most_uncertain_per_cluster() -> None:
    emb = blobs([[0, 0], [10, 0], [0, 10]], per_blob=4)  # rows 0-3, 4-7, 8-11
    entropy = [0.1, 0.2, 0.9, 0.3,  0.8, 0.85, 0.1, 0.2,  0.05, 0.3, 0.1, 0.2]
    table = id_table(12, {columns.ENTROPY_MEAN: entropy})
    strategy = build_strategy("cluster_uncertainty")
    frame = strategy.select_with_reasons(table, 3, np.random.default_rng(0), embeddings=emb)
    # Plain entropy would take x02, x05, x04 (two from the second cluster).
    assert frame.sample_id.tolist() == ["x02", "x05", "x09"]
    assert frame.reason[0].startswith("cluster ") and "most uncertain" in frame.reason[0]
    assert "entropy_mean 0.9" in frame.reason[0]


def test_cluster_uncertainty_fills_a_shortfall_by_global_uncertainty() -> None:
    emb = blobs([[0, 0], [1, 0], [20, 0]], per_blob=4)  # 2 clusters: rows 0-7 and 8-11
    table = id_table(12, {columns.MARGIN_TOPK: [0.9, 0.8, 0.1, 0.7, 0.2, 0.15, 0.9, 0.8, 0.95, 0.6, 0.9, 0.9]})
    strategy = build_strategy("cluster_uncertainty", uncertainty={"name": "margin", "aggregation": "topk"},
                              num_clusters=2, kmeans_iterations=5)
    assert strategy.requirements().columns == {columns.MARGIN_TOPK}
    frame = strategy.select_with_reasons(table, 3, np.random.default_rng(0), embeddings=emb)
    # Lowest margin per cluster (x02, x09), then the lowest margin left anywhere (x05).
    assert frame.sample_id.tolist() == ["x02", "x09", "x05"]
    assert frame.reason.tolist()[-1].startswith("fill by uncertainty")


# -- cold start ------------------------------------------------------------------------------------------


def test_cold_start_spreads_over_feature_clusters() -> None:
    feats = blobs([[0, 0], [1, 0], [0, 1]], per_blob=5, spread=0.01)
    table = id_table(15, {columns.feature_column("r"): feats[:, 0], columns.feature_column("g"): feats[:, 1]})
    picked = build_strategy("cold_start").select(table, 3, np.random.default_rng(0))
    assert sorted(int(p[1:]) // 5 for p in picked) == [0, 1, 2]


def test_cold_start_without_features_is_random() -> None:
    table = id_table(15)
    assert build_strategy("cold_start").select(table, 4, np.random.default_rng(7)) == \
        build_strategy("random").select(table, 4, np.random.default_rng(7))


# -- class balance ---------------------------------------------------------------------------------------


def test_class_balance_picks_the_rare_class_first() -> None:
    # Labeled: x00, x01 are all class 0 and 1. Class 2 is rare: only x04 is predicted to hold much.
    shares = np.array([
        [0.5, 0.5, 0.0],  # x00 labeled
        [0.6, 0.4, 0.0],  # x01 labeled
        [0.9, 0.1, 0.0],
        [0.3, 0.6, 0.1],
        [0.4, 0.3, 0.3],  # the rare class 2
        [0.0, 1.0, 0.0],
    ])
    table = id_table(6, {columns.class_fraction_column(c): shares[:, c] for c in range(3)}, labeled=[0, 1])
    frame = build_strategy("class_balance").select_with_reasons(table, 2, np.random.default_rng(0))
    assert frame.sample_id.tolist() == ["x04", "x03"]
    assert frame.reason[0].startswith("class balance: gain") and "class 2 30% of pixels" in frame.reason[0]


def test_class_balance_prefers_true_label_fractions_of_labeled_rows() -> None:
    # Predicted shares say class 1 is labeled; the true masks say class 0 is, so class 1 is wanted.
    table = id_table(
        3,
        {columns.class_fraction_column(0): [0.0, 0.9, 0.1], columns.class_fraction_column(1): [1.0, 0.1, 0.9],
         columns.label_fraction_column(0): [1.0, np.nan, np.nan], columns.label_fraction_column(1): [0.0, np.nan, np.nan]},
        labeled=[0],
    )
    assert build_strategy("class_balance").select(table, 1, np.random.default_rng(0)) == ["x02"]
    assert build_strategy("class_balance").select(table.drop(columns=[columns.label_fraction_column(0),
                                                                      columns.label_fraction_column(1)]),
                                                  1, np.random.default_rng(0)) == ["x01"]


@pytest.mark.parametrize("labeled_rows", [0, 30])
def test_class_balance_lazy_greedy_equals_plain_greedy(monkeypatch: pytest.MonkeyPatch, labeled_rows: int) -> None:
    rng = np.random.default_rng(3)
    shares = rng.dirichlet(np.full(6, 0.3), 400) * np.array([3, 1, 1, 0.2, 0.1, 0.05])
    shares /= shares.sum(axis=1, keepdims=True)
    shares[rng.integers(0, 400, 5)] = np.nan  # unscored rows go last
    labeled = np.nansum(rng.dirichlet(np.ones(6), labeled_rows), axis=0) if labeled_rows else np.zeros(6)
    eps = 1e-3

    total, alive, expected = labeled.copy(), np.isfinite(shares).all(axis=1), []
    f = np.nan_to_num(shares)
    for _ in range(40):
        s = np.where(alive, f @ (1 / (total + eps)), -np.inf)
        i = int(np.argmax(s))
        expected.append(i)
        total += f[i]
        alive[i] = False

    monkeypatch.setattr(balance, "MIN_BLOCK", 8)  # force many block refreshes
    assert balance.greedy_class_balance(shares.copy(), labeled, eps, 40).picked.tolist() == expected
    monkeypatch.setattr(balance, "MIN_BLOCK", 4096)
    assert balance.greedy_class_balance(np.asfortranarray(shares), labeled, eps, 40).picked.tolist() == expected
    tail = balance.greedy_class_balance(shares.copy(), labeled, eps, 400).picked
    assert sorted(tail[-5:].tolist()) == sorted(np.flatnonzero(~np.isfinite(shares).all(axis=1)).tolist())


def test_class_balance_rejects_bad_fractions() -> None:
    table = id_table(3, {columns.class_fraction_column(0): [0.5, -0.1, 0.2]})
    with pytest.raises(ValueError, match="negative class fraction for sample_id 'x01'"):
        build_strategy("class_balance").select(table, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'class_balance': option 'eps' must be > 0"):
        build_strategy("class_balance", eps=0)


# -- fusion and stochastic batches ------------------------------------------------------------------


@pytest.mark.parametrize("member", ["entropy", "class_balance", "margin"])
def test_fusion_with_all_weight_on_one_member_equals_that_member(member: str) -> None:
    table = score_table(n=60)
    others = {"entropy": 0.0, "class_balance": 0.0, "margin": 0.0}
    fused = build_strategy("fusion", members={**others, member: 1.0}).select(table, 10, np.random.default_rng(0))
    assert fused == build_strategy(member).select(table, 10, np.random.default_rng(0))


def test_fusion_sums_weighted_ranks() -> None:
    table = id_table(4, {columns.ENTROPY_MEAN: [0.9, 0.8, 0.1, 0.2], columns.LEAST_CONFIDENCE_MEAN: [0.1, 0.8, 0.9, 0.2]})
    fusion = build_strategy("fusion", members={"entropy": 1.0, "least_confidence": 1.0})
    frame = fusion.select_with_reasons(table, 4, np.random.default_rng(0))
    # ranks (entropy, least_confidence): x00 (0, 3), x01 (1, 1), x02 (3, 0), x03 (2, 2) over n = 4
    assert frame.sample_id.tolist() == ["x01", "x00", "x02", "x03"]
    assert frame.priority.tolist() == pytest.approx([1.5, 1.25, 1.25, 1.0])
    assert frame.reason[0] == "fusion 1.5: entropy rank 2, least_confidence rank 2"


def test_wrappers_compose_and_union_requirements() -> None:
    power = build_strategy("power", base="entropy", beta=2.0)
    assert power.requirements().columns == {columns.ENTROPY_MEAN}
    fusion = build_strategy("fusion", members={"entropy": 0.7, "class_balance": 0.3})
    assert fusion.requirements().columns == {columns.ENTROPY_MEAN}
    assert fusion.requirements().column_prefixes == {columns.CLASS_FRACTION_PREFIX}
    nested = build_strategy("softmax", base={
        "name": "fusion",
        "members": {"bald": {"weight": 1.0, "mc_dropout_passes": 4}, "coreset": 0.5,
                    "power": {"weight": 0.2, "base": {"name": "entropy", "aggregation": "classweighted"}}},
    })
    req = nested.requirements()
    assert req.columns == {columns.BALD_MEAN, columns.ENTROPY_CLASSWEIGHTED}
    assert req.embeddings and req.mc_dropout_passes == 4
    table = score_table()
    from tests.test_strategies import embeddings_for
    picked = nested.select(table, 5, np.random.default_rng(0), embeddings=embeddings_for(table))
    assert len(set(picked)) == 5


def test_member_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'entopy'"):
        build_strategy("power", base="entopy")
    with pytest.raises(ValueError, match="strategy 'entropy' has no option 'beta'"):
        build_strategy("fusion", members={"entropy": {"weight": 1.0, "beta": 2}})
    with pytest.raises(ValueError, match="member 'entropy' needs a 'weight'"):
        build_strategy("fusion", members={"entropy": {"aggregation": "topk"}})
    with pytest.raises(ValueError, match="at least one member weight must be > 0"):
        build_strategy("fusion", members={"entropy": 0.0})
    with pytest.raises(ValueError, match=r"option 'members.entropy' must be >= 0"):
        build_strategy("fusion", members={"entropy": -1.0})
    with pytest.raises(ValueError, match="option 'beta' must be >= 0"):
        build_strategy("power", beta=-1)
    with pytest.raises(ValueError, match="option 'temperature' must be > 0"):
        build_strategy("softmax", temperature=0)


def _frequencies(name: str, n: int, budget: int, draws: int, **options: object) -> np.ndarray:
    """How often each of ``n`` candidates (entropy 0..1, rising with the position) is drawn."""
    frame = id_table(n, {columns.ENTROPY_MEAN: np.linspace(0, 1, n)})
    strategy, pool, rng = build_strategy(name, **options), pool_of(frame), np.random.default_rng(0)
    counts = np.zeros(n)
    for _ in range(draws):
        counts[strategy.rank(pool, budget, rng).head[:budget]] += 1
    return counts


def test_power_with_beta_zero_is_uniform() -> None:
    counts = _frequencies("power", 20, 5, 2000, beta=0.0)
    expected = 2000 * 5 / 20
    assert np.abs(counts - expected).max() < 0.15 * expected


def test_power_with_high_beta_approaches_greedy() -> None:
    counts = _frequencies("power", 20, 5, 300, beta=60.0)
    assert counts[-5:].sum() >= 0.97 * 300 * 5  # the 5 most uncertain nearly always
    moderate = _frequencies("power", 20, 5, 300, beta=2.0)
    assert moderate[-5:].sum() < counts[-5:].sum() and moderate[:15].sum() > 0
    assert np.all(np.diff(moderate[::4]) >= 0)  # more uncertain = drawn more often


def test_softmax_temperature_moves_between_greedy_and_uniform() -> None:
    cold = _frequencies("softmax", 20, 5, 300, temperature=0.005)
    assert cold[-5:].sum() >= 0.97 * 300 * 5
    hot = _frequencies("softmax", 20, 5, 2000, temperature=1000.0)
    assert np.abs(hot - 500).max() < 0.15 * 500


def test_power_reasons_name_the_draw_and_the_base() -> None:
    table = id_table(5, {columns.ENTROPY_MEAN: [0.1, 0.2, 0.3, 0.4, 0.5]})
    frame = build_strategy("power", beta=50.0).select_with_reasons(table, 2, np.random.default_rng(0))
    assert frame.reason[0] == "power beta=50 draw 1: entropy_mean 0.5 (rank 1)"


def test_descending_order_is_a_stable_descending_sort() -> None:
    from strategies._base import descending_order, top_order

    rng = np.random.default_rng(0)
    for key in (rng.random(1000), rng.integers(0, 5, 1000).astype(float),
                np.where(rng.random(1000) < 0.3, -np.inf, rng.random(1000)), np.zeros(7), np.zeros(0)):
        expected = np.argsort(-key, kind="stable")
        assert descending_order(key).tolist() == expected.tolist()
        for k in (1, 3, 100, 400):
            assert top_order(key, k).tolist() == expected[:k].tolist()
