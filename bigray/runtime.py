"""Connecting to Ray: the job's cluster, a given address, or a fresh local one on loopback."""

from __future__ import annotations

import os

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
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
