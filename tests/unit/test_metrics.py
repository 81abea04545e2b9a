"""MFU from device peaks, and rank 0's metrics log: metrics.jsonl, TensorBoard, and what a restart keeps."""

from __future__ import annotations

import os
import threading

import pytest

from bigray.storage import Store
from bigray.train.metrics import MetricsLog, mfu, peak_flops, read_records


def test_peak_flops_by_device_name_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None and peak_flops("cpu", 2.0) == 2e12
    assert mfu(1000.0, 6e9, 989e12) == pytest.approx(1000 * 6e9 / 989e12) and mfu(1.0, 6e9, None) is None


def test_a_restarted_run_continues_metrics_jsonl_without_the_replayed_steps(tmp_path):
    store, run_dir = Store(), str(tmp_path / "run")
    log = MetricsLog(run_dir, 0, store)
    for step in (5, 10, 15):
        log.log({"step": step, "loss": 10.0 / step, "mfu": None})
    log.close()
    assert read_records(run_dir, store) == [{"step": s, "loss": 10.0 / s, "mfu": None} for s in (5, 10, 15)]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run" / "tensorboard"))

    # Restored from the step-10 checkpoint: step 15 will be trained (and logged) again.
    resumed = MetricsLog(run_dir, 10, store)
    resumed.log({"step": 15, "loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_records(run_dir, store)] == [(5, 2.0), (10, 1.0), (15, 0.5)]


class SlowStore(Store):
    """Local storage whose writes wait for `opened` (a store busy with a checkpoint upload), or fail while `down`."""

    def __init__(self):
        super().__init__()
        self.opened, self.down, self.writes = threading.Event(), False, 0

    def write_bytes(self, uri, data):
        self.opened.wait()
        if self.down:
            raise OSError("storage unreachable")
        self.writes += 1
        super().write_bytes(uri, data)


def test_a_slow_or_failing_store_never_holds_the_training_thread(tmp_path):
    store, run_dir = SlowStore(), str(tmp_path / "run")
    log = MetricsLog(run_dir, 0, store)

    def train():
        for step in range(1, 51):
            log.log({"step": step, "loss": 1.0 / step})
        log.flush_tensorboard()

    # Every write waits for `opened`: logging must get through all 50 steps before it is set.
    steps = threading.Thread(target=train)
    steps.start()
    steps.join(timeout=120)
    assert not steps.is_alive()
    store.opened.set()
    log.close()
    # Intermediate bodies were skipped while the first write waited; close() wrote the whole file.
    assert store.writes < 10 and [r["step"] for r in read_records(run_dir, store)] == list(range(1, 51))

    store.down = True
    failing = MetricsLog(run_dir, 50, store)
    failing.log({"step": 51, "loss": 0.1})  # the mirror's write fails in its thread: logged, not raised here
    with pytest.raises(OSError, match="unreachable"):
        failing.close()
    assert [r["step"] for r in read_records(run_dir, store)][-1] == 50  # what was written stays
