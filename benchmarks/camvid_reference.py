"""Full-supervision reference on CamVid: the 100% line that active-learning results are measured
against (a script, not a test).

    .venv/bin/python benchmarks/camvid_reference.py            # CPU, the recipe of configs/camvid.yaml

Trains the model of ``configs/camvid.yaml`` (the default ``unet`` at the config's reduced
resolution, the config's loss, optimiser, schedule and augmentation) on all 367 CamVid train
images, in this process through ``workers._train.train_loop`` (no Ray), and evaluates on the 101
val images after every epoch; the best epoch by val mIoU is kept, as the active-learning loop does
in every round, so the two are comparable. Writes ``benchmarks/results/camvid_reference.json`` and
``.md``: mIoU, per-class IoU by name, pixel accuracy, frequency-weighted IoU, Dice, the per-image
mIoU, the last epoch's mIoU too (selecting the epoch on val flatters the best one a little),
epochs, resolution, wall time, the exact command and the machine's load (it may be shared).

GPU variant (not run on the CPU machine): SegFormer-B0 (MiT-b0 sized; ``--pretrained DIR`` loads
an ImageNet encoder saved with ``save_pretrained``) at the full 360x480 resolution::

    .venv/bin/python benchmarks/camvid_reference.py --segformer-b0 --full-res --gpu --epochs 80 \\
        --pretrained /models/mit-b0 --tag segformer_b0_full
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator import load_config  # noqa: E402
from workers import (  # noqa: E402
    AugmentSpec,
    LossSpec,
    TrainSpec,
    load_checkpoint,
    metrics_from_confusion,
    scan_folder_dataset,
)
from workers._train import SegmentationDataset, evaluate_dataset, result_from_loop, train_loop  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/camvid"
CONFIG = ROOT / "configs/camvid.yaml"
RESULTS = ROOT / "benchmarks/results"
FULL_RES = (360, 480)
log = logging.getLogger("camvid_reference")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="CamVid root with train/ and val/ (default %(default)s)")
    p.add_argument("--config", type=Path, default=CONFIG, help="recipe: model, resolution, train.* (default %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="full passes over the 367 train images")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resolution; default the config's data.image_size")
    p.add_argument("--full-res", action="store_true", help=f"train and evaluate at {FULL_RES[0]}x{FULL_RES[1]}")
    p.add_argument("--segformer-b0", action="store_true", help="SegFormer-B0 instead of the config's model")
    p.add_argument("--pretrained", help="with --segformer-b0: a local save_pretrained folder of MiT-b0 weights")
    p.add_argument("--gpu", action="store_true", help="train on CUDA (mixed precision)")
    p.add_argument("--batch-size", type=int, help="default the config's train.batch_size")
    p.add_argument("--lr", type=float, help="default the config's train.lr (6e-5 for a pretrained SegFormer)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-images", type=int, default=0,
                   help="hold out this many val images as a test set (split_val): the best epoch is chosen on the "
                        "other val images and the test mIoU is reported too (0 = no split)")
    p.add_argument("--tag", default="camvid_reference", help="output name under benchmarks/results/")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs/camvid_reference", help="checkpoint folder (git-ignored)")
    args = p.parse_args(argv)
    if args.pretrained and not args.segformer_b0:
        p.error("--pretrained needs --segformer-b0")
    args.test_dir = None  # set by build_spec with --test-images
    return args


def split_val(data: Path, test_images: int, root: Path) -> tuple[Path, Path]:
    """CamVid's val images cut in two with a fixed permutation: ``(val_dir, test_dir)`` under
    ``root`` (folders of links to the images and masks, beside a link to ``classes.json``).
    The val part chooses each model's best epoch; the ``test_images`` others only measure it, so the
    figures reported are not the maximum of noisy values on the images that chose them."""
    images = sorted((data / "val" / "images").iterdir())
    if not 0 < test_images < len(images):
        raise ValueError(f"--test-images: must be in 1..{len(images) - 1}, got {test_images}")
    order = np.random.default_rng(0).permutation(len(images))
    parts = {"test": sorted(order[:test_images]), "val": sorted(order[test_images:])}
    masks = {p.stem: p for p in (data / "val" / "masks").iterdir()}
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "classes.json").exists():
        (root / "classes.json").symlink_to((data / "classes.json").resolve())
    for name, picked in parts.items():
        for kind in ("images", "masks"):
            folder = root / name / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in picked:
                src = images[i] if kind == "images" else masks[images[i].stem]
                link = folder / src.name
                if not link.exists():
                    link.symlink_to(src.resolve())
    return root / "val", root / "test"


def test_miou(checkpoint: str, test_dir: Path, size: tuple[int, int]) -> float:
    """mIoU (classes present) of the model saved at ``checkpoint`` on every image of ``test_dir``."""
    return float(test_metrics(checkpoint, test_dir, size)["miou"])


def test_metrics(checkpoint: str, test_dir: Path, size: tuple[int, int]) -> dict[str, Any]:
    """``miou`` (classes present) and ``iou`` (class name -> IoU, NaN where a class is absent from
    both masks and predictions) of the model saved at ``checkpoint`` on every image of ``test_dir``."""
    classes, records = scan_folder_dataset(test_dir)
    model = load_checkpoint(checkpoint).eval()
    data = SegmentationDataset([r.image_path for r in records], [str(r.mask_path) for r in records], classes,
                               (int(size[0]), int(size[1])), cache=False)
    evaluation = evaluate_dataset(model, data, len(classes.names), classes.ignore_index, torch.device("cpu"))
    metrics = metrics_from_confusion(evaluation.confusion)
    return {"miou": float(metrics.miou), "iou": {n: float(v) for n, v in zip(classes.names, metrics.iou)}}


def build_spec(args: argparse.Namespace) -> TrainSpec:
    cfg = load_config(args.config)
    classes, train = scan_folder_dataset(args.data / "train")
    val_dir = args.data / "val"
    if args.test_images:
        val_dir, args.test_dir = split_val(args.data, args.test_images, args.workdir / "camvid-split")
    val_classes, val = scan_folder_dataset(val_dir)
    if val_classes != classes:
        raise ValueError(f"{args.data}: val classes {val_classes} differ from train classes {classes}")
    missing = [r.sample_id for r in (*train, *val) if r.mask_path is None]
    if missing:
        raise ValueError(f"{args.data}: {len(missing)} images have no mask, e.g. {missing[0]}")
    size = FULL_RES if args.full_res else tuple(args.size or cfg.data.image_size)
    model_name, options, lr = cfg.model.name, dict(cfg.model.options), cfg.train.lr
    if args.segformer_b0:
        model_name, options = "segformer", ({"pretrained": args.pretrained} if args.pretrained else {})
        lr = 6e-5 if args.pretrained else 2e-4
    t = cfg.train
    return TrainSpec(
        model_name=model_name,
        model_options=options,
        class_names=tuple(classes.names),
        ignore_index=classes.ignore_index,
        image_size=(int(size[0]), int(size[1])),
        train_images=[r.image_path for r in train],
        train_masks=[str(r.mask_path) for r in train],
        train_weights=[1.0] * len(train),
        val_images=[r.image_path for r in val],
        val_masks=[str(r.mask_path) for r in val],
        epochs=args.epochs,
        samples_per_epoch=len(train),  # one epoch = one pass over the set (drawn with replacement)
        batch_size=args.batch_size or t.batch_size,
        lr=args.lr if args.lr is not None else lr,
        weight_decay=t.weight_decay,
        seed=args.seed,
        output_dir=str(args.workdir),
        use_gpu=args.gpu,
        train_ids=[r.sample_id for r in train],
        val_ids=[r.sample_id for r in val],
        loss=LossSpec(**dataclasses.asdict(t.loss)),
        optimizer=t.optimizer,
        momentum=t.momentum,
        schedule=t.schedule,
        warmup_steps=t.warmup_steps,
        grad_clip=t.grad_clip,
        amp=t.amp,
        early_stopping_patience=None,  # a reference runs its full schedule
        augment=AugmentSpec(**dataclasses.asdict(t.augment)),
    )


def fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def write_markdown(path: Path, r: dict[str, Any]) -> None:
    lines = [
        "# CamVid full-supervision reference (the 100% line)",
        "",
        f"Command: `{r['command']}` (from the repository root)",
        "",
        f"{r['finished_utc']} UTC; {r['machine']['cpus']} CPUs ({r['machine']['torch_threads']} torch threads), "
        f"{r['machine']['platform']}, Python {r['machine']['python']}, torch {r['machine']['torch']}. "
        f"Load average (1, 5, 15 min) before: {r['machine']['load_before']}; after: {r['machine']['load_after']} "
        "(a shared machine: other jobs ran).",
        "",
        f"Model `{r['model']}` {json.dumps(r['model_options'])} at {r['resolution'][0]}x{r['resolution'][1]} (h x w), "
        f"{r['train_images']} train images, {r['val_images']} val images; {r['epochs_run']} epochs of "
        f"{r['train_images']} samples, batch {r['batch_size']}, {r['optimizer']} lr {r['lr']} ({r['schedule']}), "
        f"loss `{r['loss']['name']}`, augmentation {json.dumps(r['augment'])}; seed {r['seed']}. "
        f"Wall time {r['wall_seconds'] / 60:.1f} min.",
        "",
        f"Best epoch {r['best_epoch']} (by val mIoU, as the active-learning loop selects each round's model).",
        "",
        "| metric | best epoch | last epoch |",
        "|---|---:|---:|",
        f"| mIoU (classes present) | {fmt(r['val_miou'])} | {fmt(r['last_epoch_val_miou'])} |",
        *([f"| test mIoU ({r['test_images']} held-out val images; the best epoch chosen on the other "
           f"{r['val_images']}) | {fmt(r['test_miou'])} | |"] if r.get("test_miou") is not None else []),
        f"| pixel accuracy | {fmt(r['val_pixel_accuracy'])} | {fmt(r['last_epoch_val_pixel_accuracy'])} |",
        f"| frequency-weighted IoU | {fmt(r['val_fw_iou'])} | |",
        f"| mean Dice | {fmt(r['val_mean_dice'])} | |",
        f"| per-image mIoU, averaged over images | {fmt(r['val_image_miou'])} | |",
        "",
        "| class | IoU | Dice | precision | recall | val pixel share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in r["per_class"].items():
        lines.append(
            f"| {name} | {fmt(c['iou'])} | {fmt(c['dice'])} | {fmt(c['precision'])} | {fmt(c['recall'])} | "
            f"{c['val_pixel_share']:.3f} |"
        )
    lines += [
        "",
        "Metrics come from one confusion matrix over all val pixels (void ignored); the per-image mIoU "
        "averages each image's mean over the classes present in it. Val mIoU per epoch: "
        + ", ".join(f"{v:.3f}" for v in r["val_miou_per_epoch"])
        + ".",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device visible")
    spec = build_spec(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    load_before = [round(v, 2) for v in os.getloadavg()]
    command = shlex.join([".venv/bin/python", "benchmarks/camvid_reference.py", *(sys.argv[1:] if argv is None else argv)])
    log.info("%s: %d train / %d val images at %s, %d epochs", spec.model_name, len(spec.train_images),
             len(spec.val_images), spec.image_size, spec.epochs)
    t0 = time.perf_counter()

    def report(metrics: dict[str, float], _checkpoint: str | None) -> None:
        log.info("epoch %d/%d: train loss %.3f, val mIoU %.3f, pixel acc %.3f (%.0f s, %.1f min so far)",
                 metrics["epoch"] + 1, spec.epochs, metrics["train_loss"], metrics["val_miou"],
                 metrics["val_pixel_accuracy"], metrics["epoch_seconds"], (time.perf_counter() - t0) / 60)

    ret = train_loop(spec, report)
    wall = time.perf_counter() - t0
    result = result_from_loop(spec, ret, str(args.workdir / "model.pt"), wall)
    cm = np.asarray(result.val_confusion, dtype=np.float64)
    share = cm.sum(1) / cm.sum()
    last = result.history[-1]
    out: dict[str, Any] = {
        "command": command,
        "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "wall_seconds": round(wall, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if args.gpu else None,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_before": load_before,
            "load_after": [round(v, 2) for v in os.getloadavg()],
        },
        "data": str(args.data),
        "model": spec.model_name,
        "model_options": spec.model_options,
        "resolution": list(spec.image_size),
        "train_images": len(spec.train_images),
        "val_images": len(spec.val_images),
        "epochs": spec.epochs,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "batch_size": spec.batch_size,
        "optimizer": spec.optimizer,
        "lr": spec.lr,
        "schedule": spec.schedule,
        "loss": dataclasses.asdict(spec.loss),
        "augment": dataclasses.asdict(spec.augment),
        "seed": spec.seed,
        "val_miou": result.val_miou,
        "test_images": args.test_images,
        "test_miou": test_miou(result.checkpoint_path, args.test_dir, spec.image_size) if args.test_dir else None,
        "val_pixel_accuracy": result.val_pixel_accuracy,
        "val_fw_iou": result.val_fw_iou,
        "val_mean_dice": result.val_mean_dice,
        "val_image_miou": result.val_image_miou,
        "last_epoch_val_miou": last["val_miou"],
        "last_epoch_val_pixel_accuracy": last["val_pixel_accuracy"],
        "per_class": {
            name: {
                "iou": result.val_iou_per_class[i],
                "dice": result.val_dice_per_class[i],
                "precision": result.val_precision_per_class[i],
                "recall": result.val_recall_per_class[i],
                "val_pixel_share": float(share[i]),
            }
            for i, name in enumerate(spec.class_names)
        },
        "val_miou_per_epoch": [h["val_miou"] for h in result.history],
        "train_loss_per_epoch": [h["train_loss"] for h in result.history],
        "confusion": result.val_confusion,
        "checkpoint": result.checkpoint_path,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{args.tag}.json", RESULTS / f"{args.tag}.md"
    json_path.write_text(json.dumps(out, indent=2, allow_nan=True) + "\n")
    write_markdown(md_path, out)
    log.info("val mIoU %.4f (best epoch %d), pixel accuracy %.4f; wrote %s and %s",
             result.val_miou, result.best_epoch, result.val_pixel_accuracy, json_path, md_path)


if __name__ == "__main__":
    main()
