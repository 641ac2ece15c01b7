"""Metrics: the right numbers from a confusion matrix, per-image reduction, and invariance to the
batch size and the number of DDP workers (one confusion matrix over the whole set, summed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workers._data import ClassInfo
from workers._metrics import (
    confusion_matrix,
    image_mean,
    metrics_from_confusion,
    per_image_confusion,
    per_image_scores,
)
from workers._models import build_model, save_model_state
from workers._train import Evaluation, SegmentationDataset, evaluate_dataset

from .test_training import TOY_CLASSES, write_toy_dataset

torch.set_num_threads(1)
NAN = float("nan")


def test_confusion_matrix_skips_ignored_pixels() -> None:
    target = torch.tensor([[0, 0, 1, 255], [2, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 0], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, target, 3, 255).numpy()
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    per_image = per_image_confusion(pred[None], target[None], 3, 255)
    assert per_image[0].tolist() == cm.tolist()


def test_metrics_by_hand() -> None:
    # rows truth, columns prediction
    cm = np.array([[50, 10, 0], [5, 20, 5], [0, 0, 10]])
    m = metrics_from_confusion(cm)
    tp, gt, pr = np.array([50, 20, 10]), np.array([60, 30, 10]), np.array([55, 30, 15])
    np.testing.assert_allclose(m.iou, tp / (gt + pr - tp))
    np.testing.assert_allclose(m.dice, 2 * tp / (gt + pr))
    np.testing.assert_allclose(m.precision, tp / pr)
    np.testing.assert_allclose(m.recall, tp / gt)
    assert m.miou == pytest.approx(np.mean(tp / (gt + pr - tp)))
    assert m.fw_iou == pytest.approx(np.sum(gt / 100 * tp / (gt + pr - tp)))
    assert m.pixel_accuracy == pytest.approx(80 / 100)
    assert m.num_pixels == 100
    flat = m.as_dict(("a", "b", "c"), prefix="val_")
    assert flat["val_iou_b"] == pytest.approx(20 / 40) and flat["val_recall_c"] == 1.0


def test_absent_classes_are_nan_and_left_out_of_the_means() -> None:
    cm = np.array([[8, 2, 0], [0, 0, 0], [0, 0, 0]])  # class 1 only predicted, class 2 nowhere
    m = metrics_from_confusion(cm)
    assert m.iou[0] == pytest.approx(0.8) and m.iou[1] == 0.0 and np.isnan(m.iou[2])
    assert m.miou == pytest.approx(0.4)  # over the two present classes
    assert np.isnan(m.recall[1]) and m.precision[1] == 0.0 and np.isnan(m.precision[2])
    assert m.fw_iou == pytest.approx(0.8)  # only class 0 has ground-truth pixels
    assert metrics_from_confusion(np.zeros((3, 3))).miou == 0.0


def test_majority_class_predictor_has_high_accuracy_and_low_miou() -> None:
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.choice(4, size=(16, 32, 32), p=[0.9, 0.05, 0.03, 0.02]))
    pred = torch.zeros_like(target)  # always the majority class
    m = metrics_from_confusion(confusion_matrix(pred, target, 4, 255))
    assert m.pixel_accuracy > 0.88
    assert m.miou < 0.25  # background IoU ~0.9, three rare classes at 0
    assert m.fw_iou > 0.8  # frequency weighting hides the failure too: report both


def test_per_image_scores_reduce_per_image_first() -> None:
    # image 0: a big easy image; image 1: a small object missed entirely
    target = torch.zeros(2, 10, 10, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, :5] = 1
    pred[0, :5] = 1
    target[1, 0, 0] = 1
    cms = per_image_confusion(pred, target, 2, 255).numpy()
    iou, dice = per_image_scores(cms)
    assert iou[0].tolist() == [1.0, 1.0]
    assert iou[1, 0] == pytest.approx(99 / 100) and iou[1, 1] == 0.0
    assert dice[1, 1] == 0.0
    per_image = image_mean(iou)
    assert per_image.tolist() == pytest.approx([1.0, 0.495])
    # dataset mIoU weighs the missed pixel by its size; the per-image mean by its image
    assert metrics_from_confusion(cms.sum(0)).miou == pytest.approx((149 / 150 + 50 / 51) / 2)
    assert per_image.mean() == pytest.approx(0.7475)
    # a class in neither truth nor prediction of an image is NaN and does not count
    iou3, _ = per_image_scores(per_image_confusion(pred, target, 3, 255).numpy())
    assert np.isnan(iou3[:, 2]).all() and image_mean(iou3).tolist() == pytest.approx([1.0, 0.495])


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("metrics")
    images, masks = write_toy_dataset(root / "val", 11, seed=3)
    torch.manual_seed(0)
    model = build_model("unet", len(TOY_CLASSES), {"base_channels": 4, "depth": 2})
    for p in model.parameters():  # random but varied predictions: every class gets some pixels
        p.data.normal_(0, 0.5)
    save_model_state(model, root / "model.pt")
    return root / "model.pt", images, masks


def _evaluate(checkpoint: Path, images: list[str], masks: list[str], batch_size: int) -> Evaluation:
    from workers import load_checkpoint

    ds = SegmentationDataset(images, masks, ClassInfo(TOY_CLASSES), (32, 32))
    return evaluate_dataset(
        load_checkpoint(checkpoint), ds, len(TOY_CLASSES), 255, torch.device("cpu"), batch_size=batch_size
    )


def _assert_same(a: Evaluation, b: Evaluation) -> None:
    assert np.array_equal(a.confusion, b.confusion)
    np.testing.assert_array_equal(np.isnan(a.iou), np.isnan(b.iou))
    np.testing.assert_allclose(a.iou, b.iou, equal_nan=True)
    np.testing.assert_allclose(a.dice, b.dice, equal_nan=True)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)


def test_evaluation_does_not_depend_on_the_batch_size(toy_model) -> None:
    checkpoint, images, masks = toy_model
    runs = [_evaluate(checkpoint, images, masks, b) for b in (1, 3, 8)]
    assert (runs[0].confusion.sum(0) > 0).sum() >= 2  # not a constant prediction
    assert runs[0].iou.shape == (11, len(TOY_CLASSES)) and runs[0].loss.shape == (11,)
    for other in runs[1:]:
        _assert_same(runs[0], other)
    m = metrics_from_confusion(runs[0].confusion)
    assert m.num_pixels == 11 * 32 * 32


def _evaluate_in_ray_worker(config: dict) -> list[dict]:
    import ray.train
    import torch.distributed as dist

    torch.set_num_threads(1)
    assert dist.get_world_size() == ray.train.get_context().get_world_size() == 2
    out = []
    for batch_size in (1, 3, 8):
        ev = _evaluate(config["checkpoint"], config["images"], config["masks"], batch_size)
        out.append({"confusion": ev.confusion, "loss": ev.loss, "iou": ev.iou, "dice": ev.dice})
    return out


@pytest.mark.ray
def test_two_ddp_workers_give_the_numbers_of_one_process(ray_cluster: None, toy_model, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    checkpoint, images, masks = toy_model
    single = _evaluate(checkpoint, images, masks, batch_size=4)
    trainer = TorchTrainer(
        _evaluate_in_ray_worker,
        train_loop_config={"checkpoint": str(checkpoint), "images": images, "masks": masks},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="metrics-ddp", storage_path=str(tmp_path)),
    )
    for run in trainer.fit().return_value:  # 11 images: rank shards of 6 and 5
        _assert_same(single, Evaluation(**run))
