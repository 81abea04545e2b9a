"""bigray's engine against transformers' continuous-batching manager on one machine (issue 17's evaluation).

    .venv/bin/python benchmarks/serve_engines.py [--preset tiny] [--max-tokens 32]

For one random-init model: greedy parity of each engine with `model.generate`, then generated tokens/s with
1, 8 and 32 requests in flight at once (each engine gets the same prompts, greedy, `max_tokens` each), and the
process's peak RSS during each run above its RSS before it (Linux: VmHWM, reset through /proc/self/clear_refs).
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


def bigray_engine(model_dir: str, ids: list[list[int]], max_tokens: int, threads: int) -> tuple[list[list[int]], float]:
    from bigray.serve.engine import Engine, SamplingParams

    engine = Engine(model_dir, max_batch_size=32, batch_wait_timeout_s=0.0, device="cpu", num_threads=threads)

    async def run():
        items = [(p, SamplingParams(max_tokens=max_tokens, temperature=0)) for p in ids]
        out = [[] for _ in ids]
        t0 = time.perf_counter()
        async for i, ev in engine.generate(items):
            out[i] += ev.token_ids
        return out, time.perf_counter() - t0

    try:
        return asyncio.run(run())
    finally:
        engine.close()


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
    print(f"{'in flight':>9} {'bigray tok/s':>13} {'peak +MiB':>10} {'transformers CB tok/s':>22} {'peak +MiB':>10}")
    for n in (1, 8, 32):
        best = {"bigray": 0.0, "cb": 0.0}
        peak = {"bigray": 0.0, "cb": 0.0}
        for _ in range(2):  # best of two, alternating, on a shared noisy box
            base = peak_reset()
            out, s = bigray_engine(model_dir, ids[:n], args.max_tokens, args.threads)
            peak["bigray"] = max(peak["bigray"], peak_since(base))
            best["bigray"] = max(best["bigray"], sum(map(len, out)) / s)
            base = peak_reset()
            out, s = hf_continuous(model, ids[:n], args.max_tokens)
            peak["cb"] = max(peak["cb"], peak_since(base))
            best["cb"] = max(best["cb"], sum(map(len, out)) / s)
        print(
            f"{n:>9} {best['bigray']:>13,.0f} {peak['bigray']:>10,.0f} {best['cb']:>22,.0f} {peak['cb']:>10,.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
