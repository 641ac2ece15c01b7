"""Rare-defect discovery on KolektorSDD: Shoal's strategies against random and against baal's
heuristics, in one harness, paired by seed (a script, not a test).

    nice -n 10 .venv/bin/python benchmarks/rare_classes.py                 # 5 seeds, 3 rounds
    .venv/bin/python benchmarks/rare_classes.py --report-only              # tables from the JSON
    # more seeds or arms later, into their own JSON, then one report over all of them:
    nice -n 10 .venv/bin/python benchmarks/rare_classes.py --first-seed 3 --seeds 2 --name rare_classes_s3
    .venv/bin/python benchmarks/rare_classes.py --report-only --merge rare_classes rare_classes_s3

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
arm's defect images after the last round to random's, with its standard error, and the area under
each seed's test mIoU and defect IoU curves paired with random's. ``--reference`` trains on the
whole pool instead (one model per seed, arm ``full``; ``--epochs`` as asked); merged into a report
it gives the full-supervision line, its training noise and random's curve as a share of it:

    nice -n 10 .venv/bin/python benchmarks/rare_classes.py --reference --seeds 3 --name rare_classes_full

Writes ``benchmarks/results/<name>.json`` and ``.md``.
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
    from workers._losses import LossSpec
    from workers._train import CHECKPOINT_FILE, TrainSpec, result_from_loop, train_loop

    spec = TrainSpec(
        model_name="unet", model_options={"base_channels": 16, "depth": 3, "dropout": 0.1},
        class_names=tuple(classes.names), ignore_index=classes.ignore_index, image_size=tuple(args.size),
        train_images=[r.image_path for r in records], train_masks=[str(r.mask_path) for r in records],
        train_weights=[1.0] * len(records), val_images=[r.image_path for r in val], val_masks=[str(r.mask_path) for r in val],
        epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, batch_size=8, lr=3e-3, weight_decay=1e-4,
        seed=seed, output_dir=str(out), loss=LossSpec(imbalance_sampling=args.imbalance_sampling))
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
    p.add_argument("--seeds", type=int, default=5, help="how many seeds, from --first-seed on")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--name", default="rare_classes", help="results file name (without .json) under --out")
    p.add_argument("--merge", nargs="+", metavar="NAME",
                   help="with --report-only: one report (rare_classes.md) over these results files' rows")
    p.add_argument("--arms", nargs="+", default=ARMS)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "rare_classes")
    p.add_argument("--imbalance-sampling", choices=["rare_images", "none"], default="rare_images",
                   help="train.loss.imbalance_sampling of every model (none: the recipe before rare-image sampling)")
    p.add_argument("--against", metavar="NAME", nargs="+",
                   help="with --report-only: the defect IoU of --name's models against this results file's, on the "
                        "same labeled sets (same arm, seed and round; random's sets do not depend on the model)")
    p.add_argument("--reference", action="store_true",
                   help="train on the whole pool instead (arm `full`, one model per seed: full supervision and "
                        "the training noise of one fixed set); merge its results file into the report")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.report_only and args.against:
        compare(args.out, args.name, args.against)
        return
    if args.report_only:
        names = args.merge or [args.name]  # the report: <--name>.md
        saved = [json.loads((args.out / f"{n}.json").read_text()) for n in names]
        # rows written before the training length was a column: their file's
        rows = [{"epochs": int(s["meta"]["args"]["epochs"]), "samples_per_epoch": int(s["meta"]["args"]["samples_per_epoch"]),
                 **r} for s in saved for r in s["rows"]]
        key = lambda r: (r["seed"], r["arm"], r["round"], r["epochs"], r["samples_per_epoch"])  # noqa: E731
        twice = {key(r) for r in rows if sum(key(q) == key(r) for q in rows) > 1}
        if twice:
            raise SystemExit(f"--merge: seed, arm, round and training {sorted(twice)[0]} are in more than one results file")
        report(rows, saved[0]["meta"], args.out, [s["meta"] for s in saved[1:]], name=args.name)
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
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if args.reference:
            model = train(train_records, val, classes, args, 1000 * seed, args.workdir / f"s{seed}-full")
            rows.append(model_row(seed, "full", 0, train_records, defective, rate, model, t_start, args))
            save(rows, args, seed, train_records, rate, t_start)
            continue
        rng0 = np.random.default_rng(seed)
        initial = [train_records[i] for i in sorted(rng0.choice(len(train_records), args.initial, replace=False))]
        first = train(initial, val, classes, args, 1000 * seed, args.workdir / f"s{seed}-r0")
        for arm in args.arms:
            labeled, model, rng = list(initial), first, np.random.default_rng([seed, 7])
            for rnd in range(args.rounds + 1):
                if rnd:
                    model = train(labeled, val, classes, args, 1000 * seed + rnd, args.workdir / f"s{seed}-{arm}-r{rnd}")
                rows.append(model_row(seed, arm, rnd, labeled, defective, rate, model, t_start, args))
                if rnd == args.rounds:
                    break
                pool = [r for r in train_records if r not in labeled]
                labeled += select(arm, model.checkpoint_path, pool, labeled, classes, args, rng, seed)
        save(rows, args, seed, train_records, rate, t_start)  # a run stopped early keeps the seeds it finished


def standard_error(diff: np.ndarray) -> float:
    """Of the mean of paired differences (nan for fewer than 2)."""
    return float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")


def verdict(diff: np.ndarray, se: float) -> str:
    """Beyond twice the standard error, with at least 3 paired seeds (2 give no usable error)."""
    if len(diff) < 3:
        return "too few seeds"
    return "yes" if abs(diff.mean()) > 2 * se else "no"


def model_row(seed: int, arm: str, rnd: int, labeled: list[Any], defective: set[str], rate: float, model: Any,
              t_start: float, args: argparse.Namespace) -> dict[str, Any]:
    found = sum(r.sample_id in defective for r in labeled)
    row = {"seed": seed, "arm": arm, "round": rnd, "labeled": len(labeled), "defect_images": found,
           "random_expected": rate * len(labeled), "defect_iou": model.val_iou_per_class[1],
           "defect_recall": model.val_recall_per_class[1], "val_miou": model.val_miou,
           "loss": model.loss_choice.get("loss"), "elapsed_s": time.perf_counter() - t_start,
           "epochs": args.epochs, "samples_per_epoch": args.samples_per_epoch}
    print(json.dumps(row), flush=True)
    return row


def save(rows: list[dict[str, Any]], args: argparse.Namespace, seed: int, train_records: list[Any], rate: float,
         t_start: float) -> None:
    import torch

    meta = {"command": shlex.join(["nice", "-n", "10", ".venv/bin/python", "benchmarks/rare_classes.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpus": os.cpu_count(),
            "platform": platform.platform(), "torch": torch.__version__, "wall_s": time.perf_counter() - t_start,
            "name": args.name, "seeds_done": seed + 1 - args.first_seed, "pool": len(train_records), "pool_defect_rate": rate,
            "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f"{args.name}.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    tmp.replace(args.out / f"{args.name}.json")
    report(rows, meta, args.out, name=args.name)

def compare(out: Path, name: str, against_files: list[str]) -> None:
    """``<name>_vs_<against>.md``: per round, the defect IoU of the two runs' models trained on the same
    labeled sets (paired by arm, seed and round where both have the same defect images), the paired
    difference with its standard error, and how many models with defect labels scored IoU 0."""
    mine = json.loads((out / f"{name}.json").read_text())
    earlier = [json.loads((out / f"{n}.json").read_text()) for n in against_files]
    theirs = {"rows": [r for e in earlier for r in e["rows"]]}
    against = " + ".join(against_files)
    key = lambda r: (r["arm"], r["seed"], r["round"])  # noqa: E731
    base = {key(r): r for r in theirs["rows"]}
    pairs = [(r, base[key(r)]) for r in mine["rows"] if key(r) in base and base[key(r)]["defect_images"] == r["defect_images"]]
    rounds = sorted({r["round"] for r, _ in pairs})
    lines = [f"# Defect IoU on the same labeled sets: {name} against {against}", "",
             "Commands: " + "; ".join(f"`{m['meta']['command']}`" for m in (mine, *earlier)) + "; this table: "
             f"`.venv/bin/python benchmarks/rare_classes.py --report-only --name {name} --against "
             f"{' '.join(against_files)}`.", "",
             f"Pairs: the same arm, seed and round, with the same defect images in the labeled set "
             f"({len(pairs)} models each). Mean ± standard deviation over seeds; difference: mean ± standard error.", "",
             f"| round | seeds | defect images | {name} | {against} | difference | beyond 2 SE |", "|---|---:|---:|---:|---:|---:|---|"]
    for rnd in rounds:
        now = np.asarray([a["defect_iou"] for a, b in pairs if a["round"] == rnd])
        before = np.asarray([b["defect_iou"] for a, b in pairs if a["round"] == rnd])
        found = np.asarray([a["defect_images"] for a, b in pairs if a["round"] == rnd])
        diff = now - before
        se = standard_error(diff)
        sd = (lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)  # noqa: E731
        lines.append(f"| {rnd} | {len(now)} | {found.mean():.1f} | {now.mean():.3f} ± {sd(now):.3f} | "
                     f"{before.mean():.3f} ± {sd(before):.3f} | {diff.mean():+.3f} ± {se:.3f} | "
                     f"{verdict(diff, se)} |")
    for label, side in ((name, 0), (against, 1)):
        with_defects = [p[side] for p in pairs if p[side]["defect_images"] > 0]
        zero = sum(1 for r in with_defects if r["defect_iou"] == 0)
        lines.append("")
        lines.append(f"{label}: models with at least one defect image in the labeled set whose defect IoU is 0: "
                     f"{zero} of {len(with_defects)}.")
    path = out / f"{name}_vs_{'_'.join(against_files)}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def report(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, more: list[dict[str, Any]] | None = None,
           name: str = "rare_classes") -> None:
    """Tables over ``rows``; an arm's figures are over the seeds it has, its paired difference to
    random over the seeds both have (runs merged from several results files may differ in both).
    Rows of arm ``full`` (``--reference``) are the full-supervision line, not an arm."""
    a = meta["args"]
    full = [r for r in rows if r["arm"] == "full"]
    rows = [r for r in rows if r["arm"] != "full"]
    if not rows:
        rows, full = full, []  # a --reference run on its own: its one round as the table
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    rounds = sorted({r["round"] for r in rows})
    last = rounds[-1]

    def seeds_of(arm: str) -> list[int]:
        return sorted({r["seed"] for r in rows if r["arm"] == arm and r["round"] == last})

    def values(arm: str, rnd: int, key: str, seeds: list[int] | None = None) -> np.ndarray:
        by_seed = {r["seed"]: r[key] for r in rows if r["arm"] == arm and r["round"] == rnd}
        return np.asarray([by_seed[s] for s in (seeds_of(arm) if seeds is None else seeds)], dtype=np.float64)

    def ms(v: np.ndarray, digits: int = 1) -> str:
        sd = np.nanstd(v, ddof=1) if len(v) > 1 else 0.0
        return f"{np.nanmean(v):.{digits}f} ± {sd:.{digits}f}"

    runs = [meta, *(more or [])]
    commands = "; ".join(f"`{m['command']}` ({m['date']}, {m['wall_s'] / 60:.0f} min)" for m in runs)
    if more:
        merged = ["nice", "-n", "10", ".venv/bin/python", "benchmarks/rare_classes.py", "--report-only", "--merge",
                  *[m.get("name", "rare_classes") for m in runs], *(["--name", name] if name != "rare_classes" else [])]
        commands += f"; this report: `{shlex.join(merged)}`"
    short = [m for m in runs if int(m.get("seeds_done", m["args"]["seeds"])) < int(m["args"]["seeds"])]
    modes = sorted({m["args"].get("imbalance_sampling", "none") for m in runs})
    sampling = ("yes (`train.loss.imbalance_sampling: rare_images`)" if modes == ["rare_images"] else
                "no (`imbalance_sampling: none`: the recipe before rare-image sampling)" if modes == ["none"] else
                "mixed across the merged runs: " + ", ".join(modes))
    stopped = ", ".join(f"`{m.get('name', 'rare_classes')}` finished {m['seeds_done']} of the {m['args']['seeds']} seeds "
                        "it asked for" for m in short)
    lines = [
        "# Rare-defect discovery on KolektorSDD: Shoal's strategies, random and baal",
        "",
        f"Commands (from the repository root): {commands}; {meta['cpus']} CPUs, torch {meta['torch']}.",
        "",
        f"Pool: {meta['pool']} KolektorSDD train images, {100 * meta['pool_defect_rate']:.1f}% with a defect; test: "
        f"the 96 val images. {a['initial']} random initial images per seed (the same for every arm), {a['budget']} "
        f"per round, {len(rounds) - 1} rounds; UNet 16 channels, depth 3, dropout 0.1, {a['size']} (H, W), "
        f"{a['epochs']} epochs of {a['samples_per_epoch']} samples, Shoal's loss settings (the rare-class "
        f"recipe switches on when the rarest class is under 1% of the labeled pixels; images holding the rare class "
        f"drawn more often: {sampling}). Mean ± standard deviation over each arm's seeds (column `seeds`)"
        + (f"; baal arms: baal 2.1 `Entropy` / `BALD` (reduction mean) over {MC_PASSES} MC-dropout passes of the "
           "same model." if any(arm.startswith("baal_") for arm in arms) else "."),
        "",
        *([f"Stopped early: {stopped}; the tables hold the finished seeds, paired.", ""]
          if short else []),
        "## Defect images in the labeled set",
        "",
        "| arm | seeds | " + " | ".join(f"round {r} (labeled {int(values(arms[0], r, 'labeled')[0])})" for r in rounds) + " |",
        "|---|---|" + "---:|" * len(rounds),
    ]
    for arm in arms:
        lines.append(f"| {arm} | {len(seeds_of(arm))} | "
                     + " | ".join(ms(values(arm, r, "defect_images")) for r in rounds) + " |")
    lines.append("| (random's expectation: pool rate x labeled) | | "
                 + " | ".join(f"{values(arms[0], r, 'random_expected')[0]:.1f}" for r in rounds) + " |")
    lines += ["", f"## After round {last}: defect images selected, paired by seed", "",
              "Selected = found in the labeled set minus the initial set's. Over the seeds the arm and random both have: "
              "ratio = selected / random's selected (seed-paired sums); difference = mean ± standard error of the paired "
              "difference, counted only beyond 2 SE.", "",
              "| arm | paired seeds | selected defect images | random's, same seeds | difference | ratio | beyond 2 SE |",
              "|---|---|---:|---:|---:|---:|---|"]
    for arm in arms:
        both = sorted(set(seeds_of(arm)) & set(seeds_of("random")))
        sel = values(arm, last, "defect_images", both) - values(arm, 0, "defect_images", both)
        base = values("random", last, "defect_images", both) - values("random", 0, "defect_images", both)
        if not both:
            lines.append(f"| {arm} | 0 | | | | | |")
            continue
        diff = sel - base
        se = standard_error(diff)
        ratio = sel.sum() / base.sum() if base.sum() else float("nan")
        lines.append(f"| {arm} | {len(both)} | {ms(sel)} | {ms(base)} | {diff.mean():+.1f} ± {se:.1f} | x{ratio:.2f} | "
                     f"{verdict(diff, se)} |")
    for title, key in (("Defect IoU of each round's model on the test set", "defect_iou"), ("Defect recall", "defect_recall"),
                       ("Test mIoU (background and defect) of each round's model", "val_miou")):
        lines += ["", f"## {title}", "", "| arm | " + " | ".join(f"round {r}" for r in rounds) + " |",
                  "|---|" + "---:|" * len(rounds)]
        for arm in arms:
            lines.append(f"| {arm} | " + " | ".join(ms(values(arm, r, key), 3) for r in rounds) + " |")
    if len(rounds) > 1 and "random" in arms:
        lines += auc_lines(rows, arms, rounds, seeds_of, values)
    if full:
        lines += reference_lines(full, rows, rounds, meta, values)
    models = [r for r in rows if r["round"] > 0 or r["arm"] == arms[0]]  # a round-0 model is shared by the arms
    zero = sum(1 for r in models if r["defect_images"] > 0 and r["defect_iou"] == 0)
    with_defects = sum(1 for r in models if r["defect_images"] > 0)
    lines += ["", f"Models trained with at least one defect image whose defect IoU is 0: {zero} of {with_defects}.", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def auc_lines(rows: list[dict[str, Any]], arms: list[str], rounds: list[int], seeds_of: Any, values: Any) -> list[str]:
    """Area under each seed's curve over the labeled counts (trapezoid, divided by the span: the curve's
    mean height), paired with random's on the same seeds, in IoU points (x100)."""
    labeled = values(arms[0], rounds[0], "labeled")[0], values(arms[0], rounds[-1], "labeled")[0]
    lines = ["", f"## Area under the curve, rounds {rounds[0]}-{rounds[-1]}, paired with random", "",
             f"Mean height of each seed's curve over {int(labeled[0])}-{int(labeled[1])} labeled images (trapezoid), "
             "in points (x100); difference: mean ± standard error over the seeds the arm and random both have.", "",
             "| arm | paired seeds | test mIoU AUC | difference | beyond 2 SE | defect IoU AUC | difference | beyond 2 SE |",
             "|---|---|---:|---:|---|---:|---:|---|"]

    def auc(arm: str, key: str, seeds: list[int]) -> np.ndarray:
        x = np.asarray([values(arm, r, "labeled", seeds)[0] for r in rounds], dtype=np.float64)
        y = np.stack([values(arm, r, key, seeds) for r in rounds])  # [rounds, seeds]
        return 100 * ((y[1:] + y[:-1]) / 2 * np.diff(x)[:, None]).sum(0) / (x[-1] - x[0])

    for arm in arms:
        both = sorted(set(seeds_of(arm)) & set(seeds_of("random")))
        if not both:
            continue
        cells = []
        for key in ("val_miou", "defect_iou"):
            mine, base = auc(arm, key, both), auc("random", key, both)
            diff = mine - base
            se = standard_error(diff)
            sd = float(mine.std(ddof=1)) if len(mine) > 1 else 0.0
            cells += [f"{mine.mean():.1f} ± {sd:.1f}", f"{diff.mean():+.1f} ± {se:.1f}",
                      verdict(diff, se)]
        lines.append(f"| {arm} | {len(both)} | " + " | ".join(cells) + " |")
    return lines


def reference_lines(full: list[dict[str, Any]], rows: list[dict[str, Any]], rounds: list[int], meta: dict[str, Any],
                    values: Any) -> list[str]:
    """The full-supervision lines (every pool image; one per training length, rows without one have
    the report's) with their training noise, and random's curve as a share of each: whether it still
    rises over the budgets compared."""
    a = meta["args"]
    steps = lambda r: (int(r.get("epochs", a["epochs"])), int(r.get("samples_per_epoch", a["samples_per_epoch"])))  # noqa: E731
    groups = {k: [r for r in full if steps(r) == k] for k in sorted({steps(r) for r in full})}
    lines = ["", f"## Full supervision: all {full[0]['labeled']} pool images, the same model and recipe", ""]
    refs = []
    for (epochs, samples), group in groups.items():
        def ms(key: str, group: list[dict[str, Any]] = group) -> str:
            v = np.asarray([r[key] for r in group], dtype=np.float64)
            return f"{v.mean():.3f} ± {(v.std(ddof=1) if len(v) > 1 else 0.0):.3f}"

        same = (epochs, samples) == (int(a["epochs"]), int(a["samples_per_epoch"]))
        label = f"{epochs} epochs of {samples} samples" + (" (the rounds' training)" if same else "")
        refs.append((label, float(np.mean([r["val_miou"] for r in group])), float(np.mean([r["defect_iou"] for r in group]))))
        lines.append(f"- {label}, {len(group)} seeds (standard deviation = the training noise of one fixed labeled "
                     f"set): test mIoU {ms('val_miou')}, defect IoU {ms('defect_iou')}, defect recall {ms('defect_recall')}.")
    if any(r["arm"] == "random" for r in rows):
        lines += ["", "Random's models as a share of it (mean over random's seeds):", "",
                  "| round | labeled (share of the pool) | " + " | ".join(
                      f"test mIoU, % of full ({label}) | defect IoU, % of full ({label})" for label, _, _ in refs) + " |",
                  "|---|---:|" + "---:|---:|" * len(refs)]
        for rnd in rounds:
            n = values("random", rnd, "labeled")[0]
            cells = [f"{100 * values('random', rnd, 'val_miou').mean() / miou:.0f}% | "
                     f"{100 * values('random', rnd, 'defect_iou').mean() / iou:.0f}%" for _, miou, iou in refs]
            lines.append(f"| {rnd} | {int(n)} ({100 * n / meta['pool']:.0f}%) | " + " | ".join(cells) + " |")
    return lines

if __name__ == "__main__":
    main()
