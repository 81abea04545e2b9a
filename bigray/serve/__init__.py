"""`bigray serve`: the trained model on Ray Serve behind an OpenAI-compatible API.

deploy.py builds, starts and stops the application; app.py is the HTTP ingress; engine.py the batched
generation engine and kv_cache.py its slot KV cache; vllm.py the `serve.engine: vllm` translation; metrics.py the
Prometheus metrics.
`bigray.serve:app_builder` is the import path Serve's own tooling (`serve run`, `serve deploy`) uses.
"""

from bigray.serve.deploy import app_builder, build_app, start, stop

__all__ = ["app_builder", "build_app", "start", "stop"]
