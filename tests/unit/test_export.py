"""Which checkpoint `bigray export` picks from a run dir (the consolidation itself runs in the integration tests)."""

from __future__ import annotations

import json

import pytest

from bigray.errors import DataError
from bigray.storage import Store
from bigray.train.export import latest_checkpoint


def test_latest_checkpoint_is_the_highest_step_with_bigray_metadata(tmp_path):
    for name, step in [("checkpoint_2026-01-01_10-00-00", 20), ("checkpoint_2026-01-01_09-00-00", 40),
                       ("checkpoint_2026-01-01_08-00-00", 30)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "bigray.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint_2026-01-01_11-00-00").mkdir()  # no bigray.json: not a bigray checkpoint
    assert latest_checkpoint(str(tmp_path), Store()) == str(tmp_path / "checkpoint_2026-01-01_09-00-00")


def test_no_run_dir_or_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such run directory"):
        latest_checkpoint(str(tmp_path / "missing"), Store())
    with pytest.raises(DataError, match="no bigray checkpoint found"):
        latest_checkpoint(str(tmp_path), Store())
