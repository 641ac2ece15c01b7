"""What the experiment is doing now, for a person: a live bar on a terminal, one line per epoch and
per scoring pass in a job's log, and ``<workdir>/progress.json`` for ``shoal status`` in another shell.

Workers write small progress files into the running phase's folder (``workers._progress``); a thread
of the driver reads them twice a second while the phase runs. Bars come from tqdm and are shown only
when the output is a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import workers

from ._atomic import atomic_write_json

PROGRESS_FILE = "progress.json"
"""``<workdir>/progress.json``: the round, the phase running, its details, who runs it, when updated."""


def progress_dir(round_dir: Path, phase: str) -> Path:
    """Where the workers of ``phase`` write their progress files."""
    return round_dir / "progress" / phase


class Display:
    """How progress is shown: ``bar`` (tqdm on stderr), ``lines`` (print a line per epoch and per
    pass: a job's log) or ``off`` (only ``progress.json``)."""

    def __init__(self, mode: str = "off") -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode


class PhaseMonitor:
    """While a phase runs: follows its workers' progress files, shows them, keeps progress.json."""

    def __init__(self, workdir: Path, round_index: int, phase: str, folder: Path, display: Display,
                 command: str = "") -> None:
        self.workdir, self.round, self.phase, self.folder = workdir, round_index, phase, folder
        self.display = display
        self.command = command
        self.started = time.time()
        self.totals: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="shoal-progress")
        self._bar: Any = None
        self.command = command or " ".join(sys.argv)
        self._epoch_shown = 0
        self._done_shown: dict[str, int] = {}

    def expect(self, kind: str, total: int) -> None:
        """``total`` images of ``kind`` (``score``, ``inspect``) are to be done in this phase."""
        self.totals[kind] = int(total)

    def __enter__(self) -> PhaseMonitor:
        self._tick()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        outcome = "done" if exc[0] is None else "interrupted" if issubclass(exc[0], (KeyboardInterrupt, SystemExit)) \
            else "failed"
        self._tick(final=True, outcome=outcome)
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(Exception):  # progress must never fail the work it describes
                self._tick()

    def detail(self) -> dict[str, Any]:
        found = workers.read_progress(self.folder)
        out: dict[str, Any] = {}
        train = found.get("train")
        if train:
            done = max(int(train["step"]) - int(train.get("first_step", 0)), 0)
            left = int(train["steps"]) - int(train["step"])
            elapsed = max(time.time() - float(train["started"]), 1e-9)
            out["train"] = {k: train.get(k) for k in ("epoch", "epochs", "step", "steps", "loss", "epochs_done",
                                                      "epoch_loss", "val_miou", "history")}
            out["train"]["eta_s"] = round(elapsed / done * left, 1) if done else None
        for kind, total in self.totals.items():
            done = min(int(found.get(kind, 0)), total)
            elapsed = time.time() - self.started
            out[kind] = {"done": done, "total": total, "images_per_s": round(done / elapsed, 2) if elapsed > 0 else None}
        return out

    def _tick(self, final: bool = False, outcome: str | None = None) -> None:
        detail = self.detail()
        atomic_write_json(self.workdir / PROGRESS_FILE, {
            "round": self.round, "phase": self.phase, "running": not final, "outcome": outcome,
            "started": self.started, "updated": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
            "command": self.command, "detail": detail})
        if self.display.mode == "bar":
            self._show_bar(detail)
        elif self.display.mode == "lines":
            self._show_lines(detail, final and outcome == "done")

    def _show_bar(self, detail: dict[str, Any]) -> None:
        from tqdm import tqdm

        train = detail.get("train")
        if train and train.get("steps"):
            if self._bar is None:
                self._bar = tqdm(total=int(train["steps"]), desc=f"round {self.round} train", unit="step",
                                 leave=False, dynamic_ncols=True)
            self._bar.n = int(train["step"])
            post = {"epoch": f"{train['epoch']}/{train['epochs']}"}
            if train.get("loss") is not None:
                post["loss"] = f"{train['loss']:.3f}"
            if train.get("val_miou") is not None:
                post["val mIoU"] = f"{train['val_miou']:.3f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
        for kind, counts in detail.items():
            if kind == "train" or not counts.get("total"):
                continue
            if self._bar is None:
                self._bar = tqdm(total=counts["total"], desc=f"round {self.round} {kind}", unit="img",
                                 leave=False, dynamic_ncols=True)
            self._bar.n = counts["done"]
            self._bar.refresh()

    def _show_lines(self, detail: dict[str, Any], final: bool) -> None:
        train = detail.get("train")
        history = (train or {}).get("history") or []
        while train and self._epoch_shown < len(history):  # every finished epoch, even when several ended between reads
            loss, val = history[self._epoch_shown]
            self._epoch_shown += 1
            last = self._epoch_shown == len(history)
            eta = f", ETA {train['eta_s']:.0f} s" if last and train.get("eta_s") and self._epoch_shown < int(train["epochs"]) else ""
            print(f"round {self.round} train: epoch {self._epoch_shown}/{train['epochs']}, loss {loss:.3f}, "
                  f"val mIoU {val:.4f}{eta}", flush=True)
        if final:
            for kind, counts in detail.items():
                if kind != "train" and counts.get("total"):
                    seconds = time.time() - self.started
                    print(f"round {self.round} {kind}: {counts['total']} images in {seconds:.1f} s "
                          f"({counts['total'] / max(seconds, 1e-9):.1f} images/s)", flush=True)


class NoMonitor:
    """What a phase sees when nothing follows it (tests, the Python API without progress)."""

    def expect(self, kind: str, total: int) -> None:
        pass


def read_status(workdir: Path) -> dict[str, Any] | None:
    """``progress.json`` with ``age_s`` and whether its process still runs (on this host), or None."""
    path = workdir / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data["age_s"] = round(time.time() - float(data.get("updated", 0)), 1)
    alive = None
    if data.get("host") == socket.gethostname() and data.get("pid"):
        try:
            os.kill(int(data["pid"]), 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    data["process_alive"] = alive
    return data
