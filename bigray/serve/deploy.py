"""`bigray serve`'s build, start and stop: the Serve application for a config, and running it from Python.

`build_app(cfg)` is the Serve application; `app_builder(args)` is the same for Serve's own tooling
(`serve run bigray.serve:app_builder model=...`, or `import_path: bigray.serve:app_builder` in a
`serve deploy` config); `start(cfg)` / `stop()` run it from Python, as `bigray serve` and the demo do.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request

from bigray.config import Config, RayConfig, ServeConfig, apply_overrides, load_config, require
from bigray.errors import BigrayError, ConfigError
from bigray.serve.app import OpenAIServer, api_key_digest
from bigray.serve.vllm import build_vllm_app, deployment_config
from bigray.storage import Store, join

APP_NAME = "bigray"
# Serve reads it where each Ray process starts: HAProxy (C) listens on serve.port and forwards HTTP straight to the
# replicas' own ports (Serve's "direct ingress"), instead of Serve's Python proxy and its two actor calls a request.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
# NOTE: Ray renices every worker process by RAY_worker_niceness (15) when it starts: a replica then gets ~1/30 of a
# core's share beside any process at the default priority (another job, Ray's own daemons). Beside one busy nice-0
# process on 2 cores, the same engine took 1,039 ms per 32-token completion in an actor at 15, 369 ms at 0 and 367 ms
# in the driver (benchmarks/serve_replica.py). A replica is a latency-bound service, not a background task, so
# serve.niceness defaults to 0.
NICENESS_ENV = "RAY_worker_niceness"


def build_app(cfg: Config):
    """The Serve application for `cfg.serve`: bigray's HF engine, or Ray Serve LLM for serve.engine=vllm."""
    store = Store(cfg.storage)
    if cfg.serve.engine == "vllm":
        if cfg.serve.model and store.exists(join(cfg.serve.model, "adapter_config.json")):
            raise ConfigError(f"serve.model: {cfg.serve.model} is a LoRA adapter dir, which serve.engine=vllm does not "
                              "load; export the merged model (bigray export without --adapter-only) or use engine=hf")
        return build_vllm_app(cfg.serve, store)
    s = cfg.serve
    require(s.model, "serve.model", "serve")
    actor: dict = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    if s.niceness is not None:
        # Read by the replica's worker process where it starts; Serve merges these env_vars with an app's own.
        actor["runtime_env"] = {"env_vars": {NICENESS_ENV: str(s.niceness)}}
    options = deployment_config(s) | {"ray_actor_options": actor}
    # The key is resolved here, where the config is read, so a missing variable fails before any replica
    # starts; replicas get only its digest, so the key itself is in no init args Serve stores or shows.
    digest = api_key_digest(s.api_key)
    public = s.model_copy(update={"api_key": None})
    return OpenAIServer.options(**options).bind(public.model_dump(mode="json"), store, digest)


def app_builder(args: dict):
    """Serve's typed-args entry point: `args` are serve.* keys, plus an optional `config=path.yaml`.

    Values are used as given (Serve already parsed its YAML or CLI), never parsed again: an api key
    `"abc #x"` stays `abc #x`; pydantic still turns `serve run`'s strings ("8", "0.5") into numbers.
    """
    args = dict(args)
    files = [args.pop("config")] if "config" in args else []
    cfg = load_config(files)
    return build_app(apply_overrides(cfg, {f"serve.{k}": v for k, v in args.items()}, "app_builder args"))


def base_url(s: ServeConfig) -> str:
    """Where a client on this machine reaches the app (a wildcard bind address means loopback)."""
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    return f"http://{host}:{s.port}"


def start(cfg: Config, timeout_s: float = 300.0) -> str:
    """Connect Ray, start Serve's proxy on serve.host:serve.port, deploy, wait until healthy; returns the base URL."""
    from ray import serve

    from bigray.runtime import init_ray

    app = build_app(cfg)  # config errors surface before Ray starts
    if not _connects(cfg.ray):
        _start_ray_with(ray_env(cfg.serve), cfg.ray)
    elif cfg.serve.ingress == "haproxy":
        raise ConfigError(
            f"serve.ingress=haproxy needs {' '.join(f'{k}={v}' for k, v in HAPROXY_ENV.items())} where Ray "
            "starts, so bigray can set it only for a Ray it starts itself; on a running cluster set it where each "
            "node's Ray starts (ray start, KubeRay's container env): Serve then uses HAProxy for every app"
        )
    else:
        init_ray(cfg.ray)
    http = {"host": cfg.serve.host, "port": cfg.serve.port}
    if cfg.serve.request_timeout_s:
        # The proxy's own limit, a backstop for the replica's per-request deadline.
        http["request_timeout_s"] = cfg.serve.request_timeout_s + 5
    # Serve's controller, proxies and this driver's `ray.serve` logger follow ray.log_level (WARNING on a
    # local start: no INFO line per endpoint update and replica); their log files keep everything.
    level = cfg.ray.log_level or "INFO"
    logging.getLogger("ray.serve").setLevel(level)
    serve.start(http_options=http, logging_config={"log_level": level})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = base_url(cfg.serve)
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
            raise BigrayError(
                f"serve: {probe} not healthy after {timeout_s:.0f} s; see the replica logs (ray logs / the dashboard)"
            )
        time.sleep(0.5)


def ray_env(s: ServeConfig) -> dict[str, str]:
    """The environment of a local Ray that bigray starts to serve `s`: Serve's ingress, and the niceness of Serve's
    processes (proxy and controller too: a replica above its own proxy would starve it under load)."""
    env = dict(HAPROXY_ENV) if s.ingress == "haproxy" else {}
    if s.niceness is not None:
        env[NICENESS_ENV] = str(s.niceness)
    return env


def _connects(ray_cfg: RayConfig) -> bool:
    """Whether init_ray would connect to a running Ray (or already has) rather than start one."""
    import ray

    return ray.is_initialized() or bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))


def _start_ray_with(env: dict[str, str], ray_cfg: RayConfig) -> None:
    """Start a local Ray whose processes inherit `env`; this process's own environment is left as it was."""
    from bigray.runtime import init_ray

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        init_ray(ray_cfg)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def stop() -> None:
    """Tear down Serve (applications, proxy and controller); Ray itself stays up."""
    from ray import serve

    serve.shutdown()
