"""Driver memory and throughput when a large pool is scored and selected (a script, not a test).

    nice -n 10 .venv/bin/python benchmarks/pool_load.py            # pools of 1,000 / 10,000 / 100,000
    .venv/bin/python benchmarks/pool_load.py --sizes 1000 --keep   # a quick check; keep the images

Generates small synthetic RGB PNGs (32x32 by default, in parallel, under a temporary folder in /tmp
or ``--workdir``, never in the repository), then, for each pool size, in a fresh driver process:
writes the pool table the loop's score phase writes (``sample_id``, ``image_path``, ``mask_path``,
``need_quality``), scores it with ``workers.score_pool`` (Ray Data tasks: images are decoded inside the workers, only
per-image numbers are written, as Parquet, by the cluster), reads the scores back and selects 1% of
the pool with the ``entropy`` strategy: first as the loop's select phase does (only the columns the
strategy declares), then reading every score column (what the loop did before).

A thread samples the driver's resident memory (``VmRSS``) every 20 ms; the peak of each phase and
of the whole process (``ru_maxrss``) are reported. Images and probabilities never reach the driver,
so its memory should not grow with the pool beyond the per-image rows of the tables themselves
(tens of bytes per image); the decoded pixels and probabilities of one 32x32 image alone are
~23 KB. Writes ``benchmarks/results/pool_load.json`` and ``.md``. The machine may be shared: the
load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_CLASSES = 5
MODEL_NAME = "unet"
MODEL_OPTIONS: dict[str, Any] = {"base_channels": 8, "depth": 2}
SHARD = 1000
"""Images per sub-folder."""


def image_path(root: Path, i: int) -> Path:
    return root / "images" / f"{i // SHARD:04d}" / f"{i:07d}.png"


def _write_images(task: tuple[str, int, int, int]) -> int:
    """Write images ``start..stop-1``: smooth colour fields with noise, seeded by their index."""
    import cv2
    import numpy as np

    root, start, stop, size = task
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        path = image_path(Path(root), i)
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return stop - start


def generate(root: Path, count: int, size: int) -> float:
    """Write ``count`` images under ``root`` with every CPU (reused when already there); seconds."""
    marker = root / f".generated-{count}-{size}"
    if marker.exists():
        return 0.0
    t0 = time.perf_counter()
    tasks = [(str(root), s, min(s + SHARD, count), size) for s in range(0, count, SHARD)]
    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        done = sum(pool.imap_unordered(_write_images, tasks))
    assert done == count
    marker.touch()
    return time.perf_counter() - t0


def write_checkpoint(path: Path) -> None:
    """A freshly initialised tiny U-Net: scoring cost does not depend on what it learned."""
    import torch

    from workers._models import build_model, save_model_state

    torch.manual_seed(0)
    save_model_state(build_model(MODEL_NAME, NUM_CLASSES, MODEL_OPTIONS), path)


# ------------------------------------------------------------------------------ one pool size


class RssSampler:
    """Samples this process's resident set size (``VmRSS``) in a thread; peaks per phase, in MiB."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.phase_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc/self/status")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.phase_peak = max(self.phase_peak, self.rss_mib())
            time.sleep(self.interval_s)

    @contextmanager
    def phase(self, record: dict[str, Any], name: str) -> Iterator[None]:
        start = self.rss_mib()
        self.phase_peak = start
        t0 = time.perf_counter()
        yield
        record[f"{name}_seconds"] = time.perf_counter() - t0
        record[f"{name}_rss_start_mib"] = start
        record[f"{name}_rss_peak_mib"] = max(self.phase_peak, self.rss_mib())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(root: Path, count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Score and select a pool of the first ``count`` images in this (fresh) process."""
    sampler = RssSampler()
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    import workers
    from strategies import build_strategy

    record: dict[str, Any] = {"pool": count, "rss_after_imports_mib": sampler.rss_mib()}
    work = root / f"pool-{count}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with sampler.phase(record, "ray_init"):
        workers.ensure_ray(None, args.num_cpus)
    with sampler.phase(record, "table"):  # what the loop's score phase writes: one row per image
        pool = pd.DataFrame({
            "sample_id": [f"{i:07d}" for i in range(count)],
            "image_path": [str(image_path(root, i)) for i in range(count)],
            "mask_path": "",
            "need_quality": True,
        })
        pool.to_parquet(work / "pool.parquet", index=False)
        del pool
    with sampler.phase(record, "score"):
        result = workers.score_pool(
            str(work / "pool.parquet"), str(root / "model.pt"), (args.image_size, args.image_size), str(work / "scores"),
            num_actors=args.num_actors, batch_size=args.batch_size, cpus_per_actor=1.0,
            class_names=tuple(f"c{k}" for k in range(NUM_CLASSES)), ignore_index=255,
        )
    assert result.num_scored == count, (result.num_scored, count)
    budget = max(1, count // 100)
    strategy = build_strategy("entropy")
    # First only the columns the strategy declares (what the loop's select phase does), then every
    # score column (what it did before): measured in this order so that the smaller peak is not
    # hidden under the larger one (freed memory is not always returned to the OS).
    with sampler.phase(record, "select_declared"):
        declared = ["sample_id", *sorted(strategy.requirements().columns)]
        scores = pq.read_table(result.scores_dir, columns=declared).to_pandas().sort_values("sample_id", ignore_index=True)
        picked = strategy.select(scores.assign(labeled=False), budget, np.random.default_rng(0))
        del scores
    with sampler.phase(record, "select"):
        scores = workers.read_scores(result.scores_dir).sort_values("sample_id", ignore_index=True)
        record["score_table_mib"] = float(scores.memory_usage(deep=True).sum()) / 2**20
        record["score_columns"] = len(scores.columns)
        selected = strategy.select(scores.assign(labeled=False), budget, np.random.default_rng(0))
    assert len(selected) == budget and selected == picked
    sampler.stop()
    record["budget"] = budget
    record["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["images_per_s"] = count / record["score_seconds"]
    shutil.rmtree(work, ignore_errors=True)
    return record


# ------------------------------------------------------------------------------ report


def report(results: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    small, large = results[0], results[-1]
    ratio = large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"]

    def declared_peak(r: dict[str, Any]) -> float:  # the driver's peak had select read only declared columns
        return max(r["score_rss_peak_mib"], r["select_declared_rss_peak_mib"])

    growth = (large["driver_peak_rss_mib"] - small["driver_peak_rss_mib"]) * 2**20 / (large["pool"] - small["pool"]) \
        if large["pool"] > small["pool"] else 0.0
    pixels = meta["image_size"] ** 2
    summary = {
        "peak_rss_ratio": ratio,
        "peak_rss_ratio_pools": [small["pool"], large["pool"]],
        "score_peak_rss_ratio": large["score_rss_peak_mib"] / small["score_rss_peak_mib"],
        "declared_columns_peak_rss_ratio": declared_peak(large) / declared_peak(small),
        "driver_growth_bytes_per_image": growth,
        "decoded_bytes_per_image": pixels * 3 + pixels * NUM_CLASSES * 4,
    }
    data = {"meta": meta, "summary": summary, "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pool_load.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Pool load: driver memory while scoring and selecting",
        "",
        f"Command: `{meta['command']}` (from the repository root)",
        "",
        f"{meta['date']}; {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}, ray {meta['ray']}. "
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in meta['load_before'])}; after: "
        f"{', '.join(f'{v:.2f}' for v in meta['load_after'])} (a shared machine: other jobs ran, so the "
        "throughput is a lower bound).",
        "",
        f"Pool: {meta['image_size']}x{meta['image_size']} RGB PNGs, model {MODEL_NAME} {MODEL_OPTIONS} with "
        f"{NUM_CLASSES} classes (untrained), `workers.score_pool` with {meta['num_actors']} worker(s), batch size "
        f"{meta['batch_size']}, the label-review columns on (as the loop runs it); then `read_scores` and "
        "`entropy` selection of 1% of the pool. Each pool size runs in a fresh driver process; RSS is the "
        "driver's resident memory (sampled every 20 ms; the Ray workers are other processes). Image "
        f"generation: {meta['generate_seconds']:.0f} s.",
        "",
        "Driver RSS in MiB, peak of each phase with its value at the start in brackets. *select, declared "
        "columns* reads only `sample_id` and the columns the strategy declares, as the loop's select phase does "
        "(run first); *select* reads every score column, as it did before (run second, in the same process).",
        "",
        "| pool | driver peak RSS | after Ray init | after pool table | score | select, declared columns | "
        "select | score s | images/s | select s | score table MiB (columns) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['pool']:,} | {r['driver_peak_rss_mib']:.0f} | {r['ray_init_rss_peak_mib']:.0f} | "
            f"{r['table_rss_peak_mib']:.0f} | {r['score_rss_peak_mib']:.0f} ({r['score_rss_start_mib']:.0f}) | "
            f"{r['select_declared_rss_peak_mib']:.0f} ({r['select_declared_rss_start_mib']:.0f}) | "
            f"{r['select_rss_peak_mib']:.0f} ({r['select_rss_start_mib']:.0f}) | {r['score_seconds']:.1f} | "
            f"{r['images_per_s']:.0f} | {r['select_seconds']:.2f} | {r['score_table_mib']:.1f} ({r['score_columns']}) |")
    lines += [
        "",
        f"**Driver peak RSS through scoring and the loop's selection (declared columns only) at {large['pool']:,} "
        f"vs {small['pool']:,} images: x{summary['declared_columns_peak_rss_ratio']:.2f}** (images and probabilities "
        f"stay in the workers: {summary['decoded_bytes_per_image']:,} bytes per image of decoded pixels and class "
        f"probabilities never reach the driver). During scoring the driver's peak grows "
        f"x{summary['score_peak_rss_ratio']:.2f} (the pool table it wrote before). Reading the whole score table "
        f"({large['score_columns']} columns) into pandas, as selection did before, the peak grows x{ratio:.2f} "
        f"({growth:.0f} bytes per extra pool image)."
        "",
    ]
    (out_dir / "pool_load.md").write_text("\n".join(lines))
    return summary


def cleanup(root: Path, args: argparse.Namespace) -> None:
    """Remove the generated images unless asked to keep them (or they were put in ``--workdir``)."""
    if not (args.keep or args.workdir):
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--workdir", help="where the images go (default: a new folder in /tmp, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the generated images")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workdir and Path(args.workdir).resolve().is_relative_to(ROOT):
        parser.error("--workdir must be outside the repository (generated images do not belong in it)")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="shoal-pool-load-", dir="/tmp")).resolve()

    if args.child is not None:  # one pool size, in a fresh process
        print("RESULT " + json.dumps(measure(root, args.child, args)), flush=True)
        return

    import ray

    sizes = sorted(args.sizes)
    root.mkdir(parents=True, exist_ok=True)
    print(f"generating {sizes[-1]:,} images under {root}", flush=True)
    generate_s = generate(root, sizes[-1], args.image_size)
    write_checkpoint(root / "model.pt")
    results = []
    load_before = os.getloadavg()
    try:
        for count in sizes:
            cmd = [sys.executable, __file__, "--child", str(count), "--workdir", str(root),
                   "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                   "--num-actors", str(args.num_actors), "--num-cpus", str(args.num_cpus)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            found = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not found:
                raise RuntimeError(f"pool of {count}: exit {out.returncode}\n{out.stderr[-4000:]}")
            record = json.loads(found[-1][len("RESULT "):])
            results.append(record)
            print(f"pool {count:>7,}: driver peak RSS {record['driver_peak_rss_mib']:.0f} MiB, "
                  f"scored {record['images_per_s']:.0f} images/s ({record['score_seconds']:.1f} s), "
                  f"selected in {record['select_seconds']:.2f} s", flush=True)
    except BaseException:
        cleanup(root, args)
        raise
    meta = {
        "command": shlex.join(["nice", "-n", "10", ".venv/bin/python", "benchmarks/pool_load.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "ray": ray.__version__, "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "image_size": args.image_size, "batch_size": args.batch_size, "num_actors": args.num_actors,
        "generate_seconds": generate_s,
    }
    summary = report(results, meta, Path(args.out))
    cleanup(root, args)
    print(f"driver peak RSS x{summary['peak_rss_ratio']:.2f} from {sizes[0]:,} to {sizes[-1]:,} images "
          f"({summary['driver_growth_bytes_per_image']:.0f} bytes per extra image); "
          f"wrote {args.out}/pool_load.json and .md", flush=True)


if __name__ == "__main__":
    main()
