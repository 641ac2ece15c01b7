"""Label efficiency on CamVid: selection strategies against random, several seeds (a script, not a test).

    .venv/bin/python benchmarks/label_efficiency.py                      # the CPU setting below
    .venv/bin/python benchmarks/label_efficiency.py --report-only        # tables and plot from the CSV

Every run is a real Shoal experiment (``orchestrator.ActiveLearningLoop``: Ray Data scoring, the
strategies' declared columns and embeddings, the simulated oracle, MLflow in the run's work dir)
on ``configs/camvid.yaml``: the 367 CamVid train images are the pool, the 101 val images the test
set. For each seed the initial labeled set is the same for every strategy (it depends on the seed
only), and so is the budget per round; round r's model is trained from scratch on the labels of
rounds < r and its best epoch by val mIoU is kept (as every round does), after enough steps to
converge on small sets (``--epochs`` x ``--samples-per-epoch``).

Writes ``benchmarks/results/label_efficiency.csv`` (one row per strategy, seed and round),
``label_efficiency.md`` (mean and standard deviation over seeds of val mIoU at each labeled count,
the area under each curve, each point as a % of the full-supervision reference, and each strategy's
paired difference to random) and ``label_efficiency.png``. Runs already finished in ``--workdir``
are reused, so an interrupted benchmark continues where it stopped.

Region-level runs (``--strategies random region_class_balanced region_random``, ``loop.unit:
region``) label superpixels under a click budget per round (``--budget-clicks``; by default what
``--budget`` whole images cost on average, so both units spend the same clicks per round). Every CSV
row carries ``clicks`` (the clicks of the labels the round's model was trained on, the initial set's
polygons included) and ``labeled_clicks`` (after the round's labeling); with region runs the report
adds val mIoU on the click axis for every strategy and the clicks each needed to reach 95% of the
full-supervision reference.

On a GPU cluster, the same comparison at full scale is a config change, e.g.::

    .venv/bin/python benchmarks/label_efficiency.py --size 360 480 --rounds 8 --epochs 40 \\
        --set train.use_gpu=true --set train.num_workers=4 --set score.gpus_per_actor=0.25 \\
        --set score.num_actors=4 --reference benchmarks/results/camvid_reference_full.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from camvid_reference import split_val, test_metrics  # noqa: E402

from orchestrator import ActiveLearningLoop, config_from_dict  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/camvid"
RESULTS = ROOT / "benchmarks/results"
log = logging.getLogger("label_efficiency")

STRATEGIES: dict[str, dict[str, Any]] = {
    "random": {"strategy": "random"},
    "entropy_topk": {"strategy": "entropy", "strategy_options": {"aggregation": "topk"}},
    "entropy_classweighted": {"strategy": "entropy", "strategy_options": {"aggregation": "classweighted"}},
    "coreset": {"strategy": "coreset"},
    "cluster_uncertainty": {"strategy": "cluster_uncertainty"},
    "class_balance": {"strategy": "class_balance"},
    "fusion_entropy_balance": {"strategy": "fusion", "strategy_options": {"members": {
        "entropy": {"weight": 0.5, "aggregation": "topk"}, "class_balance": 0.5}}},
    "power_entropy": {"strategy": "power", "strategy_options": {"base": {"name": "entropy", "aggregation": "topk"}}},
    # region-level: superpixels labeled under --budget-clicks per round (see run_config)
    "region_class_balanced": {"strategy": "region_class_balanced", "unit": "region"},
    "region_uncertainty": {"strategy": "region_uncertainty", "unit": "region"},
    "region_random": {"strategy": "region_random", "unit": "region"},
}
DEFAULT = ["random", "entropy_topk", "coreset", "fusion_entropy_balance"]
REGION_STRATEGIES = [name for name, entry in STRATEGIES.items() if entry.get("unit") == "region"]
RARE_CLASSES = ("pole", "sign_symbol", "pedestrian", "bicyclist")
"""CamVid's rare classes (each a few percent of the pixels or less): their test IoU is in every row."""
REACHES = (0.90, 0.95)
"""The shares of the full-supervision reference whose cost (in clicks) the click-axis report gives."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", nargs="+", default=DEFAULT, choices=sorted(STRATEGIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--size", type=int, nargs=2, default=[48, 64], metavar=("H", "W"))
    p.add_argument("--initial", type=int, default=20, help="initial labeled images (random, per seed)")
    p.add_argument("--budget", type=int, default=20, help="images labeled per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds; round r trains on initial + (r-1) * budget")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--samples-per-epoch", type=int, default=120)
    p.add_argument("--budget-clicks", type=float, default=None,
                   help="region runs: clicks per round (default: --budget times the mean click cost of a train image)")
    p.add_argument("--region-method", choices=["slic", "grid"], default="slic", help="region runs: how images are cut")
    p.add_argument("--region-segments", type=int, default=100,
                   help="region runs, slic: superpixels per image at --size")
    p.add_argument("--cell-px", type=int, default=8, help="region runs, grid: cell side in pixels at --size")
    p.add_argument("--initial-clicks", type=float, default=None,
                   help="region runs: start from random regions worth these clicks (regions.initial_clicks), no "
                        "whole image; default: the --initial whole images")
    p.add_argument("--merge-csv", nargs="+", default=[], metavar="CSV[:STRATEGY,...]",
                   help="add the rows of --seeds from earlier runs' CSVs made with the same size and training settings: "
                        "image-level runs on the same click axis, or seeds and strategies run apart (with --report-only "
                        "too); after a colon, the strategies to take from that file (default: --merge-strategies); a "
                        "(strategy, seed, round) already present keeps its first row")
    p.add_argument("--merge-strategies", nargs="+", default=[],
                   help="the strategies --merge-csv takes from a file that names none (default: all)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/shoal-label-efficiency"))
    p.add_argument("--test-images", type=int, default=50,
                   help="hold out this many of the 101 val images as the test set the curves report; the rounds "
                        "choose their best epoch on the other val images (0 = val does both)")
    p.add_argument("--reference", type=Path, default=RESULTS / "camvid_reference_48x64_test50.json",
                   help="full-supervision reference JSON (benchmarks/camvid_reference.py) at the same size "
                        "(and the same --test-images)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.use_gpu=true (repeatable)")
    p.add_argument("--out", default="label_efficiency", help="file stem under benchmarks/results")
    p.add_argument("--report-only", action="store_true", help="rebuild the tables and plot from the CSV")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, strategy: str, seed: int) -> Any:
    base = yaml.safe_load((ROOT / "configs/camvid.yaml").read_text())
    base["experiment"] = {"name": f"le-{strategy}", "seed": seed}
    base["data"].update({"train_dir": str(args.data / "train"), "val_dir": str(val_dir(args)),
                         "image_size": list(args.size)})
    base["train"].update({"epochs": args.epochs, "samples_per_epoch": args.samples_per_epoch, "num_workers": 0})
    base["loop"] = {"initial_labeled": args.initial, "budget": args.budget, "rounds": args.rounds,
                    **STRATEGIES[strategy]}
    if STRATEGIES[strategy].get("unit") == "region":
        base["regions"] = {"method": args.region_method, "n_segments": args.region_segments, "cell_px": args.cell_px,
                           "budget_clicks": args.budget_clicks or default_budget_clicks(args),
                           "initial_clicks": args.initial_clicks}
    base["ray"] = {"num_cpus": os.cpu_count() or 2}
    return config_from_dict(base, [*args.overrides])


def val_dir(args: argparse.Namespace) -> Path:
    """The loop's validation folder: CamVid val, or with ``--test-images`` the part of it not held out."""
    if not args.test_images:
        return Path(args.data / "val")
    return split_val(args.data, args.test_images, args.workdir / "camvid-split")[0]


def test_dir(args: argparse.Namespace) -> Path | None:
    return split_val(args.data, args.test_images, args.workdir / "camvid-split")[1] if args.test_images else None


_IMAGE_CLICKS: dict[str, float] = {}


def default_budget_clicks(args: argparse.Namespace, sample: int = 40) -> float:
    """``--budget`` times the mean click cost of drawing a train image (its polygons, the default
    cost model), over a fixed sample of train masks: region runs then spend per round what
    image-level runs do."""
    key = str(args.data)
    if key not in _IMAGE_CLICKS:
        from workers import image_annotation_costs, scan_folder_dataset

        classes, records = scan_folder_dataset(str(args.data / "train"))
        picked = [records[i] for i in np.random.default_rng(0).permutation(len(records))[:sample]]
        costs = image_annotation_costs([r.sample_id for r in picked], [r.mask_path for r in picked], classes)
        _IMAGE_CLICKS[key] = float(costs["clicks"].mean())
        log.info("a train image costs %.0f clicks on average (%d masks): %d images = %.0f clicks per round",
                 _IMAGE_CLICKS[key], len(picked), args.budget, args.budget * _IMAGE_CLICKS[key])
    return round(args.budget * _IMAGE_CLICKS[key])


def full_labeling_clicks(args: argparse.Namespace) -> float:
    """What labeling every train image costs in clicks (its polygons, the default cost model)."""
    from workers import image_annotation_costs, scan_folder_dataset

    classes, records = scan_folder_dataset(str(args.data / "train"))
    costs = image_annotation_costs([r.sample_id for r in records], [r.mask_path for r in records], classes)
    return float(costs["clicks"].sum())


def run_all(args: argparse.Namespace, csv: Path) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for strategy in args.strategies:
            workdir = args.workdir / f"{strategy}-seed{seed}"
            cfg = run_config(args, strategy, seed)
            t0 = time.perf_counter()
            try:
                loop = ActiveLearningLoop(cfg, workdir)
            except ValueError:  # a different config from an earlier invocation: start over
                import shutil

                shutil.rmtree(workdir)
                loop = ActiveLearningLoop(cfg, workdir)
            loop.run()
            log.info("%s seed %d: %.0f s, val mIoU %s", strategy, seed, time.perf_counter() - t0,
                     [round(r.val_miou, 4) for r in loop.history])
            held_out = test_dir(args)
            for r in loop.history:
                model = workdir / "rounds" / f"round-{r.round:03d}" / "model.pt"
                tested = test_metrics(str(model), held_out, tuple(args.size)) if held_out else None
                rows.append({"strategy": strategy, "seed": seed, "round": r.round, "trained_on": r.trained_on,
                             "val_miou": r.val_miou,
                             "test_miou": tested["miou"] if tested else None,
                             **{f"test_iou_{c}": tested["iou"].get(c) if tested else None for c in RARE_CLASSES},
                             "round_seconds": r.seconds,
                             "train_seconds": r.timings["train"], "score_seconds": r.timings["score"],
                             "select_seconds": r.timings["select"],
                             # the click axis (absent from rounds run before Shoal counted clicks)
                             "clicks": r.extra.get("trained_on_clicks"), "labeled_clicks": r.extra.get("clicks")})
            # written after every run, so a long benchmark can be looked at while it goes
            pd.DataFrame(rows).to_csv(csv, index=False)
    return pd.DataFrame(rows)


def auc(group: pd.DataFrame) -> float:
    from workers import learning_curve_auc

    return learning_curve_auc(group["trained_on"].to_numpy(), group["miou"].to_numpy())


def summarize(df: pd.DataFrame, reference: float | None) -> dict[str, Any]:
    regions = df[df["strategy"].isin(REGION_STRATEGIES)]
    images = df[~df["strategy"].isin(REGION_STRATEGIES)]
    summary = summarize_images(images, reference) if len(images) else {
        "counts": [], "curves": {}, "paired_vs_random": {}, "reference_miou": reference}
    if len(regions) and "clicks" in df.columns:  # region runs: every strategy on the click axis too
        summary["clicks"] = summarize_clicks(df, reference)
    return summary


def summarize_clicks(df: pd.DataFrame, reference: float | None) -> dict[str, Any]:
    """Per strategy and round: mean clicks trained on and val mIoU (mean, std over seeds); the
    clicks at which the mean curve reaches each of ``REACHES`` of the reference (linear between
    rounds), and per seed whether it was reached; val mIoU at ``common`` clicks, the most that every run of every
    strategy reached (each seed's curve interpolated there), so strategies compare at equal cost."""
    out: dict[str, Any] = {}
    runs = df.dropna(subset=["clicks"]).sort_values("round")
    spans = runs.groupby(["strategy", "seed"])["clicks"].agg(["min", "max"])
    common = float(spans["max"].min())
    if common < float(spans["min"].max()):  # no cost every run reached within its curve: nothing to compare
        common = float("nan")
    for s in dict.fromkeys(df["strategy"]):
        sub = runs[runs["strategy"] == s]
        stats = sub.groupby("round").agg(clicks=("clicks", "mean"), miou=("miou", "mean"),
                                         std=("miou", "std"), seeds=("seed", "nunique"))
        at_common = {int(seed): float(np.interp(common, g["clicks"], g["miou"])) if math.isfinite(common) else float("nan")
                     for seed, g in sub.groupby("seed")}
        reach: dict[str, Any] = {}
        for level in REACHES:
            target = level * reference if reference else None
            per_seed = [reach_clicks(g["clicks"].to_numpy(), g["miou"].to_numpy(), target) for _, g in sub.groupby("seed")]
            reach[f"{level:.2f}"] = {
                "clicks": reach_clicks(stats["clicks"].to_numpy(), stats["miou"].to_numpy(), target),
                "seeds_reaching": sum(c is not None for c in per_seed)}
        out[s] = {"round": stats.index.tolist(), "clicks": stats["clicks"].tolist(), "mean": stats["miou"].tolist(),
                  "std": stats["std"].fillna(0.0).tolist(), "seeds": int(stats["seeds"].max()),
                  "reach": reach,
                  "best_share": float(stats["miou"].max() / reference) if reference else None,
                  "common_clicks": common, "miou_at_common": float(np.mean(list(at_common.values()))),
                  "miou_at_common_std": float(np.std(list(at_common.values()), ddof=1)) if len(at_common) > 1 else 0.0,
                  "at_common_by_seed": at_common}
    if "random" in out:  # paired by seed (the same initial set): the difference at equal clicks
        base = out["random"]["at_common_by_seed"]
        for c in out.values():
            diff = np.array([v - base[seed] for seed, v in c["at_common_by_seed"].items() if seed in base])
            c["vs_random_at_common"] = float(diff.mean()) if len(diff) else float("nan")
            c["vs_random_at_common_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    if "region_random" in out:  # region strategies against random regions: paired by seed, same initial regions
        def click_auc(g: pd.DataFrame) -> float:
            x, y = g["clicks"].to_numpy(np.float64), g["miou"].to_numpy(np.float64)
            return float(np.trapezoid(y, x) / (x[-1] - x[0])) if len(x) > 1 and x[-1] > x[0] else float("nan")

        base_auc = {int(seed): click_auc(g) for seed, g in runs[runs["strategy"] == "region_random"].groupby("seed")}
        for s in out:
            if s == "region_random" or s not in REGION_STRATEGIES:
                continue
            mine = {int(seed): click_auc(g) for seed, g in runs[runs["strategy"] == s].groupby("seed")}
            diff = np.array([v - base_auc[k] for k, v in mine.items() if k in base_auc and math.isfinite(v - base_auc[k])])
            out[s]["vs_region_random"] = {
                "auc_diff_mean": float(diff.mean()) if len(diff) else float("nan"),
                "auc_diff_se": float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
                "seeds": len(diff), "seeds_better": int((diff > 0).sum())}
    return out


def summarize_rare(df: pd.DataFrame) -> dict[str, Any]:
    """Per strategy with the ``test_iou_<class>`` columns: the last round's rare-class test IoU, mean
    and standard deviation over seeds."""
    columns = [f"test_iou_{c}" for c in RARE_CLASSES]
    if not set(columns) <= set(df.columns):
        return {}
    out: dict[str, Any] = {}
    for s, sub in df.dropna(subset=columns, how="all").groupby("strategy", sort=False):
        last = sub[sub["round"] == sub["round"].max()]
        out[str(s)] = {"round": int(last["round"].iloc[0]), "seeds": int(last["seed"].nunique()),
                       "clicks": float(last["clicks"].mean()) if "clicks" in last else float("nan"),
                       "mean": [float(last[c].mean()) for c in columns],
                       "std": [float(last[c].std(ddof=1)) if len(last) > 1 else 0.0 for c in columns]}
    return out


def reach_clicks(clicks: np.ndarray, miou: np.ndarray, target: float | None) -> float | None:
    """The clicks at which the curve (``miou`` over increasing ``clicks``) first reaches ``target``,
    linear between points; None when it never does."""
    if target is None:
        return None
    above = np.flatnonzero(miou >= target)
    if not len(above):
        return None
    i = int(above[0])
    if i == 0:
        return float(clicks[0])
    x0, x1, y0, y1 = clicks[i - 1], clicks[i], miou[i - 1], miou[i]
    return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))


def summarize_images(df: pd.DataFrame, reference: float | None) -> dict[str, Any]:
    counts = sorted(df["trained_on"].unique())
    strategies = list(dict.fromkeys(df["strategy"]))
    curves: dict[str, Any] = {}
    aucs = df.groupby(["strategy", "seed"]).apply(auc, include_groups=False).rename("auc").reset_index()
    for s in strategies:
        sub = df[df["strategy"] == s]
        stats = sub.groupby("trained_on")["miou"].agg(["mean", "std", "count"]).reindex(counts)
        a = aucs[aucs["strategy"] == s]["auc"]
        curves[s] = {"mean": stats["mean"].tolist(), "std": stats["std"].fillna(0.0).tolist(),
                     "seeds": int(stats["count"].max()), "auc_mean": float(a.mean()), "auc_std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}
    paired: dict[str, Any] = {}
    if "random" in strategies:
        base = aucs[aucs["strategy"] == "random"].set_index("seed")["auc"]
        for s in strategies:
            if s == "random":
                continue
            mine = aucs[aucs["strategy"] == s].set_index("seed")["auc"]
            common = base.index.intersection(mine.index)
            diff = (mine[common] - base[common]).to_numpy()
            wins = int((diff > 0).sum())
            se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
            paired[s] = {"auc_diff_mean": float(diff.mean()) if len(diff) else float("nan"), "auc_diff_se": se,
                         "seeds_better": wins, "seeds": int(len(diff))}
    return {"counts": [int(c) for c in counts], "curves": curves, "paired_vs_random": paired, "reference_miou": reference}


def write_markdown(path: Path, args: argparse.Namespace, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    ref = summary["reference_miou"]
    m = meta["metric"]
    counts = summary["counts"]
    lines = [
        "# Label efficiency on CamVid: strategies against random",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['date']}; {meta['machine']}. Wall time {meta['wall_minutes']:.1f} min for the runs this invocation "
        f"made (runs reused from the work dir not counted). Load average before {meta['load_before']}, after {meta['load_after']} "
        "(the machine is shared).",
        "",
        f"Setting: `configs/camvid.yaml` (unet, base 16, depth 3) at {args.size[0]}x{args.size[1]}; pool = the 367 train "
        f"images, {meta['split']}; {args.initial} initial images at random (the same set for every strategy of a "
        f"seed), {args.budget} per round, {args.rounds} rounds; every round trains from scratch for {args.epochs} epochs of "
        f"{args.samples_per_epoch} samples and keeps the best epoch by val mIoU; seeds {', '.join(map(str, args.seeds))}."
        + (f" Region-level runs ({', '.join(s for s in summary['clicks'] if s in REGION_STRATEGIES)}) start from "
           + (f"random regions worth {args.initial_clicks:.0f} clicks spread over the pool (`regions.initial_clicks`, no "
              "whole image)" if args.initial_clicks else "the same initial images")
           + f" and label {args.region_method} regions ({args.region_segments} superpixels per image at "
           f"{args.size[0]}x{args.size[1]}) with {args.budget_clicks or default_budget_clicks(args):.0f} clicks per round, "
           "trained on by the share of a whole image their labels make up."
           if summary.get("clicks") and any(s in REGION_STRATEGIES for s in summary["clicks"]) else "")
        + (f" Config overrides: {', '.join(f'`{o}`' for o in args.overrides)}." if args.overrides else "")
        + (" Rows merged from other runs (`--merge-csv`, the command above) keep their own rounds and budgets."
           if args.merge_csv else ""),
        *merged_from(args.merge_csv),
        "",
        f"## {m} by labeled images (mean ± std over seeds)",
        "",
        "| strategy | " + " | ".join(str(c) for c in counts) + " | AUC (mean ± std) |",
        "|---|" + "---:|" * (len(counts) + 1),
    ]
    for s, c in summary["curves"].items():
        cells = [f"{v:.3f} ± {sd:.3f}" for v, sd in zip(c["mean"], c["std"])]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {c['auc_mean']:.4f} ± {c['auc_std']:.4f} |")
    if ref:
        lines += ["", f"## As a % of the full-supervision reference ({m} {ref:.3f}: all 367 images, same model, size and split)", "",
                  "| strategy | " + " | ".join(str(c) for c in counts) + " |", "|---|" + "---:|" * len(counts)]
        for s, c in summary["curves"].items():
            lines.append(f"| {s} | " + " | ".join(f"{100 * v / ref:.1f}%" for v in c["mean"]) + " |")
    if summary["paired_vs_random"]:
        lines += ["", "## Against random, paired by seed (same initial set)", "",
                  "| strategy | AUC difference (mean ± s.e.) | seeds better than random |", "|---|---:|---:|"]
        for s, p in summary["paired_vs_random"].items():
            lines.append(f"| {s} | {p['auc_diff_mean']:+.4f} ± {p['auc_diff_se']:.4f} | {p['seeds_better']} of {p['seeds']} |")
    lines += ["", f"AUC: the area under {m} over labeled images, divided by the range of labeled images "
              "(the mean mIoU over the curve). " + (
                  "The best epoch is chosen on the val images that are not held out; the test images only measure."
                  if m.startswith("test") else
                  "The best epoch is chosen on the same val images the table reports (as in every Shoal round); that "
                  "flatters every strategy alike by a little.")]
    if summary.get("clicks"):
        common = next(iter(summary["clicks"].values()))["common_clicks"]
        compared = math.isfinite(common)
        full = summary.get("full_labeling_clicks")

        def share(k: float) -> str:
            return f" ({100 * k / full:.1f}%)" if full else ""

        lines += ["", f"## {m} by annotator clicks (region-level and image-level runs; mean over seeds)", "",
                  "Clicks: the labels each round's model was trained on, by `strategies.CostModel` (an image: its "
                  "polygons' vertices; a region: one click, plus polygons when mixed). Image-level rows count whole "
                  "images; region-level rows count regions."
                  + (" With `cost.purity_threshold=0` every region is one click, labeled with its dominant class "
                     "(dominant labeling: no polygons, some pixels wrong)."
                     if run_config(args, "region_random", 0).cost.purity_threshold == 0 else "")
                  + (f" Labeling the whole pool costs {full:.0f} clicks (every train mask's polygons); the "
                     "percentages are of that." if full else ""), "",
                  f"| strategy | seeds | clicks → {m} (± std) per round | "
                  + (f"{m} at {common:.0f} clicks (± std) | paired vs random there (mean ± s.e.) | " if compared else "")
                  + "best, % of reference | "
                  + " | ".join(f"clicks to reach {100 * level:.0f}% of the reference (seeds reaching)" for level in REACHES)
                  + " |", "|---|---:|---|" + "---:|" * (len(REACHES) + (3 if compared else 1))]
        for s, c in summary["clicks"].items():
            points = ", ".join(f"{k:.0f} → {v:.3f} ± {sd:.3f}" for k, v, sd in zip(c["clicks"], c["mean"], c["std"]))
            best = f"{100 * c['best_share']:.1f}%" if c["best_share"] is not None else "n/a"
            paired = (f"{c['vs_random_at_common']:+.3f} ± {c['vs_random_at_common_se']:.3f}"
                      if s != "random" and "vs_random_at_common" in c else "")
            reach = " | ".join(
                (f"{r['clicks']:.0f}{share(r['clicks'])}" if r["clicks"] is not None else "not reached")
                + f" ({r['seeds_reaching']} of {c['seeds']})" for r in c["reach"].values())
            at = f"{c['miou_at_common']:.3f} ± {c['miou_at_common_std']:.3f} | {paired} | " if compared else ""
            lines.append(f"| {s} | {c['seeds']} | {points} | {at}{best} | {reach} |")
        spans = {s: (c["clicks"][0], c["clicks"][-1]) for s, c in summary["clicks"].items()}
        lines += ["", (f"{common:.0f} clicks{share(common)}: the most that every run reached (each seed's curve "
                       "interpolated there), so every strategy is compared at the same cost; paired by seed where both "
                       "have the seed." if compared else
                       "No click count lies on every curve (mean clicks from first to last round: "
                       + ", ".join(f"{s} {lo:.0f}-{hi:.0f}" for s, (lo, hi) in spans.items())
                       + "), so they are compared by the clicks each needs.")
                  + " Clicks to reach: where the mean curve crosses the line, linear between rounds; seeds reaching: "
                  "the seeds whose own curve reaches it."]
        against = {s: c["vs_region_random"] for s, c in summary["clicks"].items() if "vs_region_random" in c}
        if against:
            lines += ["", "## Region strategies against random regions, paired by seed (same initial regions)", "",
                      "| strategy | click-axis AUC difference (mean ± s.e.) | seeds better than region_random |",
                      "|---|---:|---:|"]
            lines += [f"| {s} | {a['auc_diff_mean']:+.4f} ± {a['auc_diff_se']:.4f} | {a['seeds_better']} of {a['seeds']} |"
                      for s, a in against.items()]
            lines += ["", "Click-axis AUC: the area under each seed's test mIoU over its clicks, divided by their range."]
    rare = summary.get("rare_classes")
    if rare:
        lines += ["", "## CamVid's rare classes: test IoU of the last round's model (mean ± std over seeds)", "",
                  "Rows of runs made before these columns were recorded are left out.", "",
                  "| strategy | seeds | round (clicks) | " + " | ".join(RARE_CLASSES) + " |",
                  "|---|---:|---|" + "---:|" * len(RARE_CLASSES)]
        for s, r in rare.items():
            lines.append(f"| {s} | {r['seeds']} | {r['round']} ({r['clicks']:.0f}) | "
                         + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in zip(r["mean"], r["std"])) + " |")
    if meta.get("verdict"):
        lines += ["", "## Reading", "", meta["verdict"]]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, summary: dict[str, Any], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.asarray(summary["counts"])
    for s, c in summary["curves"].items():
        m, sd = np.asarray(c["mean"]), np.asarray(c["std"])
        ax.plot(x, m, marker="o", label=f"{s} (AUC {c['auc_mean']:.3f})", linestyle="--" if s == "random" else "-")
        ax.fill_between(x, m - sd, m + sd, alpha=0.15)
    if summary["reference_miou"]:
        ax.axhline(summary["reference_miou"], color="k", linewidth=0.8, label="full supervision (367 images)")
    ax.set_xlabel("labeled images")
    ax.set_ylabel(metric)
    ax.set_title("CamVid label efficiency (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_clicks(path: Path, summary: dict[str, Any], metric: str) -> None:
    """val mIoU over clicks for every strategy (region-level and image-level runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, c in summary["clicks"].items():
        x, m, sd = np.asarray(c["clicks"]), np.asarray(c["mean"]), np.asarray(c["std"])
        ax.plot(x, m, marker="o", label=s, linestyle="-" if s in REGION_STRATEGIES else "--")
        ax.fill_between(x, m - sd, m + sd, alpha=0.15)
    for level, style in zip(REACHES, (":", "-")):
        if summary["reference_miou"]:
            ax.axhline(level * summary["reference_miou"], color="k", linewidth=0.8, linestyle=style,
                       label=f"{100 * level:.0f}% of full supervision")
    ax.set_xlabel("annotator clicks (labels trained on)")
    ax.set_ylabel(metric)
    ax.set_title("CamVid: regions against images on the click axis (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reading(diff: float, se: float) -> str:
    """How a paired difference reads: clear only beyond twice its standard error."""
    if math.isfinite(se) and abs(diff) > 2 * se:
        return "beats" if diff > 0 else "trails"
    return "is within noise of"


def verdict(summary: dict[str, Any], noise: dict[str, Any] | None = None) -> str:
    """The reading of the tables: which strategies separate from random (by more than twice the
    standard error of the paired difference), on the image axis and, with region runs, at equal
    clicks; and, from ``noise`` (``benchmarks/training_noise.py``'s summary: the spread of one
    labeled set's mIoU over training seeds), how many seeds a difference of 0.01 would need."""
    parts = []
    for s, p in summary["paired_vs_random"].items():
        diff, se = p["auc_diff_mean"], p["auc_diff_se"]
        parts.append(f"{s} {reading(diff, se)} random (AUC {diff:+.4f} ± {se:.4f}, better on {p['seeds_better']} of {p['seeds']} seeds)")
    text = "; ".join(parts) + "." if parts else ""
    clicks = summary.get("clicks") or {}
    for s, c in clicks.items():
        if s == "random" or s not in REGION_STRATEGIES or "vs_random_at_common" not in c \
                or not math.isfinite(c["common_clicks"]):
            continue
        diff, se = c["vs_random_at_common"], c["vs_random_at_common_se"]
        text += (f" At {c['common_clicks']:.0f} clicks (the initial set's plus what every run spent) {s} {reading(diff, se)} "
                 f"image-level random ({diff:+.3f} ± {se:.3f} test mIoU, paired by seed).")
    for s, c in clicks.items():
        if "vs_region_random" in c:
            a = c["vs_region_random"]
            diff, se = a["auc_diff_mean"], a["auc_diff_se"]
            text += (f" {s} {reading(diff, se)} random regions on the click axis (AUC {diff:+.4f} ± {se:.4f}, better on "
                     f"{a['seeds_better']} of {a['seeds']} seeds).")
    text = (text + " A difference counts as clear here only when it exceeds twice its standard error.").lstrip()
    spread = float(np.mean([sd for c in summary["curves"].values() for sd in c["std"][1:]] or [0.0]))
    falling = [s for s, c in summary["curves"].items() if any(b < a for a, b in zip(c["mean"], c["mean"][1:]))]
    falling += [s for s, c in clicks.items() if s in REGION_STRATEGIES and any(b < a for a, b in zip(c["mean"], c["mean"][1:]))]
    if falling:
        text += f" The mean curve of {', '.join(falling)} falls somewhere as labels are added."
    text += f" The seed-to-seed standard deviation after round 1 averages {spread:.3f} mIoU."
    if noise:
        sigma = float(np.mean([v["std"] for v in noise.values()]))
        need = math.ceil(8 * sigma**2 / 0.01**2)
        text += (f" Training alone, on one fixed labeled set, spreads by {sigma:.3f} mIoU over training seeds "
                 f"(benchmarks/results/training_noise.md, every recipe tried): two runs of a comparison differ by "
                 f"about {math.sqrt(2) * sigma:.3f} from training alone, so a true difference of 0.01 mIoU needs "
                 f"about {need} seeds to exceed twice its standard error.")
    return text


def merge_source(source: str, default: list[str]) -> tuple[Path, list[str]]:
    """A ``--merge-csv`` entry: its CSV and the strategies to take from it (after a colon, else
    ``default``; empty: every one)."""
    head, colon, named = source.rpartition(":")
    path, take = (Path(head), named.split(",")) if colon and head.endswith(".csv") else (Path(source), default)
    return path, [n for n in take if n]


def merged_from(sources: list[str]) -> list[str]:
    """Report lines naming how each ``--merge-csv`` file was made: the command, date and wall time
    of the JSON written beside it, when there is one."""
    lines = []
    for source in sources:
        path, _ = merge_source(source, [])
        ran = path.with_suffix(".json")
        if ran.exists():
            meta = json.loads(ran.read_text())
            lines += ["", f"`{path.name}` was made by `{meta.get('command', '?')}` ({meta.get('date', '?')}, "
                          f"{float(meta.get('wall_minutes') or 0):.0f} min, load average before {meta.get('load_before')})."]
    return lines


def merge_rows(df: pd.DataFrame | None, sources: list[str], strategies: list[str], seeds: list[int]) -> pd.DataFrame:
    """``df`` (None: none yet) with the rows of ``seeds`` from each CSV in ``sources``, in order: of
    the strategies named after its colon (``runs.csv:random,entropy_topk``), else of ``strategies``
    (empty: every one); a (strategy, seed, round) already present keeps its first row, so merging
    the same file twice changes nothing."""
    frames = [] if df is None else [df]
    for source in sources:
        path, take = merge_source(source, strategies)
        unknown = sorted(set(take) - set(STRATEGIES))
        if unknown:
            raise SystemExit(f"--merge-csv {source}: unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
        if not path.exists():
            raise SystemExit(f"--merge-csv {source}: no such file {path}")
        rows = pd.read_csv(path)
        rows = rows[rows["seed"].isin(seeds) & (rows["strategy"].isin(take) if take else True)]
        if rows.empty:
            raise SystemExit(f"--merge-csv {source}: no rows of {take or 'any strategy'} for seeds {seeds}")
        frames.append(rows)
    merged = pd.concat(frames, ignore_index=True)
    return merged.drop_duplicates(["strategy", "seed", "round"], keep="first").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("ray", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv = RESULTS / f"{args.out}.csv"
    load_before = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    df = pd.read_csv(csv) if args.report_only and csv.exists() else None
    if df is None and not args.report_only:
        df = run_all(args, csv)
    if args.merge_csv:
        df = merge_rows(df, args.merge_csv, args.merge_strategies, args.seeds)
        df.to_csv(csv, index=False)
    if df is None:
        raise SystemExit(f"{csv}: no such file (run the experiments first, or name CSVs with --merge-csv)")
    wall = (time.perf_counter() - t0) / 60
    tested = "test_miou" in df.columns and df["test_miou"].notna().all()
    df["miou"] = df["test_miou"] if tested else df["val_miou"]
    reference = None
    if args.reference.exists():
        ref = json.loads(args.reference.read_text())
        if tested and ref.get("test_miou") is None:
            raise SystemExit(f"{args.reference}: no test_miou; run benchmarks/camvid_reference.py with --test-images "
                             f"{args.test_images}")
        reference = float(ref["test_miou"] if tested else ref["val_miou"])
    summary = summarize(df, reference)
    if summary.get("clicks"):
        summary["full_labeling_clicks"] = full_labeling_clicks(args)
    summary["rare_classes"] = summarize_rare(df)
    meta = {
        "command": shlex.join([".venv/bin/python", "benchmarks/label_efficiency.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        "wall_minutes": wall, "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    meta["metric"] = "test mIoU" if tested else "val mIoU"
    meta["split"] = (f"test = {args.test_images} of the 101 val images held out (the rounds choose their best epoch on "
                     f"the other {101 - args.test_images})" if tested else "test = the 101 val images")
    previous = RESULTS / f"{args.out}.json"
    if args.report_only and previous.exists():  # the figures of the invocation that ran the experiments
        ran = json.loads(previous.read_text())
        meta.update({k: ran[k] for k in ("command", "date", "wall_minutes", "load_before", "load_after") if k in ran})
    noise_file = RESULTS / "training_noise.json"
    noise = json.loads(noise_file.read_text())["summary"] if noise_file.exists() else None
    meta["verdict"] = verdict(summary, noise) if summary["paired_vs_random"] or summary.get("clicks") else ""
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           **summary, **meta}, indent=2) + "\n")
    write_markdown(RESULTS / f"{args.out}.md", args, summary, meta)
    plot(RESULTS / f"{args.out}.png", summary, str(meta["metric"]))
    if summary.get("clicks"):
        plot_clicks(RESULTS / f"{args.out}_clicks.png", summary, str(meta["metric"]))
    print((RESULTS / f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
