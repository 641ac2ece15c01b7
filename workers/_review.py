"""Label-quality review and data-quality columns, computed per image inside Ray Data workers.

``label_issue_columns`` scores how likely a labeled mask is wrong under the current model: the
share of labeled pixels where the model is confident and disagrees with the label (a large share
on an image the model otherwise handles well points at a bad label, not a hard image), and a
softmin over pixels of the model's probability of the given label (low = some region of the label
is implausible). ``quality_columns`` describes the image itself (brightness, contrast, sharpness)
and ``object_columns`` the objects per class in a mask (the label, or the prediction).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

LABEL_ISSUE = "label_issue"
"""Share of labeled pixels where the model is confident (p >= CONFIDENT) and disagrees, in [0, 1]."""
LABEL_SELF_CONFIDENCE = "label_self_confidence"
"""Softmin over labeled pixels of p(given label), in [0, 1]; low = part of the label looks wrong."""
QUALITY_COLUMNS = ("quality_brightness", "quality_contrast", "quality_sharpness")
CONFIDENT = 0.9
SOFTMIN_TEMPERATURE = 0.1


def label_issue_columns(probs: torch.Tensor, label: np.ndarray, ignore_index: int) -> dict[str, float]:
    """``probs``: float [C, H, W] softmax of one image; ``label``: int [H, W] class ids."""
    target = torch.as_tensor(label, dtype=torch.int64)
    valid = (target != ignore_index) & (target < probs.shape[0])
    if not bool(valid.any()):
        return {LABEL_ISSUE: float("nan"), LABEL_SELF_CONFIDENCE: float("nan")}
    conf, pred = probs.max(0)
    disagree = valid & (pred != target) & (conf >= CONFIDENT)
    p_label = probs.gather(0, target.clamp(0, probs.shape[0] - 1)[None])[0][valid].double()
    weights = torch.softmax(-p_label / SOFTMIN_TEMPERATURE, dim=0)
    return {
        LABEL_ISSUE: float(disagree.sum()) / float(valid.sum()),
        LABEL_SELF_CONFIDENCE: float((weights * p_label).sum()),
    }


def quality_columns(image: np.ndarray) -> dict[str, float]:
    """``image``: uint8 [H, W, 3] RGB -> brightness and contrast (mean and std of gray, in [0, 1])
    and sharpness (variance of the Laplacian of gray in [0, 1] units)."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return {
        "quality_brightness": float(gray.mean()),
        "quality_contrast": float(gray.std()),
        "quality_sharpness": float(cv2.Laplacian(gray, cv2.CV_32F).var()),
    }


def object_columns(mask: np.ndarray, num_classes: int, ignore_index: int, source: str) -> dict[str, float]:
    """Objects (8-connected components) and area share of each class in ``mask`` [H, W].

    Columns ``<source>_objects_<c>`` and ``<source>_area_<c>`` (``source``: ``label`` or ``pred``).
    """
    out: dict[str, float] = {}
    valid = max(int((mask != ignore_index).sum()), 1)
    for c in range(num_classes):
        region = (mask == c).astype(np.uint8)
        count = cv2.connectedComponents(region, connectivity=8)[0] - 1 if region.any() else 0
        out[f"{source}_objects_{c}"] = float(count)
        out[f"{source}_area_{c}"] = float(region.sum()) / valid
    return out


def relate_to_iou(quality: dict[str, np.ndarray], iou: np.ndarray, bins: int = 5) -> dict[str, dict[str, float]]:
    """Pearson correlation and mutual information (nats, quantile bins) of each column with IoU.

    ``quality``: column name -> float [N]; ``iou``: float [N] per-image IoU. NaN rows are skipped.
    """
    out: dict[str, dict[str, float]] = {}
    for name, values in quality.items():
        x = np.asarray(values, dtype=np.float64)
        y = np.asarray(iou, dtype=np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if len(x) < 3 or x.std() == 0 or y.std() == 0:
            continue
        corr = float(np.corrcoef(x, y)[0, 1])
        out[name] = {"pearson": corr, "mutual_information": _mutual_information(x, y, bins), "n": float(len(x))}
    return out


def _mutual_information(x: np.ndarray, y: np.ndarray, bins: int) -> float:
    def digitize(v: np.ndarray) -> np.ndarray:
        edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
        return np.searchsorted(edges, v, side="right")

    bx, by = digitize(x), digitize(y)
    joint = np.zeros((bx.max() + 1, by.max() + 1))
    np.add.at(joint, (bx, by), 1.0)
    joint /= joint.sum()
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (px @ py)[nz])).sum())
