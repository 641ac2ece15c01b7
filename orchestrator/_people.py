"""People in the loop between rounds: importing the answers to a label or relabel request, and
curation edits (weights, exclusions, relabel requests), each a table revision with a comment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import _faults
from ._context import Context
from ._label_state import NEEDS_RELABEL, replace_masks
from ._labeling import export_folder_tasks, mask_digest, read_answers, read_manifest, save_answers, write_back
from ._oracle import build_oracle
from ._round import awaiting_labels, current_revision, round_table, unrecorded_revision
from ._table import IMAGE_PATH, LABELED, MASK_PATH, SAMPLE_ID, SPLIT, TRAIN_SPLIT, WEIGHT, flag


def import_labels(ctx: Context, source: str | Path, task_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate every mask in ``source`` (a folder of PNGs or a Label Studio JSON export) against
    the awaited selection (the acquisition unit's import) or the relabel task ``task_dir``, and add
    them in one step. A bad file raises ``ValueError`` naming it, and nothing is added."""
    request = awaiting_labels(ctx.round_state)
    if task_dir is not None:
        return _import_relabel(ctx, Path(source), Path(task_dir).resolve(), request)
    if request is None:
        raise ValueError(f"no labels are awaited in {ctx.workdir} (status: shoal status {ctx.workdir})")
    return ctx.unit.import_answers(ctx, request, Path(source))


def _import_relabel(ctx: Context, source: Path, task: Path, request: dict[str, Any] | None) -> dict[str, Any]:
    """New whole masks for samples waiting to be relabeled (``needs_relabel``), from a relabel task."""
    state = ctx.round_state
    manifest = read_manifest(task)
    answers = read_answers(source, manifest, ctx.classes(), ctx.config.oracle.label_map)
    base = current_revision(state)
    # While a round waits for labels and nothing was imported yet, its revision-to-be (the parent
    # with the round's scores: its relabel queue is flagged there) is what the answers go into.
    df = round_table(ctx) if request is not None and not request["revision"] else ctx.read(base)
    waiting = set(df.loc[flag(df, NEEDS_RELABEL), SAMPLE_ID])
    outside = [a.sample_id for a in answers if a.sample_id not in waiting]
    if outside:
        raise ValueError(f"{outside[0]} is not waiting to be relabeled (shoal edit --relabel marks samples)")
    current = df.set_index(SAMPLE_ID)[MASK_PATH]
    new = [a for a in answers if not str(current.get(a.sample_id, "")).endswith(f"-{mask_digest(a.mask)}.png")]
    report = {"source": str(source), "found": len(answers), "added": [a.sample_id for a in new],
              "unchanged": len(answers) - len(new), "revision": base}
    if not new:
        return report
    paths = save_answers(new, ctx.workdir / "labels" / f"relabel-{task.name}")
    if ctx.config.data.write_back_masks:
        write_back(new, df.set_index(SAMPLE_ID)[IMAGE_PATH].astype(str).to_dict())
    _faults.checkpoint("import:inside")  # mask files written, no revision yet
    replace_masks(df, df[SAMPLE_ID].isin(paths), paths)
    rev = unrecorded_revision(ctx, base, df) or ctx.store.write(
        df, parent=base, round=state.round, comment=f"import relabel: {len(new)} masks from {source}")
    report["revision"] = rev
    if request is not None:
        request["revision"] = rev
    else:
        state.revision = rev
    _faults.checkpoint("import:after")  # revision written, state not saved
    ctx.save_state()
    return report


def edit(ctx: Context, *, weights: dict[str, float] | None = None, exclude: dict[str, bool] | None = None,
         relabel: list[str] | None = None, comment: str) -> str:
    """Apply a curation edit as a new table revision naming its parent and ``comment``.

    ``weights``: sample id -> weight (0 = kept but never drawn for training); ``exclude``: sample
    id -> excluded from training or restored; ``relabel``: labeled ids to send back to people
    (a task folder is written for interactive oracles). Returns the new revision id.
    """
    cfg = ctx.config
    state = ctx.round_state
    request = awaiting_labels(state)
    if state.phase not in ("",) and request is None:
        raise ValueError(f"edits apply between rounds or while labels are awaited; round {state.round} "
                         f"is after phase '{state.phase}': finish it with shoal resume first")
    if not comment.strip():
        raise ValueError("an edit needs a comment saying why (--comment)")
    base = current_revision(state)
    df = ctx.read(base)
    known = set(df.loc[df[SPLIT] == TRAIN_SPLIT, SAMPLE_ID])
    for what, ids in (("weights", weights or {}), ("exclude", exclude or {}), ("relabel", relabel or [])):
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ValueError(f"{what}: unknown train sample id(s) {', '.join(map(str, unknown[:5]))}")
    for sid, w in (weights or {}).items():
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"weights: sample {sid}: weight must be finite and >= 0, got {w}")
    if "excluded" not in df.columns:
        df["excluded"] = False
    if NEEDS_RELABEL not in df.columns:
        df[NEEDS_RELABEL] = False
    index = df.set_index(SAMPLE_ID).index
    for sid, w in (weights or {}).items():
        df.loc[index.get_loc(sid), WEIGHT] = float(w)
    for sid, excluded in (exclude or {}).items():
        row = index.get_loc(sid)
        df.loc[row, "excluded"] = bool(excluded)
        df.loc[row, WEIGHT] = 0.0 if excluded else (1.0 if df.loc[row, LABELED] else 0.0)
    if relabel:
        not_labeled = [i for i in relabel if not df.loc[index.get_loc(i), LABELED]]
        if not_labeled:
            raise ValueError(f"relabel: sample(s) {', '.join(not_labeled[:5])} are not labeled")
        df.loc[df[SAMPLE_ID].isin(relabel), NEEDS_RELABEL] = True
    # an edit killed before it saved the state wrote this revision already: reuse it, no fork
    rev = unrecorded_revision(ctx, base, df) or ctx.store.write(
        df, parent=base, round=state.round, comment=f"edit: {comment}")
    _faults.checkpoint("edit:inside")  # the revision written, the state not saved
    if relabel and build_oracle(cfg.oracle.kind).interactive:
        export_folder_tasks(df, relabel, ctx.workdir / "relabel" / rev, ctx.classes(), round_index=state.round,
                            kind="relabel", label_studio=ctx.label_studio(), workdir=ctx.workdir)
    if request is not None and request.get("revision"):
        request["revision"] = rev
    else:
        state.revision = rev
    ctx.save_state()
    return rev
