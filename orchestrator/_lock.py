"""One writer at a time per work dir: every command that writes (run, resume, import-labels, edit,
add-images) holds ``<workdir>/.lock``; a second writer is refused at once, naming the holder.

The lock is an advisory ``flock`` on the file, which the kernel drops when its process ends however
it ends, so a lock left by a dead process is taken over safely; the file's text says who holds it
(process id, host, command, since when) for the refusal message. Readers (``shoal status``) take no
lock. Within one process the lock is re-entrant: a loop that steps while its caller imports labels
does not refuse itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

LOCK_FILE = ".lock"

_HELD: dict[str, tuple[TextIO, int]] = {}
"""work dir -> (the open lock file, how many holders in this process)."""


class WorkdirLocked(ValueError):
    """Another process writes the work dir."""


def holder(workdir: Path) -> dict[str, Any] | None:
    """Who holds the lock of ``workdir``, as written in its lock file (emptied on release, so a
    refused command leaves the work dir's files as they were; a killed holder's text stays)."""
    try:
        data: dict[str, Any] = json.loads((workdir / LOCK_FILE).read_text())
        return data
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def writing(workdir: Path, command: str | None = None) -> Iterator[None]:
    """Hold the work dir's lock for the block; raise :class:`WorkdirLocked` when another process
    holds it. ``workdir`` must exist."""
    key = str(Path(workdir).resolve())
    if key in _HELD:
        fh, count = _HELD[key]
        _HELD[key] = (fh, count + 1)
        try:
            yield
        finally:
            _release(key)
        return
    path = Path(key) / LOCK_FILE
    fh = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        info = holder(Path(key)) or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
        raise WorkdirLocked(
            f"{key} is being written by process {info.get('pid', '?')} on {info.get('host', '?')} "
            f"({info.get('command', '?')}, since {since}); wait for it to finish or stop it first "
            f"(shoal status {key} shows what it does)"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "command": command or " ".join(["shoal", *sys.argv[1:]]), "since": time.time()}))
    fh.flush()
    _HELD[key] = (fh, 1)
    try:
        yield
    finally:
        _release(key)


def _release(key: str) -> None:
    fh, count = _HELD[key]
    if count > 1:
        _HELD[key] = (fh, count - 1)
        return
    del _HELD[key]
    with contextlib.suppress(OSError):
        fh.seek(0)
        fh.truncate()
        fh.flush()
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    fh.close()
