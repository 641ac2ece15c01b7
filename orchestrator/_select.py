"""The select phase: the acquisition unit's strategy picks what to label next; every pick's scores,
priority and reason go to ``rounds/round-NNN/selection.csv`` (what the track phase reports)."""

from __future__ import annotations

import time
from typing import Any

from . import _faults
from ._atomic import atomic_write
from ._context import Context

SELECTION_FILE = "selection.csv"


def run(ctx: Context) -> dict[str, Any]:
    t0 = time.perf_counter()
    info, chosen = ctx.unit.select(ctx, ctx.rng(1))
    seconds = time.perf_counter() - t0
    path = ctx.round_dir() / SELECTION_FILE
    atomic_write(path, lambda p: chosen.to_csv(p, index=False))
    _faults.checkpoint("select:inside")  # selection.csv written
    return {**info, "selection_file": str(path), "seconds": seconds}
