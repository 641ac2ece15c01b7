"""A screenshot of a Shoal round's task in a real Label Studio, with the model's pre-annotation (a
script, not a test).

    .venv/bin/python benchmarks/label_studio_screenshot.py

1. Starts Label Studio 1.23.2 from ``.venv-labelstudio`` (``make labeling``) on 127.0.0.1, serving
   local files from a temporary folder, in its own process group.
2. Runs one quickstart round into that folder with ``oracle.kind: label-studio`` (3 epochs), so the
   round stops with ``rounds/round-001/tasks/``.
3. Follows the task folder's README through the API: a project from ``label_config.xml``, a Local
   Storage on the work dir, ``tasks.json`` imported.
4. Logs in with headless Chromium (the DevTools driver of ``mlflow_screenshot.py``), opens the first
   task and writes ``benchmarks/results/label_studio_task.png``; stops Label Studio and the browser
   by process group.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflow_screenshot import Chromium, free_port  # noqa: E402

LABEL_STUDIO = ROOT / ".venv-labelstudio" / "bin" / "label-studio"
EMAIL = "lead@example.com"


def call(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Authorization": f"Token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


async def shoot(url: str, password: str, project: int, task: int, out: Path) -> None:
    browser = Chromium()
    try:
        await browser.connect()
        await browser.open(f"{url}/user/login/", "Log in")
        await browser.js(f"""(() => {{
            document.querySelector('input[name=email]').value = {json.dumps(EMAIL)};
            document.querySelector('input[name=password]').value = {json.dumps(password)};
            document.querySelector('form').submit();
        }})()""")
        await asyncio.sleep(3)
        await browser.open(f"{url}/projects/{project}/data?task={task}", "Submit", timeout=120)
        await browser.screenshot(out, settle_s=6.0)
    finally:
        await browser.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/label_studio_task.png"))
    args = parser.parse_args()
    if not LABEL_STUDIO.exists():
        raise SystemExit(f"{LABEL_STUDIO} is missing: run `make labeling`")
    root = Path(tempfile.mkdtemp(prefix="shoal-ls-"))
    port, token, password = free_port(), secrets.token_hex(20), secrets.token_hex(8)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root), "LABEL_STUDIO_BASE_DATA_DIR": str(root / "ls-data"),
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
    with open(root / "label-studio.log", "w") as log:
        proc = subprocess.Popen([str(LABEL_STUDIO), "start", "--internal-host", "127.0.0.1", "--port", str(port),
                                 "--no-browser", "--username", EMAIL, "--password", password, "--user-token", token],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    try:
        workdir = root / "experiment"
        run = subprocess.run([str(ROOT / ".venv/bin/shoal"), "run", "--config", str(ROOT / "configs/quickstart.yaml"),
                              "--workdir", str(workdir), "--set", "oracle.kind=label-studio", "--set", "loop.rounds=1",
                              "--set", "train.epochs=3", "--set", f"oracle.local_files_root={root}"],
                             cwd=ROOT, text=True, capture_output=True, env={**os.environ, "SHOAL_PROGRESS": "off"})
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        deadline = time.monotonic() + 300
        while True:
            try:
                call(url, token, "GET", "/api/projects/")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit((root / "label-studio.log").read_text()[-3000:]) from None
                time.sleep(1)
        tasks_dir = workdir / "rounds" / "round-001" / "tasks"
        project = call(url, token, "POST", "/api/projects/", {"title": "shoal quickstart round 1",
                                                               "label_config": (tasks_dir / "label_config.xml").read_text()})
        call(url, token, "POST", "/api/storages/localfiles/", {"project": project["id"], "path": str(workdir),
                                                               "title": "work dir", "use_blob_urls": True})
        call(url, token, "POST", f"/api/projects/{project['id']}/import", json.loads((tasks_dir / "tasks.json").read_text()))
        tasks = call(url, token, "GET", f"/api/tasks/?project={project['id']}&page_size=10")["tasks"]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(shoot(url, password, project["id"], tasks[0]["id"], out))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
