"""`ray job submit` (Ray's own CLI, token auth) of jobs/train.py to a head started by `ray start --head` on loopback.

The head is this test's own: free ports, its own temp dir, stopped by killing its process session, never
`ray stop` (which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml

from bigray import storage
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
TINY_TRAIN = [
    "train.num_workers=2",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "train.lr=3e-3",
    "train.min_lr=3e-4",
    "train.warmup_steps=2",
    "train.max_steps=10",
    "train.log_every=5",
    "train.eval_every=10",
    "train.checkpoint_every=5",
    "train.max_failures=0",
]


def ray_env(**extra: str) -> dict:
    """Env for the head and for the CLI client: token auth on, loopback kept, this venv's python first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        **extra,
    )
    return env


@contextmanager
def ray_head(num_cpus: int = 4, autoscaling_config: dict | None = None, env: dict | None = None):
    """`ray start --head --block` on 127.0.0.1 with free ports; yields (gcs address, dashboard URL, env).

    With `autoscaling_config` (a fake_multinode cluster YAML as a dict) the head runs Ray's autoscaler,
    which adds and removes fake worker nodes on this machine.
    """
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    # Unix socket paths under the temp dir must stay short (108 bytes), hence not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="bigray-ray-", dir="/tmp")
    env = ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **(env or {}))
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    if autoscaling_config:
        autoscaling_config = copy.deepcopy(autoscaling_config)
        # Fake nodes join the GCS at <this host>:6379 unless told otherwise.
        autoscaling_config["provider"]["gcs_address"] = f"127.0.0.1:{ports['port']}"
        config_file = os.path.join(temp_dir, "autoscaling.yaml")
        Path(config_file).write_text(yaml.safe_dump(autoscaling_config))
        cmd.append(f"--autoscaling-config={config_file}")
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    # Its own session: every process the head starts (GCS, raylet, workers, the autoscaler's fake
    # nodes) can be found and stopped without touching other Ray clusters on this machine.
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_jobs_api(dashboard, env, head, temp_dir)
        yield f"127.0.0.1:{ports['port']}", dashboard, env
    finally:
        stop_session(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_jobs_api(dashboard: str, env: dict, head: subprocess.Popen, temp_dir: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(
                f"ray start exited {head.returncode}:\n{Path(temp_dir, 'ray-start.log').read_text()[-3000:]}"
            )
        if subprocess.run([RAY, "job", "list", "--address", dashboard], env=env, capture_output=True).returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError(f"the head's job API at {dashboard} did not come up in {timeout_s} s")


def stop_session(head: subprocess.Popen) -> None:
    """SIGTERM the head's whole process session (ray start then stops its own processes), SIGKILL what is left."""
    sid = os.getsid(head.pid)
    members = [p for p in psutil.process_iter() if _sid(p) == sid]
    for p in members:
        with _gone():
            p.terminate()
    _, alive = psutil.wait_procs(members, timeout=15)
    for p in alive:
        with _gone():
            p.kill()
    head.wait(timeout=15)


def _sid(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


@contextmanager
def _gone():
    try:
        yield
    except psutil.NoSuchProcess:
        pass


def submit(
    dashboard: str,
    env: dict,
    runtime_env: dict,
    entrypoint: list[str],
    tmp_path: Path,
    working_dir: bool = True,
    timeout_s: float = 600,
) -> dict:
    """`ray job submit [--working-dir .]` from the repo root, to the end; the job's record from the jobs REST API."""
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    job_id = f"bigray-test-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            dashboard,
            "--submission-id",
            job_id,
            *(["--working-dir", "."] if working_dir else []),
            "--runtime-env",
            str(env_file),
            "--",
            *entrypoint,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    job = job_info(dashboard, env, job_id)
    assert out.returncode == 0, f"job {job['status']}: {job.get('message')}\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    return job


def job_info(dashboard: str, env: dict, job_id: str, token: str | None = None) -> dict:
    """GET /api/jobs/<id> with the cluster's token, as any HTTP client of the Jobs API would."""
    request = urllib.request.Request(
        f"{dashboard}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token or env['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def job_runtime_env(s3, gcs: str, **env_vars: str) -> dict:
    """jobs/runtime_env.yaml as shipped, plus what this box needs: CPU DeepSpeed, the local S3 server, and the GCS
    address for Ray Train's helper actors (with other Ray clusters on this machine, "auto" would be ambiguous)."""
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(
        DS_ACCELERATOR="cpu",
        AWS_ENDPOINT_URL=s3.endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        RAY_ADDRESS=gcs,
        **env_vars,
    )
    return runtime_env


def run_keys(s3, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])}


def test_ray_job_submit_train(shards, s3, tmp_path):
    runs = s3.uri("job-runs")
    with ray_head(num_cpus=4) as (gcs, dashboard, env):
        job = submit(
            dashboard,
            env,
            job_runtime_env(s3, gcs),
            [
                "python",
                "jobs/train.py",
                f"data.output={shards}",
                f"train.storage_path={runs}",
                "train.run_name=job",
                *TINY_TRAIN,
            ],
            tmp_path,
        )
        assert job["status"] == "SUCCEEDED", job
        logs = subprocess.run(
            [RAY, "job", "logs", "--address", dashboard, job["submission_id"]], env=env, capture_output=True, text=True
        ).stdout
        with pytest.raises(urllib.error.HTTPError) as denied:  # token auth is on: a wrong token is refused
            job_info(dashboard, env, job["submission_id"], token="0" * 64)
        assert denied.value.code in (401, 403)
    assert "run: s3://" in logs and "export:" in logs, logs[
        -3000:
    ]  # the CLI's own summary, printed by the job's driver

    keys = run_keys(s3, "job-runs/job/")
    assert {k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_") and k.count("/") > 2}, (
        "a checkpoint in S3"
    )
    assert any(k.endswith("/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in keys), (
        "both ranks' ZeRO shards in the checkpoint"
    )
    records = [json.loads(line) for line in storage.Store().read_text(f"{runs}/job/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == [5, 10] and "val_loss" in records[-1]
    assert "job-runs/job/export/model.safetensors" in keys
