"""`ray start --head` then `ray job submit --working-dir . -- shoal run ...` on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT, stop_group, tiny_overrides

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def head(tmp_path: Path):
    """A Ray head node on 127.0.0.1 in its own process group, killed as a group afterwards."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail(f"the ray CLI is not installed next to {sys.executable}")
    # every listening port chosen free, so a cluster already on this machine cannot collide
    gcs_port, dash_port, client = (free_port() for _ in range(3))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "head.log").open("w")
    # Ray's Unix socket paths live under --temp-dir and must stay under ~107 bytes: keep it short
    ray_tmp = tempfile.mkdtemp(prefix="shoal-ray-", dir="/tmp")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=2",
         f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash_port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                break
        except OSError:
            assert proc.poll() is None, f"ray start --head exited: {(tmp_path / 'head.log').read_text()[-1500:]}"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
    try:
        yield address, env
    finally:
        stop_group(proc, timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_job_submit_runs_the_loop(head, tmp_path: Path) -> None:
    address, env = head
    workdir = tmp_path / "job-work"
    deadline = time.monotonic() + 300
    while True:
        out = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             "shoal", "run", "--config", "configs/quickstart.yaml", "--workdir", str(workdir), *tiny_overrides()],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        # the head answers before its job agent is up: Ray says to try again later
        if "No available agent" not in out.stdout + out.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2
    assert all("val_miou" in r.data.metrics for r in children)
