"""Start-up of an experiment on an unlabeled pool: time and driver memory (a script, not a test).

    nice -n 10 .venv/bin/python benchmarks/startup.py                 # pools of 1,000 and 100,000 images
    .venv/bin/python benchmarks/startup.py --sizes 1000 2000 --keep   # a quick check; keep the images

Generates small RGB PNGs (32x32 by default, in parallel, flat in ``<root>/pool/images`` under a
temporary folder in /tmp or ``--workdir``, never in the repository) with a ``classes.json`` and no
masks: the pool a new user starts from. For each pool size, in a fresh driver process, it runs what
``shoal run`` does before any training: ``ActiveLearningLoop.start()`` with the folder oracle and no
validation folder lists the pool, inspects every image in a Ray Data pass on the cluster's workers
(decoded once, its content hash kept), writes the first table revision and exports round 0 (16
random images for people to label). For comparison, the same process then decodes the same pool as
the start used to, in the driver with a thread pool (``--no-baseline`` skips it).

A thread samples the driver's resident memory (``VmRSS``) every 20 ms. Writes
``benchmarks/results/startup.json`` and ``.md`` with the command; ratios are between pool sizes
measured in the same run, and between the two ways of checking one pool in the same process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from pool_load import RssSampler  # noqa: E402

CHUNK = 1000


def _write_images(task: tuple[str, int, int, int]) -> int:
    """Write images ``start..stop-1`` of the pool: smooth colour fields with noise, seeded by index."""
    import cv2
    import numpy as np

    folder, start, stop, size = task
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(Path(folder) / f"img_{i:07d}.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return stop - start


def generate(pool: Path, count: int, size: int) -> float:
    """``count`` images in ``pool/images`` (reused when there), ``classes.json``; seconds spent."""
    marker = pool / f".generated-{count}-{size}"
    if marker.exists():
        return 0.0
    t0 = time.perf_counter()
    (pool / "images").mkdir(parents=True, exist_ok=True)
    (pool / "classes.json").write_text(json.dumps({"classes": ["background", "defect"], "ignore_index": 255}))
    tasks = [(str(pool / "images"), s, min(s + CHUNK, count), size) for s in range(0, count, CHUNK)]
    with multiprocessing.Pool(os.cpu_count() or 1) as workers_pool:
        assert sum(workers_pool.imap_unordered(_write_images, tasks)) == count
    marker.touch()
    return time.perf_counter() - t0


def measure(root: Path, count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start an experiment on the first ``count`` images in this (fresh) process."""
    sampler = RssSampler()
    import workers
    from orchestrator import ActiveLearningLoop, config_from_dict

    pool = root / f"pool-{count}"
    shutil.rmtree(pool, ignore_errors=True)
    (pool / "images").mkdir(parents=True)
    shutil.copy(root / "pool" / "classes.json", pool / "classes.json")
    for i in range(count):  # hard links: the same files, a pool of exactly this size
        os.link(root / "pool" / "images" / f"img_{i:07d}.png", pool / "images" / f"img_{i:07d}.png")
    work = root / f"work-{count}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = config_from_dict({
        "experiment": {"name": f"startup-{count}"},
        "data": {"kind": "folder", "train_dir": str(pool), "image_size": [args.image_size, args.image_size]},
        "model": {"name": "unet", "options": {"base_channels": 8, "depth": 2}},
        "loop": {"initial_labeled": 16, "budget": 16},
        "oracle": {"kind": "folder"},
        "ray": {"num_cpus": args.num_cpus},
    })
    record: dict[str, Any] = {"pool": count, "rss_after_imports_mib": sampler.rss_mib()}
    with sampler.phase(record, "ray_init"):
        workers.ensure_ray(None, args.num_cpus)
    inventory: dict[str, float] = {}
    inspect = workers.inspect_images

    def timed_inspect(*a: Any, **k: Any) -> Any:
        result = inspect(*a, **k)
        inventory["seconds"] = result.seconds
        return result

    workers.inspect_images = timed_inspect  # the start's Ray Data pass, timed
    with sampler.phase(record, "start"):
        loop = ActiveLearningLoop(cfg, work)
        state = loop.start()
    assert state.round == 0 and len(loop.awaiting_labels["requested"]) == 16
    assert loop.store.info(state.revision).num_rows == count
    record["inventory_seconds"] = inventory["seconds"]
    if args.baseline:
        with sampler.phase(record, "driver_decode"):
            from concurrent.futures import ThreadPoolExecutor

            _, records = workers.scan_folder_dataset(pool, require_masks=False)

            def problem(path: str) -> str | None:
                try:
                    workers.load_image(path)
                except (ValueError, OSError) as exc:
                    return str(exc)
                return None

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as threads:
                bad = [p for p in threads.map(problem, [r.image_path for r in records]) if p]
            assert not bad
    sampler.stop()
    import resource

    record["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["images_per_s"] = count / record["inventory_seconds"]
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(pool, ignore_errors=True)
    return record


def report(results: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    small, large = results[0], results[-1]
    summary: dict[str, Any] = {
        "pools": [small["pool"], large["pool"]],
        "start_peak_rss_ratio": large["start_rss_peak_mib"] / small["start_rss_peak_mib"],
        "start_seconds_ratio": large["start_seconds"] / small["start_seconds"],
        "pool_ratio": large["pool"] / small["pool"],
    }
    if "driver_decode_seconds" in large:
        summary["ray_pass_vs_driver_threads_seconds"] = large["inventory_seconds"] / large["driver_decode_seconds"]
    data = {"meta": meta, "summary": summary, "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "startup.json").write_text(json.dumps(data, indent=2) + "\n")
    baseline = "driver_decode_seconds" in large
    lines = [
        "# Start-up on an unlabeled pool: time and driver memory",
        "",
        f"Command: `{meta['command']}` (from the repository root)",
        "",
        f"{meta['date']}; {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}, ray {meta['ray']}. "
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in meta['load_before'])}; after: "
        f"{', '.join(f'{v:.2f}' for v in meta['load_after'])} (a shared machine).",
        "",
        f"Pool: {meta['image_size']}x{meta['image_size']} RGB PNGs, no masks, no validation folder, the folder "
        "oracle: `ActiveLearningLoop.start()` lists the pool, inspects every image in a Ray Data pass (decode and "
        "sha256 on the workers; one row of strings per image back to the driver), writes the first table "
        "revision and exports round 0 (16 random images) as a task folder. Each pool size runs in a fresh "
        f"driver process after Ray is up (local cluster, {meta['num_cpus']} CPUs). RSS is the driver's resident "
        f"memory, sampled every 20 ms. Image generation: {meta['generate_seconds']:.0f} s.",
        "",
        "| pool | start s | of which the Ray Data pass s | images/s (pass) | driver RSS before start MiB | "
        "driver peak RSS during start MiB |" + (" driver thread decode (the previous start) s | peak RSS MiB |" if baseline else ""),
        "|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if baseline else ""),
    ]
    for r in results:
        row = (f"| {r['pool']:,} | {r['start_seconds']:.1f} | {r['inventory_seconds']:.1f} | {r['images_per_s']:.0f} | "
               f"{r['start_rss_start_mib']:.0f} | {r['start_rss_peak_mib']:.0f} |")
        if baseline:
            row += f" {r['driver_decode_seconds']:.1f} | {r['driver_decode_rss_peak_mib']:.0f} |"
        lines.append(row)
    lines += [
        "",
        f"**From {small['pool']:,} to {large['pool']:,} images (x{summary['pool_ratio']:.0f}): the driver's peak RSS "
        f"during the start grows x{summary['start_peak_rss_ratio']:.2f}, the start's time x{summary['start_seconds_ratio']:.1f}.** "
        "The driver holds the listing, the table and one short row per image; no pixel reaches it.",
    ]
    if baseline:
        lines.append(
            f"On this machine the Ray Data pass over {large['pool']:,} images took "
            f"x{summary['ray_pass_vs_driver_threads_seconds']:.2f} the time of decoding them in the driver with "
            f"threads: on one 2-core machine it costs what Ray's tasks cost; on a cluster the decoding spreads over "
            f"every worker and the driver's CPU stays free.")
    lines.append("")
    (out_dir / "startup.md").write_text("\n".join(lines))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--workdir", help="where the images go (default: a new folder in /tmp, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the generated images")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the in-driver thread decode of the same pool")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workdir and Path(args.workdir).resolve().is_relative_to(ROOT):
        parser.error("--workdir must be outside the repository (generated images do not belong in it)")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="shoal-startup-", dir="/tmp")).resolve()
    if args.child is not None:
        print("RESULT " + json.dumps(measure(root, args.child, args)), flush=True)
        return

    import ray

    sizes = sorted(args.sizes)
    print(f"generating {sizes[-1]:,} images under {root}", flush=True)
    generate_s = generate(root / "pool", sizes[-1], args.image_size)
    results = []
    load_before = os.getloadavg()
    try:
        for count in sizes:
            cmd = [sys.executable, __file__, "--child", str(count), "--workdir", str(root),
                   "--image-size", str(args.image_size), "--num-cpus", str(args.num_cpus)]
            if not args.baseline:
                cmd.append("--no-baseline")
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            found = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not found:
                raise RuntimeError(f"pool of {count}: exit {out.returncode}\n{out.stderr[-4000:]}")
            record = json.loads(found[-1][len("RESULT "):])
            results.append(record)
            print(f"pool {count:>7,}: start {record['start_seconds']:.1f} s (Ray Data pass {record['inventory_seconds']:.1f} s), "
                  f"driver peak RSS {record['start_rss_peak_mib']:.0f} MiB", flush=True)
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(root, ignore_errors=True)
    meta = {
        "command": shlex.join(["nice", "-n", "10", ".venv/bin/python", "benchmarks/startup.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "ray": ray.__version__, "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "image_size": args.image_size, "num_cpus": args.num_cpus, "generate_seconds": generate_s,
    }
    summary = report(results, meta, Path(args.out))
    print(f"driver peak RSS during the start x{summary['start_peak_rss_ratio']:.2f} from {sizes[0]:,} to "
          f"{sizes[-1]:,} images; wrote {args.out}/startup.json and .md", flush=True)


if __name__ == "__main__":
    main()
