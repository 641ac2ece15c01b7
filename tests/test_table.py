"""Table revisions are immutable, name their parent, and the lineage reads back from the files."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import TableStore
from orchestrator._atomic import atomic_write_text


def table(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)],
        "image_path": [f"/data/images/s{i}.png" for i in range(n)],
        "mask_path": [f"/data/masks/s{i}.png" for i in range(n)],
        "split": ["train"] * (n - 2) + ["val"] * 2,
        "labeled": [False] * n,
        "weight": [0.0] * n,
        "round_labeled": [-1] * n,
        "meta_camera_view": ["forward", "downward"] * (n // 2),
    })


def label(df: pd.DataFrame, ids: list[str], round_: int) -> pd.DataFrame:
    df = df.copy()
    idx = df.sample_id.isin(ids)
    df.loc[idx, "labeled"] = True
    df.loc[idx, "weight"] = 1.0
    df.loc[idx, "round_labeled"] = round_
    return df


def test_revisions_chain_and_lineage(tmp_path: Path) -> None:
    store = TableStore(tmp_path / "table")
    r0 = store.write(table(), parent=None, round=0, comment="initial")
    t1 = label(store.read(r0), ["s0", "s1"], 1)
    r1 = store.write(t1, parent=r0, round=1, comment="round 1: +2")
    r2 = store.write(label(t1, ["s3"], 2), parent=r1, round=2, comment="round 2: +1")
    assert store.revisions() == [r0, r1, r2]
    chain = store.lineage(r2)
    assert [i.id for i in chain] == [r2, r1, r0]
    assert [i.parent for i in chain] == [r1, r0, None]
    assert [i.num_labeled for i in chain] == [3, 2, 0]
    assert chain[1].comment == "round 1: +2"
    # every revision still reads back as it was written
    assert store.read(r0).labeled.sum() == 0
    back = store.read(r1)
    assert sorted(back.loc[back.labeled, "sample_id"]) == ["s0", "s1"]
    assert back.meta_camera_view.tolist() == table().meta_camera_view.tolist()


def test_revisions_are_never_overwritten(tmp_path: Path) -> None:
    store = TableStore(tmp_path)
    r0 = store.write(table(), parent=None, round=0, comment="initial")
    before = store.path(r0).read_bytes()
    # a stray file claiming the next number (e.g. from an interrupted writer) is skipped, not replaced
    store.path("rev-0002").write_bytes(b"junk")
    r = store.write(label(table(), ["s0"], 1), parent=r0, round=1, comment="x")
    assert r == "rev-0003"
    assert store.path("rev-0002").read_bytes() == b"junk"
    assert store.path(r0).read_bytes() == before


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.assign(sample_id=["a", "a", "b", "c", "d", "e"]), "duplicate sample_id"),
        (lambda d: d.drop(columns=["weight"]), "lacks columns"),
        (lambda d: d.assign(weight=[-1.0, 0, 0, 0, 0, 0]), "weights"),
        (lambda d: d.assign(split=["train", "test", "train", "train", "val", "val"]), "unknown split"),
        (lambda d: label(d, ["s5"], 1), "only train samples"),
    ],
)
def test_invalid_tables_are_refused_and_nothing_is_written(tmp_path: Path, mutate, message: str) -> None:
    store = TableStore(tmp_path)
    with pytest.raises(ValueError, match=message):
        store.write(mutate(table()), parent=None, round=0, comment="bad")
    assert store.revisions() == []
    assert list(tmp_path.iterdir()) == []


def test_unknown_parent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parent revision rev-0009"):
        TableStore(tmp_path).write(table(), parent="rev-0009", round=0, comment="")


def test_atomic_write_leaves_old_content_when_writer_fails(tmp_path: Path) -> None:
    from orchestrator._atomic import atomic_write

    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def broken(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]
