"""`serve.engine: vllm`: the same HF model dir through Ray Serve LLM (`ray.serve.llm`, vLLM) on GPU clusters.

bigray only translates its config into an `LLMConfig` and hands it to `build_openai_app`; Ray Serve LLM
brings its own OpenAI ingress, batching (vLLM's continuous batching) and GPU placement. vLLM is not a
bigray dependency: install `ray[llm]` on the cluster. Only what the user changed from bigray's defaults
is passed, so Ray Serve LLM's and vLLM's own defaults (tuned for GPUs) apply to the rest. Mapping:

    serve.model          -> model_loading_config.model_source (a local dir, or {bucket_uri: s3://...})
    serve.model_name     -> model_loading_config.model_id (what clients pass as `model`)
    serve.num_replicas / serve.autoscaling, max_ongoing_requests, max_queued_requests -> deployment_config
    serve.max_batch_size -> engine_kwargs.max_num_seqs;  serve.dtype -> engine_kwargs.dtype
    (always) engine_kwargs.load_format = safetensors: pickled .bin weights are refused, as by the hf engine
    storage.endpoint_url / region -> runtime_env.env_vars AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_REGION
    serve.accelerator_type -> accelerator_type;  serve.vllm -> any LLMConfig field, merged last
"""

from __future__ import annotations

import importlib.util

from bigray.config import ServeConfig, deep_merge, require
from bigray.errors import ConfigError
from bigray.serve.app import model_name
from bigray.storage import Store

_DEFAULTS = ServeConfig()


def deployment_config(s: ServeConfig) -> dict:
    """Serve deployment options of bigray's hf engine: replicas or autoscaling, and request limits."""
    out: dict = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "logging_config": {"enable_access_log": s.access_log},
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
    }
    if s.autoscaling is not None:
        # A replica batches up to max_batch_size sequences: scaling out before its batch fills wastes replicas.
        target = s.autoscaling.target_ongoing_requests or s.max_batch_size
        out["autoscaling_config"] = s.autoscaling.model_dump() | {"target_ongoing_requests": float(target)}
    else:
        out["num_replicas"] = s.num_replicas
    return out


def _vllm_deployment_config(s: ServeConfig) -> dict:
    out: dict = {}
    for key in ("max_ongoing_requests", "max_queued_requests"):
        if getattr(s, key) != getattr(_DEFAULTS, key):
            out[key] = getattr(s, key)
    if s.autoscaling is not None:
        out["autoscaling_config"] = s.autoscaling.model_dump(exclude_none=True)
    elif s.num_replicas != _DEFAULTS.num_replicas:
        out["num_replicas"] = s.num_replicas
    return out


def llm_config(s: ServeConfig, store: Store) -> dict:
    """The keyword arguments of `ray.serve.llm.LLMConfig` for serve section `s` (plain data: testable without vLLM)."""
    model = require(s.model, "serve.model", "serve")
    if s.api_key:
        raise ConfigError(
            "serve.api_key is not enforced by serve.engine=vllm (Ray Serve LLM's ingress has no key check); "
            "unset it and put an authenticating gateway in front, or use serve.engine=hf"
        )
    source = {"bucket_uri": model} if model.startswith(("s3://", "gs://")) else model
    engine_kwargs: dict = {"load_format": "safetensors"}
    if s.max_batch_size != _DEFAULTS.max_batch_size:
        engine_kwargs["max_num_seqs"] = s.max_batch_size
    if s.dtype != "auto":
        engine_kwargs["dtype"] = s.dtype
    out = {"model_loading_config": {"model_id": model_name(s), "model_source": source}, "engine_kwargs": engine_kwargs}
    if deployment := _vllm_deployment_config(s):
        out["deployment_config"] = deployment
    # Ray Serve LLM downloads the weights itself, with boto3 inside the replica: it learns a non-AWS
    # endpoint only from the environment (AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL in botocore).
    env = {}
    if store.cfg.endpoint_url:
        env |= {"AWS_ENDPOINT_URL_S3": store.cfg.endpoint_url, "AWS_ENDPOINT_URL": store.cfg.endpoint_url}
    if store.cfg.region:
        env["AWS_REGION"] = store.cfg.region
    if env:
        out["runtime_env"] = {"env_vars": env}
    if s.accelerator_type:
        out["accelerator_type"] = s.accelerator_type
    return deep_merge(out, s.vllm)


def build_vllm_app(s: ServeConfig, store: Store):
    """`build_openai_app` over one LLMConfig; Ray Serve LLM needs vLLM (`pip install 'ray[llm]'`)."""
    # ray.serve.llm imports without vLLM on some Ray versions and fails only in the replica: check vLLM itself.
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "serve.engine=vllm needs vLLM on this machine and the cluster: pip install 'ray[llm]' "
            "(or use serve.engine=hf)"
        )
    from ray.serve.llm import LLMConfig, build_openai_app

    return build_openai_app({"llm_configs": [LLMConfig(**llm_config(s, store))]})
