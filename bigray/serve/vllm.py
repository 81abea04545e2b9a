"""`serve.engine: vllm`: the same HF model dir through Ray Serve LLM (`ray.serve.llm`, vLLM) on GPU clusters.

bigray only translates its config into an `LLMConfig` and hands it to `build_openai_app`; Ray Serve LLM
brings its own OpenAI ingress, batching (vLLM's continuous batching) and GPU placement. vLLM is not a
bigray dependency: install `ray[llm]` on the cluster. Mapping:

    serve.model          -> model_loading_config.model_source (a local dir, or {bucket_uri: s3://...})
    serve.model_name     -> model_loading_config.model_id (what clients pass as `model`)
    serve.num_replicas / serve.autoscaling, max_ongoing_requests, max_queued_requests -> deployment_config
    serve.max_batch_size -> engine_kwargs.max_num_seqs;  serve.dtype -> engine_kwargs.dtype
    serve.accelerator_type -> accelerator_type;  serve.vllm -> any LLMConfig field, merged last
"""

from __future__ import annotations

from bigray.config import Config, require
from bigray.errors import ConfigError


def deployment_config(s) -> dict:
    """Serve deployment options shared by both engines: replicas or autoscaling, and request limits."""
    out: dict = {"max_ongoing_requests": s.max_ongoing_requests, "max_queued_requests": s.max_queued_requests}
    if s.autoscaling is not None:
        out["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        out["num_replicas"] = s.num_replicas
    return out


def llm_config(cfg: Config) -> dict:
    """The keyword arguments of `ray.serve.llm.LLMConfig` for `cfg.serve` (plain data: testable without vLLM)."""
    from bigray.serve.app import model_name

    s = cfg.serve
    model = require(s.model, "serve.model", "serve")
    if s.api_key:
        raise ConfigError("serve.api_key is not enforced by serve.engine=vllm (Ray Serve LLM's ingress has no key check); "
                          "unset it and put an authenticating gateway in front, or use serve.engine=hf")
    source = {"bucket_uri": model} if model.startswith(("s3://", "gs://")) else model
    engine_kwargs: dict = {"max_num_seqs": s.max_batch_size}
    if s.dtype != "auto":
        engine_kwargs["dtype"] = s.dtype
    out = {
        "model_loading_config": {"model_id": model_name(s), "model_source": source},
        "deployment_config": deployment_config(s),
        "engine_kwargs": engine_kwargs,
    }
    if s.accelerator_type:
        out["accelerator_type"] = s.accelerator_type
    return _merge(out, s.vllm)


def build_vllm_app(cfg: Config):
    """`build_openai_app` over one LLMConfig; importing `ray.serve.llm` needs vLLM (`pip install 'ray[llm]'`)."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise ConfigError(f"serve.engine=vllm needs vLLM on this machine and the cluster: pip install 'ray[llm]' ({exc})") from None
    return build_openai_app({"llm_configs": [LLMConfig(**llm_config(cfg))]})


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(dict(base[key]), value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base
