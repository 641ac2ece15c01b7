"""Training worker: fit a segmentation model on the labeled set with Ray Train (DDP).

The public call is :func:`train`. The per-worker loop (:func:`train_loop`), the weighted
distributed sampler and the evaluation (:func:`evaluate_dataset`) are plain functions and classes
that tests call without Ray; under Ray Train they read rank and world size from
``torch.distributed``.

What a run does, on every rank:

1. counts the labeled set's class pixels (rank shards, summed) and derives class weights;
2. trains for ``epochs`` (AdamW or SGD, linear warm-up then poly or cosine decay, gradient
   clipping, mixed precision on GPU), drawing samples by weight;
3. after every epoch, evaluates the validation set: one confusion matrix summed over ranks, and a
   per-image table gathered from the ranks; keeps the best epoch by validation mIoU and stops
   early after ``early_stopping_patience`` epochs without improvement;
4. restores the best epoch's weights and computes the loss and IoU of every labeled sample
   (the per-sample training signals).

Under Ray Train every epoch reports a checkpoint with the best model so far and the state to go on
from (``resume.pt``); when a worker dies, Ray Train restarts the worker group (up to
``max_failures`` times) and the loop resumes after the last reported epoch, ending with the result
the uninterrupted run would have given.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import _io
from ._augment import IMAGENET_MEAN as _MEAN
from ._augment import IMAGENET_STD as _STD
from ._augment import Augmenter, AugmentSpec, normalize
from ._data import ClassInfo, image_hw, load_image, load_mask, resize_image
from ._losses import (
    LossSpec,
    SegmentationLoss,
    choose_loss,
    class_weights_from_counts,
    cross_entropy_per_image,
    mask_class_counts,
    pixel_statistics,
    rare_image_factors,
)
from ._metrics import (
    confusion_matrix,
    image_mean,
    iou_from_confusion,
    metrics_from_confusion,
    per_image_confusion,
    per_image_scores,
)
from ._models import _read_checkpoint, build_model, load_model_state, save_model_state
from ._progress import write_progress

__all__ = [
    "Evaluation",
    "SegmentationDataset",
    "TrainResult",
    "TrainSpec",
    "WeightedDistributedSampler",
    "confusion_matrix",
    "evaluate_dataset",
    "iou_from_confusion",
    "lr_factor",
    "train",
    "train_loop",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array(_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(_STD, dtype=np.float32)
CHECKPOINT_FILE = "model.pt"
RESUME_FILE = "resume.pt"
"""Beside ``model.pt`` in every epoch's Ray Train checkpoint: what a restarted run resumes from."""
RESUME_FORMAT = 1
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("poly", "cosine")
POLY_POWER = 0.9


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W], ImageNet-normalised."""
    x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def load_pair(
    image_path: str, mask_path: str, classes: ClassInfo, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode an image and its mask, check they match, resize both to ``size`` (height, width).

    Returns (uint8 [H, W, 3], int64 [H, W] class ids with ``classes.ignore_index`` kept).
    """
    if _io.is_uri(image_path):  # one download of the image: decoded once, its size checked against the mask
        full = load_image(image_path)
        mask = load_mask(mask_path, classes, size=size, expected_hw=full.shape[:2])
        return resize_image(full, size), mask
    # image_hw reads a PNG's size from its header: the image is decoded once, not twice.
    mask = load_mask(mask_path, classes, size=size, expected_hw=image_hw(image_path))
    return load_image(image_path, size=size), mask


DECODE_CACHE_MB = int(os.environ.get("SHOAL_DECODE_CACHE_MB", "512"))
"""Decoded training and validation pairs a worker process keeps across rounds (MiB): a later
round decodes only the images labeled since (``SHOAL_DECODE_CACHE_MB``; 0 = off)."""
_DECODED: collections.OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
_DECODED_BYTES = [0]


def _decoded_pair(image_path: str, mask_path: str, classes: ClassInfo,
                  size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded (uint8 [3, H, W], int64 [H, W]) pair, from this process's cache when the files
    have not changed since (same size and modification time)."""
    try:  # objects in a bucket are not rewritten under the same name: their URI is their key
        stamps = () if _io.is_uri(image_path) else (os.stat(image_path).st_mtime_ns, os.stat(mask_path).st_mtime_ns)
        key: tuple[Any, ...] | None = (image_path, mask_path, tuple(size), classes.num_classes, classes.ignore_index,
                                       *stamps)
    except OSError:
        key = None  # load_pair names the missing file
    if key is not None and key in _DECODED:
        _DECODED.move_to_end(key)
        return _DECODED[key]
    image, mask = load_pair(image_path, mask_path, classes, size)
    pair = (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(mask))
    if key is not None and DECODE_CACHE_MB > 0:
        _DECODED[key] = pair
        _DECODED_BYTES[0] += pair[0].nbytes + pair[1].nbytes
        while _DECODED_BYTES[0] > DECODE_CACHE_MB * 2**20 and _DECODED:
            _, (a, b) = _DECODED.popitem(last=False)
            _DECODED_BYTES[0] -= a.nbytes + b.nbytes
    return pair


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Decodes (image, mask) pairs from paths inside the worker; caches decoded pairs in memory.

    ``dataset[i]`` is ``(x float32 [3, h, w] normalised, y int64 [h, w], i)``, augmented when an
    ``augmenter`` is given. The cache holds uint8 images, shared by :meth:`without_augment` views.
    """

    def __init__(
        self,
        image_paths: Sequence[str],
        mask_paths: Sequence[str],
        classes: ClassInfo,
        size: tuple[int, int],
        cache: bool = True,
        augmenter: Augmenter | None = None,
    ) -> None:
        if len(image_paths) != len(mask_paths):
            raise ValueError("image_paths and mask_paths differ in length")
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths)
        self.classes = classes
        self.size = size
        self.augmenter = augmenter
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.image_paths)

    def pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded sample: uint8 ``[3, H, W]`` RGB and int64 ``[H, W]`` class ids."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        if self._cache is None:
            image, mask = load_pair(self.image_paths[index], self.mask_paths[index], self.classes, self.size)
            return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(mask)
        pair = _decoded_pair(self.image_paths[index], self.mask_paths[index], self.classes, self.size)
        self._cache[index] = pair
        return pair

    def without_augment(self) -> SegmentationDataset:
        """A view of the same samples (and cache) without augmentation, for evaluation."""
        other = copy.copy(self)  # shallow: the cache dict is shared
        other.augmenter = None
        return other

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = self.pair(index)
        if self.augmenter is not None:
            x, y = self.augmenter(image, mask)
        else:
            x, y = image.float() / 255.0, mask
        return normalize(x), y.long(), index


class WeightedDistributedSampler(DistributedSampler[int]):
    """Draws ``num_samples`` indices with replacement, proportional to ``weights``, across ranks.

    Every rank draws the same seeded multinomial sample for the epoch and keeps a disjoint stride of
    it, so the union over ranks follows the weights exactly as one process would. Weight 0 is never
    drawn. Subclassing ``DistributedSampler`` keeps Ray Train from swapping it for a uniform one.
    """

    def __init__(
        self,
        weights: Sequence[float],
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.ndim != 1 or len(w) == 0:
            raise ValueError("weights must be a non-empty 1-D sequence")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and >= 0")
        if float(w.sum()) <= 0:
            raise ValueError("all sample weights are 0: nothing to train on")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.weights = w
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        # Round up so every rank takes the same number of steps (DDP needs it).
        self.num_samples = math.ceil(num_samples / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(drawn[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@dataclass(frozen=True)
class TrainSpec:
    """Everything a worker needs; plain data so it pickles to Ray workers."""

    model_name: str
    model_options: dict[str, Any]
    class_names: tuple[str, ...]
    ignore_index: int
    image_size: tuple[int, int]
    train_images: list[str]
    train_masks: list[str]
    train_weights: list[float]
    val_images: list[str]
    val_masks: list[str]
    epochs: int
    samples_per_epoch: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    output_dir: str
    use_gpu: bool = False
    checkpoint_via_report: bool = False
    """True: the best model goes to Ray Train's checkpoint storage (worker processes, possibly on
    other nodes). False: rank 0 writes it to ``output_dir`` itself (in-process runs)."""
    train_ids: list[str] | None = None
    """Sample ids of ``train_images`` (for the per-sample signals); None = the image paths."""
    val_ids: list[str] | None = None
    """Sample ids of ``val_images`` (for the per-image table); None = the image paths."""
    loss: LossSpec = field(default_factory=LossSpec)
    optimizer: str = "adamw"
    """``adamw`` or ``sgd`` (with ``momentum``)."""
    momentum: float = 0.9
    schedule: str = "poly"
    """Learning-rate decay after warm-up: ``poly`` (power 0.9) or ``cosine``, both to 0."""
    warmup_steps: int = 0
    """Optimiser steps of linear warm-up from lr / warmup_steps to lr."""
    grad_clip: float | None = 5.0
    """Maximum global gradient norm; None = no clipping."""
    amp: bool = True
    """Mixed precision (autocast) on GPU; ignored on CPU."""
    early_stopping_patience: int | None = None
    """Stop after this many epochs without a better validation mIoU; None = run every epoch."""
    init_checkpoint: str | None = None
    """Start from these weights (a checkpoint of the same model and classes); None = from scratch."""
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    val_batch_size: int | None = None
    """Batch size of evaluation passes; None = ``batch_size``. Results do not depend on it."""
    progress_dir: str | None = None
    """Where rank 0 writes ``train.json`` (epoch, step, loss, last val mIoU) for the driver and
    ``shoal status`` (``workers._progress``); None = nowhere."""
    fault_injection: tuple[str, int] | None = None
    """Tests only: ``(directory, epoch)``. Under Ray Train, rank 0 appends ``<epoch> <pid> <time>`` to
    ``directory/epochs.log`` after reporting each epoch; after reporting ``epoch`` and once Ray
    Train has committed its checkpoint, it writes its pid to ``directory/paused.pid`` and waits to
    be killed. A restarted worker finds that file and trains on."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        for name, ids, paths in (("train_ids", self.train_ids, self.train_images), ("val_ids", self.val_ids, self.val_images)):
            if ids is not None and len(ids) != len(paths):
                raise ValueError(f"{name} has {len(ids)} entries for {len(paths)} images")


@dataclass
class TrainResult:
    checkpoint_path: str
    """The best epoch's model (``workers.load_checkpoint`` reads it)."""
    val_miou: float
    val_pixel_accuracy: float
    val_iou_per_class: list[float]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    # Added fields below; all have defaults so older readers and callers keep working.
    val_fw_iou: float = float("nan")
    val_mean_dice: float = float("nan")
    val_image_miou: float = float("nan")
    """Per-image mIoU (classes present in the image) averaged over images."""
    val_dice_per_class: list[float] = field(default_factory=list)
    val_precision_per_class: list[float] = field(default_factory=list)
    val_recall_per_class: list[float] = field(default_factory=list)
    val_confusion: list[list[int]] = field(default_factory=list)
    """The best epoch's confusion matrix over the whole validation set, rows = truth."""
    val_per_image: list[dict[str, Any]] = field(default_factory=list)
    """One row per validation image: ``sample_id``, ``loss`` (mean pixel cross-entropy), ``miou``
    and ``mdice`` (means over the classes present in the image), then
    ``iou_<class>`` and ``dice_<class>`` (NaN where the class is in neither truth nor prediction)."""
    class_pixel_frequency: list[float] = field(default_factory=list)
    """Share of the labeled (non-ignored, sample-weighted) pixels in each class."""
    class_weights: list[float] | None = None
    """The class weights the loss used; None without class weighting."""
    train_ids: list[str] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    """Mean pixel cross-entropy (nats, no class weights, whatever the training loss) of each
    labeled sample (``train_ids`` order) under the best model, unaugmented."""
    train_iou: list[float] = field(default_factory=list)
    """IoU of each labeled sample, the mean over the classes present in that image."""
    epochs_run: int = 0
    stopped_early: bool = False
    resumed_at_epoch: int | None = None
    loss_choice: dict[str, Any] = field(default_factory=dict)
    """The loss trained with and why (``workers._losses.choose_loss``): ``recipe`` (configured or
    imbalance), ``loss``, ``class_weights``, ``rarest_class``, ``rarest_share``."""
    loop_seconds: float = float("nan")
    """Time inside the training loop itself (data, model, epochs, the final evaluation): the
    run's work; ``train_seconds`` minus this is what launching it cost."""
    """The epoch at which a restarted worker group (after a worker died) went on from the previous
    epoch's checkpoint, the last such restart; None = the run was not restarted."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (from ``1 / warmup_steps`` to 1), then ``poly``
    ``(1 - t) ** 0.9`` or ``cosine`` ``(1 + cos(pi t)) / 2`` with ``t`` the fraction of the
    remaining steps done.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(step - warmup_steps, span - 1) / span
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return (1.0 - t) ** POLY_POWER


@dataclass
class Evaluation:
    """A model's evaluation over a whole dataset (all ranks' shards put together)."""

    confusion: np.ndarray
    """int64 ``[C, C]``, rows = truth, summed over every image."""
    loss: np.ndarray
    """float64 ``[N]``: mean pixel cross-entropy of each image (nats, no class weights), in
    dataset order; NaN for an image with every pixel ignored."""
    iou: np.ndarray
    """float64 ``[N, C]``: IoU of each image and class, NaN where the class is absent."""
    dice: np.ndarray
    """float64 ``[N, C]``: Dice of each image and class, NaN where the class is absent."""

    @property
    def image_iou(self) -> np.ndarray:
        """float64 ``[N]``: each image's mean IoU over the classes present in it."""
        return image_mean(self.iou)


def _sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart in the last step)."""
    if not _distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def evaluate_dataset(
    model: torch.nn.Module,
    dataset: Dataset[Any],
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    *,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> Evaluation:
    """Evaluate ``model`` over every sample of ``dataset`` (items ``(x, y, index)``, unaugmented).

    Under DDP each rank takes a disjoint stride of the samples (no padding, no duplicates); the
    confusion matrices are summed and the per-image rows gathered, so every rank returns the same
    :class:`Evaluation`, identical for any batch size and number of ranks. ``model`` must be the
    unwrapped module (no DDP collectives in its forward).
    """
    rank, world = _world()
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    indices: list[int] = []
    losses: list[np.ndarray] = []
    cms: list[np.ndarray] = []
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
    with torch.no_grad():
        for x, y, index in DataLoader(shard, batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            with _autocast(device, autocast_dtype):
                logits = model(x)
            logits = logits.float()
            pred = logits.argmax(1)
            image_cms = per_image_confusion(pred, y, num_classes, ignore_index)
            cm += image_cms.sum(0)
            cms.append(image_cms.cpu().numpy())
            indices += [int(i) for i in index]
            losses.append(cross_entropy_per_image(logits, y, ignore_index).double().cpu().numpy())
    local = (
        indices,
        np.concatenate(losses) if losses else np.zeros(0),
        np.concatenate(cms) if cms else np.zeros((0, num_classes, num_classes), np.int64),
    )
    parts = [local]
    if _distributed():
        dist.all_reduce(cm)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        parts = gathered
    order = np.array([i for part in parts for i in part[0]], dtype=np.int64)
    loss = np.concatenate([part[1] for part in parts])
    all_cms = np.concatenate([part[2] for part in parts])
    by_index = np.argsort(order, kind="stable")
    iou, dice = per_image_scores(all_cms[by_index])
    return Evaluation(confusion=cm.cpu().numpy(), loss=loss[by_index], iou=iou, dice=dice)


def _class_counts(dataset: SegmentationDataset, num_classes: int, ignore_index: int) -> np.ndarray:
    """float64 [N, C]: each labeled image's class pixel counts; rank shards, summed across ranks."""
    rank, world = _world()
    counts = np.zeros((len(dataset), num_classes), np.float64)
    for i in range(rank, len(dataset), world):
        counts[i] = mask_class_counts(dataset.pair(i)[1], num_classes, ignore_index)
    if _distributed():
        shared = torch.from_numpy(counts)
        dist.all_reduce(shared)
        counts = shared.numpy()
    return counts


def _draw_weights(
    spec: TrainSpec, counts: np.ndarray
) -> tuple[LossSpec, dict[str, Any], np.ndarray | None, np.ndarray, np.ndarray]:
    """The run's loss, why (:func:`choose_loss`), the class weights, how often each image is drawn
    (its sample weight, times :func:`rare_image_factors` when the rare-class recipe is on; then the
    class weights are those of the images as drawn, as measured) and the labeled set's class pixels
    by sample weight."""
    weights = np.asarray(spec.train_weights, dtype=np.float64)
    labeled_pixels, image_pixels = pixel_statistics(counts, weights)
    pixels = labeled_pixels
    loss_spec, loss_choice = choose_loss(spec.loss, pixels, spec.class_names)
    if loss_choice["recipe"] == "imbalance" and spec.loss.imbalance_sampling == "rare_images":
        names = list(spec.class_names)
        rarest = names.index(loss_choice["rarest_class"])
        holding = counts[:, rarest] > 0
        before = float(weights[holding].sum() / weights.sum()) if weights.sum() > 0 else 0.0
        weights = weights * rare_image_factors(counts, labeled_pixels, spec.loss.imbalance_threshold,
                                               spec.loss.class_weight_cap)
        pixels, image_pixels = pixel_statistics(counts, weights)
        after = float(weights[holding].sum() / weights.sum()) if weights.sum() > 0 else 0.0
        loss_choice.update(sampling="rare_images", rare_images=int(holding.sum()), rare_draw_share_before=before,
                           rare_draw_share=after)
    class_weights = class_weights_from_counts(pixels, image_pixels, loss_spec.class_weights, loss_spec.class_weight_cap)
    return loss_spec, loss_choice, class_weights, weights, labeled_pixels


def _build_optimizer(spec: TrainSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def _autocast_dtype(spec: TrainSpec, device: torch.device) -> torch.dtype | None:
    if not spec.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(augmenter: Augmenter | None, device: torch.device) -> dict[str, Any]:
    """This process's random state (Python, NumPy, torch CPU and CUDA, the augmenter's generator)
    as plain data and tensors, so a resume state loads with ``weights_only=True``."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": np.asarray(np_state["state"]["key"]).tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "augment": augmenter.generator.get_state() if augmenter is not None else None,
    }


def _set_rng_state(state: dict[str, Any], augmenter: Augmenter | None, device: torch.device) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if augmenter is not None and state["augment"] is not None:
        augmenter.generator.set_state(state["augment"])


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _save_atomic(payload: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsynced and renamed over it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_resume_state(checkpoint_dir: str) -> dict[str, Any]:
    """The resume state of an epoch checkpoint written by :func:`train_loop`, with the best epoch's
    weights (from its ``model.pt``) under ``best_state``."""
    path = Path(checkpoint_dir) / RESUME_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; {checkpoint_dir} is not an epoch checkpoint of train_loop")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a training resume state of format {RESUME_FORMAT}")
    best = Path(checkpoint_dir) / CHECKPOINT_FILE
    state["best_state"] = _read_checkpoint(best)["state_dict"] if best.exists() else {}
    return state


def train_loop(
    spec: TrainSpec,
    report: Callable[[dict[str, float], str | None], None] | None = None,
    resume_from: str | None = None,
) -> dict[str, Any]:
    """Run the training loop on this worker (rank/world size from torch.distributed when set).

    ``report(metrics, checkpoint_dir)`` is called once per epoch by every rank. With
    ``spec.checkpoint_via_report``, rank 0's ``checkpoint_dir`` holds the best model so far
    (``model.pt``) and ``resume.pt``, everything a restarted run needs to go on after this epoch
    (weights, optimiser, schedule, step, early-stopping counters, history, the best epoch's
    evaluation and every rank's random state); otherwise, and on other ranks, it is None.

    ``resume_from``: such a checkpoint directory, of a run of the same spec and world size; the
    loop goes on at the next epoch and returns what the run would have returned uninterrupted.

    Returns plain data, the same on every rank: ``history`` (one dict per epoch), ``best_epoch``,
    ``epochs_run``, ``stopped_early``, ``resumed_at_epoch`` (None without ``resume_from``), the
    best epoch's validation ``val_confusion`` and per-image ``val_loss`` / ``val_iou`` /
    ``val_dice`` (dataset order), ``class_pixel_frequency``, ``class_weights`` and the per-sample
    ``train_loss`` / ``train_iou`` (``train_images`` order) under the best model.
    """
    loop_start = time.perf_counter()
    rank, world = _world()
    device = _device(spec.use_gpu)
    classes = ClassInfo(names=spec.class_names, ignore_index=spec.ignore_index)
    num_classes = len(spec.class_names)
    val_batch = spec.val_batch_size or spec.batch_size
    saved = _read_resume_state(resume_from) if resume_from is not None else None

    # The same initial weights on every rank and for any world size; the rest per rank.
    _seed_everything(spec.seed)
    if spec.init_checkpoint:
        model = load_model_state(spec.model_name, num_classes, spec.model_options, spec.init_checkpoint)
    else:
        model = build_model(spec.model_name, num_classes, spec.model_options)
    model = model.to(device)
    _seed_everything(spec.seed * 1000 + rank)

    augmenter = Augmenter(spec.augment, spec.ignore_index, seed=spec.seed * 1000 + rank) if spec.augment.active else None
    train_ds = SegmentationDataset(spec.train_images, spec.train_masks, classes, spec.image_size, augmenter=augmenter)
    val_ds = SegmentationDataset(spec.val_images, spec.val_masks, classes, spec.image_size)

    loss_spec, loss_choice, weights, draw, pixels = _draw_weights(
        spec, _class_counts(train_ds, num_classes, spec.ignore_index))
    sampler = WeightedDistributedSampler(draw.tolist(), spec.samples_per_epoch, world, rank, spec.seed)
    train_loader = DataLoader(train_ds, batch_size=spec.batch_size, sampler=sampler, drop_last=False)
    loss_fn = SegmentationLoss(loss_spec, num_classes, spec.ignore_index, weights).to(device)
    if rank == 0 and loss_choice["recipe"] == "imbalance":
        log.info("rare class %s holds %.3f%% of the labeled pixels: training with %s, %s class weights%s",
                 loss_choice["rarest_class"], 100 * loss_choice["rarest_share"], loss_spec.name, loss_spec.class_weights,
                 f", the {loss_choice['rare_images']} images holding it drawn {100 * loss_choice['rare_draw_share']:.0f}% "
                 "of the time"
                 if loss_choice.get("sampling") else "")
    if weights is not None and rank == 0:
        log.info("class weights (%s): %s", loss_spec.class_weights, np.round(weights, 3).tolist())

    if saved is not None:  # before DDP, which starts every rank from rank 0's weights
        model.load_state_dict(saved["model"])
    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = _build_optimizer(spec, model)
    total_steps = spec.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, spec.warmup_steps, spec.schedule)
    )
    amp_dtype = _autocast_dtype(spec, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    history: list[dict[str, float]] = []
    best_miou, best_epoch, since_best, step = -1.0, -1, 0, 0
    best_state: dict[str, torch.Tensor] = {}
    best_eval: Evaluation | None = None
    stopped_early = done = False
    start_epoch, resumed_at = 0, None
    # Rank 0 keeps the best model in a file of its own when every epoch's checkpoint goes through
    # `report`: each checkpoint carries a copy, so the latest one is complete on its own.
    scratch = tempfile.TemporaryDirectory(prefix="shoal-best-") if spec.checkpoint_via_report and rank == 0 else None
    best_file = Path(scratch.name) / CHECKPOINT_FILE if scratch is not None else None
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        history = list(saved["history"])
        best_miou, best_epoch, since_best, step = saved["best_miou"], saved["best_epoch"], saved["since_best"], saved["step"]
        best_state = saved["best_state"]
        if saved["best_eval"] is not None:
            best_eval = Evaluation(**{k: v.numpy() for k, v in saved["best_eval"].items()})
        stopped_early, done = saved["stopped_early"], saved["done"]
        start_epoch = resumed_at = int(saved["next_epoch"])
        if best_file is not None and best_state:
            shutil.copyfile(Path(str(resume_from)) / CHECKPOINT_FILE, best_file)
        if len(saved["rng"]) == world:  # last: everything above may draw random numbers
            _set_rng_state(saved["rng"][rank], augmenter, device)
        elif rank == 0:
            log.warning("resume state of %d ranks, this run has %d: random draws differ from the interrupted run",
                        len(saved["rng"]), world)
        if rank == 0:
            log.info("resuming training at epoch %d of %d (step %d, best epoch %d)", start_epoch, spec.epochs, step, best_epoch)
    started = time.time()
    progress_dir = spec.progress_dir if rank == 0 else None

    def show(epoch: int, loss: float | None, force: bool = False) -> None:
        # epoch: the one running (1-based); epochs_done and val_miou: the last finished one
        write_progress(progress_dir, "train", {
            "epoch": epoch + 1, "epochs": spec.epochs, "step": step, "steps": total_steps, "loss": loss,
            "epochs_done": len(history), "val_miou": history[-1]["val_miou"] if history else None,
            "epoch_loss": history[-1]["train_loss"] if history else None,
            "history": [[h["train_loss"], h["val_miou"]] for h in history],
            "started": started, "first_step": start_epoch * len(train_loader)}, force=force)

    show(start_epoch, None, force=True)
    for epoch in range(start_epoch, spec.epochs if not done else start_epoch):
        ddp_model.train()
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, batches = 0.0, 0
        for x, y, _ in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = ddp_model(x)
            loss = loss_fn(logits, y, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if spec.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            loss_sum += float(loss.detach())
            batches += 1
            show(epoch, loss_sum / batches)
        _sync_buffers(model)
        ev = evaluate_dataset(
            model, val_ds, num_classes, spec.ignore_index, device,
            batch_size=val_batch, autocast_dtype=amp_dtype,
        )
        m = metrics_from_confusion(ev.confusion)
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "train_loss": loss_sum / max(batches, 1),
            "val_ce": _finite_mean(ev.loss),
            "val_miou": m.miou,
            "val_fw_iou": m.fw_iou,
            "val_mean_dice": m.mean_dice,
            "val_pixel_accuracy": m.pixel_accuracy,
            "val_image_miou": _finite_mean(ev.image_iou),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "epoch_seconds": time.perf_counter() - t0,
        }
        metrics.update({f"val_iou_{i}": float(v) for i, v in enumerate(m.iou)})
        history.append(metrics)
        show(epoch, metrics["train_loss"], force=True)
        # Every rank computes the same mIoU from the summed matrix, so all agree on these.
        improved = m.miou > best_miou
        if improved:
            best_miou, best_epoch, since_best, best_eval = m.miou, epoch, 0, ev
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        stop = spec.early_stopping_patience is not None and since_best >= spec.early_stopping_patience
        if stop:
            stopped_early = epoch < spec.epochs - 1
        if improved and rank == 0:
            save_model_state(model, best_file or Path(spec.output_dir) / CHECKPOINT_FILE)
        if report is not None and spec.checkpoint_via_report:
            rng = _gather(_rng_state(augmenter, device))  # every rank: a collective
            if rank == 0:
                with tempfile.TemporaryDirectory(prefix="shoal-ckpt-") as tmp:
                    if best_file is not None and best_file.exists():
                        shutil.copyfile(best_file, Path(tmp) / CHECKPOINT_FILE)
                    _save_atomic({
                        "format": RESUME_FORMAT, "world_size": world,
                        "next_epoch": epoch + 1, "done": stop or epoch + 1 >= spec.epochs,
                        "stopped_early": stopped_early, "step": step, "history": history,
                        "best_miou": best_miou, "best_epoch": best_epoch, "since_best": since_best,
                        "best_eval": None if best_eval is None else {
                            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dataclasses.asdict(best_eval).items()
                        },
                        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "rng": rng,
                    }, Path(tmp) / RESUME_FILE)
                    report(metrics, tmp)
            else:
                report(metrics, None)
        elif report is not None:
            report(metrics, None)
        if stop:
            if rank == 0:
                log.info("early stop after epoch %d: no better val mIoU for %d epochs", epoch, since_best)
            break
    if scratch is not None:
        scratch.cleanup()

    # Per-sample signals of the labeled set under the best model, without augmentation.
    model.load_state_dict(best_state)
    signals = evaluate_dataset(
        model, train_ds.without_augment(), num_classes, spec.ignore_index, device,
        batch_size=val_batch, autocast_dtype=amp_dtype,
    )
    assert best_eval is not None
    total = pixels.sum()
    return {
        "history": history,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "loop_seconds": time.perf_counter() - loop_start,
        "stopped_early": stopped_early,
        "resumed_at_epoch": resumed_at,
        "val_confusion": best_eval.confusion.tolist(),
        "val_loss": best_eval.loss.tolist(),
        "val_iou": best_eval.iou.tolist(),
        "val_dice": best_eval.dice.tolist(),
        "class_pixel_frequency": (pixels / total if total > 0 else pixels).tolist(),
        "class_weights": None if weights is None else weights.tolist(),
        "loss_choice": loss_choice,
        "train_loss": signals.loss.tolist(),
        "train_iou": signals.image_iou.tolist(),
    }


def _device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is true but this worker sees no CUDA device")
    if dist.is_available() and dist.is_initialized():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda")


def _ray_train_fn(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train

    spec: TrainSpec = config["spec"]

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
        if spec.fault_injection is not None and ray.train.get_context().get_world_rank() == 0:
            _fault_injection(spec.fault_injection, int(metrics["epoch"]))

    # Set when Ray Train restarted the worker group after a failure: the latest epoch's checkpoint.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return train_loop(spec, report)
    with checkpoint.as_directory() as resume_dir:
        return train_loop(spec, report, resume_from=resume_dir)


def _fault_injection(fault: tuple[str, int], epoch: int, ray_train: bool = True) -> None:
    """Tests only (``TrainSpec.fault_injection``): log the epoch, and pause to be killed after
    reporting the chosen epoch, once, when that epoch's checkpoint is committed (by Ray Train, or,
    for the single-worker task, already on disk)."""
    directory, pause_epoch = Path(fault[0]), int(fault[1])
    with open(directory / "epochs.log", "a") as f:
        f.write(f"{epoch} {os.getpid()} {time.time():.3f}\n")
    paused = directory / "paused.pid"
    if epoch != pause_epoch or paused.exists():
        return
    if ray_train:
        import ray.train

        # `report` returns once the checkpoint is uploaded, but the controller registers it when it
        # next polls the worker: killed before that, a run restarts from the checkpoint before.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    tmp = directory / f".paused.{os.getpid()}.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, paused)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError(f"fault injection: worker {os.getpid()} paused after epoch {epoch} was not killed in 300 s")


def _check_resources(num_workers: int, cpus_per_worker: int, use_gpu: bool) -> None:
    """Ray waits forever for resources the cluster lacks: refuse such a request up front on a local
    cluster. A cluster reached by address may autoscale, so requests there are left to Ray."""
    import ray

    from ._ray import started_local_cluster

    if not started_local_cluster():
        return
    have = ray.cluster_resources()
    workers = max(num_workers, 1)
    if num_workers > 0 and workers * cpus_per_worker > have.get("CPU", 0):
        raise ValueError(
            f"train.num_workers x train.cpus_per_worker = {workers} x {cpus_per_worker} CPUs, "
            f"the Ray cluster has {have.get('CPU', 0):g}"
        )
    if use_gpu and have.get("GPU", 0) < workers:
        raise ValueError(
            f"train.use_gpu: {workers} GPU worker(s) asked for, the Ray cluster has {have.get('GPU', 0):g} GPUs"
        )


def _floats(values: Sequence[Any] | np.ndarray) -> list[float]:
    return [float(v) for v in values]


def result_from_loop(spec: TrainSpec, ret: dict[str, Any], checkpoint_path: str, seconds: float) -> TrainResult:
    """The :class:`TrainResult` of a :func:`train_loop` return value."""
    history = ret.get("history", [])
    best = int(ret.get("best_epoch", len(history) - 1))
    names = list(spec.class_names)
    num_classes = len(names)
    cm = np.asarray(ret.get("val_confusion") or np.zeros((num_classes, num_classes)), dtype=np.int64)
    m = metrics_from_confusion(cm)
    best_metrics = history[best] if history else {}
    val_iou = np.asarray(ret.get("val_iou") or np.zeros((0, num_classes)), dtype=np.float64)
    val_dice = np.asarray(ret.get("val_dice") or np.zeros((0, num_classes)), dtype=np.float64)
    val_ids = spec.val_ids if spec.val_ids is not None else spec.val_images
    per_image = []
    if len(val_iou):
        image_miou, image_mdice = image_mean(val_iou), image_mean(val_dice)
        for i, sample_id in enumerate(val_ids):
            row: dict[str, Any] = {
                "sample_id": sample_id,
                "loss": float(ret["val_loss"][i]),
                "miou": float(image_miou[i]),
                "mdice": float(image_mdice[i]),
            }
            row.update({f"iou_{n}": float(v) for n, v in zip(names, val_iou[i], strict=True)})
            row.update({f"dice_{n}": float(v) for n, v in zip(names, val_dice[i], strict=True)})
            per_image.append(row)
    return TrainResult(
        checkpoint_path=checkpoint_path,
        val_miou=float(best_metrics.get("val_miou", m.miou if history else float("nan"))),
        val_pixel_accuracy=float(best_metrics.get("val_pixel_accuracy", float("nan"))),
        val_iou_per_class=[float(best_metrics.get(f"val_iou_{i}", float("nan"))) for i in range(num_classes)],
        best_epoch=best,
        history=history,
        train_seconds=seconds,
        val_fw_iou=m.fw_iou,
        val_mean_dice=m.mean_dice,
        val_image_miou=_finite_mean(image_mean(val_iou)),
        val_dice_per_class=_floats(m.dice),
        val_precision_per_class=_floats(m.precision),
        val_recall_per_class=_floats(m.recall),
        val_confusion=cm.tolist(),
        val_per_image=per_image,
        class_pixel_frequency=_floats(ret.get("class_pixel_frequency", [])),
        class_weights=ret.get("class_weights"),
        train_ids=list(spec.train_ids if spec.train_ids is not None else spec.train_images),
        train_loss=_floats(ret.get("train_loss", [])),
        train_iou=_floats(ret.get("train_iou", [])),
        epochs_run=int(ret.get("epochs_run", len(history))),
        stopped_early=bool(ret.get("stopped_early", False)),
        resumed_at_epoch=ret.get("resumed_at_epoch"),
        loop_seconds=float(ret.get("loop_seconds", float("nan"))),
        loss_choice=dict(ret.get("loss_choice") or {}),
    )


def _single_worker(spec: TrainSpec, resume_root: str, threads: int) -> dict[str, Any]:
    """The training loop as one Ray task: every epoch's checkpoint goes to ``resume_root``
    (``epoch-NNNN/``, complete once its ``done`` marker exists); a retried task (its worker died)
    goes on from the newest complete one."""
    torch.set_num_threads(threads)
    root = Path(resume_root)
    done = sorted(root.glob("epoch-*/done")) if root.is_dir() else []
    resume = str(done[-1].parent) if done else None

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            target = root / f"epoch-{int(metrics['epoch']):04d}"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(checkpoint_dir, target)
            (target / "done").touch()
            for older in sorted(root.glob("epoch-*"))[:-1]:
                shutil.rmtree(older, ignore_errors=True)
        if spec.fault_injection is not None:
            _fault_injection(spec.fault_injection, int(metrics["epoch"]), ray_train=False)

    return train_loop(spec, report, resume_from=resume)


def _train_task(spec: TrainSpec, cpus: int, max_failures: int, name: str) -> tuple[dict[str, Any], Path]:
    """:func:`_single_worker` in a Ray task that may reuse a warm worker process (torch imported,
    the labeled images decoded in an earlier round): no worker group, no controller to start.
    Returns the loop's result and the newest checkpoint folder."""
    import ray

    root = Path(spec.output_dir) / "train_checkpoints"
    shutil.rmtree(root, ignore_errors=True)  # an earlier attempt of this round: start over
    task = ray.remote(num_cpus=cpus, num_gpus=1 if spec.use_gpu else 0, max_retries=max_failures,
                      retry_exceptions=False, max_calls=0)(_single_worker).options(name=name)
    ret: dict[str, Any] = ray.get(task.remote(spec, str(root), max(1, cpus)))
    done = sorted(root.glob("epoch-*/done"))
    if not done:
        raise RuntimeError(f"training run {name} wrote no checkpoint in {root}")
    return ret, done[-1].parent


def train(
    spec: TrainSpec,
    *,
    num_workers: int,
    cpus_per_worker: int,
    storage_path: str,
    run_name: str | None = None,
    max_failures: int = 2,
    launcher: str = "auto",
) -> TrainResult:
    """Fit a model and copy the best checkpoint to ``spec.output_dir/model.pt``.

    ``num_workers=0`` runs the loop in this process (Ray Train's local mode). ``num_workers=1``
    runs it in one Ray task with ``cpus_per_worker`` CPUs (and a GPU with ``spec.use_gpu``), which
    reuses a warm worker process across rounds instead of starting a worker group (a TorchTrainer
    costs 15-25 s to start here, the task about 0.1 s once a worker is warm). Two or more workers
    train with DDP under a Ray Train ``TorchTrainer``; each call uses a fresh run name: reusing one
    would silently resume an earlier run. ``launcher="ray_train"`` uses a TorchTrainer for one worker too.

    ``max_failures``: how many times a worker that dies (a killed process, a lost node) is
    replaced; every epoch writes a checkpoint and the replacement goes on from the latest one, to
    the result the run would have given uninterrupted. 0 = fail at once. Needs ``storage_path``
    (and ``spec.output_dir``) on storage every node sees when workers span nodes. Local mode has
    no restarts.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if max_failures < 0:
        raise ValueError(f"train.max_failures: must be >= 0, got {max_failures}")
    _check_resources(num_workers, cpus_per_worker, spec.use_gpu)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if num_workers == 1 and launcher == "auto":
        spec = dataclasses.replace(spec, checkpoint_via_report=True)
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
        name = run_name or f"train-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        ret, latest = _train_task(spec, cpus_per_worker, max_failures, name)
        seconds = time.perf_counter() - t0
        shutil.copyfile(latest / CHECKPOINT_FILE, out / (CHECKPOINT_FILE + ".tmp"))
        (out / (CHECKPOINT_FILE + ".tmp")).replace(out / CHECKPOINT_FILE)
        shutil.rmtree(latest.parent, ignore_errors=True)
        return result_from_loop(spec, ret, str(out / CHECKPOINT_FILE), seconds)
    local = num_workers == 0
    spec = dataclasses.replace(spec, checkpoint_via_report=not local)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    name = run_name or f"train-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        _ray_train_fn,  # type: ignore[arg-type]  # it returns the history (Result.return_value)
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            # Every epoch reports a checkpoint that also holds the best model so far: the latest
            # one is all a restart or the caller needs.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if not local:
        if result.checkpoint is None:
            raise RuntimeError(f"training run {name} reported no checkpoint")
        with result.checkpoint.as_directory() as ckpt_dir:
            shutil.copyfile(Path(ckpt_dir) / CHECKPOINT_FILE, out / (CHECKPOINT_FILE + ".tmp"))
        (out / (CHECKPOINT_FILE + ".tmp")).replace(out / CHECKPOINT_FILE)
    if not (out / CHECKPOINT_FILE).exists():
        raise RuntimeError(f"training run {name} produced no checkpoint in {out}")
    ret = getattr(result, "return_value", None) or {}
    return result_from_loop(spec, ret, str(out / CHECKPOINT_FILE), seconds)
