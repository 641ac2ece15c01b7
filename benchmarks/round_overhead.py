"""Where a round's time goes: model compute against everything else (a script, not a test).

    nice -n 10 .venv/bin/python benchmarks/round_overhead.py                # quickstart, CamVid 96x128, scoring
    .venv/bin/python benchmarks/round_overhead.py --cases quickstart --rounds 2

For each case it runs real experiments (``ActiveLearningLoop``, the simulated oracle, a fresh local
Ray cluster per run) twice in separate processes: with the launchers Shoal uses now (one training
worker as a Ray task in a warm worker process, scoring in warm Ray Data tasks) and with
``train.launcher: ray_train`` (a TorchTrainer per round, as before). Per round it splits the wall
time of the phases into

- training compute: the time spent inside the training loop (decoding, epochs, the final pass over
  the labeled set; ``TrainResult.loop_seconds``);
- scoring compute: the same round's pool scored by a plain single-process loop with the same model,
  batch size and thread count, timed in the same process after the run;
- overhead: everything else (Ray start-up of workers, task and dataset start, file I/O between
  phases, MLflow tracking, selection and labeling bookkeeping).

A separate case scores a pool of 2,000+ distinct synthetic images with ``workers.score_pool`` (one
warm task at a time) and with the plain loop, three times each, best of three: the throughput ratio
per worker. Writes ``benchmarks/results/round_overhead.json`` and ``.md``; every ratio is between
runs of the same script on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES: dict[str, dict[str, Any]] = {
    "quickstart": {"config": "configs/quickstart.yaml", "overrides": []},
    "camvid": {"config": "configs/camvid.yaml", "overrides": ["data.image_size=[96,128]", "train.num_workers=1",
                                                            "train.cpus_per_worker=2"]},
}


def plain_scoring_seconds(round_dir: Path, cfg: Any, threads: int) -> float:
    """The round's pool (``pool.parquet``, as the score phase wrote it) through ``PoolScorer`` in
    this process: the compute a scoring pass cannot avoid."""
    import pandas as pd
    import torch

    import workers

    torch.set_num_threads(threads)
    pool = pd.read_parquet(round_dir / "pool.parquet")
    classes = json.loads((round_dir.parents[1] / "classes.json").read_text())
    t0 = time.perf_counter()
    scorer = workers.PoolScorer(checkpoint_path=str(round_dir / "model.pt"), image_size=tuple(cfg.data.image_size),
                                class_names=tuple(classes["classes"]), ignore_index=int(classes["ignore_index"]))
    size = cfg.score.batch_size
    for start in range(0, len(pool), size):
        part = pool.iloc[start:start + size]
        scorer({c: part[c].to_numpy() for c in part.columns})
    return time.perf_counter() - t0


def run_case(name: str, launcher: str, rounds: int, workdir: Path) -> dict[str, Any]:
    """One experiment of ``rounds`` rounds in this (fresh) process."""
    from orchestrator import ActiveLearningLoop, load_config

    case = CASES[name]
    overrides = [*case["overrides"], f"loop.rounds={rounds}", f"train.launcher={launcher}"]
    cfg = load_config(ROOT / case["config"], overrides)
    t0 = time.perf_counter()
    loop = ActiveLearningLoop(cfg, workdir)
    loop.start()
    start_s = time.perf_counter() - t0
    loop.run()
    state = json.loads((workdir / "state.json").read_text())
    rows = []
    for h in state["history"]:
        round_dir = workdir / "rounds" / f"round-{h['round']:03d}"
        timings = h["timings"]
        loop_s = float(h["metrics"]["train_loop_seconds"])
        score_plain = plain_scoring_seconds(round_dir, cfg, threads=max(1, int(cfg.score.cpus_per_actor)))
        wall = float(sum(timings.values()))
        rows.append({
            "round": h["round"], "wall_s": wall, **{f"{k}_s": float(v) for k, v in timings.items()},
            "train_compute_s": loop_s, "score_compute_s": score_plain,
            "overhead_s": wall - loop_s - score_plain, "val_miou": h["metrics"]["val_miou"],
        })
    return {"case": name, "launcher": launcher, "start_s": start_s, "rounds": rows,
            "overrides": overrides, "config": case["config"]}


def scoring_case(root: Path, count: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """``score_pool`` (warm tasks, one at a time) against the plain loop on ``count`` images."""
    import pandas as pd
    import torch

    import workers
    from workers._models import build_model, save_model_state

    _, records = workers.generate_synthetic(root / "pool", count, 96, 128, 5, prefix="s")
    pool = pd.DataFrame({"sample_id": [r.sample_id for r in records], "image_path": [r.image_path for r in records],
                         "mask_path": "", "need_quality": True})
    pool.to_parquet(root / "pool.parquet", index=False)
    torch.manual_seed(0)
    save_model_state(build_model("unet", 5, {"base_channels": 16, "depth": 3}), root / "model.pt")
    names = workers.SYNTHETIC_CLASSES.names
    workers.ensure_ray(None, 2)
    ray_s, plain_s = [], []
    for k in range(repeats):
        t0 = time.perf_counter()
        result = workers.score_pool(str(root / "pool.parquet"), str(root / "model.pt"), (96, 128), str(root / f"out{k}"),
                                    num_actors=1, batch_size=batch_size, cpus_per_actor=1.0, class_names=names,
                                    ignore_index=255)
        assert result.num_scored == count
        ray_s.append(time.perf_counter() - t0)
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        scorer = workers.PoolScorer(checkpoint_path=str(root / "model.pt"), image_size=(96, 128), class_names=names,
                                    ignore_index=255)
        for start in range(0, count, batch_size):
            part = pool.iloc[start:start + batch_size]
            scorer({c: part[c].to_numpy() for c in part.columns})
        plain_s.append(time.perf_counter() - t0)
    return {"case": "scoring", "launcher": "auto", "images": count, "batch_size": batch_size, "ray_data_s": ray_s, "plain_s": plain_s,
            "ratio_best": min(plain_s) / min(ray_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["quickstart", "camvid", "scoring"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scoring-images", type=int, default=2048)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "LAUNCHER"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from round_overhead.json")
    args = parser.parse_args()
    if args.report_only:
        rewrite_report(Path(args.out))
        return
    if args.child:
        name, launcher = args.child
        if name == "scoring":
            record = scoring_case(Path(args.workdir), args.scoring_images, 16, 3)
        else:
            record = run_case(name, launcher, args.rounds, Path(args.workdir))
        print("RESULT " + json.dumps(record), flush=True)
        return

    import ray

    root = Path(tempfile.mkdtemp(prefix="shoal-overhead-", dir="/tmp"))
    results = []
    load_before = os.getloadavg()
    try:
        for name in args.cases:
            for launcher in (["auto", "ray_train"] if name != "scoring" else ["auto"]):
                workdir = root / f"{name}-{launcher}"
                cmd = [sys.executable, __file__, "--child", name, launcher, "--workdir", str(workdir),
                       "--rounds", str(args.rounds), "--scoring-images", str(args.scoring_images)]
                t0 = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                     env={**os.environ, "RAY_AUTH_MODE": "disabled"})
                found = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                if out.returncode != 0 or not found:
                    raise RuntimeError(f"{name} {launcher}: exit {out.returncode}\n{out.stderr[-4000:]}")
                record = json.loads(found[-1][len("RESULT "):])
                record["process_s"] = time.perf_counter() - t0
                results.append(record)
                print(f"{name} ({launcher}): done in {record['process_s']:.0f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    meta = {
        "command": shlex.join(["nice", "-n", "10", ".venv/bin/python", "benchmarks/round_overhead.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpus": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(), "ray": ray.__version__,
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
    }
    write_report(results, meta, Path(args.out))


def rewrite_report(out: Path) -> None:
    """The report again from ``round_overhead.json`` (``--report-only``)."""
    saved = json.loads((out / "round_overhead.json").read_text())
    for r in saved["results"]:
        r.setdefault("case", "scoring")
    write_report(saved["results"], saved["meta"], out)


def write_report(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "round_overhead.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "# Round overhead: model compute against everything else",
        "",
        f"Command: `{meta['command']}` (from the repository root)",
        "",
        f"{meta['date']}; {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}, ray {meta['ray']}. "
        f"Load average before: {', '.join(f'{v:.2f}' for v in meta['load_before'])}; after: "
        f"{', '.join(f'{v:.2f}' for v in meta['load_after'])} (a shared machine). No GPU.",
        "",
        "Per round: the wall time of the five phases; *train compute* is the time inside the training loop, "
        "*score compute* the same pool scored by a plain loop in one process with the same model; *overhead* "
        "is the rest. `auto` is how Shoal launches work now (one training worker as a Ray task in a warm "
        "process, scoring in warm Ray Data tasks); `ray_train` starts a TorchTrainer each round, as before.",
        "",
        "| case | launcher | round | wall s | train s | score s | select+label+track s | train compute s | "
        "score compute s | overhead s | overhead share | val mIoU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, Any] = {}
    for r in results:
        if r["case"] == "scoring":
            continue
        for row in r["rounds"]:
            rest = row["select_s"] + row["label_s"] + row["track_s"]
            lines.append(
                f"| {r['case']} | {r['launcher']} | {row['round']} | {row['wall_s']:.1f} | {row['train_s']:.1f} | "
                f"{row['score_s']:.1f} | {rest:.1f} | {row['train_compute_s']:.1f} | {row['score_compute_s']:.1f} | "
                f"{row['overhead_s']:.1f} | {row['overhead_s'] / row['wall_s']:.1%} | {row['val_miou']:.4f} |")
        later = r["rounds"][1:] or r["rounds"]
        summary[f"{r['case']}/{r['launcher']}"] = {
            "mean_overhead_s": sum(x["overhead_s"] for x in r["rounds"]) / len(r["rounds"]),
            "mean_overhead_s_after_round_1": sum(x["overhead_s"] for x in later) / len(later),
            "max_overhead_s": max(x["overhead_s"] for x in r["rounds"]),
            "mean_overhead_share": sum(x["overhead_s"] / x["wall_s"] for x in r["rounds"]) / len(r["rounds"]),
            "mean_wall_s": sum(x["wall_s"] for x in r["rounds"]) / len(r["rounds"]),
        }
    lines += ["", "| case / launcher | mean overhead s | max overhead s | mean overhead share | mean round wall s |",
              "|---|---:|---:|---:|---:|"]
    for key, v in summary.items():
        lines.append(f"| {key} | {v['mean_overhead_s']:.1f} | {v['max_overhead_s']:.1f} | "
                     f"{v['mean_overhead_share']:.1%} | {v['mean_wall_s']:.1f} |")
    for case in ("quickstart", "camvid"):
        new, old = summary.get(f"{case}/auto"), summary.get(f"{case}/ray_train")
        if new and old:
            lines.append(f"\n**{case}: overhead {new['mean_overhead_s']:.1f} s per round against "
                         f"{old['mean_overhead_s']:.1f} s with a TorchTrainer per round "
                         f"(x{new['mean_overhead_s'] / old['mean_overhead_s']:.2f}); rounds "
                         f"x{new['mean_wall_s'] / old['mean_wall_s']:.2f} as long.**")
    scoring = next((r for r in results if r["case"] == "scoring"), None)
    if scoring:
        lines += [
            "",
            f"Scoring {scoring['images']:,} distinct synthetic 96x128 images (UNet 16 channels, depth 3, batch "
            f"{scoring['batch_size']}, the label-review columns on), one worker with one thread: `workers.score_pool` "
            f"(Ray Data, warm tasks) {', '.join(f'{s:.1f}' for s in scoring['ray_data_s'])} s, plain loop "
            f"{', '.join(f'{s:.1f}' for s in scoring['plain_s'])} s. **Best of three: Ray Data at "
            f"x{scoring['ratio_best']:.2f} the plain loop's throughput.**",
        ]
    (out / "round_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-12:]))


if __name__ == "__main__":
    main()
