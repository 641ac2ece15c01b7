"""Scoring a pool from an S3-compatible bucket against the same pool on local disk (a script, not a test).

    nice -n 10 .venv/bin/python benchmarks/object_store.py            # 1,024 images, 3 repeats
    .venv/bin/python benchmarks/object_store.py --images 256 --repeats 1

Writes synthetic 96x128 images (``workers.generate_synthetic``) to a temporary folder, starts an S3
server on 127.0.0.1 (moto's server mode, from the dev extra; a MinIO or a cloud bucket would be
faster or slower depending on the network, this measures what reading through the object store
interface costs on one machine), uploads the images, then scores the pool with
``workers.score_pool`` (Ray Data, one warm task at a time, the same model) from each place, in
alternation, and reports the throughput ratio. Writes ``benchmarks/results/object_store.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="shoal-objstore-", dir="/tmp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": endpoint,
                       "AWS_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled"})
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        results = run(root, endpoint, args)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    report(results, args)


def run(root: Path, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd
    import pyarrow.fs as pafs
    import ray
    import torch

    import workers
    from workers._models import build_model, save_model_state

    _, records = workers.generate_synthetic(root / "pool", args.images, 96, 128, 11, prefix="s")
    host = endpoint.split("://")[1]
    pafs.S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True,
                      region="us-east-1").create_dir("bench")
    t0 = time.perf_counter()
    for r in records:
        workers.write_bytes(f"s3://bench/pool/images/{Path(r.image_path).name}", Path(r.image_path).read_bytes())
    upload_s = time.perf_counter() - t0
    torch.manual_seed(0)
    save_model_state(build_model("unet", 5, {"base_channels": 16, "depth": 3}), root / "model.pt")
    tables = {}
    for where, paths in (("local", [r.image_path for r in records]),
                         ("bucket", [f"s3://bench/pool/images/{Path(r.image_path).name}" for r in records])):
        table = pd.DataFrame({"sample_id": [r.sample_id for r in records], "image_path": paths, "mask_path": "",
                              "need_quality": True})
        table.to_parquet(root / f"{where}.parquet", index=False)
        tables[where] = str(root / f"{where}.parquet")
    workers.ensure_ray(None, 2)
    seconds: dict[str, list[float]] = {"local": [], "bucket": []}
    for k in range(args.repeats):
        for where in ("local", "bucket") if k % 2 == 0 else ("bucket", "local"):
            t0 = time.perf_counter()
            result = workers.score_pool(tables[where], str(root / "model.pt"), (96, 128), str(root / f"out-{where}-{k}"),
                                        num_actors=1, batch_size=16, cpus_per_actor=1.0,
                                        class_names=workers.SYNTHETIC_CLASSES.names, ignore_index=255)
            assert result.num_scored == args.images
            seconds[where].append(time.perf_counter() - t0)
            print(f"{where}: {seconds[where][-1]:.1f} s", flush=True)
    local = pd.read_parquet(root / f"out-local-{args.repeats - 1}").sort_values("sample_id", ignore_index=True)
    bucket = pd.read_parquet(root / f"out-bucket-{args.repeats - 1}").sort_values("sample_id", ignore_index=True)
    same = bool(local.equals(bucket))
    ray.shutdown()
    return {"images": args.images, "seconds": seconds, "upload_s": upload_s, "same_scores": same,
            "ratio_best": min(seconds["local"]) / min(seconds["bucket"])}


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    import ray

    out = Path(args.out)
    meta = {"command": shlex.join(["nice", "-n", "10", ".venv/bin/python", "benchmarks/object_store.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "ray": ray.__version__,
            "load": list(os.getloadavg())}
    (out / "object_store.json").write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    s = results["seconds"]
    lines = [
        "# Scoring from a bucket against local disk",
        "",
        f"Command: `{meta['command']}` (from the repository root)",
        "",
        f"{meta['date']}; {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}, ray {meta['ray']}; "
        f"load average at the end {', '.join(f'{v:.2f}' for v in meta['load'])} (a shared machine).",
        "",
        f"{results['images']:,} synthetic 96x128 PNGs scored by `workers.score_pool` (UNet 16 channels, depth 3, "
        "batch 16, one warm task, the label-review columns on), alternately from local disk and from an "
        "S3-compatible server on 127.0.0.1 (moto in server mode: the images travel over HTTP through "
        "pyarrow's S3 client, one GET per image, in the Ray worker).",
        "",
        "| where | seconds per pass | images/s (best) |",
        "|---|---|---:|",
        f"| local disk | {', '.join(f'{v:.1f}' for v in s['local'])} | {results['images'] / min(s['local']):.1f} |",
        f"| bucket | {', '.join(f'{v:.1f}' for v in s['bucket'])} | {results['images'] / min(s['bucket']):.1f} |",
        "",
        f"**Best of {len(s['local'])}: scoring from the bucket at x{results['ratio_best']:.2f} the throughput of local "
        f"disk.** The scores were {'identical' if results['same_scores'] else 'NOT identical'} between the two. "
        f"Uploading the pool took {results['upload_s']:.0f} s.",
        "",
    ]
    (out / "object_store.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
