"""Autoscaling on Ray's fake multi-node provider with cluster/local.yaml: a training job that asks for
more than the head holds gets worker nodes from the autoscaler and finishes.

The job runs the installed bigray (`python <repo>/jobs/train.py`, no --working-dir; tests/test_jobs.py
covers that): fake nodes share one session dir, and a node that joins mid-job re-extracts a working
dir over the one the driver is running in -- a shortcut of the fake provider that real nodes, each
with its own disk, do not share.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from bigray import storage
from tests.integration.test_jobs import ROOT, TINY_TRAIN, job_runtime_env, ray_head, run_keys, submit


def nodes(gcs: str, env: dict) -> list[dict]:
    """ray.nodes() of the cluster, dead ones included, from a separate driver (this process has its own Ray)."""
    code = "import json, ray; ray.init(log_to_driver=False); print(json.dumps(ray.nodes()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "RAY_ADDRESS": gcs},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 4-7 minutes on 2 cores: three raylets and their workers share them
def test_training_job_brings_worker_nodes(shards, s3, tmp_path):
    cluster = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    head_cpus = cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"]
    worker_cpus = cluster["available_node_types"]["cpu-worker"]["resources"]["CPU"]
    cpus_per_worker = 2
    assert head_cpus < cpus_per_worker <= worker_cpus < 2 * cpus_per_worker, (
        "each training worker needs its own worker node"
    )
    runs = s3.uri("autoscale-runs")
    # Exactly the two nodes training needs, so Ray Data's queued read tasks cannot pull in more on 2 cores.
    cluster["available_node_types"]["cpu-worker"]["max_workers"] = 2

    with ray_head(num_cpus=head_cpus, autoscaling_config=cluster) as (gcs, dashboard, env):
        assert len(nodes(gcs, env)) == 1, "only the head before the job"
        runtime_env = job_runtime_env(s3, gcs)
        del runtime_env["excludes"]  # no working dir to filter
        job = submit(
            dashboard,
            env,
            runtime_env,
            [
                "python",
                str(ROOT / "jobs" / "train.py"),
                f"data.output={shards}",
                f"train.storage_path={runs}",
                "train.run_name=autoscaled",
                f"train.cpus_per_worker={cpus_per_worker}",
                *TINY_TRAIN,
                "train.eval_every=100",
                "train.export=false",
            ],
            tmp_path,
            working_dir=False,
        )
        assert job["status"] == "SUCCEEDED", job
        # The fake provider names the nodes it launches fff...f00001, fff...f00002, ...; dead ones stay listed.
        added = [n["NodeID"] for n in nodes(gcs, env) if n["NodeID"].startswith("f" * 51)]

    assert len(added) >= 2, f"the autoscaler launched {added}; training needs 2 cpu-worker nodes"
    records = [
        json.loads(line) for line in storage.Store().read_text(f"{runs}/autoscaled/metrics.jsonl").splitlines()
    ]
    assert [r["step"] for r in records] == [5, 10]
    assert any("/checkpoint_" in k for k in run_keys(s3, "autoscale-runs/autoscaled/"))
