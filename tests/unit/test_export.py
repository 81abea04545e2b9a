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


def test_export_memory_counts_fp32_weights_and_the_larger_transient():
    from bigray.train.export import export_memory

    gib = 2**30
    # 8B parameters trained in bf16 under ZeRO-2: the model-states file holds the bf16 module (2 bytes a
    # parameter), as large as the bf16 copy save_pretrained writes: 32 GB fp32 + 16 GB + 1 GiB.
    assert export_memory(8 * 10**9, 16 * 10**9, 2) == 48 * 10**9 + gib
    # ZeRO-3's model-states files are small: the export-dtype copy dominates.
    assert export_memory(10**9, 10**6, 4) == 8 * 10**9 + gib
    # A stage-0/fp32 checkpoint's model states hold the module and its fp32 copy: the file dominates.
    assert export_memory(10**9, 9 * 10**9, 2) == 13 * 10**9 + gib


def test_export_fetches_neither_rng_states_nor_deepspeeds_scripts_nor_the_universal_form():
    from bigray.train.export import export_files

    kept = ["bigray.json", "ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "hf/config.json", "latest", "probe.pt", "tokenizer/tokenizer.json"]
    skipped = ["rng/rank_0.pt", "universal/ds/zero/lm_head.weight/fp32.pt", "universal/latest_universal",
               "zero_to_fp32.py"]
    assert export_files(sorted([*kept, *skipped])) == kept
