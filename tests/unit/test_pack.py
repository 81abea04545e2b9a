"""Splitting, packing and block writing, each a small pure function."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bigray.data.pack import (
    block_rows_for,
    gather,
    is_val,
    pack,
    pack_documents,
    partition_of,
    place_documents,
    shards,
    splitmix64,
    stream_segments,
    token_dtype,
)


def read_with_one_range(data: bytes, block: dict) -> pa.Table:
    """The block's row group decoded from its byte range plus the footer, every other byte zeroed."""
    footer = 8 + int.from_bytes(data[-8:-4], "little")
    sparse = bytearray(len(data))
    start, end = block["offset"], block["offset"] + block["length"]
    sparse[start:end] = data[start:end]
    sparse[-footer:] = data[-footer:]
    return pq.ParquetFile(pa.BufferReader(bytes(sparse))).read_row_group(block["row_group"])


def test_gather_concatenates_slices():
    tokens = np.arange(20, dtype=np.uint16)
    got = gather(tokens, np.array([5, 0, 12]), np.array([3, 2, 0]))
    np.testing.assert_array_equal(got, [5, 6, 7, 0, 1])
    assert gather(tokens, np.array([], dtype=np.int64), np.array([], dtype=np.int64)).size == 0


def test_pack_cuts_rows_and_drops_only_the_tail():
    rows, tail = pack(np.arange(38, dtype=np.uint16), 5)
    assert rows.shape == (7, 5) and tail == 3
    np.testing.assert_array_equal(rows.reshape(-1), np.arange(35))


def test_shards_are_whole_blocks_each_readable_from_one_byte_range():
    rows = np.random.default_rng(0).integers(0, 300, size=(1000, 33)).astype(np.uint16)
    written = shards(rows, "train-00003", rows_per_shard=450, block_rows=64)
    # 450 rounds down to 7 blocks of 64 = 448 rows per file
    assert [s.name for s in written] == [f"train-00003-{k:03d}.parquet" for k in range(3)]
    assert [s.rows for s in written] == [448, 448, 104]
    back = []
    for shard in written:
        table = pq.read_table(pa.BufferReader(shard.data))
        assert table.schema.field("tokens").type == pa.list_(pa.uint16(), 33)
        sizes = [b["rows"] for b in shard.blocks]
        assert sizes == [64] * (shard.rows // 64) + ([shard.rows % 64] if shard.rows % 64 else [])
        ids = [b["id"] for b in shard.blocks]
        assert ids == [f"{shard.name.removesuffix('.parquet')}:{g}" for g in range(len(ids))]
        for block in shard.blocks:
            part = read_with_one_range(shard.data, block)
            assert part.equals(pq.ParquetFile(pa.BufferReader(shard.data)).read_row_group(block["row_group"]))
            back.append(np.stack(part["tokens"].to_numpy(zero_copy_only=False)))
    np.testing.assert_array_equal(np.concatenate(back), rows)


def test_block_rows_default_is_about_4_mb():
    assert block_rows_for(1023, np.dtype(np.uint16), None) == 2048
    assert block_rows_for(1023, np.dtype(np.uint16), 100) == 100


def test_split_draw_is_seeded_uniform_and_order_free():
    hashes = splitmix64(np.arange(100_000, dtype=np.uint64))
    val = is_val(hashes, seed=0, val_fraction=0.1)
    assert 0.09 < val.mean() < 0.11
    np.testing.assert_array_equal(is_val(hashes[::-1], 0, 0.1), val[::-1])
    assert (is_val(hashes, 1, 0.1) != val).any()


def test_partitions_are_balanced_and_independent_of_the_split():
    hashes = splitmix64(np.arange(100_000, dtype=np.uint64))
    part = partition_of(hashes, 8)
    counts = np.bincount(part, minlength=8)
    assert counts.min() > 0.9 * 100_000 / 8
    val = is_val(hashes, 0, 0.1)
    for p in range(8):
        assert 0.08 < val[part == p].mean() < 0.12


def test_token_dtype_is_compact():
    assert token_dtype(50_257) == np.uint16 and token_dtype(65_536) == np.uint16 and token_dtype(128_256) == np.uint32


def test_documents_pack_whole_and_in_order_with_padding_of_its_own_segment():
    lengths = np.array([3, 4, 2, 5, 2])
    tokens = np.arange(1, lengths.sum() + 1, dtype=np.uint16)  # 1..16, 0 is the pad id
    mask = (tokens % 2).astype(np.uint8)
    rows, offsets = place_documents(lengths, 8)
    assert rows.tolist() == [0, 0, 1, 1, 2] and offsets.tolist() == [0, 3, 0, 2, 0]
    t, m, seg, pad = pack_documents(tokens, mask, lengths, 8, pad_id=0)
    assert t.shape == m.shape == seg.shape == (3, 8) and m.dtype == np.uint8 and seg.dtype == np.int32
    np.testing.assert_array_equal(t, [[1, 2, 3, 4, 5, 6, 7, 0], [8, 9, 10, 11, 12, 13, 14, 0],
                                      [15, 16, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seg, [[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(m[t != 0], mask)  # each token keeps its own mask bit
    assert not m[t == 0].any() and pad == 24 - 16
    np.testing.assert_array_equal(t[t != 0], tokens)


def test_a_row_filled_exactly_has_no_padding_segment():
    t, m, seg, pad = pack_documents(np.arange(1, 9, dtype=np.uint16), np.ones(8, np.uint8), np.array([5, 3]), 8, 0)
    assert pad == 0 and seg.tolist() == [[0] * 5 + [1] * 3]
    empty = pack_documents(np.zeros(0, np.uint16), np.zeros(0, np.uint8), np.zeros(0, np.int64), 8, 0)
    assert empty[0].shape == (0, 8) and empty[3] == 0


def test_stream_segments_restart_in_each_row():
    lengths = np.array([3, 7, 2, 4])  # stream of 16 tokens, rows of 5: the last token is the tail
    rows, tail = pack(np.arange(16, dtype=np.uint16), 5)
    seg = stream_segments(lengths, len(rows), 5)
    assert tail == 1 and seg.dtype == np.int32
    # doc of each token: 0 0 0 1 1 | 1 1 1 1 1 | 2 2 3 3 3 (| 3)
    np.testing.assert_array_equal(seg, [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])


def test_extra_columns_share_the_block_byte_range():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 300, size=(100, 17)).astype(np.uint16)
    extra = {"loss_mask": rng.integers(0, 2, size=rows.shape).astype(np.uint8),
             "segment_ids": np.sort(rng.integers(0, 4, size=rows.shape), axis=1).astype(np.int32)}
    written = shards(rows, "train-00000", rows_per_shard=64, block_rows=32, extra=extra)
    table = pq.read_table(pa.BufferReader(written[0].data))
    assert table.schema.names == ["tokens", "loss_mask", "segment_ids"]
    assert table.schema.field("loss_mask").type == pa.list_(pa.uint8(), 17)
    assert table.schema.field("segment_ids").type == pa.list_(pa.int32(), 17)
    back = {c: [] for c in table.schema.names}
    for shard in written:
        for block in shard.blocks:
            part = read_with_one_range(shard.data, block)
            for c in back:
                back[c].append(np.stack(part[c].to_numpy(zero_copy_only=False)))
    for c, expected in {"tokens": rows, **extra}.items():
        np.testing.assert_array_equal(np.concatenate(back[c]), expected)


def test_write_task_writes_the_listed_columns(tmp_path):
    """A write task (called in process) for SFT documents and for pretraining with pack_boundaries."""
    from bigray.config import DataConfig
    from bigray.data.prepare import columns_for, write_task
    from bigray.storage import Store

    lengths = np.array([5, 3, 6, 4])
    part = {"pos": np.arange(4, dtype=np.int64)[::-1].copy(), "hash": np.arange(1, 5, dtype=np.uint64) << 40,
            "lengths": lengths[::-1].copy(), "tokens": np.arange(1, 19, dtype=np.uint16),
            "mask": np.tile(np.array([0, 1], dtype=np.uint8), 9)}
    for data, extra in ((DataConfig(task="sft", val_fraction=0), ["loss_mask", "segment_ids"]),
                        (DataConfig(pack_boundaries=True, val_fraction=0), ["segment_ids"])):
        out = tmp_path / data.task
        out.mkdir()
        got = write_task(0, data, Store(), str(out), 8, 100, 4, 1, 0, part)
        table = pq.read_table(out / "train-00000-000.parquet")
        assert table.schema.names == columns_for(data) == ["tokens", *extra]
        tokens = np.stack(table["tokens"].to_numpy(zero_copy_only=False))
        seg = np.stack(table["segment_ids"].to_numpy(zero_copy_only=False))
        # Documents in input order (pos): the part lists them last to first (tokens 1..18 in part order).
        stream = np.concatenate([np.arange(14, 19), np.arange(11, 14), np.arange(5, 11), np.arange(1, 5)])
        if data.task == "sft":
            assert got["splits"]["train"]["pad"] == 3 * 8 - 18 and got["splits"]["train"]["tail"] == 0
            np.testing.assert_array_equal(tokens[tokens != 0], stream)
            assert seg.tolist() == [[0] * 5 + [1] * 3, [0] * 6 + [1] * 2, [0] * 4 + [1] * 4]
            mask = np.stack(table["loss_mask"].to_numpy(zero_copy_only=False))
            np.testing.assert_array_equal(mask[tokens != 0], (stream % 2 == 0).astype(np.uint8))
            assert not mask[tokens == 0].any()
        else:
            assert got["splits"]["train"]["tail"] == 2 and tokens.reshape(-1).tolist() == stream[:16].tolist()
            assert seg.tolist() == [[0] * 5 + [1] * 3, [0] * 6 + [1] * 2]
