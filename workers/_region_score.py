"""Region scoring: per-region uncertainty, predicted classes and estimated cost from a model's softmax.

:func:`region_rows` is a pure function (numpy, OpenCV for the cost estimate) of one image's softmax
probabilities and its region map; :class:`RegionScorer` is the Ray Data callable class around it: a
batch of images in, one row per region out (``map_batches`` may return more rows than it got), with
the region maps read from (or added to) the region cache. Column names: ``strategies.region_columns``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from strategies import CostModel, region_clicks
from strategies import region_columns as rcol

from ._regions import RegionProposer, RegionSpec
from ._warm import map_warm

if TYPE_CHECKING:
    import torch

    from ._sam import SamSpec

__all__ = ["REGION_SCORED_COLUMNS", "RegionScoreResult", "RegionScorer", "region_rows", "score_regions"]

log = logging.getLogger(__name__)

REGION_SCORED_COLUMNS = frozenset({
    rcol.REGION_ID, rcol.REGION_PIXELS, rcol.ENTROPY_MEAN, rcol.MARGIN_MEAN, rcol.DOMINANT_CLASS,
    rcol.DOMINANT_FRACTION, rcol.CLASS_BALANCED, rcol.COST_CLICKS, rcol.LABELED_FRACTION,
})
"""The fixed-name columns :class:`RegionScorer` writes per region (plus ``sample_id``, ``pred_frac_<c>``
and ``regions_cached``): what the loop checks a region strategy's requirements against."""


def region_rows(
    probs: np.ndarray | torch.Tensor,
    regions: np.ndarray,
    *,
    class_weights: Any = None,
    cost: CostModel | None = None,
    labeled: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One row per region of one image, as columns of length K (the regions present in ``regions``).

    probs: float [C, H, W], softmax over C. regions: int [H, W] region ids (>= 0).
    class_weights: float [C] (``workers._score.class_pixel_weights`` of the labeled class shares) for
        ``entropy_class_balanced``; None = all 1 (then it equals ``entropy_mean``).
    cost: the cost model for ``cost_clicks`` (default ``CostModel()``): a region whose predicted
        dominant class covers less than ``purity_threshold`` is expected to be drawn in full, its
        cost estimated from the polygons of the other predicted classes inside it.
    labeled: bool [H, W], pixels already labeled in the image's partial mask; adds ``labeled_frac``.

    Returns ``region_id``, ``region_pixels`` (int64), ``entropy_mean`` (nats), ``margin_mean``,
    ``pred_dominant_class`` (int64), ``pred_dominant_frac``, ``pred_frac_<c>`` for every class,
    ``entropy_class_balanced``, ``cost_clicks`` and, with ``labeled``, ``labeled_frac`` (float64).
    """
    p = probs.detach().cpu().double().numpy() if hasattr(probs, "detach") else np.asarray(probs, dtype=np.float64)
    regions = np.asarray(regions)
    if p.ndim != 3 or p.shape[1:] != regions.shape:
        raise ValueError(f"probs [C, H, W] {p.shape} and regions [H, W] {regions.shape} do not match")
    c = p.shape[0]
    if regions.size == 0 or regions.min() < 0:
        raise ValueError("region ids must be >= 0")
    weights = np.ones(c) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    if weights.shape != (c,):
        raise ValueError(f"class_weights: expected {c} weights, got shape {weights.shape}")
    cost = cost or CostModel()

    flat = regions.ravel().astype(np.int64)
    k_max = int(flat.max()) + 1
    q = np.clip(p, 1e-12, None)
    entropy = -(p * np.log(q)).sum(0).ravel()
    if c > 1:
        top2 = -np.partition(-p, 1, axis=0)[:2]
        margin = (top2[0] - top2[1]).ravel()
    else:
        margin = np.ones_like(entropy)
    pred = p.argmax(0)
    counts = np.bincount(flat * c + pred.ravel(), minlength=k_max * c).reshape(k_max, c)
    pixels = counts.sum(1)
    present = np.flatnonzero(pixels)
    counts, n = counts[present], pixels[present].astype(np.float64)
    entropy_mean = np.bincount(flat, weights=entropy, minlength=k_max)[present] / n
    dominant = counts.argmax(1)
    dominant_frac = counts[np.arange(len(present)), dominant] / n
    clicks, _, _ = region_clicks(pred, regions, present, dominant, dominant_frac < cost.purity_threshold, cost)
    out: dict[str, np.ndarray] = {
        rcol.REGION_ID: present.astype(np.int64),
        rcol.REGION_PIXELS: pixels[present].astype(np.int64),
        rcol.ENTROPY_MEAN: entropy_mean,
        rcol.MARGIN_MEAN: np.bincount(flat, weights=margin, minlength=k_max)[present] / n,
        rcol.DOMINANT_CLASS: dominant.astype(np.int64),
        rcol.DOMINANT_FRACTION: dominant_frac,
    }
    for k_class in range(c):
        out[f"{rcol.CLASS_FRACTION_PREFIX}{k_class}"] = counts[:, k_class] / n
    out[rcol.CLASS_BALANCED] = entropy_mean * weights[dominant]
    out[rcol.COST_CLICKS] = clicks
    if labeled is not None:
        labeled = np.asarray(labeled, dtype=bool)
        if labeled.shape != regions.shape:
            raise ValueError(f"labeled {labeled.shape} and regions {regions.shape} differ in size")
        out[rcol.LABELED_FRACTION] = np.bincount(flat, weights=labeled.ravel(), minlength=k_max)[present] / n
    return out


class RegionScorer:
    """Ray Data callable class: a batch of ``{sample_id, image_path[, mask_path]}`` -> one row per region.

    ``mask_path`` (optional; "" for none) is the image's partial mask, for ``labeled_frac``. The region
    maps come from the region cache (computed and stored on a miss), the model from
    ``checkpoint_path``; images are decoded here at ``spec.image_size``.
    """

    def __init__(
        self,
        checkpoint_path: str,
        spec: RegionSpec,
        cache_uri: str,
        class_names: tuple[str, ...],
        ignore_index: int = 255,
        class_weights: Any = None,
        cost: CostModel | None = None,
        sam: SamSpec | None = None,
        sam_checkpoint_id: str | None = None,
        use_gpu: bool = False,
    ) -> None:
        import torch

        from ._data import ClassInfo
        from ._models import load_checkpoint

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_checkpoint(checkpoint_path).to(self.device).eval()
        self.spec = spec
        self.classes = ClassInfo(names=tuple(class_names), ignore_index=ignore_index)
        self.class_weights = class_weights
        self.cost = cost or CostModel()
        self.proposer = RegionProposer(spec, cache_uri, sam, sam_checkpoint_id, str(self.device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ._data import load_image, load_mask
        from ._train import to_tensor

        ids = [str(s) for s in batch["sample_id"]]
        masks = batch.get("mask_path", np.array([""] * len(ids), dtype=object))
        x = torch.stack([to_tensor(load_image(str(p), size=self.spec.image_size)) for p in batch["image_path"]])
        with torch.no_grad():
            probs = torch.softmax(self.model(x.to(self.device)).float(), dim=1).cpu()
        parts: list[dict[str, np.ndarray]] = []
        for i, path in enumerate(batch["image_path"]):
            regions, cached = self.proposer.regions(str(path))
            mask_path = masks[i]
            labeled = None
            if isinstance(mask_path, str) and mask_path:
                labeled = load_mask(mask_path, self.classes, size=self.spec.image_size) != self.classes.ignore_index
            else:  # the same columns for every image, so batches share a schema
                labeled = np.zeros(regions.shape, dtype=bool)
            rows = region_rows(probs[i], regions, class_weights=self.class_weights, cost=self.cost, labeled=labeled)
            k = len(rows[rcol.REGION_ID])
            parts.append({rcol.SAMPLE_ID: np.array([ids[i]] * k, dtype=object), **rows,
                          "regions_cached": np.full(k, cached)})
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


@dataclass(frozen=True)
class RegionScoreResult:
    scores_dir: str
    """Parquet files, one row per ``(sample_id, region_id)`` (the columns of :class:`RegionScorer`)."""
    num_images: int
    num_regions: int
    seconds: float


def score_regions(
    pool_parquet: str,
    checkpoint_path: str,
    spec: RegionSpec,
    cache_uri: str,
    out_dir: str,
    *,
    class_names: tuple[str, ...],
    ignore_index: int = 255,
    class_weights: Any = None,
    cost: CostModel | None = None,
    sam: SamSpec | None = None,
    sam_checkpoint_id: str | None = None,
    num_actors: int = 1,
    batch_size: int = 16,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    progress_dir: str | None = None,
    name: str | None = None,
) -> RegionScoreResult:
    """Score every region of every image of ``pool_parquet`` (``sample_id``, ``image_path`` and
    optionally ``mask_path``: the partial mask, "" for none) with the model in ``checkpoint_path``:
    a Ray Data ``map_batches`` over :class:`RegionScorer` actors, the region maps read from (or
    added to) the cache at ``cache_uri``. Writes Parquet under ``out_dir`` (replaced, so a retried
    phase never reads an earlier attempt's files). ``class_weights``: float [C] for
    ``entropy_class_balanced`` (``class_pixel_weights`` of the labeled class shares); ``sam`` and
    ``sam_checkpoint_id`` for ``spec.method == "sam"``."""
    import pyarrow.parquet as pq
    import ray

    out = Path(out_dir)
    if out.exists():  # left by an interrupted attempt: its files would be read twice
        shutil.rmtree(out)
    t0 = time.perf_counter()
    columns = [c for c in pq.read_schema(pool_parquet).names if c in ("sample_id", "image_path", "mask_path")]
    ds = ray.data.read_parquet(pool_parquet, columns=columns)
    kwargs = {
        "checkpoint_path": checkpoint_path, "spec": spec, "cache_uri": cache_uri,
        "class_names": tuple(class_names), "ignore_index": ignore_index,
        "class_weights": None if class_weights is None else np.asarray(class_weights, dtype=np.float64),
        "cost": cost, "sam": sam, "sam_checkpoint_id": sam_checkpoint_id, "use_gpu": gpus_per_actor > 0,
    }
    scored = map_warm(ds, RegionScorer, kwargs, batch_size=batch_size, workers=num_actors, cpus=cpus_per_actor,
                      gpus=gpus_per_actor, progress_dir=progress_dir, name=name)
    scored.write_parquet(str(out))
    images, regions = _ensure_regions_once(out, pool_parquet)
    return RegionScoreResult(scores_dir=str(out), num_images=images, num_regions=regions,
                             seconds=time.perf_counter() - t0)


def _ensure_regions_once(out: Path, pool_parquet: str) -> tuple[int, int]:
    """Check that every image of ``pool_parquet`` has region rows in ``out`` and that no
    ``(sample_id, region_id)`` appears twice (a retried batch; scoring is deterministic, so the
    first copy is kept and the files are rewritten as one). Returns (images, regions)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(out.glob("*.parquet"))
    pool = {str(s) for s in pq.read_table(pool_parquet, columns=["sample_id"]).column(0).to_pylist()}
    keys = [pq.read_table(f, columns=[rcol.SAMPLE_ID, rcol.REGION_ID]) for f in files]
    ids = [str(s) for t in keys for s in t.column(0).to_pylist()]
    regions = [int(r) for t in keys for r in t.column(1).to_pylist()]
    missing = pool - set(ids)
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} of {len(pool)} images have no scored regions, "
                           f"e.g. {sorted(missing)[0]!r}")
    pairs = list(zip(ids, regions))
    if len(set(pairs)) == len(pairs):
        return len(pool), len(pairs)
    first: dict[tuple[str, int], int] = {}
    for i, pair in enumerate(pairs):
        first.setdefault(pair, i)
    log.warning("%s: %d region rows scored twice (a retried batch); keeping one row per region", out,
                len(pairs) - len(first))
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    table = table.take(np.asarray(sorted(first.values()), dtype=np.int64))
    tmp = out / f".dedup-{uuid.uuid4().hex}.tmp"  # a dot name: readers of the directory skip it
    pq.write_table(table, tmp)
    os.replace(tmp, out / f"regions-{uuid.uuid4().hex}.parquet")
    for f in files:
        f.unlink()
    return len(pool), table.num_rows


def count_regions(pool_parquet: str, out_dir: str, spec: RegionSpec, cache_uri: str, *, sam: SamSpec | None = None,
                  sam_checkpoint_id: str | None = None, num_workers: int = 1, cpus: float = 1.0,
                  batch_size: int = 16) -> Any:
    """Every image's region map through the cache (computed and stored where missing), in warm Ray
    Data tasks: a DataFrame ``sample_id``, ``num_regions`` (ids 0..num_regions-1). What a protocol
    that starts from random regions draws from, before any model exists."""
    import pyarrow.parquet as pq
    import ray

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    ds = ray.data.read_parquet(pool_parquet, columns=["sample_id", "image_path"])
    kwargs = {"spec": spec, "cache_uri": cache_uri, "sam": sam, "sam_checkpoint_id": sam_checkpoint_id}
    map_warm(ds, RegionProposer, kwargs, batch_size=batch_size, workers=num_workers, cpus=cpus,
             gpus=0.0, progress_kind="regions").write_parquet(str(out))
    return pq.read_table(out, columns=["sample_id", "num_regions"]).to_pandas()
