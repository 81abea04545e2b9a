"""cluster/ and jobs/runtime_env.yaml checked against Ray's own schema and validators, and KubeRay's required fields."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))
KUBERAY = sorted(
    p for p in CLUSTER.glob("*.yaml") if yaml.safe_load(p.read_text()).get("apiVersion", "").startswith("ray.io/")
)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_cluster_dir_has_every_kind_of_file():
    names = {p.name for p in LAUNCHER} | {p.name for p in KUBERAY}
    assert {"aws.yaml", "gcp.yaml", "local.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"} <= names
    assert len(LAUNCHER) + len(KUBERAY) == len(list(CLUSTER.glob("*.yaml"))), "every YAML in cluster/ is checked below"


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_matches_ray_schema(path):
    jsonschema.validate(load(path), ray_schema())


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_validate_config(path):
    """What `ray up` runs before touching a cloud: provider defaults filled in, then Ray's own checks."""
    from bigray.ray_compat import validate_cluster_launcher_config

    validate_cluster_launcher_config(load(path))


def test_schema_rejects_a_typo():
    cfg = load(CLUSTER / "aws.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu-a10g"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu-a10g"]["resources"]["GPU"] = 0.5  # the autoscaler counts whole units
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_cluster_shape(name):
    cfg = load(CLUSTER / name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "a CPU head that schedules no work"
    gpu = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    assert len({next(iter(v["node_config"].values())) for v in gpu.values()}) >= 3, "several GPU instance types"
    for node_type in gpu.values():
        assert node_type["min_workers"] == 0 < node_type["max_workers"], "GPU groups scale from zero"
        assert any(k.startswith("accelerator_type:") for k in node_type["resources"]), "jobs can pin a GPU type"
    assert any(k.endswith("-spot") for k in gpu), "a spot / preemptible group"
    assert "-gpu" in cfg["docker"]["image"] or "-cu" in cfg["docker"]["image"], "a CUDA image on the workers"
    assert cfg["max_workers"] >= max(v["max_workers"] for k, v in types.items() if k != cfg["head_node_type"])


def test_local_yaml_is_a_fake_multinode_cluster():
    cfg = load(CLUSTER / "local.yaml")
    assert cfg["provider"]["type"] == "fake_multinode"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    workers = [v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert workers and all(w["resources"]["CPU"] > head["resources"]["CPU"] for w in workers), (
        "workers hold what the head cannot"
    )


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), (
        "each container needs name and image"
    )
    return containers


def _check_ray_cluster_spec(spec: dict) -> None:
    """The fields KubeRay's RayCluster CRD (ray.io/v1) requires, and the invariants its webhook enforces."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and all(
        isinstance(v, str) for v in head["rayStartParams"].values()
    ), "rayStartParams is map[string]string in the CRD: quote every value"
    ports = {p["name"]: p["containerPort"] for p in _containers(head["template"])[0].get("ports", [])}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), "groupName must be unique"
    for g in groups:
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(g), g.get("groupName")
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        ray_container = _containers(g["template"])[0]
        if g["groupName"].startswith("gpu"):
            limits = ray_container["resources"]["limits"]
            assert (
                int(limits["nvidia.com/gpu"]) >= 1
                and limits["nvidia.com/gpu"] == ray_container["resources"]["requests"]["nvidia.com/gpu"]
            )


def test_kuberay_raycluster():
    manifest = load(CLUSTER / "kuberay-raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster") and manifest["metadata"]["name"]
    _check_ray_cluster_spec(manifest["spec"])
    assert manifest["spec"]["enableInTreeAutoscaling"] is True
    assert any(
        g["minReplicas"] < g["maxReplicas"] and g["groupName"].startswith("gpu")
        for g in manifest["spec"]["workerGroupSpecs"]
    )


def test_kuberay_rayjob():
    from bigray.cli import build_parser
    from bigray.config import load_config

    manifest = load(CLUSTER / "kuberay-rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob") and manifest["metadata"]["name"]
    spec = manifest["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip"), "the in-cluster submitter needs a remote working_dir"
    # The entrypoint is a real bigray job: its script exists and its config plus overrides validate.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"] and (ROOT / argv[1]).is_file()
    args = build_parser().parse_args(["train", *argv[2:]])
    cfg = load_config([ROOT / c for c in args.config], args.overrides)
    assert cfg.train.use_gpu and cfg.train.num_workers <= sum(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["maxReplicas"]
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    ), "the cluster holds the job's GPU workers"


def test_job_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    raw = load(ROOT / "jobs" / "runtime_env.yaml")
    env = RuntimeEnv(**raw)  # Ray's own validation of every field
    assert {".git/", ".venv/", "runs/"} <= set(env["excludes"])
    assert env["env_vars"]["DS_ACCELERATOR"] == "cuda" and all(isinstance(v, str) for v in env["env_vars"].values())


@pytest.mark.parametrize("stage", ["prepare", "train", "tune", "serve"])
def test_job_entrypoint_per_stage(stage):
    """`python jobs/<stage>.py` is `bigray <stage>`: the same parser, run the way `ray job submit` runs it."""
    out = subprocess.run(
        [sys.executable, f"jobs/{stage}.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and f"usage: bigray {stage}" in out.stdout, out.stderr[-2000:]
