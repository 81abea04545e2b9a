"""`bigray serve` throughput and overhead, in one run:

1. generated tokens/s at 1, 8 and 32 concurrent HTTP clients, with batching on (serve.max_batch_size=32)
   and off (max_batch_size=1), and their ratio;
2. the HTTP path's per-request overhead over calling the engine in-process, for one 32-token completion.

    .venv/bin/python benchmarks/serve.py                    # a random-init `tiny` model built on the fly
    .venv/bin/python benchmarks/serve.py --model runs/demo/train/demo/export --num-cpus 4

    .venv/bin/python benchmarks/serve.py --variants --profile /tmp/serve-prof   # the HTTP overhead only, per setting

Goals: at 32 clients, batching >= 6x the unbatched tokens/s; HTTP overhead < 10% of a 32-token completion.
Every request is greedy with max_tokens=32 on a distinct prompt; tokens are counted from `usage`.

`--variants` measures only the overhead, once per Ray Serve setting in VARIANTS (each in a fresh local Ray,
the in-process reference shared), and with `--profile DIR` samples the proxy and replica with py-spy
(collapsed stacks, one file per process) while the HTTP requests run.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# Ray Serve's public performance settings (environment variables read where Ray starts its processes).
# `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` also turns on direct ingress (replicas listen on their own ports, no proxy
# on serve.port), measured on its own as the last variant: the client then talks to the replica's port (pinned
# through the direct-ingress port range), as an HAProxy in front of the replicas would.
VARIANTS = {
    "default": {},
    "user code on the replica's main loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "throughput-optimized, proxy kept": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
    "throughput-optimized, direct ingress": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # bigray's own option: Serve's HAProxy on serve.port in front of the replicas' direct-ingress ports.
    "serve.ingress=haproxy": {},
}


def build_model(out: str, preset: str, context: int) -> str:
    """A random-init Llama of `preset` shape with a 1024-token BPE trained on stdlib files (speed needs no training)."""
    import torch
    from transformers import AutoTokenizer

    from bigray.config import ModelConfig
    from bigray.data.tokenizer import train_bpe
    from bigray.train.model import build_model as build
    from bigray.train.model import model_config

    texts = [p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))]
    train_bpe(texts, 1024, out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    torch.manual_seed(0)
    build(model_config(ModelConfig(preset=preset), len(tok), context, tok.eos_token_id)).save_pretrained(
        out, safe_serialization=True
    )
    return out


def prompts(n: int) -> list[str]:
    return [f"def handler_{i}(request, *args):\n    return" for i in range(n)]


def post(conn: http.client.HTTPConnection, body: dict, prefix: str = "") -> dict:
    conn.request(
        "POST", f"{prefix}/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    out = json.loads(resp.read())
    if resp.status != 200:
        raise RuntimeError(out)
    return out


def throughput(url: str, model: str, clients: int, per_client: int, max_tokens: int, prefix: str = "") -> float:
    """Generated tokens/s with `clients` threads, each sending `per_client` requests back to back on one connection."""
    host, port = url.removeprefix("http://").split(":")
    tokens = [0] * clients
    start = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        start.wait()
        for p in prompts(per_client * clients)[k::clients]:
            tokens[k] += post(conn, {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0}, prefix)[
                "usage"
            ]["completion_tokens"]
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - t0)


# Each timed request starts from an idle engine, over HTTP and in-process alike. Back to back, the in-process
# client's next request reached the engine thread before it went idle and skipped serve.batch_wait_timeout_s
# (a 1-token completion took 2 ms in-process against 10 ms of batch wait over HTTP): batching, not HTTP.
IDLE_GAP_S = 0.05


def pin_engines(replica, replica_threads_before: dict[int, float], engine) -> str:
    """--pin: the two engines' threads (the replica's, found as its thread that worked most in the last request, and
    the in-process one's) alone on the last core, every other thread of this benchmark, of Ray's processes, of the
    replica and of HAProxy on the other cores. As on a GPU node, where the engine's work has its own device and the
    host's cores serve the rest: what is left between the two paths is then the HTTP path itself, not the two
    processes sharing two cores. Returns a line saying what was pinned."""
    import psutil

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin needs at least 2 cores")
    engine_core, rest = {cores[-1]}, set(cores[:-1])
    worked = {t.id: t.user_time + t.system_time - replica_threads_before.get(t.id, 0.0) for t in replica.threads()}
    engines = {max(worked, key=worked.get), engine._thread.native_id}
    pinned = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            threads = proc.threads()
        except psutil.Error:  # exited since listed
            continue
        for t in threads:
            try:
                os.sched_setaffinity(t.id, engine_core if t.id in engines else rest)
                pinned += 1
            except (ProcessLookupError, PermissionError):
                pass
    return f"pinned: 2 engine threads on core {cores[-1]}, {pinned - 2} other threads on cores {sorted(rest)}"


def overhead(url: str, model: str, engine, prompt: str, max_tokens: int, repeats: int, profile=None, pin: bool = False):
    """Median latency of one greedy completion over HTTP and through an in-process Engine with the replica's settings
    (no proxy, no FastAPI, no JSON), in alternating blocks so that load drifting on a shared machine hits both alike.
    `profile` (a callable) starts sampling before the last HTTP block and returns a callable that stops it.
    `pin`: see pin_engines.
    Also each path's engine-step time per request (the replica's from /health's step_seconds), which tells the time
    around the engine (proxy, ASGI, event loops) apart from a slower engine inside the replica."""
    import psutil

    from bigray.serve.engine import SamplingParams

    ids = engine.encode(prompt)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)

    async def in_process() -> int:
        n = 0
        # Not streamed, as the HTTP request is not: one event at the end (SamplingParams.stream).
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stream=False)
        async for _, ev in engine.generate([(ids, params)]):
            n = ev.completion_tokens
        return n

    def replica_steps() -> tuple[float, int]:
        conn.request("GET", "/health")
        state = json.loads(conn.getresponse().read())
        return state["step_seconds"], state["requests"]

    def per_request(before, after) -> float:
        return (after[0] - before[0]) / max(1, after[1] - before[1])

    # CPU seconds of the replica's process, of this one, and of the whole machine: whether a slower path did more work
    # itself or waited for cores that other processes held.
    conn.request("GET", "/health")
    replica = psutil.Process(json.loads(conn.getresponse().read())["pid"])
    me = psutil.Process()

    def cpu() -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
        return sum(replica.cpu_times()[:2]), sum(me.cpu_times()[:2]), busy

    cpu_use = {"HTTP": [0.0, 0.0, 0.0], "in-process": [0.0, 0.0, 0.0]}

    def add_cpu(path: str, before: tuple) -> None:
        for i, (a, b) in enumerate(zip(before, cpu())):
            cpu_use[path][i] += (b - a) / (2 * repeats)

    async def run():
        http_t, engine_t, counts, steps = [], [], set(), {"replica": [], "in-process": []}
        await in_process()
        threads_before = {t.id: t.user_time + t.system_time for t in replica.threads()}
        post(conn, {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        if pin:
            print(pin_engines(replica, threads_before, engine), flush=True)
        for block in range(2):
            # Blocks, not alternation: on a 2-core box the idle path's OpenMP threads still spin for a while after
            # each request and would slow the other path down. Each path keeps its better block median.
            stop_profile = profile() if profile and block == 1 else None
            times = []
            before, cpu0 = replica_steps(), cpu()
            for _ in range(repeats):
                time.sleep(IDLE_GAP_S)
                t0 = time.perf_counter()
                counts.add(
                    post(conn, {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})["usage"][
                        "completion_tokens"
                    ]
                )
                times.append(time.perf_counter() - t0)
            add_cpu("HTTP", cpu0)
            steps["replica"].append(per_request(before, replica_steps()))
            http_t.append(statistics.median(times))
            if stop_profile:
                stop_profile()
            await asyncio.sleep(0.5)
            times = []
            before, cpu0 = (engine.stats["step_seconds"], engine.stats["requests"]), cpu()
            for _ in range(repeats):
                await asyncio.sleep(IDLE_GAP_S)
                t0 = time.perf_counter()
                counts.add(await in_process())
                times.append(time.perf_counter() - t0)
            add_cpu("in-process", cpu0)
            steps["in-process"].append(per_request(before, (engine.stats["step_seconds"], engine.stats["requests"])))
            engine_t.append(statistics.median(times))
            await asyncio.sleep(0.5)
        return min(http_t), min(engine_t), counts, min(steps["replica"]), min(steps["in-process"])

    *out, replica_s, in_process_s = asyncio.run(run())
    # The bare hop: proxy -> router -> replica -> FastAPI -> back, with no model work and a tiny JSON body.
    hop = []
    for _ in range(repeats * 2):
        t0 = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        hop.append(time.perf_counter() - t0)
    # The same with a request body the replica reads and parses (an unknown model: 404 before any generation).
    body = json.dumps({"model": "no-such-model", "prompt": prompt, "max_tokens": max_tokens}).encode()
    post_hop = []
    for _ in range(repeats * 2):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        post_hop.append(time.perf_counter() - t0)
    print(f"POST answered before generation (404): {statistics.median(post_hop) * 1e3:.1f} ms", flush=True)
    for path, (rep, mine, busy) in cpu_use.items():
        print(
            f"CPU per request, {path} blocks: replica {rep * 1e3:.1f} ms, this process {mine * 1e3:.1f} ms, "
            f"all other processes {(busy - rep - mine) * 1e3:.1f} ms",
            flush=True,
        )
    return (*out, statistics.median(hop), replica_s, in_process_s)


def niceness(url: str) -> int:
    """The replica process's nice value, read by the OS from the pid /health reports."""
    import psutil

    with urllib.request.urlopen(f"{url}/health", timeout=30) as resp:
        return psutil.Process(json.loads(resp.read())["pid"]).nice()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model dir to serve (default: build a random-init --preset model)")
    parser.add_argument("--preset", default="tiny", help="shape of the built model (tiny, 125m, ...)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs (and torch threads) of the one replica")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=4, help="requests each client sends")
    parser.add_argument("--repeats", type=int, default=20, help="single requests timed for the overhead (median)")
    parser.add_argument(
        "--ingress", choices=["proxy", "haproxy"], default="proxy", help="serve.ingress (haproxy: Serve's HAProxy)"
    )
    parser.add_argument(
        "--niceness", default="0", help="serve.niceness (bigray's default 0; null: Ray's worker default, 15)"
    )
    parser.add_argument(
        "--pin", action="store_true", help="overhead with each engine's thread alone on a core (see pin_engines)"
    )
    parser.add_argument("--variants", action="store_true", help="only the HTTP overhead, once per Serve setting")
    parser.add_argument("--profile", metavar="DIR", help="with --variants: py-spy the proxy and replica into DIR")
    args = parser.parse_args()
    if args.variants:
        return variants(args)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from bigray.config import load_config
    from bigray.runtime import free_port
    from bigray.serve import build_app, start, stop
    from bigray.serve.engine import Engine

    model_dir = args.model or build_model(tempfile.mkdtemp(prefix="bigray-bench-serve-"), args.preset, 512)
    port = free_port()
    base = [
        f"serve.model={model_dir}",
        f"serve.port={port}",
        "serve.model_name=bench",
        f"serve.num_cpus={args.num_cpus}",
        "serve.max_ongoing_requests=64",
        "serve.batch_wait_timeout_s=0.01",
        f"ray.num_cpus={2 * args.num_cpus + 1}",
        f"serve.ingress={args.ingress}",
        f"serve.niceness={args.niceness}",
    ]
    levels = [1, 8, 32]
    results: dict[str, dict[int, float]] = {"batched": {}, "unbatched": {}}
    prompt = prompts(1)[0]
    try:
        # Both apps stay up side by side (batching off at /unbatched) and are measured alternately, best of two rounds,
        # so that load drifting on a shared machine does not favour whichever mode happened to run in a quiet minute.
        url = start(load_config(overrides=[*base, "serve.max_batch_size=32"]))
        serve.run(
            build_app(load_config(overrides=[*base, "serve.max_batch_size=1"])),
            name="bigray-unbatched",
            route_prefix="/unbatched",
        )
        modes = {"batched": "", "unbatched": "/unbatched"}
        for prefix in modes.values():
            throughput(url, "bench", 4, 1, args.max_tokens, prefix)  # warm up both replicas
        for _ in range(2):
            for c in levels:
                for mode, prefix in modes.items():
                    results[mode][c] = max(
                        results[mode].get(c, 0.0), throughput(url, "bench", c, args.per_client, args.max_tokens, prefix)
                    )
        for mode in modes:
            print(
                f"{mode:9} tokens/s: " + ", ".join(f"{c} clients {results[mode][c]:,.0f}" for c in levels), flush=True
            )
        engine = Engine(
            model_dir, max_batch_size=32, batch_wait_timeout_s=0.01, num_threads=args.num_cpus, device="cpu"
        )
        http_s, engine_s, counts, hop_s, steps_replica, steps_local = overhead(
            url, "bench", engine, prompt, args.max_tokens, args.repeats, pin=args.pin
        )
        nice = {"replica": niceness(url), "in-process": os.getpriority(os.PRIO_PROCESS, 0)}
    finally:
        stop()
    ray.shutdown()

    print(
        f"\nmodel {model_dir} ({args.model and 'given' or args.preset}), replica {args.num_cpus} CPUs, "
        f"max_tokens {args.max_tokens}, serve.ingress={args.ingress}, serve.niceness={args.niceness}"
        + (", engines pinned" if args.pin else "")
    )
    print(f"{'clients':>8} {'batched tok/s':>14} {'unbatched tok/s':>16} {'ratio':>7}")
    for c in levels:
        print(
            f"{c:>8} {results['batched'][c]:>14,.0f} {results['unbatched'][c]:>16,.0f} "
            f"{results['batched'][c] / results['unbatched'][c]:>6.2f}x"
        )
    over = (http_s - engine_s) / engine_s
    print(
        f"\none {'/'.join(map(str, sorted(counts)))}-token completion: engine in-process {engine_s * 1e3:.1f} ms, "
        f"over HTTP {http_s * 1e3:.1f} ms "
        f"-> HTTP overhead {http_s * 1e3 - engine_s * 1e3:.1f} ms = {over:.1%}"
    )
    print(f"of which the bare proxy-to-replica round trip (GET /health) is {hop_s * 1e3:.1f} ms")
    print(
        f"engine steps per request: in the replica {steps_replica * 1e3:.1f} ms, in-process {steps_local * 1e3:.1f} ms"
        f" (nice: replica {nice['replica']}, in-process {nice['in-process']})"
    )
    # The overhead less the difference in engine-step time: what the HTTP path itself (ingress, body, JSON, event
    # loops) adds, apart from the same engine simply running slower or faster in the replica's process on a busy box.
    path_s = (http_s - steps_replica) - (engine_s - steps_local)
    print(f"HTTP path outside the engine steps: {path_s * 1e3:.1f} ms = {path_s / engine_s:.1%} of the completion")
    ratio = results["batched"][32] / results["unbatched"][32]
    print(
        f"goals: 32-client batching {ratio:.2f}x (>= 6x: {'met' if ratio >= 6 else 'NOT met'}), "
        f"HTTP overhead {over:.1%} (< 10%: {'met' if over < 0.10 else 'NOT met'})"
    )


def variants(args) -> None:
    """The HTTP overhead of one 32-token completion under each of VARIANTS, each in a fresh local Ray."""
    import ray

    from bigray.config import load_config
    from bigray.runtime import free_port, init_ray
    from bigray.serve import start, stop
    from bigray.serve.engine import Engine

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    model_dir = args.model or build_model(tempfile.mkdtemp(prefix="bigray-bench-serve-"), args.preset, 512)
    engine = Engine(model_dir, max_batch_size=32, batch_wait_timeout_s=0.01, num_threads=args.num_cpus, device="cpu")
    rows = []
    for name, env in VARIANTS.items():
        direct = "direct ingress" in name
        if direct:
            replica_port = free_port()
            env = env | {
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(replica_port),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(replica_port + 1),
            }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        port = free_port()
        cfg = load_config(
            overrides=[
                f"serve.model={model_dir}",
                f"serve.port={port}",
                "serve.model_name=bench",
                f"serve.num_cpus={args.num_cpus}",
                "serve.max_batch_size=32",
                f"ray.num_cpus={args.num_cpus + 1}",
                *([name] if name.startswith("serve.") else []),
            ]
        )
        if cfg.serve.ingress == "proxy":
            init_ray(cfg.ray)  # with the variant's environment; start() starts Ray itself for haproxy
        profile = None
        try:
            url = _start_direct(cfg, replica_port) if direct else start(cfg, timeout_s=180)
            if args.profile:
                profile = _profiler(url, Path(args.profile), name)
            http_s, engine_s, counts, hop_s, steps_replica, steps_local = overhead(
                url, "bench", engine, prompts(1)[0], args.max_tokens, args.repeats, profile
            )
        except Exception as exc:  # noqa: BLE001 - one setting that does not start must not hide the others
            print(f"{name}: failed ({type(exc).__name__}: {exc})", flush=True)
            continue
        finally:
            stop()
            ray.shutdown()
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        rows.append((name, engine_s, http_s, hop_s, steps_replica, steps_local))
        print(
            f"{name}: in-process {engine_s * 1e3:.1f} ms, HTTP {http_s * 1e3:.1f} ms, hop {hop_s * 1e3:.1f} ms",
            flush=True,
        )
    print(
        f"\n{'Serve setting':40} {'engine ms':>10} {'HTTP ms':>8} {'overhead':>15} {'GET /health':>12} "
        f"{'steps/request replica | in-process':>36}"
    )
    for name, engine_s, http_s, hop_s, steps_replica, steps_local in rows:
        over = http_s - engine_s
        print(
            f"{name:40} {engine_s * 1e3:>10.1f} {http_s * 1e3:>8.1f} {over * 1e3:>6.1f} ms {over / engine_s:>6.1%} "
            f"{hop_s * 1e3:>9.1f} ms {steps_replica * 1e3:>20.1f} ms | {steps_local * 1e3:.1f} ms"
        )


def _start_direct(cfg, replica_port: int, timeout_s: float = 180) -> str:
    """Deploy with direct ingress (no proxy): the replica serves HTTP on `replica_port`; returns its URL."""
    from ray import serve

    from bigray.serve import build_app

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name="bigray", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{replica_port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
                if resp.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health not answering after {timeout_s:.0f} s")
        time.sleep(0.5)


def _profiler(url: str, out: Path, name: str):
    """A callable that starts py-spy on the replica (its pid from /health) and Serve's proxy; calling its result
    stops them. Collapsed stacks (flamegraph input), idle threads included, so waits show as well as work."""
    import shutil
    import signal
    import subprocess

    from ray.util.state import list_actors

    with urllib.request.urlopen(f"{url}/health", timeout=30) as resp:
        replica = json.loads(resp.read())["pid"]
    proxy = next(a.pid for a in list_actors(filters=[("class_name", "=", "ProxyActor"), ("state", "=", "ALIVE")]))
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name)

    def begin():
        procs = [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--rate",
                    "250",
                    "--idle",
                    "--threads",
                    "--nonblocking",
                    "-o",
                    str(out / f"{slug}-{role}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for role, pid in (("replica", replica), ("proxy", proxy))
        ]

        def end():
            for p in procs:
                p.send_signal(signal.SIGINT)
            for p in procs:
                p.wait(timeout=60)

        return end

    return begin


if __name__ == "__main__":
    main()
