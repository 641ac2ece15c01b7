"""Scoring worker: per-image uncertainty of the current model over the unlabeled pool.

Runs as a Ray Data ``map_batches`` over an actor pool. Each actor loads the model once; a batch
holds only sample ids and image paths, images are decoded inside the actor, and only per-image
numbers leave it. The results are written as Parquet by the cluster, not collected by the driver.
"""

from __future__ import annotations

import logging
import shutil
import time
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

log = logging.getLogger(__name__)


def uncertainty_columns(probs: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image scores from softmax probabilities ``probs``: float [N, C, H, W].

    Returns float64 arrays of length N: for entropy (nats), margin (top-1 minus top-2 probability)
    and least confidence (1 - top-1), the mean over pixels and the mean over the
    ``TOPK_PIXEL_FRACTION`` most uncertain pixels (a plain mean hides small uncertain objects);
    and the predicted pixel fraction of every class (``pred_frac_<c>``).
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
    for k_class in range(c):
        out[col.class_fraction_column(k_class)] = fractions[:, k_class].numpy()
    return out


SCORED_COLUMNS = frozenset({
    col.ENTROPY_MEAN, col.MARGIN_MEAN, col.LEAST_CONFIDENCE_MEAN,
    col.ENTROPY_TOPK, col.MARGIN_TOPK, col.LEAST_CONFIDENCE_TOPK,
})
"""The fixed-name score columns :func:`uncertainty_columns` writes (plus ``pred_frac_<c>``)."""


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
    ) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_checkpoint(checkpoint_path).to(self.device).eval()
        self.image_size: tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        self.classes = ClassInfo(names=tuple(class_names), ignore_index=ignore_index) if class_names else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [load_image(str(p), size=self.image_size) for p in batch["image_path"]]  # type: ignore[arg-type]
        x = torch.stack([to_tensor(im) for im in images]).to(self.device)
        with torch.no_grad():
            probs = torch.softmax(self.model(x).float(), dim=1).cpu()
        out: dict[str, Any] = {"sample_id": np.asarray(batch["sample_id"]), **uncertainty_columns(probs)}
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
                row.update(object_columns(label, c, self.classes.ignore_index, "label"))
            else:
                row.update({LABEL_ISSUE: float("nan"), LABEL_SELF_CONFIDENCE: float("nan")})
                row.update(dict.fromkeys(object_columns(preds[i], c, self.classes.ignore_index, "label"), float("nan")))
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
) -> ScoreResult:
    """Score every row of ``pool_parquet`` (columns ``sample_id``, ``image_path``) with the model in
    ``checkpoint_path``; write the per-image columns as Parquet files under ``out_dir`` (replaced)."""
    import pyarrow.parquet as pq
    import ray

    out = Path(out_dir)
    if out.exists():  # left by an interrupted attempt: its files would be read twice
        shutil.rmtree(out)
    t0 = time.perf_counter()
    columns = [c for c in pq.read_schema(pool_parquet).names if c in ("sample_id", "image_path", "mask_path", "need_quality")]
    ds = ray.data.read_parquet(pool_parquet, columns=columns)
    scored = ds.map_batches(
        PoolScorer,
        fn_constructor_kwargs={
            "checkpoint_path": checkpoint_path,
            "image_size": tuple(image_size),
            "use_gpu": gpus_per_actor > 0,
            "class_names": tuple(class_names) if class_names else None,
            "ignore_index": ignore_index,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
    scored.write_parquet(str(out))
    num = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))
    return ScoreResult(scores_dir=str(out), num_scored=num, seconds=time.perf_counter() - t0)


def read_scores(scores_dir: str) -> Any:
    """The per-image score table written by :func:`score_pool`, as a pandas DataFrame."""
    import pyarrow.parquet as pq

    return pq.read_table(scores_dir).to_pandas()
