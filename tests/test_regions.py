"""Regions without Ray: proposals (SLIC, SAM, grid) and their cache, region scoring, the simulated
region oracle, partial masks, and partial-label training (ignored pixels give no gradient)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from strategies import CostModel, build_region_strategy, region_strategy_names
from strategies import region_columns as rcol
from workers import (
    REGION_SCORED_COLUMNS,
    ClassInfo,
    EmbeddingCache,
    LossSpec,
    RegionCache,
    RegionProposer,
    RegionScorer,
    RegionSpec,
    SamSpec,
    SegmentationLoss,
    build_model,
    image_annotation_costs,
    label_regions,
    labeled_pixel_count,
    labeled_pixels_per_sample,
    load_mask,
    masks_to_regions,
    merge_partial_masks,
    new_sam,
    propose_regions,
    region_rows,
    sam_checkpoint_id,
    tidy_regions,
    write_mask,
)
from workers._losses import LOSS_NAMES
from workers._regions import grid_regions, relabel, resize_regions
from workers._sam_cache import file_digest

IGNORE = 255


def assert_partition(regions: np.ndarray, hw: tuple[int, int]) -> int:
    """Every pixel holds one id of 0..K-1 and every id has pixels; returns K."""
    assert regions.shape == hw and regions.dtype == np.int32
    k = int(regions.max()) + 1
    assert regions.min() == 0 and (np.bincount(regions.ravel(), minlength=k) > 0).all()
    return k


def assert_contiguous(regions: np.ndarray) -> None:
    """Every region is one 4-connected piece."""
    from skimage.measure import label

    pieces = label(regions + 1, background=0, connectivity=1)
    assert pieces.max() == regions.max() + 1


def two_colour_image(hw: tuple[int, int] = (48, 64), seed: int = 0) -> np.ndarray:
    """Red left of column 27, blue right of it, with mild noise: a sharp vertical boundary."""
    rng = np.random.default_rng(seed)
    image = np.zeros((*hw, 3), np.uint8)
    image[:, :27] = (200, 40, 40)
    image[:, 27:] = (40, 40, 200)
    noise = rng.integers(-10, 11, image.shape)
    return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def write_rgb(path: Path, image: np.ndarray) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return str(path)


# -- proposals -------------------------------------------------------------------------------------------


def test_slic_regions_partition_the_image_and_respect_a_sharp_boundary() -> None:
    spec = RegionSpec(image_size=(48, 64), method="slic", n_segments=24, min_region_px=8)
    regions = propose_regions(two_colour_image(), spec)
    k = assert_partition(regions, (48, 64))
    assert 8 <= k <= 48
    assert_contiguous(regions)
    assert np.bincount(regions.ravel()).min() >= 8
    # No superpixel crosses the colour boundary between columns 26 and 27.
    left = np.unique(regions[:, :27])
    right = np.unique(regions[:, 27:])
    assert not set(left.tolist()) & set(right.tolist())
    # Same input, same map; an image of another size is resized to the scoring resolution first.
    assert np.array_equal(regions, propose_regions(two_colour_image(), spec))
    big = cv2.resize(two_colour_image(), (128, 96), interpolation=cv2.INTER_NEAREST)
    assert propose_regions(big, spec).shape == (48, 64)


def test_grid_regions_and_tidying() -> None:
    grid = grid_regions((10, 10), 4)  # cells of 4 x 4, 4 x 2, 2 x 4 and a 2 x 2 corner
    assert grid.max() == 8 and np.bincount(grid.ravel()).tolist() == [16, 16, 8, 16, 16, 8, 8, 8, 4]
    tidy = propose_regions(np.zeros((10, 10, 3), np.uint8), RegionSpec(image_size=(10, 10), method="grid", cell_px=4,
                                                                       min_region_px=5))
    assert assert_partition(tidy, (10, 10)) == 8  # the 4-pixel corner joined a neighbour
    # A label in two places becomes two regions; a one-pixel speck joins the region around it.
    labels = np.zeros((6, 9), np.int64)
    labels[:, 3:6] = 1
    labels[2, 1] = 7
    out = tidy_regions(labels, min_region_px=2)
    assert assert_partition(out, (6, 9)) == 3
    assert out[2, 1] == out[0, 0] and out[0, 0] != out[0, 8]
    assert relabel(np.array([[5, 5, 2], [9, 2, 2]])).tolist() == [[0, 0, 1], [2, 1, 1]]
    up = resize_regions(np.array([[0, 1], [2, 3]]), (4, 6))
    assert up.tolist() == [[0] * 3 + [1] * 3] * 2 + [[2] * 3 + [3] * 3] * 2


def test_masks_fill_every_pixel_smallest_mask_on_top_and_leftovers_form_regions() -> None:
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :, :6] = True  # A: 60 pixels
    masks[1, 2:4, 2:8] = True  # B: 12 pixels, over A and beyond it
    regions = masks_to_regions(masks[:2], min_region_px=1)
    assert assert_partition(regions, (10, 10)) == 3
    sizes = sorted(np.bincount(regions.ravel()).tolist())
    assert sizes == [12, 36, 52]  # B, what no mask covers, A without B
    assert regions[2, 3] == regions[3, 7]  # the overlap belongs to the smaller mask
    # D splits what is left: pieces of the leftover become regions of their own.
    masks[2, :, 7] = True  # D: 10 pixels, painted over B
    regions = masks_to_regions(masks, min_region_px=1)
    assert assert_partition(regions, (10, 10)) == 6
    assert sorted(np.bincount(regions.ravel()).tolist()) == [2, 6, 10, 10, 20, 52]
    assert_contiguous(regions)
    # No mask at all: the whole image is one region.
    assert masks_to_regions(np.zeros((0, 5, 7), bool), 4).tolist() == np.zeros((5, 7), np.int32).tolist()


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="regions.method: unknown method 'felzenszwalb'; valid: slic, sam, grid"):
        RegionSpec(image_size=(8, 8), method="felzenszwalb")
    with pytest.raises(ValueError, match=r"regions.image_size: expected \(height, width\)"):
        RegionSpec(image_size=(8, 0))
    with pytest.raises(ValueError, match="regions.n_segments out of range: 0"):
        RegionSpec(image_size=(8, 8), n_segments=0)
    with pytest.raises(ValueError, match="needs a SAM model"):
        propose_regions(np.zeros((8, 8, 3), np.uint8), RegionSpec(image_size=(8, 8), method="sam"))
    with pytest.raises(ValueError, match="needs the sam section"):
        RegionProposer(RegionSpec(image_size=(8, 8), method="sam"), "unused")
    # Only the chosen method's parameters are part of the key.
    base = RegionSpec(image_size=(8, 8))
    assert base.key() == RegionSpec(image_size=(8, 8), cell_px=5).key() != RegionSpec(image_size=(8, 8), n_segments=9).key()
    assert base.key() != RegionSpec(image_size=(8, 9)).key()


# -- the cache -------------------------------------------------------------------------------------------


def test_cache_hit_avoids_recomputation_and_a_changed_image_misses(tmp_path: Path, monkeypatch) -> None:
    import workers._regions as regions_module

    calls: list[int] = []
    real_slic = regions_module.slic_regions

    def counted_slic(*args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(1)
        return real_slic(*args, **kwargs)

    monkeypatch.setattr(regions_module, "slic_regions", counted_slic)
    path = write_rgb(tmp_path / "im.png", two_colour_image((60, 80)))
    spec = RegionSpec(image_size=(30, 40), n_segments=12, min_region_px=4)
    cache_dir = tmp_path / "cache"
    proposer = RegionProposer(spec, str(cache_dir))
    first, hit = proposer.regions(path)
    assert not hit and len(calls) == 1 and proposer.computed == 1
    second, hit = proposer.regions(path)
    assert hit and len(calls) == 1 and np.array_equal(first, second) and second.dtype == np.int32
    # Another actor (or a later round) reads it back too.
    other = RegionProposer(spec, str(cache_dir))
    assert other.regions(path)[1] and other.computed == 0 and len(calls) == 1
    # Layout: <root>/<spec key>/<sha[:2]>/<sha>.npz beside spec.json; no temporary file left.
    digest = file_digest(path)
    entry = cache_dir / spec.key() / digest[:2] / f"{digest}.npz"
    assert entry.is_file() and (cache_dir / spec.key() / "spec.json").is_file()
    assert not [p for p in cache_dir.rglob("*") if ".tmp-" in p.name]
    # A changed image has another digest: a miss, computed again.
    write_rgb(tmp_path / "im.png", two_colour_image((60, 80), seed=1))
    assert not proposer.regions(path)[1] and len(calls) == 2
    # Other parameters are another cache; a damaged entry is a miss and is rewritten.
    assert not RegionProposer(RegionSpec(image_size=(30, 40), n_segments=20), str(cache_dir)).regions(path)[1]
    entry.write_bytes(b"garbage")
    cache = RegionCache(str(cache_dir), spec)
    assert cache.get(digest) is None and cache.misses == 1
    # Batch call (what Ray Data runs): per-image numbers only.
    out = proposer({"sample_id": np.array(["a", "b"]), "image_path": np.array([path, str(write_rgb(tmp_path / "b.png", two_colour_image((60, 80), 2)))])})
    assert out["regions_cached"].tolist() == [True, False] and (out["num_regions"] > 1).all()


# -- SAM ---------------------------------------------------------------------------------------------------


def tiny_sam_spec(tmp_path: Path) -> SamSpec:
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(new_sam("tiny").state_dict(), checkpoint)
    return SamSpec(model_type="tiny", checkpoint=str(checkpoint), cache_uri=str(tmp_path / "sam_cache"))


def test_sam_regions_partition_every_pixel_and_reuse_the_embedding_cache(tmp_path: Path) -> None:
    sam = tiny_sam_spec(tmp_path)
    sam_id = sam_checkpoint_id(sam.model_type, sam.checkpoint)
    image = two_colour_image((48, 64))
    image[10:25, 35:55] = (240, 240, 60)
    path = write_rgb(tmp_path / "scene.png", image)
    # A random SAM rates its masks poorly: keep every mask it makes (the thresholds off). Its masks
    # are noisy, which makes SAM's own run-length encoding slow: few points, a small image.
    spec = RegionSpec(image_size=(24, 32), method="sam", points_per_side=2, pred_iou_thresh=0.0,
                      stability_score_thresh=0.0, min_region_px=4)
    proposer = RegionProposer(spec, str(tmp_path / "regions"), sam, sam_id)
    assert proposer.engine is not None
    encoded = [0]
    proposer.engine.sam.image_encoder.register_forward_hook(lambda m, a, o: encoded.__setitem__(0, encoded[0] + 1))
    regions, hit = proposer.regions(path)
    assert not hit and encoded[0] == 1
    assert_partition(regions, (24, 32))
    assert_contiguous(regions)
    # The embedding went to the SAM cache, the map to the region cache (keyed by the SAM weights too).
    assert file_digest(path) in EmbeddingCache(sam.cache_uri, sam_id)
    assert (tmp_path / "regions" / spec.key(sam_id)).is_dir()
    # A fresh region cache recomputes the map from the cached embedding: no image encoder pass.
    again = RegionProposer(spec, str(tmp_path / "regions-2"), sam, sam_id)
    hook = [0]
    assert again.engine is not None
    again.engine.sam.image_encoder.register_forward_hook(lambda m, a, o: hook.__setitem__(0, hook[0] + 1))
    regions_again, hit = again.regions(path)
    assert not hit and hook[0] == 0 and again.computed == 1
    assert_partition(regions_again, (24, 32))


# -- scoring -------------------------------------------------------------------------------------------------


def test_region_rows_hand_checked() -> None:
    probs = np.zeros((2, 4, 4))
    probs[0, :, :2] = 1.0  # left region: certain class 0
    probs[1, :, 2:] = 1.0  # right region: certain class 1 ...
    probs[:, 0, 2:] = 0.5  # ... but for two undecided pixels (argmax: class 0)
    regions = np.zeros((4, 4), np.int64)
    regions[:, 2:] = 1
    labeled = np.zeros((4, 4), bool)
    labeled[:, 0] = True
    out = region_rows(torch.as_tensor(probs), regions, class_weights=[1.0, 3.0], labeled=labeled)
    assert out[rcol.REGION_ID].tolist() == [0, 1] and out[rcol.REGION_PIXELS].tolist() == [8, 8]
    assert out[rcol.ENTROPY_MEAN] == pytest.approx([0.0, 2 * math.log(2) / 8])
    assert out[rcol.MARGIN_MEAN] == pytest.approx([1.0, 6 / 8])
    assert out[rcol.DOMINANT_CLASS].tolist() == [0, 1] and out[rcol.DOMINANT_FRACTION] == pytest.approx([1.0, 0.75])
    assert out["pred_frac_0"] == pytest.approx([1.0, 0.25]) and out["pred_frac_1"] == pytest.approx([0.0, 0.75])
    assert out[rcol.CLASS_BALANCED] == pytest.approx([0.0, 3 * 2 * math.log(2) / 8])
    # Right region: purity 0.75 < 0.9, so one click plus a polygon (3 vertices) round the class-0 pixels.
    assert out[rcol.COST_CLICKS].tolist() == [1.0, 4.0]
    assert out[rcol.LABELED_FRACTION].tolist() == [0.5, 0.0]
    assert region_rows(probs, regions, cost=CostModel(purity_threshold=0.0))[rcol.COST_CLICKS].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="do not match"):
        region_rows(probs, regions[:3])
    with pytest.raises(ValueError, match="class_weights: expected 2 weights"):
        region_rows(probs, regions, class_weights=[1.0])


def test_class_balanced_selection_prefers_a_region_predicted_as_a_rare_class() -> None:
    # Two images with one equally uncertain region each; in b it is predicted as class 2, rare so far.
    def image(cls: int) -> np.ndarray:
        probs = np.full((3, 6, 6), 0.1)
        probs[0] = 0.8
        probs[:, :3, :3] = 0.05
        probs[cls, :3, :3] = 0.9
        return probs

    regions = np.zeros((6, 6), np.int64)
    regions[:3, :3] = 1
    shares = np.array([0.7, 0.29, 0.01])  # labeled pixel shares per class
    weights = 1 / (shares + 1e-3)
    weights /= weights.mean()
    frames = []
    for sid, cls in (("a", 1), ("b", 2)):
        rows = region_rows(image(cls), regions, class_weights=weights)
        frames.append(pd.DataFrame({rcol.SAMPLE_ID: sid, **rows}))
    table = pd.concat(frames, ignore_index=True)
    rng = np.random.default_rng(0)
    balanced = build_region_strategy("region_class_balanced").select(table, 1, rng)
    assert list(zip(balanced[rcol.SAMPLE_ID], balanced[rcol.REGION_ID])) == [("b", 1)]
    # Plain uncertainty prefers the backgrounds (0.8 / 0.1 / 0.1 is more uncertain than 0.9 / 0.05 /
    # 0.05), the same in both images: the tie falls to the seeded order, the same for the same seed,
    # either image over seeds (not the first id).
    def plain(seed: int) -> tuple[str, int]:
        [pick] = build_region_strategy("region_uncertainty").select(table, 1, np.random.default_rng(seed)).itertuples()
        return (getattr(pick, rcol.SAMPLE_ID), int(getattr(pick, rcol.REGION_ID)))

    picks = [plain(seed) for seed in range(12)]
    assert set(picks) == {("a", 0), ("b", 0)} and picks == [plain(seed) for seed in range(12)]


@pytest.mark.parametrize("name", region_strategy_names())
def test_the_region_scorer_writes_what_every_region_strategy_reads(name: str) -> None:
    assert build_region_strategy(name).requirements().columns <= REGION_SCORED_COLUMNS


def test_region_scorer_batch_returns_one_row_per_region(tmp_path: Path) -> None:
    from workers._models import save_model_state

    torch.manual_seed(0)
    save_model_state(build_model("unet", 3, {"base_channels": 4, "depth": 2}), tmp_path / "model.pt")
    paths = [write_rgb(tmp_path / f"im{i}.png", two_colour_image((40, 60), seed=i)) for i in range(2)]
    partial = np.full((40, 60), IGNORE, np.int64)
    partial[:, :10] = 1
    write_mask(tmp_path / "partial.png", partial)
    spec = RegionSpec(image_size=(24, 32), n_segments=10, min_region_px=4)
    scorer = RegionScorer(str(tmp_path / "model.pt"), spec, str(tmp_path / "cache"), ("a", "b", "c"), IGNORE,
                          class_weights=[1.0, 1.0, 1.0])
    batch = {"sample_id": np.array(["s0", "s1"]), "image_path": np.array(paths),
             "mask_path": np.array([str(tmp_path / "partial.png"), ""], dtype=object)}
    out = scorer(batch)
    frame = pd.DataFrame(out)
    maps = [scorer.proposer.regions(p)[0] for p in paths]
    assert len(frame) == sum(int(m.max()) + 1 for m in maps)
    assert not frame.duplicated([rcol.SAMPLE_ID, rcol.REGION_ID]).any()
    assert frame.groupby(rcol.SAMPLE_ID)[rcol.REGION_PIXELS].sum().tolist() == [24 * 32, 24 * 32]
    assert REGION_SCORED_COLUMNS | {rcol.SAMPLE_ID, "pred_frac_2"} <= set(frame.columns)
    s0 = frame[frame[rcol.SAMPLE_ID] == "s0"]
    assert (s0[rcol.LABELED_FRACTION] > 0).any() and (frame.loc[frame[rcol.SAMPLE_ID] == "s1", rcol.LABELED_FRACTION] == 0).all()
    assert not out["regions_cached"].any() and scorer(batch)["regions_cached"].all()


# -- the simulated oracle and partial masks ------------------------------------------------------------------------


def quadrant_truth() -> np.ndarray:
    """16 x 16 truth; quadrants (8 x 8) are regions 0 (top left), 1, 2, 3 (bottom right). Drawn at
    8 x 8 below, then every pixel doubled."""
    truth = np.zeros((8, 8), np.int64)
    truth[0, 0] = 1  # region 0: 15 of 16 pixels class 0 (purity 0.9375)
    truth[:, 4:] = 0
    truth[:4, 6:] = 2  # region 1: half class 0, half class 2 (mixed)
    truth[4:, :4] = 3
    truth[4, :4] = IGNORE  # region 2: class 3, its top row ignored in the truth
    truth[4:, 4:] = 1  # region 3: class 1
    return np.kron(truth, np.ones((2, 2), np.int64))


def test_oracle_assigns_dominant_classes_marks_mixed_regions_and_merges() -> None:
    truth = quadrant_truth()
    regions = grid_regions((4, 4), 2)  # at a quarter of the truth's resolution: enlarged to quadrants
    existing = np.full((16, 16), IGNORE, np.int64)
    existing[0, 2] = 2  # labeled before: kept, even where the click would say otherwise
    result = label_regions(truth, regions, [0, 1, 2], ignore_index=IGNORE, cost=CostModel(purity_threshold=0.9),
                           partial=existing)
    mask = result.mask
    # Region 0: 60 of 64 pixels class 0, pure enough: all get class 0 (the class-1 ones too), bar the
    # pixel labeled before.
    assert mask[0, 2] == 2 and (np.delete(mask[:8, :8].ravel(), 2) == 0).all()
    # Region 1: mixed, drawn in full: its true pixels.
    assert np.array_equal(mask[:8, 8:], truth[:8, 8:])
    # Region 2: class 3 on the pixels the truth labels; its ignored rows stay unlabeled.
    assert (mask[8:10, :8] == IGNORE).all() and (mask[10:, :8] == 3).all()
    # Region 3 was not asked.
    assert (mask[8:, 8:] == IGNORE).all()
    rows = result.rows.set_index(rcol.REGION_ID)
    assert rows[rcol.LABEL_CLASS].tolist() == [0, 0, 3]  # region 1: a tie, the lower class id
    assert rows[rcol.PURITY].tolist() == pytest.approx([60 / 64, 0.5, 1.0])
    assert rows[rcol.MIXED].tolist() == [False, True, False]
    assert rows[rcol.LABELED_PIXELS].tolist() == [63, 64, 48]
    # Clicks: one per region; region 1 also draws its 8 x 4 class-2 rectangle (4 vertices).
    assert rows[rcol.CLICKS].tolist() == [1.0, 5.0, 1.0]
    assert (result.cost.clicks, result.cost.pixels, result.cost.regions, result.cost.images) == (7.0, 175, 3, 1)
    # Labeling region 3 later merges into the same partial mask.
    later = label_regions(truth, regions, [3], ignore_index=IGNORE, partial=mask)
    assert (later.mask[8:, 8:] == 1).all() and np.array_equal(later.mask[:8], mask[:8])
    assert labeled_pixel_count(later.mask, IGNORE) == 175 + 1 + 64
    # Dominant labeling only: nothing is drawn.
    assert not label_regions(truth, regions, [1], ignore_index=IGNORE, cost=CostModel(purity_threshold=0.0)).rows[
        rcol.MIXED].any()
    with pytest.raises(ValueError, match="a region is asked twice"):
        label_regions(truth, regions, [1, 1], ignore_index=IGNORE)
    with pytest.raises(ValueError, match=r"region 9 is not in the region map \(ids 0..3\)"):
        label_regions(truth, regions, [9], ignore_index=IGNORE)


def test_merge_partial_masks_keeps_labeled_pixels() -> None:
    old = np.array([[IGNORE, 1], [2, IGNORE]])
    new = np.array([[0, 0], [0, IGNORE]])
    assert merge_partial_masks(old, new, IGNORE).tolist() == [[0, 1], [2, IGNORE]]
    with pytest.raises(ValueError, match="different sizes"):
        merge_partial_masks(old, new[:1], IGNORE)


def test_partial_masks_on_disk_and_labeled_pixels_per_sample(tmp_path: Path) -> None:
    classes = ClassInfo(names=("bg", "a", "b"), ignore_index=IGNORE)
    partial = np.full((6, 10), IGNORE, np.int64)
    partial[:2, :5] = 1
    write_mask(tmp_path / "masks" / "p.png", partial)
    assert not [p for p in (tmp_path / "masks").iterdir() if p.name != "p.png"]  # no temporary file left
    assert np.array_equal(load_mask(str(tmp_path / "masks" / "p.png"), classes), partial)
    full = np.zeros((6, 10), np.int64)
    write_mask(tmp_path / "masks" / "f.png", full)
    table = labeled_pixels_per_sample(["p", "f"], [str(tmp_path / "masks" / n) for n in ("p.png", "f.png")], classes)
    assert table["labeled_pixels"].tolist() == [10, 60] and table["labeled_frac"].tolist() == pytest.approx([1 / 6, 1.0])
    # Whole images on the click axis: the two-squares mask costs 12 clicks.
    squares = np.zeros((20, 20), np.int64)
    squares[2:7, 2:7] = 1
    squares[10:18, 10:18] = 2
    write_mask(tmp_path / "masks" / "sq.png", squares)
    costs = image_annotation_costs(["sq"], [str(tmp_path / "masks" / "sq.png")], classes)
    assert costs[["clicks", "objects", "vertices", "pixels"]].iloc[0].tolist() == [12, 3, 12, 400]
    with pytest.raises(ValueError, match="ids in 0..65535"):
        write_mask(tmp_path / "bad.png", np.full((2, 2), -1))


# -- partial-label training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ignored_pixels_give_no_gradient(name: str) -> None:
    torch.manual_seed(0)
    n, c, h, w = 2, 3, 8, 8
    target = torch.randint(0, c, (n, h, w))
    ignored = torch.rand(n, h, w) < 0.4
    target[ignored] = IGNORE
    loss_fn = SegmentationLoss(LossSpec(name=name, class_weights="inverse"), c, IGNORE,
                               class_weights=torch.tensor([0.5, 1.0, 2.0]))

    def loss_and_grad(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.clone().requires_grad_(True)
        loss = loss_fn(logits, target, step=None)
        loss.backward()
        assert logits.grad is not None
        return loss.detach(), logits.grad

    logits = torch.randn(n, c, h, w)
    loss, grad = loss_and_grad(logits)
    # Anything at the ignored pixels, however extreme, changes nothing elsewhere.
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[ignored] = torch.randn(int(ignored.sum()), c) * 50
    loss2, grad2 = loss_and_grad(changed)
    assert torch.allclose(loss, loss2, rtol=0, atol=1e-6)
    keep = ~ignored.unsqueeze(1).expand(-1, c, -1, -1)
    assert torch.allclose(grad[keep], grad2[keep], rtol=0, atol=1e-7)
    assert (grad.permute(0, 2, 3, 1)[ignored] == 0).all() and (grad2.permute(0, 2, 3, 1)[ignored] == 0).all()
    assert grad[keep].abs().sum() > 0
