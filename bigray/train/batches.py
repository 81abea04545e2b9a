"""The training data order and its reader: each rank reads 1/N of the blocks, a global shuffle, O(1) resume.

The order is a pure function of the manifest's blocks, `seed`, the partition count P, the global batch size G
and the window W (blocks); never of the number of workers N nor of timing:

- **Epoch e** permutes all blocks of the split with an RNG seeded by (seed, e) and deals the full ones round-robin
  to P partitions: partition p owns full blocks pi_e[p], pi_e[p + P], ...; then each short block (a shard's last)
  goes to the partition with the fewest rows.
- **Windows**: inside a partition, each run of W consecutive blocks is a window whose rows are permuted by an RNG
  seeded by (seed, e, p, w). A partition is the stream of its windows' rows.
- **Validation**: one partition, blocks in manifest order, nothing permuted; each rank reads it whole once
  (it is small) and keeps every N-th row of each val batch (`val_order`).
- **Global batch k** of epoch e is positions kG .. kG + G - 1 of the partitions interleaved row by row: position j is
  row j div P of partition j mod P. With P dividing G that is G/P consecutive rows of every partition.
- **Rank r of N** (N divides P and G) owns partitions p = r mod N, so its rows of batch k are positions
  kG + r + N*t (t < G/N): it reads only its partitions' blocks, about 1/N of the split, and every global batch
  mixes rows of min(G, P) windows from all over the corpus.
- **Epoch length**: partitions differ by at most one block plus the short last blocks of shards; an epoch uses the
  first `min rows` of every partition, i.e. floor(P * min_rows / G) global batches. No row is repeated; the rest
  (`Epoch.dropped_rows`, under P blocks) waits for another epoch's permutation.
- **Resume at step s**: (epoch, batch) from the epochs' lengths, and each partition's row from arithmetic
  (`consumed`): the reader opens only the window each partition is in, no replay. Another N (dividing P, same G)
  gives the very same global batches.

Why not Ray Data: `read_parquet` reads whole files in file order (no chosen row groups in a chosen order), and
splitting a dataset across Train workers (`streaming_split`) hands out blocks by timing. A reader built from public
Ray Data pieces (one dataset per rank per epoch over its block list) would add an executor start per epoch and an
object-store hop per block, for what here is one ranged read per block in a thread pool inside the worker.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow.fs as pafs

from bigray.config import TrainConfig
from bigray.data.manifest import blocks as manifest_blocks
from bigray.errors import ConfigError

log = logging.getLogger(__name__)

# Candidates for the partition count when train.data_partitions is null: highly composite, so many worker counts
# divide them; the largest that leaves every partition at least MIN_BLOCKS_PER_PARTITION blocks is used.
AUTO_PARTITIONS = (240, 120, 60, 48, 24, 16, 12, 8, 4, 2, 1)
MIN_BLOCKS_PER_PARTITION = 4
FOOTER_GUESS = 64 << 10  # bytes read from a file's end to get its parquet footer in one request
OPTIONAL_COLUMNS = ("loss_mask", "segment_ids")  # SFT shards list them in the manifest split's "columns"


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
        """The rows `index` (a slice, e.g. rows[a:b] or rows[r::n]) picks, every column alike (views, no copy)."""
        return replace(self, tokens=self.tokens[index], row_ids=self.row_ids[index],
                       loss_mask=None if self.loss_mask is None else self.loss_mask[index],
                       segment_ids=None if self.segment_ids is None else self.segment_ids[index])

    def slice(self, start: int, stop: int) -> Rows:
        """Rows start .. stop - 1 (views, no copy)."""
        return self[start:stop]


def micro_slice(rows: Rows, micro_step: int, micro_batch: int) -> Rows:
    """The rows of one micro step of this rank's share of a global batch."""
    return rows.slice(micro_step * micro_batch, (micro_step + 1) * micro_batch)


def auto_partitions(n_blocks: int) -> int:
    """The partition count used when train.data_partitions is null: see AUTO_PARTITIONS."""
    return next(p for p in AUTO_PARTITIONS if p == 1 or n_blocks >= p * MIN_BLOCKS_PER_PARTITION)


@dataclass(frozen=True)
class Epoch:
    """One epoch's layout: the blocks of each partition in reading order, and what the epoch yields."""

    index: int
    partition_blocks: list[np.ndarray]  # per partition: indices into DataOrder.block_rows, in order
    partition_rows: np.ndarray  # rows per partition
    steps: int  # global batches
    dropped_rows: int  # rows of the split this epoch does not use


@dataclass(frozen=True, eq=False)
class DataOrder:
    """The global order of a split's rows: a pure function of the blocks and the other fields (see module doc)."""

    block_rows: np.ndarray  # rows of each block, manifest order
    block_start: np.ndarray  # first global row id of each block
    seed: int
    partitions: int  # P
    global_batch: int  # G rows
    window: int  # W blocks
    shuffle: bool = True  # False: blocks in manifest order, windows not permuted (validation)

    @classmethod
    def of(cls, blocks: list[dict], seed: int, partitions: int, global_batch: int, window: int,
           shuffle: bool = True) -> DataOrder:
        return cls(np.array([b["rows"] for b in blocks], dtype=np.int64),
                   np.array([b["start"] for b in blocks], dtype=np.int64), seed, partitions, global_batch, window,
                   shuffle)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs per order, kept with it
    def epoch(self, e: int) -> Epoch:
        n, P = len(self.block_rows), self.partitions
        order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
        full = self.block_rows[order] == self.block_rows.max(initial=0)
        parts = [list(order[full][p::P]) for p in range(P)]
        rows = np.array([self.block_rows[b].sum() for b in parts], dtype=np.int64)
        for b in order[~full]:  # the short last blocks of shards, each to the partition with the fewest rows
            p = int(np.argmin(rows))
            parts[p].append(b)
            rows[p] += self.block_rows[b]
        parts = [np.array(b, dtype=np.int64) for b in parts]
        steps = int(P * rows.min() // self.global_batch)
        return Epoch(e, parts, rows, steps, int(self.block_rows.sum()) - steps * self.global_batch)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, global batch within it) of the batch after `step` consumed batches."""
        e = 0
        while step >= (steps := self.epoch(e).steps):
            if steps == 0:
                raise ValueError("an epoch of this data order has no global batch")
            step, e = step - steps, e + 1
        return e, step

    @functools.lru_cache(maxsize=512)  # noqa: B019
    def windows(self, e: int, p: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(first partition row of each window, plus the total at the end; the blocks of each window)."""
        blocks = self.epoch(e).partition_blocks[p]
        groups = [blocks[i:i + self.window] for i in range(0, len(blocks), self.window)]
        starts = np.concatenate([[0], np.cumsum([self.block_rows[g].sum() for g in groups])]).astype(np.int64)
        return starts, groups

    def window_permutation(self, e: int, p: int, w: int, n: int) -> np.ndarray | None:
        """The row permutation of window w of partition p in epoch e (None: not shuffled)."""
        return np.random.default_rng([self.seed, e, p, w]).permutation(n) if self.shuffle else None

    def window_row_ids(self, e: int, p: int, w: int) -> np.ndarray:
        """Global row ids of window w of partition p, in the order the partition yields them."""
        _, groups = self.windows(e, p)
        ids = np.concatenate([np.arange(self.block_start[b], self.block_start[b] + self.block_rows[b])
                              for b in groups[w]])
        perm = self.window_permutation(e, p, w, len(ids))
        return ids if perm is None else ids[perm]

    def row_ids(self, e: int, k: int) -> np.ndarray:
        """Global row ids of global batch k of epoch e, in position order (computed, nothing read)."""
        j = k * self.global_batch + np.arange(self.global_batch)
        p, i = j % self.partitions, j // self.partitions
        out = np.empty(len(j), dtype=np.int64)
        for q in np.unique(p):
            starts, _ = self.windows(e, int(q))
            mask = p == q
            w = np.searchsorted(starts, i[mask], side="right") - 1
            out[mask] = [self.window_row_ids(e, int(q), int(wi))[ii - starts[wi]] for wi, ii in zip(w, i[mask])]
        return out


def consumed(p: np.ndarray | int, position: int, partitions: int):
    """Rows partition p has given once the interleaved stream reached `position` (positions j = p mod P before it)."""
    return np.maximum(0, (position - p + partitions - 1) // partitions)


@dataclass
class ReadCounter:
    """What a reader fetched: bytes and read requests (parquet footers included, and apart), blocks, rows and windows
    decoded."""

    bytes: int = 0
    footer_bytes: int = 0
    requests: int = 0
    blocks: int = 0
    rows: int = 0
    windows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict:
        with self.lock:
            return {k: getattr(self, k) for k in ("bytes", "footer_bytes", "requests", "blocks", "rows", "windows")}


class _Range(io.RawIOBase):
    """A read-only file over one fetched byte range of a parquet file: pyarrow decodes a row group from it, and any
    read outside the range fails (so a block costs exactly one ranged read)."""

    def __init__(self, size: int, start: int, data: bytes):
        super().__init__()
        self.size, self.start, self.data, self.pos = size, start, data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        at = self.pos - self.start
        n = len(self.data) - at if n < 0 else n
        if at < 0 or at + n > len(self.data):
            raise OSError(f"read of {n} bytes at {self.pos} outside the fetched range")
        self.pos += n
        return self.data[at:at + n]


class BlockSource:
    """Reads blocks of a split with one ranged read each (plus each file's footer once), from local disk or S3."""

    def __init__(self, blocks: list[dict], root: str, store, columns: tuple[str, ...], counter: ReadCounter):
        self.blocks, self.root, self.store, self.columns, self.counter = blocks, root, store, columns, counter
        self.fs, self.base = store.filesystem(root)
        self.files: dict[str, tuple] = {}  # path -> (open file or None, size, footer metadata)
        # Remote files stay open (a handle is no socket; opening one costs a HEAD request); local ones are reopened
        # per block, so a split of many thousand files holds no file descriptors.
        self.keep_open = not isinstance(self.fs, pafs.LocalFileSystem)
        self.lock = threading.Lock()

    def _file(self, path: str):
        import pyarrow.parquet as pq

        with self.lock:
            if path in self.files:
                return self.files[path]
        f = self.fs.open_input_file(f"{self.base}/{path}")  # read_at is thread-safe (pread, ranged GET)
        size = f.size()
        tail_len = min(size, FOOTER_GUESS)
        tail = f.read_at(tail_len, size - tail_len)
        length = int.from_bytes(tail[-8:-4], "little") + 8
        requests = 1
        if length > tail_len:  # a footer bigger than the guess: one more read
            tail, tail_len, requests = f.read_at(length, size - length), length, 2
        self.counter.add(bytes=tail_len, footer_bytes=tail_len, requests=requests)
        meta = pq.read_metadata(_Range(size, size - tail_len, tail))
        if not self.keep_open:
            f.close()
        with self.lock:
            self.files.setdefault(path, (f if self.keep_open else None, size, meta))
            return self.files[path]

    def read(self, b: int) -> dict[str, np.ndarray]:
        """Block b's columns as arrays (rows, seq_len + 1)."""
        import pyarrow.parquet as pq

        block = self.blocks[b]
        f, size, meta = self._file(block["path"])
        group, names = meta.row_group(block["row_group"]), meta.schema.to_arrow_schema().names
        chunks = [group.column(names.index(c)) for c in self.columns]
        start = min(c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks)
        end = max((c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset) + c.total_compressed_size
                  for c in chunks)
        if f is None:
            with self.fs.open_input_file(f"{self.base}/{block['path']}") as local:
                data = local.read_at(end - start, start)
        else:
            data = f.read_at(end - start, start)
        table = pq.ParquetFile(_Range(size, start, data), metadata=meta).read_row_group(
            block["row_group"], columns=list(self.columns))
        out = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            out[name] = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
        self.counter.add(bytes=end - start, requests=1, blocks=1, rows=table.num_rows)
        return out


class _Window:
    """One loaded window of a partition: its rows in the order the partition yields them."""

    def __init__(self, arrays: dict[str, np.ndarray], row_ids: np.ndarray):
        self.arrays, self.row_ids = arrays, row_ids


class Reader:
    """Rank `rank` of `world`: its Rows of each global batch of `order`, read from the blocks of its partitions.

    Windows load in a thread pool; after each batch is handed out, the windows the next `lookahead` batches need are
    requested, so reads overlap the training steps. Memory: the current window of each owned partition, plus the
    next one near a window's end.
    """

    def __init__(self, order: DataOrder, source: BlockSource, rank: int, world: int, threads: int = 4,
                 lookahead: int = 2):
        if order.partitions % world or order.global_batch % world:
            raise ValueError(f"{world} workers must divide data_partitions {order.partitions} and the global batch "
                             f"{order.global_batch}")
        self.order, self.source, self.rank, self.world, self.lookahead = order, source, rank, world, lookahead
        self.owned = np.arange(rank, order.partitions, world)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="bigray-read")
        self.loaded: dict[tuple[int, int, int], Future] = {}  # (epoch, partition, window) -> _Window
        # Per owned partition: the last window requested and the row where the next one starts, for one epoch.
        self.requested: tuple[int, np.ndarray, np.ndarray] = (-1, np.empty(0), np.empty(0))

    @property
    def counter(self) -> ReadCounter:
        return self.source.counter

    def _load(self, e: int, p: int, w: int) -> _Window:
        _, groups = self.order.windows(e, p)
        parts = [self.source.read(int(b)) for b in groups[w]]
        arrays = {name: np.concatenate([part[name] for part in parts]) for name in self.source.columns}
        perm = self.order.window_permutation(e, p, w, len(arrays["tokens"]))
        if perm is not None:
            arrays = {name: a[perm] for name, a in arrays.items()}
        self.counter.add(windows=1)
        return _Window(arrays, self.order.window_row_ids(e, p, w))

    def _request(self, e: int, p: int, w: int) -> Future:
        key = (e, p, w)
        if key not in self.loaded:
            self.loaded[key] = self.pool.submit(self._load, e, p, w)
        return self.loaded[key]

    def _spans(self, e: int, k: int):
        """(partition, first row, end row) of each owned partition that global batch k of epoch e takes rows from."""
        G, P = self.order.global_batch, self.order.partitions
        first, end = consumed(self.owned, k * G, P), consumed(self.owned, (k + 1) * G, P)
        return [(int(p), int(a), int(b)) for p, a, b in zip(self.owned, first, end) if b > a]

    def _prefetch(self, e: int, k: int, count: int) -> None:
        """Request (in the thread pool) the windows global batches k .. k + count - 1 need and no earlier request
        covered: one vector comparison per call unless a partition reaches a window it has not asked for."""
        G, P = self.order.global_batch, self.order.partitions
        if self.requested[0] != e:  # a new epoch (or the first batch after a resume): nothing requested yet
            self.requested = (e, np.full(len(self.owned), -1), np.zeros(len(self.owned), dtype=np.int64))
        _, last, boundary = self.requested
        end = consumed(self.owned, min(k + count, self.order.epoch(e).steps) * G, P)
        for x in np.nonzero(end > boundary)[0]:
            p = int(self.owned[x])
            starts, _ = self.order.windows(e, p)
            first = int(consumed(p, k * G, P))
            upto = int(np.searchsorted(starts, end[x] - 1, side="right")) - 1
            for w in range(max(last[x] + 1, int(np.searchsorted(starts, first, side="right")) - 1), upto + 1):
                self._request(e, p, w)
            last[x], boundary[x] = upto, starts[upto + 1]

    def batch(self, e: int, k: int) -> Rows:
        """This rank's Rows of global batch k of epoch e: position kG + r + N*t is row t."""
        G, P, N = self.order.global_batch, self.order.partitions, self.world
        self._prefetch(e, k, 1)  # all of this batch's windows at once, loading in parallel
        pieces, index, ids = {name: [] for name in self.source.columns}, [], []
        for p, a, b in self._spans(e, k):
            starts, _ = self.order.windows(e, p)
            i = a
            while i < b:
                w = int(np.searchsorted(starts, i, side="right") - 1)
                stop = min(b, int(starts[w + 1]))
                window = self._request(e, p, w).result()
                lo, hi = i - starts[w], stop - starts[w]
                for name in pieces:
                    pieces[name].append(window.arrays[name][lo:hi])
                ids.append(window.row_ids[lo:hi])
                if stop == starts[w + 1]:  # the partition is done with this window: let it go
                    self.loaded.pop((e, p, w), None)
                i = stop
            index.append((p + P * np.arange(a, b) - k * G - self.rank) // N)
        order = np.argsort(np.concatenate(index), kind="stable")
        cols = {name: np.concatenate(v)[order] for name, v in pieces.items()}
        return Rows(tokens=cols["tokens"], loss_mask=cols.get("loss_mask"), segment_ids=cols.get("segment_ids"),
                    row_ids=np.concatenate(ids)[order])

    def batches(self, start_step: int, max_steps: int) -> Iterator[tuple[int, int, Rows]]:
        """(step, epoch, Rows) for steps start_step + 1 .. max_steps, epoch after epoch; starts where `start_step`
        left off by arithmetic (at most one window per owned partition read before the first batch)."""
        step = start_step
        e, k = self.order.locate(step)
        while step < max_steps:
            if k == self.order.epoch(e).steps:
                self.loaded = {key: f for key, f in self.loaded.items() if key[0] > e}
                e, k = e + 1, 0
                continue
            rows = self.batch(e, k)
            step, k = step + 1, k + 1
            yield step, e, rows
            # After the hand-out, so the first batch after a resume reads only what it needs.
            self._prefetch(e, k, self.lookahead)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def train_batches(reader: Reader, start_step: int, max_steps: int) -> Iterator[tuple[int, int, Rows]]:
    """(step, epoch, this rank's Rows) for steps start_step + 1 .. max_steps."""
    return reader.batches(start_step, max_steps)


def partitions_for(t: TrainConfig, manifest: dict) -> int:
    """train.data_partitions, or the automatic count for the train split's blocks (None for a manifest without
    blocks, which cannot be trained on: the driver says so)."""
    if t.data_partitions or manifest.get("version", 1) < 2:
        return t.data_partitions
    return auto_partitions(len(manifest_blocks(manifest, "train")))


def train_order(t: TrainConfig, manifest: dict) -> DataOrder:
    """The train split's order for TrainConfig `t`: seed, partitions, global batch, shuffle window."""
    return DataOrder.of(manifest_blocks(manifest, "train"), t.seed, partitions_for(t, manifest),
                        t.num_workers * t.micro_batch_size * t.grad_accum_steps, t.shuffle_blocks)


def check_data_order(t: TrainConfig, manifest: dict, manifest_uri: str) -> DataOrder:
    """The train split's data order, checked: the workers divide its partitions and an epoch has a global batch.
    Logs the epoch's shape (partitions, global batches, rows left out)."""
    order = train_order(t, manifest)
    P, G, n_blocks = order.partitions, order.global_batch, len(order.block_rows)
    how = "train.data_partitions" if t.data_partitions else f"chosen for the train split's {n_blocks} blocks"
    if P % t.num_workers:
        raise ConfigError(f"train.num_workers ({t.num_workers}) must divide the data partitions ({P}, {how}): "
                          "set train.data_partitions to a multiple of num_workers")
    if P > n_blocks:
        raise ConfigError(f"train.data_partitions ({P}) exceeds the train split's {n_blocks} blocks of "
                          f"{manifest_uri}: a partition owns whole blocks; lower it or leave it null (automatic)")
    epoch = order.epoch(0)
    if epoch.steps == 0:
        raise ConfigError(f"train split of {manifest_uri} has {int(order.block_rows.sum())} rows, fewer than one "
                          f"global batch (num_workers {t.num_workers} x micro_batch_size {t.micro_batch_size} "
                          f"x grad_accum_steps {t.grad_accum_steps}) from its {P} partitions ({how})")
    log.info("train data: %d partitions (%s), windows of %d blocks, %d global batches of %d rows per epoch, "
             "%d rows (%.2f%%) left out of epoch 0", P, how, t.shuffle_blocks, epoch.steps, G, epoch.dropped_rows,
             100 * epoch.dropped_rows / max(1, int(order.block_rows.sum())))
    return order


def val_order(t: TrainConfig, manifest: dict) -> DataOrder:
    """Validation: its rows in manifest order (one partition, not shuffled), in batches of one micro batch per worker.
    The val split is small, so every rank reads it whole, once, and keeps its stripe (`ValBatches`)."""
    return DataOrder.of(manifest_blocks(manifest, "val"), t.seed, 1, t.num_workers * t.micro_batch_size, 1,
                        shuffle=False)


def columns_of(manifest: dict, split: str) -> tuple[str, ...]:
    """The columns a reader fetches: tokens, plus the SFT columns the split lists."""
    listed = manifest["splits"][split].get("columns", [])
    return ("tokens", *(c for c in OPTIONAL_COLUMNS if c in listed))


def open_reader(order: DataOrder, manifest: dict, split: str, root: str, store, rank: int, world: int) -> Reader:
    """A Reader of `split` (under the manifest's directory `root`) for this rank."""
    source = BlockSource(manifest_blocks(manifest, split), root, store, columns_of(manifest, split), ReadCounter())
    return Reader(order, source, rank, world)


def position(order: DataOrder, step: int) -> dict:
    """Where `step` consumed global batches leave the data order (recorded in checkpoints; resume recomputes it)."""
    epoch, batch = order.locate(step)
    return {"epoch": epoch, "batch_in_epoch": batch, "consumed_rows": step * order.global_batch,
            "epoch_rows_consumed": batch * order.global_batch}
