"""The score phase: the acquisition unit scores what can be selected with the round's model (one Ray
Data pass; the driver reads back per-image or per-region numbers only). Also the label review the
pass feeds: the relabel queue and which image properties relate to per-image validation IoU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

import workers

from ._atomic import atomic_write, atomic_write_json
from ._context import Context
from ._labeling import export_folder_tasks
from ._oracle import build_oracle
from ._table import LABELED, SAMPLE_ID, SPLIT, TRAIN_SPLIT


def run(ctx: Context) -> dict[str, Any]:
    return ctx.unit.score(ctx)


def relabel_queue(ctx: Context, scores_dir: Path, df: pd.DataFrame) -> list[str]:
    """The ``review.relabel_top_k`` labeled samples most likely mislabeled, highest first; a task
    folder for people when the oracle is interactive (with ``review.simulate_relabel`` the
    simulated oracle answers the queue in the label phase)."""
    cfg = ctx.config
    k = cfg.review.relabel_top_k
    if k <= 0:
        return []
    scores = workers.read_scores(str(scores_dir))
    labeled = set(df.loc[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED], SAMPLE_ID])
    ranked = scores[scores[SAMPLE_ID].isin(labeled)].sort_values(
        [workers.LABEL_ISSUE, SAMPLE_ID], ascending=[False, True], na_position="last")
    queue = ranked.head(k)
    path = ctx.round_dir() / "relabel_queue.csv"
    atomic_write(path, lambda p: queue[[SAMPLE_ID, workers.LABEL_ISSUE, "label_self_confidence"]].to_csv(p, index=False))
    ids = [str(i) for i in queue[SAMPLE_ID]]
    if ids and build_oracle(cfg.oracle.kind).interactive:
        export_folder_tasks(df, ids, ctx.round_dir() / "relabel", ctx.classes(), round_index=ctx.round_state.round,
                            kind="relabel", label_studio=ctx.label_studio(), workdir=ctx.workdir)
    return ids


def quality_report(ctx: Context, scores_dir: Path, df: pd.DataFrame) -> str | None:
    """Which image properties relate to the model's per-image validation IoU (JSON in the round dir)."""
    per_image = ctx.round_state.round_info["train"].get("val_per_image_file")
    if not per_image or not Path(per_image).exists():
        return None
    iou = pd.read_parquet(per_image, columns=[SAMPLE_ID, "miou"])
    scores = workers.read_scores(str(scores_dir))
    merged = iou.merge(scores, on=SAMPLE_ID, how="inner")
    known = df.set_index(SAMPLE_ID)
    for col in workers.QUALITY_COLUMNS:  # computed in an earlier round: taken from the table
        if col in known.columns:
            merged[col] = merged[col].fillna(merged[SAMPLE_ID].map(known[col]))
    names = [*workers.QUALITY_COLUMNS, *(c for c in merged.columns if c.startswith(("label_objects_", "label_area_")))]
    report = workers.relate_to_iou({c: merged[c].to_numpy() for c in names if c in merged}, merged["miou"].to_numpy())
    ranked = dict(sorted(report.items(), key=lambda kv: -abs(kv[1]["mutual_information"])))
    path = ctx.round_dir() / "quality_vs_iou.json"
    atomic_write_json(path, {"round": ctx.round_state.round, "images": int(len(merged)), "columns": ranked})
    return str(path)
