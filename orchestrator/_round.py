"""What the round in progress has produced so far, as the later phases and imports read it: the
parent revision with the round's scores and training signals, revisions an interrupted call wrote
without recording them, the model's pre-annotations and the open label request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import workers
from strategies import columns

from ._context import Context
from ._label_state import NEEDS_RELABEL
from ._labeling import task_name
from ._state import State
from ._table import IMAGE_PATH, SAMPLE_ID

TRAIN_SIGNALS_FILE = "train_signals.parquet"
VAL_PER_IMAGE_FILE = "val_per_image.parquet"
# Per-sample training signals of the round's model, written into the round's table revision.
TRAIN_LOSS = columns.TRAIN_LOSS
"""Mean pixel cross-entropy (nats) of a labeled sample under the round's best model."""
TRAIN_IOU = "train_iou"
"""IoU of a labeled sample under the round's best model: mean over the classes in the image."""


def scores(ctx: Context) -> pd.DataFrame | None:
    """The round's per-image scores (image runs), or None when the score phase wrote none."""
    scores_dir = ctx.round_state.round_info.get("score", {}).get("scores_dir")  # none in round 0
    return None if scores_dir is None else workers.read_scores(scores_dir)


def with_scores(ctx: Context, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with this round's score columns; quality columns not recomputed keep their values;
    the round's relabel queue flagged ``needs_relabel``."""
    found = scores(ctx)
    if found is None:
        return df
    cols = [c for c in found.columns if c != SAMPLE_ID]
    previous = df.set_index(SAMPLE_ID)[[c for c in workers.QUALITY_COLUMNS if c in df.columns]]
    df = df.drop(columns=[c for c in cols if c in df.columns]).merge(found, on=SAMPLE_ID, how="left", validate="one_to_one")
    for col in previous.columns:
        df[col] = df[col].fillna(df[SAMPLE_ID].map(previous[col]))
    queue = ctx.round_state.round_info.get("score", {}).get("relabel_queue") or []
    if queue:
        if NEEDS_RELABEL not in df.columns:
            df[NEEDS_RELABEL] = False
        df[NEEDS_RELABEL] = df[NEEDS_RELABEL].fillna(False).astype(bool) | df[SAMPLE_ID].isin(queue)
    return df


def with_train_signals(ctx: Context, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with this round's per-sample training signals (``train_loss``, ``train_iou``)
    replacing the parent revision's: NaN for samples the round's model was not trained on."""
    df = df.drop(columns=[c for c in (TRAIN_LOSS, TRAIN_IOU) if c in df.columns])
    path = ctx.round_state.round_info.get("train", {}).get("train_signals_file")
    if path is None:  # round 0 (nothing trained yet), or a round trained before the signals existed
        return df
    signals = pd.read_parquet(path, columns=[SAMPLE_ID, TRAIN_LOSS, TRAIN_IOU])
    return df.merge(signals, on=SAMPLE_ID, how="left", validate="one_to_one")


def round_table(ctx: Context, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """``df`` (default: the round's parent revision) with this round's scores and training signals:
    what the round's label revision is written from."""
    base = ctx.read(ctx.round_state.revision) if df is None else df
    return with_train_signals(ctx, with_scores(ctx, base))


def current_revision(state: State) -> str:
    """The revision curation and imports build on: the open label request's newest import, else
    the state's revision."""
    request = state.round_info.get("label_request") if state.phase == "select" else None
    return str(request["revision"]) if request and request.get("revision") else state.revision


def unrecorded_revision(ctx: Context, parent: str, df: pd.DataFrame) -> str | None:
    """The newest revision if a call killed before saving the state wrote exactly ``df`` on
    ``parent`` (no state names a child of ``parent``): a retry reuses it rather than fork the lineage."""
    latest = ctx.store.revisions()[-1]
    if latest == parent or ctx.store.info(latest).parent != parent:
        return None
    return latest if ctx.read(latest).equals(df.reset_index(drop=True)) else None


def written_this_round(ctx: Context, parent: str) -> tuple[str | None, str | None]:
    """(the label revision this round's label phase wrote on ``parent``, the ``relabel:`` revision
    written on top of it), each None when not written: what a label phase interrupted before its
    state was saved left behind, for the retry to reuse rather than fork the lineage."""
    state = ctx.round_state
    latest = ctx.store.info(ctx.store.revisions()[-1])
    relabeled = None
    if latest.round == state.round and latest.comment.startswith("relabel:") and latest.parent:
        relabeled, latest = latest.id, ctx.store.info(latest.parent)
    if latest.parent == parent and latest.round == state.round:
        return latest.id, relabeled
    return None, None


def preannotations(ctx: Context, ids: list[str]) -> dict[str, np.ndarray]:
    """The round model's predicted class-id masks for ``ids``, at each image's own size
    (SAM-refined with ``sam.enabled``, written next to the selection); {} without
    ``oracle.preannotate``."""
    state = ctx.round_state
    if not ctx.config.oracle.preannotate or "train" not in state.round_info:
        return {}
    import cv2
    import torch

    cfg = ctx.config
    images = ctx.read(state.revision).set_index(SAMPLE_ID).loc[ids, IMAGE_PATH].astype(str)
    if cfg.sam.enabled:
        ctx.ray()
        sam = ctx.sam_spec()
        written = workers.sam_preannotate(
            list(ids), images.tolist(), [task_name(i) for i in ids], state.round_info["train"]["checkpoint_path"],
            cfg.data.image_size, sam, sam.checkpoint_id(), str(ctx.round_dir() / "sam_preannotations"),
            ctx.classes().ignore_index, sam_decoder=state.round_info.get("score", {}).get("sam_decoder"),
            num_actors=cfg.score.num_actors, cpus_per_actor=cfg.score.cpus_per_actor,
            gpus_per_actor=cfg.score.gpus_per_actor)
        refined = {}
        for sid, path in written.items():
            mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            if mask is None:
                raise FileNotFoundError(f"SAM pre-annotation {path} is missing or unreadable")
            refined[sid] = mask
        return refined

    model = workers.load_checkpoint(state.round_info["train"]["checkpoint_path"]).eval()
    h, w = cfg.data.image_size
    out = {}
    for sid, path in images.items():
        image = workers.load_image(str(path))
        small = workers.load_image(str(path), size=(h, w))
        x = workers.to_tensor(small)[None]
        with torch.no_grad():
            pred = model(x).argmax(1)[0].numpy().astype(np.uint8)
        out[str(sid)] = cv2.resize(pred, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    return out


def open_request(state: State, task_dir: Path, requested: list[str]) -> None:
    """Record the label request the round now waits for (``task_dir`` exported for ``requested``)."""
    state.round_info["label_request"] = {
        "task_dir": str(task_dir), "requested": requested, "received": {}, "revision": None, "imports": [],
    }


def awaiting_labels(state: State | None) -> dict[str, Any] | None:
    """The open label request (task folder, requested and received ids), or None."""
    if state is None or state.stopped or state.phase != "select":
        return None
    request: dict[str, Any] | None = state.round_info.get("label_request")
    return request
