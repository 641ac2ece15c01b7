"""How much of a label-efficiency curve is training noise? (a script, not a test)

    .venv/bin/python benchmarks/training_noise.py --size 48 64 --images 40 \\
        --recipes 10x120 20x240 --seeds 0 1 2

Trains the model of ``configs/camvid.yaml`` on one fixed random subset of CamVid train images
(``--images``, drawn with ``--subset-seed``) several times, changing only the training seed, for
each recipe ``EPOCHSxSAMPLES`` (epochs x samples per epoch, the label-efficiency benchmark's
``--epochs`` / ``--samples-per-epoch``), and keeps the best epoch by val mIoU as every Shoal round
does. The spread of val mIoU over training seeds at a fixed labeled set is the noise a strategy
comparison has to beat: a recipe whose spread is as large as the differences between strategies
cannot rank them. Writes ``benchmarks/results/training_noise.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from camvid_reference import build_spec  # noqa: E402
from camvid_reference import parse_args as reference_args  # noqa: E402

from workers._train import train_loop  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
log = logging.getLogger("training_noise")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=2, default=[48, 64], metavar=("H", "W"))
    p.add_argument("--images", type=int, default=40, help="labeled images (a fixed random subset of train)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--recipes", nargs="+", default=["10x120", "20x240"], help="EPOCHSxSAMPLES_PER_EPOCH")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument("--out", default="training_noise")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    base = build_spec(reference_args(["--size", *map(str, args.size), "--workdir", "/tmp/shoal-training-noise"]))
    pick = np.random.default_rng(args.subset_seed).permutation(len(base.train_images))[: args.images]
    subset = dataclasses.replace(
        base,
        train_images=[base.train_images[i] for i in pick],
        train_masks=[base.train_masks[i] for i in pick],
        train_weights=[1.0] * len(pick),
        train_ids=[base.train_ids[i] for i in pick],
    )
    load_before = [round(v, 2) for v in os.getloadavg()]
    rows = []
    for recipe in args.recipes:
        epochs, samples = (int(v) for v in recipe.split("x"))
        for seed in args.seeds:
            spec = dataclasses.replace(subset, epochs=epochs, samples_per_epoch=samples, seed=seed)
            t0 = time.perf_counter()
            ret = train_loop(spec, lambda metrics, checkpoint: None)
            mious = [h["val_miou"] for h in ret["history"]]
            rows.append({"recipe": recipe, "seed": seed, "best_val_miou": max(mious),
                         "best_epoch": int(np.argmax(mious)) + 1, "last_val_miou": mious[-1],
                         "seconds": round(time.perf_counter() - t0, 1)})
            log.info("%s seed %d: best %.4f (epoch %d), last %.4f, %.0f s", recipe, seed, rows[-1]["best_val_miou"],
                     rows[-1]["best_epoch"], rows[-1]["last_val_miou"], rows[-1]["seconds"])
    summary = {}
    for recipe in args.recipes:
        best = np.array([r["best_val_miou"] for r in rows if r["recipe"] == recipe])
        secs = np.array([r["seconds"] for r in rows if r["recipe"] == recipe])
        summary[recipe] = {"mean": float(best.mean()), "std": float(best.std(ddof=1)) if len(best) > 1 else 0.0,
                           "range": float(best.max() - best.min()), "seconds_mean": float(secs.mean())}
    first = summary[args.recipes[0]]["seconds_mean"]
    command = shlex.join([".venv/bin/python", "benchmarks/training_noise.py", *(sys.argv[1:] if argv is None else argv)])
    out = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
           "size": args.size, "images": args.images, "runs": rows, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Training noise at a fixed labeled set", "", f"Command: `{command}`", "",
             f"{out['date']}; {os.cpu_count()} CPUs; load average before {load_before}, after {out['load_after']}. "
             f"Model and recipe of `configs/camvid.yaml` at {args.size[0]}x{args.size[1]}; {args.images} CamVid train "
             f"images (subset seed {args.subset_seed}); val = the 101 val images; best epoch by val mIoU.", "",
             "| recipe (epochs x samples) | best val mIoU (mean ± std over training seeds) | range | "
             "seconds per run (x first recipe) |", "|---|---:|---:|---:|"]
    for recipe, s in summary.items():
        lines.append(f"| {recipe} | {s['mean']:.4f} ± {s['std']:.4f} | {s['range']:.4f} | "
                     f"{s['seconds_mean']:.0f} (x{s['seconds_mean'] / first:.2f}) |")
    lines += ["", "Runs: " + "; ".join(f"{r['recipe']} seed {r['seed']}: {r['best_val_miou']:.4f} (epoch {r['best_epoch']})"
                                       for r in rows) + "."]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
