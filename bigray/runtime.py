"""Connecting to Ray: the job's cluster, a given address, or a fresh local one on loopback."""

from __future__ import annotations

import logging
import os
import socket

from bigray.config import RayConfig
from bigray.ray_compat import init_loopback_cluster


def init_ray(cfg: RayConfig) -> None:
    """Connect once per process. Inside `ray job submit`, RAY_ADDRESS points at the job's cluster."""
    import ray

    if ray.is_initialized():
        return
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address, log_to_driver=True)
        return
    # Bound to loopback: a laptop or CI run must not open Ray's ports on the network. At least 4
    # logical CPUs so that Ray Data's read tasks still get scheduled beside the training workers.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # On one terminal, the tqdm bars of every Ray Data executor (driver, Train workers, Tune
    # trials) overwrite each other into thousands of lines; bigray prints its own summaries.
    # Read where ray.data is imported, so also set for processes started from here on.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # A local start is someone at a terminal: show bigray's lines, not Ray's INFO chatter (a report per
    # training step, execution plans). Everything still lands in Ray's log files under /tmp/ray.
    # Anyone who configured logging themselves keeps their config.
    quiet = not logging.getLogger().handlers
    # The dashboard (on 127.0.0.1:8265) also serves the State API that Ray Train's placement
    # group cleaner polls; without it that cleaner logs a warning every few seconds.
    init_loopback_cluster(
        num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=True,
        logging_config=ray.LoggingConfig(log_level="WARNING") if quiet else None,
    )
    import ray.data

    context = ray.data.DataContext.get_current()
    if os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1":
        context.enable_progress_bars = False
    if quiet:
        context.print_on_execution_start = False


def free_port() -> int:
    """A TCP port free on loopback right now (for local S3 / Serve / test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
