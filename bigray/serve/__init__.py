"""`bigray serve`: the trained model on Ray Serve behind an OpenAI-compatible API.

`build_app(cfg)` is the Serve application; `app_builder(args)` is the same for Serve's own tooling
(`serve run bigray.serve:app_builder model=...`, or `import_path: bigray.serve:app_builder` in a
`serve deploy` config); `start(cfg)` / `stop()` run it from Python, as `bigray serve` does.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from bigray.config import Config, load_config, require
from bigray.errors import BigrayError

APP_NAME = "bigray"


def build_app(cfg: Config):
    """The Serve application for `cfg.serve`: bigray's HF engine, or Ray Serve LLM for serve.engine=vllm."""
    if cfg.serve.engine == "vllm":
        from bigray.serve.vllm import build_vllm_app

        return build_vllm_app(cfg)
    from bigray.serve.app import OpenAIServer, resolve_api_key
    from bigray.serve.vllm import deployment_config

    s = cfg.serve
    require(s.model, "serve.model", "serve")
    options = deployment_config(s) | {"ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}}
    # The key is resolved here, where the config is read, so a missing variable fails before any replica starts.
    return OpenAIServer.options(**options).bind(cfg.model_dump(mode="json"), resolve_api_key(s.api_key))


def app_builder(args: dict):
    """Serve's typed-args entry point: `args` are serve.* keys (values as YAML), plus an optional `config=path.yaml`."""
    args = dict(args)
    files = [args.pop("config")] if "config" in args else []
    overrides = [f"serve.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items()]
    return build_app(load_config(files, overrides))


def base_url(cfg: Config) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::", "") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}"


def start(cfg: Config, timeout_s: float = 300.0) -> str:
    """Connect Ray, start Serve's HTTP proxy on serve.host:serve.port, deploy, wait until healthy; returns the base URL."""
    from ray import serve

    from bigray.runtime import init_ray

    app = build_app(cfg)  # config errors surface before Ray starts
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = base_url(cfg)
    probe = f"{url}/health" if cfg.serve.engine == "hf" else f"{url}/v1/models"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(probe, timeout=10) as resp:
                if resp.status == 200:
                    return url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise BigrayError(f"serve: {probe} not healthy after {timeout_s:.0f} s; see the replica logs (ray logs / the dashboard)")
        time.sleep(0.5)


def stop() -> None:
    """Tear down Serve (applications, proxy and controller); Ray itself stays up."""
    from ray import serve

    serve.shutdown()
