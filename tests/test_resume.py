"""An experiment killed at any moment and resumed ends with the same labeled set as one never
interrupted (same seed), and MLflow shows no duplicated round runs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import TableStore

from .conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "orchestrator"]


def shoal(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def start_run(workdir: Path) -> list[str]:
    return [*CLI, "run", "--config", str(ROOT / "configs/quickstart.yaml"), "--workdir", str(workdir), *tiny_overrides()]


def final_labels(workdir: Path) -> dict[str, int]:
    state = json.loads((workdir / "state.json").read_text())
    df = TableStore(workdir / "table").read(state["revision"])
    df = df[df.labeled]
    return dict(zip(df.sample_id, df.round_labeled.astype(int)))


def state_of(workdir: Path) -> dict | None:
    try:
        return json.loads((workdir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


STDERR: dict[str, str] = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("ref") / "work"
    out = subprocess.run(start_run(workdir), capture_output=True, text=True, timeout=400, env=_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    STDERR["reference"] = out.stderr
    return workdir, out.stdout


def test_cli_prints_a_line_per_round_and_the_mlflow_store(reference: tuple[Path, str]) -> None:
    workdir, stdout = reference
    lines = [line for line in stdout.splitlines() if line.startswith("round ") and ": labeled" in line]
    assert [line.split(":")[0] for line in lines] == ["round 1", "round 2"]
    assert "labeled 8 -> 14" in lines[0] and "labeled 14 -> 20" in lines[1]
    assert "val mIoU" in lines[0] and lines[0].endswith(" s")
    assert f"sqlite:///{workdir}/mlflow.db" in stdout
    assert "mlflow ui --backend-store-uri" in stdout
    status = shoal("status", str(workdir), "--json", cwd=ROOT)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["labeled"] == 20 and info["rounds_done"] == 2 and info["stopped"].startswith("rounds")
    assert info["progress"]["round"] == 2 and info["progress"]["phase"] == "track"
    assert not info["progress"]["running"] and info["progress"]["outcome"] == "done"


def test_a_job_log_shows_progress_and_nothing_alarming(reference: tuple[Path, str]) -> None:
    """Without a terminal: a line per epoch and per scoring pass, the dashboard's address, and no
    error-level line, no "will hang", no token notice, no stack dump on a normal run."""
    _, stdout = reference
    stderr = STDERR["reference"]
    for k in (1, 2):
        assert f"round {k} train: epoch 1/2, loss " in stdout and f"round {k} train: epoch 2/2, loss " in stdout
        assert re.search(rf"round {k} score: \d+ images in [\d.]+ s", stdout)
    assert "Ray dashboard: http://127.0.0.1:" in stdout
    alarming = ["will hang", "Token authentication", "Progress bars disabled", "Traceback", "core_worker",
                " ERROR ", "constructor arguments"]
    found = [text for text in alarming if text in stdout + stderr]
    assert not found, f"alarming lines in a normal run: {found}\n{stderr[-3000:]}"


def kill_when(workdir: Path, ready, timeout: float = 300) -> None:
    """Start the run and SIGKILL its whole process group once ``ready(workdir)`` holds."""
    proc = subprocess.Popen(start_run(workdir), cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready(workdir):
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def mid_training_of_round_2(workdir: Path) -> bool:
    s = state_of(workdir)
    # the round directory is made when round 2's training starts
    return bool(s and s["round"] == 2 and s["phase"] == "" and (workdir / "rounds" / "round-002").exists())


def after_scoring_round_1(workdir: Path) -> bool:
    # select and label take milliseconds; phase "label" stays while round 1 is tracked (seconds)
    s = state_of(workdir)
    return bool(s and s["round"] == 1 and s["phase"] in ("score", "select", "label"))


@pytest.mark.parametrize("kill_point", [after_scoring_round_1, mid_training_of_round_2])
def test_kill_and_resume_gives_the_same_labeled_set(reference, kill_point, tmp_path: Path) -> None:
    ref_dir, _ = reference
    workdir = tmp_path / "work"
    kill_when(workdir, kill_point)
    assert state_of(workdir)["stopped"] is None
    out = shoal("resume", str(workdir), cwd=ROOT, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert final_labels(workdir) == final_labels(ref_dir)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    rounds = sorted(r.data.tags["shoal.round"] for r in runs if "shoal.round" in r.data.tags)
    assert rounds == ["1", "2"]
    assert len(runs) == 3


def test_resume_of_a_missing_or_finished_experiment(reference, tmp_path: Path) -> None:
    ref_dir, _ = reference
    out = shoal("resume", str(ref_dir), cwd=ROOT)
    assert out.returncode == 0 and "nothing to resume" in out.stdout
    missing = shoal("resume", str(tmp_path / "nope"), cwd=ROOT)
    assert missing.returncode == 2 and "no Shoal experiment" in missing.stderr


def test_incompatible_state_version_is_refused(reference, tmp_path: Path) -> None:
    import shutil

    ref_dir, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(ref_dir, copy, ignore=shutil.ignore_patterns("ray_train", "mlartifacts", "data"))
    state = json.loads((copy / "state.json").read_text())
    state["schema_version"] = 99
    (copy / "state.json").write_text(json.dumps(state))
    out = shoal("status", str(copy), cwd=ROOT)
    assert out.returncode == 2 and "schema version 99" in out.stderr


@pytest.mark.slow
def test_status_follows_a_run_and_sigterm_stops_it_cleanly(tmp_path: Path) -> None:
    """From another shell, ``shoal status`` shows the training epoch and step while a run trains.
    SIGTERM (what Kubernetes and ``ray job stop`` send) ends it with one line saying where it stands
    and how to resume, no stack dump, and the Ray processes it started gone; the resumed run ends as
    an uninterrupted one does."""
    import psutil

    slow = ["--set", "train.epochs=30", "--set", "train.num_workers=1", "--set", "train.cpus_per_worker=1"]
    workdir = tmp_path / "work"
    proc = subprocess.Popen([*start_run(workdir), *slow], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            status = shoal("status", str(workdir), "--json", cwd=ROOT) if (workdir / "state.json").exists() else None
            progress = json.loads(status.stdout)["progress"] if status and status.returncode == 0 else None
            train = (progress or {}).get("detail", {}).get("train") or {}
            if progress and progress["phase"] == "train" and progress["running"] and (train.get("epochs_done") or 0) >= 2:
                seen = progress
                break
            time.sleep(0.2)
        assert seen is not None, "status never showed a training epoch while the run trained"
        train = seen["detail"]["train"]
        assert seen["round"] == 1 and seen["process_alive"] is True and seen["pid"] == proc.pid
        assert train["epochs"] == 30 and 2 <= train["epochs_done"] <= 30 and 0 < train["step"] <= train["steps"]
        assert train["loss"] is not None and 0.0 <= train["val_miou"] <= 1.0
        text = shoal("status", str(workdir), cwd=ROOT).stdout
        assert re.search(r"now: round 1 train running \(pid \d+ on .*\): epoch \d+/30, step \d+/\d+", text), text
        ray_processes = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        assert ray_processes, "a local Ray cluster has processes"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert re.search(r"shoal: stopped by SIGTERM in round 1 \(last finished phase: none\); resume with: shoal resume ",
                     err), err[-3000:]
    assert "SIGTERM received" not in err and "Traceback" not in err
    gone, alive = psutil.wait_procs(ray_processes, timeout=60)
    assert not alive, f"Ray processes left running: {[p.pid for p in alive]}"
    after = json.loads(shoal("status", str(workdir), "--json", cwd=ROOT).stdout)["progress"]
    assert after["outcome"] == "interrupted" and not after["running"]

    resumed = shoal("resume", str(workdir), cwd=ROOT, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = tmp_path / "reference"
    whole = subprocess.run([*start_run(reference), *slow], capture_output=True, text=True, timeout=400, env=_env(),
                           cwd=ROOT)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert final_labels(workdir) == final_labels(reference)
