"""Tokens/s of the whole `bigray prepare` pipeline against HF `tokenizers` in one process.

Corpus: the Python standard library's .py files (~30 MB on every machine). Both sides encode the
same documents with the same tokenizer; the baselines get the documents already in memory and
time only `encode_batch_fast`, once with the library's own thread pool (its default) and once
single-threaded. Printed as ratios measured in one run; absolute times on shared machines are noise.

    python benchmarks/prepare.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bigray.config import load_config
from bigray.data import prepare
from bigray.data.prepare import clean
from bigray.data.read import resolve_inputs
from bigray.data.tokenizer import backend, load_tokenizer, train_bpe

INPUTS = ["data.inputs=['{stdlib}/**/*.py']", "data.exclude=['*/site-packages/*']", "data.format=text", "data.min_chars=0", "data.dedup=false"]


def read_docs(cfg) -> list[str]:
    docs = []
    for f in resolve_inputs(cfg.data, cfg.storage):
        try:
            docs.append(clean(open(f.uri, encoding="utf-8").read(), 0)[0])
        except UnicodeDecodeError:
            pass
    return docs


def encode_tps(tok_json: str, docs: list[str], threads: bool) -> tuple[float, int]:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    tok = backend(tok_json)
    start = time.perf_counter()
    n = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs, add_special_tokens=False))
    return n / (time.perf_counter() - start), n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = tempfile.mkdtemp(prefix="bigray-bench-")
    cfg = load_config(overrides=[*INPUTS, f"data.output={work}/out", f"data.tokenizer={work}/tok", "data.seq_len=1024"])
    docs = read_docs(cfg)
    print(f"corpus: {len(docs)} docs, {sum(map(len, docs)) / 1e6:.1f} M chars")
    train_bpe(docs[::4], 8192, f"{work}/tok")
    tok = load_tokenizer(f"{work}/tok")

    import ray

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for _ in range(args.repeat):
        threaded, n = encode_tps(tok.json, docs, threads=True)
        single, _ = encode_tps(tok.json, docs, threads=False)
        os.environ.pop("TOKENIZERS_PARALLELISM")
        result = prepare(cfg)
        rows.append((result["tokens_per_s"], threaded, single))
        print(f"pipeline {result['tokens_per_s'] / 1e6:.2f} M tok/s ({result['stats']['tokens_kept']:,} tokens, {result['wall_s']:.1f} s) | "
              f"encode_batch threaded {threaded / 1e6:.2f} | single-thread {single / 1e6:.2f} ({n:,} tokens)")
    best = max(rows)
    print(f"\nCPUs: {int(ray.cluster_resources()['CPU'])}")
    print(f"ratio pipeline / one-process encode_batch (library threads): {best[0] / best[1]:.2f}x")
    print(f"ratio pipeline / one-process encode_batch (one thread):      {best[0] / best[2]:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
