"""The SAM embedding cache: each image's SAM embedding is computed once per SAM checkpoint.

SAM's image encoder is by far its most expensive step and its output depends only on the image's
pixels and the checkpoint, so an embedding is stored under

    <root>/<checkpoint id>/<sha[:2]>/<sha>.npz

where ``sha`` is the sha256 of the image file's bytes (an edited image gets a new key, so it is
embedded again) and the checkpoint id names the model type and the sha256 of the weights file.
The 256 ``<sha[:2]>`` directories shard the files; each file is written to a temporary name and
renamed, so a reader (another actor, a later round) never sees half a file. ``root`` is a local
directory (by default ``<workdir>/sam_cache``) or any URI pyarrow's filesystems open
(``s3://bucket/sam_cache``), which Ray Data actors on every node can read back.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EmbeddingCache", "SamEmbedding", "checkpoint_digest", "file_digest"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Stored in every file; bump when what an entry means changes, so old entries read as misses."""


@dataclass(frozen=True)
class SamEmbedding:
    """One image's SAM embedding.

    features: float16 [C, h, w] (C = 256, h = w = 64 for the official models).
    input_hw: the image's size after SAM's longest-side resize, before padding to a square.
    original_hw: the image's own size: what SAM's prompts and masks refer to.
    """

    features: np.ndarray
    input_hw: tuple[int, int]
    original_hw: tuple[int, int]


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


_CHECKPOINT_DIGESTS: dict[tuple[str, int, int], str] = {}


def checkpoint_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint file, hashed once per process and file version (path, mtime, size):
    the official vit_h weights are 2.4 GiB."""
    path = os.path.abspath(path)
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _CHECKPOINT_DIGESTS:
        _CHECKPOINT_DIGESTS[key] = file_digest(path)
    return _CHECKPOINT_DIGESTS[key]


class EmbeddingCache:
    """Embeddings of one SAM checkpoint under ``root`` (a local path or a pyarrow filesystem URI).

    ``get`` returns None for a missing, unreadable or outdated entry (a miss: the caller embeds the
    image and ``put``s it). Counters ``hits`` and ``misses`` count ``get`` calls.
    """

    def __init__(self, root: str | os.PathLike[str], checkpoint_id: str) -> None:
        import pyarrow.fs as pafs

        root = str(root)
        if "://" not in root:
            root = os.path.abspath(root)
        self.fs, base = pafs.FileSystem.from_uri(root)
        self.checkpoint_id = checkpoint_id
        self.dir = f"{base.rstrip('/')}/{checkpoint_id}"
        self.hits = 0
        self.misses = 0

    def path(self, digest: str) -> str:
        return f"{self.dir}/{digest[:2]}/{digest}.npz"

    def get(self, digest: str) -> SamEmbedding | None:
        path = self.path(digest)
        try:
            with self.fs.open_input_file(path) as fh:
                data = fh.readall()
        except FileNotFoundError:
            self.misses += 1
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if int(npz["format"]) != CACHE_FORMAT:
                    raise ValueError(f"format {int(npz['format'])}, expected {CACHE_FORMAT}")
                entry = SamEmbedding(
                    features=npz["features"],
                    input_hw=(int(npz["input_hw"][0]), int(npz["input_hw"][1])),
                    original_hw=(int(npz["original_hw"][0]), int(npz["original_hw"][1])),
                )
        except Exception as exc:  # a damaged or outdated entry is re-embedded and overwritten
            log.warning("SAM cache entry %s is unreadable (%s); embedding the image again", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, digest: str, entry: SamEmbedding) -> None:
        buf = io.BytesIO()
        np.savez(buf, format=np.int64(CACHE_FORMAT), features=np.asarray(entry.features, np.float16),
                 input_hw=np.asarray(entry.input_hw, np.int64), original_hw=np.asarray(entry.original_hw, np.int64))
        path = self.path(digest)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        # Temp name + rename: concurrent actors embedding the same image both write whole files.
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(buf.getvalue())
        self.fs.move(tmp, path)

    def __contains__(self, digest: Any) -> bool:
        import pyarrow.fs as pafs

        return bool(self.fs.get_file_info(self.path(str(digest))).type == pafs.FileType.File)
