"""`bigray serve` under sustained mixed load: one replica on loopback, 64 streaming clients for about 2 minutes.

    .venv/bin/python benchmarks/serve_load.py                       # random-init `tiny` model, 2 CPUs
    .venv/bin/python benchmarks/serve_load.py --duration 60 --clients 32

Each client sends requests back to back on its own keep-alive connection until the time is up. 10% of the
requests are malformed or oversized (bad JSON, a body over serve.max_body_bytes, a prompt beyond the context,
n over serve.max_n, a 300-character stop string, a wrong type) and must get a 4xx; the rest are streaming
completions with prompts of 8..1024 tokens (log-uniform) and max_tokens 8..64. Reported: valid requests
failed (goal 0), 503s (expected only under deliberate overload), bad requests not answered with a 4xx,
p50/p99 time to first token and inter-token latency, the replica's RSS after warm-up vs at the end (goal:
within 10%), and generated tokens/s. Every figure is wall-clock on whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import build_model  # noqa: E402 - benchmarks/serve.py, next to this file

CONTEXT = 2048
MAX_BODY = 256 * 1024


def bad_request(rng: random.Random, model: str) -> bytes:
    """One of six kinds of request the server must refuse with a 4xx."""
    kind = rng.randrange(6)
    if kind == 0:
        return b'{"model": "' + model.encode() + b'", "prompt": '  # truncated JSON
    if kind == 1:
        return json.dumps({"model": model, "prompt": "x" * (MAX_BODY + 1)}).encode()  # 413
    if kind == 2:
        return json.dumps({"model": model, "prompt": [5] * CONTEXT, "max_tokens": 8}).encode()  # beyond the context
    if kind == 3:
        return json.dumps(
            {"model": model, "prompt": ["a", "b", "c", "d", "e"], "n": 4}
        ).encode()  # 20 sequences > max_n
    if kind == 4:
        return json.dumps({"model": model, "prompt": "x", "stop": "s" * 300}).encode()
    return json.dumps({"model": model, "prompt": "x", "max_tokens": "many"}).encode()


def valid_request(rng: random.Random, model: str, vocab: int) -> dict:
    length = int(math.exp(rng.uniform(math.log(8), math.log(1024))))
    return {
        "model": model,
        "prompt": [rng.randrange(3, vocab) for _ in range(length)],
        "max_tokens": rng.randint(8, 64),
        "temperature": rng.choice([0, 0.8]),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.valid = self.valid_failed = self.overloaded = self.bad = self.bad_wrong = self.tokens = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.errors: list[str] = []


def stream(conn: http.client.HTTPConnection, body: dict, tally: Tally) -> None:
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        with tally.lock:
            if resp.status == 503:
                tally.overloaded += 1
            else:
                tally.valid_failed += 1
                tally.errors.append(f"HTTP {resp.status}")
        return
    last, first, gaps, tokens, failed = None, None, [], 0, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            failed = event["error"]["message"]
            continue
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if event["choices"] and event["choices"][0]["text"]:
            now = time.perf_counter()
            if first is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
    with tally.lock:
        tally.valid += 1
        if failed or not tokens:
            tally.valid_failed += 1
            tally.errors.append(failed or "no usage")
            return
        tally.tokens += tokens
        if first is not None:
            tally.ttft.append(first)
        tally.itl += gaps


def client(url: str, model: str, vocab: int, seed: int, deadline: float, tally: Tally) -> None:
    host, port = url.removeprefix("http://").split(":")
    rng = random.Random(seed)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    while time.perf_counter() < deadline:
        if rng.random() < 0.10:
            try:
                conn.request(
                    "POST",
                    "/v1/completions",
                    body=bad_request(rng, model),
                    headers={"Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (ConnectionError, http.client.HTTPException):
                # A server may close the connection on a body it refused unread: that is a refusal too.
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=600)
                status = 413
            with tally.lock:
                tally.bad += 1
                tally.bad_wrong += not 400 <= status < 500 or status == 429
            continue
        try:
            stream(conn, valid_request(rng, model, vocab), tally)
        except (ConnectionError, http.client.HTTPException, TimeoutError) as exc:
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=600)
            with tally.lock:
                tally.valid += 1
                tally.valid_failed += 1
                tally.errors.append(f"{type(exc).__name__}: {exc}")


def health(url: str) -> dict:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model dir (default: build a random-init --preset model, context 2048)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds of load (in-flight requests then finish)"
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs (and torch threads) of the one replica")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from bigray.config import load_config
    from bigray.runtime import free_port
    from bigray.serve import start, stop

    model_dir = args.model or build_model(tempfile.mkdtemp(prefix="bigray-bench-load-"), args.preset, CONTEXT)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    cfg = load_config(
        overrides=[
            f"serve.model={model_dir}",
            f"serve.port={free_port()}",
            "serve.host=127.0.0.1",
            "serve.model_name=load",
            f"serve.num_cpus={args.num_cpus}",
            "serve.max_batch_size=32",
            f"serve.max_ongoing_requests={max(64, args.clients)}",
            f"serve.max_body_bytes={MAX_BODY}",
            "serve.max_n=8",
            f"ray.num_cpus={args.num_cpus + 2}",
        ]
    )
    url = start(cfg)
    try:
        warm = Tally()
        client(url, "load", vocab, -1, time.perf_counter() + 5, warm)  # first requests pay one-off costs
        before = health(url)
        tally = Tally()
        deadline = time.perf_counter() + args.duration
        threads = [
            threading.Thread(target=client, args=(url, "load", vocab, k, deadline, tally)) for k in range(args.clients)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        series = [(0.0, before["rss_mb"])]
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            series.append((time.perf_counter() - t0, health(url)["rss_mb"]))
        elapsed = time.perf_counter() - t0
        after = health(url)
    finally:
        stop()
        ray.shutdown()

    rss0, rss1 = before["rss_mb"], after["rss_mb"]
    print(
        f"\nmodel {model_dir} ({args.model and 'given' or args.preset}, context {CONTEXT}), one replica with "
        f"{args.num_cpus} CPUs, {args.clients} clients, {elapsed:.0f} s"
    )
    print(f"valid requests:   {tally.valid} sent, {tally.valid_failed} failed (goal 0), {tally.overloaded} got 503")
    print(f"bad requests:     {tally.bad} sent, {tally.bad_wrong} not answered with a 4xx (goal 0)")
    print(f"TTFT:             p50 {pct(tally.ttft, 50) * 1e3:,.0f} ms, p99 {pct(tally.ttft, 99) * 1e3:,.0f} ms")
    print(f"inter-token:      p50 {pct(tally.itl, 50) * 1e3:,.0f} ms, p99 {pct(tally.itl, 99) * 1e3:,.0f} ms")
    peak = max(r for _, r in series)
    # A full batch of long prompts reaches its working set in the first seconds of load: growth after that,
    # not the step from idle to loaded, is what a leak looks like.
    loaded = next((r for t, r in series if t >= 30), rss1)
    print(
        f"replica RSS:      {rss0:,.0f} MiB idle after warm-up, {loaded:,.0f} MiB after 30 s of load, "
        f"{rss1:,.0f} MiB at the end ({(rss1 - rss0) / rss0:+.1%} from idle, "
        f"{(rss1 - loaded) / loaded:+.1%} from 30 s), peak {peak:,.0f} MiB"
    )
    print("RSS over time:    " + ", ".join(f"{t:.0f}s {r:,.0f}" for t, r in series[:: max(1, len(series) // 8)]))
    print(
        f"generated:        {tally.tokens:,} tokens, {tally.tokens / elapsed:,.0f} tokens/s; engine max batch "
        f"{after['max_batch_seen']}, failed steps {after['failed_steps']}"
    )
    if tally.errors:
        print("first errors:", tally.errors[:5])


if __name__ == "__main__":
    main()
