"""One writer at a time: a second process that would write a work dir is refused at once, naming
the holder; a lock left by a killed process is taken over; reading the status needs no lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator._lock import LOCK_FILE, WorkdirLocked, holder, writing

from .conftest import ROOT, tiny_overrides

HOLD = """
import sys, time
from pathlib import Path
from orchestrator._lock import writing
with writing(Path(sys.argv[1]), command="shoal resume (test holder)"):
    (Path(sys.argv[1]) / "held").write_text("yes")
    time.sleep(600)
"""


def hold_in_another_process(workdir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not (workdir / "held").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = hold_in_another_process(workdir)
    try:
        before = time.time()
        with pytest.raises(WorkdirLocked) as refused, writing(workdir):
            pass
        assert time.time() - before < 1.0  # at once, not after a wait
        message = str(refused.value)
        assert f"process {proc.pid} on {socket.gethostname()}" in message
        assert "shoal resume (test holder)" in message and "since 20" in message
        assert holder(workdir)["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel dropped the dead process's lock: the next writer takes over and says so in the file
    with writing(workdir, command="shoal edit (test)"):
        assert holder(workdir)["pid"] == os.getpid() and holder(workdir)["command"] == "shoal edit (test)"
        with writing(workdir):  # re-entrant within one process
            pass
    assert (workdir / LOCK_FILE).exists() and holder(workdir) is None  # released: no holder named


@pytest.mark.slow
def test_cli_writers_refuse_each_other_and_status_reads_while_a_run_writes(tmp_path: Path) -> None:
    """A real ``shoal run`` writes; ``shoal edit`` and a second ``shoal resume`` from other
    processes are refused naming it while ``shoal status`` answers; once the run is killed with
    SIGKILL, ``shoal resume`` takes the lock over and finishes the experiment."""
    workdir = tmp_path / "work"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "orchestrator"]
    run = subprocess.Popen([*cli, "run", "--config", str(ROOT / "configs/quickstart.yaml"), "--workdir", str(workdir),
                            *tiny_overrides(), "--set", "train.epochs=40"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ((workdir / "state.json").exists() and (workdir / "rounds" / "round-001").exists()):
            assert run.poll() is None and time.monotonic() < deadline, "the run never started round 1"
            time.sleep(0.1)
        ids = workdir / "ids.csv"
        ids.write_text("sample_id,weight\ntrain_000001,2\n")
        for args in (["edit", str(workdir), "--weights", str(ids), "--comment", "x"], ["resume", str(workdir)]):
            other = subprocess.run([*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert other.returncode == 2, other.stderr[-2000:]
            assert f"is being written by process {run.pid} on {socket.gethostname()}" in other.stderr
            assert "shoal run --config" in other.stderr
        status = subprocess.run([*cli, "status", str(workdir), "--json"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0 and json.loads(status.stdout)["started"] is True
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    resumed = subprocess.run([*cli, "resume", str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stopped: rounds: 2 of 2 done" in resumed.stdout
