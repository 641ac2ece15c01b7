"""Connecting to Ray: an existing cluster when one is named, else a new local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
_started_local = False


def started_local_cluster() -> bool:
    """True when this process started its own local cluster (which cannot grow, unlike an
    autoscaling cluster reached through an address)."""
    return _started_local


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """Initialise Ray once per process.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) connects to that cluster;
    otherwise a new local cluster is started on loopback with ``num_cpus`` CPUs. ``address="local"``
    is used rather than auto-detection so a stale cluster file from a killed head is never joined.
    """
    import ray
    import ray.data

    global _started_local
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Quiet by default: the CLI prints a line per round; worker errors still reach the driver.
    level = logging.INFO if log_to_driver else logging.WARNING
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=level)
    else:
        _started_local = True
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
                 log_to_driver=log_to_driver, logging_level=level)
    logging.getLogger("ray.data").setLevel(level)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    log.info("Ray resources: %s", ray.cluster_resources())
