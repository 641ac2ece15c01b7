"""Shared fixtures: tiny configs and one local Ray cluster per test module that needs it."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a round is dominated by Ray's fixed costs, big enough to learn something.
TINY: dict[str, Any] = {
    "experiment": {"name": "tiny", "seed": 0},
    "data": {
        "kind": "synthetic",
        "image_size": [32, 48],
        "synthetic": {"num_train": 36, "num_val": 8, "height": 32, "width": 48, "seed": 0},
    },
    "model": {"name": "unet", "options": {"base_channels": 8, "depth": 2}},
    "train": {"epochs": 2, "batch_size": 8, "num_workers": 0, "samples_per_epoch": 16},
    "score": {"num_actors": 1, "batch_size": 8},
    "loop": {"strategy": "entropy", "initial_labeled": 8, "budget": 6, "rounds": 2},
    "ray": {"num_cpus": 2},
}


def stop_group(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Stop a server a test started in its own process group: SIGTERM, then SIGKILL after
    ``timeout`` seconds, then SIGKILL to anything of the group still alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def tiny_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY with some sections updated: ``tiny_config(train={"num_workers": 2})``."""
    cfg = copy.deepcopy(TINY)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def tiny_overrides(**sections: dict[str, Any]) -> list[str]:
    """The same as ``--set KEY=VALUE`` arguments for the CLI."""
    import json

    out = []
    for section, values in tiny_config(**sections).items():
        for key, value in values.items():
            out += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return out


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster on loopback for the test module, shut down afterwards."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # left by a test that let the loop start its own cluster
        ray.shutdown()
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_behind() -> Iterator[None]:
    """Shut down a Ray session a test module started without the ``ray_cluster`` fixture."""
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without the interpreter's teardown once pytest has reported everything.

    After a session that started and stopped many Ray clusters, the native threads of Ray's core
    worker and torch occasionally crashed during interpreter teardown (a segmentation fault after the
    summary), which turned a passing run's exit status into 139. The results and the summary are
    final at this point, so the run exits with pytest's own status.
    """
    if _EXIT_STATUS and "ray" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
