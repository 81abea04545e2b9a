"""Packing: one EOS-joined token stream per split, cut into rows of seq_len + 1 ids, written as shards."""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_MIX1, _MIX2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


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


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Packs one split's token stream into rows and writes `<split>-NNNNN.parquet` shards of `rows_per_shard` rows."""

    def __init__(
        self, fs: pafs.FileSystem, out_dir: str, split: str, seq_len: int, dtype: np.dtype, rows_per_shard: int
    ):
        self.fs, self.out_dir, self.split = fs, out_dir, split
        self.row_len, self.dtype, self.rows_per_shard = seq_len + 1, dtype, rows_per_shard
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.tail = 0
        self.type = pa.list_(pa.from_numpy_dtype(dtype), self.row_len)

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens.astype(self.dtype, copy=False))
        self.pending_tokens += len(tokens)
        while self.pending_tokens >= self.rows_per_shard * self.row_len:
            self._flush(self.rows_per_shard)

    def close(self) -> dict:
        """Write the last (smaller) shard; tokens short of a full row are dropped (no padding)."""
        rows = self.pending_tokens // self.row_len
        if rows:
            self._flush(rows)
        self.tail = self.pending_tokens
        rows = sum(s["rows"] for s in self.shards)
        return {"shards": self.shards, "rows": rows, "tokens": rows * self.row_len}

    def _flush(self, rows: int) -> None:
        stream = np.concatenate(self.pending)
        take = rows * self.row_len
        self.pending, self.pending_tokens = [stream[take:]], len(stream) - take
        values = pa.array(stream[:take])
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, self.row_len)})
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        path = posixpath.join(self.out_dir, name)
        # Row groups of ~4 MB are the unit Ray Data streams, so readers never hold a whole shard.
        group = max(1, min(rows, (4 << 20) // (self.row_len * self.dtype.itemsize)))
        pq.write_table(table, path, filesystem=self.fs, compression="zstd", row_group_size=group)
        self.shards.append({"path": name, "rows": rows, "bytes": self.fs.get_file_info(path).size})
