"""The inventory of a pool: every image decoded once, in Ray Data tasks on the cluster's workers.

Each row says whether its image decodes, its content hash (sha256 of the file's bytes: duplicates
under other names are found by it) and its stored size, and, when a mask is named for the row, whether
that mask is a valid label for it (decodes, same size, class ids in range). Only these short
strings and numbers reach the driver, so a pool of a million images is checked without the driver
decoding any of them.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._data import ClassInfo, load_image, load_mask
from ._io import read_bytes

INVENTORY_COLUMNS = ("sample_id", "image_error", "mask_error", "image_sha256", "height", "width", "mask_class_pixels")
"""What :func:`inspect_images` writes per row; an empty error string means no problem.
``mask_class_pixels``: the pixels of each class in the row's mask, comma-separated ("" without one)."""


@dataclass(frozen=True)
class InventoryResult:
    out_dir: str
    num_images: int
    seconds: float


def inspect_one(image_path: str, mask_path: str, classes: ClassInfo) -> dict[str, Any]:
    """One row of the inventory (``sample_id`` aside): see :data:`INVENTORY_COLUMNS`."""
    row: dict[str, Any] = {"image_error": "", "mask_error": "", "image_sha256": "", "height": -1, "width": -1,
                           "mask_class_pixels": ""}
    try:
        data = read_bytes(image_path)  # once: hashed, then decoded (a bucket's object is downloaded once)
        row["image_sha256"] = hashlib.sha256(data).hexdigest()
        image = load_image(image_path, data=data)
        row["height"], row["width"] = int(image.shape[0]), int(image.shape[1])
    except (ValueError, OSError) as exc:  # corrupt, truncated, empty, missing
        row["image_error"] = str(exc)
        return row
    if mask_path:
        try:
            mask = load_mask(mask_path, classes, expected_hw=(row["height"], row["width"]))
            valid = mask[(mask >= 0) & (mask < classes.num_classes)]
            row["mask_class_pixels"] = ",".join(map(str, np.bincount(valid.ravel(), minlength=classes.num_classes)))
        except (ValueError, OSError) as exc:
            row["mask_error"] = str(exc) if str(mask_path) in str(exc) else f"mask {mask_path}: {exc}"
    return row


def inspect_batch(batch: dict[str, np.ndarray], classes: ClassInfo) -> dict[str, np.ndarray]:
    """The per-batch work (``sample_id``, ``image_path``, ``mask_path`` arrays in, the inventory
    columns out): a plain function, testable on a numpy batch without Ray."""
    rows = [inspect_one(str(i), str(m), classes) for i, m in zip(batch["image_path"], batch["mask_path"])]
    out: dict[str, np.ndarray] = {"sample_id": np.asarray(batch["sample_id"])}
    for name in INVENTORY_COLUMNS[1:]:
        out[name] = np.asarray([r[name] for r in rows], dtype=object if name.endswith(("error", "sha256", "pixels")) else np.int64)
    return out


def inspect_images(rows_parquet: str, out_dir: str, classes: ClassInfo, *, batch_size: int = 64,
                   cpus_per_task: float = 1.0) -> InventoryResult:
    """The inventory of every row of ``rows_parquet`` (``sample_id``, ``image_path``, ``mask_path``:
    "" = no mask to check), as Ray Data tasks, written as Parquet under ``out_dir`` (replaced); read
    it back with ``read_scores``."""
    import pyarrow.parquet as pq
    import ray

    out = Path(out_dir)
    if out.exists():  # left by an interrupted attempt: its files would be read twice
        shutil.rmtree(out)
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(rows_parquet, columns=["sample_id", "image_path", "mask_path"])
    ds.map_batches(inspect_batch, fn_kwargs={"classes": classes}, batch_size=batch_size, batch_format="numpy",
                   num_cpus=cpus_per_task).write_parquet(str(out))
    num = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))
    return InventoryResult(out_dir=str(out), num_images=num, seconds=time.perf_counter() - t0)
