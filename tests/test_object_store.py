"""A pool in a bucket: an S3-compatible server (moto's server mode) on 127.0.0.1 holds the images;
Shoal lists names, the Ray workers decode straight from the store, the driver downloads only the
images it exports for people, and the masks people return go back into the bucket.

The server is started by this module and stopped by its process id; credentials and the endpoint
come from the environment, as the AWS SDKs read them (``AWS_ENDPOINT_URL``...), set before Ray
starts so its workers inherit them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import workers
import workers._data
from orchestrator import ActiveLearningLoop, config_from_dict

from .conftest import stop_group, tiny_config

pytestmark = pytest.mark.ray

BUCKET = "shoal-pool"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:<port>``: a moto S3 server with credentials in the environment."""
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
                          region="us-east-1").create_dir(BUCKET)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_group(proc, timeout=30)


def upload(folder: Path, prefix: str) -> str:
    """Copy ``folder`` into the bucket under ``prefix``; its URI."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            workers.write_bytes(f"s3://{BUCKET}/{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def synthetic(root: Path, n: int, seed: int, prefix: str, masks: bool) -> Path:
    workers.generate_synthetic(root, n, 32, 48, seed, prefix=prefix)
    (root / "metadata.csv").unlink()
    (root / ".complete").unlink()
    if not masks:
        shutil.move(root / "masks", root.parent / f"{root.name}-truth")
    return root


def test_a_pool_without_masks_in_a_bucket_runs_a_round_with_people(
    s3: str, ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = upload(synthetic(tmp_path / "pool", 24, 0, "img", masks=False), "survey/pool")
    val = upload(synthetic(tmp_path / "val", 8, 1, "val", masks=True), "survey/val")
    truth = tmp_path / "pool-truth"
    cfg = config_from_dict(tiny_config(
        data={"kind": "folder", "train_dir": pool, "val_dir": val, "image_size": [32, 48], "write_back_masks": True},
        loop={"initial_labeled": 8, "budget": 6, "rounds": 1}, oracle={"kind": "folder"},
        train={"num_workers": 1}))  # trains in a Ray worker, as on a cluster (0 trains in this process)
    # what the driver reads of the pool's images: nothing but the images it exports for people
    import orchestrator._labeling as labeling

    driver_reads: list[str] = []
    real_read = workers.read_bytes

    def counted(path: str) -> bytes:
        if "/images/" in str(path):
            driver_reads.append(str(path))
        return real_read(path)

    monkeypatch.setattr(labeling, "read_bytes", counted)
    monkeypatch.setattr(workers._data._io, "read_bytes", counted)  # type: ignore[attr-defined]
    loop = ActiveLearningLoop(cfg, tmp_path / "work")
    state = loop.start()  # nothing labeled: round 0 asks people for 8 images
    assert state.round == 0
    table = loop.store.read(state.revision)
    assert table.image_path.str.startswith(f"s3://{BUCKET}/survey/").all()
    asked = loop.awaiting_labels["requested"]
    assert {Path(p).stem for p in driver_reads} == set(asked)  # listed by name, decoded by the workers
    task = Path(loop.awaiting_labels["task_dir"])
    assert sorted(p.stem for p in (task / "images").iterdir()) == sorted(asked)  # copied: only these

    def answer(into: Path) -> Path:
        manifest = json.loads((Path(loop.awaiting_labels["task_dir"]) / "manifest.json").read_text())
        into.mkdir()
        for sample in manifest["samples"]:
            shutil.copy(truth / f"{sample['sample_id']}.png", into / f"{sample['name']}.png")
        return into

    loop.import_labels(answer(tmp_path / "answers0"))
    written = workers.list_files(f"{pool}/masks")
    assert sorted(Path(n).stem for n in written) == sorted(asked)  # the bucket stays the dataset of record
    driver_reads.clear()
    assert loop.step() is None  # round 1 trains on people's labels (images read from the bucket), exports, waits
    assert loop.state.round_info["train"]["trained_on"] + loop.state.round_info["train"]["val_images"] >= 8
    assert {Path(p).stem for p in driver_reads} == set(loop.awaiting_labels["requested"])  # export, pre-annotations
    loop.import_labels(answer(tmp_path / "answers1"))
    result = ActiveLearningLoop.resume(loop.workdir).step()
    assert result is not None and result.round == 1 and len(result.added) == 6
    assert len(workers.list_files(f"{pool}/masks")) == 14


def test_a_fully_labeled_bucket_runs_a_simulated_round(s3: str, ray_cluster: None, tmp_path: Path) -> None:
    pool = upload(synthetic(tmp_path / "pool", 20, 2, "img", masks=True), "bench/pool")
    val = upload(synthetic(tmp_path / "val", 8, 3, "val", masks=True), "bench/val")
    cfg = config_from_dict(tiny_config(data={"kind": "folder", "train_dir": pool, "val_dir": val,
                                             "image_size": [32, 48]}, loop={"rounds": 1}))
    loop = ActiveLearningLoop(cfg, tmp_path / "work")
    [result] = loop.run()
    table = loop.store.read(result.revision)
    labeled = table[table.labeled]
    assert len(labeled) == 14 and labeled.mask_path.str.startswith(f"s3://{BUCKET}/bench/pool/masks/").all()
    assert 0.0 <= result.val_miou <= 1.0


@pytest.mark.parametrize("case, message", [
    ("no_bucket", r"s3://no-such-bucket/pool/images: no images/ folder"),
    ("no_prefix", rf"s3://{BUCKET}/nowhere/images: no images/ folder"),
    ("scheme", r"no filesystem for 'nosuchfs://' URIs"),
    ("unreachable", r"cannot (reach|list|read) s3://"),
])
def test_a_bad_pool_uri_is_refused_naming_it_and_leaves_nothing(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, message: str
) -> None:
    uri = {"no_bucket": "s3://no-such-bucket/pool", "no_prefix": f"s3://{BUCKET}/nowhere",
           "scheme": "nosuchfs://host/pool", "unreachable": f"s3://{BUCKET}/pool"}[case]
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        workers._io._filesystem.cache_clear()  # type: ignore[attr-defined]
    cfg = config_from_dict(tiny_config(data={"kind": "folder", "train_dir": uri, "image_size": [32, 48]},
                                       oracle={"kind": "folder"}))
    t0 = time.monotonic()
    with pytest.raises((ValueError, OSError, FileNotFoundError), match=message):
        ActiveLearningLoop(cfg, tmp_path / "work").start()
    assert time.monotonic() - t0 < 60  # an error, not a hang
    assert not (tmp_path / "work").exists()
    workers._io._filesystem.cache_clear()  # type: ignore[attr-defined]


def test_wrong_credentials_are_refused_naming_the_uri(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second server that checks credentials (moto's INITIAL_NO_AUTH_ACTION_COUNT=0): a key it does
    not know is an error naming the URI, at start, and nothing is written."""
    port = free_port()
    with open(tmp_path / "moto.log", "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (refusing the unsigned request)
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY00000000")
        workers._io._filesystem.cache_clear()  # type: ignore[attr-defined]
        cfg = config_from_dict(tiny_config(data={"kind": "folder", "train_dir": f"s3://{BUCKET}/pool",
                                                 "image_size": [32, 48]}, oracle={"kind": "folder"}))
        with pytest.raises(OSError, match=rf"cannot (reach|list) s3://{BUCKET}/pool.*(InvalidAccessKeyId|ACCESS_DENIED|403)"):
            ActiveLearningLoop(cfg, tmp_path / "work").start()
        assert not (tmp_path / "work").exists()
    finally:
        workers._io._filesystem.cache_clear()  # type: ignore[attr-defined]
        stop_group(proc, timeout=30)


def test_an_object_gone_between_listing_and_reading_is_skipped_with_skip_unreadable(
    s3: str, ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = upload(synthetic(tmp_path / "pool", 12, 4, "img", masks=False), "vanish/pool")
    val = upload(synthetic(tmp_path / "val", 8, 5, "val", masks=True), "vanish/val")
    real_scan = workers.scan_folder_dataset

    def scan_then_delete(root: str, require_masks: bool = True):  # the object goes after it was listed
        found = real_scan(root, require_masks)
        if root == pool:
            import pyarrow.fs as pafs

            fs, inner = workers._io.resolve(f"{pool}/images/img_000003.png")  # type: ignore[attr-defined]
            fs.delete_file(inner)
            assert isinstance(fs, pafs.S3FileSystem)
        return found

    monkeypatch.setattr(workers, "scan_folder_dataset", scan_then_delete)
    data = {"kind": "folder", "train_dir": pool, "val_dir": val, "image_size": [32, 48]}
    small = {"initial_labeled": 4, "budget": 2}
    with pytest.raises(ValueError, match=r"img_000003.png"):
        ActiveLearningLoop(config_from_dict(tiny_config(data=data, oracle={"kind": "folder"}, loop=small)),
                           tmp_path / "a").start()
    assert not (tmp_path / "a").exists()
    workers.write_bytes(f"{pool}/images/img_000003.png", (tmp_path / "pool" / "images" / "img_000003.png").read_bytes())
    loop = ActiveLearningLoop(config_from_dict(tiny_config(data={**data, "skip_unreadable": True},
                                                           oracle={"kind": "folder"}, loop=small)), tmp_path / "b")
    state = loop.start()
    assert "img_000003" not in set(loop.store.read(state.revision).sample_id)
    assert "img_000003" in (tmp_path / "b" / "unreadable.csv").read_text()
