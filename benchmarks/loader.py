"""The training data reader from S3 (a local moto server): per-worker rows/s with 1, 2 and 4 reader processes,
bytes read per worker, and seconds from a resume to the first batch at step 0 vs a late step. One run, side by side.

A synthetic split in prepare's own format (`bigray.data.pack.shards`: zstd parquet, ~4 MB blocks, seq_len 2048,
uint16 tokens) is written to the moto server; each process is one rank's `Reader` (bigray/train/batches.py) going
through one epoch with no training step in between, i.e. the reader's ceiling, not a training run's need.

    python benchmarks/loader.py [--blocks 48 --seq-len 2048 --partitions 8 --global-batch 32 --window 1]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import time

import numpy as np

H100_1B_TOKENS_PER_S = 30_000  # what one H100 consumes training a 1b model (README's GPU table: ~48-61k at best)


def write_split(uri: str, n_blocks: int, seq_len: int, block_rows: int) -> dict:
    """Random-token shards of `n_blocks` blocks (4 files, the last block of each short) in S3; returns the manifest."""
    from bigray.data.pack import shards
    from bigray.storage import Store

    store = Store()
    rng = np.random.default_rng(0)
    per_file = n_blocks // 4 * block_rows - block_rows // 2  # a short last block in every file
    blocks, start, files = [], 0, []
    for q in range(4):
        rows = rng.integers(0, 32000, size=(per_file, seq_len + 1), dtype=np.uint16)
        for shard in shards(rows, f"train-{q:05d}", per_file, block_rows):
            store.write_bytes(f"{uri}/{shard.name}", shard.data)
            files.append({"path": shard.name, "rows": shard.rows, "bytes": len(shard.data)})
            for block in shard.blocks:
                blocks.append({**block, "start": start})
                start += block["rows"]
    return {"version": 2, "seq_len": seq_len, "splits": {"train": {"rows": start, "shards": files, "blocks": blocks}}}


def read_epoch(rank: int, world: int, uri: str, manifest: dict, partitions: int, global_batch: int, window: int,
               out) -> None:
    """One rank's reader through one epoch: rows/s, bytes read."""
    from bigray.storage import Store
    from bigray.train.batches import DataOrder, open_reader

    order = DataOrder.of(manifest["splits"]["train"]["blocks"], 0, partitions, global_batch, window)
    reader = open_reader(order, manifest, "train", uri, Store(), rank, world)
    start = time.perf_counter()
    rows = sum(len(r) for _, _, r in reader.batches(0, order.epoch(0).steps))
    elapsed = time.perf_counter() - start
    out.put({"rank": rank, "rows": rows, "s": elapsed, **reader.counter.snapshot()})
    reader.close()


def resume_to_first_batch(uri: str, manifest: dict, partitions: int, global_batch: int, window: int, world: int,
                          step: int) -> dict:
    """Seconds from opening rank 0's reader at `step` to its first batch, and what it read for it."""
    from bigray.storage import Store
    from bigray.train.batches import DataOrder, open_reader

    order = DataOrder.of(manifest["splits"]["train"]["blocks"], 0, partitions, global_batch, window)
    start = time.perf_counter()
    reader = open_reader(order, manifest, "train", uri, Store(), 0, world)
    next(iter(reader.batches(step, step + 1)))
    elapsed = time.perf_counter() - start
    reader.close()
    return {"s": elapsed, **reader.counter.snapshot()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=1)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    from bigray.runtime import free_port
    from bigray.storage import Store

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    uri = "s3://bench/data"
    block_rows = max(1, (4 << 20) // ((args.seq_len + 1) * 2))
    manifest = write_split(uri, args.blocks, args.seq_len, block_rows)
    blocks = manifest["splits"]["train"]["blocks"]
    split_bytes = sum(b["length"] for b in blocks)
    print(f"split: {len(blocks)} blocks of {block_rows} rows (seq_len {args.seq_len}), "
          f"{manifest['splits']['train']['rows']} rows, {split_bytes / 2**20:.1f} MiB compressed; "
          f"P={args.partitions}, G={args.global_batch}, W={args.window} blocks; moto S3 on 127.0.0.1")
    print("| reader processes | rows/s per worker | tokens/s per worker | x H100 1b need | MiB read per worker "
          "| share of the split | requests per worker |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ctx = mp.get_context("spawn")
    for world in (1, 2, 4):
        out = ctx.Queue()
        procs = [ctx.Process(target=read_epoch, args=(r, world, uri, manifest, args.partitions, args.global_batch,
                                                      args.window, out)) for r in range(world)]
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        for p in procs:
            p.join()
        rate = np.mean([r["rows"] / r["s"] for r in results])
        mib = np.mean([r["bytes"] for r in results]) / 2**20
        share = np.max([r["bytes"] - r["footer_bytes"] for r in results]) / split_bytes
        print(f"| {world} | {rate:,.0f} | {rate * args.seq_len:,.0f} | "
              f"{rate * args.seq_len / H100_1B_TOKENS_PER_S:.0f}x | {mib:.1f} | {share:.3f} (1/N = {1 / world:.3f}) "
              f"| {np.mean([r['requests'] for r in results]):.0f} |")
    steps = manifest_steps(manifest, args)
    print("\n| resume at step (N=2, rank 0) | seconds to first batch | blocks read | MiB read "
          "| MiB a replaying reader decodes first |")
    print("| --- | --- | --- | --- | --- |")
    rows = manifest["splits"]["train"]["rows"]
    for step in (0, steps - 2, 0, steps - 2):  # twice each, alternating
        r = resume_to_first_batch(uri, manifest, args.partitions, args.global_batch, args.window, 2, step)
        # bigray before this reader: every worker streamed the split from its start up to the step's rows.
        replay = step * args.global_batch / rows * split_bytes / 2**20
        print(f"| {step} of {steps} | {r['s']:.3f} | {r['blocks']} | {r['bytes'] / 2**20:.1f} | {replay:.1f} |")
    server.stop()
    del Store


def manifest_steps(manifest: dict, args) -> int:
    from bigray.train.batches import DataOrder

    order = DataOrder.of(manifest["splits"]["train"]["blocks"], 0, args.partitions, args.global_batch, args.window)
    return order.epoch(0).steps


if __name__ == "__main__":
    main()
