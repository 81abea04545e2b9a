"""Splitting, packing and shard writing: small pure functions over numpy token arrays.

Pretraining: a partition's documents (in input order) form one EOS-joined stream per split, cut into
rows of seq_len + 1 ids. SFT: whole documents are packed in input order into rows of seq_len + 1 ids
(a document that does not fit the row's rest opens the next row), the rest of a row is padding.

Columns beside `tokens` (same fixed length per row):
- `loss_mask` (uint8): 1 where tokens[i] is a training target, i.e. the label of position i - 1 (labels are
  tokens[1:]); 0 on prompts and padding. Mask index i refers to token i as a target, never as an input.
- `segment_ids` (int32): the document index of token i within its row, 0, 1, 2, ...; trailing padding is one
  more segment (mask 0). A target counts only when tokens[i - 1] is in the same segment, so a row's and each
  document's first token is never a target.
Rows are written as parquet shards whose row groups each hold `block_rows` rows: a block is one row group,
fetched by one ranged read of its column chunks (offset, length spans all of them).
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


def stream_segments(lengths: np.ndarray, rows: int, row_len: int) -> np.ndarray:
    """segment_ids of `pack`'s rows of the stream of documents of `lengths`: a document cut by a row's end goes on
    as segment 0 of the next row."""
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)[: rows * row_len].reshape(rows, row_len)
    return (doc - doc[:, :1]).astype(np.int32)


def place_documents(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset in row) of each document packed whole and in order; each length must be <= row_len."""
    rows, offsets = np.empty(len(lengths), dtype=np.int64), np.empty(len(lengths), dtype=np.int64)
    row, used = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > row_len:
            row, used = row + 1, 0
        rows[i], offsets[i] = row, used
        used += n
    return rows, offsets


def pack_documents(tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray, row_len: int,
                   pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(tokens, loss_mask, segment_ids, padding tokens) of whole documents packed into rows of `row_len`.

    `tokens` and `mask` are the documents back to back (`lengths` each); padding is `pad_id` with mask 0 and a
    segment of its own.
    """
    if len(lengths) == 0:
        empty = np.zeros((0, row_len), dtype=np.int32)
        return empty.astype(tokens.dtype), empty.astype(np.uint8), empty, 0
    row, offset = place_documents(lengths, row_len)
    n_rows = int(row[-1]) + 1
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    at = np.repeat(row * row_len + offset - starts, lengths) + np.arange(total, dtype=np.int64)
    out_tokens = np.full(n_rows * row_len, pad_id, dtype=tokens.dtype)
    out_tokens[at] = tokens
    out_mask = np.zeros(n_rows * row_len, dtype=np.uint8)
    out_mask[at] = mask
    docs_per_row = np.bincount(row, minlength=n_rows)
    first_doc = np.cumsum(docs_per_row) - docs_per_row
    out_seg = np.repeat(docs_per_row, row_len).astype(np.int32)  # padding: the segment after the row's last document
    out_seg[at] = np.repeat(np.arange(len(lengths)) - first_doc[row], lengths)
    shape = (n_rows, row_len)
    return out_tokens.reshape(shape), out_mask.reshape(shape), out_seg.reshape(shape), n_rows * row_len - total


@dataclass(frozen=True)
class Shard:
    """One parquet file's bytes and what the manifest says about it and its blocks."""

    name: str
    data: bytes
    rows: int
    blocks: list[dict]


def shards(rows: np.ndarray, prefix: str, rows_per_shard: int, block_rows: int,
           extra: dict[str, np.ndarray] | None = None) -> list[Shard]:
    """`rows` as parquet files `<prefix>-NNN.parquet`, each made of row groups (blocks) of `block_rows` rows.

    `extra` columns (loss_mask, segment_ids: same shape as `rows`) are written after `tokens`.
    `rows_per_shard` is rounded down to whole blocks, so only a file's last block may be short.
    """
    per_shard = max(block_rows, rows_per_shard // block_rows * block_rows)
    columns = {"tokens": rows, **(extra or {})}
    out = []
    for k, first in enumerate(range(0, len(rows), per_shard)):
        part = rows[first: first + per_shard]
        name = f"{prefix}-{k:03d}.parquet"
        table = pa.table({c: pa.FixedSizeListArray.from_arrays(pa.array(v[first: first + per_shard].reshape(-1)),
                                                               v.shape[1]) for c, v in columns.items()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=block_rows)
        data = sink.getvalue().to_pybytes()
        out.append(Shard(name, data, len(part), block_ranges(data, name)))
    return out


def block_ranges(data: bytes, name: str) -> list[dict]:
    """Each row group's rows and the byte range of its column chunks: one ranged read fetches a block."""
    meta = pq.read_metadata(pa.BufferReader(data))
    blocks = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        chunks = [group.column(c) for c in range(group.num_columns)]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
        offset = min(starts)
        end = max(s + c.total_compressed_size for s, c in zip(starts, chunks))
        blocks.append({"id": f"{name.removesuffix('.parquet')}:{g}", "path": name, "row_group": g,
                       "rows": group.num_rows, "offset": offset, "length": end - offset})
    return blocks
