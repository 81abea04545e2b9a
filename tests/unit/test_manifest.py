"""Reading manifests: version 2 with blocks, version 1 still loads, anything else fails saying what to do."""

from __future__ import annotations

import json

import pytest

from bigray.data.manifest import blocks, read_manifest
from bigray.errors import DataError
from bigray.storage import Store

V1 = {"version": 1, "seq_len": 8, "dtype": "uint16", "splits": {"train": {"shards": [{"path": "train-00000.parquet",
      "rows": 3, "bytes": 10}], "rows": 3, "tokens": 27}}}


def test_v1_loads_for_shard_readers_and_says_to_re_run_for_blocks(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(V1))
    manifest, root = read_manifest(str(tmp_path), Store())
    assert root == str(tmp_path) and manifest["splits"]["train"]["shards"][0]["rows"] == 3
    with pytest.raises(DataError, match=r"re-run `bigray prepare`"):
        blocks(manifest, "train")


def test_v2_blocks_and_unknown_versions(tmp_path):
    v2 = {**V1, "version": 2}
    v2["splits"]["train"]["blocks"] = [{"id": "train-00000-000:0", "rows": 3}]
    (tmp_path / "manifest.json").write_text(json.dumps(v2))
    assert blocks(read_manifest(str(tmp_path / "manifest.json"), Store())[0], "train")[0]["rows"] == 3
    (tmp_path / "manifest.json").write_text(json.dumps({**V1, "version": 3}))
    with pytest.raises(DataError, match=r"manifest version 3.*re-run `bigray prepare`"):
        read_manifest(str(tmp_path), Store())
    with pytest.raises(DataError, match="no manifest; run `bigray prepare` first"):
        read_manifest(str(tmp_path / "absent"), Store())
