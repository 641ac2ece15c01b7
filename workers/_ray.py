"""Connecting to Ray: an existing cluster when one is named, else a new local one."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)
_started_local = False


def started_local_cluster() -> bool:
    """True when this process started its own local cluster (which cannot grow, unlike an
    autoscaling cluster reached through an address)."""
    return _started_local


_dashboard_url: str | None = None
_verbose = False
_on_start: list[Any] = []


def set_verbose(verbose: bool) -> None:
    """``shoal --verbose``: Ray's every message, Ray Data's execution plans and worker logs."""
    global _verbose
    _verbose = verbose


def after_ray_start(callback: Any) -> None:
    """Call ``callback()`` each time this process starts or joins Ray (the CLI puts its signal
    handlers back: Ray's own print a C stack dump on SIGTERM)."""
    _on_start.append(callback)


def stop_ray() -> None:
    """Disconnect from Ray; a local cluster this process started stops with it (its processes end)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


class _Noise(logging.Filter):
    """Ray's messages that are true of every run Shoal starts and say nothing to act on: the
    token-authentication notice of a local cluster (bound to 127.0.0.1, stopped with the run) and
    the notice that Ray Data's own progress bars are off (Shoal shows its own). ``--verbose`` keeps them."""

    NOISE = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.NOISE)


def quiet_ray_logs(verbose: bool = False) -> None:
    """Drop :class:`_Noise` from Ray's loggers unless ``verbose``."""
    if verbose:
        return
    for name in ("ray", "ray.data", "ray.data._internal.progress", "ray._private.authentication.authentication_token_setup"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Noise) for f in logger.filters):
            logger.addFilter(_Noise())
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _Noise) for f in handler.filters):
            handler.addFilter(_Noise())


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False) -> str | None:
    """Initialise Ray once per process; the dashboard's address (None without a dashboard).

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) connects to that cluster;
    otherwise a new local cluster is started on loopback with ``num_cpus`` CPUs. ``address="local"``
    is used rather than auto-detection so a stale cluster file from a killed head is never joined.
    """
    import ray
    import ray.data

    global _started_local, _dashboard_url
    if ray.is_initialized():
        return _dashboard_url
    address = address or os.environ.get("RAY_ADDRESS")
    # Quiet by default: the CLI prints a line per round; worker errors still reach the driver.
    log_to_driver = log_to_driver or _verbose
    level = logging.INFO if log_to_driver else logging.WARNING
    quiet_ray_logs(verbose=log_to_driver)
    if address:
        context = ray.init(address=address, log_to_driver=log_to_driver, logging_level=level)
    else:
        _started_local = True
        context = ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
                           include_dashboard=True, log_to_driver=log_to_driver, logging_level=level)
    quiet_ray_logs(verbose=log_to_driver)  # handlers ray.init added
    url = getattr(context, "dashboard_url", None)
    _dashboard_url = f"http://{url}" if url and not str(url).startswith("http") else url
    logging.getLogger("ray.data").setLevel(level)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = log_to_driver
    log.info("Ray resources: %s", ray.cluster_resources())
    for callback in _on_start:
        callback()
    return _dashboard_url


def wait_for_cpus(cpus: float, timeout_s: float = 5.0) -> bool:
    """Wait until the cluster shows ``cpus`` CPUs free (at most ``timeout_s``): the work a task
    just finished holds its CPUs until the raylet takes its worker back, and a Dataset started in
    that moment sizes itself on none (Ray Data then warns that it will hang). True when free."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < cpus:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
