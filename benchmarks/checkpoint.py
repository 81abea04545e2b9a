"""What checkpointing costs training: the same run with no intermediate checkpoints, SYNC and ASYNC uploads,
and ASYNC with the files written by a background thread (`train.checkpoint_write=background`).

Four `bigray train` runs, identical but for `train.checkpoint_every` / `_upload` / `_write`, with
storage in a local S3 server (moto, loopback), the `125m` preset under ZeRO-2 on 2 CPU workers. Every
run checkpoints at its last step (bigray always does), so the difference of wall times between a run
and the no-checkpoint one is the cost of its intermediate checkpoints as seen by training. Step time is
the mean `step_time_s` of the no-checkpoint run; "waited" is what the training thread spent in the
checkpointer (`checkpoint_s`: the write, or the host copy), the rest of the cost is the writer and
upload threads competing with training for the CPU. Printed side by side from one invocation; the box is
shared, so expect noise of a few seconds in each wall time.

    python benchmarks/checkpoint.py [--steps 24 --every 8 --preset 125m --modes none,sync,async,background]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import tempfile

import pyarrow.fs as pafs

from bigray.config import load_config
from bigray.storage import Store

PREPARE = ["data.inputs=['{stdlib}/json/*.py', '{stdlib}/email/*.py', '{stdlib}/logging/*.py']", "data.format=text",
           "data.vocab_size=512", "data.val_fraction=0.05"]
RUNS = "s3://bigray-bench-ckpt/runs"


def moto_server():
    """A moto S3 server on a free loopback port; AWS_* env points bigray (and pyarrow) at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fs, path = Store().filesystem(RUNS)
    fs.create_dir(path.split("/")[0])  # the bucket
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=8, help="checkpoint_every of the SYNC and ASYNC runs")
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--modes", default="none,sync,async,background", help="none is needed: the baseline")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = tempfile.mkdtemp(prefix="bigray-bench-ckpt-")
    server = moto_server()

    import ray
    import ray.data

    from bigray.data import prepare
    from bigray.ray_compat import init_loopback_cluster
    from bigray.train.trainer import train

    init_loopback_cluster(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepare(load_config(overrides=[*PREPARE, f"data.output={work}/data", f"data.seq_len={args.seq_len}"]))
    common = [f"data.output={work}/data", f"train.storage_path={RUNS}", f"model.preset={args.preset}",
              "train.num_workers=2", "train.zero_stage=2", "train.precision=fp32",
              f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}", "train.log_every=1",
              f"train.eval_every={args.steps}", "train.warmup_steps=2", "train.keep_checkpoints=1",
              "train.export=false"]
    every = f"train.checkpoint_every={args.every}"
    modes = {"none": [f"train.checkpoint_every={args.steps}"],
             "sync": [every, "train.checkpoint_upload=sync"],
             "async": [every, "train.checkpoint_upload=async"],
             "background": [every, "train.checkpoint_upload=async", "train.checkpoint_write=background"]}
    modes = {mode: modes[mode] for mode in args.modes.split(",")}
    walls, waits, step_time = {}, {}, None
    for mode, overrides in modes.items():
        out = train(load_config(overrides=[*common, f"train.run_name={mode}", *overrides]))
        walls[mode] = out.wall_s
        # What the training thread waited for intermediate checkpoints (the last step's is in every run).
        waits[mode] = sum(r.get("checkpoint_s", 0) for r in out.records if r["step"] < args.steps)
        if mode == "none":
            timed = out.records[1:]  # the first step carries warm-up
            step_time = sum(r["step_time_s"] for r in timed) / len(timed)
    ray.shutdown()
    fs, path = Store().filesystem(f"{RUNS}/{list(modes)[-1]}")
    size = sum(i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if i.type == pafs.FileType.File and "/checkpoint_" in i.path)
    server.stop()

    n = (args.steps - 1) // args.every  # intermediate checkpoints (the last step's is in every run)
    print(f"\n{args.preset} preset, ZeRO-2, 2 CPU workers, fp32, micro batch {args.micro_batch}, "
          f"seq_len {args.seq_len}, {args.steps} steps, checkpoint every {args.every} ({n} intermediate, "
          f"{size / 2**20:.0f} MiB each) to local moto S3; shared noisy box")
    print(f"step time (no checkpoints): {step_time:.2f} s")
    for mode in modes:
        extra = walls[mode] - walls["none"]
        per = f" | +{extra / n:.1f} s per checkpoint, +{100 * extra / (args.steps * step_time):.1f}% on the run's " \
            f"step time; the step waited {waits[mode] / n:.1f} s of it" if mode != "none" else ""
        print(f"{mode:>10}: wall {walls[mode]:.1f} s, {args.steps / walls[mode]:.3f} steps/s (incl. start-up){per}")


if __name__ == "__main__":
    main()
