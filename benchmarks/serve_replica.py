"""Why the same engine runs slower in a Serve replica than in benchmarks/serve.py's own process.

    .venv/bin/python benchmarks/serve_replica.py            # a random-init `tiny` model built on the fly

One greedy 32-token completion at a time, each from an idle engine (as benchmarks/serve.py times it), through the
same `Engine` in this process and in Ray actors that hold it as a replica does (num_cpus CPUs, torch threads =
num_cpus), with no HTTP anywhere: what differs is only the process the engine runs in. The actors differ in their
niceness (Ray starts worker processes at `RAY_worker_niceness`, 15 by default; this driver runs at 0) and in whether
the engine records bigray's Serve metrics. Cases run in blocks, round after round, so that the load drifting on a
shared machine hits all of them alike; each keeps its best block. Each actor also reports its niceness, torch's
thread count, OMP_NUM_THREADS and the cost of one histogram observation. `--busy N` keeps N busy-looping processes at
nice 0 running beside every case, as another job on the same machine would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import IDLE_GAP_S, build_model, prompts  # noqa: E402 - benchmarks/serve.py, next to this file


def timed_requests(engine, prompt: str, max_tokens: int, repeats: int) -> tuple[float, float]:
    """Median latency of `repeats` single completions from an idle engine, and its engine-step seconds per request."""
    from bigray.serve.engine import SamplingParams

    ids = engine.encode(prompt)

    async def run() -> tuple[float, float]:
        times = []
        steps0, requests0 = engine.stats["step_seconds"], engine.stats["requests"]
        for _ in range(repeats):
            await asyncio.sleep(IDLE_GAP_S)
            t0 = time.perf_counter()
            async for _ in engine.generate([(ids, SamplingParams(max_tokens=max_tokens, temperature=0))]):
                pass
            times.append(time.perf_counter() - t0)
        steps = (engine.stats["step_seconds"] - steps0) / (engine.stats["requests"] - requests0)
        return statistics.median(times), steps

    return asyncio.run(run())


def make_engine(model_dir: str, num_cpus: int, metrics: bool):
    from bigray.serve.engine import Engine
    from bigray.serve.metrics import EngineMetrics, ServeMetrics

    # The replica's settings (bigray/serve/app.py) as benchmarks/serve.py deploys it.
    return Engine(
        model_dir,
        max_batch_size=32,
        batch_wait_timeout_s=0.01,
        num_threads=num_cpus,
        device="cpu",
        metrics=ServeMetrics("bench") if metrics else EngineMetrics(),
    )


def process_info(engine) -> dict:
    import torch

    t0 = time.perf_counter()
    for _ in range(2000):
        engine.metrics.inter_token(0.01)
    # Linux keeps a nice value per thread: the engine thread's (started by the first request) is what counts.
    thread = engine._thread.native_id if engine._thread else 0
    return {
        "nice": os.getpriority(os.PRIO_PROCESS, thread),
        "torch threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OS threads": len(os.listdir("/proc/self/task")),
        "observe us": (time.perf_counter() - t0) / 2000 * 1e6,
    }


class Holder:
    """The engine in a Ray actor, as a Serve replica holds it (without Serve around it)."""

    def __init__(self, model_dir: str, num_cpus: int, metrics: bool):
        self.engine = make_engine(model_dir, num_cpus, metrics)

    def info(self) -> dict:
        return process_info(self.engine)

    def measure(self, prompt: str, max_tokens: int, repeats: int) -> tuple[float, float]:
        return timed_requests(self.engine, prompt, max_tokens, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model dir (default: build a random-init --preset model)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs (and torch threads) of each actor")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="completions per block (median)")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per case; each case keeps its best")
    parser.add_argument(
        "--busy", type=int, default=0, help="this many busy-looping processes at nice 0 beside every case (a neighbour)"
    )
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from bigray.config import RayConfig
    from bigray.runtime import init_ray

    model_dir = args.model or build_model(tempfile.mkdtemp(prefix="bigray-bench-serve-"), args.preset, 512)
    prompt = prompts(1)[0]
    cases = {
        "actor, Ray's worker niceness": ({}, False),
        "actor, RAY_worker_niceness=0": ({"RAY_worker_niceness": "0"}, False),
        "actor, RAY_worker_niceness=0, metrics": ({"RAY_worker_niceness": "0"}, True),
    }
    # Ray as bigray starts it for `bigray serve` (dashboard and its agent included). Only one case runs at a time: the
    # CPUs are Ray's bookkeeping, so that every actor can be placed at once.
    init_ray(RayConfig(num_cpus=args.num_cpus * len(cases) + 1))
    remote = ray.remote(Holder)
    busy: list = []
    try:
        # One engine per process, as in a replica (the metrics cases run in actors only).
        local = {"in-process": make_engine(model_dir, args.num_cpus, metrics=False)}
        actors = {
            name: remote.options(num_cpus=args.num_cpus, runtime_env={"env_vars": env} if env else None).remote(
                model_dir, args.num_cpus, metrics
            )
            for name, (env, metrics) in cases.items()
        }
        runners = {
            name: (lambda e=e: timed_requests(e, prompt, args.max_tokens, args.repeats)) for name, e in local.items()
        }
        runners |= {
            name: (lambda a=a: ray.get(a.measure.remote(prompt, args.max_tokens, args.repeats)))
            for name, a in actors.items()
        }
        for run in runners.values():
            run()  # warm up: the first forward of each process
        infos = {name: process_info(e) for name, e in local.items()}
        infos |= {name: ray.get(a.info.remote()) for name, a in actors.items()}
        # Children of this process: the driver's niceness (0), like the other jobs of a shared machine.
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for r in range(args.rounds):
            for name, run in runners.items():
                results[name].append(run())
                time.sleep(0.5)
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1][1] * 1e3:.1f}" for n, v in results.items()), flush=True)
    finally:
        for p in busy:
            p.kill()
        ray.shutdown()

    print(
        f"\nmodel {model_dir}, {args.num_cpus} CPUs / torch threads, max_tokens {args.max_tokens}, "
        f"best block of {args.rounds}, {args.busy} busy process(es) at nice 0 beside"
    )
    print(
        f"{'case':40} {'latency ms':>10} {'steps ms':>9} {'nice':>5} {'threads':>8} {'OMP':>5} {'OS thr':>7} "
        f"{'obs us':>7}"
    )
    for name, rows in results.items():
        latency, steps = min(r[0] for r in rows), min(r[1] for r in rows)
        i = infos[name]
        print(
            f"{name:40} {latency * 1e3:>10.1f} {steps * 1e3:>9.1f} {i['nice']:>5} {i['torch threads']:>8} "
            f"{i['OMP_NUM_THREADS'] or '-':>5} {i['OS threads']:>7} {i['observe us']:>7.1f}"
        )


if __name__ == "__main__":
    main()
