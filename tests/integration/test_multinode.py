"""The same `bigray train` on a two-node cluster (ray.cluster_utils.Cluster on loopback), one worker per node."""

from __future__ import annotations

import pytest

from bigray.config import load_config
from bigray.storage import Store
from bigray.train.metrics import read_records


@pytest.fixture
def two_nodes(shards):
    from tests.conftest import loopback_cluster

    with loopback_cluster(head_cpus=2, node_cpus=[2]) as cluster:
        yield cluster


def test_one_worker_per_node(two_nodes, shards, tmp_path):
    import ray

    from bigray.train.trainer import train

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = load_config(overrides=[
        f"data.output={shards}", f"train.storage_path={tmp_path}", "train.run_name=two-nodes", "train.num_workers=2",
        "train.placement_strategy=STRICT_SPREAD", "train.precision=fp32", "train.max_steps=10", "train.log_every=5",
        "train.eval_every=10", "train.checkpoint_every=10", "train.warmup_steps=2", "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.max_failures=0",
    ])
    out = train(cfg)
    records = read_records(out.run_dir, Store())
    assert [r["step"] for r in records] == [5, 10] and "val_loss" in records[-1]
    assert out.export.step == 10
