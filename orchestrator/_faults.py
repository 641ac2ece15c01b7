"""Fault injection for the driver-fault tests: the driver kills itself at a named point.

With ``SHOAL_TEST_KILL_AT=<phase>:<point>`` set (e.g. ``train:inside``, ``track:after``),
:func:`checkpoint` called with that name sends SIGKILL to its own process, as an OOM kill or a lost
node would: no ``finally`` blocks, no atexit handlers, no buffered writes flushed. Unset, as it is
outside tests, every checkpoint is a no-op (one dictionary lookup).

The names the loop calls, in the order a round reaches them (``phase`` is train, score, select,
label or track):

- ``<phase>:before``: the previous phase's state is saved, the phase has not started;
- ``<phase>:inside``: the phase has written part of its output (see each phase);
- ``<phase>:after``: the phase returned (for track: and the round was closed), its state not saved;
- ``track:parent``: the experiment's MLflow parent run was created, its id not yet saved;
- ``import:inside`` / ``import:after``: ``import_labels`` wrote the mask files / the table
  revision, the state does not record them yet;
- ``start:inside``: a new experiment wrote its first revision, no state yet;
- ``edit:inside``: ``edit`` wrote its revision, the state does not record it yet.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "SHOAL_TEST_KILL_AT"


def checkpoint(name: str) -> None:
    """SIGKILL this process when ``SHOAL_TEST_KILL_AT`` equals ``name``; otherwise do nothing."""
    if os.environ.get(ENV_VAR) == name:
        os.write(2, f"shoal: {ENV_VAR}={name}: killing process {os.getpid()}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
