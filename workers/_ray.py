"""Connecting to Ray: an existing cluster when one is named, else a new local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) connects to that cluster;
    otherwise a new local cluster is started on loopback with ``num_cpus`` CPUs. ``address="local"``
    is used rather than auto-detection so a stale cluster file from a killed head is never joined.
    """
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    log.info("Ray resources: %s", ray.cluster_resources())
