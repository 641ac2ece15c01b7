"""Screenshots of the MLflow UI of a quickstart experiment, taken in headless Chromium (a script, not
a test).

    .venv/bin/python benchmarks/mlflow_screenshot.py             # runs (or reuses) runs/mlflow-screenshot
    .venv/bin/python benchmarks/mlflow_screenshot.py --epochs 10 # the quickstart's own training length

1. Runs the quickstart twice into one MLflow store (``<workdir>/mlflow.db``, artifacts in
   ``<workdir>/mlartifacts``): a random baseline, then entropy sampling (the quickstart's own
   strategy), so the entropy rounds' learning curves show the baseline. A finished work dir is
   reused; ``--epochs`` shortens training (default 4, the quickstart trains 10).
2. Starts ``mlflow server`` on 127.0.0.1 in its own process group (job execution off) and waits for
   ``/health``.
3. Drives headless Chromium over the DevTools protocol (``--remote-debugging-port`` on loopback,
   aiohttp as the client): opens the experiment's runs table with the parent runs expanded to
   their round runs and a few metric columns, the entropy run's learning-curve artifact, and the
   last round's artifacts (learning curve, selected thumbnails).
4. Writes the PNGs to ``benchmarks/results/mlflow_*.png`` and stops the server and the browser by
   process group.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``). Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "quickstart"
WIDTH, HEIGHT = 1600, 1000
METRIC_COLUMNS = ["val_miou", "labeled_count", "learning_curve_auc", "final_val_miou"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------- the experiment


def finished(workdir: Path) -> bool:
    try:
        return bool(json.loads((workdir / "state.json").read_text()).get("stopped"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def run_quickstart(root: Path, strategy: str, epochs: int) -> Path:
    workdir = root / strategy
    if finished(workdir):
        print(f"reusing {workdir}", flush=True)
        return workdir
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cmd = [
        str(ROOT / ".venv/bin/shoal"), "run", "--config", str(ROOT / "configs/quickstart.yaml"), "--workdir", str(workdir),
        "--set", f"loop.strategy={strategy}", "--set", f"train.epochs={epochs}",
        "--set", f"experiment.name={EXPERIMENT}-{strategy}",
        "--set", f"tracking.tracking_uri={uri}", "--set", f"tracking.experiment_name={EXPERIMENT}",
    ]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    print(f"{strategy}: {time.perf_counter() - t0:.0f} s", flush=True)
    return workdir


def prepare(root: Path, epochs: int, baseline: bool) -> None:
    from workers import Tracker

    root.mkdir(parents=True, exist_ok=True)
    # Create the experiment first, so both runs keep their artifacts under the work dir (a store
    # given by URI would otherwise put them in ./mlruns of whoever created it).
    Tracker(f"sqlite:///{root / 'mlflow.db'}", EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
    if baseline:
        run_quickstart(root, "random", epochs)
    run_quickstart(root, "entropy", epochs)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "mlflow-server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'mlflow-server.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.read().strip() == b"OK":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not answer /health in 120 s")
            time.sleep(0.5)
        print(f"mlflow server: {url}", flush=True)
        yield url
    finally:
        stop_group(proc)
        log.close()


# ---------------------------------------------------------------------------------- the browser


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self) -> None:
        exe = shutil.which("chromium") or "/usr/bin/chromium"
        if not Path(exe).exists():
            raise SystemExit("chromium not found: apt-get install -y chromium")
        self.profile = tempfile.mkdtemp(prefix="shoal-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self._id = 0

    async def connect(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as resp:
            page = next(p for p in await resp.json() if p["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.cmd("Page.enable")
        await self.cmd("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    async def cmd(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    async def js(self, expression: str) -> Any:
        result = await self.cmd("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def open(self, url: str, text: str, timeout: float = 60) -> None:
        """Go to ``url`` and wait until the page shows ``text`` (the UI renders in JavaScript)."""
        await self.cmd("Page.navigate", url=url)
        await self.wait_for(text, timeout)

    async def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(f"!!document.body && document.body.innerText.includes({json.dumps(text)})"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the page never showed {text!r}")
            await asyncio.sleep(0.5)

    async def screenshot(self, path: Path, settle_s: float = 2.0) -> None:
        await asyncio.sleep(settle_s)  # images and charts load after the text
        data = await self.cmd("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"wrote {path}", flush=True)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
            await self.session.close()
        self.close()

    def close(self) -> None:
        stop_group(self.proc)
        shutil.rmtree(self.profile, ignore_errors=True)


async def capture(url: str, root: Path, out: Path) -> list[Path]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`shoal.run_kind` = 'experiment'",
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("shoal.strategy") == "entropy")
    rounds = client.search_runs([exp.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    last = max(rounds, key=lambda r: int(r.data.tags["shoal.round"]))
    eid = exp.experiment_id
    base = f"{url}/#/experiments/{eid}"
    shots = []
    browser = Chromium()
    try:
        await browser.connect()
        # The first visit makes the app write its settings to localStorage; edit them from a page
        # of the same origin without the app (/health), so the app cannot write them back: close
        # the assistant panel, expand the parent runs, show a few metric columns.
        await browser.open(f"{base}/runs", "matching runs")
        await browser.open(f"{url}/health", "OK")
        settings = json.dumps({
            "selectedColumns": ["attributes.`Models`", "params.`strategy`"] + [f"metrics.`{m}`" for m in METRIC_COLUMNS],
            "runsExpanded": {r.info.run_id: True for r in runs},
        })
        await browser.js(f"""(() => {{
            localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
            const key = Object.keys(localStorage).find(k => k.includes('ExperimentPage') && k.endsWith('ReactComponentState'));
            if (key) localStorage.setItem(key, JSON.stringify({{...JSON.parse(localStorage.getItem(key)), ...{settings}}}));
            return key;
        }})()""")
        await browser.open(f"{base}/runs", str(last.info.run_name))
        shots.append(out / "mlflow_experiment.png")
        await browser.screenshot(shots[-1])

        pages = [
            (parent.info.run_id, "learning_curve.png", "mlflow_parent_learning_curve.png"),
            (last.info.run_id, "figures/learning_curve.png", "mlflow_round_learning_curve.png"),
            (last.info.run_id, "figures/selected_thumbnails.jpg", "mlflow_round_thumbnails.png"),
        ]
        for run_id, artifact, name in pages:
            # Through /health: the app then loads afresh and opens the artifact the URL names.
            await browser.open(f"{url}/health", "OK")
            await browser.open(f"{base}/runs/{run_id}/artifacts/{artifact}", f"{artifact}")
            shots.append(out / name)
            await browser.screenshot(shots[-1], settle_s=3.0)
    finally:
        await browser.aclose()
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs/mlflow-screenshot"))
    parser.add_argument("--epochs", type=int, default=4, help="train.epochs of both runs (the quickstart: 10)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the random baseline run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()
    root = Path(args.workdir).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare(root, args.epochs, baseline=not args.no_baseline)
    with mlflow_server(root) as url:
        shots = asyncio.run(capture(url, root, out))
    print("screenshots:", *[str(p) for p in shots], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
