"""The sample table: one row per sample, stored as immutable Parquet revisions with lineage.

Each revision is ``<workdir>/table/rev-NNNN.parquet``. Its Parquet schema metadata holds the
revision id, the parent revision id, the round and a comment, so the lineage of the labeled set can
be read back from the files alone. A revision is never overwritten.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import atomic_write

SAMPLE_ID = "sample_id"
IMAGE_PATH = "image_path"
MASK_PATH = "mask_path"
SPLIT = "split"
LABELED = "labeled"
WEIGHT = "weight"
ROUND_LABELED = "round_labeled"
META_PREFIX = "meta_"
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
BASE_COLUMNS = (SAMPLE_ID, IMAGE_PATH, MASK_PATH, SPLIT, LABELED, WEIGHT, ROUND_LABELED)
_META_KEY = b"shoal.revision"
_REV_RE = re.compile(r"^rev-(\d{4,})\.parquet$")


@dataclass(frozen=True)
class RevisionInfo:
    id: str
    parent: str | None
    round: int
    comment: str
    created: float
    num_rows: int
    num_labeled: int


def validate_table(df: pd.DataFrame) -> None:
    """Raise ``ValueError`` when the table breaks an invariant (missing columns, duplicate ids...)."""
    missing = [c for c in BASE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"sample table lacks columns {missing}")
    dup = df[SAMPLE_ID][df[SAMPLE_ID].duplicated()]
    if len(dup):
        raise ValueError(f"duplicate sample_id in the sample table: {', '.join(map(str, dup[:5]))}")
    bad_split = set(df[SPLIT].unique()) - {TRAIN_SPLIT, VAL_SPLIT}
    if bad_split:
        raise ValueError(f"unknown split values {sorted(bad_split)} in the sample table")
    if (df[WEIGHT] < 0).any() or df[WEIGHT].isna().any():
        raise ValueError("sample weights must be finite and >= 0")
    if (df[LABELED] & (df[SPLIT] != TRAIN_SPLIT)).any():
        raise ValueError("only train samples can be labeled")
    unlabeled_round = df[LABELED] & (df[ROUND_LABELED] < 0)
    if unlabeled_round.any():
        raise ValueError("a labeled sample has no round_labeled")


def flag(df: pd.DataFrame, column: str) -> pd.Series:
    """The boolean column ``column`` of ``df`` (missing values False), or all False when absent:
    optional flags such as ``excluded``, ``needs_relabel`` and ``partial``."""
    if column not in df.columns:
        return pd.Series(False, index=df.index)
    return df[column].fillna(False).astype(bool)


class TableStore:
    """Immutable table revisions under ``root`` (``<workdir>/table``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, revision: str) -> Path:
        return self.root / f"{revision}.parquet"

    def revisions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = sorted((int(m.group(1)), p.stem) for p in self.root.iterdir() if (m := _REV_RE.match(p.name)))
        return [name for _, name in found]

    def write(self, df: pd.DataFrame, *, parent: str | None, round: int, comment: str) -> str:
        """Store ``df`` as a new revision whose parent is ``parent``; return its id."""
        validate_table(df)
        if parent is not None and not self.path(parent).exists():
            raise ValueError(f"parent revision {parent} does not exist in {self.root}")
        table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
        existing = self.revisions()
        number = int(existing[-1].split("-")[1]) + 1 if existing else 1
        while True:
            rev = f"rev-{number:04d}"
            info = RevisionInfo(
                id=rev, parent=parent, round=round, comment=comment, created=time.time(),
                num_rows=len(df), num_labeled=int(df[LABELED].sum()),
            )
            meta = dict(table.schema.metadata or {})
            meta[_META_KEY] = json.dumps(asdict(info)).encode()
            stamped = table.replace_schema_metadata(meta)
            try:
                atomic_write(self.path(rev), partial(pq.write_table, stamped), overwrite=False)
                return rev
            except FileExistsError:  # a concurrent or interrupted writer took the number
                number += 1

    def read(self, revision: str) -> pd.DataFrame:
        path = self.path(revision)
        if not path.exists():
            raise FileNotFoundError(f"table revision {revision} not found at {path}")
        return pq.read_table(path).to_pandas()

    def info(self, revision: str) -> RevisionInfo:
        path = self.path(revision)
        if not path.exists():
            raise FileNotFoundError(f"table revision {revision} not found at {path}")
        meta = pq.read_schema(path).metadata or {}
        if _META_KEY not in meta:
            raise ValueError(f"{path} is not a Shoal table revision (no {_META_KEY.decode()} metadata)")
        return RevisionInfo(**json.loads(meta[_META_KEY]))

    def lineage(self, revision: str) -> list[RevisionInfo]:
        """``revision`` and its ancestors, newest first."""
        chain: list[RevisionInfo] = []
        current: str | None = revision
        while current is not None:
            info = self.info(current)
            chain.append(info)
            current = info.parent
        return chain
