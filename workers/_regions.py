"""Region proposals: every image of the pool cut into regions an annotator labels with one click.

A region map is int32 ``[H, W]`` at the scoring resolution (``data.image_size``): every pixel holds
the id of the one region it belongs to, ids ``0..K-1`` numbered in raster order of each region's
first pixel. Three methods (:class:`RegionSpec`):

- ``slic``: SLIC superpixels (scikit-image's ``slic``, on the image resized to the scoring
  resolution; OpenCV's ximgproc is not in ``opencv-python-headless``);
- ``sam``: SAM's automatic mask generator (``segment_anything.SamAutomaticMaskGenerator``) on the
  image at its own size, its image embedding taken from (or added to) the SAM embedding cache. SAM's
  masks overlap and leave holes; they are painted largest first (a pixel goes to the smallest mask
  covering it) and uncovered pixels form regions of their own, one per connected piece;
- ``grid``: square cells (the "rectangles" baseline of region-based active learning).

Every map is then tidied: each region is split into its 4-connected pieces and pieces smaller than
``min_region_px`` are given to the nearest larger region, so regions are contiguous and not
specks.

Maps are computed once per image and cached like SAM embeddings (:class:`RegionCache`), keyed by the
sha256 of the image file's bytes and by the method and its parameters.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ._data import load_image
from ._sam_cache import NpzShards, file_digest

if TYPE_CHECKING:
    from ._sam import SamEngine, SamSpec
    from ._sam_cache import SamEmbedding

__all__ = [
    "REGION_METHODS",
    "RegionCache",
    "RegionProposer",
    "RegionSpec",
    "grid_regions",
    "masks_to_regions",
    "propose_regions",
    "relabel",
    "resize_regions",
    "sam_masks",
    "slic_regions",
    "tidy_regions",
]

log = logging.getLogger(__name__)

REGION_METHODS = ("slic", "sam", "grid")
CACHE_FORMAT = 1
"""Stored in every cache file; bump when what an entry means changes, so old entries read as misses."""

_METHOD_FIELDS = {
    "slic": ("n_segments", "compactness", "sigma"),
    "grid": ("cell_px",),
    "sam": ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"),
}


@dataclass(frozen=True)
class RegionSpec:
    """How an image is cut into regions; the fields of the chosen method and the common ones form
    the cache key (changing another method's field does not invalidate a cache)."""

    image_size: tuple[int, int]
    """(height, width) of the region maps: the scoring resolution (``data.image_size``)."""
    method: str = "slic"
    """``slic``, ``sam`` or ``grid``."""
    min_region_px: int = 16
    """Pieces smaller than this (pixels at ``image_size``) join the nearest larger region."""
    # slic
    n_segments: int = 300
    """SLIC: the approximate number of superpixels."""
    compactness: float = 10.0
    """SLIC: colour against space; higher = squarer superpixels."""
    sigma: float = 0.0
    """SLIC: Gaussian smoothing (pixels) before clustering; 0 (scikit-image's default) keeps sharp
    edges where they are (1 moves a boundary by a pixel)."""
    # grid
    cell_px: int = 32
    """grid: the side of a cell, in pixels."""
    # sam (SamAutomaticMaskGenerator's parameters; its defaults suit ViT-H)
    points_per_side: int = 16
    """sam: a points_per_side x points_per_side grid of point prompts."""
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7

    def __post_init__(self) -> None:
        if self.method not in REGION_METHODS:
            raise ValueError(f"regions.method: unknown method {self.method!r}; valid: {', '.join(REGION_METHODS)}")
        size = tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
            raise ValueError(f"regions.image_size: expected (height, width) in pixels, got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        positive = {"min_region_px": self.min_region_px >= 1, "n_segments": self.n_segments >= 1,
                    "compactness": self.compactness > 0, "sigma": self.sigma >= 0, "cell_px": self.cell_px >= 1,
                    "points_per_side": self.points_per_side >= 1, "points_per_batch": self.points_per_batch >= 1,
                    "box_nms_thresh": 0 < self.box_nms_thresh <= 1}
        bad = [k for k, ok in positive.items() if not ok]
        if bad:
            raise ValueError(f"regions.{bad[0]} out of range: {getattr(self, bad[0])!r}")

    def params(self) -> dict[str, Any]:
        """What the maps depend on: the method, the common fields and the method's own."""
        names = ("method", "image_size", "min_region_px", *_METHOD_FIELDS[self.method])
        values = asdict(self)
        return {n: list(values[n]) if n == "image_size" else values[n] for n in names}

    def key(self, sam_checkpoint_id: str | None = None) -> str:
        """The cache directory name: ``<method>-<sha256 of the params, 16 hex>`` (SAM: and its weights)."""
        params = self.params()
        if self.method == "sam":
            if not sam_checkpoint_id:
                raise ValueError("regions.method 'sam' needs the SAM checkpoint id (workers.sam_checkpoint_id)")
            params["sam_checkpoint_id"] = sam_checkpoint_id
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.method}-{digest}"


# -- region maps -----------------------------------------------------------------------------------------


def relabel(labels: np.ndarray) -> np.ndarray:
    """int32 [H, W]: ``labels`` renumbered 0..K-1 in raster order of each label's first pixel."""
    flat = np.asarray(labels).ravel()
    values, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(len(values), dtype=np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(len(values), dtype=np.int32)
    return rank[inverse].reshape(np.shape(labels))


def tidy_regions(labels: np.ndarray, min_region_px: int) -> np.ndarray:
    """int32 [H, W] regions from any int labels [H, W]: each label split into its 4-connected
    pieces, pieces below ``min_region_px`` pixels given (pixel by pixel) to the nearest larger
    piece, then renumbered by :func:`relabel`. When no piece is that large the pieces are kept."""
    from skimage.measure import label as connected

    labels = np.asarray(labels)
    # background=-1 lies below every value: every pixel is labeled, pieces of equal value joined.
    pieces = connected(labels.astype(np.int64) - int(labels.min()), background=-1, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    small = sizes[pieces] < min_region_px
    if small.any() and not small.all():
        # distanceTransformWithLabels gives every pixel the label of its nearest zero pixel; the
        # zero pixels are those of large pieces, each with a label of its own.
        _, nearest = cv2.distanceTransformWithLabels(
            small.astype(np.uint8), cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
        owner = np.zeros(int(nearest.max()) + 1, dtype=pieces.dtype)
        owner[nearest[~small]] = pieces[~small]
        pieces = np.where(small, owner[nearest], pieces)
    return relabel(pieces)


def grid_regions(hw: tuple[int, int], cell_px: int) -> np.ndarray:
    """int32 [H, W]: square cells of ``cell_px`` pixels (the last row and column of cells may be smaller)."""
    h, w = hw
    cols = -(-w // cell_px)
    return ((np.arange(h)[:, None] // cell_px) * cols + np.arange(w)[None, :] // cell_px).astype(np.int32)


def slic_regions(image: np.ndarray, n_segments: int, compactness: float, sigma: float) -> np.ndarray:
    """int labels [H, W]: SLIC superpixels of a uint8 RGB image [H, W, 3] (scikit-image, in Lab)."""
    try:
        from skimage.segmentation import slic
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("regions.method 'slic' needs scikit-image: pip install scikit-image") from exc
    return np.asarray(slic(image, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0,
                           channel_axis=-1, enforce_connectivity=True))


def masks_to_regions(masks: np.ndarray, min_region_px: int) -> np.ndarray:
    """int32 [H, W] regions from overlapping binary masks ``bool [K, H, W]`` (e.g. SAM's).

    Masks are painted largest first, so a pixel belongs to the smallest mask covering it; pixels no
    mask covers become regions of their own, one per 4-connected piece; then :func:`tidy_regions`.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be bool [K, H, W], got shape {masks.shape}")
    labels = np.full(masks.shape[1:], -1, dtype=np.int64)  # -1: no mask; one label, split by tidy_regions
    areas = masks.sum((1, 2))
    for k in np.argsort(-areas, kind="stable"):
        labels[masks[k]] = k
    return tidy_regions(labels, min_region_px)


def resize_regions(regions: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """int32 [*hw]: a region map resized with nearest neighbour (ids kept; none lost when enlarging).

    Shrinking can drop regions smaller than the new pixels; renumber with :func:`relabel` if ids
    must stay contiguous."""
    regions = np.asarray(regions)
    if tuple(regions.shape) == tuple(hw):
        return regions.astype(np.int32, copy=False)
    # cv2.resize has no int32/int64 nearest path for all builds: float32 holds ids < 2**24 exactly.
    if regions.max(initial=0) >= 2**24:
        raise ValueError(f"region ids up to {int(regions.max())} cannot be resized exactly")
    out = cv2.resize(regions.astype(np.float32), (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_NEAREST)
    return out.astype(np.int32)


def propose_regions(image: np.ndarray, spec: RegionSpec) -> np.ndarray:
    """int32 [*spec.image_size] regions of a uint8 RGB image (any size) by ``slic`` or ``grid``.

    ``sam`` needs a model: use :class:`RegionProposer`."""
    if spec.method == "sam":
        raise ValueError("regions.method 'sam' needs a SAM model: use workers.RegionProposer with a SamSpec")
    h, w = spec.image_size
    if spec.method == "grid":
        return tidy_regions(grid_regions((h, w), spec.cell_px), spec.min_region_px)
    if tuple(image.shape[:2]) != (h, w):
        shrink = image.shape[0] > h and image.shape[1] > w
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return tidy_regions(slic_regions(image, spec.n_segments, spec.compactness, spec.sigma), spec.min_region_px)


def _embedding_predictor(model: Any) -> Any:
    """A ``SamPredictor`` whose ``set_image`` installs a cached embedding (``predictor.entry``) instead of
    running the image encoder: the automatic mask generator (one crop layer) calls it once per image."""
    import torch
    from segment_anything import SamPredictor

    class EmbeddingPredictor(SamPredictor):  # type: ignore[misc]
        entry: SamEmbedding | None = None

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            entry = self.entry
            assert entry is not None and tuple(image.shape[:2]) == tuple(entry.original_hw), "embedding of another image"
            self.reset_image()
            self.original_size = tuple(entry.original_hw)
            self.input_size = tuple(entry.input_hw)
            self.features = torch.as_tensor(entry.features, device=self.device).float()[None]
            self.is_image_set = True

    return EmbeddingPredictor(model)


def sam_masks(engine: SamEngine, generator: Any, path: str, image: np.ndarray) -> np.ndarray:
    """bool [K, H, W]: SAM's automatic masks of the image at ``path`` (``image``, uint8 RGB at its
    own size), its embedding from ``engine``'s cache (computed and stored on a miss)."""
    entry = engine.embeddings([path])[0][0]
    generator.predictor.entry = entry
    try:
        records = generator.generate(image)
    finally:
        generator.predictor.entry = None
    if not records:
        return np.zeros((0, *image.shape[:2]), dtype=bool)
    return np.stack([np.asarray(r["segmentation"], dtype=bool) for r in records])


# -- the cache ---------------------------------------------------------------------------------------------


class RegionCache(NpzShards):
    """Region maps of one :class:`RegionSpec` under ``root`` (a local path or a pyarrow filesystem URI):

        <root>/<spec key>/<sha[:2]>/<sha>.npz      (compressed; ``sha`` = sha256 of the image file)
        <root>/<spec key>/spec.json                (the parameters, for people)

    ``get`` returns None for a missing, unreadable or outdated entry (a miss); ``put`` writes a
    temporary file and renames it, so concurrent actors and later rounds never read half a file.
    ``hits`` and ``misses`` count ``get`` calls.
    """

    def __init__(self, root: str | os.PathLike[str], spec: RegionSpec, sam_checkpoint_id: str | None = None) -> None:
        super().__init__(root, spec.key(sam_checkpoint_id), "region", CACHE_FORMAT)
        self.spec = spec
        self.key = spec.key(sam_checkpoint_id)
        self._params = {**spec.params(), **({"sam_checkpoint_id": sam_checkpoint_id} if spec.method == "sam" else {})}
        self._described = False

    def get(self, digest: str) -> np.ndarray | None:
        """int32 [*spec.image_size], or None."""

        def check(arrays: dict[str, np.ndarray]) -> np.ndarray:
            regions = arrays["regions"].astype(np.int32)
            if tuple(regions.shape) != self.spec.image_size:
                raise ValueError(f"shape {regions.shape}, expected {self.spec.image_size}")
            return regions

        found: np.ndarray | None = self.read(digest, check)
        return found

    def put(self, digest: str, regions: np.ndarray) -> None:
        regions = np.asarray(regions)
        if tuple(regions.shape) != self.spec.image_size:
            raise ValueError(f"region map of shape {regions.shape} for a cache of {self.spec.image_size} maps")
        # The smallest unsigned type that holds the ids: most maps have < 65536 regions.
        stored = regions.astype(np.uint16) if regions.max(initial=0) < 2**16 else regions.astype(np.int32)
        buf = io.BytesIO()
        np.savez_compressed(buf, format=np.int64(CACHE_FORMAT), regions=stored)
        self.write(self.path(digest), buf.getvalue())
        if not self._described:
            self.write(f"{self.dir}/spec.json", json.dumps(self._params, indent=2, sort_keys=True).encode())
            self._described = True


# -- the proposer ------------------------------------------------------------------------------------------


class RegionProposer:
    """Region maps of images through the cache; a Ray Data callable class as well.

    ``regions(path)`` returns an image's map (from the cache, or computed and stored); called on a
    batch ``{sample_id, image_path}`` it returns ``{sample_id, num_regions, regions_cached}`` (the
    maps stay in the cache, where scorers read them). ``computed`` counts maps computed here.
    ``sam`` (with ``sam_checkpoint_id``) is required for ``method: sam``.
    """

    def __init__(self, spec: RegionSpec, cache_uri: str, sam: SamSpec | None = None,
                 sam_checkpoint_id: str | None = None, device: str = "cpu") -> None:
        self.spec = spec
        self.engine: SamEngine | None = None
        self.generator: Any = None
        if spec.method == "sam":
            if sam is None or not sam_checkpoint_id:
                raise ValueError("regions.method 'sam' needs the sam section (sam.checkpoint) and its checkpoint id")
            from segment_anything import SamAutomaticMaskGenerator

            from ._sam import SamEngine

            self.engine = SamEngine(sam, sam_checkpoint_id, device)
            self.generator = SamAutomaticMaskGenerator(
                self.engine.sam, points_per_side=spec.points_per_side, points_per_batch=spec.points_per_batch,
                pred_iou_thresh=spec.pred_iou_thresh, stability_score_thresh=spec.stability_score_thresh,
                box_nms_thresh=spec.box_nms_thresh, crop_n_layers=0, output_mode="binary_mask",
            )
            self.generator.predictor = _embedding_predictor(self.engine.sam)
        self.cache = RegionCache(cache_uri, spec, sam_checkpoint_id if spec.method == "sam" else None)
        self.computed = 0

    def compute(self, path: str) -> np.ndarray:
        """The image's region map, computed (no cache)."""
        self.computed += 1
        if self.spec.method == "grid":  # the pixels do not matter
            return propose_regions(np.zeros((*self.spec.image_size, 3), np.uint8), self.spec)
        if self.spec.method == "slic":
            return propose_regions(load_image(path, size=self.spec.image_size), self.spec)
        assert self.engine is not None
        image = load_image(path)
        h, w = self.spec.image_size
        masks = sam_masks(self.engine, self.generator, path, image)
        if tuple(image.shape[:2]) != (h, w):  # partition at the output resolution
            masks = np.stack([cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
                              for m in masks]) if len(masks) else np.zeros((0, h, w), dtype=bool)
        return masks_to_regions(masks, self.spec.min_region_px)

    def regions(self, path: str) -> tuple[np.ndarray, bool]:
        """(int32 [*spec.image_size] region map, whether it came from the cache)."""
        digest = file_digest(path)
        found = self.cache.get(digest)
        if found is not None:
            return found, True
        regions = self.compute(path)
        self.cache.put(digest, regions)
        return regions, False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts, cached = [], []
        for path in batch["image_path"]:
            regions, hit = self.regions(str(path))
            counts.append(int(regions.max()) + 1)
            cached.append(hit)
        return {"sample_id": np.asarray(batch["sample_id"]), "num_regions": np.asarray(counts, dtype=np.int64),
                "regions_cached": np.asarray(cached, dtype=bool)}
