"""MFU from device peaks, and rank 0's metrics log: metrics.jsonl, TensorBoard, and what a restart keeps."""

from __future__ import annotations

import os

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
    log.flush_tensorboard()
    assert read_records(run_dir, store) == [{"step": s, "loss": 10.0 / s, "mfu": None} for s in (5, 10, 15)]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run" / "tensorboard"))

    # Restored from the step-10 checkpoint: step 15 will be trained (and logged) again.
    resumed = MetricsLog(run_dir, 10, store)
    resumed.log({"step": 15, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_records(run_dir, store)] == [(5, 2.0), (10, 1.0), (15, 0.5)]
