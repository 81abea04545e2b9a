"""`bigray serve`'s application builder without a cluster: Serve's own schema, typed args, and where the key goes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bigray.config import load_config
from bigray.errors import ConfigError
from tests.unit.test_engine import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-deploy") / "export"))


def test_missing_key_variable_fails_before_deploying(model_dir):
    from bigray.serve import build_app

    with pytest.raises(ConfigError, match="BIGRAY_NO_SUCH_VAR"):
        build_app(load_config(overrides=[f"serve.model={model_dir}", "serve.api_key=env:BIGRAY_NO_SUCH_VAR"]))


def test_app_builder_and_deploy_config_match_ray_schema(model_dir, monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from bigray.serve import app_builder

    app = app_builder(
        {
            "model": model_dir,
            "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4},
            "num_cpus": "0.5",
            "max_batch_size": "8",
        }
    )
    dep = app._bound_deployment
    assert dep._deployment_config.autoscaling_config.max_replicas == 3
    assert dep._deployment_config.max_ongoing_requests == 64
    assert dep._deployment_config.autoscaling_config.target_ongoing_requests == 4
    assert dep.ray_actor_options == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}},  # serve.niceness: not Ray's 15
    }
    fixed = app_builder({"model": model_dir, "num_replicas": 2, "health_check_period_s": 2})._bound_deployment
    assert fixed._deployment_config.num_replicas == 2
    assert fixed._deployment_config.health_check_period_s == 2  # how soon Serve sees a broken engine
    with pytest.raises(ConfigError, match="serve.num_replicas"):
        app_builder({"model": model_dir, "num_replicas": 0})
    with pytest.raises(ConfigError, match="min_replicas"):
        app_builder({"model": model_dir, "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    # configs/deploy/serve.yaml is what `serve deploy` reads: Ray's own schema must accept it, and its args our builder.
    spec = yaml.safe_load((Path(__file__).parents[2] / "configs" / "deploy" / "serve.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(spec)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(spec)
    )
    (entry,) = schema.applications
    assert entry.import_path == "bigray.serve:app_builder"
    monkeypatch.setenv("BIGRAY_API_KEY", "s3cret-deploy-key")
    deployed = app_builder({**entry.args, "model": model_dir})._bound_deployment
    scaling = deployed._deployment_config.autoscaling_config
    assert scaling.max_replicas == 4 and scaling.target_ongoing_requests == 16  # its max_batch_size
    # The replica gets the key's digest, never the key: Serve stores and shows init args.
    assert "s3cret-deploy-key" not in json.dumps(deployed.init_args[0]) + repr(deployed.init_args)
    assert deployed.init_args[2] == hashlib.sha256(b"s3cret-deploy-key").digest()


def test_app_builder_args_are_not_parsed_again(model_dir, monkeypatch):
    """Serve hands over parsed values: a key with " #" stays whole (YAML would cut it at the comment)."""
    from bigray.serve import app_builder

    dep = app_builder({"model": model_dir, "api_key": "abc #x", "model_name": "null"})._bound_deployment
    assert dep.init_args[2] == hashlib.sha256(b"abc #x").digest()
    assert dep.init_args[0]["model_name"] == "null" and dep.init_args[0]["api_key"] is None


def test_haproxy_ingress_refused_where_bigray_does_not_start_ray(model_dir, monkeypatch):
    """Serve reads RAY_SERVE_ENABLE_HA_PROXY where Ray starts: on a cluster bigray only connects to, it cannot apply."""
    import os

    from bigray.serve import start

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    cfg = load_config(overrides=[f"serve.model={model_dir}", "serve.ingress=haproxy", "ray.address=auto"])
    with pytest.raises(ConfigError, match="RAY_SERVE_ENABLE_HA_PROXY=1 where Ray starts"):
        start(cfg)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ


def test_niceness_reaches_the_replicas_and_a_local_ray():
    """serve.niceness is Ray's RAY_worker_niceness: in each replica's runtime_env, and where a local Ray starts (so
    Serve's proxy and controller run at it too); null leaves Ray's default (15) alone."""
    from bigray.serve.deploy import ray_env

    cfg = load_config(overrides=["serve.ingress=haproxy"])
    assert ray_env(cfg.serve) == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_worker_niceness": "0"}
    assert ray_env(load_config(overrides=["serve.niceness=5"]).serve) == {"RAY_worker_niceness": "5"}
    assert ray_env(load_config(overrides=["serve.niceness=null"]).serve) == {}
    with pytest.raises(ConfigError, match="serve.niceness"):
        load_config(overrides=["serve.niceness=-1"])  # raising a process's priority needs privileges Ray lacks


def test_niceness_null_leaves_rays_worker_default(model_dir):
    from bigray.serve import build_app

    app = build_app(load_config(overrides=[f"serve.model={model_dir}", "serve.niceness=null"]))
    assert "runtime_env" not in app._bound_deployment.ray_actor_options
