"""The training data order: a seeded, replayable global order of packed rows.

Every worker streams the same split through Ray Data in the same (preserved) order, shuffles each
window of `shuffle_window` rows with an RNG seeded by (seed, epoch, window), cuts the result into
global batches of `world * micro_batch * grad_accum` rows, and takes its own slice of each. So
global batch `k` of epoch `e` is a pure function of (seed, e, k): resuming at step `s` means
skipping `s mod steps_per_epoch` global batches of epoch `s div steps_per_epoch`, and no row is
repeated or skipped within an epoch whatever the failures. The last partial global batch of an
epoch is dropped. Reading is replicated (each worker decodes every row); token data is ~2 bytes
per token, small next to the model's work.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def table_rows(table) -> np.ndarray:
    """A pyarrow table with a fixed_size_list `tokens` column as an (n, seq_len + 1) array."""
    column = table.column("tokens").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def shuffled_rows(tables, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Windows of rows, each permuted by an RNG seeded with (seed, epoch, window index)."""
    for i, table in enumerate(tables):
        rows = table_rows(table)
        yield rows[np.random.default_rng([seed, epoch, i]).permutation(len(rows))]


def global_batches(chunks, rows_per_batch: int, skip: int = 0) -> Iterator[np.ndarray]:
    """Re-chunk a stream of row arrays into global batches of exactly `rows_per_batch` rows."""
    pending, count, index = [], 0, 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk)
        while count >= rows_per_batch:
            rows = np.concatenate(pending)
            batch, rest = rows[:rows_per_batch], rows[rows_per_batch:]
            pending, count = [rest], len(rest)
            if index >= skip:
                yield batch
            index += 1


def micro_slice(batch: np.ndarray, micro_step: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
    """This rank's rows of one micro step of a global batch."""
    start = (micro_step * world + rank) * micro_batch
    return batch[start : start + micro_batch]


def epoch_batches(iterator, window: int, seed: int, epoch: int, rows_per_batch: int,
                  skip: int = 0) -> Iterator[np.ndarray]:
    """Global batches of one epoch from a Ray Data iterator (`get_dataset_shard`)."""
    tables = iterator.iter_batches(batch_size=window, batch_format="pyarrow", prefetch_batches=2)
    return global_batches(shuffled_rows(tables, seed, epoch), rows_per_batch, skip)


def train_batches(iterator, window: int, seed: int, rows_per_batch: int, steps_per_epoch: int, start_step: int,
                  max_steps: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(step, epoch, global batch) for steps start_step + 1 .. max_steps, epoch after epoch.

    Resuming at `start_step` skips the global batches its epoch already consumed, so the run sees the
    very batches an uninterrupted one would.
    """
    step = start_step
    epoch, skip = divmod(step, steps_per_epoch)
    while step < max_steps:
        for batch in epoch_batches(iterator, window, seed, epoch, rows_per_batch, skip):
            step += 1
            yield step, epoch, batch
            if step >= max_steps:
                return
        epoch, skip = epoch + 1, 0
