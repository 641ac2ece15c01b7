"""Rare-defect discovery on KolektorSDD: Shoal's strategies against random and against baal's
heuristics, in one harness, paired by seed (a script, not a test).

    nice -n 10 .venv/bin/python benchmarks/rare_classes.py                 # 5 seeds, 3 rounds
    .venv/bin/python benchmarks/rare_classes.py --report-only              # tables from the JSON

The pool is the 287 KolektorSDD train images (``../shared/data/ksdd``, a defect in 13% of them);
the 96 val images are the test set. For each seed, ``--initial`` random images are labeled (the
same for every arm); each round trains a UNet (16 channels, depth 3, dropout 0.1 in the
bottleneck) from scratch on the labeled images with Shoal's own training function
(``workers.train_loop``, the default loss settings: the rare-class recipe switches on by itself),
scores the unlabeled images and selects ``--budget`` of them; the simulated oracle reveals their
masks. The round-0 model is trained once per seed and shared by every arm.

Arms:
- ``random``: uniformly (Shoal's ``random``).
- ``entropy``: Shoal's ``entropy`` (mean pixel entropy), from ``workers.PoolScorer``'s columns.
- ``class_balance``: Shoal's ``class_balance`` (images that move the labeled class shares toward
  equal, from the predicted shares).
- ``fusion``: Shoal's ``fusion`` of ``class_balance`` and class-weighted entropy, half each.
- ``baal_entropy``, ``baal_bald``: baal 2.1's ``Entropy`` and ``BALD`` heuristics
  (``reduction="mean"`` over pixels) on 5 Monte-Carlo dropout passes of the same model, top-k.
  baal is not a Shoal dependency: ``pip install --no-deps baal==2.1.0 structlog torchmetrics
  scikit-learn`` into the venv first (``--arms`` without them runs without it).

Reported per arm and round, mean and standard deviation over seeds: defect images in the labeled
set (and what random selection takes on average: the pool rate times the labeled count), the
defect IoU and recall of the round's model on the test set, and the paired difference of each
arm's defect images after the last round to random's, with its standard error. Writes
``benchmarks/results/rare_classes.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ksdd"
ARMS = ["random", "entropy", "class_balance", "fusion", "baal_entropy", "baal_bald"]
MC_PASSES = 5


def train(records: list[Any], val: list[Any], classes: Any, args: argparse.Namespace, seed: int, out: Path) -> Any:
    from workers._train import CHECKPOINT_FILE, TrainSpec, result_from_loop, train_loop

    spec = TrainSpec(
        model_name="unet", model_options={"base_channels": 16, "depth": 3, "dropout": 0.1},
        class_names=tuple(classes.names), ignore_index=classes.ignore_index, image_size=tuple(args.size),
        train_images=[r.image_path for r in records], train_masks=[str(r.mask_path) for r in records],
        train_weights=[1.0] * len(records), val_images=[r.image_path for r in val], val_masks=[str(r.mask_path) for r in val],
        epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, batch_size=8, lr=3e-3, weight_decay=1e-4,
        seed=seed, output_dir=str(out))
    return result_from_loop(spec, train_loop(spec), str(out / CHECKPOINT_FILE), 0.0)


def score(checkpoint: str, pool: list[Any], labeled: list[Any], classes: Any, args: argparse.Namespace) -> Any:
    """Shoal's score table (``workers.PoolScorer``, as the loop's scoring pass writes it) of the
    unlabeled and labeled images, with the ``labeled`` column the strategies read."""
    import pandas as pd

    import workers

    shares = np.zeros(len(classes.names))
    for r in labeled:
        m = workers.load_mask(str(r.mask_path), classes, size=tuple(args.size))
        shares += np.bincount(m[m < len(shares)].ravel(), minlength=len(shares))
    scorer = workers.PoolScorer(checkpoint_path=checkpoint, image_size=tuple(args.size), class_names=tuple(classes.names),
                                ignore_index=classes.ignore_index, labeled_class_shares=tuple(shares / shares.sum()))
    rows = [*pool, *labeled]
    parts = []
    for start in range(0, len(rows), 16):
        part = rows[start:start + 16]
        parts.append(pd.DataFrame(scorer({
            "sample_id": np.asarray([r.sample_id for r in part]), "image_path": np.asarray([r.image_path for r in part]),
            "mask_path": np.asarray(["" if r in pool else str(r.mask_path) for r in part], dtype=object),
            "need_quality": np.zeros(len(part), dtype=bool)})))
    table = pd.concat(parts, ignore_index=True)
    table["labeled"] = table["sample_id"].isin({r.sample_id for r in labeled})
    return table


def baal_scores(checkpoint: str, pool: list[Any], heuristic: str, args: argparse.Namespace, seed: int) -> np.ndarray:
    """baal's heuristic on ``MC_PASSES`` dropout passes of the model: [N, C, H, W, T] probabilities."""
    import torch
    from baal.active.heuristics import BALD, Entropy

    import workers
    from workers._models import load_checkpoint
    from workers._train import to_tensor

    model = load_checkpoint(checkpoint).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.train()  # Monte-Carlo dropout: dropout on, batch norm frozen
    torch.manual_seed(seed)
    h = (BALD if heuristic == "bald" else Entropy)(reduction="mean")
    out = []
    with torch.no_grad():
        for start in range(0, len(pool), 16):
            x = torch.stack([to_tensor(workers.load_image(r.image_path, size=tuple(args.size)))
                             for r in pool[start:start + 16]])
            probs = torch.stack([torch.softmax(model(x), 1) for _ in range(MC_PASSES)], dim=-1)
            out.append(h.get_uncertainties(probs.numpy()))
    return np.concatenate(out)


def select(arm: str, checkpoint: str, pool: list[Any], labeled: list[Any], classes: Any, args: argparse.Namespace,
           rng: np.random.Generator, seed: int) -> list[Any]:
    from strategies import build_strategy

    if arm.startswith("baal_"):
        scores = baal_scores(checkpoint, pool, arm.removeprefix("baal_"), args, seed)
        return [pool[i] for i in np.argsort(-scores, kind="stable")[: args.budget]]
    strategy = {
        "random": lambda: build_strategy("random"),
        "entropy": lambda: build_strategy("entropy"),
        "class_balance": lambda: build_strategy("class_balance"),
        "fusion": lambda: build_strategy("fusion", members={"class_balance": 0.5,
                                                            "entropy": {"weight": 0.5, "aggregation": "classweighted"}}),
    }[arm]()
    table = score(checkpoint, pool, labeled, classes, args) if arm != "random" else None
    if table is None:
        import pandas as pd

        table = pd.DataFrame({"sample_id": [r.sample_id for r in pool]})
    ids = set(strategy.select(table, args.budget, rng))
    return [r for r in pool if r.sample_id in ids]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--size", type=int, nargs=2, default=(256, 96), metavar=("H", "W"))
    p.add_argument("--initial", type=int, default=20)
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples-per-epoch", type=int, default=64)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arms", nargs="+", default=ARMS)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "rare_classes")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "rare_classes.json").read_text())
        report(saved["rows"], saved["meta"], args.out)
        return

    import torch

    import workers

    torch.set_num_threads(args.threads)
    classes, train_records = workers.scan_folder_dataset(str(args.data / "train"))
    _, val = workers.scan_folder_dataset(str(args.data / "val"))
    with open(args.data / "index.csv") as fh:
        defective = {r["name"] for r in csv.DictReader(fh) if r["split"] == "train" and r["has_defect"] == "1"}
    rate = sum(r.sample_id in defective for r in train_records) / len(train_records)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for seed in range(args.seeds):
        rng0 = np.random.default_rng(seed)
        initial = [train_records[i] for i in sorted(rng0.choice(len(train_records), args.initial, replace=False))]
        first = train(initial, val, classes, args, 1000 * seed, args.workdir / f"s{seed}-r0")
        for arm in args.arms:
            labeled, model, rng = list(initial), first, np.random.default_rng([seed, 7])
            for rnd in range(args.rounds + 1):
                if rnd:
                    model = train(labeled, val, classes, args, 1000 * seed + rnd, args.workdir / f"s{seed}-{arm}-r{rnd}")
                found = sum(r.sample_id in defective for r in labeled)
                row = {"seed": seed, "arm": arm, "round": rnd, "labeled": len(labeled), "defect_images": found,
                       "random_expected": rate * len(labeled), "defect_iou": model.val_iou_per_class[1],
                       "defect_recall": model.val_recall_per_class[1], "val_miou": model.val_miou,
                       "loss": model.loss_choice.get("loss"), "elapsed_s": time.perf_counter() - t_start}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if rnd == args.rounds:
                    break
                pool = [r for r in train_records if r not in labeled]
                labeled += select(arm, model.checkpoint_path, pool, labeled, classes, args, rng, seed)
        # after every seed: a run stopped early still leaves the seeds it finished, paired
        meta = {"command": shlex.join(["nice", "-n", "10", ".venv/bin/python", "benchmarks/rare_classes.py", *sys.argv[1:]]),
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpus": os.cpu_count(),
                "platform": platform.platform(), "torch": torch.__version__, "wall_s": time.perf_counter() - t_start,
                "seeds_done": seed + 1, "pool": len(train_records), "pool_defect_rate": rate,
                "args": {k: str(v) for k, v in vars(args).items()}}
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "rare_classes.json.tmp"
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        tmp.replace(args.out / "rare_classes.json")
        report(rows, meta, args.out)


def report(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    a = meta["args"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    rounds = sorted({r["round"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    last = rounds[-1]

    def values(arm: str, rnd: int, key: str) -> np.ndarray:
        by_seed = {r["seed"]: r[key] for r in rows if r["arm"] == arm and r["round"] == rnd}
        return np.asarray([by_seed[s] for s in seeds], dtype=np.float64)

    def ms(v: np.ndarray, digits: int = 1) -> str:
        sd = np.nanstd(v, ddof=1) if len(v) > 1 else 0.0
        return f"{np.nanmean(v):.{digits}f} ± {sd:.{digits}f}"

    lines = [
        "# Rare-defect discovery on KolektorSDD: Shoal's strategies, random and baal",
        "",
        f"Command: `{meta['command']}` (from the repository root); {meta['date']}, {meta['cpus']} CPUs, torch "
        f"{meta['torch']}, {meta['wall_s'] / 60:.0f} min.",
        "",
        f"Pool: {meta['pool']} KolektorSDD train images, {100 * meta['pool_defect_rate']:.1f}% with a defect; test: "
        f"the 96 val images. {a['initial']} random initial images per seed (the same for every arm), {a['budget']} "
        f"per round, {len(rounds) - 1} rounds; UNet 16 channels, depth 3, dropout 0.1, {a['size']} (H, W), "
        f"{a['epochs']} epochs of {a['samples_per_epoch']} samples, Shoal's default loss settings (the rare-class "
        f"recipe switches on when the rarest class is under 1% of the labeled pixels). Mean ± standard deviation "
        f"over {len(seeds)} seeds; baal arms: baal 2.1 `Entropy` / `BALD` (reduction mean) over {MC_PASSES} "
        "MC-dropout passes of the same model.",
        "",
        *([f"Stopped after {meta['seeds_done']} of the {a['seeds']} seeds asked: the tables hold the finished seeds, "
           "paired.", ""] if int(meta.get("seeds_done", a["seeds"])) < int(a["seeds"]) else []),
        "## Defect images in the labeled set",
        "",
        "| arm | " + " | ".join(f"round {r} (labeled {int(values(arms[0], r, 'labeled')[0])})" for r in rounds) + " |",
        "|---|" + "---:|" * len(rounds),
    ]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(ms(values(arm, r, "defect_images")) for r in rounds) + " |")
    lines.append("| (random's expectation: pool rate x labeled) | "
                 + " | ".join(f"{values(arms[0], r, 'random_expected')[0]:.1f}" for r in rounds) + " |")
    base = values("random", last, "defect_images") - values("random", 0, "defect_images") if "random" in arms else None
    lines += ["", f"## After round {last}: defect images selected, paired by seed", "",
              "Selected = found in the labeled set minus the initial set's. Ratio: selected / random's selected (mean of "
              "seed-paired sums); difference: mean ± standard error of the paired difference, counted only beyond 2 SE.", "",
              "| arm | selected defect images | vs random: difference | ratio | beyond 2 SE |", "|---|---:|---:|---:|---|"]
    for arm in arms:
        sel = values(arm, last, "defect_images") - values(arm, 0, "defect_images")
        if base is None:
            lines.append(f"| {arm} | {ms(sel)} | | | |")
            continue
        diff = sel - base
        se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        ratio = sel.sum() / base.sum() if base.sum() else float("nan")
        lines.append(f"| {arm} | {ms(sel)} | {diff.mean():+.1f} ± {se:.1f} | x{ratio:.2f} | "
                     f"{'yes' if abs(diff.mean()) > 2 * se else 'no'} |")
    lines += ["", "## Defect IoU of each round's model on the test set", "",
              "| arm | " + " | ".join(f"round {r}" for r in rounds) + " |", "|---|" + "---:|" * len(rounds)]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(ms(values(arm, r, "defect_iou"), 3) for r in rounds) + " |")
    lines += ["", "## Defect recall", "", "| arm | " + " | ".join(f"round {r}" for r in rounds) + " |",
              "|---|" + "---:|" * len(rounds)]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(ms(values(arm, r, "defect_recall"), 3) for r in rounds) + " |")
    models = [r for r in rows if r["round"] > 0 or r["arm"] == arms[0]]  # a round-0 model is shared by the arms
    zero = sum(1 for r in models if r["defect_images"] > 0 and r["defect_iou"] == 0)
    with_defects = sum(1 for r in models if r["defect_images"] > 0)
    lines += ["", f"Models trained with at least one defect image whose defect IoU is 0: {zero} of {with_defects}.", ""]
    (out / "rare_classes.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
