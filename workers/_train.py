"""Training worker: fit a segmentation model on the labeled set with Ray Train (DDP).

The public call is :func:`train`. The per-worker loop, the weighted distributed sampler and the
validation metrics are plain functions and classes that tests call without Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ._data import ClassInfo, load_image, load_mask
from ._models import build_model, save_model_state

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CHECKPOINT_FILE = "model.pt"


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
    original = load_image(image_path)
    mask = load_mask(mask_path, classes, size=size, expected_hw=original.shape[:2])
    return load_image(image_path, size=size), mask


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Decodes (image, mask) pairs from paths inside the worker; caches decoded pairs in memory."""

    def __init__(
        self,
        image_paths: Sequence[str],
        mask_paths: Sequence[str],
        classes: ClassInfo,
        size: tuple[int, int],
        cache: bool = True,
    ) -> None:
        if len(image_paths) != len(mask_paths):
            raise ValueError("image_paths and mask_paths differ in length")
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths)
        self.classes = classes
        self.size = size
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self._cache is not None and index in self._cache:
            x, y = self._cache[index]
        else:
            image, mask = load_pair(self.image_paths[index], self.mask_paths[index], self.classes, self.size)
            x, y = to_tensor(image), torch.from_numpy(mask.astype(np.int64))
            if self._cache is not None:
                self._cache[index] = (x, y)
        return x, y, index


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


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 [C, C], rows = ground truth, columns = prediction; ignored pixels are skipped."""
    valid = target != ignore_index
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-class IoU (NaN for a class absent from both truth and prediction), mIoU over present
    classes, and pixel accuracy."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
    acc = float(tp.sum() / cm.sum()) if cm.sum() > 0 else 0.0
    return iou, miou, acc


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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(model: torch.nn.Module, loader: DataLoader[Any], num_classes: int, ignore_index: int, device: torch.device) -> np.ndarray:
    """Confusion matrix of ``model`` over ``loader``, summed across DDP ranks: int64 [C, C]."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    with torch.no_grad():
        for x, y, _ in loader:
            x, y = x.to(device), y.to(device)
            pred = model(x).argmax(1)
            cm += confusion_matrix(pred, y, num_classes, ignore_index)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
    return cm.cpu().numpy()


def train_loop(spec: TrainSpec, report: Any = None) -> dict[str, Any]:
    """Run the training loop on this worker (rank/world size from torch.distributed when set).

    ``report(metrics, checkpoint_dir)`` is called once per epoch by every rank (``checkpoint_dir``
    is set on rank 0 when the epoch improved the validation mIoU). Returns the epoch history and
    the best epoch on rank 0.
    """
    rank, world = _world()
    torch.manual_seed(spec.seed * 1000 + rank)
    np.random.seed(spec.seed * 1000 + rank)
    device = _device(spec.use_gpu)
    classes = ClassInfo(names=spec.class_names, ignore_index=spec.ignore_index)
    num_classes = len(spec.class_names)

    train_ds = SegmentationDataset(spec.train_images, spec.train_masks, classes, spec.image_size)
    sampler = WeightedDistributedSampler(spec.train_weights, spec.samples_per_epoch, world, rank, spec.seed)
    train_loader = DataLoader(train_ds, batch_size=spec.batch_size, sampler=sampler, drop_last=False)
    val_ds = SegmentationDataset(spec.val_images, spec.val_masks, classes, spec.image_size)
    val_indices = list(range(rank, len(val_ds), world))  # disjoint shards, summed by all_reduce
    val_loader = DataLoader(torch.utils.data.Subset(val_ds, val_indices), batch_size=spec.batch_size)

    model = build_model(spec.model_name, num_classes, spec.model_options).to(device)
    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps = spec.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - min(s, steps - 1) / steps) ** 0.9)

    history: list[dict[str, float]] = []
    best_miou, best_epoch = -1.0, -1
    for epoch in range(spec.epochs):
        ddp_model.train()
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, batches = 0.0, 0
        for x, y, _ in train_loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(ddp_model(x), y, ignore_index=spec.ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
            batches += 1
        cm = evaluate(model, val_loader, num_classes, spec.ignore_index, device)
        iou, miou, acc = iou_from_confusion(cm)
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "train_loss": loss_sum / max(batches, 1),
            "val_miou": miou,
            "val_pixel_accuracy": acc,
            "epoch_seconds": time.perf_counter() - t0,
        }
        metrics.update({f"val_iou_{i}": float(v) for i, v in enumerate(iou)})
        history.append(metrics)
        improved = miou > best_miou
        if improved:
            best_miou, best_epoch = miou, epoch
        if improved and rank == 0 and not spec.checkpoint_via_report:
            save_model_state(model, Path(spec.output_dir) / CHECKPOINT_FILE)
        if report is None:
            continue
        if improved and rank == 0 and spec.checkpoint_via_report:
            with tempfile.TemporaryDirectory(prefix="shoal-ckpt-") as tmp:
                save_model_state(model, Path(tmp) / CHECKPOINT_FILE)
                report(metrics, tmp)
        else:
            report(metrics, None)
    return {"history": history, "best_epoch": best_epoch}


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

    return train_loop(spec, report)


def _check_resources(num_workers: int, cpus_per_worker: int, use_gpu: bool) -> None:
    """Ray waits forever for resources the cluster lacks: refuse such a request up front."""
    import ray

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


def train(
    spec: TrainSpec,
    *,
    num_workers: int,
    cpus_per_worker: int,
    storage_path: str,
    run_name: str | None = None,
) -> TrainResult:
    """Fit a model with a Ray Train ``TorchTrainer`` and copy the best checkpoint to
    ``spec.output_dir/model.pt``.

    ``num_workers=0`` runs the loop in this process (Ray Train's local mode). Each call uses a fresh
    run name: reusing one would silently resume an earlier run.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _check_resources(num_workers, cpus_per_worker, spec.use_gpu)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
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
            checkpoint_config=CheckpointConfig(num_to_keep=1),
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
    history = ret.get("history", [])
    best = ret.get("best_epoch", len(history) - 1)
    best_metrics = history[best] if history else {}
    num_classes = len(spec.class_names)
    return TrainResult(
        checkpoint_path=str(out / CHECKPOINT_FILE),
        val_miou=float(best_metrics.get("val_miou", float("nan"))),
        val_pixel_accuracy=float(best_metrics.get("val_pixel_accuracy", float("nan"))),
        val_iou_per_class=[float(best_metrics.get(f"val_iou_{i}", float("nan"))) for i in range(num_classes)],
        best_epoch=int(best),
        history=history,
        train_seconds=seconds,
    )
