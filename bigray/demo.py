"""`bigray demo`: the whole life of a model on the embedded default, in one command.

prepare (stdlib .py files) -> train (tiny preset, ZeRO-2, 2 workers) -> tune (ASHA over the
learning rate) -> export -> serve (OpenAI-compatible HTTP) -> one completion and one chat request.

With no arguments, a local Ray cluster on 127.0.0.1 and a local S3 server (moto, loopback) stand in
for a cluster and a bucket, so every artifact goes through the same `s3://` code paths as a real
run. The local S3 server keeps objects in memory, so the demo copies its bucket to a local dir
before it stops. With `--address` and `--bucket` the same flow runs on a real cluster and bucket.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

from bigray import display, storage
from bigray.config import Config
from bigray.errors import ConfigError
from bigray.runtime import free_port

DEFAULT_CONFIG = str(resources.files("bigray") / "demo.yaml")
COMPLETION_PROMPT = "def read_config(path):\n"
CHAT_MESSAGE = "Write a function that returns the sum of a list."


def _local_s3(stack: ExitStack) -> str:
    """Start moto's S3 server on loopback, point boto3/pyarrow (and Ray workers, which inherit the
    driver's environment) at it, and return a fresh bucket URI."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ConfigError(
            "the local demo needs moto's S3 server: pip install 'bigray[demo]' (or pass --bucket s3://...)"
        ) from None
    import logging

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stack.callback(server.stop)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bigray-demo")
    return "s3://bigray-demo"


def _post(url: str, body: dict, api_key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _usage(response: dict) -> str:
    usage = response["usage"]
    finish = response["choices"][0]["finish_reason"]
    return f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens, {finish}"


def _stage(name: str) -> float:
    display.stage(name)
    return time.perf_counter()


def demo(cfg: Config, address: str | None = None, bucket: str | None = None, out: str | None = None) -> dict:
    """Run the whole flow; returns where everything went and what the model answered."""
    import ray

    from bigray.data import prepare
    from bigray.runtime import init_ray
    from bigray.serve.deploy import start, stop
    from bigray.train.trainer import train
    from bigray.tune import tune

    if address and not bucket:
        raise ConfigError(
            "--address needs --bucket s3://...: a real cluster's workers cannot reach this machine's local S3 server"
        )
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with ExitStack() as stack:
        local = bucket is None
        root = storage.join(_local_s3(stack) if local else bucket.rstrip("/"), f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.ray.address = address
        cfg.data.output = storage.join(root, "data")
        cfg.train.storage_path = storage.join(root, "train")
        cfg.train.run_name = "demo"
        cfg.tune.storage_path = storage.join(root, "tune")
        cfg.tune.name = "sweep"
        was_connected = ray.is_initialized()
        init_ray(cfg.ray)
        if not was_connected:
            stack.callback(ray.shutdown)

        t = _stage(f"prepare: {', '.join(cfg.data.inputs)} -> {cfg.data.output}")
        display.prepare_summary(prepare(cfg))
        timings["prepare"] = time.perf_counter() - t

        tc = cfg.train
        t = _stage(f"train: {cfg.model.preset} preset, ZeRO-{tc.zero_stage}, {tc.num_workers} workers, "
                   f"{tc.max_steps} steps")
        with display.TrainProgress(cfg.train.max_steps) as progress:
            run = train(cfg, progress=progress)
        losses = [r["loss"] for r in run.records if "loss" in r]
        print(
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}  {display.sparkline(losses)}  "
            f"(val_loss {run.last.get('val_loss', float('nan')):.3f})"
        )
        timings["train"] = time.perf_counter() - t

        t = _stage(f"tune: {cfg.tune.scheduler} over {', '.join(cfg.tune.search_space)}")
        sweep_cfg = cfg.model_copy(deep=True)
        # Trials are short and one worker each so that two run at once on a small machine.
        sweep_cfg.train.num_workers = 1
        sweep_cfg.train.max_steps = min(cfg.train.max_steps, 100)
        sweep_cfg.train.eval_every = min(cfg.train.eval_every, 20)
        sweep_cfg.train.warmup_steps = min(cfg.train.warmup_steps, 10)
        # ASHA's rungs (grace_period x reduction_factor^k) must fall on checkpoints: one at every eval.
        sweep_cfg.train.checkpoint_every = sweep_cfg.train.eval_every
        sweep = tune(sweep_cfg, log=print)
        display.tune_table(sweep)
        timings["tune"] = time.perf_counter() - t

        # Promote whichever model validates best: the full run or the sweep's best (shorter) trial.
        run_val = run.last.get("val_loss", float("inf"))
        best = (
            (run.export.out_dir, f"train run (val_loss {run_val:.3f})")
            if run_val <= sweep.best_metric
            else (sweep.best_export, f"sweep trial {sweep.best_trial} (val_loss {sweep.best_metric:.3f})")
        )

        t = _stage(f"serve: {best[1]}")
        cfg.serve.model = best[0]
        cfg.serve.port = free_port() if local else cfg.serve.port
        url = start(cfg)
        stack.callback(stop)
        models = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=30).read())["data"]
        name = models[0]["id"]
        # Sampled, not greedy: a model this small and this briefly trained repeats itself under
        # greedy decoding; a fixed seed keeps the answer reproducible.
        sampling = {"model": name, "max_tokens": 64, "temperature": 0.8, "top_k": 50, "seed": 0}
        completion = _post(f"{url}/v1/completions", sampling | {"prompt": COMPLETION_PROMPT})
        chat = _post(f"{url}/v1/chat/completions", sampling | {"messages": [{"role": "user", "content": CHAT_MESSAGE}]})
        print(f"POST {url}/v1/completions  prompt {COMPLETION_PROMPT!r}  (temperature 0.8, top_k 50, seed 0)")
        print(COMPLETION_PROMPT + completion["choices"][0]["text"])
        print(f"({_usage(completion)})")
        print(f"POST {url}/v1/chat/completions  user: {CHAT_MESSAGE}")
        # Quoted: a weak model's reply may be blank lines or end at once with its EOS token.
        print(f"assistant: {json.dumps(chat['choices'][0]['message']['content'])}  ({_usage(chat)})")
        timings["serve"] = time.perf_counter() - t

        written = {
            "shards": cfg.data.output,
            "run": run.run_dir,
            "sweep": sweep.sweep_dir,
            "served model": best[0],
        }
        if local:
            # The local S3 server forgets everything when it stops: keep a copy on disk.
            out = out or tempfile.mkdtemp(prefix="bigray-demo-")
            storage.Store(cfg.storage).copy_dir(root, out)
            written = {k: str(Path(out) / v.removeprefix(root + "/")) for k, v in written.items()}
        print("\n=== written ===")
        for key, where in written.items():
            print(f"  {key:13} {where}")
        if local:
            print(f"  (copied from the local S3 server's {root}; a real run keeps them in its bucket)")
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        print(f"\ntimings: {stages}; total {time.perf_counter() - started:.0f} s")
        print("shutting down Serve, Ray and the local S3 server", flush=True)
    return {"written": written, "completion": completion, "chat": chat, "timings": timings, "root": root}
