"""Throughput, MFU and memory; metrics.jsonl + TensorBoard in the run dir; loss.png at the end."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Callable

from bigray.storage import Store, join

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s; matched by substring of the device name, first hit wins.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L4", 121e12),
    ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_FLOPS if key in device_name), None)


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's dense peak."""
    return tokens_per_s_per_device * flops_per_token / peak if peak else None


def memory_gb() -> float:
    """Peak GPU memory allocated, or this process's resident memory on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MetricsLog:
    """Rank 0's log: one JSON object per logged step, mirrored to `<run>/metrics.jsonl` and TensorBoard.

    After a restart it continues the existing file, dropping records past the resumed step so
    replayed steps are not logged twice.

    NOTE: the mirror writes to storage in a thread, never on the training thread: object stores have no append, so
    every write puts the whole file, and a PUT queued behind a checkpoint's upload to the same endpoint held a step
    for ~9 s (benchmarks/checkpoint.py, 125m on moto, 2026-12-04). Writes coalesce (the newest body wins); a failed
    one is logged and retried with the next record; `close()` writes both files once more and raises on failure.
    A record logged just before a worker died may be missing after the restart (its write was still in flight).
    """

    def __init__(self, run_dir: str, resume_step: int, store: Store):
        self.uri = join(run_dir, "metrics.jsonl")
        self.run_dir, self.store = run_dir, store
        self.records: list[dict] = []
        if resume_step and store.exists(self.uri):
            lines = store.read_text(self.uri).splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= resume_step]
        self.lines = [json.dumps(r) + "\n" for r in self.records]
        self.tb_dir = tempfile.mkdtemp(prefix="bigray-tb-")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(self.tb_dir)
        self.mirror = Mirror()

    def log(self, record: dict) -> None:
        self.records.append(record)
        self.lines.append(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])
        n = len(self.lines)
        self.mirror.submit("metrics.jsonl", lambda: self._write_jsonl(n))

    def flush_tensorboard(self) -> None:
        """Queue a copy of the TensorBoard dir to the run dir (returns at once)."""
        self.tb.flush()
        self.mirror.submit("tensorboard", self._copy_tensorboard)

    def close(self) -> None:
        """Let the mirror finish, then write both files once more on this thread (raises if storage fails)."""
        self.mirror.close()
        self.tb.flush()
        self._write_jsonl(len(self.lines))
        self._copy_tensorboard()

    def _write_jsonl(self, n: int) -> None:
        self.store.write_bytes(self.uri, "".join(self.lines[:n]).encode())

    def _copy_tensorboard(self) -> None:
        self.store.copy_dir(self.tb_dir, join(self.run_dir, "tensorboard"))


class Mirror:
    """One daemon thread that runs the newest job of each kind: a job submitted while an older one of its kind
    waits replaces it, so a slow store costs skipped intermediate writes, never a wait on the caller's thread."""

    def __init__(self):
        self.pending: dict[str, Callable[[], None]] = {}
        self.failed: set[str] = set()
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="bigray-metrics-mirror", daemon=True)
        self.thread.start()

    def submit(self, kind: str, job: Callable[[], None]) -> None:
        with self.cond:
            self.pending[kind] = job
            self.cond.notify()

    def close(self) -> None:
        """Run what is pending, then stop the thread."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if not self.pending:
                    return
                kind, job = self.pending.popitem()
            try:
                job()
                self.failed.discard(kind)
            except Exception as exc:  # noqa: BLE001 - retried by the next submit; close() writes and raises
                if kind not in self.failed:
                    log.warning("writing %s to storage failed (%s: %s); retried with the next record", kind,
                                type(exc).__name__, exc)
                self.failed.add(kind)


def read_records(run_dir: str, store: Store) -> list[dict]:
    """The run's metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in store.read_text(join(run_dir, "metrics.jsonl")).splitlines() if line]


def plot(records: list[dict], out_uri: str, store: Store) -> None:
    """loss.png: train and val loss, learning rate and tokens/s against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    axes[2].set(title="tokens/s (global)", xlabel="step")
    write_figure(fig, out_uri, store)


def write_figure(fig, out_uri: str, store: Store) -> None:
    """Save a matplotlib figure as PNG to a local path or s3:// URI, and close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    store.write_bytes(out_uri, buf.getvalue())
