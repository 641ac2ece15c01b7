"""The start of an experiment: every name and option of the config checked, the data checked, the
sample table built and the initial set labeled, before any training. A refused start leaves nothing."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import numpy as np
import pandas as pd
import yaml

import workers
from strategies import build_strategy

from . import _faults
from ._atomic import atomic_write, atomic_write_json, atomic_write_text
from ._clicks import charge_images, new_cost_columns
from ._context import Context
from ._label_state import mark_labeled
from ._state import CONFIG_FILE, UNREADABLE_FILE, State
from ._table import (
    IMAGE_PATH,
    LABELED,
    MASK_PATH,
    META_PREFIX,
    ROUND_LABELED,
    SAMPLE_ID,
    SPLIT,
    TRAIN_SPLIT,
    VAL_SPLIT,
    WEIGHT,
)

log = logging.getLogger(__name__)


def check_config(ctx: Context) -> None:
    """What the config names, checked before anything is written: the acquisition unit's strategy
    against its scorer (SAM columns need ``sam.enabled``), the model's name and options (the model is
    built once, on no device), SAM's weights file. The config loader checked the rest (keys, types,
    loss, reweighting and region method names)."""
    cfg = ctx.config
    ctx.unit.check(cfg)
    try:
        workers.check_model(cfg.model.name, cfg.model.options)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model: {exc}") from None
    if cfg.sam.enabled and cfg.sam.checkpoint and "://" not in cfg.sam.checkpoint \
            and not os.path.isfile(cfg.sam.checkpoint):
        raise FileNotFoundError(f"sam.checkpoint: {cfg.sam.checkpoint} does not exist (the official "
                                f"{cfg.sam.model_type} weights; see the README's Segment Anything section)")


def start(ctx: Context) -> State:
    cfg = ctx.config
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    table, classes, unreadable = build_table(ctx)
    n_train = int((table[SPLIT] == TRAIN_SPLIT).sum())
    if cfg.loop.initial_labeled > n_train:
        raise ValueError(
            f"loop.initial_labeled: {cfg.loop.initial_labeled} exceeds the {n_train} train samples"
        )
    ctx.unit.check_pool(n_train, cfg.loop.initial_labeled)
    if (table[SPLIT] == VAL_SPLIT).sum() == 0:
        raise ValueError("the validation split is empty: data.val_dir (or data.synthetic.num_val)")
    initial = initial_set(ctx, table)
    chosen = table[SAMPLE_ID].isin(initial)
    check_masks(table[chosen | (table[SPLIT] == VAL_SPLIT)], classes)
    mark_labeled(table, chosen, round_index=0)
    table = new_cost_columns(table)
    table = charge_images(table, chosen, classes, cfg)  # clicks of the initial set, whole images in both units
    table = ctx.unit.prepare_table(table)
    atomic_write_text(ctx.workdir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_json(ctx.workdir / "classes.json", {"classes": list(classes.names), "ignore_index": classes.ignore_index})
    if len(unreadable):
        atomic_write(ctx.workdir / UNREADABLE_FILE, lambda p: unreadable.to_csv(p, index=False))
    how = "random" if cfg.loop.initial_strategy == "random" else "cold-start (colour features, k-center)"
    rev = unsaved_start(ctx, table) or ctx.store.write(
        table, parent=None, round=0, comment=f"initial: {len(initial)} {how} samples labeled"
    )
    _faults.checkpoint("start:inside")  # the first revision written, no state yet
    state = State(experiment_uid=uuid.uuid4().hex, revision=rev)
    state.save(ctx.workdir)
    return state


def unsaved_start(ctx: Context, table: pd.DataFrame) -> str | None:
    """The first revision of a start killed before it saved its state, if it holds exactly
    ``table``: the retry reuses it rather than write a second first revision."""
    revisions = ctx.store.revisions()
    if not revisions or ctx.store.info(revisions[-1]).parent is not None:
        return None
    return revisions[-1] if ctx.store.read(revisions[-1]).equals(table.reset_index(drop=True)) else None


def initial_set(ctx: Context, table: pd.DataFrame) -> set[str]:
    """The ids labeled before round 1: at random, or spread over cheap colour features
    (``loop.initial_strategy: cold_start``, features computed in a Ray Data pass and kept in
    the table as ``feat_*`` columns)."""
    cfg = ctx.config
    rng = np.random.default_rng([cfg.experiment.seed, 0])
    train_ids = np.sort(table.loc[table[SPLIT] == TRAIN_SPLIT, SAMPLE_ID].to_numpy())
    if cfg.loop.initial_strategy == "random":
        return set(rng.choice(train_ids, size=cfg.loop.initial_labeled, replace=False).tolist())
    ctx.ray()
    train = table[table[SPLIT] == TRAIN_SPLIT]
    images = ctx.workdir / "rounds" / "round-000" / "images.parquet"
    images.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(images, lambda p: train[[SAMPLE_ID, IMAGE_PATH]].to_parquet(p, index=False))
    result = workers.compute_features(str(images), str(images.parent / "features"), cpus_per_task=cfg.score.cpus_per_actor)
    features = workers.read_scores(result["features_dir"])
    for name in workers.FEATURE_COLUMNS:
        table[name] = table[SAMPLE_ID].map(features.set_index(SAMPLE_ID)[name])
    rows = table.loc[table[SPLIT] == TRAIN_SPLIT, [SAMPLE_ID, *workers.FEATURE_COLUMNS]].assign(**{LABELED: False})
    picked = build_strategy("cold_start").select(rows, cfg.loop.initial_labeled, rng)
    return set(picked)


def build_table(ctx: Context) -> tuple[pd.DataFrame, Any, pd.DataFrame]:
    """(the sample table, its classes, the pool images left out as unreadable with the reason)."""
    cfg = ctx.config.data
    if cfg.kind == "synthetic":
        s = cfg.synthetic
        root = ctx.workdir / "data" / "synthetic"
        classes, train = workers.generate_synthetic(root / "train", s.num_train, s.height, s.width, s.seed, prefix="train")
        val_classes, val = workers.generate_synthetic(root / "val", s.num_val, s.height, s.width, s.seed + 1, prefix="val")
    else:
        assert cfg.train_dir is not None and cfg.val_dir is not None
        classes, train = workers.scan_folder_dataset(cfg.train_dir)
        val_classes, val = workers.scan_folder_dataset(cfg.val_dir)
    if tuple(val_classes.names) != tuple(classes.names) or val_classes.ignore_index != classes.ignore_index:
        raise ValueError(f"data.val_dir: its classes {val_classes} differ from data.train_dir's {classes}")
    rows = []
    for split, records in ((TRAIN_SPLIT, train), (VAL_SPLIT, val)):
        for r in records:
            rows.append({
                SAMPLE_ID: f"{split}/{r.sample_id}" if split == VAL_SPLIT else r.sample_id,
                IMAGE_PATH: r.image_path,
                MASK_PATH: r.mask_path,
                SPLIT: split,
                LABELED: False,
                WEIGHT: 0.0,
                ROUND_LABELED: -1,
                **{f"{META_PREFIX}{k}": v for k, v in r.metadata.items()},
            })
    rows, unreadable = without_unreadable(rows, ctx.config.data.skip_unreadable)
    if not any(r[SPLIT] == TRAIN_SPLIT for r in rows):
        raise ValueError("the train split is empty: data.train_dir (or data.synthetic.num_train)")
    table = pd.DataFrame(rows)
    table[ROUND_LABELED] = table[ROUND_LABELED].astype("int64")
    return table, classes, unreadable


def without_unreadable(rows: list[dict[str, Any]], skip: bool) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """``rows`` less the train (pool) images that do not decode, with ``data.skip_unreadable``
    (``skip``), and those left out (sample_id, image_path, error); without it the first one is an
    error naming the file. Decoded once, in threads (OpenCV releases the GIL); only the error
    strings are kept."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(path: str) -> str | None:
        try:
            workers.load_image(path)
        except (ValueError, OSError) as exc:  # corrupt, truncated, empty, missing
            return str(exc)
        return None

    train = [r for r in rows if r[SPLIT] == TRAIN_SPLIT]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(problem, [str(r[IMAGE_PATH]) for r in train]))
    bad = [(r, p) for r, p in zip(train, problems) if p is not None]
    unreadable = pd.DataFrame({SAMPLE_ID: [r[SAMPLE_ID] for r, _ in bad],
                               IMAGE_PATH: [r[IMAGE_PATH] for r, _ in bad], "error": [p for _, p in bad]})
    if not bad:
        return rows, unreadable
    if not skip:
        more = f" (and {len(bad) - 1} more unreadable train images)" if len(bad) > 1 else ""
        raise ValueError(f"{bad[0][1]}{more}; set data.skip_unreadable: true to leave unreadable pool images out")
    for r, p in bad:
        log.warning("data.skip_unreadable: pool image %s left out: %s", r[SAMPLE_ID], p)
    skipped = {r[SAMPLE_ID] for r, _ in bad}
    return [r for r in rows if r[SPLIT] != TRAIN_SPLIT or r[SAMPLE_ID] not in skipped], unreadable


def check_masks(rows: pd.DataFrame, classes: Any) -> None:
    """Decode the images and masks training starts from (the initial labeled set and the
    validation set): a corrupt file, a mask of the wrong size or a bad class id is refused now,
    naming the file, rather than failing inside a Ray worker later."""
    for image_path, mask_path in zip(rows[IMAGE_PATH], rows[MASK_PATH]):
        if not isinstance(mask_path, str):
            raise ValueError(f"labeled sample {image_path} has no mask")
        image = workers.load_image(str(image_path))
        workers.load_mask(mask_path, classes, expected_hw=image.shape[:2])
