"""Files wherever the pool lives: local paths and object storage URIs (``s3://``, ``gs://``, and any
other scheme pyarrow or fsspec knows), behind one small set of functions.

Every read of an image, a mask, ``classes.json`` or ``metadata.csv`` goes through here, so a pool in
a bucket is decoded by the Ray workers straight from the store and the driver only lists names.
Credentials and endpoints come from the environment, as the cloud SDKs read them:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``; an S3-compatible server such as MinIO), ``AWS_REGION``; ``gs://`` uses the
Google defaults. An S3 request gives up after a few seconds and three attempts, so an unreachable
endpoint is an error naming the URI, not a hang.
"""

from __future__ import annotations

import os
import posixpath
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

LOCAL_SCHEMES = ("", "file")


def is_uri(path: Any) -> bool:
    """True for ``scheme://...`` other than ``file://``: a path some filesystem other than the local one holds."""
    text = str(path)
    return "://" in text and urlparse(text).scheme not in LOCAL_SCHEMES


def join(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with ``/`` (a URI) or the OS separator (a local path)."""
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    """The folder holding ``path`` (a URI keeps its scheme and bucket)."""
    if is_uri(path):
        parsed = urlparse(path)
        return f"{parsed.scheme}://{parsed.netloc}{posixpath.dirname(parsed.path.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(path))


def name(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_uri(path) else os.path.basename(path)


@lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str) -> Any:
    import pyarrow.fs as pafs

    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {"connect_timeout": 5.0, "request_timeout": 30.0,
                                   "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options)
    import pyarrow as pa

    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
        return fs
    except (pa.ArrowInvalid, ValueError, OSError, NotImplementedError):
        pass
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as exc:
        raise ValueError(f"no filesystem for '{scheme}://' URIs ({exc}); install the package that provides it "
                         "(e.g. gcsfs, adlfs)") from None


def resolve(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, the path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(str(path).removeprefix("file://"))
    parsed = urlparse(str(path))
    return _filesystem(parsed.scheme, parsed.netloc), f"{parsed.netloc}{parsed.path}"


def read_bytes(path: str) -> bytes:
    """The whole file (a local path or a URI). A missing file raises FileNotFoundError naming it;
    a store that cannot be reached, or refuses the credentials, OSError naming the URI."""
    if not is_uri(path):
        with open(path, "rb") as fh:
            return fh.read()
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return bytes(stream.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except OSError as exc:
        raise OSError(f"cannot read {path}: {_reason(exc)}") from None


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (a URI, or a local path: written to a temp file, then renamed)."""
    if not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    fs, inner = resolve(path)
    try:
        with fs.open_output_stream(inner) as stream:
            stream.write(data)
    except OSError as exc:
        raise OSError(f"cannot write {path}: {_reason(exc)}") from None


def _file_type(path: str) -> Any:
    """The store's ``pyarrow.fs.FileType`` of a URI; an unreachable store is an error naming it."""
    fs, inner = resolve(path)
    try:
        return fs.get_file_info(inner).type
    except OSError as exc:
        raise OSError(f"cannot reach {path}: {_reason(exc)}") from None


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs as pafs

    return bool(_file_type(path) != pafs.FileType.NotFound)


def is_dir(path: str) -> bool:
    if not is_uri(path):
        return os.path.isdir(path)
    import pyarrow.fs as pafs

    return bool(_file_type(path) == pafs.FileType.Directory)


def list_files(folder: str) -> list[str]:
    """The names of the files directly in ``folder`` (names only: nothing is downloaded)."""
    if not is_uri(folder):
        with os.scandir(folder) as entries:
            return [e.name for e in entries if e.is_file()]
    import pyarrow.fs as pafs

    fs, inner = resolve(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=False))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} does not exist") from None
    except OSError as exc:
        raise OSError(f"cannot list {folder}: {_reason(exc)}") from None
    return [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File]


def check_reachable(uri: str) -> None:
    """Raise an error naming ``uri`` when its store cannot be reached or the folder does not exist."""
    if not exists(uri):
        raise FileNotFoundError(f"{uri} does not exist (no such bucket or prefix)")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


path_exists = exists
join_path = join
parent_path = parent
base_name = name
