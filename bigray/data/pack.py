"""Splitting, packing and shard writing: small pure functions over numpy token arrays.

A partition's documents (in input order) form one EOS-joined stream per split, cut into rows of
seq_len + 1 ids. Rows are written as parquet shards whose row groups each hold `block_rows` rows:
a block is one row group, fetched by one ranged read of its column chunk (offset, length).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_MIX1, _MIX2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
BLOCK_BYTES = 4 << 20


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: decorrelates content hashes from the seed, vectorised."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def unit_draw(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per document, fixed by its content hash and the seed."""
    return (splitmix64(hashes ^ np.uint64(seed)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_val(hashes: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """Split by document content, so the split of a document never depends on batch or file order."""
    return unit_draw(hashes, seed) < val_fraction


def partition_of(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """The partition owning each content hash: equal documents always meet in one partition."""
    # The top bits: the low bits already pick the split (via splitmix64) and must stay independent.
    return ((hashes >> np.uint64(32)) % np.uint64(partitions)).astype(np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def block_rows_for(seq_len: int, dtype: np.dtype, block_rows: int | None) -> int:
    """Rows per block: `data.block_rows`, else as many as fit ~4 MB of uncompressed tokens."""
    return block_rows or max(1, BLOCK_BYTES // ((seq_len + 1) * dtype.itemsize))


def gather(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """tokens[starts[0]:starts[0]+lengths[0]] + tokens[starts[1]:...] + ..., without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return tokens[:0]
    ends = np.cumsum(lengths)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(ends - lengths, lengths)
    return tokens[np.repeat(starts, lengths) + offsets]


def pack(stream: np.ndarray, row_len: int) -> tuple[np.ndarray, int]:
    """(rows of `row_len` ids, tokens left over); no padding, so only the tail is lost."""
    rows = len(stream) // row_len
    return stream[: rows * row_len].reshape(rows, row_len), len(stream) - rows * row_len


@dataclass(frozen=True)
class Shard:
    """One parquet file's bytes and what the manifest says about it and its blocks."""

    name: str
    data: bytes
    rows: int
    blocks: list[dict]


def shards(rows: np.ndarray, prefix: str, rows_per_shard: int, block_rows: int) -> list[Shard]:
    """`rows` as parquet files `<prefix>-NNN.parquet`, each made of row groups (blocks) of `block_rows` rows.

    `rows_per_shard` is rounded down to whole blocks, so only a file's last block may be short.
    """
    per_shard = max(block_rows, rows_per_shard // block_rows * block_rows)
    out = []
    for k, first in enumerate(range(0, len(rows), per_shard)):
        part = rows[first: first + per_shard]
        name = f"{prefix}-{k:03d}.parquet"
        values = pa.array(part.reshape(-1))
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, part.shape[1])})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=block_rows)
        data = sink.getvalue().to_pybytes()
        out.append(Shard(name, data, len(part), block_ranges(data, name)))
    return out


def block_ranges(data: bytes, name: str) -> list[dict]:
    """Each row group's rows and the byte range of its (only) column chunk: one ranged read fetches a block."""
    meta = pq.read_metadata(pa.BufferReader(data))
    blocks = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        column = group.column(0)
        offset = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
        blocks.append({"id": f"{name.removesuffix('.parquet')}:{g}", "path": name, "row_group": g,
                       "rows": group.num_rows, "offset": offset, "length": column.total_compressed_size})
    return blocks
