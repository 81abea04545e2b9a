"""Steps/s of `bigray train` (Ray Train + its block reader + metrics) against a bare DeepSpeed loop.

Same model (the `tiny` preset), micro batch, ZeRO stage, precision and process count on both
sides. The bare loop is `torch.multiprocessing` + gloo + the same engine code
(`bigray.train.loop.setup_engine`, `lm_loss`) over rows already in memory: what a user would write
without Ray. Both sides time the steps after the first `--log-every` (warm-up) the same way:
wall time of the remaining steps over their count. Printed as a ratio measured in one run.

    python benchmarks/train_overhead.py [--steps 80 --workers 2 --zero 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

from bigray.config import load_config
from bigray.storage import Store

PREPARE = ["data.inputs=['{stdlib}/json/*.py', '{stdlib}/email/*.py', '{stdlib}/logging/*.py']", "data.format=text",
           "data.vocab_size=512", "data.val_fraction=0.05"]


def bare_worker(rank: int, world: int, overrides: list[str], rows: np.ndarray, warmup: int, out: str) -> None:
    import torch

    from bigray.train.batches import Rows, micro_slice
    from bigray.train.loop import lm_loss, setup_engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")
    torch.set_num_threads(1)  # as Ray Train's 1-CPU workers run
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(overrides=overrides)
    t = cfg.train
    engine, _, _ = setup_engine(t, cfg.model, Store(cfg.storage), 512, rows.shape[1] - 1, 0, world, torch.device("cpu"))
    per_step = world * t.micro_batch_size * t.grad_accum_steps
    for step in range(t.max_steps):
        if step == warmup:
            start = time.perf_counter()
        batch = rows[(step * per_step) % (len(rows) - per_step):][:per_step]
        mine = Rows(tokens=batch[rank::world], row_ids=np.arange(rank, per_step, world))
        for m in range(t.grad_accum_steps):
            loss = lm_loss(engine, micro_slice(mine, m, t.micro_batch_size), torch.device("cpu"))
            engine.backward(loss)
            engine.step()
    elapsed = time.perf_counter() - start
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"steps_per_s": (t.max_steps - warmup) / elapsed}, f)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = tempfile.mkdtemp(prefix="bigray-bench-train-")
    train_overrides = [
        f"train.num_workers={args.workers}", f"train.zero_stage={args.zero}", "train.precision=fp32",
        f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}",
        f"train.log_every={args.log_every}", f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}",
        "train.warmup_steps=5", "train.export=false",
    ]

    import ray

    from bigray.data import prepare
    from bigray.ray_compat import init_loopback_cluster
    from bigray.train.trainer import train

    init_loopback_cluster(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepared = prepare(load_config(overrides=[*PREPARE, f"data.output={work}/data", f"data.seq_len={args.seq_len}"]))
    manifest = prepared.manifest

    out = train(load_config(overrides=[f"data.output={work}/data", f"train.storage_path={work}/runs",
                                       "train.run_name=bench", *train_overrides]))
    records = out.records
    # step_time_s is the mean step time of each logged interval (read before eval and checkpoint).
    steady = [(r["step"] - p["step"], r["step_time_s"]) for p, r in zip(records, records[1:])]
    bigray_sps = sum(n for n, _ in steady) / sum(n * dt for n, dt in steady)
    ray.shutdown()

    rows = np.concatenate([np.stack(pq.read_table(f"{work}/data/{s['path']}")["tokens"].to_numpy(zero_copy_only=False))
                           for s in manifest["splits"]["train"]["shards"]]).astype(np.int64)
    result_file = os.path.join(work, "bare.json")
    import torch.multiprocessing as mp

    mp.spawn(bare_worker, args=(args.workers, train_overrides, rows, args.log_every, result_file), nprocs=args.workers,
             join=True)
    with open(result_file) as f:
        bare_sps = json.load(f)["steps_per_s"]
    print(f"\ntiny preset, ZeRO-{args.zero}, {args.workers} workers, micro batch {args.micro_batch}, "
          f"seq_len {args.seq_len}, "
          f"{args.steps} steps ({len(steady)} timed intervals)")
    print(f"bigray train: {bigray_sps:.2f} steps/s | bare DeepSpeed loop: {bare_sps:.2f} steps/s")
    print(f"ratio bigray / bare: {bigray_sps / bare_sps:.2f}x")


if __name__ == "__main__":
    main()
