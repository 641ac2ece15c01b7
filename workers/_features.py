"""Cheap, model-free image features for the cold-start selection (``feat_*`` columns).

Computed once per image in a Ray Data pass before any model exists: the mean CIELAB colour of each
cell of a 2 x 2 grid (where things are, roughly) and an 8-bin lightness histogram (how the scene is
lit). Twenty numbers per image, so a k-center over millions of rows stays cheap.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from strategies import columns as col

from ._data import load_image

GRID = 2
LIGHTNESS_BINS = 8
FEATURE_NAMES: tuple[str, ...] = (
    *(f"lab{ch}_{r}{c}" for r in range(GRID) for c in range(GRID) for ch in "LAB"),
    *(f"lhist_{b}" for b in range(LIGHTNESS_BINS)),
)
FEATURE_COLUMNS: tuple[str, ...] = tuple(col.feature_column(n) for n in FEATURE_NAMES)
"""The ``feat_*`` columns :func:`image_features` returns, in order."""


def image_features(image: np.ndarray) -> dict[str, float]:
    """``image``: uint8 [H, W, 3] RGB -> the :data:`FEATURE_COLUMNS`, each in [0, 1]."""
    small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float64) / 255.0
    values: list[float] = []
    step = 32 // GRID
    for r in range(GRID):
        for c in range(GRID):
            values.extend(lab[r * step:(r + 1) * step, c * step:(c + 1) * step].reshape(-1, 3).mean(0).tolist())
    hist = np.histogram(lab[..., 0], bins=LIGHTNESS_BINS, range=(0.0, 1.0))[0].astype(np.float64)
    values.extend((hist / hist.sum()).tolist())
    return dict(zip(FEATURE_COLUMNS, values))


def _features_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = [image_features(load_image(str(p))) for p in batch["image_path"]]
    out: dict[str, np.ndarray] = {"sample_id": np.asarray(batch["sample_id"])}
    for name in FEATURE_COLUMNS:
        out[name] = np.array([r[name] for r in rows], dtype=np.float64)
    return out


def compute_features(images_parquet: str, out_dir: str, *, batch_size: int = 64, cpus_per_task: float = 1.0) -> dict[str, Any]:
    """Features of every row of ``images_parquet`` (``sample_id``, ``image_path``) as Ray Data tasks,
    written as Parquet under ``out_dir`` (replaced); read them back with ``read_scores``."""
    import pyarrow.parquet as pq
    import ray

    out = Path(out_dir)
    if out.exists():  # left by an interrupted attempt: its files would be read twice
        shutil.rmtree(out)
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(images_parquet, columns=["sample_id", "image_path"])
    ds.map_batches(_features_batch, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_task).write_parquet(str(out))
    num = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))
    return {"features_dir": str(out), "num_images": num, "seconds": time.perf_counter() - t0}
