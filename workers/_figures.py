"""Figures of what each round bought, and the numbers behind them.

Pure functions: each takes arrays, writes one image (PNG; the photo grid of :func:`plot_thumbnails`
as JPEG when its path ends in .jpg) with matplotlib's Agg canvas and no pyplot state, so it is safe
in threads and Ray workers, and returns its path. The helpers that read files
(:func:`count_class_pixels`, :func:`predict_masks`) decode only the few samples they are given.

Class colours are fixed by class index (``class_colors``), the same in every figure and round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._data import ClassInfo

__all__ = [
    "class_colors",
    "count_class_pixels",
    "learning_curve_auc",
    "plot_class_distribution",
    "plot_confusion_matrix",
    "plot_learning_curve",
    "plot_thumbnails",
    "plot_weights_histogram",
    "predict_masks",
]

Curve = tuple[Sequence[float], Sequence[float]]
"""(labeled counts, val mIoU), one point per round."""

_DPI = 110
# tab20 reordered so the first classes get well separated colours; cycles beyond 20 classes.
_PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)


def class_colors(num_classes: int) -> np.ndarray:
    """uint8 ``[num_classes, 3]`` RGB, one fixed colour per class index."""
    return _PALETTE[np.arange(num_classes) % len(_PALETTE)]


def learning_curve_auc(labeled_counts: Sequence[float] | np.ndarray, mious: Sequence[float] | np.ndarray) -> float:
    """Area under the learning curve, normalised by its labeled-count range.

    Trapezoids of val mIoU over the labeled count (points sorted by count, non-finite mIoU dropped),
    divided by ``max(count) - min(count)``: the mean mIoU over the range, in [0, 1], comparable
    between runs with different budgets. One point gives its mIoU; none gives NaN.
    """
    x = np.asarray(labeled_counts, dtype=np.float64)
    y = np.asarray(mious, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"labeled_counts and mious differ in length: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return float("nan")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    span = float(x[-1] - x[0])
    if span <= 0:
        return float(y.mean())
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0) / span)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG, or as JPEG (quality 85) when ``path`` ends in .jpg: photographs in PNG
    take ~10x the bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        fig.savefig(path, format="jpeg", pil_kwargs={"quality": 85})
    else:
        fig.savefig(path, format="png")
    return path


def plot_learning_curve(path: str | Path, curves: Mapping[str, Curve], *, title: str = "") -> Path:
    """Val mIoU against the labeled count, one line per entry of ``curves`` (the first is the run
    itself, drawn boldest; e.g. ``{"entropy": (counts, mious), "random baseline": (...)}``). The
    legend shows each curve's normalised area (:func:`learning_curve_auc`)."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for i, (name, (counts, mious)) in enumerate(curves.items()):
        x = np.asarray(counts, dtype=np.float64)
        y = np.asarray(mious, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        auc = learning_curve_auc(x, y)
        label = f"{name} (AUC {auc:.3f})" if math.isfinite(auc) else name
        ax.plot(x[order], y[order], marker="o", linewidth=2.4 if i == 0 else 1.4,
                linestyle="-" if i == 0 else "--", label=label, zorder=3 if i == 0 else 2)
    ax.set_xlabel("labeled samples (the round's training set)")
    ax.set_ylabel("val mIoU")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower right")
    ax.set_title(title or "learning curve")
    return _save(fig, path)


def plot_confusion_matrix(
    path: str | Path, confusion: Sequence[Sequence[float]] | np.ndarray, class_names: Sequence[str], *, title: str = ""
) -> Path:
    """The confusion matrix ``[C, C]`` (rows truth, columns prediction), each row normalised to the
    share of that class's pixels, annotated in percent; the row's pixel count is on the y label."""
    cm = np.asarray(confusion, dtype=np.float64)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {n} classes")
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    size = 2.4 + 0.55 * n
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for t in range(n):
        for p in range(n):
            ax.text(p, t, f"{100 * share[t, p]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), [f"{name} ({int(totals[i, 0]):,} px)" for i, name in enumerate(class_names)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    fig.colorbar(im, ax=ax, label="share of the true class's pixels")
    ax.set_title(title or "validation confusion matrix (% of each row)")
    return _save(fig, path)


def plot_class_distribution(
    path: str | Path,
    pixels_per_class: Sequence[float] | np.ndarray,
    class_names: Sequence[str],
    *,
    images_per_class: Sequence[float] | np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Bars of the labeled set's pixels per class (share in percent, count on the bar) and, when
    given, the number of labeled images that contain each class."""
    pixels = np.asarray(pixels_per_class, dtype=np.float64)
    total = pixels.sum()
    share = pixels / total if total > 0 else np.zeros_like(pixels)
    panels = 1 if images_per_class is None else 2
    fig = _figure(4.2 + 0.5 * len(class_names) * panels, 3.8)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    colors = class_colors(len(class_names)) / 255.0
    x = np.arange(len(class_names))
    axes[0].bar(x, 100 * share, color=colors)
    for i, v in enumerate(pixels):
        axes[0].text(i, 100 * share[i], f"{int(v):,}", ha="center", va="bottom", fontsize=7)
    axes[0].set_ylabel("% of labeled pixels")
    axes[0].set_title("pixels")
    if images_per_class is not None:
        images = np.asarray(images_per_class, dtype=np.float64)
        axes[1].bar(x, images, color=colors)
        axes[1].set_ylabel("labeled images containing the class")
        axes[1].set_title("images")
    for ax in axes:
        ax.set_xticks(x, list(class_names), rotation=45, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "labeled set: class distribution")
    return _save(fig, path)


def plot_weights_histogram(path: str | Path, weights: Sequence[float] | np.ndarray, *, title: str = "") -> Path:
    """Histogram of the labeled samples' training weights (0 = never drawn)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w[np.isfinite(w)]
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot()
    if w.size:
        low, high = float(w.min()), float(w.max())
        # all equal (the default: every labeled sample weighs 1): one bar centred on the value
        bins: Any = 20 if high > low else [low - 0.5, low + 0.5]
        ax.hist(w, bins=bins, color="#4c72b0", edgecolor="white")
        ax.set_title(title or f"training weights of {w.size} labeled samples (mean {w.mean():.3g})")
    else:
        ax.set_title(title or "training weights: no labeled samples")
    ax.set_xlabel("weight")
    ax.set_ylabel("samples")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _overlay(image: np.ndarray, mask: np.ndarray, colors: np.ndarray, ignore_index: int, alpha: float = 0.55) -> np.ndarray:
    """uint8 ``[H, W, 3]``: ``mask`` (class ids, resized by nearest neighbour to the image) blended
    over ``image``; ignored pixels and ids without a colour keep the image."""
    import cv2

    h, w = image.shape[:2]
    if mask.shape != (h, w):
        mask = cv2.resize(mask.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    valid = (mask != ignore_index) & (mask >= 0) & (mask < len(colors))
    out = image.astype(np.float32).copy()
    out[valid] = (1 - alpha) * out[valid] + alpha * colors[mask[valid]].astype(np.float32)
    return out.astype(np.uint8)


def plot_thumbnails(
    path: str | Path,
    images: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray | None],
    class_names: Sequence[str],
    *,
    labels: Sequence[np.ndarray | None] | None = None,
    sam_masks: Sequence[np.ndarray | None] | None = None,
    captions: Sequence[str] | None = None,
    ignore_index: int = 255,
    title: str = "",
) -> Path:
    """A grid, one row per selected image: the image, its predicted mask, the label it received
    (``labels``) and its SAM mask (``sam_masks``), masks blended over the image in the class colours.

    ``images``: uint8 ``[H, W, 3]``; masks: int ``[h, w]`` class ids (resized to the image).
    ``sam_masks`` is the hook for SAM-assisted labeling: pass it once a SAM mask exists for the
    samples; until then (None) the column is left out. A None entry in any mask list leaves its
    cell blank. ``captions`` (e.g. sample id and the strategy's reason) title each row.
    """
    n = len(images)
    if len(predictions) != n:
        raise ValueError(f"{len(predictions)} predictions for {n} images")
    columns: list[tuple[str, Sequence[np.ndarray | None] | None]] = [("image", None), ("predicted", predictions)]
    if labels is not None:
        columns.append(("label", labels))
    if sam_masks is not None:
        columns.append(("SAM", sam_masks))
    for name, masks in columns[1:]:
        if masks is not None and len(masks) != n:
            raise ValueError(f"{len(masks)} {name} masks for {n} images")
    colors = class_colors(len(class_names))
    aspect = images[0].shape[1] / images[0].shape[0] if n else 4 / 3
    cell = 1.6  # inches per image
    fig = _figure(cell * aspect * len(columns) + 0.4, cell * max(n, 1) + 1.0)
    if n == 0:
        fig.suptitle(title or "no selected images")
        return _save(fig, path)
    axes = fig.subplots(n, len(columns), squeeze=False)
    for r in range(n):
        for c, (name, masks) in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if masks is None:
                ax.imshow(images[r])
            elif masks[r] is not None:
                ax.imshow(_overlay(images[r], np.asarray(masks[r]), colors, ignore_index))
            else:
                ax.text(0.5, 0.5, f"no {name} mask", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0 and captions is not None:
                ax.set_ylabel(captions[r], fontsize=6, rotation=0, ha="right", va="center", wrap=True)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[i] / 255.0, label=name) for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=7)
    fig.suptitle(title or f"{n} selected images")
    return _save(fig, path)


def count_class_pixels(mask_paths: Sequence[str], classes: ClassInfo) -> np.ndarray:
    """int64 ``[N, C]``: pixels of each class in each mask, at the mask's own resolution (ignored
    pixels are not counted). Decodes every mask given: pass only the ones not counted before."""
    from ._data import load_mask

    out = np.zeros((len(mask_paths), classes.num_classes), dtype=np.int64)
    for i, p in enumerate(mask_paths):
        m = load_mask(str(p), classes)
        valid = m[(m >= 0) & (m < classes.num_classes)]
        out[i] = np.bincount(valid.ravel(), minlength=classes.num_classes)[: classes.num_classes]
    return out


def predict_masks(
    checkpoint_path: str, image_paths: Sequence[str], size: tuple[int, int], batch_size: int = 8
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Decode ``image_paths`` at ``size`` (height, width) and predict their masks with the model in
    ``checkpoint_path`` on CPU. Returns (uint8 ``[H, W, 3]`` images, int64 ``[H, W]`` class ids).
    For a handful of thumbnails; the pool is scored by ``score_pool``."""
    import torch

    from ._data import load_image
    from ._models import load_checkpoint
    from ._train import to_tensor

    images = [load_image(str(p), size=size) for p in image_paths]
    if not images:
        return [], []
    model = load_checkpoint(checkpoint_path).eval()
    preds: list[np.ndarray] = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([to_tensor(im) for im in images[i : i + batch_size]])
            preds.extend(model(x).argmax(1).numpy().astype(np.int64))
    return images, preds
