"""Segmentation metrics with an explicit reduction.

Dataset metrics come from one confusion matrix accumulated over the whole validation set (and
summed across DDP ranks), never from averaging per-batch scores: a per-batch mean weights small
batches like large ones and changes with the batch size and the number of workers.

Per-image metrics are a separate table: IoU and Dice of every image and class, reduced per image
first (mean over the classes present in that image) and then averaged over images. They answer
"how good is a typical image", which the dataset numbers (dominated by large images and large
classes) do not.

Conventions, used everywhere here:

- ``cm[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p``; pixels equal to the
  ignore index are skipped.
- A class is *present* when it occurs in the ground truth or in the prediction (its union is
  non-zero). Per-class scores of absent classes are NaN and means skip them, so a class that does
  not occur is neither a success nor a failure. A class that is predicted but absent from the
  truth scores IoU 0 (false positives count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SegmentationMetrics",
    "confusion_matrix",
    "image_mean",
    "iou_from_confusion",
    "metrics_from_confusion",
    "per_image_confusion",
    "per_image_scores",
]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 ``[C, C]``, rows = ground truth, columns = prediction; ignored pixels are skipped.

    ``pred``, ``target``: integer tensors of the same shape (any), class ids ``0..C-1``; ``target``
    may also hold ``ignore_index``.
    """
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 ``[N, C, C]``: one confusion matrix per image of ``pred``, ``target`` ``[N, H, W]``."""
    n = pred.shape[0]
    valid = target != ignore_index
    image = torch.arange(n, device=pred.device).view(n, *([1] * (pred.dim() - 1))).expand_as(pred)
    idx = (image[valid] * num_classes + target[valid].long()) * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=n * num_classes * num_classes).reshape(n, num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def per_image_scores(cms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image IoU and Dice from per-image confusion matrices ``[N, C, C]``.

    Returns ``(iou, dice)``, each float64 ``[N, C]``, NaN where the class is absent from both the
    image's truth and its prediction.
    """
    cms = cms.astype(np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    gt = cms.sum(2)
    pr = cms.sum(1)
    return _ratio(tp, gt + pr - tp), _ratio(2 * tp, gt + pr)


@dataclass(frozen=True)
class SegmentationMetrics:
    """Dataset metrics of one confusion matrix; per-class arrays are float64 ``[C]``."""

    iou: np.ndarray
    """TP / (TP + FP + FN); NaN for a class absent from truth and prediction."""
    dice: np.ndarray
    """2 TP / (2 TP + FP + FN) (F1); NaN where IoU is NaN."""
    precision: np.ndarray
    """TP / (TP + FP); NaN for a class never predicted."""
    recall: np.ndarray
    """TP / (TP + FN); NaN for a class absent from the truth."""
    frequency: np.ndarray
    """Share of the (non-ignored) ground-truth pixels in each class; sums to 1."""
    miou: float
    """Mean IoU over the present classes (0.0 for an empty matrix)."""
    fw_iou: float
    """Frequency-weighted IoU: sum of frequency x IoU (classes absent from the truth weigh 0)."""
    mean_dice: float
    pixel_accuracy: float
    """Correct pixels / all non-ignored pixels."""
    num_pixels: int

    def as_dict(self, names: tuple[str, ...] | list[str] | None = None, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix + key: float}``: the scalars, then ``iou_<name>``, ``dice_<name>``,
        ``precision_<name>``, ``recall_<name>`` per class (``<name>`` = class index without names)."""
        labels = list(names) if names is not None else [str(i) for i in range(len(self.iou))]
        out = {
            f"{prefix}miou": self.miou,
            f"{prefix}fw_iou": self.fw_iou,
            f"{prefix}mean_dice": self.mean_dice,
            f"{prefix}pixel_accuracy": self.pixel_accuracy,
        }
        for key in ("iou", "dice", "precision", "recall"):
            values = getattr(self, key)
            out.update({f"{prefix}{key}_{label}": float(v) for label, v in zip(labels, values, strict=True)})
        return out


def metrics_from_confusion(cm: np.ndarray | torch.Tensor) -> SegmentationMetrics:
    """All dataset metrics of a confusion matrix ``[C, C]`` (rows truth, columns prediction)."""
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(1)
    pr = cm.sum(0)
    total = cm.sum()
    iou = _ratio(tp, gt + pr - tp)
    dice = _ratio(2 * tp, gt + pr)
    frequency = gt / total if total > 0 else np.zeros_like(gt)
    present = np.isfinite(iou)
    miou = float(iou[present].mean()) if present.any() else 0.0
    return SegmentationMetrics(
        iou=iou,
        dice=dice,
        precision=_ratio(tp, pr),
        recall=_ratio(tp, gt),
        frequency=frequency,
        miou=miou,
        fw_iou=float(np.nansum(frequency * np.nan_to_num(iou))),
        mean_dice=float(dice[present].mean()) if present.any() else 0.0,
        pixel_accuracy=float(tp.sum() / total) if total > 0 else 0.0,
        num_pixels=int(total),
    )


def iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-class IoU (NaN for a class absent from both truth and prediction), mIoU over present
    classes, and pixel accuracy. A shorthand for :func:`metrics_from_confusion`."""
    m = metrics_from_confusion(cm)
    return m.iou, m.miou, m.pixel_accuracy


def image_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the classes present in each image: ``[N, C]`` -> float64 ``[N]`` (NaN for an
    image with no class present, i.e. every pixel ignored)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    count = finite.sum(1)
    total = np.where(finite, values, 0.0).sum(1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
