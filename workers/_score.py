"""Scoring worker: per-image uncertainty of the current model over the unlabeled pool.

Runs as a Ray Data ``map_batches`` in warm tasks (``workers._warm``): each worker process loads the
model once per round; a batch holds only sample ids and image paths, images are decoded inside the
worker, and only per-image numbers leave it. The results are written as Parquet by the cluster, not
collected by the driver.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strategies import columns as col

from ._data import ClassInfo, load_image, load_mask
from ._models import load_checkpoint
from ._review import (
    LABEL_ISSUE,
    LABEL_SELF_CONFIDENCE,
    QUALITY_COLUMNS,
    label_issue_columns,
    object_columns,
    quality_columns,
)
from ._train import to_tensor
from ._warm import map_warm

log = logging.getLogger(__name__)


def class_pixel_weights(labeled_shares: Any, eps: float = 1e-3) -> np.ndarray:
    """Per-class pixel weights of the ``classweighted`` aggregation: ``1 / (share + eps)`` of each
    class's share of the labeled pixels, normalised to mean 1 (rare classes weigh more)."""
    shares = np.asarray(labeled_shares, dtype=np.float64)
    if shares.ndim != 1 or not len(shares) or not np.all(np.isfinite(shares)) or (shares < 0).any():
        raise ValueError(f"labeled class shares must be finite numbers >= 0, one per class, got {shares.tolist()}")
    w = 1.0 / (shares + eps)
    return np.asarray(w / w.mean())


def uncertainty_columns(probs: torch.Tensor, class_weights: Any = None) -> dict[str, np.ndarray]:
    """Per-image scores from softmax probabilities ``probs``: float [N, C, H, W].

    Returns float64 arrays of length N: for entropy (nats), margin (top-1 minus top-2 probability)
    and least confidence (1 - top-1), the mean over pixels, the mean over the
    ``TOPK_PIXEL_FRACTION`` most uncertain pixels (a plain mean hides small uncertain objects) and,
    given ``class_weights`` (float [C], see :func:`class_pixel_weights`), the mean with each pixel
    weighted by its predicted class's weight (``classweighted``); and the predicted pixel fraction
    of every class (``pred_frac_<c>``).
    """
    n, c = probs.shape[:2]
    p = probs.double().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(1).flatten(1)
    top = probs.double().topk(min(2, c), dim=1).values
    margin = (top[:, 0] - top[:, 1]).flatten(1) if c > 1 else torch.ones_like(entropy)
    least_conf = (1.0 - top[:, 0]).flatten(1)
    k = max(1, int(round(col.TOPK_PIXEL_FRACTION * entropy.shape[1])))
    pred = probs.argmax(1).flatten(1)
    counts = torch.zeros(n, c, dtype=torch.float64).scatter_add_(1, pred, torch.ones_like(pred, dtype=torch.float64))
    fractions = counts / pred.shape[1]
    out = {
        col.ENTROPY_MEAN: entropy.mean(1).numpy(),
        col.MARGIN_MEAN: margin.mean(1).numpy(),
        col.LEAST_CONFIDENCE_MEAN: least_conf.mean(1).numpy(),
        col.ENTROPY_TOPK: entropy.topk(k, dim=1).values.mean(1).numpy(),
        # the most uncertain pixels have the smallest margins
        col.MARGIN_TOPK: (-(-margin).topk(k, dim=1).values).mean(1).numpy(),
        col.LEAST_CONFIDENCE_TOPK: least_conf.topk(k, dim=1).values.mean(1).numpy(),
    }
    if class_weights is not None:
        w = torch.as_tensor(np.asarray(class_weights, dtype=np.float64))
        if w.shape != (c,):
            raise ValueError(f"class_weights: expected {c} weights, one per class, got {tuple(w.shape)}")
        pixel_w = w[pred]  # [N, H*W]: the weight of each pixel's predicted class
        norm = pixel_w.sum(1)
        out[col.ENTROPY_CLASSWEIGHTED] = ((pixel_w * entropy).sum(1) / norm).numpy()
        out[col.MARGIN_CLASSWEIGHTED] = ((pixel_w * margin).sum(1) / norm).numpy()
        out[col.LEAST_CONFIDENCE_CLASSWEIGHTED] = ((pixel_w * least_conf).sum(1) / norm).numpy()
    for k_class in range(c):
        out[col.class_fraction_column(k_class)] = fractions[:, k_class].numpy()
    return out


SCORED_COLUMNS = frozenset({
    col.ENTROPY_MEAN, col.MARGIN_MEAN, col.LEAST_CONFIDENCE_MEAN,
    col.ENTROPY_TOPK, col.MARGIN_TOPK, col.LEAST_CONFIDENCE_TOPK,
})
"""The fixed-name score columns :func:`uncertainty_columns` writes (plus ``pred_frac_<c>``)."""
CLASSWEIGHTED_COLUMNS = frozenset({col.ENTROPY_CLASSWEIGHTED, col.MARGIN_CLASSWEIGHTED, col.LEAST_CONFIDENCE_CLASSWEIGHTED})
"""Written on top of :data:`SCORED_COLUMNS` when the scorer is given the labeled class shares."""


def label_columns(label: np.ndarray, num_classes: int, ignore_index: int) -> dict[str, float]:
    """A labeled image's objects and area per class (``label_objects_<c>``, ``label_area_<c>``) and
    the same shares under the strategies' name ``label_frac_<c>`` (class balance and the
    class-content weights read the true shares of labeled images from them)."""
    out = object_columns(label, num_classes, ignore_index, "label")
    for c in range(num_classes):
        out[col.label_fraction_column(c)] = out[f"label_area_{c}"]
    return out


class PoolScorer:
    """Ray Data callable class: a batch of ``{sample_id, image_path}`` rows -> per-image columns.

    Optional batch columns: ``mask_path`` (non-empty for labeled images: adds label-review and
    label-object columns) and ``need_quality`` (False: the image's quality columns are already
    known, NaN is returned for them). Every row gets uncertainty columns, predicted class
    fractions and predicted objects per class; missing values are NaN so batches share a schema.
    """

    def __init__(
        self,
        checkpoint_path: str,
        image_size: tuple[int, int],
        use_gpu: bool = False,
        class_names: tuple[str, ...] | None = None,
        ignore_index: int = 255,
        labeled_class_shares: tuple[float, ...] | None = None,
    ) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.class_weights = None if labeled_class_shares is None else class_pixel_weights(labeled_class_shares)
        self.model = load_checkpoint(checkpoint_path).to(self.device).eval()
        self.image_size: tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        self.classes = ClassInfo(names=tuple(class_names), ignore_index=ignore_index) if class_names else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [load_image(str(p), size=self.image_size) for p in batch["image_path"]]  # type: ignore[arg-type]
        x = torch.stack([to_tensor(im) for im in images]).to(self.device)
        with torch.no_grad():
            probs = torch.softmax(self.model(x).float(), dim=1).cpu()
        out: dict[str, Any] = {"sample_id": np.asarray(batch["sample_id"]), **uncertainty_columns(probs, self.class_weights)}
        if self.classes is None:
            return out
        n, c = len(images), probs.shape[1]
        masks = batch.get("mask_path", np.array([""] * n, dtype=object))
        need_quality = batch.get("need_quality", np.ones(n, dtype=bool))
        rows: list[dict[str, float]] = []
        preds = probs.argmax(1).numpy()
        for i in range(n):
            row: dict[str, float] = dict.fromkeys(QUALITY_COLUMNS, float("nan"))
            if bool(need_quality[i]):
                row.update(quality_columns(images[i]))
            row.update(object_columns(preds[i], c, self.classes.ignore_index, "pred"))
            path = masks[i]
            if isinstance(path, str) and path:
                label = load_mask(path, self.classes, size=self.image_size)
                row.update(label_issue_columns(probs[i], label, self.classes.ignore_index))
                row.update(label_columns(label, c, self.classes.ignore_index))
            else:
                row.update({LABEL_ISSUE: float("nan"), LABEL_SELF_CONFIDENCE: float("nan")})
                row.update(dict.fromkeys(label_columns(preds[i], c, self.classes.ignore_index), float("nan")))
            rows.append(row)
        for key in rows[0]:
            out[key] = np.array([r[key] for r in rows], dtype=np.float64)
        return out


@dataclass(frozen=True)
class ScoreResult:
    scores_dir: str
    num_scored: int
    seconds: float


def score_pool(
    pool_parquet: str,
    checkpoint_path: str,
    image_size: tuple[int, int],
    out_dir: str,
    *,
    num_actors: int = 1,
    batch_size: int = 16,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    class_names: tuple[str, ...] | None = None,
    ignore_index: int = 255,
    labeled_class_shares: tuple[float, ...] | None = None,
    progress_dir: str | None = None,
    name: str | None = None,
) -> ScoreResult:
    """Score every row of ``pool_parquet`` (columns ``sample_id``, ``image_path``) with the model in
    ``checkpoint_path``; write the per-image columns as Parquet files under ``out_dir`` (replaced).
    At most ``num_actors`` warm tasks at a time (``workers._warm``); their progress goes to
    ``progress_dir``; ``name`` names the dataset in Ray's dashboard."""
    import pyarrow.parquet as pq
    import ray

    out = Path(out_dir)
    if out.exists():  # left by an interrupted attempt: its files would be read twice
        shutil.rmtree(out)
    t0 = time.perf_counter()
    columns = [c for c in pq.read_schema(pool_parquet).names if c in ("sample_id", "image_path", "mask_path", "need_quality")]
    ds = ray.data.read_parquet(pool_parquet, columns=columns)
    kwargs = {
        "checkpoint_path": checkpoint_path,
        "image_size": tuple(image_size),
        "use_gpu": gpus_per_actor > 0,
        "class_names": tuple(class_names) if class_names else None,
        "ignore_index": ignore_index,
        "labeled_class_shares": tuple(labeled_class_shares) if labeled_class_shares is not None else None,
    }
    # A task whose worker dies is retried in another process; ensure_scored_once drops what it wrote twice.
    scored = map_warm(ds, PoolScorer, kwargs, batch_size=batch_size, workers=num_actors, cpus=cpus_per_actor,
                      gpus=gpus_per_actor, progress_dir=progress_dir, name=name)
    scored.write_parquet(str(out))
    num = ensure_scored_once(str(out), pool_parquet)
    return ScoreResult(scores_dir=str(out), num_scored=num, seconds=time.perf_counter() - t0)


def ensure_scored_once(scores_dir: str, pool_parquet: str) -> int:
    """Check that the Parquet files in ``scores_dir`` hold exactly one row per ``sample_id`` of
    ``pool_parquet``, dropping repeated rows; returns the number of rows.

    A batch whose actor died runs again on a restarted actor; Ray Data names a write task's files
    after the task, so a retried write replaces its own file. A sample written twice by any other
    path (identical scores: scoring is deterministic) is kept once and the files are rewritten as
    one. Only the id columns are read unless there is something to drop (score rows are a few
    numbers per image). Raises RuntimeError naming a pool sample that no file scored, ValueError
    when the pool repeats a sample id.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(scores_dir)
    files = sorted(out.glob("*.parquet"))
    pool = [str(s) for s in pq.read_table(pool_parquet, columns=["sample_id"]).column(0).to_pylist()]
    if len(set(pool)) != len(pool):
        raise ValueError(f"{pool_parquet}: sample ids repeat; every pool row needs its own sample_id")
    ids: list[str] = []
    for f in files:
        ids += [str(s) for s in pq.read_table(f, columns=["sample_id"]).column(0).to_pylist()]
    missing = set(pool) - set(ids)
    if missing:
        raise RuntimeError(f"{scores_dir}: {len(missing)} of {len(pool)} pool samples were not scored, "
                           f"e.g. {sorted(missing)[0]!r}")
    if len(ids) == len(pool):
        return len(ids)
    _, first = np.unique(np.asarray(ids), return_index=True)
    log.warning("%s: %d rows scored twice (a retried batch); keeping one row per sample", scores_dir, len(ids) - len(first))
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").take(np.sort(first))
    tmp = out / f".dedup-{uuid.uuid4().hex}.tmp"  # a dot name: readers of the directory skip it
    pq.write_table(table, tmp)
    os.replace(tmp, out / f"scores-{uuid.uuid4().hex}.parquet")
    for f in files:
        f.unlink()
    return table.num_rows


def read_scores(scores_dir: str, columns: Any = None, prefixes: Any = (), sample_ids: Any = None) -> Any:
    """The per-image score table written by :func:`score_pool`, as a pandas DataFrame: every column,
    or only ``sample_id``, ``columns`` and those starting with one of ``prefixes`` (the rest is never
    read from disk: a strategy that declares two columns of forty costs two); every row, or only
    those of ``sample_ids``."""
    import pyarrow.dataset as pads

    if columns is None and not prefixes and sample_ids is None:
        import pyarrow.parquet as pq

        return pq.read_table(scores_dir).to_pandas()
    dataset = pads.dataset(scores_dir, format="parquet")
    names = dataset.schema.names
    keep = None
    if columns is not None or prefixes:
        wanted = {"sample_id", *(columns or ())}
        keep = [n for n in names if n in wanted or (prefixes and n.startswith(tuple(prefixes)))]
    rows = None if sample_ids is None else pads.field("sample_id").isin(list(sample_ids))
    return dataset.to_table(columns=keep, filter=rows).to_pandas()
