"""What a round bought, as MLflow sees it: the numbers, tables and figures the track phase logs.

Everything here is computed from files the earlier phases wrote (the round's table revision, the
selection, the checkpoint) and written under ``<round dir>/report/`` before it is uploaded, so a
resumed track phase rewrites and re-uploads the same files instead of adding new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import workers

from ._atomic import atomic_write
from ._config import Config
from ._labeling import task_name
from ._table import IMAGE_PATH, LABELED, MASK_PATH, SAMPLE_ID, SPLIT, TRAIN_SPLIT, WEIGHT

log = logging.getLogger(__name__)

REPORT_DIR = "report"
LABELED_PIXELS_FILE = "labeled_pixels.parquet"
MAX_THUMBNAILS = 16
PIXELS_PREFIX = "pixels_"


def dataset_id(cfg: Config) -> str:
    """A stable name of the experiment's data, the ``shoal.dataset`` tag: runs on the same data
    (e.g. a random baseline for an entropy run) share it."""
    d = cfg.data
    if d.kind == "synthetic":
        s = d.synthetic
        return f"synthetic:{s.num_train}+{s.num_val}:{s.height}x{s.width}:seed{s.seed}"
    assert d.train_dir is not None
    return f"folder:{d.train_dir if workers.is_uri(d.train_dir) else Path(d.train_dir).resolve()}"


def experiment_tags(cfg: Config) -> dict[str, str]:
    """Tags of the parent run and of every round's run."""
    return {
        workers.TAG_STRATEGY: cfg.loop.strategy,
        workers.TAG_DATASET: dataset_id(cfg),
        **workers.source_tags(),
    }


def round_params(cfg: Config, round_index: int, revision: str, parent: str) -> dict[str, Any]:
    """The round's params: the headline ones first (what a reader compares rounds by), then the
    whole config under its dotted keys."""
    return {
        "strategy": cfg.loop.strategy,
        "budget": cfg.loop.budget,
        "model": cfg.model.name,
        "loss": cfg.train.loss.name,
        "seed": cfg.experiment.seed,
        "dataset_revision": revision,
        "round": round_index,
        "table_revision": revision,
        "table_parent_revision": parent,
        "trained_on_revision": parent,
        **cfg.flat(),
    }


def dice_per_class(train: Mapping[str, Any], num_classes: int) -> list[float]:
    """Per-class validation Dice of the round's model: as the training worker reported it, else
    from its confusion matrix (``2 TP / (2 TP + FP + FN)``, NaN for a class in neither truth nor
    prediction), else NaN."""
    dice = train.get("val_dice_per_class") or []
    if len(dice) == num_classes:
        return [float(v) for v in dice]
    cm = np.asarray(train.get("val_confusion") or [], dtype=np.float64)
    if cm.shape != (num_classes, num_classes):
        return [float("nan")] * num_classes
    tp = np.diag(cm)
    den = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(v) for v in np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)]


def labeled_pixels(
    df: pd.DataFrame, classes: Any, round_dir: Path, previous_round_dir: Path | None
) -> pd.DataFrame:
    """Pixels of each class in every labeled train sample of ``df`` (a table revision):
    ``sample_id`` and ``pixels_<class>`` columns, counted at the masks' own resolution.

    Cached in ``round_dir`` by sample and mask path; masks counted by the previous round are
    reused, so a round decodes only the masks it added or replaced (a relabeled sample, a partial
    mask that grew: a new file either way).
    """
    cached = round_dir / LABELED_PIXELS_FILE
    labeled = df.loc[(df[SPLIT] == TRAIN_SPLIT) & df[LABELED], [SAMPLE_ID, MASK_PATH]]
    columns = [f"{PIXELS_PREFIX}{name}" for name in classes.names]
    known = pd.DataFrame(columns=[SAMPLE_ID, MASK_PATH, *columns])
    for path in (cached, previous_round_dir / LABELED_PIXELS_FILE if previous_round_dir else None):
        if path is not None and path.exists():
            found = pd.read_parquet(path)
            if list(found.columns) == [SAMPLE_ID, MASK_PATH, *columns]:  # older caches have no mask_path: recounted
                known = found
                break
    current = pd.MultiIndex.from_frame(labeled[[SAMPLE_ID, MASK_PATH]].astype(str))
    known = known[pd.MultiIndex.from_frame(known[[SAMPLE_ID, MASK_PATH]].astype(str)).isin(current)]
    todo = labeled[~labeled[SAMPLE_ID].isin(known[SAMPLE_ID])]
    counts = workers.count_class_pixels(todo[MASK_PATH].tolist(), classes)
    new = pd.DataFrame(counts, columns=columns)
    new.insert(0, SAMPLE_ID, todo[SAMPLE_ID].to_numpy())
    new.insert(1, MASK_PATH, todo[MASK_PATH].astype(str).to_numpy())
    out = pd.concat([known, new], ignore_index=True) if len(known) else new
    out = out.sort_values(SAMPLE_ID, ignore_index=True)
    out[columns] = out[columns].astype("int64")
    atomic_write(cached, lambda p: out.to_parquet(p, index=False))
    return out.drop(columns=[MASK_PATH])


def learning_curve(history: Sequence[Mapping[str, Any]], current: tuple[int, int, float, int]) -> pd.DataFrame:
    """One row per round so far: ``round``, ``trained_on`` (the labeled count the round's model was
    trained on, the x of the curve), ``val_miou`` and ``labeled_count`` (after its labeling).
    ``current`` is (round, trained_on, val_miou, labeled_count) of the round being tracked."""
    rows = [
        {"round": int(h["round"]), "trained_on": int(h["trained_on"]), "val_miou": float(h["metrics"]["val_miou"]),
         "labeled_count": int(h["labeled_count"])}
        for h in history if int(h["round"]) != current[0]
    ]
    rnd, trained_on, miou, labeled_count = current
    rows.append({"round": rnd, "trained_on": trained_on, "val_miou": miou, "labeled_count": labeled_count})
    return pd.DataFrame(rows).sort_values("round", ignore_index=True)


@dataclass(frozen=True)
class RoundArtifacts:
    """Files of one round's report: uploaded at the run's root or under ``figures/``/``tables/``."""

    root: list[Path]
    figures: list[Path]
    tables: list[Path]


def write_round_report(
    out_dir: Path,
    *,
    cfg: Config,
    classes: Any,
    round_index: int,
    curve: pd.DataFrame,
    baseline: tuple[list[float], list[float]] | None,
    train: Mapping[str, Any],
    pixels: pd.DataFrame,
    revision_df: pd.DataFrame,
    selection: pd.DataFrame,
    sam_dir: Path | None = None,
    sam_finetune: Mapping[str, Any] | None = None,
) -> RoundArtifacts:
    """Write the round's figures and tables under ``out_dir``: the learning curve (with the random
    baseline when there is one), the validation confusion matrix, the labeled set's class
    distribution, the training weights histogram, thumbnails of the selected images with their
    predicted masks, labels and SAM pre-annotations (``sam_dir/<task name>.png``, when the round
    wrote them), the selection table with scores and reasons, and, when the round fine-tuned SAM's
    mask decoder (``sam_finetune``: what ``workers.finetune_sam_decoder`` returned), its held-out
    mask IoU before and after tuning (``sam_decoder.csv``)."""
    names = list(classes.names)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    tables: list[Path] = []

    curves = {cfg.loop.strategy: (curve["trained_on"].tolist(), curve["val_miou"].tolist())}
    if baseline is not None:
        curves["random baseline"] = baseline
    figures.append(workers.plot_learning_curve(
        out_dir / "learning_curve.png", curves, title=f"{cfg.experiment.name}: val mIoU after round {round_index}"))
    tables.append(_write_csv(out_dir / "learning_curve.csv", curve))

    confusion = train.get("val_confusion") or []
    if len(confusion) == len(names):
        figures.append(workers.plot_confusion_matrix(
            out_dir / "confusion_matrix.png", confusion, names,
            title=f"round {round_index}: val confusion (% of true class)"))

    columns = [f"{PIXELS_PREFIX}{n}" for n in names]
    totals = pixels[columns].sum().to_numpy(dtype=np.float64)
    images = (pixels[columns] > 0).sum().to_numpy(dtype=np.float64)
    figures.append(workers.plot_class_distribution(
        out_dir / "class_distribution.png", totals, names, images_per_class=images,
        title=f"labeled set after round {round_index}: {len(pixels)} images"))
    share = totals / totals.sum() if totals.sum() > 0 else np.zeros_like(totals)
    dist = pd.DataFrame({"class": names, "pixels": totals.astype(np.int64), "pixel_share": share,
                         "images": images.astype(np.int64)})
    tables.append(_write_csv(out_dir / "class_distribution.csv", dist))

    labeled = revision_df[(revision_df[SPLIT] == TRAIN_SPLIT) & revision_df[LABELED]]
    figures.append(workers.plot_weights_histogram(out_dir / "weights_histogram.png", labeled[WEIGHT].to_numpy()))

    thumbs = _thumbnails(out_dir / "selected_thumbnails.jpg", cfg, classes, train, revision_df, selection, round_index,
                         sam_dir)
    if thumbs is not None:
        figures.append(thumbs)
    if sam_finetune:
        row = {"round": round_index, "holdout_iou_before": sam_finetune.get("val_iou_before"),
               "holdout_iou_after": sam_finetune.get("val_iou_after"),
               **{k: sam_finetune.get(k) for k in ("steps", "train_images", "holdout_images", "holdout_prompts", "seconds")}}
        tables.append(_write_csv(out_dir / "sam_decoder.csv", pd.DataFrame([row])))
    root = [_write_csv(out_dir / "selection.csv", selection)]
    return RoundArtifacts(root=root, figures=figures, tables=tables)


def _thumbnails(
    path: Path, cfg: Config, classes: Any, train: Mapping[str, Any], revision_df: pd.DataFrame,
    selection: pd.DataFrame, round_index: int, sam_dir: Path | None = None,
) -> Path | None:
    checkpoint = train.get("checkpoint_path")
    if not checkpoint or not Path(checkpoint).exists() or selection.empty:
        return None
    shown = selection.drop_duplicates(SAMPLE_ID).head(MAX_THUMBNAILS)  # region runs: one row per region
    rows = revision_df.set_index(SAMPLE_ID).loc[shown[SAMPLE_ID].astype(str)]
    size = cfg.data.image_size
    images, predictions = workers.predict_masks(checkpoint, rows[IMAGE_PATH].tolist(), size)
    labels = [workers.load_mask(str(p), classes, size=size) if isinstance(p, str) else None for p in rows[MASK_PATH]]
    reasons = shown["reason"].tolist() if "reason" in shown.columns else [""] * len(shown)
    captions = [f"{sid}\n{_short(str(r))}" if r else str(sid) for sid, r in zip(shown[SAMPLE_ID], reasons)]
    selected = selection[SAMPLE_ID].nunique()
    more = f" (first {len(shown)} of {selected})" if selected > len(shown) else ""
    sam_files = [sam_dir / f"{task_name(str(sid))}.png" if sam_dir else None for sid in shown[SAMPLE_ID]]
    sam_masks = [workers.load_mask(str(p), classes, size=size) if p and p.exists() else None for p in sam_files]
    return workers.plot_thumbnails(
        path, images, predictions, classes.names, labels=labels, captions=captions,
        sam_masks=sam_masks if any(m is not None for m in sam_masks) else None,  # the column only with SAM
        ignore_index=classes.ignore_index,
        title=f"round {round_index}: selected images{more}, predicted by the round's model",
    )


def _short(text: str, width: int = 34) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _write_csv(path: Path, df: pd.DataFrame) -> Path:
    atomic_write(path, lambda p: df.to_csv(p, index=False))
    return path

