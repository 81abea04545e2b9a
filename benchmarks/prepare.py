"""`bigray prepare` against HF `tokenizers` in one process, and what its driver receives, at 1x and 4x corpus.

Corpus: the Python standard library's .py files (~30 MB on every machine), written as jsonl files;
4x is four copies of it (dedup off, so every copy is tokenized and written). Both sides encode the
same documents with the same tokenizer; the baselines get the documents already in memory and time
only `encode_batch_fast`, once with the library's own thread pool (its default) and once
single-threaded. Printed as ratios measured in one run; absolute times on shared machines are noise.

Driver bytes: the pickled size of everything `ray.get` returned to the driver (the only way a
task's result reaches it). Driver RSS: this process's resident memory, sampled every 10 ms while
`prepare` runs, above what it was just before.

    python benchmarks/prepare.py [--repeat 2] [--files 64]

`--sft`: the same text as chats (each file: a user turn of its first 1,000 characters, an assistant turn of the
next 3,000, a second exchange from the rest), saved with `datasets` `save_to_disk` in `--files` Arrow shards, and
`bigray prepare` with `data.task=sft` against the same records rendered (bigray's default template) and encoded
piece by piece in one process, single-threaded; also the padding fraction of the packed rows.

    python benchmarks/prepare.py --sft [--repeat 2] [--files 16]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import threading
import time

import psutil

from bigray.config import load_config
from bigray.data import prepare
from bigray.data.read import clean, resolve_inputs
from bigray.data.tokenizer import backend, load_tokenizer, train_bpe
from bigray.runtime import init_ray
from bigray.storage import Store

STDLIB = ["data.inputs=['{stdlib}/**/*.py']", "data.exclude=['*/site-packages/*']", "data.format=text"]


def read_docs() -> list[str]:
    docs = []
    for f in resolve_inputs(load_config(overrides=STDLIB).data, Store()):
        try:
            with open(f.uri, encoding="utf-8") as handle:
                docs.append(clean(handle.read(), 0)[0])
        except UnicodeDecodeError:
            pass
    return docs


def write_corpus(docs: list[str], root: str, copies: int, files: int) -> str:
    os.makedirs(root, exist_ok=True)
    for c in range(copies):
        for k in range(files):
            with open(f"{root}/part-{c}-{k:03d}.jsonl", "w") as out:
                out.writelines(json.dumps({"text": d}) + "\n" for d in docs[k::files])
    return root


def encode_tps(tok_json: str, docs: list[str], threads: bool) -> float:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    tok = backend(tok_json)
    start = time.perf_counter()
    n = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs, add_special_tokens=False))
    os.environ.pop("TOKENIZERS_PARALLELISM")
    return n / (time.perf_counter() - start)


class Driver:
    """Peak RSS above the starting point, and bytes returned by ray.get, while the block runs."""

    def __enter__(self) -> Driver:
        import ray

        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.bytes = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.real_get = ray.get

        def get(*args, **kwargs):
            value = self.real_get(*args, **kwargs)
            self.bytes += len(pickle.dumps(value))
            return value

        ray.get = get
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        import ray

        ray.get = self.real_get
        self.done.set()
        self.thread.join()


def chats(docs: list[str]) -> list[list[dict]]:
    """Two exchanges per document: the text cut into user / assistant turns (1,000 / 3,000 characters)."""
    out = []
    for d in docs:
        turns = [d[i: i + n] for i, n in ((0, 1000), (1000, 3000), (4000, 1000), (5000, 3000)) if d[i: i + n].strip()]
        out.append([{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)])
    return [c for c in out if len(c) >= 2]


def sft(args, work: str, docs: list[str]) -> None:
    """`bigray prepare` with data.task=sft over a datasets dir vs rendering and encoding in one process."""
    import datasets
    import ray

    from bigray.data.sft import DEFAULT_CHAT_TEMPLATE, chat_format, encode_pieces, render

    convs = chats(docs)
    datasets.Dataset.from_dict({"messages": convs}).save_to_disk(f"{work}/chats", num_shards=args.files)
    cfg = load_config(overrides=["data.task=sft", "data.dedup=none", "data.seq_len=2048", "data.truncate=left",
                                 f"data.tokenizer={work}/tok", f"data.inputs=['{work}/chats']",
                                 f"data.output={work}/out-sft"])
    tok = load_tokenizer(f"{work}/tok", Store())
    fmt = chat_format(None, None, dict(tok.special_tokens), "assistant", "messages")
    assert fmt.template == DEFAULT_CHAT_TEMPLATE
    init_ray(cfg.ray)
    best = None
    for _ in range(args.repeat):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        start = time.perf_counter()
        n = sum(len(ids) for ids, _ in encode_pieces([render(c, fmt) for c in convs], backend(tok.json)))
        single = n / (time.perf_counter() - start)
        os.environ.pop("TOKENIZERS_PARALLELISM")
        with Driver() as driver:
            result = prepare(cfg)
        train = result.manifest["splits"]["train"]
        pad = result.manifest["stats"]["pad_tokens"]["train"] / max(1, train["tokens"])
        print(f"sft: pipeline {result.tokens_per_s / 1e6:.2f} M tok/s ({len(convs):,} chats, {result.tokens_kept:,} "
              f"tokens, {result.wall_s:.1f} s), one process render+encode {single / 1e6:.2f} M tok/s; "
              f"{train['rows']:,} rows, padding {pad:.1%}; driver got {driver.bytes:,} bytes, "
              f"RSS +{(driver.peak - driver.base) / 2**20:.0f} MiB; dropped {result.dropped}", flush=True)
        row = (result.tokens_per_s, single, pad, driver.bytes)
        best = max(best or row, row)
    print(f"\nCPUs (Ray logical): {int(ray.cluster_resources()['CPU'])}, cores: {os.cpu_count()}")
    print(f"ratio sft pipeline / one-process render+encode (one thread): {best[0] / best[1]:.2f}x; "
          f"padding {best[2]:.1%} of packed tokens; driver received {best[3]:,} bytes")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--files", type=int, default=64, help="jsonl files per copy of the corpus (--sft: shards)")
    parser.add_argument("--sft", action="store_true", help="chats from a datasets dir, data.task=sft")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bigray-bench-")
    docs = read_docs()
    print(f"corpus: {len(docs)} docs, {sum(map(len, docs)) / 1e6:.1f} M chars")
    train_bpe(docs[::4], 8192, f"{work}/tok")
    if args.sft:
        return sft(args, work, docs)
    tok = load_tokenizer(f"{work}/tok", Store())
    corpora = {n: write_corpus(docs, f"{work}/corpus-{n}x", n, args.files) for n in (1, 4)}

    cfg = load_config(overrides=["data.min_chars=0", "data.dedup=none", "data.seq_len=1024",
                                 f"data.tokenizer={work}/tok"])
    init_ray(cfg.ray)
    import ray

    best: dict = {}
    for _ in range(args.repeat):
        threaded = encode_tps(tok.json, docs, threads=True)
        single = encode_tps(tok.json, docs, threads=False)
        for n, root in corpora.items():
            run = cfg.model_copy(deep=True)
            run.data.inputs, run.data.output = [f"{root}/*.jsonl"], f"{work}/out-{n}x"
            with Driver() as driver:
                result = prepare(run)
            rss = (driver.peak - driver.base) / 2**20
            baselines = f" | encode_batch threaded {threaded / 1e6:.2f}, single-thread {single / 1e6:.2f} M tok/s"
            print(f"{n}x: pipeline {result.tokens_per_s / 1e6:.2f} M tok/s ({result.tokens_kept:,} tokens, "
                  f"{result.wall_s:.1f} s), driver got {driver.bytes:,} bytes, RSS +{rss:.0f} MiB"
                  + (baselines if n == 1 else ""), flush=True)
            row = (result.tokens_per_s, threaded, single, driver.bytes, driver.peak - driver.base, result.tokens_kept)
            best[n] = max(best.get(n, row), row)
    print(f"\nCPUs (Ray logical): {int(ray.cluster_resources()['CPU'])}, cores: {os.cpu_count()}")
    one = best[1]
    print(f"ratio pipeline / one-process encode_batch (library threads): {one[0] / one[1]:.2f}x")
    print(f"ratio pipeline / one-process encode_batch (one thread):      {one[0] / one[2]:.2f}x")
    for n, row in best.items():
        print(f"{n}x corpus: {row[5]:,} tokens ({row[5] * 2 / 2**20:,.0f} MiB as uint16); "
              f"driver received {row[3]:,} bytes, driver peak RSS +{row[4] / 2**20:,.0f} MiB")
    ray.shutdown()


if __name__ == "__main__":
    main()
