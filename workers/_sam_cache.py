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
from collections.abc import Callable
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
    """sha256 (hex) of a file's bytes (a local path or an object storage URI)."""
    from ._io import is_uri, read_bytes

    if is_uri(path):
        return hashlib.sha256(read_bytes(str(path))).hexdigest()
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


class NpzShards:
    """Content-addressed ``.npz`` entries under ``<root>/<subdir>/<sha[:2]>/<sha>.npz`` (``root`` a
    local path or a pyarrow filesystem URI), shared by the SAM embedding and region caches.

    ``read`` returns the entry's arrays, or None for a missing, unreadable or outdated entry (a miss,
    logged when the file exists); ``write`` goes through a temporary file and a rename, so concurrent
    actors and later rounds never read half a file. ``hits`` and ``misses`` count ``read`` calls.
    """

    def __init__(self, root: str | os.PathLike[str], subdir: str, what: str, version: int) -> None:
        import pyarrow.fs as pafs

        root = str(root)
        if "://" not in root:
            root = os.path.abspath(root)
        self.fs, base = pafs.FileSystem.from_uri(root)
        self.dir = f"{base.rstrip('/')}/{subdir}"
        self.what = what
        self.version = version
        self.hits = 0
        self.misses = 0

    def path(self, digest: str) -> str:
        return f"{self.dir}/{digest[:2]}/{digest}.npz"

    def read(self, digest: str, check: Callable[[dict[str, np.ndarray]], Any]) -> Any:
        """``check(arrays)`` of the entry (it raises on an outdated one), or None on a miss."""
        path = self.path(digest)
        try:
            with self.fs.open_input_file(path) as fh:
                data = fh.readall()
        except FileNotFoundError:
            self.misses += 1
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if int(npz["format"]) != self.version:
                    raise ValueError(f"format {int(npz['format'])}, expected {self.version}")
                entry = check({k: npz[k] for k in npz.files})
        except Exception as exc:  # a damaged or outdated entry is computed again and overwritten
            log.warning("%s cache entry %s is unreadable (%s); computing it again", self.what, path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)

    def __contains__(self, digest: Any) -> bool:
        import pyarrow.fs as pafs

        return bool(self.fs.get_file_info(self.path(str(digest))).type == pafs.FileType.File)


class EmbeddingCache(NpzShards):
    """Embeddings of one SAM checkpoint under ``root`` (a local path or a pyarrow filesystem URI).

    ``get`` returns None for a missing, unreadable or outdated entry (a miss: the caller embeds the
    image and ``put``s it). Counters ``hits`` and ``misses`` count ``get`` calls.
    """

    def __init__(self, root: str | os.PathLike[str], checkpoint_id: str) -> None:
        super().__init__(root, checkpoint_id, "SAM", CACHE_FORMAT)
        self.checkpoint_id = checkpoint_id

    def get(self, digest: str) -> SamEmbedding | None:
        entry: SamEmbedding | None = self.read(digest, lambda a: SamEmbedding(
            features=a["features"],
            input_hw=(int(a["input_hw"][0]), int(a["input_hw"][1])),
            original_hw=(int(a["original_hw"][0]), int(a["original_hw"][1])),
        ))
        return entry

    def put(self, digest: str, entry: SamEmbedding) -> None:
        buf = io.BytesIO()
        np.savez(buf, format=np.int64(CACHE_FORMAT), features=np.asarray(entry.features, np.float16),
                 input_hw=np.asarray(entry.input_hw, np.int64), original_hw=np.asarray(entry.original_hw, np.int64))
        # Temp name + rename: concurrent actors embedding the same image both write whole files.
        self.write(self.path(digest), buf.getvalue())