"""Crash-safe file writes: write to a temp file in the same folder, fsync, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object], *, overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one step.

    Readers see the old file or the new one, never a half-written one. With ``overwrite=False`` an
    existing ``path`` raises ``FileExistsError`` and is left untouched (immutable files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: never replaces an immutable file
            tmp.unlink()
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True) -> None:
    atomic_write(path, lambda p: p.write_text(text), overwrite=overwrite)


def atomic_write_json(path: str | Path, data: Any, *, overwrite: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n", overwrite=overwrite)
