"""Connecting to Ray: the job's cluster, a given address, or a fresh local one on loopback."""

from __future__ import annotations

import os
import socket

from bigray.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Connect once per process. Inside `ray job submit`, RAY_ADDRESS points at the job's cluster."""
    import ray

    if ray.is_initialized():
        return
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address, log_to_driver=True)
    else:
        # Bound to loopback: a laptop or CI run must not open Ray's ports on the network. At least 4
        # logical CPUs so that Ray Data's read tasks still get scheduled beside the training workers.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # On one terminal, the tqdm bars of every Ray Data executor (driver, Train workers, Tune
        # trials) overwrite each other into thousands of lines; bigray prints its own summaries.
        # Read where ray.data is imported, so also set for processes started from here on.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        # Ray rewrites 127.0.0.1 to the host's outward address (services.resolve_ip_for_localhost)
        # unless this flag is off. The env var reaches the raylet and workers started below; this
        # driver read it when it imported ray, so its copy is set too.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        # The dashboard (on 127.0.0.1:8265) also serves the State API that Ray Train's placement
        # group cleaner polls; without it that cleaner logs a warning every few seconds.
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True)
        if os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1":
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False


def free_port() -> int:
    """A TCP port free on loopback right now (for local S3 / Serve / test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
