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
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Rows:
    """This rank's rows of one global batch, in micro-step order (micro step m is rows[m * micro : (m + 1) * micro]).

    `tokens` (rows, seq_len + 1) token ids; `loss_mask` (same shape, uint8, 1 = the token is a training target) and
    `segment_ids` (same shape, int32, the document a token belongs to within its row) where the shards have them
    (SFT data), else None; `row_ids` (rows,) int64 global row ids in the split (block start + row offset).
    """

    tokens: np.ndarray
    loss_mask: np.ndarray | None = None
    segment_ids: np.ndarray | None = None
    row_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: slice) -> Rows:
        return self.slice(index.start or 0, len(self) if index.stop is None else index.stop)

    def slice(self, start: int, stop: int) -> Rows:
        """Rows start .. stop - 1 (views, no copy)."""
        return replace(self, tokens=self.tokens[start:stop], row_ids=self.row_ids[start:stop],
                       loss_mask=None if self.loss_mask is None else self.loss_mask[start:stop],
                       segment_ids=None if self.segment_ids is None else self.segment_ids[start:stop])


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


def micro_slice(rows: Rows, micro_step: int, micro_batch: int) -> Rows:
    """The rows of one micro step of this rank's share of a global batch."""
    return rows.slice(micro_step * micro_batch, (micro_step + 1) * micro_batch)


def rank_share(batch: np.ndarray, first_row: int, rank: int, world: int, micro_batch: int) -> Rows:
    """This rank's rows of a global batch (micro step m: rows (m * world + rank) * micro_batch + ...), as Rows."""
    per_micro = world * micro_batch
    index = np.concatenate([np.arange(m * per_micro + rank * micro_batch, m * per_micro + (rank + 1) * micro_batch)
                            for m in range(len(batch) // per_micro)])
    return Rows(tokens=batch[index], row_ids=first_row + index)


def epoch_batches(iterator, window: int, seed: int, epoch: int, rows_per_batch: int,
                  skip: int = 0) -> Iterator[np.ndarray]:
    """Global batches of one epoch from a Ray Data iterator (`get_dataset_shard`)."""
    tables = iterator.iter_batches(batch_size=window, batch_format="pyarrow", prefetch_batches=2)
    return global_batches(shuffled_rows(tables, seed, epoch), rows_per_batch, skip)


def train_batches(iterator, window: int, seed: int, rows_per_batch: int, steps_per_epoch: int, start_step: int,
                  max_steps: int, rank: int = 0, world: int = 1, micro_batch: int | None = None
                  ) -> Iterator[tuple[int, int, Rows]]:
    """(step, epoch, this rank's Rows of the global batch) for steps start_step + 1 .. max_steps, epoch after epoch.

    Resuming at `start_step` skips the global batches its epoch already consumed, so the run sees the
    very batches an uninterrupted one would. Row ids here are positions in the epoch's order.
    """
    micro_batch = micro_batch or rows_per_batch // world
    step = start_step
    epoch, skip = divmod(step, steps_per_epoch)
    while step < max_steps:
        for k, batch in enumerate(epoch_batches(iterator, window, seed, epoch, rows_per_batch, skip), skip):
            step += 1
            yield step, epoch, rank_share(batch, k * rows_per_batch, rank, world, micro_batch)
            if step >= max_steps:
                return
        epoch, skip = epoch + 1, 0
