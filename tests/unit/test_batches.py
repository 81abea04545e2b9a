"""The data order and its reader on real parquet shards in tmp (no Ray): 1/N reads, batch identity across N and
resumes, no row repeated, a global shuffle, O(1) resume seek."""

from __future__ import annotations

import numpy as np
import pytest

from bigray.data.pack import shards
from bigray.storage import Store
from bigray.train.batches import (
    BlockSource,
    DataOrder,
    ReadCounter,
    Reader,
    Rows,
    auto_partitions,
    consumed,
    micro_slice,
)

ROW_LEN = 9  # seq_len 8


def write_split(root, sizes, block_rows=10, rows_per_shard=40, sft=False) -> list[dict]:
    """Shards as prepare writes them (one file series per write partition, short last blocks), every token of a row
    being its global row id; returns the manifest's blocks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks, start = [], 0
    for q, n in enumerate(sizes):
        rows = np.repeat(np.arange(start, start + n, dtype=np.uint32)[:, None], ROW_LEN, axis=1)
        for shard in shards(rows, f"train-{q:05d}", rows_per_shard, block_rows):
            data = shard.data
            if sft:  # add the SFT columns beside tokens
                table = pq.read_table(pa.BufferReader(data))
                flat = table.column("tokens").combine_chunks().flatten().to_numpy()
                mask = pa.FixedSizeListArray.from_arrays(pa.array((flat % 2).astype(np.uint8)), ROW_LEN)
                seg = pa.FixedSizeListArray.from_arrays(pa.array((flat % 3).astype(np.int32)), ROW_LEN)
                table = table.append_column("loss_mask", mask).append_column("segment_ids", seg)
                pq.write_table(table, str(root / shard.name), row_group_size=block_rows)
            else:
                (root / shard.name).write_bytes(data)
            for block in shard.blocks:
                blocks.append({**block, "start": start})
                start += block["rows"]
    return blocks


SIZES = [97, 120, 83, 110, 64, 131, 90, 105]  # 800 rows, 83 blocks (7 short)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    return root, write_split(root, SIZES)


def reader(split, order, rank, world, columns=("tokens",)):
    root, blocks = split
    return Reader(order, BlockSource(blocks, str(root), Store(), columns, ReadCounter()), rank, world)


def global_batches(split, order, world, start, stop, take=None):
    """Row ids of global batches start+1 .. stop, read by `world` ranks (sorted per batch), and the readers."""
    readers = [reader(split, order, r, world) for r in range(world)]
    per_rank = [list(rd.batches(start, stop)) for rd in readers]
    out = []
    for parts in zip(*per_rank):
        steps = {s for s, _, _ in parts}
        assert len(steps) == 1
        for _, _, rows in parts:  # tokens are the row ids: what was read is what the ids say
            np.testing.assert_array_equal(rows.tokens[:, 0], rows.row_ids)
        out.append(np.sort(np.concatenate([rows.row_ids for _, _, rows in parts])))
    return out, readers


def test_batches_are_the_same_for_1_2_4_workers_and_across_resumes(split):
    order = DataOrder.of(split[1], seed=3, partitions=8, global_batch=16, window=2)
    steps = order.epoch(0).steps + 5  # into the second epoch
    ref, _ = global_batches(split, order, 1, 0, steps)
    assert all(len(b) == 16 for b in ref)
    for world in (2, 4):
        got, _ = global_batches(split, order, world, 0, steps)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True)), world
    for start, world in [(7, 2), (order.epoch(0).steps - 1, 4), (order.epoch(0).steps + 2, 1)]:
        got, _ = global_batches(split, order, world, start, steps)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref[start:], strict=True)), (start, world)
    # The computed order (nothing read) agrees with what the readers yielded.
    assert all(np.array_equal(np.sort(order.row_ids(0, k)), ref[k]) for k in (0, 5, 30))


def test_an_epoch_repeats_no_row_and_drops_less_than_one_block_per_partition(split):
    order = DataOrder.of(split[1], seed=0, partitions=8, global_batch=24, window=3)
    epoch = order.epoch(0)
    seen = np.concatenate(global_batches(split, order, 2, 0, epoch.steps)[0])
    assert len(np.unique(seen)) == len(seen) == epoch.steps * 24, "no row twice within an epoch"
    assert epoch.dropped_rows == sum(SIZES) - len(seen)
    assert epoch.dropped_rows < 8 * 10 + 24, "under one block per partition plus one global batch"
    assert not np.array_equal(order.row_ids(0, 0), order.row_ids(1, 0)), "each epoch has its own order"


def test_each_worker_reads_about_1_over_n_of_the_bytes(split):
    order = DataOrder.of(split[1], seed=1, partitions=8, global_batch=16, window=2)
    steps = order.epoch(0).steps
    _, whole = global_batches(split, order, 1, 0, steps)
    total = whole[0].counter.snapshot()
    # One rank reads each block at most once (the windows only dropped rows fill are never read).
    assert steps * 16 <= total["rows"] <= sum(SIZES) and total["blocks"] <= len(split[1])
    split_bytes = sum(b["length"] for b in split[1])
    block_bytes, block_rows = max(b["length"] for b in split[1]), 10
    for world in (2, 4):
        _, readers = global_batches(split, order, world, 0, steps)
        got = [rd.counter.snapshot() for rd in readers]
        assert sum(g["rows"] for g in got) == total["rows"], "no block read by two ranks"
        for g in got:
            assert g["rows"] <= sum(SIZES) / world + block_rows, (world, g)
            assert g["bytes"] - g["footer_bytes"] <= split_bytes / world + block_bytes, (world, g, split_bytes)


def test_the_first_global_batch_mixes_blocks_from_all_over_the_corpus(split):
    blocks = split[1]
    order = DataOrder.of(blocks, seed=0, partitions=8, global_batch=64, window=2)
    starts = np.array([b["start"] for b in blocks])
    block_of = np.searchsorted(starts, order.row_ids(0, 0), side="right") - 1
    positions = np.unique(block_of) / len(blocks)
    assert len(positions) >= 8, "rows of at least one window per partition"
    assert np.histogram(positions, bins=10, range=(0, 1))[0].max() <= len(positions) // 3, positions
    assert positions.min() < 0.3 and positions.max() > 0.7


def test_a_resume_at_a_late_step_reads_one_window_per_partition_before_the_first_batch(split):
    order = DataOrder.of(split[1], seed=2, partitions=8, global_batch=16, window=2)
    late = order.epoch(0).steps - 3
    rd = reader(split, order, 1, 2)
    next(iter(rd.batches(late, late + 1)))
    read = rd.counter.snapshot()
    assert read["windows"] <= 4 and read["blocks"] <= 4 * 2, read  # 4 partitions owned, 2 blocks a window


def test_sft_columns_are_read_when_the_manifest_lists_them(tmp_path):
    blocks = write_split(tmp_path, [45, 38], sft=True)
    order = DataOrder.of(blocks, seed=0, partitions=2, global_batch=8, window=1)
    rd = reader((tmp_path, blocks), order, 0, 1, columns=("tokens", "loss_mask", "segment_ids"))
    _, _, rows = next(iter(rd.batches(0, 1)))
    assert rows.loss_mask.dtype == np.uint8 and rows.segment_ids.dtype == np.int32
    np.testing.assert_array_equal(rows.loss_mask, rows.tokens % 2)
    np.testing.assert_array_equal(rows.segment_ids, rows.tokens % 3)


def test_partition_arithmetic_and_auto_count():
    # Positions j = p mod P before 10 with P = 4: p=0 -> 0,4,8; p=1 -> 1,5,9; p=2 -> 2,6; p=3 -> 3,7.
    assert list(consumed(np.arange(4), 10, 4)) == [3, 3, 2, 2]
    assert auto_partitions(16) == 4 and auto_partitions(5000) == 240 and auto_partitions(3) == 1
    with pytest.raises(ValueError, match="must divide data_partitions 8"):
        Reader(DataOrder.of([{"rows": 10, "start": 0}], 0, 8, 12, 1), None, 0, 3)


def test_micro_slices_and_rows_slices_keep_the_columns_together():
    tokens = np.arange(24).reshape(8, 3)
    rows = Rows(tokens=tokens, loss_mask=(tokens % 2).astype(np.uint8), row_ids=np.arange(10, 18))
    assert [micro_slice(rows, m, 2).row_ids.tolist() for m in range(4)] == [[10, 11], [12, 13], [14, 15], [16, 17]]
    part = rows[1:3]
    assert len(part) == 2 and part.segment_ids is None
    np.testing.assert_array_equal(part.loss_mask, rows.loss_mask[1:3])


def test_the_driver_refuses_orders_workers_cannot_share_naming_the_key(split):
    from bigray.config import load_config
    from bigray.errors import ConfigError
    from bigray.train.batches import check_data_order, train_order

    manifest = {"version": 2, "splits": {"train": {"blocks": split[1]}}}

    def train(*overrides):
        return load_config(overrides=["train.micro_batch_size=4", *overrides]).train

    assert train_order(train(), manifest).partitions == 16  # auto: 83 blocks, >= 4 per partition
    order = check_data_order(train("train.num_workers=4"), manifest, "m")
    assert order.global_batch == 16 and order.epoch(0).steps > 0
    with pytest.raises(ConfigError, match=r"train.num_workers \(3\) must divide the data partitions \(16, chosen"):
        check_data_order(train("train.num_workers=3"), manifest, "m")
    with pytest.raises(ConfigError, match=r"train.data_partitions \(120\) exceeds the train split's 83 blocks"):
        check_data_order(train("train.data_partitions=120"), manifest, "m")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        check_data_order(train("train.micro_batch_size=1000"), manifest, "m")
