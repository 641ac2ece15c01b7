"""Annotation cost in clicks, pixels and images, so image-level and region-level runs share an axis.

The protocol (after Cai et al., CVPR 2021, who measure cost in clicks):

- **A region** (a superpixel or SAM mask) shown to an annotator costs ``clicks_per_region`` (one
  click assigns its dominant class). When its dominant class covers less than ``purity_threshold``
  of its (non-ignored) pixels the region is *mixed*: after the click that fills it with the dominant
  class, the annotator draws every connected component of every other class inside it as a polygon.
- **A whole image** is drawn as polygons: every connected component (8-connected) of every class
  in the mask, background included, is one polygon (layered drawing, as in Cityscapes: a component
  inside another's hole is a polygon of its own, holes need no polygon).
- **A polygon** costs ``clicks_per_vertex`` per vertex plus ``clicks_per_object``; its vertices are
  those of the component's outer contour simplified by ``cv2.approxPolyDP`` with tolerance
  ``polygon_tolerance_px``, at least 3.

Pure numpy and OpenCV (imported when a polygon is first counted); no torch, Ray or I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["AnnotationCost", "CostModel", "mask_annotation_cost", "polygon_vertices", "region_clicks"]


@dataclass(frozen=True)
class CostModel:
    """How many clicks a labeling action costs (see the module docstring)."""

    clicks_per_region: float = 1.0
    """One region labeled with its dominant class."""
    clicks_per_vertex: float = 1.0
    """One polygon vertex."""
    clicks_per_object: float = 0.0
    """Extra clicks per polygon (e.g. choosing its class from a list)."""
    polygon_tolerance_px: float = 1.0
    """``approxPolyDP`` epsilon: the largest distance, in pixels, of a contour from its polygon."""
    purity_threshold: float = 0.9
    """A region whose dominant class covers less than this share of its pixels is drawn in full;
    0 = dominant labeling only (every region costs one click)."""

    def __post_init__(self) -> None:
        checks = {
            "clicks_per_region": self.clicks_per_region > 0,
            "clicks_per_vertex": self.clicks_per_vertex >= 0,
            "clicks_per_object": self.clicks_per_object >= 0,
            "polygon_tolerance_px": self.polygon_tolerance_px >= 0,
            "purity_threshold": 0.0 <= self.purity_threshold <= 1.0,
        }
        for key, ok in checks.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or not ok:
                bound = {"clicks_per_region": "> 0", "purity_threshold": "in [0, 1]"}.get(key, ">= 0")
                raise ValueError(f"cost model: {key} must be a finite number {bound}, got {value!r}")

    def polygon_clicks(self, objects: int | np.ndarray, vertices: int | np.ndarray) -> Any:
        """Clicks for ``objects`` polygons with ``vertices`` vertices in all."""
        return self.clicks_per_vertex * vertices + self.clicks_per_object * objects


@dataclass(frozen=True)
class AnnotationCost:
    """What some labeling cost; costs add up (``a + b``), so rounds and runs sum them."""

    clicks: float = 0.0
    pixels: int = 0
    """Pixels that received a label (not the ignore index)."""
    images: int = 0
    """Images touched: fully drawn, or with at least one region labeled."""
    regions: int = 0
    """Regions labeled (0 for whole images)."""
    objects: int = 0
    """Polygons drawn."""
    vertices: int = 0
    """Polygon vertices placed."""

    def __add__(self, other: AnnotationCost) -> AnnotationCost:
        return AnnotationCost(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def polygon_vertices(binary: np.ndarray, tolerance_px: float = 1.0) -> np.ndarray:
    """int64 [P]: the vertex count of the polygon of every 8-connected component of ``binary``.

    ``binary``: bool [H, W]. A component's polygon is its outer contour simplified by
    ``cv2.approxPolyDP(contour, tolerance_px, closed=True)``, at least 3 vertices; holes need no
    polygon, but a component lying in another's hole has its own (``RETR_CCOMP`` top level).
    """
    import cv2

    mask = np.ascontiguousarray(binary, dtype=np.uint8)
    if not mask.any():
        return np.zeros(0, dtype=np.int64)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    counts = [
        max(3, len(cv2.approxPolyDP(c, float(tolerance_px), True)))
        for c, h in zip(contours, hierarchy[0])
        if h[3] < 0  # no parent: the outer boundary of a component, not a hole
    ]
    return np.asarray(counts, dtype=np.int64)


def _class_polygons(class_map: np.ndarray, classes: np.ndarray, tolerance_px: float) -> tuple[int, int]:
    """(polygons, vertices) of every component of every class in ``classes`` within ``class_map``."""
    objects = vertices = 0
    for c in classes:
        counts = polygon_vertices(class_map == c, tolerance_px)
        objects += len(counts)
        vertices += int(counts.sum())
    return objects, vertices


def mask_annotation_cost(mask: np.ndarray, cost: CostModel, ignore_index: int) -> AnnotationCost:
    """The cost of drawing a whole image's class-id ``mask`` (int [H, W]) as polygons.

    Every connected component of every class present (the ignore index excepted) is one polygon;
    ``pixels`` counts the non-ignored pixels, ``images`` is 1.
    """
    mask = np.asarray(mask)
    present = np.unique(mask)
    present = present[present != ignore_index]
    objects, vertices = _class_polygons(mask, present, cost.polygon_tolerance_px)
    return AnnotationCost(
        clicks=float(cost.polygon_clicks(objects, vertices)), pixels=int((mask != ignore_index).sum()), images=1,
        objects=objects, vertices=vertices,
    )


def region_clicks(
    class_map: np.ndarray,
    regions: np.ndarray,
    region_ids: np.ndarray,
    dominant: np.ndarray,
    mixed: np.ndarray,
    cost: CostModel,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clicks to label regions of one image: float64 [K] clicks, int64 [K] polygons, int64 [K] vertices.

    ``class_map``: int [H, W], the truth (what the annotator sees) or a model's prediction (for an
    estimate); ``regions``: int [H, W] region map; ``region_ids``, ``dominant`` (the class the click
    assigns), ``mixed`` (bool): [K] arrays. A region costs ``clicks_per_region``; a mixed one also
    the polygons of every component of every class other than ``dominant`` inside it (pixels of
    ``ignore_index`` are never drawn).
    """
    region_ids = np.asarray(region_ids, dtype=np.int64)
    k = len(region_ids)
    clicks = np.full(k, float(cost.clicks_per_region))
    objects = np.zeros(k, dtype=np.int64)
    vertices = np.zeros(k, dtype=np.int64)
    todo = np.flatnonzero(np.asarray(mixed, dtype=bool))
    if len(todo) == 0:
        return clicks, objects, vertices
    if class_map.shape != regions.shape:
        raise ValueError(f"class map {class_map.shape} and region map {regions.shape} differ in size")
    flat = regions.ravel()
    order = np.argsort(flat, kind="stable")
    ids_sorted = flat[order]
    width = regions.shape[1]
    for i in todo:
        rid = region_ids[i]
        lo, hi = np.searchsorted(ids_sorted, [rid, rid + 1])
        if lo == hi:
            raise ValueError(f"region {int(rid)} is not in the region map")
        pix = order[lo:hi]
        ys, xs = pix // width, pix % width
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        # The region's pixels only: everything else in its box is "no class" (-1).
        crop = np.full((y1 - y0, x1 - x0), -1, dtype=np.int64)
        crop[ys - y0, xs - x0] = class_map.ravel()[pix]
        others = np.unique(crop)
        others = others[(others >= 0) & (others != dominant[i])]
        if ignore_index is not None:
            others = others[others != ignore_index]
        n_obj, n_vert = _class_polygons(crop, others, cost.polygon_tolerance_px)
        objects[i], vertices[i] = n_obj, n_vert
        clicks[i] += float(cost.polygon_clicks(n_obj, n_vert))
    return clicks, objects, vertices
