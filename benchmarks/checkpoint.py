"""What checkpointing costs training: the same run with no intermediate checkpoints, SYNC and ASYNC uploads,
and ASYNC with the files written by a background thread (`train.checkpoint_write=background`).

`bigray train` runs identical but for `train.checkpoint_every` / `_upload` / `_write`, the `125m` preset under
ZeRO-2 in fp32, with storage in a local S3 server (moto, loopback), in two regimes side by side:

- `--workers 2`: 2 CPU workers on the 2-core box, every core busy training: whatever a checkpoint costs besides
  the step's own wait (copying, pickling and writing the files, Ray's upload thread) takes CPU from training.
- `--workers 1`: 1 CPU worker (ZeRO-2 on one rank, the same checkpoint bytes), one core left to the checkpoint's
  threads: a GPU node's regime, where training runs on the GPU and the host's cores are idle.

The moto server runs in its own process at nice 19: real S3 spends no CPU of the training node, and the server
here yields its core to training, though it still costs the box some. Every run checkpoints at its last step
(bigray always does), which is kept out of the measure: the loop time is rank 0's wall time from the end of step 1
to the end of the last step (timestamped by a worker setup hook around `train_step`; no start-up, no final
checkpoint), so it holds every intermediate checkpoint's wait, SYNC's upload, and training slowed by the writer
and upload threads. A checkpoint's cost is the difference from the no-checkpoint run's loop time; "waited" is what
the training thread spent in the checkpointer (`checkpoint_s`: the write, or the host copy). The no-checkpoint run
goes first and last (`none`, `none-again`): their difference is the box's noise on the same work. On this box that
drift between runs reached 29-42% (the first run the slowest in both runs of 2026-12-04, the second on an otherwise
quiet box), more than a checkpoint costs, so each run is also measured against itself: "in-run" is its loop less its
own median step times its steps (what the steps slowed around its checkpoints added), less the no-checkpoint runs'
same excess.
`background-nice0` is `background` with the writer thread left at nice 0 (the hook undoes `yield_cpu`).
"S3 cpu" is the moto server's CPU seconds over the whole run (every checkpoint, the final one included, and the
data reads): a cost of this box's stand-in for S3 that a real training node does not pay (moto spent 26 s of CPU
receiving 1.3 GB from pyarrow here, the client 5 s), so `--every` has to leave the spare core time to absorb it,
as a real checkpoint interval (minutes) leaves the upload time.
Ray starts its worker processes at nice 15 (`RAY_worker_niceness`) so that its daemons come first; beside moto at
nice 19 a training worker at nice 15 gets only ~70% of a core they share (CFS weights 36 : 15). `--worker-niceness 0`
gives it ~98.5% of such a core; measured 2026-12-03 22:37 UTC it did not lower the cost (see the README), so the
default stays Ray's own.

`--pin` (1 worker): the training thread alone on the last core, every other thread and process of the benchmark (the
driver, moto, Ray's daemons, the worker's upload and writer threads) on the others, as on a GPU node where training
runs on the device and the host's cores serve the rest: what a checkpoint then still costs is not the two sharing
a core.

Choose `--steps` to leave about half an interval or more after the last intermediate checkpoint (e.g. `--steps 100
--every 40`), or that checkpoint's upload runs past the measured loop and its cost goes unseen (the benchmark warns).

    python benchmarks/checkpoint.py [--workers 2,1 --steps 20 --every 5 --modes none,sync,async,background]
                                    [--steps-log steps.jsonl] [--pin]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import import_patches
import pyarrow.fs as pafs
from import_patches import patch_on_import

from bigray.config import load_config
from bigray.storage import Store

PREPARE = ["data.inputs=['{stdlib}/json/*.py', '{stdlib}/email/*.py', '{stdlib}/logging/*.py']", "data.format=text",
           "data.vocab_size=512", "data.val_fraction=0.05"]
RUNS = "s3://bigray-bench-ckpt/runs"
MODES = {"none": [], "sync": ["train.checkpoint_upload=sync"], "async": ["train.checkpoint_upload=async"],
         "background": ["train.checkpoint_upload=async", "train.checkpoint_write=background"],
         "background-nice0": ["train.checkpoint_upload=async", "train.checkpoint_write=background"]}


def moto_server() -> subprocess.Popen:
    """A moto S3 server in its own process at nice 19 on a free loopback port; AWS_* env points bigray at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(19))
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fs, path = Store().filesystem(RUNS)
    fs.create_dir(path.split("/")[0])  # the bucket
    return server


def step_clock(log_path: str, pin_core: int | None = None):
    """A worker_process_setup_hook (benchmark-only): rank 0 appends (run, time) to `log_path` at the end of every
    `train_step`; in a run named `*-nice0` the checkpoint writer thread keeps nice 0. With `pin_core`, rank 0's
    training thread moves to that core at every step and the process's other threads off it (threads the
    training thread starts, Ray's upload pool among them, would otherwise inherit its core)."""

    def hook():
        import json
        import os
        import threading
        import time

        def run_name() -> str:
            import ray.train

            return ray.train.get_context().get_experiment_name()

        def patch_loop(module):
            step = module.train_step
            pinned: set[int] = set()

            def train_step(engine, rows, run):
                import torch

                if pin_core is not None and run.rank == 0:
                    # Only threads not seen before: one listing per step, no syscall per known thread.
                    rest = set(range(os.cpu_count())) - {pin_core}
                    for tid in set(map(int, os.listdir("/proc/self/task"))) - pinned:
                        try:
                            os.sched_setaffinity(tid, {pin_core} if tid == threading.get_native_id() else rest)
                        except OSError:  # exited since listed
                            pass
                        pinned.add(tid)
                out = step(engine, rows, run)
                if run.rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"run": run_name(), "t": time.time(), "threads": torch.get_num_threads(),
                                            "nice": os.nice(0)}) + "\n")
                return out

            module.train_step = train_step

        def patch_writer(module):
            try:  # imported by the training thread at a Train run's first checkpoint
                nice0 = run_name().endswith("-nice0")
            except Exception:  # noqa: BLE001 - not in a Train worker
                nice0 = False
            if nice0:
                module.yield_cpu = lambda: None

        patches = {"bigray.train.loop": patch_loop, "bigray.train.checkpoint_writer": patch_writer}

        patch_on_import(patches)

    return hook


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loop_seconds(log_path: str, run: str) -> tuple[float, float, str]:
    """Rank 0's wall time from the end of the run's first step to the end of its last, its median step, and its
    threads and nice."""
    with open(log_path) as f:
        marks = [m for m in map(json.loads, f) if m["run"] == run]
    steps = sorted(b["t"] - a["t"] for a, b in zip(marks, marks[1:]))
    return (marks[-1]["t"] - marks[0]["t"], steps[len(steps) // 2],
            f"{marks[-1]['threads']} torch thread(s) at nice {marks[-1]['nice']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="2,1", help="training workers of each regime, measured in turn")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="checkpoint_every of the runs that checkpoint")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--modes", default="sync,async,background", help=f"of {', '.join(MODES)} (none: always)")
    parser.add_argument("--worker-niceness", type=int, default=15,
                        help="RAY_worker_niceness of the local Ray (15: Ray's default; see the docstring)")
    parser.add_argument("--steps-log", help="keep rank 0's per-step timestamps (jsonl) at this path")
    parser.add_argument("--pin", action="store_true", help="1 worker: its training thread alone on the last core")
    args = parser.parse_args()
    if args.pin and (args.workers != "1" or (os.cpu_count() or 1) < 2):
        parser.error("--pin needs --workers 1 and at least 2 cores")
    if args.steps - (args.steps - 1) // args.every * args.every < args.every // 2:
        # The loop's clock stops at the last step: an upload still running then is left out of the measure.
        print(f"warning: --steps {args.steps} leaves less than half an interval after the last intermediate "
              f"checkpoint; its upload's cost may fall outside the measured loop", file=sys.stderr)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    work = tempfile.mkdtemp(prefix="bigray-bench-ckpt-")
    if args.pin:  # the processes and threads started from here on (moto, Ray) inherit the other cores
        for tid in map(int, os.listdir("/proc/self/task")):
            os.sched_setaffinity(tid, set(range(os.cpu_count())) - {os.cpu_count() - 1})
    server = moto_server()
    try:
        tables, size = measure(args, work, server.pid)
    finally:
        import ray

        ray.shutdown()
        server.terminate()
        server.wait()
        if args.steps_log and os.path.exists(os.path.join(work, "steps.jsonl")):
            shutil.copy(os.path.join(work, "steps.jsonl"), args.steps_log)
        shutil.rmtree(work, ignore_errors=True)
    n = (args.steps - 1) // args.every
    print(f"\n{args.preset} preset, ZeRO-2, fp32, micro batch {args.micro_batch}, seq_len {args.seq_len}, "
          f"{args.steps} steps, log every {args.log_every}, checkpoint every {args.every} ({n} intermediate, "
          f"{size / 2**20:.0f} MiB each) to local moto S3 (own process, nice 19); shared noisy 2-core box"
          + ("; training thread pinned alone to the last core" if args.pin else ""))
    print("\n\n".join(tables))


def measure(args, work: str, server_pid: int) -> tuple[list[str], int]:
    """Each regime's runs in turn; returns a table per regime and the bytes of one checkpoint."""
    import ray.data

    from bigray.data import prepare
    from bigray.ray_compat import init_loopback_cluster
    from bigray.train.trainer import train

    clock = os.path.join(work, "steps.jsonl")
    # The hook runs in Ray's workers, where benchmarks/ is not importable: patch_on_import goes inside it.
    ray.cloudpickle.register_pickle_by_value(import_patches)
    init_loopback_cluster(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                          runtime_env={"worker_process_setup_hook": step_clock(
                              clock, os.cpu_count() - 1 if args.pin else None)})
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepare(load_config(overrides=[*PREPARE, f"data.output={work}/data", f"data.seq_len={args.seq_len}"]))
    modes = ["none", *[m for m in args.modes.split(",") if m != "none"], "none-again"]
    n = (args.steps - 1) // args.every  # intermediate checkpoints (the last step's is in every run)
    tables, size = [], 0
    for workers in map(int, args.workers.split(",")):
        common = [f"data.output={work}/data", f"train.storage_path={RUNS}", f"model.preset={args.preset}",
                  f"train.num_workers={workers}", "train.zero_stage=2", "train.precision=fp32",
                  f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}",
                  f"train.log_every={args.log_every}", f"train.eval_every={args.steps}", "train.warmup_steps=2",
                  "train.keep_checkpoints=1", "train.export=false"]
        loops, medians, walls, waits, s3_cpu, threads = {}, {}, {}, {}, {}, ""
        started = time.strftime("%H:%M", time.gmtime())
        for mode in modes:
            every = args.steps if mode.startswith("none") else args.every
            name = f"w{workers}-{mode}"
            server_cpu = cpu_seconds(server_pid)
            out = train(load_config(overrides=[*common, f"train.run_name={name}", f"train.checkpoint_every={every}",
                                               *MODES[mode.removesuffix("-again")]]))
            (loops[mode], medians[mode], threads), walls[mode] = loop_seconds(clock, name), out.wall_s
            s3_cpu[mode] = cpu_seconds(server_pid) - server_cpu
            # What the training thread waited for intermediate checkpoints (the last step's is in every run).
            waits[mode] = sum(r.get("checkpoint_s", 0) for r in out.records if r["step"] < args.steps)
        fs, path = Store().filesystem(f"{RUNS}/w{workers}-{modes[1]}")
        size = sum(i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File and "/checkpoint_" in i.path)
        tables.append(table(workers, threads, modes, loops, medians, walls, waits, s3_cpu, args, n, started))
    return tables, size


def table(workers: int, threads: str, modes: list[str], loops: dict, medians: dict, walls: dict, waits: dict,
          s3_cpu: dict, args, n: int, started: str) -> str:
    """Two measures of a checkpoint's cost: against the no-checkpoint runs' loops ("vs none", "per ckpt"), which
    the box's drift between runs blurs, and within the run ("in-run"): its loop less its own median step times the
    steps, which is what the slower steps around the checkpoints added (a checkpoint slows a few steps of an
    interval, so the median is a step untouched by it), less the same excess of the no-checkpoint runs (jitter);
    "in-run %" is that per checkpoint over an interval of median steps, the issue's "% of step time"."""
    base = (loops["none"] + loops["none-again"]) / 2
    excess = {mode: loops[mode] - medians[mode] * (args.steps - 1) for mode in modes}
    jitter = (excess["none"] + excess["none-again"]) / 2
    step = base / (args.steps - 1)
    lines = [f"{workers} worker(s) of {threads}, started {started} UTC: step {step:.2f} s without "
             f"checkpoints (loop {loops['none']:.1f} s first, {loops['none-again']:.1f} s last: noise "
             f"{100 * abs(loops['none'] - loops['none-again']) / base:.1f}%)",
             f"  {'mode':<17}{'loop s':>8}{'wall s':>8}{'vs none':>9}{'per ckpt':>10}{'median':>8}{'in-run':>9}"
             f"{'in-run %':>9}{'waited':>8}{'S3 cpu':>8}"]
    for mode in modes:
        extra, own = loops[mode] - base, excess[mode] - jitter
        lines.append(f"  {mode:<17}{loops[mode]:>8.1f}{walls[mode]:>8.1f}{100 * extra / base:>+8.1f}%"
                     f"{extra / n:>+9.2f}s{medians[mode]:>7.2f}s{own / n:>+8.2f}s"
                     f"{100 * own / n / (medians[mode] * args.every):>+8.1f}%{waits[mode] / n:>7.2f}s"
                     f"{s3_cpu[mode]:>7.1f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
