"""SAM prompts from hand-made class-id masks, jitter and the agreement columns (numpy only)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies import columns as col
from workers import PromptSpec, agreement_columns, component_iou, jitter_prompts, prompts_from_mask


def hand_made_mask() -> np.ndarray:
    """40 x 60: two rectangles of class 1, a disk and an L of class 2, a 2x2 speck of class 3,
    a thin 3-px line of class 2, ignored pixels (255) in a corner."""
    m = np.zeros((40, 60), np.int64)
    m[2:12, 3:20] = 1  # 10 x 17 rectangle
    m[25:38, 40:58] = 1  # 13 x 18 rectangle
    yy, xx = np.mgrid[:40, :60]
    m[(yy - 18) ** 2 + (xx - 35) ** 2 <= 36] = 2  # disk, radius 6
    m[20:36, 5:9] = 2  # L: a vertical bar ...
    m[32:36, 5:20] = 2  # ... and its foot
    m[5:7, 50:52] = 3  # 4-pixel speck, below min_area_px
    m[0:3, 30:31] = 2  # a 3 x 1 line: min_area_px keeps it out
    m[38:, :3] = 255
    return m


def boxes_of(mask: np.ndarray) -> set[tuple[int, int, int, int, int]]:
    import cv2

    out = set()
    for c in np.unique(mask):
        if c in (0, 255):
            continue
        n, cc, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        for j in range(1, n):
            if stats[j, 4] >= 16:
                ys, xs = np.nonzero(cc == j)
                out.add((int(c), xs.min(), ys.min(), xs.max(), ys.max()))
    return out


def test_one_prompt_per_component_with_matching_boxes() -> None:
    mask = hand_made_mask()
    p = prompts_from_mask(mask, PromptSpec(min_area_px=16, positive_points=3, negative_points=2, skip_classes=(0,)), ignore_index=255)
    assert len(p) == 4  # two rectangles, the disk, the L; not the speck, the line or the ignored corner
    assert p.class_ids.tolist() == [1, 1, 2, 2]
    got = {(int(c), *map(int, b)) for c, b in zip(p.class_ids, p.boxes)}
    assert got == boxes_of(mask)
    assert (1, 3, 2, 19, 11) in got and (1, 40, 25, 57, 37) in got
    for k in range(len(p)):
        comp = p.mask(k)
        assert comp.sum() == p.areas[k]
        assert (mask[comp] == p.class_ids[k]).all()
        ys, xs = np.nonzero(comp)
        assert tuple(p.boxes[k]) == (xs.min(), ys.min(), xs.max(), ys.max())
    assert p.points.shape == (4, 5, 2) and p.labels.shape == (4, 5)


def test_points_lie_inside_their_component_and_negatives_outside() -> None:
    mask = hand_made_mask()
    spec = PromptSpec(min_area_px=16, positive_points=3, negative_points=2, erosion_px=1, skip_classes=(0,))
    p = prompts_from_mask(mask, spec, ignore_index=255)
    for k in range(len(p)):
        comp = p.mask(k)
        x0, y0, x1, y1 = p.boxes[k]
        for (x, y), label in zip(p.points[k].astype(int), p.labels[k]):
            if label == 1:
                assert comp[y, x], (k, x, y)
            elif label == 0:
                assert not comp[y, x] and x0 <= x <= x1 and y0 <= y <= y1
        positives = p.points[k][p.labels[k] == 1]
        assert len(positives) >= 1
        assert len({tuple(q) for q in positives.tolist()}) == len(positives)  # distinct points
    # The disk's first point is its centre (the distance transform's maximum).
    disk = int(np.flatnonzero((p.class_ids == 2) & (p.areas < 200))[0])
    assert tuple(p.points[disk, 0]) == (35, 18)


def test_padding_skip_classes_and_empty_masks() -> None:
    mask = hand_made_mask()
    p = prompts_from_mask(mask, PromptSpec(positive_points=1, negative_points=0, skip_classes=(0, 1)), ignore_index=255)
    assert p.class_ids.tolist() == [2, 2]
    background = prompts_from_mask(mask, PromptSpec(), ignore_index=255)
    assert background.class_ids.tolist() == [0, 1, 1, 2, 2]  # class 0 is a region like any other unless skipped
    tiny_bar = np.zeros((10, 10), np.int64)
    tiny_bar[0:8, 0:2] = 1  # erosion empties it: the uneroded bar is used
    q = prompts_from_mask(tiny_bar, PromptSpec(min_area_px=4, positive_points=4, erosion_px=3, skip_classes=(0,)))
    assert len(q) == 1 and (q.labels[0] >= 0).sum() >= 1
    assert ((q.labels[0] == 1) | (q.labels[0] == -1)).all()  # missing points padded with -1
    full = prompts_from_mask(np.ones((6, 6), np.int64), PromptSpec(min_area_px=1, negative_points=2))
    assert (full.labels[0] == [1, -1, -1]).all()  # a component filling its box has no negative point
    empty = prompts_from_mask(np.zeros((6, 6), np.int64), PromptSpec(skip_classes=(0,)))
    assert len(empty) == 0 and empty.points.shape == (0, 1, 2)
    with pytest.raises(ValueError, match="min_area_px"):
        PromptSpec(min_area_px=0)


def test_jitter_keeps_points_in_their_regions() -> None:
    mask = hand_made_mask()
    p = prompts_from_mask(mask, PromptSpec(positive_points=2, negative_points=2, skip_classes=(0,)), ignore_index=255)
    j = jitter_prompts(p, np.random.default_rng(0), box_jitter=0.2)
    assert not np.array_equal(j.boxes, p.boxes)
    assert (j.boxes[:, 0] <= j.boxes[:, 2]).all() and (j.boxes[:, 1] <= j.boxes[:, 3]).all()
    assert (j.boxes >= 0).all() and (j.boxes[:, [0, 2]] <= 59).all() and (j.boxes[:, [1, 3]] <= 39).all()
    for k in range(len(j)):
        comp = j.mask(k)
        for (x, y), label in zip(j.points[k].astype(int), j.labels[k]):
            assert label == -1 or comp[y, x] == (label == 1)


def test_agreement_is_one_for_the_model_own_mask_and_drops_otherwise() -> None:
    mask = hand_made_mask()
    p = prompts_from_mask(mask, PromptSpec(skip_classes=(0,)), ignore_index=255)
    own = np.stack([p.mask(k) for k in range(len(p))])
    iou = component_iou(p, own)
    assert iou == pytest.approx(np.ones(len(p)))
    same = agreement_columns(p, iou, num_classes=4)
    assert same[col.SAM_DISAGREEMENT_MEAN] == 0.0 and same[col.SAM_DISAGREEMENT_MAX] == 0.0
    assert same[col.SAM_COMPONENTS] == 4

    other = own.copy()
    other[0] = np.roll(own[0], 5, axis=1)  # SAM shifts the first rectangle 5 px right
    other[3] = False  # and finds nothing for the L
    iou = component_iou(p, other)
    assert iou[0] == pytest.approx((17 - 5) / (17 + 5)) and iou[3] == 0.0 and iou[1:3] == pytest.approx([1, 1])
    cols = agreement_columns(p, iou, num_classes=4)
    d0 = 1 - iou[0]
    expected_mean = (p.areas[0] * d0 + p.areas[3] * 1.0) / p.areas.sum()
    assert cols[col.SAM_DISAGREEMENT_MEAN] == pytest.approx(expected_mean)
    assert cols[col.SAM_DISAGREEMENT_MAX] == 1.0
    assert cols[col.sam_class_column(1)] == pytest.approx(p.areas[0] * d0 / p.areas[:2].sum())
    assert cols[col.sam_class_column(2)] == pytest.approx(p.areas[3] / p.areas[2:].sum())
    assert math.isnan(cols[col.sam_class_column(0)]) and math.isnan(cols[col.sam_class_column(3)])
    nothing = agreement_columns(p.take(np.array([], dtype=np.int64)), np.array([]), num_classes=2)
    assert nothing[col.SAM_COMPONENTS] == 0 and math.isnan(nothing[col.SAM_DISAGREEMENT_MEAN])
