"""Region selection under a click budget and the click cost model: pure functions, hand-checked cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from strategies import (
    AnnotationCost,
    CostModel,
    build_region_strategy,
    mask_annotation_cost,
    polygon_vertices,
    region_clicks,
    region_strategy_names,
    region_strategy_options,
    register_region_strategy,
    strategy_names,
)
from strategies import region_columns as rcol
from strategies._regions import RegionRandomStrategy

# -- cost model ------------------------------------------------------------------------------------------


def two_squares() -> np.ndarray:
    """20 x 20 background (class 0) with a 5 x 5 class-1 square and an 8 x 8 class-2 square."""
    mask = np.zeros((20, 20), np.int64)
    mask[2:7, 2:7] = 1
    mask[10:18, 10:18] = 2
    return mask


def test_two_squares_cost_one_polygon_each_plus_the_background() -> None:
    cost = mask_annotation_cost(two_squares(), CostModel(), ignore_index=255)
    # background: the image rectangle; each square: 4 corners
    assert (cost.objects, cost.vertices, cost.clicks) == (3, 12, 12.0)
    assert (cost.pixels, cost.images, cost.regions) == (400, 1, 0)
    priced = mask_annotation_cost(two_squares(), CostModel(clicks_per_vertex=0.5, clicks_per_object=2), 255)
    assert priced.clicks == 3 * 2 + 12 * 0.5
    # Ignored pixels are neither drawn nor counted: the top row ignored leaves the background a rectangle.
    mask = two_squares()
    mask[0] = 255
    assert mask_annotation_cost(mask, CostModel(), 255) == AnnotationCost(clicks=12, pixels=380, images=1, objects=3,
                                                                          vertices=12)


def test_polygon_vertices_of_shapes_and_nested_components() -> None:
    ell = np.zeros((12, 12), bool)
    ell[2:10, 2:5] = True
    ell[7:10, 2:10] = True
    assert polygon_vertices(ell).tolist() == [6]
    # A class-1 ring with a class-1 island in its hole: two polygons; the hole needs none.
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[6:14, 6:14] = False
    ring[8:12, 8:12] = True
    assert sorted(polygon_vertices(ring).tolist()) == [4, 4]
    # A single pixel is still a polygon of 3 vertices; nothing is no polygon.
    dot = np.zeros((5, 5), bool)
    dot[2, 2] = True
    assert polygon_vertices(dot).tolist() == [3]
    assert polygon_vertices(np.zeros((5, 5), bool)).tolist() == []


def test_region_clicks_charge_polygons_only_for_mixed_regions() -> None:
    class_map = np.zeros((10, 20), np.int64)
    class_map[3:6, 13:16] = 1  # a 3 x 3 class-1 square inside the right region
    regions = np.zeros((10, 20), np.int64)
    regions[:, 10:] = 1
    clicks, objects, vertices = region_clicks(class_map, regions, np.array([0, 1]), np.array([0, 0]),
                                              np.array([False, True]), CostModel())
    assert clicks.tolist() == [1.0, 1.0 + 4] and objects.tolist() == [0, 1] and vertices.tolist() == [0, 4]
    # The dominant class is filled by the click, never drawn; the other region's pixels never count.
    clicks, _, _ = region_clicks(class_map, regions, np.array([1]), np.array([1]), np.array([True]), CostModel())
    assert clicks.tolist() == [1.0 + 4]  # class 0 around the square: one rectangle (the region) of 4 vertices
    with pytest.raises(ValueError, match="region 7 is not in the region map"):
        region_clicks(class_map, regions, np.array([7]), np.array([0]), np.array([True]), CostModel())


def test_cost_model_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="purity_threshold must be a finite number in \\[0, 1\\], got 1.5"):
        CostModel(purity_threshold=1.5)
    with pytest.raises(ValueError, match="clicks_per_region must be a finite number > 0"):
        CostModel(clicks_per_region=0)
    assert AnnotationCost(clicks=2, pixels=5, images=1) + AnnotationCost(clicks=1, regions=3) == AnnotationCost(
        clicks=3, pixels=5, images=1, regions=3)


# -- selection -------------------------------------------------------------------------------------------


def region_table(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    """(sample_id, region_id, entropy_mean, cost_clicks) rows with the other score columns derived."""
    frame = pd.DataFrame(rows, columns=[rcol.SAMPLE_ID, rcol.REGION_ID, rcol.ENTROPY_MEAN, rcol.COST_CLICKS])
    frame[rcol.MARGIN_MEAN] = 1.0 - frame[rcol.ENTROPY_MEAN] / 4
    frame[rcol.CLASS_BALANCED] = frame[rcol.ENTROPY_MEAN]
    frame[rcol.DOMINANT_CLASS] = 0
    return frame


def picks(selection: pd.DataFrame) -> list[tuple[str, int]]:
    return list(zip(selection[rcol.SAMPLE_ID], selection[rcol.REGION_ID].astype(int)))


def test_greedy_takes_the_best_score_per_click_first_and_never_exceeds_the_budget() -> None:
    table = region_table([
        ("a", 0, 0.9, 1),  # 0.90 per click
        ("a", 1, 2.0, 5),  # 0.40: the highest entropy, but too dear once a and c are taken
        ("b", 0, 0.5, 1),  # 0.50
        ("b", 1, 0.3, 2),  # 0.15
        ("c", 0, 1.1, 3),  # 0.37: fits after a/1 is skipped
    ])
    strategy = build_region_strategy("region_uncertainty")
    chosen = strategy.select(table, 6, np.random.default_rng(0))
    assert picks(chosen) == [("a", 0), ("b", 0), ("c", 0)]
    assert chosen["cumulative_clicks"].tolist() == [1, 2, 5] and chosen["rank"].tolist() == [1, 2, 3]
    assert chosen["reason"][0] == "entropy_mean 0.9, 1 clicks"
    # A budget that fits everything takes everything, best per click first.
    assert picks(strategy.select(table, 100, np.random.default_rng(0)))[:3] == [("a", 0), ("b", 0), ("a", 1)]
    # A budget below every cost takes nothing.
    assert strategy.select(table, 0.5, np.random.default_rng(0)).empty
    # Margin: 1 - margin_mean is the uncertainty (here entropy / 4: the same order).
    assert picks(build_region_strategy("region_uncertainty", measure="margin").select(table, 6, np.random.default_rng(0))) \
        == [("a", 0), ("b", 0), ("c", 0)]


@pytest.mark.parametrize("name", region_strategy_names())
def test_every_region_strategy_respects_the_budget_and_is_deterministic(name: str) -> None:
    rng = np.random.default_rng(7)
    n = 200
    table = region_table([(f"s{i % 23:02d}", i // 23, float(rng.random() * 2), float(rng.integers(1, 12)))
                          for i in range(n)])
    table[rcol.LABELED] = rng.random(n) < 0.2
    strategy = build_region_strategy(name)
    for budget in (1, 7.5, 60, 10_000):
        chosen = strategy.select(table, budget, np.random.default_rng(3))
        assert chosen[rcol.COST_CLICKS].sum() <= budget
        assert not chosen.duplicated([rcol.SAMPLE_ID, rcol.REGION_ID]).any()
        labeled = set(picks(table[table[rcol.LABELED]]))
        assert not labeled & set(picks(chosen))
        # Maximal: every region left out costs more than the clicks left.
        left = budget - chosen[rcol.COST_CLICKS].sum()
        rest = table[~table[rcol.LABELED]].set_index([rcol.SAMPLE_ID, rcol.REGION_ID]).drop(index=picks(chosen))
        assert (rest[rcol.COST_CLICKS] > left).all()
        # The same generator state and content give the same selection, whatever the row order.
        shuffled = table.sample(frac=1.0, random_state=1)
        again = strategy.select(shuffled, budget, np.random.default_rng(3))
        pd.testing.assert_frame_equal(chosen, again)


def test_random_ignores_score_and_cost_when_ranking() -> None:
    table = region_table([("a", i, 0.0, 1 + i % 3) for i in range(50)])
    chosen = RegionRandomStrategy().select(table, 20, np.random.default_rng(0))
    other = RegionRandomStrategy().select(table, 20, np.random.default_rng(1))
    assert picks(chosen) != picks(other)
    assert chosen["reason"][0].startswith("random draw")


def test_class_balanced_reads_its_column() -> None:
    table = region_table([("a", 0, 1.0, 1), ("a", 1, 1.0, 1)])
    table[rcol.CLASS_BALANCED] = [1.0, 3.0]
    table[rcol.DOMINANT_CLASS] = [0, 4]
    chosen = build_region_strategy("region_class_balanced").select(table, 1, np.random.default_rng(0))
    assert picks(chosen) == [("a", 1)]
    assert chosen["reason"][0] == "entropy_class_balanced 3 (predicted class 4), 1 clicks"


def test_bad_tables_budgets_and_names_are_clear_errors() -> None:
    table = region_table([("a", 0, 1.0, 1), ("a", 1, 1.0, 2)])
    strategy = build_region_strategy("region_uncertainty")
    for bad_budget in (0, -1.0, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="budget must be a positive number of clicks"):
            strategy.select(table, bad_budget, np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs columns \['entropy_class_balanced'\]"):
        build_region_strategy("region_class_balanced").select(table.drop(columns=[rcol.CLASS_BALANCED]), 3,
                                                             np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"region \('a', 1\) appears twice"):
        strategy.select(pd.concat([table, table.iloc[[1]]]), 3, np.random.default_rng(0))
    bad = table.copy()
    bad.loc[1, rcol.COST_CLICKS] = 0.0
    with pytest.raises(ValueError, match=r"region \('a', 1\): cost_clicks must be a positive finite number"):
        strategy.select(bad, 3, np.random.default_rng(0))
    bad[rcol.COST_CLICKS] = 1.0
    bad.loc[0, rcol.ENTROPY_MEAN] = -0.5
    with pytest.raises(ValueError, match="priorities must be >= 0"):
        strategy.select(bad, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown region strategy 'region_entopy'; registered: region_class_balanced, "
                                         "region_random, region_uncertainty"):
        build_region_strategy("region_entopy")
    with pytest.raises(ValueError, match="has no option 'aggregation'; valid options: measure"):
        build_region_strategy("region_uncertainty", aggregation="topk")
    with pytest.raises(ValueError, match="option 'measure' must be one of entropy, margin"):
        build_region_strategy("region_uncertainty", measure="bald")
    assert region_strategy_options("region_uncertainty") == {"measure": "entropy"}


def test_registries_are_strict_and_disjoint() -> None:
    assert not set(region_strategy_names()) & set(strategy_names())
    for taken in ("region_random", "entropy"):
        with pytest.raises(ValueError, match=f"strategy '{taken}' is already registered"):
            register_region_strategy(taken)(RegionRandomStrategy)


def test_nan_scores_go_last() -> None:
    table = region_table([("a", 0, float("nan"), 1), ("a", 1, 0.1, 1)])
    assert picks(build_region_strategy("region_uncertainty").select(table, 2, np.random.default_rng(0))) == [
        ("a", 1), ("a", 0)]
