"""Packing and splitting, each a small pure function."""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bigray.data.pack import ShardWriter, is_val, splitmix64, token_dtype


def test_shard_writer_cuts_rows_across_adds_and_drops_only_the_tail(tmp_path):
    w = ShardWriter(pafs.LocalFileSystem(), str(tmp_path), "train", seq_len=4, dtype=np.dtype(np.uint16),
                    rows_per_shard=3)
    stream = np.arange(38, dtype=np.uint32)
    for chunk in np.split(stream, [1, 2, 9, 20, 21]):
        w.add(chunk)
    split = w.close()
    assert [s["rows"] for s in split["shards"]] == [3, 3, 1] and split["rows"] == 7 and split["tokens"] == 35
    assert w.tail == 3
    tables = [pq.read_table(tmp_path / s["path"]) for s in split["shards"]]
    rows = np.concatenate([np.stack(t["tokens"].to_numpy(zero_copy_only=False)) for t in tables])
    np.testing.assert_array_equal(rows.reshape(-1), stream[:35])


def test_split_draw_is_seeded_uniform_and_order_free():
    hashes = splitmix64(np.arange(100_000, dtype=np.uint64))
    val = is_val(hashes, seed=0, val_fraction=0.1)
    assert 0.09 < val.mean() < 0.11
    np.testing.assert_array_equal(is_val(hashes[::-1], 0, 0.1), val[::-1])
    assert (is_val(hashes, 1, 0.1) != val).any()


def test_token_dtype_is_compact():
    assert token_dtype(50_257) == np.uint16 and token_dtype(65_536) == np.uint16 and token_dtype(128_256) == np.uint32
