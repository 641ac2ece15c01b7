"""Region-level acquisition in the loop (``loop.unit: region``): regions scored with Ray Data,
selected under a click budget, labeled by the simulated region oracle into partial masks that the
next round trains on; image-level runs are charged in clicks too."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import strategies
import workers
from orchestrator import ActiveLearningLoop, config_from_dict

from .conftest import tiny_config

pytestmark = pytest.mark.ray

BUDGET = 25.0
REGION = {
    # region_random spreads the picks, so some image is labeled in both rounds (its mask grows).
    "loop": {"unit": "region", "strategy": "region_random", "rounds": 2},
    "regions": {"method": "grid", "cell_px": 8, "budget_clicks": BUDGET},
    # A quarter of these cells are mixed at 0.75 and cost more than the (pure) estimate of an
    # untrained model, yet not so much more that round 1's overrun leaves round 2 nothing.
    "cost": {"purity_threshold": 0.75, "clicks_per_vertex": 0.0, "clicks_per_object": 0.5},
}
IGNORE = 255


def _records(workdir: Path, round_index: int) -> pd.DataFrame:
    return pd.read_parquet(workdir / "rounds" / f"round-{round_index:03d}" / "labeled_regions.parquet")


def test_region_rounds_spend_the_click_budget_on_regions_and_train_on_partial_masks(
    tmp_path: Path, ray_cluster: None
) -> None:
    workdir = tmp_path / "region"
    loop = ActiveLearningLoop(config_from_dict(tiny_config(**REGION)), workdir)
    results = loop.run()
    assert [r.round for r in results] == [1, 2]
    classes = workers.ClassInfo(names=workers.SYNTHETIC_CLASSES.names, ignore_index=IGNORE)
    spec = workers.RegionSpec(image_size=(32, 48), method="grid", cell_px=8)
    cache = workers.RegionCache(workdir / "region_cache", spec)

    # Clicks: round r queues regions worth up to twice (regions.queue_factor) its budget, which is
    # budget_clicks * r minus what earlier rounds really cost (the carry-over), by the model's
    # estimate; the oracle labels the queue in rank order at the real cost (from the truth) and
    # skips a region that would take the round over its budget. The table charges what the oracle
    # says the labels cost.
    first = loop.store.read(loop.store.lineage(results[0].revision)[-1].id)
    initial_clicks = first.loc[first.labeled, "clicks"].sum()
    assert initial_clicks > 0 and (first.loc[~first.labeled, "clicks"] == 0).all()
    spent = 0.0
    seen: set[tuple[str, int]] = set()
    truth_of = first.set_index("sample_id")["truth_path"]
    image_of = first.set_index("sample_id")["image_path"]
    skipped_total = 0
    for r in results:
        selection = pd.read_csv(workdir / "rounds" / f"round-{r.round:03d}" / "selection.csv", dtype={"sample_id": str})
        records = _records(workdir, r.round)
        budget = BUDGET * r.round - spent
        estimated, actual = selection.cost_clicks.sum(), records.clicks.sum()
        assert 0 < estimated <= 2 * budget + 1e-9
        assert 0 < actual <= budget + 1e-9
        total, expected = 0.0, []
        for row in selection.sort_values("rank").itertuples():
            truth = workers.load_mask(truth_of[row.sample_id], classes)
            regions = cache.get(workers.file_digest(image_of[row.sample_id]))
            real = workers.label_regions(truth, regions, [row.region_id], ignore_index=IGNORE,
                                         cost=strategies.CostModel(**REGION["cost"])).cost.clicks
            if total + real <= budget + 1e-9:
                expected.append((row.sample_id, row.region_id))
                total += real
        assert list(zip(records.sample_id, records.region_id)) == expected
        assert actual == pytest.approx(total)
        skipped_total += len(selection) - len(records)
        pairs = set(zip(records.sample_id, records.region_id.astype(int)))
        assert not pairs & seen  # a region is labeled once
        seen |= pairs
        spent += actual
        table = loop.store.read(r.revision)
        assert table.loc[table.labeled, "clicks"].sum() == pytest.approx(initial_clicks + spent)
        assert r.metrics["round_clicks"] == pytest.approx(actual)
        assert r.extra["clicks"] == pytest.approx(initial_clicks + spent) == r.metrics["labeled_clicks"]
        assert r.metrics["labeled_regions"] == len(seen)
        touched = records.sample_id.nunique()
        assert re.fullmatch(rf"round {r.round}: \+{len(records)} regions in {touched} images, [0-9.e+]+ clicks "
                            r"by region_random", loop.store.info(r.revision).comment)
        # Labeled pixels per class (counted from the masks, cached by mask path) add up to the
        # table's count, also for a mask that grew since the previous round's count.
        per_class = sum(r.metrics[f"labeled_pixels_{name}"] for name in classes.names)
        assert per_class == r.metrics["labeled_pixels_total"]
        assert sorted(r.added) == sorted(records.sample_id.unique())

        # Every revision's masks: labeled_pixels matches the file; a partial mask holds the truth's
        # classes only inside the regions labeled so far (a pure region its dominant class, a mixed
        # one its true pixels) and the ignore index everywhere else.
        labeled = table[table.labeled]
        done = pd.concat([_records(workdir, k) for k in range(1, r.round + 1)], ignore_index=True)
        for row in labeled.itertuples():
            mask = workers.load_mask(row.mask_path, classes)
            assert row.labeled_pixels == (mask != IGNORE).sum()
            if not row.partial:
                assert row.round_labeled == 0 and row.mask_path == row.truth_path
                continue
            assert Path(row.mask_path).parent.name == f"round-{r.round:03d}" or row.sample_id not in set(records.sample_id)
            assert "labels/partial/round-" in row.mask_path
            truth = workers.load_mask(row.truth_path, classes)
            regions = workers.resize_regions(cache.get(workers.file_digest(row.image_path)), truth.shape)
            mine = done[done.sample_id == row.sample_id]
            assert row.regions_labeled == len(mine)
            inside = np.isin(regions, mine.region_id.to_numpy())
            np.testing.assert_array_equal(mask != IGNORE, inside & (truth != IGNORE))
            for rec in mine.itertuples():
                pixels = (regions == rec.region_id) & (truth != IGNORE)
                expected = truth[pixels] if rec.mixed else np.full(pixels.sum(), rec.label_class)
                np.testing.assert_array_equal(mask[pixels], expected)

    assert skipped_total > 0  # the queue was longer than the budget paid for

    # Training drew a whole image with weight 1 and a partial mask with the share of a whole image
    # its labeled pixels make up (regions.train_weighting: labeled_pixels); round 1 (whole images
    # only) trained as an image-level round does.
    for r in results:
        weights = pd.read_csv(workdir / "rounds" / f"round-{r.round:03d}" / "train_weights.csv",
                              dtype={"sample_id": str}).set_index("sample_id")["weight"]
        parent = loop.store.read(loop.store.info(r.revision).parent).set_index("sample_id").loc[weights.index]
        whole = float(np.median(parent.loc[~parent.partial, "labeled_pixels"]))
        expected = np.where(parent.partial, np.minimum(parent.labeled_pixels / whole, 1.0), 1.0)
        assert len(weights) == r.trained_on and parent.partial.any() == (r.round == 2)
        np.testing.assert_allclose(weights.to_numpy(), expected)
        if r.round == 2:
            assert weights[parent.partial.to_numpy()].max() < 0.5  # a few cells of 24

    # Round 2 trained on round 1's partial masks, and labeled more regions of some of them.
    round1 = set(_records(workdir, 1).sample_id)
    assert round1 & set(_records(workdir, 2).sample_id)
    trained = set(pd.read_parquet(workdir / "rounds" / "round-002" / "train_signals.parquet").sample_id)
    assert round1 <= trained
    assert results[1].trained_on == 8 + len(round1)
    final = loop.store.read(results[-1].revision)
    assert final.loc[final.sample_id.isin(round1), "partial"].all()
    assert final.labeled_pixels.dtype == np.int64 and final.regions_labeled.dtype == np.int64
    # The scorer weighed uncertainty by the labeled class shares (the class-balanced column).
    scores = workers.read_scores(str(workdir / "rounds" / "round-002" / "region_scores"))
    assert len(scores) == 24 * (36 - 8) and (scores.entropy_class_balanced != scores.entropy_mean).any()


def test_image_runs_are_charged_in_clicks_from_the_same_initial_set(tmp_path: Path, ray_cluster: None) -> None:
    image = ActiveLearningLoop(config_from_dict(tiny_config(loop={"strategy": "random", "rounds": 1},
                                                            review={"enabled": False})), tmp_path / "image")
    [result] = image.run()
    table = image.store.read(result.revision)
    added = table[table.sample_id.isin(result.added)]
    assert len(added) == 6
    costs = workers.image_annotation_costs(added.sample_id.tolist(), added.mask_path.tolist(), workers.SYNTHETIC_CLASSES)
    np.testing.assert_allclose(added.clicks.to_numpy(), costs.clicks.to_numpy())
    np.testing.assert_array_equal(added.labeled_pixels.to_numpy(), costs.pixels.to_numpy())
    assert result.extra["clicks"] == pytest.approx(table.loc[table.labeled, "clicks"].sum())
    assert result.metrics["round_clicks"] == pytest.approx(added.clicks.sum())

    # A region run of the same seed (and cost model) starts from the same images at the same clicks.
    same_cost = {k: v for k, v in REGION.items() if k != "cost"}
    region = ActiveLearningLoop(config_from_dict(tiny_config(**same_cost)), tmp_path / "region")
    start = region.store.read(region.start().revision)
    first = image.store.read(image.store.lineage(result.revision)[-1].id)
    assert set(start.loc[start.labeled, "sample_id"]) == set(first.loc[first.labeled, "sample_id"])
    assert start.loc[start.labeled, "clicks"].sum() == pytest.approx(first.loc[first.labeled, "clicks"].sum())
    assert not start.partial.any() and (start.truth_path == start.mask_path).all()


@pytest.mark.parametrize(("sections", "message"), [
    ({"loop": {"unit": "region", "strategy": "entropy"}, "regions": {"budget_clicks": 5}},
     "loop.strategy: 'entropy' is not a region strategy.*region_class_balanced, region_random, region_uncertainty"),
    ({"loop": {"strategy": "region_random"}}, "loop.strategy: 'region_random' selects regions; set loop.unit: region"),
    ({"loop": {"unit": "region", "strategy": "region_random"}}, "regions.budget_clicks: required"),
    ({**REGION, "regions": {"method": "sam", "budget_clicks": 5}}, "regions.method: 'sam' needs sam.enabled"),
    ({**REGION, "regions": {"method": "grid", "cell_px": 0, "budget_clicks": 5}}, "regions.cell_px"),
    ({"cost": {"purity_threshold": 1.5}}, "cost.purity_threshold"),
])
def test_region_config_errors_name_the_key(sections: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_dict(tiny_config(**sections))


def test_the_region_protocol_starts_from_random_regions_not_whole_images(tmp_path: Path, ray_cluster: None) -> None:
    """``regions.initial_clicks``: round 0 labels random regions across the pool worth those clicks
    (at their real cost, by the simulated oracle), no whole image; the rounds' click budgets start
    after them."""
    settings = {**REGION, "regions": {**REGION["regions"], "initial_clicks": 30.0}, "loop": {**REGION["loop"], "rounds": 2}}
    loop = ActiveLearningLoop(config_from_dict(tiny_config(**settings)), tmp_path / "work")
    state = loop.start()
    first = loop.store.read(state.revision)
    labeled = first[first.labeled]
    assert len(labeled) > 1 and labeled.partial.all()  # regions only: every labeled image holds a part
    records = _records(loop.workdir, 0)
    assert 0 < records.clicks.sum() <= 30.0 + 1e-9 and (records["round"] == 0).all()
    assert labeled.clicks.sum() == pytest.approx(records.clicks.sum())
    assert set(records.sample_id) == set(labeled.sample_id)
    assert "random regions" in loop.store.info(state.revision).comment
    by_image = records.groupby("sample_id").size()
    assert by_image.max() < 10  # spread over the pool, not one image's regions in a row
    result, second = loop.run()
    round_records = _records(loop.workdir, 1)
    assert 0 < round_records.clicks.sum() <= BUDGET + 1e-9  # the round's own budget, the initial clicks aside
    assert not set(zip(round_records.sample_id, round_records.region_id)) & set(zip(records.sample_id, records.region_id))
    assert result.metrics["labeled_clicks"] == pytest.approx(records.clicks.sum() + round_records.clicks.sum())
    # round 1's regions went partly to images round 0 touched: still counted as spent, so two rounds
    # spend at most two budgets (the initial regions' images do not hide later clicks)
    assert set(round_records.sample_id) & set(records.sample_id)
    second_records = _records(loop.workdir, 2)
    assert round_records.clicks.sum() + second_records.clicks.sum() <= 2 * BUDGET + 1e-9
    assert second.metrics["labeled_clicks"] == pytest.approx(
        records.clicks.sum() + round_records.clicks.sum() + second_records.clicks.sum())


def test_initial_regions_in_every_image_leave_the_pool_open(tmp_path: Path, ray_cluster: None) -> None:
    """The region protocol's random regions can touch every pool image (many clicks, few images):
    each is labeled in part only, so the pool is still open and round 1 labels more regions."""
    settings = {**REGION, "regions": {**REGION["regions"], "initial_clicks": 300.0},
                "cost": {"purity_threshold": 0.0}, "loop": {**REGION["loop"], "rounds": 1}}
    loop = ActiveLearningLoop(config_from_dict(tiny_config(**settings)), tmp_path / "work")
    state = loop.start()
    first = loop.store.read(state.revision)
    train = first[first.split == "train"]
    assert train.labeled.all() and train.partial.all()  # no image left without a label, none whole
    (result,) = loop.run()
    initial, round_records = _records(loop.workdir, 0), _records(loop.workdir, 1)
    assert len(round_records) > 0 and round_records.clicks.sum() <= BUDGET + 1e-9
    assert not set(zip(round_records.sample_id, round_records.region_id)) & set(zip(initial.sample_id, initial.region_id))
    assert result.metrics["labeled_clicks"] == pytest.approx(300.0 + round_records.clicks.sum())
