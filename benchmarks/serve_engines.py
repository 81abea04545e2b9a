"""bigray's engine against transformers' continuous-batching manager on one machine (issue 17's evaluation).

    .venv/bin/python benchmarks/serve_engines.py [--preset tiny] [--max-tokens 32]

For one random-init model: greedy parity of each engine with `model.generate`, then generated tokens/s with
1, 8 and 32 requests in flight at once (each engine gets the same prompts, greedy, `max_tokens` each), and the
process's peak RSS during each run above its RSS before it (Linux: VmHWM, reset through /proc/self/clear_refs).
`--baseline COMMIT` adds bigray's engine as it was at COMMIT (its engine.py read with `git show`) beside today's,
plus a churn run: 96 requests with max_tokens 8..64 through 32 rows, so sequences keep joining and leaving.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import build_model, prompts  # noqa: E402 - benchmarks/serve.py, next to this file


def peak_reset() -> int:
    """Reset this process's peak RSS to its current RSS (Linux); returns the current RSS in bytes."""
    import psutil

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return psutil.Process().memory_info().rss


def peak_since(base: int) -> float:
    """MiB of peak RSS above `base` since the last peak_reset()."""
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return max(0, hwm - base) / 2**20


def hf_reference(model, ids: list[list[int]], max_tokens: int, eos: int) -> list[list[int]]:
    import torch

    out = []
    for p in ids:
        t = torch.tensor([p])
        gen = model.generate(
            t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=max_tokens, pad_token_id=eos
        )
        out.append([x for x in gen[0, len(p) :].tolist()])
    return out


def engine_at(commit: str):
    """bigray's Engine class as it was at `commit` (bigray/serve/engine.py from git, loaded as its own module)."""
    import importlib.util
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "show", f"{commit}:bigray/serve/engine.py"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    name = f"bigray_engine_{commit[:8]}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up while the source runs
    exec(compile(src, f"{commit}:bigray/serve/engine.py", "exec"), module.__dict__)
    return module.Engine


def bigray_engine(
    model_dir: str, ids: list[list[int]], max_tokens, threads: int, engine_cls=None
) -> tuple[list[list[int]], float]:
    """`max_tokens`: one number for every request, or one per request."""
    from bigray.serve.engine import Engine, SamplingParams

    engine = (engine_cls or Engine)(
        model_dir, max_batch_size=32, batch_wait_timeout_s=0.0, device="cpu", num_threads=threads
    )
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(ids)

    async def run():
        items = [(p, SamplingParams(max_tokens=m, temperature=0)) for p, m in zip(ids, limits)]
        out = [[] for _ in ids]
        t0 = time.perf_counter()
        async for i, ev in engine.generate(items):
            out[i] += ev.token_ids
        return out, time.perf_counter() - t0

    try:
        return asyncio.run(run())
    finally:
        getattr(engine, "close", lambda: None)()


def hf_continuous(model, ids: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.eos_token_id,
    )
    cb = ContinuousBatchingConfig(max_requests_per_batch=32, use_cuda_graph=False)
    t0 = time.perf_counter()
    res = model.generate_batch(ids, generation_config=gen, continuous_batching_config=cb, warmup=False)
    took = time.perf_counter() - t0
    by_id = sorted(res.values(), key=lambda r: int(r.request_id.removeprefix("req_")))
    return [list(r.generated_tokens) for r in by_id], took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", metavar="COMMIT", help="also bigray's engine as it was at this commit")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = build_model(tempfile.mkdtemp(prefix="bigray-bench-engines-"), args.preset, 512)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts(32)]
    ref = hf_reference(model, ids[:8], args.max_tokens, tok.eos_token_id)
    ours, _ = bigray_engine(model_dir, ids[:8], args.max_tokens, args.threads)
    theirs, _ = hf_continuous(model, ids[:8], args.max_tokens)
    strip = lambda seq: [t for t in seq if t != tok.eos_token_id]  # noqa: E731 - generate may pad past EOS
    print(
        f"greedy parity with generate over 8 prompts: bigray {sum(strip(a) == strip(b) for a, b in zip(ours, ref))}/8, "
        f"transformers CB {sum(strip(a) == strip(b) for a, b in zip(theirs, ref))}/8"
    )
    runners = {"bigray": lambda n, m: bigray_engine(model_dir, ids[:n], m, args.threads)}
    if args.baseline:
        old = engine_at(args.baseline)
        runners[f"bigray@{args.baseline[:7]}"] = lambda n, m: bigray_engine(model_dir, ids[:n], m, args.threads, old)
    runners["transformers CB"] = lambda n, m: hf_continuous(model, ids[:n], m)
    print(f"{'in flight':>9} " + " ".join(f"{name + ' tok/s':>24} {'peak +MiB':>9}" for name in runners))
    for n in (1, 8, 32):
        best, peak = run_all(runners, n, args.max_tokens)
        print(f"{n:>9} " + " ".join(f"{best[k]:>24,.0f} {peak[k]:>9,.0f}" for k in runners), flush=True)
    if args.baseline:
        # Churn: 96 requests through 32 rows, each with its own max_tokens, so rows leave and join all the time.
        ids.extend(ids[:64])
        limits = [8 + (i * 37) % 57 for i in range(96)]
        churn = {k: r for k, r in runners.items() if k.startswith("bigray")}
        best, peak = run_all(churn, 96, limits)
        print("churn, 96 requests, max_tokens 8..64: " + ", ".join(f"{k} {best[k]:,.0f} tok/s" for k in churn))


def run_all(runners: dict, n: int, max_tokens) -> tuple[dict, dict]:
    """Best tokens/s and largest peak RSS (MiB above the start) of each runner, two rounds alternating."""
    best = dict.fromkeys(runners, 0.0)
    peak = dict.fromkeys(runners, 0.0)
    for _ in range(2):  # best of two, alternating, on a shared noisy box
        for name, run in runners.items():
            base = peak_reset()
            out, s = run(n, max_tokens)
            peak[name] = max(peak[name], peak_since(base))
            best[name] = max(best[name], sum(map(len, out)) / s)
    return best, peak


if __name__ == "__main__":
    main()
