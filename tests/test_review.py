"""Label-quality review and data-quality columns: hand-checkable cases, and a relabel queue that
catches deliberately corrupted labels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from workers import PoolScorer, TrainSpec, generate_synthetic, label_issue_columns, relate_to_iou
from workers._review import object_columns, quality_columns
from workers._train import train_loop


def test_label_issue_is_zero_for_agreeing_labels_and_high_for_confident_disagreement() -> None:
    label = np.zeros((10, 10), dtype=np.int64)
    label[:, 5:] = 1
    probs = torch.zeros(2, 10, 10)
    probs[0, :, :5] = 0.98
    probs[1, :, :5] = 0.02
    probs[0, :, 5:] = 0.03
    probs[1, :, 5:] = 0.97
    good = label_issue_columns(probs, label, 255)
    assert good["label_issue"] == 0.0 and good["label_self_confidence"] > 0.9
    flipped = 1 - label
    bad = label_issue_columns(probs, flipped, 255)
    assert bad["label_issue"] == 1.0 and bad["label_self_confidence"] < 0.1
    half_ignored = label.copy()
    half_ignored[:, :5] = 255
    assert label_issue_columns(probs, half_ignored, 255)["label_issue"] == 0.0
    unsure = torch.full((2, 10, 10), 0.5)  # not confident: disagreement does not count
    assert label_issue_columns(unsure, flipped, 255)["label_issue"] == 0.0


def test_quality_and_object_columns() -> None:
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(sharp, (9, 9), 3)
    assert quality_columns(blurred)["quality_sharpness"] < 0.2 * quality_columns(sharp)["quality_sharpness"]
    dark, bright = np.full((8, 8, 3), 40, np.uint8), np.full((8, 8, 3), 200, np.uint8)
    assert quality_columns(dark)["quality_brightness"] < quality_columns(bright)["quality_brightness"]
    assert quality_columns(dark)["quality_contrast"] == 0.0
    mask = np.zeros((20, 20), dtype=np.int64)
    mask[2:5, 2:5] = 1
    mask[10:14, 10:14] = 1
    mask[0, 19] = 255
    cols = object_columns(mask, 3, 255, "label")
    assert cols["label_objects_1"] == 2 and cols["label_objects_2"] == 0 and cols["label_objects_0"] == 1
    assert cols["label_area_1"] == (9 + 16) / 399


def test_relate_to_iou_finds_the_driving_property() -> None:
    rng = np.random.default_rng(0)
    sharpness = rng.random(200)
    noise = rng.random(200)
    iou = 0.3 + 0.6 * sharpness + 0.05 * rng.standard_normal(200)
    report = relate_to_iou({"quality_sharpness": sharpness, "quality_brightness": noise}, iou)
    assert report["quality_sharpness"]["pearson"] > 0.9
    assert abs(report["quality_brightness"]["pearson"]) < 0.2
    assert report["quality_sharpness"]["mutual_information"] > 5 * report["quality_brightness"]["mutual_information"]


def test_relabel_queue_ranks_corrupted_labels_first(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    classes, records = generate_synthetic(tmp_path / "data", 44, 32, 48, seed=3)
    train, val = records[:32], records[32:]
    spec = TrainSpec(
        model_name="unet", model_options={"base_channels": 8, "depth": 2},
        class_names=classes.names, ignore_index=classes.ignore_index, image_size=(32, 48),
        train_images=[r.image_path for r in train], train_masks=[r.mask_path for r in train],
        train_weights=[1.0] * len(train), val_images=[r.image_path for r in val],
        val_masks=[r.mask_path for r in val], epochs=12, samples_per_epoch=64, batch_size=8,
        lr=3e-3, weight_decay=1e-4, seed=0, output_dir=str(tmp_path / "out"),
    )
    train_loop(spec)
    # corrupt 6 of the 32 labels: pipeline and seabed swapped (what a wrong class pick does)
    corrupted = {r.sample_id for r in train[::5][:6]}
    masks = []
    for r in train:
        mask = cv2.imread(r.mask_path, cv2.IMREAD_UNCHANGED)
        if r.sample_id in corrupted:
            swapped = mask.copy()
            swapped[mask == 0], swapped[mask == 1] = 1, 0
            path = tmp_path / f"bad_{r.sample_id}.png"
            cv2.imwrite(str(path), swapped)
            masks.append(str(path))
        else:
            masks.append(r.mask_path)
    scorer = PoolScorer(str(tmp_path / "out" / "model.pt"), (32, 48), class_names=classes.names, ignore_index=255)
    out = scorer({
        "sample_id": np.array([r.sample_id for r in train]),
        "image_path": np.array([r.image_path for r in train]),
        "mask_path": np.array(masks, dtype=object),
        "need_quality": np.ones(len(train), dtype=bool),
    })
    order = np.argsort(-out["label_issue"], kind="stable")
    top = {str(out["sample_id"][i]) for i in order[: len(corrupted)]}
    assert len(top & corrupted) >= 5, (sorted(top), sorted(corrupted))
    assert np.isfinite(out["quality_sharpness"]).all()
