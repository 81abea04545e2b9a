"""`bigray prepare`: read -> clean -> tokenize on Ray Data workers, then dedup, split, pack and write.

The parallel part (reading, NFC, hashing, tokenizing: nearly all the CPU time) runs as fused Ray
Data tasks. Dedup, split and packing need one global order to be exact and reproducible, so the
driver consumes the token stream in input order (`preserve_order`) and does that part, which is
vectorised numpy work on already-tokenized ids. Rows are cut from one EOS-joined stream per
split, so concatenating a split's rows gives back its documents' token stream exactly.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from bigray.config import Config, DataConfig, require
from bigray.data.manifest import MANIFEST_VERSION, SPLITS
from bigray.data.pack import ShardWriter, is_val, token_dtype
from bigray.data.read import InputFile, clean, content_hash, documents, resolve_inputs
from bigray.data.tokenizer import TokenizerInfo, backend, fit_tokenizer, load_tokenizer
from bigray.errors import DataError
from bigray.runtime import init_ray
from bigray.storage import Store, join


@dataclass(frozen=True)
class SplitSummary:
    """One split as written: packed rows, their tokens, and the shard files holding them."""

    rows: int
    tokens: int
    shards: int
    bytes: int


@dataclass(frozen=True)
class PrepareResult:
    """What `prepare` wrote and how it went; `manifest` is the manifest.json written beside the shards."""

    output: str
    manifest: dict
    splits: dict[str, SplitSummary]
    docs_read: int
    docs_kept: int
    dropped: dict[str, int]
    drop_examples: dict[str, str]
    tokens_kept: int
    seq_len: int
    vocab_size: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_kept / self.wall_s if self.wall_s > 0 else 0.0


def tokenize(batch: pa.Table, tokenizer_json: str, eos_id: int, min_chars: int) -> pa.Table:
    """Ray Data UDF: documents in, (hash, tokens + EOS, where, reason) out."""
    reasons = batch["reason"].to_pylist()
    hashes = np.zeros(len(reasons), dtype=np.uint64)
    kept_idx, kept_text = [], []
    for i, text in enumerate(batch["text"].to_pylist()):
        if reasons[i] is not None:
            continue
        text, reasons[i] = clean(text, min_chars)
        if reasons[i] is None:
            hashes[i] = content_hash(text)
            kept_idx.append(i)
            kept_text.append(text)
    encodings = backend(tokenizer_json).encode_batch_fast(kept_text, add_special_tokens=False) if kept_text else []
    lengths = np.zeros(len(reasons), dtype=np.int64)
    lengths[kept_idx] = [len(e.ids) + 1 for e in encodings]
    offsets = np.zeros(len(reasons) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    eos = np.array([eos_id], dtype=np.uint32)
    parts = [p for e in encodings for p in (np.asarray(e.ids, dtype=np.uint32), eos)]
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return pa.table({
        "hash": hashes,
        "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "where": batch["where"],
        "reason": pa.array(reasons, pa.string()),
    })


def prepare(cfg: Config) -> PrepareResult:
    """`bigray prepare`: the whole pipeline, from `data.inputs` to shards + manifest.json in `data.output`."""
    data = cfg.data
    output = require(data.output, "data.output", "prepare")
    store = Store(cfg.storage)
    files = resolve_inputs(data, store)
    start = time.perf_counter()
    init_ray(cfg.ray)
    tok_uri = data.tokenizer or fit_tokenizer(data, store, join(output, "tokenizer"), files)
    tok = load_tokenizer(tok_uri, store)
    manifest = write_shards(data, store, output, files, tok)
    wall = time.perf_counter() - start
    stats = manifest["stats"]
    splits = {name: SplitSummary(s["rows"], s["tokens"], len(s["shards"]), sum(x["bytes"] for x in s["shards"]))
              for name, s in manifest["splits"].items()}
    return PrepareResult(output, manifest, splits, stats["docs_read"], stats["docs_kept"], stats["dropped"],
                         stats["drop_examples"], stats["tokens_kept"], data.seq_len, tok.vocab_size, wall)


def write_shards(data: DataConfig, store: Store, output: str, files: list[InputFile], tok: TokenizerInfo) -> dict:
    """Tokenize `files`, dedup, split and pack them into shards under `output`; returns the manifest written."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    stream = documents(files, data, store).map_batches(
        tokenize, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"tokenizer_json": tok.json, "eos_id": tok.eos_id, "min_chars": data.min_chars},
    )

    fs, out_dir = store.filesystem(output)
    _clear_previous(fs, out_dir)
    dtype = token_dtype(tok.vocab_size)
    rows_per_shard = max(1, int(data.shard_mb * (1 << 20)) // ((data.seq_len + 1) * dtype.itemsize))
    writers = {s: ShardWriter(fs, out_dir, s, data.seq_len, dtype, rows_per_shard) for s in SPLITS}
    dropped: Counter = Counter()
    examples: dict[str, str] = {}
    seen: set[int] = set()
    docs_read = docs_kept = tokens_kept = 0

    for batch in stream.iter_batches(batch_format="pyarrow", batch_size=None):
        docs_read += batch.num_rows
        reasons = batch["reason"]
        for reason, where in zip(reasons.to_pylist(), batch["where"].to_pylist()):
            if reason is not None:
                dropped[reason] += 1
                examples.setdefault(reason, where)
        keep = pc.is_null(reasons).to_numpy(zero_copy_only=False)
        hashes = batch["hash"].to_numpy()
        if data.dedup:
            for i in np.flatnonzero(keep):
                h = int(hashes[i])
                if h in seen:
                    keep[i] = False
                    dropped["duplicate"] += 1
                    examples.setdefault("duplicate", batch["where"][i].as_py())
                else:
                    seen.add(h)
        val = is_val(hashes, data.seed, data.val_fraction)
        docs_kept += int(keep.sum())
        for split, mask in (("train", keep & ~val), ("val", keep & val)):
            if mask.any():
                tokens = pc.list_flatten(batch["tokens"].filter(pa.array(mask))).to_numpy()
                tokens_kept += len(tokens)
                writers[split].add(tokens)

    if docs_kept == 0:
        raise DataError(f"empty corpus: {docs_read} documents read from {len(files)} files, none kept "
                        f"(dropped: {dict(dropped) or 'none'})")
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["rows"] == 0:
        raise DataError(f"corpus too small: {tokens_kept} tokens kept, not one train row of "
                        f"seq_len + 1 = {data.seq_len + 1} tokens")

    tok_out = join(output, "tokenizer")
    if tok.uri.rstrip("/") != tok_out:
        store.copy_dir(tok.uri, tok_out)
    manifest = {
        "version": MANIFEST_VERSION,
        "seq_len": data.seq_len,
        "dtype": dtype.name,
        "tokenizer": {"path": "tokenizer", "source": tok.uri, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id},
        "splits": splits,
        "sources": [f.uri for f in files],
        "stats": {
            "docs_read": docs_read,
            "docs_kept": docs_kept,
            "dropped": dict(sorted(dropped.items())),
            "drop_examples": dict(sorted(examples.items())),
            "tokens_kept": tokens_kept,
            "tail_tokens_dropped": {s: w.tail for s, w in writers.items()},
        },
        "config": data.model_dump(mode="json"),
    }
    store.write_text(join(output, "manifest.json"), json.dumps(manifest, indent=2))
    return manifest


def _clear_previous(fs: pafs.FileSystem, out_dir: str) -> None:
    """Remove shards and manifest of an earlier run so no stale shard outlives its manifest."""
    fs.create_dir(out_dir, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(out_dir)):
        name = info.base_name
        if name == "manifest.json" or (name.endswith(".parquet") and name.split("-")[0] in SPLITS):
            fs.delete_file(info.path)
