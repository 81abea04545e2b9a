"""Which checkpoint `bigray export` picks from a run dir (the committed-only pick on a real run, and the
consolidation itself, run in tests/integration/test_train.py)."""

from __future__ import annotations

import json

import pytest

from bigray.errors import DataError
from bigray.storage import Store
from bigray.train.export import checkpoint_uri, committed_checkpoint


def test_no_run_dir_or_no_ray_record_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such run directory"):
        committed_checkpoint(str(tmp_path / "missing"), Store())
    # Checkpoint dirs alone, even complete-looking ones, are not evidence of a commit: Ray's record is.
    (tmp_path / "checkpoint_2026-01-01_10-00-00").mkdir()
    (tmp_path / "checkpoint_2026-01-01_10-00-00" / "bigray.json").write_text(json.dumps({"step": 20}))
    with pytest.raises(DataError, match="not a Ray Train run dir with checkpoints"):
        committed_checkpoint(str(tmp_path), Store())


def test_checkpoint_uri_keeps_the_run_dirs_scheme():
    class Reported:  # what ray.train.Checkpoint carries: a filesystem path, no scheme
        path = "bucket/runs/r1/checkpoint_2026-01-01_10-00-00.000001/"

    assert checkpoint_uri("s3://bucket/runs/r1", Reported) == "s3://bucket/runs/r1/checkpoint_2026-01-01_10-00-00.000001"
