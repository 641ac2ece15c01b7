"""A round labeled in a real Label Studio: the project made from the task folder's
``label_config.xml``, ``tasks.json`` imported through the API, every image URL served, the
pre-annotations valid for the project, annotations made from known masks, the JSON export imported
with ``shoal import-labels`` and the round resumed with ``shoal resume``: the masks come back pixel
for pixel. A second project syncs the round's images from a Local Storage (tasks without a
``sample_id``), matched on import by the image's file name.

Label Studio runs from its own virtual environment (``make labeling``, which ``make test-slow``
runs: its pins clash with Shoal's), on 127.0.0.1, in its own process group, stopped by its id.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import workers
from orchestrator import TableStore
from orchestrator._labelstudio import mask_to_brush

from .conftest import ROOT, stop_group, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray]

LABEL_STUDIO = ROOT / ".venv-labelstudio" / "bin" / "label-studio"
NAMES = ["seabed", "pipeline", "anode", "rock", "leak"]
CLASSES = workers.ClassInfo(names=tuple(NAMES), ignore_index=255)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """Label Studio's HTTP API with a legacy token (``Authorization: Token ...``), on 127.0.0.1."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
        return payload if raw else (json.loads(payload) if payload else None)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Path]]:
    if not LABEL_STUDIO.exists():
        pytest.fail(f"{LABEL_STUDIO} is missing: run `make labeling` (make test-slow does)")
    root = tmp_path_factory.mktemp("ls")  # the document root Label Studio serves local files from
    port, token = free_port(), secrets.token_hex(20)
    env = {**os.environ, "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root), "LABEL_STUDIO_BASE_DATA_DIR": str(root / "ls-data"),
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
           "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
    log = open(root / "label-studio.log", "w")  # noqa: SIM115 - closed at the end of the module
    proc = subprocess.Popen(
        [str(LABEL_STUDIO), "start", "--internal-host", "127.0.0.1", "--port", str(port), "--no-browser",
         "--username", "lead@example.com", "--password", secrets.token_hex(8), "--user-token", token],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    client = Client(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (root / "label-studio.log").read_text()[-4000:]
            try:
                client.call("GET", "/api/projects/")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "Label Studio did not answer in 300 s"
                time.sleep(1)
        yield client, root
    finally:
        stop_group(proc, timeout=30)
        log.close()


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def brush_result(mask: np.ndarray) -> list[dict[str, Any]]:
    """What an annotator's brush strokes for ``mask`` look like in Label Studio: one region per class."""
    return [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": int(mask.shape[1]),
             "original_height": int(mask.shape[0]), "image_rotation": 0,
             "value": {"format": "rle", "rle": mask_to_brush(mask == c), "brushlabels": [NAMES[c]]}}
            for c in np.unique(mask) if c < len(NAMES)]


def truth(workdir: Path, sample_id: str) -> np.ndarray:
    table = TableStore(workdir / "table").read(TableStore(workdir / "table").revisions()[0]).set_index("sample_id")
    return workers.load_mask(str(table.loc[sample_id, "mask_path"]), CLASSES).astype(np.uint8)


def test_a_round_labeled_in_label_studio_comes_back_pixel_for_pixel(label_studio: tuple[Client, Path]) -> None:
    client, root = label_studio
    workdir = root / "experiment"
    out = shoal("run", "--config", str(ROOT / "configs/quickstart.yaml"), "--workdir", str(workdir), *tiny_overrides(),
                "--set", "oracle.kind=label-studio", "--set", "loop.rounds=1",
                "--set", f"oracle.local_files_root={root}")
    assert out.returncode == 0 and "awaiting labels" in out.stdout, out.stderr[-3000:]
    task_dir = workdir / "rounds" / "round-001" / "tasks"
    tasks = json.loads((task_dir / "tasks.json").read_text())
    assert (task_dir / "README.md").exists() and "label_config.xml" in (task_dir / "README.md").read_text()

    project = client.call("POST", "/api/projects/", {"title": "shoal round 1",
                                                     "label_config": (task_dir / "label_config.xml").read_text()})
    storage = client.call("POST", "/api/storages/localfiles/", {"project": project["id"], "path": str(workdir),
                                                                "title": "the work dir", "use_blob_urls": True})
    assert storage["id"]
    imported = client.call("POST", f"/api/projects/{project['id']}/import", tasks)
    assert imported["task_count"] == len(tasks) == 6 and imported["prediction_count"] == 6
    listed = client.call("GET", f"/api/tasks/?project={project['id']}&page_size=100")["tasks"]
    assert len(listed) == 6
    for task in listed:  # every image URL returns the image's bytes
        sample = task["data"]["sample_id"]
        served = client.call("GET", task["data"]["image"], raw=True)
        copied = next((task_dir / "images").glob(f"{sample}.*"))
        assert served == copied.read_bytes()
        predictions = client.call("GET", f"/api/predictions/?task={task['id']}")
        [prediction] = predictions
        labels = {r["value"]["brushlabels"][0] for r in prediction["result"]}
        assert labels and labels <= set(NAMES)  # the project's own label names
    validated = client.call("POST", f"/api/projects/{project['id']}/validate/",
                            {"label_config": (task_dir / "label_config.xml").read_text()})
    assert validated is not None

    for task in listed:
        client.call("POST", f"/api/tasks/{task['id']}/annotations/",
                    {"result": brush_result(truth(workdir, task["data"]["sample_id"])), "ground_truth": False})
    export = root / "export.json"
    export.write_bytes(client.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON", raw=True))
    imported_run = shoal("import-labels", str(workdir), str(export))
    assert imported_run.returncode == 0 and "6 masks added" in imported_run.stdout, imported_run.stderr[-3000:]
    again = shoal("import-labels", str(workdir), str(export))
    assert again.returncode == 0 and "0 masks added, 6 unchanged" in again.stdout
    resumed = shoal("resume", str(workdir))
    assert resumed.returncode == 0 and "round 1: labeled 8 -> 14" in resumed.stdout, resumed.stderr[-3000:]
    state = json.loads((workdir / "state.json").read_text())
    table = TableStore(workdir / "table").read(state["revision"]).set_index("sample_id")
    for task in listed:
        sample = task["data"]["sample_id"]
        got = cv2.imread(table.loc[sample, "mask_path"], cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(got, truth(workdir, sample))

    # Tasks Label Studio made itself, by syncing a storage of the round's images: no sample_id.
    synced = client.call("POST", "/api/projects/", {"title": "synced",
                                                    "label_config": (task_dir / "label_config.xml").read_text()})
    storage = client.call("POST", "/api/storages/localfiles/", {
        "project": synced["id"], "path": str(task_dir / "images"), "title": "round 1 images",
        "regex_filter": r".*\.png", "use_blob_urls": True})
    client.call("POST", f"/api/storages/localfiles/{storage['id']}/sync")
    deadline = time.monotonic() + 120
    while len(found := client.call("GET", f"/api/tasks/?project={synced['id']}&page_size=100")["tasks"]) < 6:
        assert time.monotonic() < deadline, "the storage sync made no tasks"
        time.sleep(1)
    for task in found:
        assert "sample_id" not in task["data"]
        sample = Path(task["data"]["image"].split("?d=")[-1]).stem
        client.call("POST", f"/api/tasks/{task['id']}/annotations/",
                    {"result": brush_result(truth(workdir, sample)), "ground_truth": False})
    export = root / "synced.json"
    export.write_bytes(client.call("GET", f"/api/projects/{synced['id']}/export?exportType=JSON", raw=True))
    from orchestrator._labeling import read_answers, read_manifest

    answers = read_answers(export, read_manifest(task_dir), CLASSES)
    assert sorted(a.sample_id for a in answers) == sorted(t["data"]["sample_id"] for t in listed)
    for answer in answers:
        np.testing.assert_array_equal(answer.mask, truth(workdir, answer.sample_id))
        assert "Label Studio task" in answer.source
