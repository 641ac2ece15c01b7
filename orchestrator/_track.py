"""The track phase and the end of a round: the round's MLflow child run (params, metrics, report,
figures), the parent run's summary, the round's :class:`RoundResult` and the stopping decision."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import workers

from . import _faults
from . import _report as report
from ._atomic import atomic_write_json
from ._clicks import click_metrics, round_extra
from ._context import Context
from ._state import POOL_CLASSES_FILE, UNREADABLE_FILE, State
from ._table import SAMPLE_ID

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round did: the ids it added, the metrics of the model it trained, its timings."""

    round: int
    added: list[str]
    trained_on: int
    """Labeled samples the round's model was trained on."""
    labeled_count: int
    """Labeled samples after the round's labeling."""
    metrics: dict[str, float]
    timings: dict[str, float]
    revision: str
    strategy: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def val_miou(self) -> float:
        return self.metrics["val_miou"]

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    state = ctx.round_state
    tracker = ctx.tracker()
    classes = ctx.classes()
    tags = report.experiment_tags(cfg)
    if state.parent_run_id is None:
        state.parent_run_id = tracker.parent_run(
            state.experiment_uid, cfg.experiment.name, tags={"shoal.workdir": str(ctx.workdir), **tags},
        )
        tracker.log(state.parent_run_id, params=cfg.flat())
        _faults.checkpoint("track:parent")
        ctx.save_state()
    info = state.round_info
    train, label = info["train"], info["label"]
    round_dir = ctx.round_dir()
    child = tracker.round_run(state.experiment_uid, state.parent_run_id, state.round, tags=tags)
    df = ctx.read(label["revision"])
    labeled_after = ctx.store.info(label["revision"]).num_labeled
    previous_dir = ctx.workdir / "rounds" / f"round-{state.round - 1:03d}" if state.round > 1 else None
    pixels = report.labeled_pixels(df, classes, round_dir, previous_dir)
    metrics = round_metrics(ctx, labeled_after, pixels)
    curve = report.learning_curve(
        state.history, (state.round, int(train["trained_on"]), float(train["val_miou"]), labeled_after))
    auc = workers.learning_curve_auc(curve["trained_on"], curve["val_miou"])
    baseline = None
    if cfg.loop.strategy != "random":
        found = tracker.experiment_runs(
            {workers.TAG_STRATEGY: "random", workers.TAG_DATASET: tags[workers.TAG_DATASET]},
            exclude=[state.parent_run_id])
        if found:
            baseline = tracker.curve(found[0], "trained_on", "val_miou")
            tracker.log(child, tags={"shoal.baseline_run_id": found[0]})
    # The select phase wrote each pick's priority and reason; a selection written before it did has none.
    selection = pd.read_csv(info["select"]["selection_file"], dtype={SAMPLE_ID: str})
    if "reason" not in selection.columns:
        selection = selection.assign(reason="")
    artifacts = report.write_round_report(
        round_dir / report.REPORT_DIR, cfg=cfg, classes=classes, round_index=state.round, curve=curve,
        baseline=baseline, train=train, pixels=pixels, revision_df=df, selection=selection,
        sam_dir=round_dir / "sam_preannotations",  # where the pre-annotations have SAM write them
        sam_finetune=info["score"].get("sam_finetune"))
    # SAM's mask decoder, fine-tuned in the score phase: its held-out mask IoU before and after
    # tuning says whether tuning helped (steps run, not configured: 0 without labeled prompts).
    tuned = info["score"].get("sam_finetune") or {}
    sam_metrics = {name: float(tuned[key]) for name, key in (
        ("sam_decoder_holdout_iou_before", "val_iou_before"), ("sam_decoder_holdout_iou_after", "val_iou_after"),
        ("sam_decoder_finetune_seconds", "seconds")) if key in tuned}
    sam_params = {name: int(tuned[key]) for name, key in (
        ("sam_decoder_finetune_steps", "steps"), ("sam_decoder_holdout_images", "holdout_images"),
        ("sam_decoder_holdout_prompts", "holdout_prompts")) if key in tuned}
    warnings = round_warnings(ctx)
    if warnings:
        tracker.log(child, tags={"shoal.warnings": " | ".join(warnings)})
    if "relabeled" in label:  # review.simulate_relabel: what the simulated oracle answered
        metrics |= {"relabeled": float(len(label["relabeled"])),
                    "relabel_masks_changed": float(len(label["relabel_changed"]))}
    metrics |= sam_metrics
    used = loss_used(train)
    tracker.log(child, params=report.round_params(cfg, state.round, label["revision"], label["parent"]) | sam_params
                | ({"loss_used": used} if used else {}), metrics=metrics, step=state.round)
    _faults.checkpoint("track:inside")  # the round's child run exists, not finished
    for epoch in train["history"]:
        tracker.log(child, metrics={"epoch_val_miou": epoch["val_miou"], "epoch_train_loss": epoch["train_loss"]},
                    step=int(epoch["epoch"]))
    lineage = [asdict(i) for i in ctx.store.lineage(label["revision"])]
    lineage_file = round_dir / "revision.json"
    atomic_write_json(lineage_file, {"revision": label["revision"], "parent": label["parent"], "lineage": lineage})
    extra = [lineage_file, *(p for p in [ctx.workdir / UNREADABLE_FILE] if p.exists())]
    path = info["score"].get("quality_report")  # which image properties relate to per-image val IoU
    if path and Path(path).exists():
        extra.append(Path(path))
        columns = json.loads(Path(path).read_text())["columns"]
        tracker.log(child, metrics={
            f"quality_mi_{name}": v["mutual_information"] for name, v in list(columns.items())[:10]
        } | {f"quality_corr_{name}": v["pearson"] for name, v in list(columns.items())[:10]}, step=state.round)
    queue = round_dir / "relabel_queue.csv"
    if queue.exists():
        extra.append(queue)
    tracker.log_artifacts(child, [*artifacts.root, *extra])
    tracker.log_artifacts(child, artifacts.figures, "figures")
    tracker.log_artifacts(child, artifacts.tables, "tables")
    tracker.finish(child)
    # The parent holds the summary so far: the curve (replaced every round) and its area.
    tracker.log(state.parent_run_id, metrics={
        "val_miou": metrics["val_miou"], "trained_on": metrics["trained_on"], "labeled_count": labeled_after,
        "learning_curve_auc": auc, **{k: v for k, v in sam_metrics.items() if "_iou_" in k},
    }, step=state.round)
    curve_files = [p for p in (*artifacts.figures, *artifacts.tables) if p.stem == "learning_curve"]
    tracker.log_artifacts(state.parent_run_id, curve_files)
    return {"child_run_id": child, "metrics": metrics, "learning_curve_auc": auc, "warnings": warnings,
            "loss_used": used}


MIN_VAL_IMAGES = 10
"""Fewer validation images than this make the round's mIoU a noisy figure: the round says so."""


def loss_used(train: dict[str, Any]) -> str:
    """The loss the round trained with, and why, in words (``workers._losses.choose_loss``)."""
    choice = train.get("loss_choice") or {}
    if not choice:
        return ""
    text = f"{choice['loss']}, class weights {choice['class_weights']}"
    if choice.get("recipe") == "imbalance":
        if choice.get("sampling") == "rare_images":
            n = int(choice["rare_images"])
            text += (f", its {n} image{'' if n == 1 else 's'} drawn {100 * float(choice['rare_draw_share']):.0f}% of the "
                     f"time (by sample weight {100 * float(choice['rare_draw_share_before']):.0f}%)")
        text += (f" (the rare-class recipe: class {choice['rarest_class']} holds "
                 f"{100 * float(choice['rarest_share']):.2f}% of the labeled pixels)")
    return text


def never_predicted(train: dict[str, Any], names: Any) -> list[str]:
    """Classes in the validation masks that the round's model never predicted (confusion rows = truth)."""
    cm = np.asarray(train.get("val_confusion") or [], dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != len(names):
        return []
    return [str(names[c]) for c in range(len(names)) if cm[c].sum() > 0 and cm[:, c].sum() == 0]


def round_warnings(ctx: Context) -> list[str]:
    """What a reader of the round's numbers must know: a class in the validation masks the model
    never predicts, too few validation images for a meaningful mIoU (in the round's result, printed
    under its line, and the MLflow tag ``shoal.warnings``)."""
    out = []
    train = ctx.round_state.round_info["train"]
    missing = never_predicted(train, ctx.classes().names)
    if missing:
        out.append(f"class{'es' if len(missing) > 1 else ''} {', '.join(missing)} in the validation masks "
                   f"{'are' if len(missing) > 1 else 'is'} never predicted by this round's model (recall 0): "
                   "more labeled examples of it, or a rare-class recipe (train.loss.imbalance)")
    val = int(train.get("val_images", MIN_VAL_IMAGES))
    if val < MIN_VAL_IMAGES:
        data = ctx.config.data
        held = ("data.synthetic.num_val" if data.kind == "synthetic" else "data.val_dir" if data.val_dir
                else f"data.val_share {data.val_share} of the labeled images")
        out.append(f"only {val} validation image{'' if val == 1 else 's'} ({held}): the round's mIoU is a noisy figure; "
                   f"label more images, or give a validation folder")
    for text in out:  # the CLI prints them under the round's line; the API has them in RoundResult.extra
        log.info("round %d: %s", ctx.round_state.round, text)
    return out


def round_metrics(ctx: Context, labeled_after: int, pixels: pd.DataFrame | None = None) -> dict[str, float]:
    """The round's metrics: validation scores of its model (per class too), labeled count and
    labeled pixels per class (``pixels``: one row per labeled sample, ``pixels_<class>``
    columns), clicks, phase timings. Missing values are NaN (MLflow skips them)."""
    info = ctx.round_state.round_info
    names = ctx.classes().names
    train = info["train"]
    nan = float("nan")
    metrics = {
        "val_miou": train["val_miou"],
        "val_pixel_accuracy": train["val_pixel_accuracy"],
        "val_mean_dice": float(train.get("val_mean_dice", nan)),
        "val_fw_iou": float(train.get("val_fw_iou", nan)),
        "val_image_miou": float(train.get("val_image_miou", nan)),
        "trained_on": float(train["trained_on"]),
        "val_images": float(train.get("val_images", nan)),
        "labeled_count": float(labeled_after),
        "selected": float(len(info["select"]["selected"])),
        "added": float(len(info["label"].get("added", info["select"]["selected"]))),
        "train_seconds": info["train"]["seconds"],
        "train_loop_seconds": float(train.get("loop_seconds", nan)),
        "score_seconds": info["score"]["seconds"],
        "select_seconds": info["select"]["seconds"],
        "label_seconds": info["label"]["seconds"],
    }
    weights = train.get("weights") or {}
    for key in ("min", "max", "max_min_ratio", "zero"):
        if key in weights:
            metrics[f"train_weight_{key}"] = float(weights[key])
    if info["score"].get("pool_uncertainty_mean") is not None:
        metrics["pool_uncertainty_mean"] = float(info["score"]["pool_uncertainty_mean"])
    for name, iou in zip(names, train["val_iou_per_class"]):
        metrics[f"val_iou_{name}"] = iou
    for name, recall in zip(names, train.get("val_recall_per_class") or []):
        metrics[f"val_recall_{name}"] = float(recall)
    for name, dice in zip(names, report.dice_per_class(train, len(names))):
        metrics[f"val_dice_{name}"] = dice
    if pixels is not None:
        for name in names:
            metrics[f"labeled_pixels_{name}"] = float(pixels[f"{report.PIXELS_PREFIX}{name}"].sum())
        metrics |= class_discovery(ctx, pixels, names)
    label = info["label"]  # labeled_clicks, round_clicks, ...
    metrics |= click_metrics(ctx.read(label["revision"]), ctx.read(label["parent"]))
    return metrics


def class_discovery(ctx: Context, pixels: pd.DataFrame, names: Any) -> dict[str, float]:
    """Rare-class discovery: ``labeled_images_<class>``, the labeled train images holding the class;
    with hidden ground truth (``pool_classes.json``) also ``random_images_<class>``, what random
    selection of as many images would hold on average (the pool rate times the labeled count)."""
    out = {f"labeled_images_{name}": float((pixels[f"{report.PIXELS_PREFIX}{name}"] > 0).sum()) for name in names}
    path = ctx.workdir / POOL_CLASSES_FILE
    if path.exists():
        pool = json.loads(path.read_text())
        if pool.get("classes") == list(names) and pool.get("num_images"):
            for name, held in zip(names, pool["images"]):
                out[f"random_images_{name}"] = len(pixels) * float(held) / float(pool["num_images"])
    return out


def discovery_line(metrics: dict[str, Any], names: Any, top: int = 2) -> str:
    """The console's rare-class line: the ``top`` classes in the fewest pool images, labeled images
    against random's expectation; "" without hidden ground truth."""
    rows = [(metrics[f"random_images_{n}"], n) for n in names if f"random_images_{n}" in metrics]
    rows = [r for r in rows if r[0] > 0]
    if not rows:
        return ""
    rare = sorted(rows)[:top]
    return ", ".join(f"{n} in {metrics[f'labeled_images_{n}']:.0f} labeled images (random: {expected:.1f})"
                     for expected, n in rare)


def stop_decision(ctx: Context, pool_left: int) -> str | None:
    """The reason ``loop.stopping`` gives to stop after this round (its history included), or None."""
    from strategies import stopping_rule

    stop = ctx.config.loop.stopping
    history = [{"labeled_count": h["labeled_count"], "val_miou": h["metrics"].get("val_miou"),
                "pool_uncertainty_mean": h["extra"].get("pool_uncertainty_mean"), "pool_size": None}
               for h in ctx.round_state.history]
    history[-1]["pool_size"] = pool_left
    rule = stopping_rule(total_budget=stop.total_budget, plateau_rounds=stop.plateau_rounds,
                         min_delta=stop.min_delta, uncertainty_threshold=stop.uncertainty_threshold)
    decision = rule(history)
    return decision.reason if decision.stop else None


def finish_round(ctx: Context) -> None:
    """Close the round after its track phase: its result in the history, the state on its label
    revision, the stopping decision (and, when it stops, the parent run's summary and final model),
    then the next round."""
    cfg = ctx.config
    state: State = ctx.round_state
    info = state.round_info
    labeled_after = ctx.store.info(info["label"]["revision"]).num_labeled
    # The track phase computed them (with the labeled pixels); rounds tracked before it did not.
    metrics = info["track"].get("metrics") or round_metrics(ctx, labeled_after)
    timings = {p: float(info[p]["seconds"]) for p in ("train", "score", "select", "label", "track")}
    rare = discovery_line(metrics, ctx.classes().names)
    result = RoundResult(
        round=state.round, added=list(info["label"]["added"]), trained_on=int(info["train"]["trained_on"]),
        labeled_count=labeled_after, metrics=metrics, timings=timings, revision=info["label"]["revision"],
        strategy=cfg.loop.strategy, extra={"child_run_id": info["track"]["child_run_id"],
                                           "pool_uncertainty_mean": info["score"].get("pool_uncertainty_mean"),
                                           **round_extra(metrics),
                                           **({"warnings": info["track"]["warnings"]} if info["track"].get("warnings") else {}),
                                           **({"loss_used": info["track"]["loss_used"]} if info["track"].get("loss_used") else {}),
                                           **({"rare_classes": rare} if rare else {})},
    )
    state.history.append(asdict(result))
    state.revision = info["label"]["revision"]
    pool_left = int(ctx.unit.open_pool(ctx.read(state.revision)).sum())  # regions: images labeled in part are not done
    if state.round >= cfg.loop.rounds:
        state.stopped = f"rounds: {state.round} of {cfg.loop.rounds} done"
    elif pool_left == 0:
        state.stopped = "pool exhausted: every train sample is labeled"
    else:
        state.stopped = stop_decision(ctx, pool_left)
    if state.stopped:
        tracker = ctx.tracker()
        assert state.parent_run_id is not None
        tracker.log(state.parent_run_id, metrics={
            "final_val_miou": metrics["val_miou"], "rounds": float(state.round),
            "final_learning_curve_auc": info["track"].get("learning_curve_auc", float("nan"))},
            tags={"shoal.stopped": state.stopped})
        # The last round's best model, once per experiment, in a format the registry takes.
        model = workers.load_checkpoint(info["train"]["checkpoint_path"]).eval()
        height, width = cfg.data.image_size
        tracker.log_pytorch_model(state.parent_run_id, model, np.zeros((2, 3, height, width), np.float32))
        tracker.finish(state.parent_run_id)
    state.round += 1
    state.phase = ""
    state.round_info = {}


def finish_seed_round(ctx: Context) -> None:
    """Close round 0 (labels asked of people before any model existed): round 1 trains on the
    revision that holds what they returned. Nothing was trained, so nothing is tracked."""
    state = ctx.round_state
    state.revision = state.round_info["label"]["revision"]
    state.round, state.phase, state.round_info = 1, "", {}
