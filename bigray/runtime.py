"""Connecting to Ray: the job's cluster, a given address, or a fresh local one on loopback."""

from __future__ import annotations

import logging
import os
import socket

from bigray.config import RayConfig
from bigray.ray_compat import init_loopback_cluster


def resolve_log_level(cfg: RayConfig) -> str:
    """`cfg.log_level`, settled once: null becomes WARNING for a local start, INFO when joining a cluster.

    A local start is someone at a terminal: show bigray's lines, not Ray's INFO chatter (a report per
    training step, execution plans). Anyone who configured Python logging themselves keeps INFO.
    """
    if cfg.log_level is None:
        local = not (cfg.address or os.environ.get("RAY_ADDRESS"))
        cfg.log_level = "WARNING" if local and not logging.getLogger().handlers else "INFO"
    return cfg.log_level


def init_ray(cfg: RayConfig) -> None:
    """Connect once per process. Inside `ray job submit`, RAY_ADDRESS points at the job's cluster.

    Settles `cfg.log_level` too, so that the Train runs and Tune trials this section is handed to agree.
    """
    import ray

    resolve_log_level(cfg)
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
    # The dashboard (on 127.0.0.1:8265) also serves the State API that Ray Train's placement
    # group cleaner polls; without it that cleaner logs a warning every few seconds.
    init_loopback_cluster(num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True,
                          logging_config=ray.LoggingConfig(log_level=cfg.log_level))
    import ray.data

    if os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1":
        ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_console(cfg.log_level)


def quiet_ray_console(level: str) -> None:
    """Hold Ray's own records below `level` off this process's console; Ray's log files keep them all.

    Two places need it beyond `ray.init`'s logging config. Ray Data configures its own `ray.data` logger
    (not propagating, with its own console handler); at WARNING its one warning is that progress bars are
    off, which bigray chose. And a Train worker's root console handler gets Ray records that Train's own
    level filter misses: Ray 2.60 logs "Reporting training result ..." on a logger named by file path, not
    under `ray.train`. Call in every process that runs datasets or trains (the driver, Train workers).
    """
    if level in ("DEBUG", "INFO"):
        return
    import ray
    import ray.data  # configures the logger adjusted below

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel("ERROR" if level == "WARNING" else level)
    ray.data.DataContext.get_current().print_on_execution_start = False
    threshold, ray_dir = logging.getLevelName(level), os.path.dirname(ray.__file__)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            # The user's own INFO records (their train function's logging) still reach the console.
            handler.addFilter(lambda r: r.levelno >= threshold or not r.pathname.startswith(ray_dir))


def free_port() -> int:
    """A TCP port free on loopback right now (for local S3 / Serve / test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
