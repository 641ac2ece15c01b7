"""Progress of work running in Ray workers, as small JSON files the driver (and ``shoal status``)
read: one file per worker process and kind of work, rewritten atomically at most twice a second.

A training worker (rank 0) writes ``train.json`` (epoch, step, loss, the last validation mIoU); every
scoring or inspection process writes ``<kind>-<pid>.json`` with the images it has done. The folder is
the phase's own (under the round dir on storage the driver sees), so nothing is sent through Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

_MIN_INTERVAL_S = 0.5
_COUNTS: dict[tuple[str, str], int] = {}
_LAST_WRITE: dict[str, float] = {}


def write_progress(folder: str | os.PathLike[str] | None, name: str, fields: dict[str, Any], *, force: bool = False) -> None:
    """Write ``fields`` (plus ``updated``, ``pid``) to ``folder/name.json``, atomically; skipped when
    the last write of that file was under half a second ago, unless ``force``. Errors are ignored:
    progress must never fail the work it describes."""
    if folder is None:
        return
    path = Path(folder) / f"{name}.json"
    now = time.time()
    if not force and now - _LAST_WRITE.get(str(path), 0.0) < _MIN_INTERVAL_S:
        return
    _LAST_WRITE[str(path)] = now
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump({**fields, "updated": now, "pid": os.getpid()}, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def count_done(folder: str | os.PathLike[str] | None, kind: str, n: int) -> None:
    """Add ``n`` images done by this process to its ``<kind>-<pid>.json`` in ``folder``."""
    if folder is None:
        return
    key = (str(folder), kind)
    _COUNTS[key] = _COUNTS.get(key, 0) + int(n)
    write_progress(folder, f"{kind}-{os.getpid()}", {"kind": kind, "done": _COUNTS[key]})


def read_progress(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What the files in ``folder`` say: ``train`` (the training worker's fields, or absent) and, per
    counted kind, the images done by every process together (``{"score": 1234}``)."""
    out: dict[str, Any] = {}
    root = Path(folder)
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced: the next read has it
        if path.stem == "train":
            out["train"] = data
        elif "kind" in data:
            out[data["kind"]] = out.get(data["kind"], 0) + int(data.get("done", 0))
    return out
