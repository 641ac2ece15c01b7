"""The label phase: the simulated oracle reveals the selection's labels at once, or people label a
task folder and the round waits for ``import-labels``; with ``review.simulate_relabel`` the
simulated oracle also answers the relabel requests with ground truth."""

from __future__ import annotations

from typing import Any

from ._context import Context
from ._label_state import NEEDS_RELABEL, replace_masks
from ._oracle import build_oracle
from ._table import LABELED, MASK_PATH, SAMPLE_ID, flag


def run(ctx: Context) -> dict[str, Any] | None:
    """The phase's result, or None while people have not answered (the round waits)."""
    if build_oracle(ctx.config.oracle.kind).interactive:
        return ctx.unit.request_labels(ctx)
    out = ctx.unit.label(ctx)
    if ctx.config.review.simulate_relabel:
        out = simulate_relabel(ctx, out)
    return out


def simulate_relabel(ctx: Context, out: dict[str, Any]) -> dict[str, Any]:
    """``review.simulate_relabel``: the simulated oracle answers the relabel requests (this round's
    queue and ``shoal edit --relabel``) with ground truth: the mask the dataset came with, i.e. the
    sample's mask_path in the experiment's first revision (later revisions may point at imported or
    corrupted copies). One ``relabel:`` revision on top of the round's label revision ``out``."""
    state = ctx.round_state
    rev = out["revision"]
    df = ctx.read(rev)
    flagged = df[LABELED] & flag(df, NEEDS_RELABEL)
    ids = sorted(df.loc[flagged, SAMPLE_ID].astype(str))
    if not ids:
        return out
    oracle = build_oracle(ctx.config.oracle.kind)
    truth = oracle.label(ctx.read(ctx.store.lineage(rev)[-1].id), ids)
    current = df.set_index(SAMPLE_ID)[MASK_PATH]
    changed = [i for i in ids if current[i] != truth[i]]
    latest = ctx.store.info(ctx.store.revisions()[-1])
    if latest.parent == rev and latest.round == state.round and latest.comment.startswith("relabel:"):
        answered = latest.id  # written before an interruption: reused, no fork
    else:
        replace_masks(df, flagged, truth)
        answered = ctx.store.write(
            df, parent=rev, round=state.round,
            comment=f"relabel: {len(ids)} flagged samples answered by the simulated oracle with ground truth, "
                    f"{len(changed)} masks changed (parent {rev})",
        )
    return {**out, "revision": answered, "relabeled": ids, "relabel_changed": changed, "relabel_parent": rev}
