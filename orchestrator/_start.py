"""The start of an experiment: every name and option of the config checked, the pool listed and
inspected (a Ray Data pass: each image decoded once, on the workers), the sample table built and the
labels it starts with recorded, before any training. A refused start leaves nothing.

What the masks in the pool folder are (``data.masks``): labels people drew (an image with a mask is
labeled from the start, the seed set; an image without one is in the pool), or hidden ground truth
for the simulated oracle (benchmarks: ``loop.initial_labeled`` images start labeled). With no label
at all and people as the oracle, round 0 asks people for ``loop.initial_labeled`` images, chosen by
``loop.initial_strategy``, before anything is trained.
"""

from __future__ import annotations

import json
import logging
import shutil
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
from ._config import Config
from ._context import Context
from ._label_state import holdout_share, mark_labeled
from ._labelstudio import label_studio_spec
from ._oracle import build_oracle
from ._state import CONFIG_FILE, POOL_CLASSES_FILE, UNREADABLE_FILE, State
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

IMAGE_SHA256 = "image_sha256"
"""The sha256 of an image file's bytes: the same picture under another name is found by it."""
INVENTORY_DIR = "inventory"
_NAMED = 5


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
    if cfg.sam.enabled and cfg.sam.checkpoint and "://" not in cfg.sam.checkpoint:
        from pathlib import Path

        if not Path(cfg.sam.checkpoint).is_file():
            raise FileNotFoundError(f"sam.checkpoint: {cfg.sam.checkpoint} does not exist (the official "
                                    f"{cfg.sam.model_type} weights; see the README's Segment Anything section)")


POOL_FILE = "pool.json"
"""What the start decided about the pool: ``{"masks": "labels" | "ground_truth"}``."""


def masks_are_labels(cfg: Config, masked: int, total: int) -> bool:
    """Whether the pool's masks are labels (``data.masks``; ``auto``: unless every image has one)."""
    if cfg.data.masks == "auto":
        return masked < total
    return cfg.data.masks == "labels"


def masks_are_labels_of(ctx: Context) -> bool:
    """What the experiment's start decided: the pool's masks are labels (else hidden ground truth)."""
    path = ctx.workdir / POOL_FILE
    return path.exists() and json.loads(path.read_text()).get("masks") == "labels"


def start(ctx: Context) -> State:
    cfg = ctx.config
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    classes, table, labels = build_table(ctx)
    if cfg.oracle.kind == "label-studio":  # every class has a name people will see, before any work
        label_studio_spec(tuple(classes.names), cfg.oracle.label_map, ctx.workdir, cfg.oracle.image_root_url,
                          cfg.oracle.local_files_root)
    table, unreadable, class_pixels = inspect(ctx, table, classes)
    table = ctx.unit.prepare_table(new_cost_columns(table))
    pool = table[SPLIT] == TRAIN_SPLIT
    unit_labels = None if labels else ctx.unit.initial_labels(ctx, table, classes)
    if unit_labels is not None:  # the unit's own protocol (random regions)
        table, how = unit_labels
        seeds: list[str] = []
    else:
        if labels:  # the seed set: every pool image with a mask
            chosen = pool & table[MASK_PATH].notna()
            how = f"{int(chosen.sum())} seed masks from {cfg.data.train_dir}/masks" if chosen.any() else "nothing"
        else:
            n_train = int(pool.sum())
            if cfg.loop.initial_labeled > n_train:
                raise ValueError(f"loop.initial_labeled: {cfg.loop.initial_labeled} exceeds the {n_train} train samples")
            initial = initial_set(ctx, table)
            chosen = table[SAMPLE_ID].isin(initial[SAMPLE_ID])
            check_masks(table[chosen], classes)
            kind = "random" if cfg.loop.initial_strategy == "random" else "cold-start (colour features, k-center)"
            how = f"{len(initial)} {kind} samples"
        seeds = table[SAMPLE_ID][chosen].tolist()
        mark_labeled(table, chosen, round_index=0, config=cfg)
        table = charge_images(table, table[SAMPLE_ID].isin(seeds), classes, cfg)  # clicks of the labels it starts with
    seed_round = labels and not seeds  # nothing labeled: people label loop.initial_labeled images first
    check_split(ctx, table, seed_round)
    atomic_write_text(ctx.workdir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_json(ctx.workdir / "classes.json", {"classes": list(classes.names), "ignore_index": classes.ignore_index})
    atomic_write_json(ctx.workdir / POOL_FILE, {"masks": "labels" if labels else "ground_truth"})
    if not labels:
        atomic_write_json(ctx.workdir / POOL_CLASSES_FILE, pool_class_rates(table, class_pixels, classes))
    if len(unreadable):
        atomic_write(ctx.workdir / UNREADABLE_FILE, lambda p: unreadable.to_csv(p, index=False))
    held = int(((table[SPLIT] == VAL_SPLIT) & (table[ROUND_LABELED] == 0)).sum())
    comment = f"initial: {how} labeled" + (f", {held} of them held out for validation" if held else "")
    rev = unsaved_start(ctx, table) or ctx.store.write(table, parent=None, round=0, comment=comment)
    _faults.checkpoint("start:inside")  # the first revision written, no state yet
    state = State(experiment_uid=uuid.uuid4().hex, revision=rev)
    if seed_round:
        state = open_seed_round(ctx, state, table)
    state.save(ctx.workdir)
    return state


def open_seed_round(ctx: Context, state: State, table: pd.DataFrame) -> State:
    """Round 0: ``loop.initial_labeled`` images by ``loop.initial_strategy`` exported to people as a
    task folder; the experiment waits for them before anything is trained."""
    cfg = ctx.config
    state.round, state.phase = 0, "select"
    ctx.state = state
    picked = initial_set(ctx, table)
    path = ctx.round_dir() / "selection.csv"
    atomic_write(path, lambda p: picked.to_csv(p, index=False))
    state.round_info["select"] = {"selected": picked[SAMPLE_ID].tolist(), "selection_file": str(path), "seconds": 0.0}
    if ctx.unit.request_labels(ctx) is not None:
        raise AssertionError("round 0 cannot have labels before its task folder is exported")
    log.info("round 0: %d images by %s exported for labeling; nothing is trained until they are imported",
             len(picked), cfg.loop.initial_strategy)
    return state


def check_split(ctx: Context, table: pd.DataFrame, seed_round: bool) -> None:
    """A pool to select from, a budget it can pay for, something to validate and train on."""
    cfg = ctx.config
    # The unit's pool: regions leave an image labeled in part open (the region protocol's random
    # initial regions may touch every image).
    n_pool = int(ctx.unit.open_pool(table).sum())
    if n_pool == 0:
        raise ValueError(f"the unlabeled pool is empty: every image in {cfg.data.train_dir or 'the train split'} is "
                         "labeled (data.masks: labels reads a mask as a label); add images without a mask")
    if seed_round:
        if not build_oracle(cfg.oracle.kind).interactive:
            raise AssertionError("the simulated oracle starts from masks")  # refused in inspect()
        if cfg.loop.initial_labeled > n_pool:
            raise ValueError(f"loop.initial_labeled: {cfg.loop.initial_labeled} images asked of people in round 0 "
                             f"exceeds the {n_pool} pool images")
        n_pool -= cfg.loop.initial_labeled
    ctx.unit.check_pool(n_pool)
    val = int((table[SPLIT] == VAL_SPLIT).sum())
    labeled = int(table[LABELED].sum())
    if holdout_share(cfg) is None:
        if val == 0:
            raise ValueError("the validation split is empty: data.val_dir (or data.synthetic.num_val)")
    elif labeled == 0 and val > 0:
        raise ValueError(f"data.val_share: {cfg.data.val_share} holds out all {val} labeled images for validation, "
                         "leaving nothing to train on; lower it or label more images")


def inspect(ctx: Context, table: pd.DataFrame, classes: Any) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Every image decoded once in a Ray Data pass (``workers.inspect_images``), with every mask
    checked against its image (seed, hidden ground truth and validation masks): the table with
    ``image_sha256``, the pool images left out as unreadable (``data.skip_unreadable``) and the
    pixels of each class in each kept row's mask (int64 ``[rows, classes]``, zeros without a mask).
    A bad validation image, a bad mask or, without ``skip_unreadable``, a bad pool image is an
    error naming the file and how many more there are."""
    ctx.ray()
    check = (table[SPLIT] == VAL_SPLIT) | table[MASK_PATH].notna()
    rows = pd.DataFrame({SAMPLE_ID: table[SAMPLE_ID], IMAGE_PATH: table[IMAGE_PATH].astype(str),
                         MASK_PATH: np.where(check, table[MASK_PATH].fillna("").astype(str), "")})
    folder = ctx.workdir / INVENTORY_DIR
    rows_file = folder / "rows.parquet"
    atomic_write(rows_file, lambda p: rows.to_parquet(p, index=False))
    try:
        result = workers.inspect_images(str(rows_file), str(folder / "results"), classes,
                                        cpus_per_task=ctx.config.score.cpus_per_actor)
        found = workers.read_scores(result.out_dir).set_index(SAMPLE_ID).reindex(table[SAMPLE_ID])
    finally:  # scratch: the table keeps what matters
        shutil.rmtree(folder, ignore_errors=True)
    if found["image_sha256"].isna().any():
        raise RuntimeError(f"the image inventory has no row for {int(found['image_sha256'].isna().sum())} images")
    image_error = found["image_error"].fillna("").to_numpy()
    mask_error = found["mask_error"].fillna("").to_numpy()
    is_val = (table[SPLIT] == VAL_SPLIT).to_numpy()
    for bad, what in ((is_val & (image_error != ""), image_error), (mask_error != "", mask_error)):
        if bad.any():
            more = f" (and {int(bad.sum()) - 1} more)" if bad.sum() > 1 else ""
            raise ValueError(f"{what[bad][0]}{more}")
    unreadable_rows = ~is_val & (image_error != "")
    unreadable = pd.DataFrame({SAMPLE_ID: table.loc[unreadable_rows, SAMPLE_ID].to_numpy(),
                               IMAGE_PATH: table.loc[unreadable_rows, IMAGE_PATH].to_numpy(),
                               "error": image_error[unreadable_rows]})
    if len(unreadable):
        if not ctx.config.data.skip_unreadable:
            more = f" (and {len(unreadable) - 1} more unreadable train images)" if len(unreadable) > 1 else ""
            raise ValueError(f"{unreadable['error'].iloc[0]}{more}; set data.skip_unreadable: true to leave "
                             "unreadable pool images out")
        for sid, err in zip(unreadable[SAMPLE_ID], unreadable["error"]):
            log.warning("data.skip_unreadable: pool image %s left out: %s", sid, err)
    table = table.assign(**{IMAGE_SHA256: found["image_sha256"].to_numpy()})[~unreadable_rows].reset_index(drop=True)
    if not (table[SPLIT] == TRAIN_SPLIT).any():
        raise ValueError("the train split is empty: every image of data.train_dir is unreadable")
    counts = np.zeros((len(table), classes.num_classes), dtype=np.int64)
    for i, text in enumerate(found["mask_class_pixels"].fillna("").to_numpy()[~unreadable_rows]):
        if text:
            counts[i] = np.asarray(str(text).split(","), dtype=np.int64)
    return table, unreadable, counts


def pool_class_rates(table: pd.DataFrame, counts: np.ndarray, classes: Any) -> dict[str, Any]:
    """``POOL_CLASSES_FILE``'s content: per class, the pool images holding it and its pixels."""
    pool = (table[SPLIT] == TRAIN_SPLIT).to_numpy() & table[MASK_PATH].notna().to_numpy()
    return {"classes": list(classes.names), "num_images": int(pool.sum()),
            "images": [int(v) for v in (counts[pool] > 0).sum(0)], "pixels": [int(v) for v in counts[pool].sum(0)]}


def unsaved_start(ctx: Context, table: pd.DataFrame) -> str | None:
    """The first revision of a start killed before it saved its state, if it holds exactly
    ``table``: the retry reuses it rather than write a second first revision."""
    revisions = ctx.store.revisions()
    if not revisions or ctx.store.info(revisions[-1]).parent is not None:
        return None
    return revisions[-1] if ctx.store.read(revisions[-1]).equals(table.reset_index(drop=True)) else None


def initial_set(ctx: Context, table: pd.DataFrame) -> pd.DataFrame:
    """The ``loop.initial_labeled`` pool images labeled before round 1, as a selection table
    (``rank``, ``sample_id``, ``priority``, ``reason``): at random, or spread over cheap colour
    features (``loop.initial_strategy: cold_start``, features computed in a Ray Data pass and kept
    in the table as ``feat_*`` columns)."""
    cfg = ctx.config
    rng = np.random.default_rng([cfg.experiment.seed, 0])
    pool = (table[SPLIT] == TRAIN_SPLIT) & ~table[LABELED].astype(bool)
    if cfg.loop.initial_strategy == "random":
        train_ids = np.sort(table.loc[pool, SAMPLE_ID].to_numpy())
        ids = rng.choice(train_ids, size=cfg.loop.initial_labeled, replace=False).tolist()
        return pd.DataFrame({"rank": np.arange(1, len(ids) + 1), SAMPLE_ID: ids, "priority": np.nan,
                             "reason": "random draw"})
    ctx.ray()
    train = table[pool]
    images = ctx.workdir / "rounds" / "round-000" / "images.parquet"
    images.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(images, lambda p: train[[SAMPLE_ID, IMAGE_PATH]].to_parquet(p, index=False))
    result = workers.compute_features(str(images), str(images.parent / "features"), cpus_per_task=cfg.score.cpus_per_actor)
    features = workers.read_scores(result["features_dir"])
    for name in workers.FEATURE_COLUMNS:
        table[name] = table[SAMPLE_ID].map(features.set_index(SAMPLE_ID)[name])
    rows = table.loc[pool, [SAMPLE_ID, *workers.FEATURE_COLUMNS]].assign(**{LABELED: False})
    picked = build_strategy("cold_start").select_with_reasons(rows, cfg.loop.initial_labeled, rng)
    return picked[["rank", SAMPLE_ID, "priority", "reason"]]


def build_table(ctx: Context) -> tuple[Any, pd.DataFrame, bool]:
    """(the classes, the sample table before inspection, whether the pool's masks are labels)."""
    cfg = ctx.config
    data = cfg.data
    if data.kind == "synthetic":
        s = data.synthetic
        root = ctx.workdir / "data" / "synthetic"
        classes, train = workers.generate_synthetic(root / "train", s.num_train, s.height, s.width, s.seed, prefix="train")
        val_classes, val = workers.generate_synthetic(root / "val", s.num_val, s.height, s.width, s.seed + 1, prefix="val")
    else:
        assert data.train_dir is not None
        classes, train = workers.scan_folder_dataset(data.train_dir, require_masks=False)
        val_classes, val = classes, []
        if data.val_dir is not None:
            val_classes, val = workers.scan_folder_dataset(data.val_dir)
    if tuple(val_classes.names) != tuple(classes.names) or val_classes.ignore_index != classes.ignore_index:
        raise ValueError(f"data.val_dir: its classes {val_classes} differ from data.train_dir's {classes}")
    masked = [r for r in train if r.mask_path is not None]
    labels = masks_are_labels(cfg, len(masked), len(train))
    unmasked = sorted(r.sample_id for r in train if r.mask_path is None)
    if unmasked and not build_oracle(cfg.oracle.kind).interactive:
        raise ValueError(
            f"data.train_dir: {len(unmasked)} of {len(train)} pool images have no mask in {data.train_dir}/masks "
            f"({', '.join(unmasked[:_NAMED])}{', ...' if len(unmasked) > _NAMED else ''}); the simulated oracle only "
            "reveals masks that exist: give every image a mask, or have people label (oracle.kind: folder or label-studio)"
        )
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
    if not any(r[SPLIT] == TRAIN_SPLIT for r in rows):
        raise ValueError("the train split is empty: data.train_dir (or data.synthetic.num_train)")
    table = pd.DataFrame(rows)
    table[ROUND_LABELED] = table[ROUND_LABELED].astype("int64")
    return classes, table, labels


def check_masks(rows: pd.DataFrame, classes: Any) -> None:
    """Decode the images and masks of the few ``rows`` training starts from (the initial set taken
    from ground truth): a corrupt file, a mask of the wrong size or a bad class id is refused now,
    naming the file, rather than failing inside a Ray worker later."""
    for image_path, mask_path in zip(rows[IMAGE_PATH], rows[MASK_PATH]):
        if not isinstance(mask_path, str):
            raise ValueError(f"labeled sample {image_path} has no mask")
        image = workers.load_image(str(image_path))
        workers.load_mask(mask_path, classes, expected_hw=image.shape[:2])
