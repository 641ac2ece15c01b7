"""The train phase: the round's model, trained with Ray Train on the labeled set by per-sample weight."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import workers

from . import _faults
from ._atomic import atomic_write
from ._config import Config
from ._context import Context
from ._round import TRAIN_IOU, TRAIN_LOSS, TRAIN_SIGNALS_FILE, VAL_PER_IMAGE_FILE
from ._table import IMAGE_PATH, LABELED, MASK_PATH, SAMPLE_ID, SPLIT, TRAIN_SPLIT, VAL_SPLIT, WEIGHT


def train_spec(
    cfg: Config, data: Any, output_dir: str, seed: int, init_checkpoint: str | None = None
) -> Any:
    """The ``workers.TrainSpec`` for ``cfg`` on ``data`` (class names, ignore index and the train
    and val paths, weights and ids); shared by the loop's train phase and the training sweep."""
    t = cfg.train
    return workers.TrainSpec(
        model_name=cfg.model.name, model_options=dict(cfg.model.options),
        class_names=tuple(data["class_names"]), ignore_index=int(data["ignore_index"]),
        image_size=cfg.data.image_size,
        train_images=list(data["train_images"]), train_masks=list(data["train_masks"]),
        train_weights=list(data["train_weights"]),
        val_images=list(data["val_images"]), val_masks=list(data["val_masks"]),
        epochs=t.epochs, samples_per_epoch=t.samples_per_epoch or len(data["train_images"]),
        batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, seed=seed, output_dir=output_dir,
        use_gpu=t.use_gpu, train_ids=list(data["train_ids"]), val_ids=list(data["val_ids"]),
        loss=workers.LossSpec(**asdict(t.loss)), optimizer=t.optimizer, momentum=t.momentum,
        schedule=t.schedule, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip, amp=t.amp,
        early_stopping_patience=t.early_stopping_patience, init_checkpoint=init_checkpoint,
        augment=workers.AugmentSpec(**asdict(t.augment)),
    )


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    state = ctx.round_state
    ctx.ray()
    df = ctx.read(state.revision)
    round_dir = ctx.round_dir()
    weights, weights_info = training_weights(ctx, df, round_dir)
    df = df.assign(**{WEIGHT: df[SAMPLE_ID].map(weights).fillna(0.0).astype(float)})
    labeled = df[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED] & (df[WEIGHT] > 0)]
    val = df[df[SPLIT] == VAL_SPLIT]
    if val.empty:
        raise ValueError(f"round {state.round}: no validation images: without data.val_dir a share of the labeled "
                         f"images (data.val_share) is held out once two are labeled; label more, or give data.val_dir")
    if labeled.empty:
        raise ValueError(f"round {state.round}: no labeled image to train on (every one is held out for validation "
                         f"or has weight 0)")
    classes = ctx.classes()
    data = {
        "class_names": tuple(classes.names), "ignore_index": classes.ignore_index,
        "train_images": labeled[IMAGE_PATH].tolist(), "train_masks": labeled[MASK_PATH].tolist(),
        "train_weights": labeled[WEIGHT].astype(float).tolist(), "train_ids": labeled[SAMPLE_ID].tolist(),
        "val_images": val[IMAGE_PATH].tolist(), "val_masks": val[MASK_PATH].tolist(),
        "val_ids": val[SAMPLE_ID].tolist(),
    }
    spec = dataclasses.replace(
        train_spec(cfg, data, str(round_dir), seed=cfg.experiment.seed * 1000 + state.round,
                   init_checkpoint=init_checkpoint(ctx)),
        progress_dir=ctx.progress_dir("train"))
    result = workers.train(
        spec,
        num_workers=cfg.train.num_workers,
        cpus_per_worker=cfg.train.cpus_per_worker,
        max_failures=cfg.train.max_failures,
        storage_path=str(ctx.workdir / "ray_train"),
        run_name=f"{ctx.job_name('train')}-{uuid.uuid4().hex[:6]}",  # a fresh name: Ray Train resumes a reused one
        launcher=cfg.train.launcher,
    )
    _faults.checkpoint("train:inside")  # trained (model.pt written), per-sample tables not yet
    # The per-sample tables go to files in the round dir; the state file keeps their paths.
    signals = pd.DataFrame({SAMPLE_ID: result.train_ids, TRAIN_LOSS: result.train_loss, TRAIN_IOU: result.train_iou})
    signals_file = round_dir / TRAIN_SIGNALS_FILE
    atomic_write(signals_file, lambda p: signals.to_parquet(p, index=False))
    per_image_file = round_dir / VAL_PER_IMAGE_FILE
    per_image = pd.DataFrame(result.val_per_image)
    atomic_write(per_image_file, lambda p: per_image.to_parquet(p, index=False))
    info = asdict(result)
    for key in ("train_ids", "train_loss", "train_iou", "val_per_image"):
        info.pop(key)
    info["train_signals_file"] = str(signals_file)
    info["val_per_image_file"] = str(per_image_file)
    info["trained_on"] = len(labeled)
    info["val_images"] = len(val)
    info["seconds"] = result.train_seconds
    info["weights"] = weights_info
    return info


def training_weights(ctx: Context, df: pd.DataFrame, round_dir: Path) -> tuple[pd.Series, dict[str, Any]]:
    """The weights this round trains with, by labeled train sample id, and a summary.

    The table's weight (1 when labeled, set by ``shoal edit``; 0 = excluded) times the
    ``loop.reweighting`` policy's weight, computed from the parent revision (which holds the
    previous round's per-sample loss and class shares), times the acquisition unit's factor (region
    runs: by the sample's labeled pixels, ``regions.train_weighting``), then the override file,
    applied last. Round 1 has no previous round: its policy weight is uniform. Written to the round dir.
    """
    from strategies import compute_weights, manual_override

    rw = ctx.config.loop.reweighting
    rows = df[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED]]
    base = pd.Series(rows[WEIGHT].astype(float).to_numpy(), index=pd.Index(rows[SAMPLE_ID], name=SAMPLE_ID))
    policy = rw.policy if ctx.round_state.round > 1 else "uniform"
    factor = compute_weights(policy, rows, **(rw.options if policy == rw.policy else {}))
    weights = base * factor.reindex(base.index).fillna(1.0)
    unit_factor = ctx.unit.weight_factors(rows)
    if unit_factor is not None:
        weights = weights * unit_factor.reindex(weights.index)
    if rw.override_file:
        weights = manual_override(weights, weight_overrides(rw.override_file))
    elif len(weights) and not (weights > 0).any():
        raise ValueError("every labeled sample has weight 0: nothing to train on (see shoal edit --weights)")
    path = round_dir / "train_weights.csv"
    table = weights.rename(WEIGHT).reset_index()
    atomic_write(path, lambda p: table.to_csv(p, index=False))
    positive = weights[weights > 0]
    low = float(positive.min()) if len(positive) else float("nan")
    high = float(positive.max()) if len(positive) else float("nan")
    info = {"policy": policy, "file": str(path), "override_file": rw.override_file,
            "trained": int(len(positive)), "zero": int((weights == 0).sum()),
            "min": low, "max": high, "max_min_ratio": high / low}
    return weights, info


def weight_overrides(path: str) -> dict[str, float]:
    """``sample_id,weight`` rows of ``loop.reweighting.override_file``; a bad row is an error naming it."""
    try:
        table = pd.read_csv(path, dtype={SAMPLE_ID: str})
    except FileNotFoundError:
        raise FileNotFoundError(f"loop.reweighting.override_file: {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"loop.reweighting.override_file: {path} is not a CSV ({exc})") from None
    if list(table.columns[:2]) != [SAMPLE_ID, WEIGHT]:
        raise ValueError(f"{path}: expected the header sample_id,weight, got {','.join(map(str, table.columns))}")
    duplicated = table[SAMPLE_ID][table[SAMPLE_ID].duplicated()]
    if len(duplicated):
        raise ValueError(f"{path}: sample_id {duplicated.iloc[0]!r} appears more than once")
    values = pd.to_numeric(table[WEIGHT], errors="coerce")
    bad = values.isna() | ~np.isfinite(values.fillna(0.0))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path} row {row + 2}: weight {str(table[WEIGHT].iloc[row])!r} is not a finite number")
    return dict(zip(table[SAMPLE_ID], values.astype(float)))


def init_checkpoint(ctx: Context) -> str | None:
    """The previous round's best checkpoint when ``train.init`` is ``previous`` (not in round 1)."""
    round_index = ctx.round_state.round
    if ctx.config.train.init == "scratch" or round_index <= 1:
        return None
    path = ctx.workdir / "rounds" / f"round-{round_index - 1:03d}" / "model.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"train.init is 'previous' but round {round_index - 1}'s checkpoint {path} is missing; "
            "restore it or set train.init: scratch"
        )
    return str(path)
