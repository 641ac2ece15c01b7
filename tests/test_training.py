"""The training loop on a toy dataset with perfect labels: the default model learns it, Dice alone
learns, per-sample signals find a wrong label, seeds fix the run, early stopping, fine-tuning,
the config that drives it and the signals the loop writes into the table."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator import config_from_dict
from orchestrator._config import AugmentConfig, LossConfig
from workers._augment import AugmentSpec
from workers._data import ClassInfo
from workers._losses import LossSpec
from workers._metrics import metrics_from_confusion
from workers._models import build_model, load_checkpoint
from workers._train import (
    SegmentationDataset,
    TrainResult,
    TrainSpec,
    evaluate_dataset,
    lr_factor,
    result_from_loop,
    train_loop,
)

from .conftest import tiny_config

torch.set_num_threads(1)

TOY_CLASSES = ("background", "rectangle", "disk")
_PALETTE = np.array([[40, 60, 90], [200, 50, 40], [60, 190, 70]], np.float32)


def write_toy_dataset(root: Path, n: int, seed: int, size: tuple[int, int] = (32, 32)) -> tuple[list[str], list[str]]:
    """``n`` noisy images of a rectangle and a disk on a background, with perfect masks."""
    rng = np.random.default_rng(seed)
    h, w = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    yy, xx = np.mgrid[:h, :w]
    images, masks = [], []
    for i in range(n):
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
        mask[y0 : y0 + rng.integers(6, 12), x0 : x0 + rng.integers(6, 12)] = 1
        cy, cx, r = rng.integers(6, h - 6), rng.integers(6, w - 6), rng.integers(3, 7)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
        image = np.clip(_PALETTE[mask] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        image_path, mask_path = root / "images" / f"{i:03d}.png", root / "masks" / f"{i:03d}.png"
        cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(mask_path), mask)
        images.append(str(image_path))
        masks.append(str(mask_path))
    return images, masks


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("toy")
    train_images, train_masks = write_toy_dataset(root / "train", 16, seed=0)
    val_images, val_masks = write_toy_dataset(root / "val", 8, seed=1)
    return {"root": root, "train": (train_images, train_masks), "val": (val_images, val_masks)}


def toy_spec(toy: dict[str, Any], out: Path, **changes: Any) -> TrainSpec:
    (train_images, train_masks), (val_images, val_masks) = toy["train"], toy["val"]
    spec = TrainSpec(
        model_name="unet",
        model_options={"base_channels": 8, "depth": 2},
        class_names=TOY_CLASSES,
        ignore_index=255,
        image_size=(32, 32),
        train_images=train_images,
        train_masks=train_masks,
        train_weights=[1.0] * len(train_images),
        val_images=val_images,
        val_masks=val_masks,
        epochs=4,
        samples_per_epoch=64,
        batch_size=8,
        lr=3e-3,
        weight_decay=1e-4,
        seed=0,
        output_dir=str(out),
        train_ids=[f"s{i:02d}" for i in range(len(train_images))],
    )
    return dataclasses.replace(spec, **changes)


def run(spec: TrainSpec) -> TrainResult:
    return result_from_loop(spec, train_loop(spec), str(Path(spec.output_dir) / "model.pt"), 0.0)


def untrained_miou(spec: TrainSpec) -> float:
    torch.manual_seed(spec.seed)
    model = build_model(spec.model_name, len(spec.class_names), spec.model_options)
    ds = SegmentationDataset(spec.val_images, spec.val_masks, ClassInfo(spec.class_names), spec.image_size)
    ev = evaluate_dataset(model, ds, len(spec.class_names), 255, torch.device("cpu"))
    return metrics_from_confusion(ev.confusion).miou


def test_default_model_learns_perfect_labels(toy, tmp_path: Path) -> None:
    spec = toy_spec(toy, tmp_path, model_options={}, epochs=6)  # the default unet
    result = run(spec)
    assert result.val_miou >= 0.95, [h["val_miou"] for h in result.history]
    assert result.val_miou == max(h["val_miou"] for h in result.history)
    assert load_checkpoint(result.checkpoint_path).encode(torch.zeros(1, 3, 32, 32)).shape[1] == 16 * 8
    # the reported numbers are those of the best epoch's confusion matrix
    m = metrics_from_confusion(np.array(result.val_confusion))
    assert m.miou == pytest.approx(result.val_miou) and m.fw_iou == pytest.approx(result.val_fw_iou)
    assert result.val_dice_per_class == pytest.approx(list(m.dice))
    assert len(result.val_per_image) == 8 and result.val_image_miou > 0.9
    assert set(result.val_per_image[0]) >= {"sample_id", "loss", "miou", "mdice", "iou_disk", "dice_rectangle"}
    assert result.class_weights is None
    assert sum(result.class_pixel_frequency) == pytest.approx(1.0)
    assert result.train_ids == spec.train_ids and len(result.train_loss) == len(result.train_iou) == 16
    assert min(result.train_iou) > 0.8


def test_dice_loss_alone_learns(toy, tmp_path: Path) -> None:
    spec = toy_spec(toy, tmp_path, loss=LossSpec(name="dice"), epochs=5)
    before = untrained_miou(spec)
    result = run(spec)
    # chance: the untrained model; a tiny model after 40 steps of Dice alone reaches ~0.8
    assert result.val_miou >= 0.6 and result.val_miou > before + 0.4, (before, result.val_miou)


def test_per_sample_signals_point_at_a_wrong_label(toy, tmp_path: Path) -> None:
    images, masks = toy["train"]
    wrong = tmp_path / "wrong.png"
    mask = cv2.imread(masks[5], cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(wrong), np.array([0, 2, 1], np.uint8)[mask])  # rectangle and disk swapped
    spec = toy_spec(toy, tmp_path, train_masks=[*masks[:5], str(wrong), *masks[6:]], epochs=3)
    result = run(spec)
    assert int(np.argmax(result.train_loss)) == 5 and int(np.argmin(result.train_iou)) == 5
    assert all(0.0 <= v <= 1.0 for v in result.train_iou)


def test_fixed_seed_repeats_the_run_and_early_stopping(toy, tmp_path: Path) -> None:
    fast = {"model_options": {"base_channels": 4, "depth": 1}, "epochs": 2, "samples_per_epoch": 16}
    first = run(toy_spec(toy, tmp_path / "a", **fast))
    again = run(toy_spec(toy, tmp_path / "b", **fast))
    strip = [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in first.history]
    assert strip == [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in again.history]
    assert first.train_loss == again.train_loss
    # lr 0 and group norm: nothing changes, so the run stops after `patience` epochs
    frozen = run(toy_spec(toy, tmp_path / "c", lr=0.0, epochs=6, early_stopping_patience=2,
                          model_options={"base_channels": 4, "depth": 1, "norm": "group"}))
    assert frozen.epochs_run == 3 and frozen.stopped_early and frozen.best_epoch == 0


def test_fine_tuning_starts_from_the_given_checkpoint(toy, tmp_path: Path) -> None:
    options = {"base_channels": 4, "depth": 1, "norm": "group"}
    base = run(toy_spec(toy, tmp_path / "a", model_options=options, epochs=2, samples_per_epoch=32))
    tuned = run(toy_spec(toy, tmp_path / "b", model_options=options, epochs=1, lr=0.0, samples_per_epoch=8,
                         init_checkpoint=base.checkpoint_path, seed=5))
    assert tuned.val_confusion == base.val_confusion  # the same weights, evaluated again
    scratch = run(toy_spec(toy, tmp_path / "c", model_options=options, epochs=1, lr=0.0, samples_per_epoch=8, seed=5))
    assert scratch.val_confusion != base.val_confusion


def test_sgd_cosine_warmup_ohem_dice_class_weights_and_augmentation_run(toy, tmp_path: Path) -> None:
    loss = LossSpec(name="ohem_dice", class_weights="median", class_weight_cap=4.0, ohem_anneal_steps=4)
    augment = AugmentSpec(vflip=True, scale_range=(0.75, 1.25), crop=(24, 24), color_jitter=0.2, hroll=True)
    spec = toy_spec(toy, tmp_path, model_options={"base_channels": 4, "depth": 1}, epochs=2, samples_per_epoch=32,
                    optimizer="sgd", lr=0.05, schedule="cosine", warmup_steps=3, loss=loss, augment=augment)
    result = run(spec)
    assert result.class_weights is not None and len(result.class_weights) == 3
    assert max(result.class_weights) <= 4.0 and result.class_weights[0] < result.class_weights[1]
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["lr"] == pytest.approx(0.05 * lr_factor(8, 8, 3, "cosine"))


def test_learning_rate_schedules() -> None:
    assert [lr_factor(s, 10, 4, "poly") for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, 10, 4, "cosine") == 1.0 and lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "poly") == pytest.approx(0.1**0.9)
    assert lr_factor(100, 10, 0, "poly") == pytest.approx(0.1**0.9)  # never 0 or negative


def test_train_config_mirrors_the_worker_specs() -> None:
    assert [f.name for f in dataclasses.fields(LossConfig)] == [f.name for f in dataclasses.fields(LossSpec)]
    assert [f.name for f in dataclasses.fields(AugmentConfig)] == [f.name for f in dataclasses.fields(AugmentSpec)]
    cfg = config_from_dict({}, [
        "train.loss.name=focal_dice", "train.loss.class_weights=median", "train.optimizer=sgd",
        "train.augment.scale_range=[0.5, 2.0]", "train.augment.crop=[64, 64]", "train.init=previous",
        "train.early_stopping_patience=3", "train.grad_clip=null",
    ])
    assert cfg.train.loss.name == "focal_dice" and cfg.train.augment.crop == (64, 64)
    assert cfg.train.grad_clip is None and cfg.flat()["train.loss.class_weights"] == "median"
    LossSpec(**dataclasses.asdict(cfg.train.loss))
    AugmentSpec(**dataclasses.asdict(cfg.train.augment))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.loss.nam=ce", r"unknown config key 'train\.loss\.nam'"),
        ("train.loss.name=lovasz", r"train\.loss\.name: 'lovasz' is not one of"),
        ("train.loss.ohem_top_k_min=0", r"train\.loss\.ohem_top_k_min: must be in \(0, 1\]"),
        ("train.loss.class_weight_cap=0", r"train\.loss\.class_weight_cap: must be positive"),
        ("train.loss.dice_weight=0", None),  # fine for 'ce'
        ("train.augment.scale_range=[2, 1]", r"train\.augment\.scale_range"),
        ("train.augment.crop=[64]", r"train\.augment\.crop: expected a list of 2"),
        ("train.early_stopping_patience=0", r"train\.early_stopping_patience: must be >= 1"),
        ("train.schedule=step", r"train\.schedule: 'step' is not one of"),
    ],
)
def test_bad_train_config_names_the_key(override: str, message: str | None) -> None:
    if message is None:
        config_from_dict({}, [override])
        return
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, [override])


def test_a_loss_whose_terms_all_weigh_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="every term of loss 'ce_dice' has weight 0"):
        config_from_dict({"train": {"loss": {"name": "ce_dice", "pixel_weight": 0, "dice_weight": 0}}})


def test_the_round_revision_carries_per_sample_training_signals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers
    from orchestrator import ActiveLearningLoop, TableStore

    def train_in_process(spec: TrainSpec, **_: Any) -> TrainResult:
        return run(spec)

    def no_scoring(*_: Any, **__: Any) -> None:
        raise AssertionError("this test runs no Ray Data scoring pass")

    monkeypatch.setattr(workers, "train", train_in_process)
    monkeypatch.setattr(workers, "score_pool", no_scoring)
    from orchestrator._context import Context
    from orchestrator._loop import PHASES

    monkeypatch.setattr(Context, "ray", lambda self: None)
    # random selection and no label review: the score phase has nothing to compute
    cfg = config_from_dict(tiny_config(loop={"strategy": "random"}, train={"epochs": 1, "init": "previous"},
                                       review={"enabled": False}))
    loop = ActiveLearningLoop(cfg, tmp_path / "work")
    state = loop.start()
    trained_on = set(loop.store.read(state.revision).query("labeled").sample_id)
    for phase in ("train", "score", "select", "label"):
        state.round_info[phase] = PHASES[phase](loop.ctx)
    info = state.round_info["train"]
    assert "train_loss" not in info and Path(info["train_signals_file"]).exists()
    per_image = pd.read_parquet(info["val_per_image_file"])
    assert len(per_image) == 8 and per_image.sample_id.str.startswith("val/").all()

    table = TableStore(loop.workdir / "table").read(state.round_info["label"]["revision"])
    has_signal = table.train_loss.notna()
    assert set(table.loc[has_signal, "sample_id"]) == trained_on  # not the newly labeled, pool or val
    assert table.train_iou.notna().equals(has_signal)
    assert (table.loc[has_signal, "train_loss"] > 0).all() and table.loc[has_signal, "train_iou"].between(0, 1).all()

    from orchestrator._train import init_checkpoint

    state.round = 2  # round 2 fine-tunes round 1's best checkpoint
    loop.state = state
    assert init_checkpoint(loop.ctx) == str(loop.workdir / "rounds/round-001/model.pt")
