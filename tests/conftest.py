"""Shared fixtures: a local S3 server (moto, loopback only) and a local Ray cluster bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass

import pytest

from bigray.runtime import free_port  # noqa: F401 - re-exported for tests

# Nothing in the tests may reach beyond loopback: no Ray usage stats, no EC2 metadata lookups.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray (read once, at import) resolves "this host" to loopback with this off; otherwise a driver that
# is not itself a node (ray.cluster_utils.Cluster) rewrites 127.0.0.1 to the host's own address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket for the session; AWS_* env points at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    store = S3(endpoint, f"bigray-test-{uuid.uuid4().hex[:8]}")
    store.client().create_bucket(Bucket=store.bucket)
    yield store
    server.stop()


def start_local_ray():
    import ray

    from bigray.ray_compat import init_loopback_cluster

    # 4 logical CPUs on a 2-core box: 2 training workers plus Ray Data's read tasks beside them.
    # The dashboard as bigray's own local clusters have it: it serves the State API that Ray Train's
    # placement group cleaner needs to free the group of a controller that died.
    init_loopback_cluster(num_cpus=4, include_dashboard=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def loopback_cluster(head_cpus: float, node_cpus: list[float], dashboard: bool = False):
    """Several Ray nodes on loopback (ray.cluster_utils.Cluster) in place of the session's cluster, which is
    started again afterwards for the tests that follow."""
    import ray
    from ray.cluster_utils import Cluster

    restart = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": dashboard})
    for cpus in node_cpus:
        cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if restart:
            start_local_ray()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """One local Ray cluster for the session, started after the S3 env so workers inherit it."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shards(s3, ray_cluster):
    """Tiny tokenized shards of three stdlib packages, written to the local S3 server by `prepare`."""
    from bigray.config import load_config
    from bigray.data import prepare

    out = s3.uri("train-data")
    prepare(load_config(overrides=[
        "data.inputs=['{stdlib}/json/*.py', '{stdlib}/email/*.py', '{stdlib}/logging/*.py']", "data.format=text",
        f"data.output={out}", "data.vocab_size=512", "data.seq_len=64", "data.val_fraction=0.05",
    ]))
    return out
