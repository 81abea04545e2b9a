"""The replayable data order: window shuffle, global batches, resume skip, per-rank micro slices."""

from __future__ import annotations

import numpy as np

from bigray.train.batches import Rows, global_batches, micro_slice, rank_share, shuffled_rows, train_batches


def test_resume_skips_exactly_the_consumed_batches():
    rows = np.arange(1000 * 5).reshape(1000, 5)
    windows = [rows[i:i + 64] for i in range(0, 1000, 64)]
    full = list(global_batches(iter(windows), 24))
    assert len(full) == 1000 // 24 and all(len(b) == 24 for b in full)
    for k in (0, 1, 17, 41):
        resumed = list(global_batches(iter(windows), 24, skip=k))
        np.testing.assert_array_equal(np.concatenate(resumed or [np.zeros((0, 5))]),
                                      np.concatenate(full[k:]) if full[k:] else np.zeros((0, 5)))


def test_micro_slices_partition_a_global_batch():
    batch = np.arange(2 * 3 * 4)[:, None]  # world 3, micro batch 2, 4 accumulation steps
    shares = [rank_share(batch, 100, r, 3, 2) for r in range(3)]
    seen = np.concatenate([micro_slice(s, m, 2).tokens for m in range(4) for s in shares])
    np.testing.assert_array_equal(np.sort(seen[:, 0]), batch[:, 0])
    np.testing.assert_array_equal(shares[1].row_ids, 100 + shares[1].tokens[:, 0])


def test_rows_slice_keeps_the_columns_together():
    tokens = np.arange(12).reshape(4, 3)
    rows = Rows(tokens=tokens, loss_mask=(tokens % 2).astype(np.uint8), row_ids=np.arange(10, 14))
    part = rows[1:3]
    assert len(part) == 2 and part.segment_ids is None
    np.testing.assert_array_equal(part.tokens, tokens[1:3])
    np.testing.assert_array_equal(part.loss_mask, rows.loss_mask[1:3])
    np.testing.assert_array_equal(part.row_ids, [11, 12])


def test_window_shuffle_is_seeded_and_a_permutation():
    import pyarrow as pa

    rows = np.arange(40, dtype=np.uint16).reshape(10, 4)
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), 4)})
    a = next(shuffled_rows([table], seed=1, epoch=0))
    assert (a == next(shuffled_rows([table], seed=1, epoch=0))).all()
    assert not (a == next(shuffled_rows([table], seed=1, epoch=1))).all()
    np.testing.assert_array_equal(np.sort(a[:, 0]), rows[:, 0])


class Split:
    """A split as Ray Data hands it to a worker: each epoch, the same tables in the same order."""

    def __init__(self, rows: np.ndarray, table_rows: int):
        import pyarrow as pa

        flat = pa.array(rows.ravel())
        self.tables = [pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])})
                       .slice(i, table_rows) for i in range(0, len(rows), table_rows)]

    def iter_batches(self, batch_size, batch_format, prefetch_batches=0):
        return iter(self.tables)


def test_train_batches_cross_epochs_and_resume_mid_epoch_on_the_same_batches():
    rows = np.arange(100 * 3, dtype=np.int64).reshape(100, 3)
    split, per_step = Split(rows, 16), 12
    steps_per_epoch = len(rows) // per_step  # 8: the last partial global batch of an epoch is dropped
    full = list(train_batches(split, 16, 0, per_step, steps_per_epoch, start_step=0, max_steps=20))
    assert [(step, epoch) for step, epoch, _ in full] == [(s, (s - 1) // 8) for s in range(1, 21)]
    epoch0 = np.concatenate([b.tokens for _, e, b in full if e == 0])
    assert len(np.unique(epoch0[:, 0])) == len(epoch0), "no row twice within an epoch"
    assert not np.array_equal(full[0][2].tokens, full[8][2].tokens), "each epoch has its own order"
    for start in (5, 8, 13, 20):
        resumed = list(train_batches(split, 16, 0, per_step, steps_per_epoch, start_step=start, max_steps=20))
        assert [(s, e) for s, e, _ in resumed] == [(s, e) for s, e, _ in full[start:]]
        for (_, _, a), (_, _, b) in zip(resumed, full[start:]):
            np.testing.assert_array_equal(a.tokens, b.tokens)
