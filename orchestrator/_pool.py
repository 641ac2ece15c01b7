"""A pool that grows: new images join an experiment that has started, between rounds or while
labels are awaited, as one table revision with a comment (``shoal add-images``).

Images already in the table (by path) are not added twice; an image whose bytes equal those of an
image in the pool (or earlier in the same folder) is a duplicate under another name: reported and
skipped. Images that do not decode follow ``data.skip_unreadable``. Masks next to the new images are
read as the experiment reads its pool's masks (``data.masks``): labels (seed labels, round 0) or
hidden ground truth. Nothing already labeled changes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import workers

from ._atomic import atomic_write
from ._clicks import CLICKS, LABELED_PIXELS, charge_images, with_cost_columns
from ._context import Context
from ._label_state import mark_labeled
from ._oracle import build_oracle
from ._round import awaiting_labels, current_revision, unrecorded_revision
from ._start import IMAGE_SHA256, INVENTORY_DIR, masks_are_labels_of
from ._state import UNREADABLE_FILE
from ._table import IMAGE_PATH, LABELED, MASK_PATH, META_PREFIX, ROUND_LABELED, SAMPLE_ID, SPLIT, TRAIN_SPLIT, WEIGHT

log = logging.getLogger(__name__)


def add_images(ctx: Context, folder: str | Path | None = None) -> dict[str, Any]:  # noqa: C901
    """Add the images of ``folder`` (``images/`` and, optionally, ``masks/``, as a pool folder;
    default ``data.train_dir``, to pick up images dropped there) that the experiment does not hold.

    Returns ``added`` (sample ids), ``duplicates`` ([file, the pool image with the same bytes]),
    ``unreadable`` ([file, error]), ``labeled`` (added with a label) and ``revision``. Every check
    runs before anything is written: a refused call leaves the work dir as it was.
    """
    cfg = ctx.config
    state = ctx.round_state
    request = awaiting_labels(state)
    if state.phase != "" and request is None:
        raise ValueError(f"images join the pool between rounds or while labels are awaited; round {state.round} "
                         f"is after phase '{state.phase}': finish it with shoal resume {ctx.workdir} first")
    if folder is None:
        if cfg.data.train_dir is None:
            raise ValueError("add-images: give the folder of new images (this experiment's pool is synthetic)")
        folder = cfg.data.train_dir
    source = str(folder).rstrip("/") if workers.is_uri(folder) else str(Path(folder).resolve())
    classes = ctx.classes()
    found_classes, records = workers.scan_folder_dataset(source, require_masks=False)
    if tuple(found_classes.names) != tuple(classes.names) or found_classes.ignore_index != classes.ignore_index:
        raise ValueError(f"{source}: its classes {found_classes} differ from the experiment's {classes}")
    base = current_revision(state)
    df = ctx.read(base)
    known_paths = set(df[IMAGE_PATH].astype(str))
    new = [r for r in records if str(r.image_path) not in known_paths]
    report: dict[str, Any] = {"source": str(source), "found": len(records), "added": [], "duplicates": [],
                              "unreadable": [], "labeled": [], "revision": base}
    if not new:
        return report
    where = df.set_index(SAMPLE_ID)[IMAGE_PATH]
    for r in new:
        if r.sample_id in where.index:
            raise ValueError(f"{r.image_path}: sample id '{r.sample_id}' is already in the pool ({where[r.sample_id]}); "
                             "rename the new file")
    labels = masks_are_labels_of(ctx)
    unmasked = [r.sample_id for r in new if r.mask_path is None]
    if unmasked and not build_oracle(cfg.oracle.kind).interactive:
        raise ValueError(f"{source}: {len(unmasked)} new images have no mask in {source}/masks ({', '.join(unmasked[:5])}); "
                         "the simulated oracle only reveals masks that exist")
    rows = pd.DataFrame({
        SAMPLE_ID: [r.sample_id for r in new], IMAGE_PATH: [str(r.image_path) for r in new],
        MASK_PATH: [r.mask_path for r in new],
    })
    inventory = _inspect(ctx, rows, check_masks=labels)
    bad_mask = inventory["mask_error"] != ""
    if bad_mask.any():
        more = f" (and {int(bad_mask.sum()) - 1} more)" if bad_mask.sum() > 1 else ""
        raise ValueError(f"{inventory.loc[bad_mask, 'mask_error'].iloc[0]}{more}")
    unreadable = inventory["image_error"] != ""
    if unreadable.any() and not cfg.data.skip_unreadable:
        more = f" (and {int(unreadable.sum()) - 1} more unreadable images)" if unreadable.sum() > 1 else ""
        raise ValueError(f"{inventory.loc[unreadable, 'image_error'].iloc[0]}{more}; set data.skip_unreadable: true "
                         "to leave unreadable images out")
    pool_sha = _pool_hashes(ctx, df)
    seen = dict(zip(pool_sha, df.loc[pool_sha.index, IMAGE_PATH].astype(str))) if len(pool_sha) else {}
    keep = []
    for i, row in rows.iterrows():
        if unreadable[i]:
            report["unreadable"].append([row[IMAGE_PATH], inventory.at[i, "image_error"]])
            log.warning("data.skip_unreadable: %s left out: %s", row[IMAGE_PATH], inventory.at[i, "image_error"])
            continue
        sha = inventory.at[i, IMAGE_SHA256]
        if sha in seen:
            report["duplicates"].append([row[IMAGE_PATH], seen[sha]])
            log.warning("%s has the same bytes as %s, already in the pool: skipped", row[IMAGE_PATH], seen[sha])
            continue
        seen[sha] = row[IMAGE_PATH]
        keep.append(i)
    if not keep:
        return report
    added = rows.loc[keep].reset_index(drop=True)
    added[IMAGE_SHA256] = inventory.loc[keep, IMAGE_SHA256].to_numpy()
    metadata = {r.sample_id: r.metadata for r in new}
    if IMAGE_SHA256 not in df.columns:  # a table written before it held the hashes
        df[IMAGE_SHA256] = pool_sha.reindex(df.index)
    combined = pd.concat([df, _new_rows(ctx, df, added, metadata)], ignore_index=True)
    labeled_now = combined[SAMPLE_ID].isin(added.loc[added[MASK_PATH].notna(), SAMPLE_ID]) if labels else None
    if labeled_now is not None and labeled_now.any():
        mark_labeled(combined, labeled_now, round_index=0, config=cfg)  # labels that came with the images: seeds
        combined = charge_images(combined, labeled_now, classes, cfg)
        report["labeled"] = combined.loc[labeled_now & combined[LABELED], SAMPLE_ID].tolist()
    skipped = [f"{len(report['duplicates'])} duplicates" if report["duplicates"] else "",
               f"{len(report['unreadable'])} unreadable" if report["unreadable"] else ""]
    note = ", ".join(s for s in skipped if s)
    comment = f"add images: +{len(added)} from {source}" + (f" ({note} skipped)" if note else "")
    rev = unrecorded_revision(ctx, base, combined) or ctx.store.write(combined, parent=base, round=state.round,
                                                                      comment=comment)
    if report["unreadable"]:
        _append_unreadable(ctx, report["unreadable"])
    if request is not None and request.get("revision"):
        request["revision"] = rev
    else:
        state.revision = rev
    ctx.save_state()
    report.update(added=added[SAMPLE_ID].tolist(), revision=rev)
    log.info("%s", comment)
    return report


def _new_rows(ctx: Context, df: pd.DataFrame, added: pd.DataFrame, metadata: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The table rows of the ``added`` images, with every column of ``df`` (flags False, scores NaN)."""
    rows = added.assign(**{SPLIT: TRAIN_SPLIT, LABELED: False, WEIGHT: 0.0, ROUND_LABELED: -1,
                           CLICKS: 0.0, LABELED_PIXELS: 0})
    meta = pd.DataFrame.from_dict({sid: metadata.get(sid, {}) for sid in rows[SAMPLE_ID]}, orient="index")
    if len(meta.columns):
        rows = rows.join(meta.add_prefix(META_PREFIX), on=SAMPLE_ID)
    rows = ctx.unit.prepare_table(rows)
    for col in df.columns:
        if col not in rows.columns:
            rows[col] = False if df[col].dtype == bool else np.nan
    rows = with_cost_columns(rows)
    return rows[[*df.columns, *(c for c in rows.columns if c not in df.columns)]]


def _inspect(ctx: Context, rows: pd.DataFrame, check_masks: bool) -> pd.DataFrame:
    """The inventory (``workers.inspect_images``) of ``rows``, aligned with them."""
    ctx.ray()
    folder = ctx.workdir / INVENTORY_DIR / "added"
    batch = rows.assign(**{MASK_PATH: rows[MASK_PATH].fillna("").astype(str) if check_masks else ""})
    rows_file = folder / "rows.parquet"
    atomic_write(rows_file, lambda p: batch[[SAMPLE_ID, IMAGE_PATH, MASK_PATH]].to_parquet(p, index=False))
    try:
        result = workers.inspect_images(str(rows_file), str(folder / "results"), ctx.classes(),
                                        cpus_per_task=ctx.config.score.cpus_per_actor)
        found = workers.read_scores(result.out_dir).set_index(SAMPLE_ID).reindex(rows[SAMPLE_ID])
    finally:  # scratch: what the command leaves is its revision
        shutil.rmtree(folder, ignore_errors=True)
    if found["image_sha256"].isna().any():
        raise RuntimeError(f"the image inventory has no row for {int(found['image_sha256'].isna().sum())} images")
    found.index = rows.index
    for col in ("image_error", "mask_error"):
        found[col] = found[col].fillna("")
    return found


def _pool_hashes(ctx: Context, df: pd.DataFrame) -> pd.Series:
    """The content hash of every train image in ``df`` (by row), from the table or, for a table
    written before it held them, computed now."""
    train = df[df[SPLIT] == TRAIN_SPLIT]
    if IMAGE_SHA256 in df.columns and train[IMAGE_SHA256].notna().all():
        return train[IMAGE_SHA256]
    found = _inspect(ctx, train[[SAMPLE_ID, IMAGE_PATH, MASK_PATH]], check_masks=False)
    return found[IMAGE_SHA256].where(found["image_error"] == "")


def _append_unreadable(ctx: Context, rows: list[list[str]]) -> None:
    path = ctx.workdir / UNREADABLE_FILE
    before = pd.read_csv(path, dtype=str) if path.exists() else pd.DataFrame(columns=[SAMPLE_ID, IMAGE_PATH, "error"])
    extra = pd.DataFrame({SAMPLE_ID: [Path(p).stem for p, _ in rows], IMAGE_PATH: [p for p, _ in rows],
                          "error": [e for _, e in rows]})
    table = pd.concat([before, extra], ignore_index=True).drop_duplicates(IMAGE_PATH, keep="last")
    atomic_write(path, lambda p: table.to_csv(p, index=False))
