"""SAM prompts from rough class-id masks, and the agreement between a mask and SAM's answer.

A *component* is a connected region (8-connectivity) of one class in a class-id mask. Every
component of at least ``min_area_px`` pixels gets one prompt: its bounding box, ``positive_points``
points deep inside it (maxima of the distance transform of the component eroded by ``erosion_px``,
each next one taken after blanking a disk around the previous one) and ``negative_points`` points
inside the box but outside the component (those farthest from it). Prompts of one image share one
point count ``P``; a missing point is padded with label -1, which SAM's prompt encoder reads as "no
point", so all prompts of an image go through the mask decoder in one batch.

Coordinates are ``(x, y)`` pixel indices of the mask (SAM's convention: it adds 0.5 itself).
Pure numpy and OpenCV: no torch, so tests and the driver stay light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["ImagePrompts", "PromptSpec", "agreement_columns", "component_iou", "jitter_prompts", "prompts_from_mask"]


@dataclass(frozen=True)
class PromptSpec:
    """How prompts are drawn from a mask (the ``sam.prompts`` config section)."""

    min_area_px: int = 16
    """Components smaller than this many pixels (at the mask's resolution) get no prompt."""
    positive_points: int = 1
    """Points inside each component (0 = the box alone)."""
    negative_points: int = 0
    """Points inside the component's box but outside the component, farthest from it first."""
    erosion_px: int = 2
    """Positive points come from the component eroded by this radius, away from its uncertain rim
    (the uneroded component when erosion leaves nothing)."""
    skip_classes: tuple[int, ...] = ()
    """Class ids never prompted (e.g. a background class, which SAM has no notion of)."""

    def __post_init__(self) -> None:
        if isinstance(self.skip_classes, list):
            object.__setattr__(self, "skip_classes", tuple(self.skip_classes))
        for name in ("min_area_px", "positive_points", "negative_points", "erosion_px"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "min_area_px" else 0):
                raise ValueError(f"prompts: '{name}' must be an integer >= {1 if name == 'min_area_px' else 0}, got {value!r}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.skip_classes):
            raise ValueError(f"prompts: 'skip_classes' must be class ids >= 0, got {list(self.skip_classes)!r}")

    @property
    def num_points(self) -> int:
        return self.positive_points + self.negative_points


@dataclass(frozen=True)
class ImagePrompts:
    """The prompts of one image, one row per prompted component (``K`` of them, ``P`` points each).

    components: int32 [H, W], 0 where no prompted component lies, else 1 + the component's row.
    class_ids: int64 [K]; areas: int64 [K] pixels.
    boxes: float32 [K, 4] ``(x0, y0, x1, y1)``, the component's extreme pixel indices (inclusive).
    points: float32 [K, P, 2] ``(x, y)``; labels: int32 [K, P], 1 inside, 0 outside, -1 padding.
    """

    components: np.ndarray
    class_ids: np.ndarray
    areas: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.class_ids)

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.components.shape[0]), int(self.components.shape[1])

    def mask(self, k: int) -> np.ndarray:
        """bool [H, W]: the pixels of component ``k``."""
        return np.asarray(self.components == k + 1)

    def take(self, rows: np.ndarray) -> ImagePrompts:
        """The prompts in ``rows`` (int indices), their components renumbered to match."""
        rows = np.asarray(rows, dtype=np.int64)
        remap = np.zeros(len(self) + 1, dtype=np.int32)
        remap[rows + 1] = np.arange(1, len(rows) + 1, dtype=np.int32)
        return ImagePrompts(remap[self.components], self.class_ids[rows], self.areas[rows], self.boxes[rows],
                            self.points[rows], self.labels[rows])


def _empty_prompts(hw: tuple[int, int], num_points: int) -> ImagePrompts:
    return ImagePrompts(
        components=np.zeros(hw, dtype=np.int32), class_ids=np.zeros(0, np.int64), areas=np.zeros(0, np.int64),
        boxes=np.zeros((0, 4), np.float32), points=np.zeros((0, num_points, 2), np.float32),
        labels=np.zeros((0, num_points), np.int32),
    )


def _peaks(score: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` ``(x, y)`` maxima of ``score`` (float32 [h, w], > 0 where allowed), each next
    one after blanking a disk of the current maximum's value (at least 1 px) around the last."""
    score = score.copy()
    out: list[tuple[int, int]] = []
    for _ in range(count):
        idx = int(np.argmax(score))
        y, x = divmod(idx, score.shape[1])
        value = float(score[y, x])
        if value <= 0:
            break
        out.append((x, y))
        cv2.circle(score, (x, y), max(1, math.ceil(value)), 0.0, thickness=-1)
    return out


def prompts_from_mask(mask: np.ndarray, spec: PromptSpec, ignore_index: int | None = None) -> ImagePrompts:
    """One prompt per connected component of each class in ``mask`` (int [H, W] class ids).

    Pixels equal to ``ignore_index`` and classes in ``spec.skip_classes`` are never prompted;
    components below ``spec.min_area_px`` are skipped. Rows are ordered by class id, then by the
    component's first pixel in raster order.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"prompts_from_mask: expected a [H, W] class-id mask, got shape {mask.shape}")
    hw = (int(mask.shape[0]), int(mask.shape[1]))
    num_points = spec.num_points
    skip = set(spec.skip_classes)
    if ignore_index is not None:
        skip.add(int(ignore_index))
    components = np.zeros(hw, dtype=np.int32)
    class_ids: list[int] = []
    areas: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    points: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for class_id in np.unique(mask):
        if int(class_id) in skip:
            continue
        count, cc, stats, _ = cv2.connectedComponentsWithStats((mask == class_id).astype(np.uint8), connectivity=8)
        for j in range(1, count):
            x0, y0, w, h, area = (int(v) for v in stats[j])
            if area < spec.min_area_px:
                continue
            comp = cc[y0:y0 + h, x0:x0 + w] == j
            components[y0:y0 + h, x0:x0 + w][comp] = len(class_ids) + 1
            pts = _positive_points(comp, spec) + _negative_points(comp, spec.negative_points)
            coords = np.zeros((num_points, 2), np.float32)
            lab = np.full(num_points, -1, np.int32)
            for i, (x, y, label) in enumerate(pts):
                coords[i] = (x + x0, y + y0)
                lab[i] = label
            class_ids.append(int(class_id))
            areas.append(area)
            boxes.append((x0, y0, x0 + w - 1, y0 + h - 1))
            points.append(coords)
            labels.append(lab)
    if not class_ids:
        return _empty_prompts(hw, num_points)
    return ImagePrompts(
        components=components,
        class_ids=np.asarray(class_ids, np.int64),
        areas=np.asarray(areas, np.int64),
        boxes=np.asarray(boxes, np.float32),
        points=np.stack(points).astype(np.float32),
        labels=np.stack(labels).astype(np.int32),
    )


def _positive_points(comp: np.ndarray, spec: PromptSpec) -> list[tuple[int, int, int]]:
    if spec.positive_points == 0:
        return []
    # One pixel of background around the crop, so the distance transform sees the crop's edges.
    padded = np.pad(comp, 1).astype(np.uint8)
    inner = padded
    if spec.erosion_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * spec.erosion_px + 1,) * 2)
        eroded = np.asarray(cv2.erode(padded, kernel), dtype=np.uint8)
        if eroded.any():
            inner = eroded
    dist = cv2.distanceTransform(inner, cv2.DIST_L2, 5)
    return [(x - 1, y - 1, 1) for x, y in _peaks(dist, spec.positive_points)]


def _negative_points(comp: np.ndarray, count: int) -> list[tuple[int, int, int]]:
    if count == 0 or comp.all():
        return []
    # Distance of every box pixel to the component (zeros), so the points lie far from it.
    dist = cv2.distanceTransform((~comp).astype(np.uint8), cv2.DIST_L2, 5)
    return [(x, y, 0) for x, y in _peaks(dist, count)]


def jitter_prompts(prompts: ImagePrompts, rng: np.random.Generator, box_jitter: float) -> ImagePrompts:
    """Perturbed copies of ``prompts`` for training: each box side moves by a normal draw with a
    standard deviation of ``box_jitter`` times the box's size (clipped to the image), and every real
    point is redrawn uniformly from its region (positive: the component, negative: the box outside
    it), so the decoder does not learn one point placement."""
    if len(prompts) == 0:
        return prompts
    h, w = prompts.hw
    boxes = prompts.boxes.astype(np.float64)
    size = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1] * 2, axis=1)
    boxes = boxes + rng.normal(size=boxes.shape) * box_jitter * size
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w - 1)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h - 1)
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)
    points = prompts.points.copy()
    for k in range(len(prompts)):
        comp = prompts.mask(k)
        x0, y0, x1, y1 = (int(v) for v in prompts.boxes[k])
        inside_box = np.zeros_like(comp)
        inside_box[y0:y1 + 1, x0:x1 + 1] = True
        for label, region in ((1, comp), (0, inside_box & ~comp)):
            slots = np.flatnonzero(prompts.labels[k] == label)
            ys, xs = np.nonzero(region)
            if len(slots) and len(ys):
                pick = rng.integers(0, len(ys), size=len(slots))
                points[k, slots] = np.stack([xs[pick], ys[pick]], axis=1)
    return ImagePrompts(prompts.components, prompts.class_ids, prompts.areas, boxes.astype(np.float32), points,
                        prompts.labels)


def component_iou(prompts: ImagePrompts, masks: np.ndarray) -> np.ndarray:
    """float64 [K]: IoU of every prompted component with ``masks[k]`` (bool [K, H, W], same frame)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != (len(prompts), *prompts.hw):
        raise ValueError(f"component_iou: masks of shape {masks.shape} for {len(prompts)} prompts on {prompts.hw}")
    out = np.empty(len(prompts))
    for k in range(len(prompts)):
        comp = prompts.components == k + 1
        union = np.count_nonzero(comp | masks[k])
        out[k] = np.count_nonzero(comp & masks[k]) / union if union else 1.0
    return out


def agreement_columns(prompts: ImagePrompts, iou: np.ndarray, num_classes: int) -> dict[str, float]:
    """One image's SAM columns (names in ``strategies.columns``) from the per-component ``iou``.

    Disagreement = 1 - IoU; the image's ``mean`` weighs components by area, ``max`` is the worst;
    per class, the area-weighted mean over that class's components. NaN where nothing was prompted.
    """
    from strategies import columns as col

    nan = float("nan")
    disagreement = 1.0 - np.asarray(iou, dtype=np.float64)
    areas = prompts.areas.astype(np.float64)
    out = {
        col.SAM_COMPONENTS: float(len(prompts)),
        col.SAM_DISAGREEMENT_MEAN: float(np.average(disagreement, weights=areas)) if len(prompts) else nan,
        col.SAM_DISAGREEMENT_MAX: float(disagreement.max()) if len(prompts) else nan,
    }
    for c in range(num_classes):
        rows = prompts.class_ids == c
        out[col.sam_class_column(c)] = float(np.average(disagreement[rows], weights=areas[rows])) if rows.any() else nan
    return out
