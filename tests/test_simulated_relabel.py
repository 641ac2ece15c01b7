"""review.simulate_relabel: the simulated oracle answers the relabel queue with ground truth, as a
table revision, so a benchmark sees what fixing the flagged labels buys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest

from orchestrator import ActiveLearningLoop, TableStore, config_from_dict

from .conftest import tiny_config

pytestmark = pytest.mark.ray


class Died(Exception):
    """The process killed between two writes."""


def read_mask(path: str) -> np.ndarray:
    mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert mask is not None, path
    return mask


def test_queued_corrupted_labels_get_ground_truth_back(ray_cluster: None, tmp_path: Path) -> None:
    # The queue's ranking is tested in test_review.py; here k is most of the 14 labeled samples so
    # that the tiny model (too unsure for confident disagreement: ties broken by id) queues some
    # corrupted samples and, usually, leaves one out.
    cfg = config_from_dict(tiny_config(loop={"rounds": 2}, review={"relabel_top_k": 10, "simulate_relabel": True}))
    loop = ActiveLearningLoop(cfg, tmp_path / "work")
    assert loop.step() is not None  # round 1 on clean labels: the queue is answered, nothing changes
    assert loop.state is not None
    store = loop.store
    r1 = store.info(loop.state.revision)
    assert r1.comment.startswith("relabel: 8 flagged") and "0 masks changed" in r1.comment
    first = store.read(store.lineage(r1.id)[-1].id).set_index("sample_id")["mask_path"]  # the dataset's masks

    # Annotators' mistakes: two classes swapped in 3 of the 14 labeled masks, kept as copies.
    df = store.read(r1.id)
    assert not df["needs_relabel"].any()
    labeled = sorted(df.loc[df.labeled, "sample_id"])
    corrupted = labeled[::5][:3]
    (tmp_path / "bad").mkdir()
    for sid in corrupted:
        mask = read_mask(first[sid])
        swapped = mask.copy()
        swapped[mask == 0], swapped[mask == 1] = 1, 0
        assert (swapped != mask).any()
        path = tmp_path / "bad" / f"{sid}.png"
        cv2.imwrite(str(path), swapped)
        df.loc[df.sample_id == sid, "mask_path"] = str(path)
    bad = store.write(df, parent=r1.id, round=loop.state.round, comment="edit: corrupted on purpose")
    loop.state.revision = bad
    loop.state.save(loop.workdir)

    # Round 2 trains on the corrupted labels, queues the 10 worst and the simulated oracle answers.
    # The answers' revision is written, then the process "dies" before the phase is recorded.
    written = store.write

    def write_then_die(*args: Any, **kwargs: Any) -> str:
        rev = written(*args, **kwargs)
        if kwargs["comment"].startswith("relabel:"):
            raise Died
        return rev

    loop.store.write = write_then_die  # type: ignore[method-assign]
    with pytest.raises(Died):
        loop.step()
    revisions = TableStore(loop.workdir / "table").revisions()
    resumed = ActiveLearningLoop.resume(loop.workdir)
    result = resumed.step()  # the label phase finds both revisions and reuses them
    assert result is not None and result.round == 2
    assert TableStore(loop.workdir / "table").revisions() == revisions

    queue = pd.read_csv(loop.workdir / "rounds/round-002/relabel_queue.csv", dtype={"sample_id": str})["sample_id"]
    caught = set(queue) & set(corrupted)
    assert len(queue) == 10 and caught, (sorted(queue), corrupted)
    answered = store.info(result.revision)
    labeled_rev = store.info(str(answered.parent))
    assert answered.round == labeled_rev.round == 2
    assert answered.comment == (f"relabel: 10 flagged samples answered by the simulated oracle with ground truth, "
                                f"{len(caught)} masks changed (parent {labeled_rev.id})")
    assert labeled_rev.parent == bad and labeled_rev.comment == "round 2: +6 by entropy"
    assert [i.id for i in store.lineage(result.revision)[:4]] == [answered.id, labeled_rev.id, bad, r1.id]

    before = store.read(labeled_rev.id).set_index("sample_id")
    after = store.read(answered.id).set_index("sample_id")
    assert before.loc[list(queue), "needs_relabel"].all() and not after["needs_relabel"].any()
    for sid in caught:  # back to the dataset's own mask
        assert after.loc[sid, "mask_path"] == first[sid] != before.loc[sid, "mask_path"]
        assert np.array_equal(read_mask(after.loc[sid, "mask_path"]), read_mask(first[sid]))
    for sid in set(corrupted) - caught:  # not queued: not silently fixed
        assert after.loc[sid, "mask_path"] == before.loc[sid, "mask_path"] == str(tmp_path / "bad" / f"{sid}.png")
    clean = [s for s in after.index if s not in corrupted]
    assert (after.loc[clean, "mask_path"].fillna("") == before.loc[clean, "mask_path"].fillna("")).all()
    rest = [c for c in after.columns if c not in ("mask_path", "needs_relabel")]
    pd.testing.assert_frame_equal(after[rest], before[rest])  # nothing else changed
    assert result.metrics["relabeled"] == 10 and result.metrics["relabel_masks_changed"] == len(caught)
