"""The simulated region oracle and partial masks.

A *partial mask* is a class-id mask in which only labeled pixels hold a class; every other pixel is
the ignore index (which the losses skip: unlabeled pixels give no gradient). The simulated oracle
labels selected regions of an image from its ground truth, as an annotator following the
click protocol of ``strategies.CostModel`` would:

- a region whose dominant true class covers at least ``purity_threshold`` of its (non-ignored)
  pixels gets that class on all of them: one click (*dominant labeling*, some pixels may be wrong);
- a mixed region is drawn in full: its true pixels are revealed, at the cost of the click plus the
  polygons of its other classes.

Pixels that are the ignore index in the truth stay unlabeled. New labels merge into the image's
existing partial mask without overwriting a labeled pixel. Everything works at the truth's
resolution (region maps at the scoring resolution are enlarged with nearest neighbour), so the
partial mask has its image's size, as every mask must.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from strategies import AnnotationCost, CostModel, mask_annotation_cost, region_clicks
from strategies import region_columns as rcol

from ._regions import resize_regions

if TYPE_CHECKING:
    from ._data import ClassInfo

__all__ = [
    "RegionLabeling",
    "image_annotation_costs",
    "label_regions",
    "labeled_pixel_count",
    "labeled_pixels_per_sample",
    "merge_partial_masks",
    "write_mask",
]


@dataclass(frozen=True)
class RegionLabeling:
    """What the oracle did to one image.

    mask: int64 [H, W], the image's partial mask after labeling (the ignore index where unlabeled).
    rows: one row per labeled region, in the order asked: ``region_id``, ``region_pixels``,
        ``label_class``, ``purity``, ``mixed``, ``labeled_pixels`` (added by this labeling), ``clicks``,
        ``objects``, ``vertices`` (polygons drawn for mixed regions).
    cost: the sum over the rows (``images`` = 1, ``pixels`` = pixels added).
    """

    mask: np.ndarray
    rows: pd.DataFrame
    cost: AnnotationCost


def merge_partial_masks(old: np.ndarray, new: np.ndarray, ignore_index: int) -> np.ndarray:
    """int64 [H, W]: ``old``'s labels, and ``new``'s where ``old`` is unlabeled (a labeled pixel is
    never overwritten; relabeling is a separate path)."""
    old, new = np.asarray(old), np.asarray(new)
    if old.shape != new.shape:
        raise ValueError(f"partial masks of different sizes: {old.shape} and {new.shape}")
    return np.where(old != ignore_index, old, new).astype(np.int64)


def label_regions(
    truth: np.ndarray,
    regions: np.ndarray,
    region_ids: Sequence[int] | np.ndarray,
    *,
    ignore_index: int,
    cost: CostModel | None = None,
    partial: np.ndarray | None = None,
) -> RegionLabeling:
    """Label ``region_ids`` of one image from its ground truth (see the module docstring).

    truth: int [H, W] class ids with ``ignore_index``. regions: int [h, w] region map (any size; resized
    to [H, W] with nearest neighbour). partial: int [H, W], the image's existing partial mask, or None.
    Raises ValueError for a region asked twice or absent from the map.
    """
    cost = cost or CostModel()
    truth = np.asarray(truth).astype(np.int64)
    regions = resize_regions(np.asarray(regions), truth.shape[:2]).astype(np.int64)
    ids = np.asarray(region_ids, dtype=np.int64).reshape(-1)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"a region is asked twice: {ids.tolist()}")
    k_max = int(regions.max()) + 1
    region_pixels = np.bincount(regions.ravel(), minlength=k_max)
    absent = ids[(ids < 0) | (ids >= k_max)]
    if len(absent) == 0:
        absent = ids[region_pixels[ids] == 0]
    if len(absent):
        raise ValueError(f"region {int(absent[0])} is not in the region map (ids 0..{k_max - 1})")
    out = np.full(truth.shape, ignore_index, dtype=np.int64) if partial is None else np.asarray(partial).astype(np.int64)
    if out.shape != truth.shape:
        raise ValueError(f"partial mask {out.shape} and truth {truth.shape} differ in size")

    valid = truth != ignore_index
    c = int(truth[valid].max()) + 1 if valid.any() else 1
    counts = np.bincount(regions[valid] * c + truth[valid], minlength=k_max * c).reshape(k_max, c)[ids]
    n_valid = counts.sum(1)
    label = np.where(n_valid > 0, counts.argmax(1), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = np.where(n_valid > 0, counts.max(1) / np.maximum(n_valid, 1), np.nan)
    mixed = (n_valid > 0) & (purity < cost.purity_threshold)
    clicks, objects, vertices = region_clicks(truth, regions, ids, label, mixed, cost, ignore_index)

    # Per pixel: is its region asked, is it mixed, which class would a click give it.
    asked = np.zeros(k_max, dtype=bool)
    asked[ids] = True
    mixed_of = np.zeros(k_max, dtype=bool)
    mixed_of[ids] = mixed
    label_of = np.full(k_max, -1, dtype=np.int64)
    label_of[ids] = label
    todo = asked[regions] & valid & (out == ignore_index)
    new = np.where(mixed_of[regions], truth, label_of[regions])
    out[todo] = new[todo]
    added = np.bincount(regions[todo], minlength=k_max)[ids]

    rows = pd.DataFrame({
        rcol.REGION_ID: ids,
        rcol.REGION_PIXELS: region_pixels[ids].astype(np.int64),
        rcol.LABEL_CLASS: label.astype(np.int64),
        rcol.PURITY: purity,
        rcol.MIXED: mixed,
        rcol.LABELED_PIXELS: added.astype(np.int64),
        rcol.CLICKS: clicks,
        "objects": objects,
        "vertices": vertices,
    })
    total = AnnotationCost(clicks=float(clicks.sum()), pixels=int(added.sum()), images=1 if len(ids) else 0,
                           regions=len(ids), objects=int(objects.sum()), vertices=int(vertices.sum()))
    return RegionLabeling(mask=out, rows=rows, cost=total)


def labeled_pixel_count(mask: np.ndarray, ignore_index: int) -> int:
    """Pixels of ``mask`` that hold a class (not ``ignore_index``)."""
    return int((np.asarray(mask) != ignore_index).sum())


def labeled_pixels_per_sample(sample_ids: Sequence[str], mask_paths: Sequence[str], classes: ClassInfo) -> pd.DataFrame:
    """``[sample_id, labeled_pixels, total_pixels, labeled_frac]`` of (partial or full) masks, counted
    at the masks' own resolution."""
    from ._data import load_mask

    labeled, total = [], []
    for path in mask_paths:
        mask = load_mask(str(path), classes)
        labeled.append(labeled_pixel_count(mask, classes.ignore_index))
        total.append(mask.size)
    frame = pd.DataFrame({rcol.SAMPLE_ID: [str(s) for s in sample_ids], "labeled_pixels": labeled, "total_pixels": total})
    frame["labeled_frac"] = frame["labeled_pixels"] / frame["total_pixels"].where(frame["total_pixels"] > 0)
    return frame


def image_annotation_costs(sample_ids: Sequence[str], mask_paths: Sequence[str], classes: ClassInfo,
                           cost: CostModel | None = None) -> pd.DataFrame:
    """What drawing each whole image would cost (``strategies.mask_annotation_cost`` of its mask):
    ``[sample_id, clicks, pixels, objects, vertices]``, for image-level runs on the click axis."""
    from ._data import load_mask

    cost = cost or CostModel()
    rows = []
    for sid, path in zip(sample_ids, mask_paths):
        c = mask_annotation_cost(load_mask(str(path), classes), cost, classes.ignore_index)
        rows.append({rcol.SAMPLE_ID: str(sid), "clicks": c.clicks, "pixels": c.pixels, "objects": c.objects,
                     "vertices": c.vertices})
    return pd.DataFrame(rows, columns=[rcol.SAMPLE_ID, "clicks", "pixels", "objects", "vertices"])


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a class-id mask as a single-channel PNG (8-bit, 16-bit when ids exceed 255), atomically:
    a reader sees the old file or the new one, never half of one."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0 or mask.min() < 0 or mask.max() > 65535:
        raise ValueError(f"{path}: a mask must be [H, W] ids in 0..65535, got shape {mask.shape}")
    data: np.ndarray[Any, np.dtype[np.unsignedinteger[Any]]] = mask.astype(np.uint8 if mask.max() <= 255 else np.uint16)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=target.parent)
    os.close(fd)
    try:
        if not cv2.imwrite(tmp, data):
            raise OSError(f"cannot write {path}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
