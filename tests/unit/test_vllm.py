"""`serve.engine: vllm`: bigray's config as Ray Serve LLM's `LLMConfig`, checked against Ray's own classes."""

from __future__ import annotations

import importlib.util

import pytest

from bigray.config import load_config
from bigray.errors import ConfigError
from bigray.storage import Store


def test_vllm_translation_passes_only_what_was_set_and_matches_ray_serve_llm_schema(tmp_path):
    from ray.llm._internal.serve.core.configs.llm_config import (
        LLMConfig,
    )  # what ray.serve.llm re-exports; needs no vLLM
    from ray.serve.schema import DeploymentSchema

    from bigray.serve.vllm import llm_config

    cfg = load_config(
        overrides=[
            "serve.engine=vllm",
            "serve.model=s3://bucket/runs/r1/export",
            "serve.max_batch_size=64",
            "serve.dtype=bfloat16",
            "serve.accelerator_type=A10G",
            "serve.autoscaling={min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}",
            "serve.vllm={engine_kwargs: {gpu_memory_utilization: 0.8}, runtime_env: {env_vars: {A: b}}}",
            "storage.endpoint_url=http://minio:9000",
            "storage.region=eu-west-1",
        ]
    )
    kwargs = llm_config(cfg.serve, Store(cfg.storage))
    assert kwargs == {
        "model_loading_config": {"model_id": "r1", "model_source": {"bucket_uri": "s3://bucket/runs/r1/export"}},
        "deployment_config": {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
        },
        "engine_kwargs": {
            "load_format": "safetensors",
            "max_num_seqs": 64,
            "dtype": "bfloat16",
            "gpu_memory_utilization": 0.8,
        },
        "accelerator_type": "A10G",
        "runtime_env": {
            "env_vars": {
                "AWS_ENDPOINT_URL_S3": "http://minio:9000",
                "AWS_ENDPOINT_URL": "http://minio:9000",
                "AWS_REGION": "eu-west-1",
                "A": "b",
            }
        },
    }
    llm = LLMConfig(**kwargs)
    assert llm.model_loading_config.model_source.bucket_uri == "s3://bucket/runs/r1/export"
    DeploymentSchema(name="x", **kwargs["deployment_config"])
    # Nothing set beyond the model: Ray Serve LLM's and vLLM's own defaults, no throttling by bigray's CPU defaults.
    plain = load_config(overrides=["serve.engine=vllm", f"serve.model={tmp_path}"])
    local = llm_config(plain.serve, Store(plain.storage))
    assert local == {
        "model_loading_config": {"model_id": tmp_path.name, "model_source": str(tmp_path)},
        "engine_kwargs": {"load_format": "safetensors"},
    }
    assert LLMConfig(**local).model_loading_config.model_source == str(tmp_path)
    two = load_config(overrides=["serve.engine=vllm", f"serve.model={tmp_path}", "serve.num_replicas=2"])
    assert llm_config(two.serve, Store())["deployment_config"] == {"num_replicas": 2}
    keyed = load_config(overrides=["serve.engine=vllm", f"serve.model={tmp_path}", "serve.api_key=k"])
    with pytest.raises(ConfigError, match="api_key"):
        llm_config(keyed.serve, Store())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_a_config_error_before_anything_starts(tmp_path):
    from bigray.serve import build_app

    with pytest.raises(ConfigError, match=r"pip install 'ray\[llm\]'"):
        build_app(load_config(overrides=["serve.engine=vllm", f"serve.model={tmp_path}"]))
