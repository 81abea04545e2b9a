"""`bigray prepare`: read -> clean -> tokenize on Ray Data workers, then dedup, split, pack and write.

The parallel part (reading, NFC, hashing, tokenizing: nearly all the CPU time) runs as fused Ray
Data tasks. Dedup, split and packing need one global order to be exact and reproducible, so the
driver consumes the token stream in input order (`preserve_order`) and does that part, which is
vectorised numpy work on already-tokenized ids. Rows are cut from one EOS-joined stream per
split, so concatenating a split's rows gives back its documents' token stream exactly.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from bigray import storage
from bigray.config import Config, require
from bigray.data.pack import ShardWriter, is_val, token_dtype, unit_draw
from bigray.data.read import documents, resolve_inputs
from bigray.data.tokenizer import backend, load_tokenizer, save_dir, train_bpe
from bigray.errors import DataError
from bigray.runtime import init_ray

MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def content_hash(text: str) -> int:
    """64-bit content hash for exact dedup (collision odds ~1e-4 at 1e8 docs)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def clean(text: str, min_chars: int) -> tuple[str, str | None]:
    """NFC-normalise; return (text, drop_reason)."""
    text = unicodedata.normalize("NFC", text)
    return text, ("too_short" if len(text) < min_chars else None)


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


def train_tokenizer(cfg: Config, out_uri: str | None = None, files=None) -> str:
    """Train a byte-level BPE on a seeded sample of `data.inputs`; returns where it was saved."""
    data = cfg.data
    out_uri = out_uri or require(data.tokenizer, "data.tokenizer", "tokenizer train")
    files = files or resolve_inputs(data, cfg.storage)
    init_ray(cfg.ray)
    total = sum(f.size for f in files) or 1
    rate = min(1.0, data.tokenizer_sample_mb * (1 << 20) / total)

    def sample():
        for batch in documents(files, data, cfg.storage).iter_batches(batch_format="pyarrow", batch_size=None):
            texts = [clean(t, data.min_chars) for t, r in zip(batch["text"].to_pylist(), batch["reason"].to_pylist()) if r is None]
            texts = [t for t, reason in texts if reason is None]
            if texts:
                draws = unit_draw(np.array([content_hash(t) for t in texts], dtype=np.uint64), data.seed + 1)
                yield from (t for t, d in zip(texts, draws) if d < rate)

    save_dir(lambda d: train_bpe(sample(), data.vocab_size, d), out_uri, cfg.storage)
    return out_uri


def prepare(cfg: Config) -> dict:
    """Run the whole prepare pipeline; returns the manifest plus timing (`wall_s`, `tokens_per_s`)."""
    import ray.data

    data = cfg.data
    output = require(data.output, "data.output", "prepare")
    files = resolve_inputs(data, cfg.storage)
    start = time.perf_counter()
    init_ray(cfg.ray)
    tok_uri = data.tokenizer or train_tokenizer(cfg, storage.join(output, "tokenizer"), files)
    tok = load_tokenizer(tok_uri, cfg.storage)

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    stream = documents(files, data, cfg.storage).map_batches(
        tokenize, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"tokenizer_json": tok.json, "eos_id": tok.eos_id, "min_chars": data.min_chars},
    )

    fs, out_dir = storage.filesystem(output, cfg.storage)
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
        raise DataError(f"empty corpus: {docs_read} documents read from {len(files)} files, none kept (dropped: {dict(dropped) or 'none'})")
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["rows"] == 0:
        raise DataError(f"corpus too small: {tokens_kept} tokens kept, not one train row of seq_len + 1 = {data.seq_len + 1} tokens")

    tok_out = storage.join(output, "tokenizer")
    if tok_uri.rstrip("/") != tok_out:
        storage.copy_dir(tok_uri, tok_out, cfg.storage)
    manifest = {
        "version": MANIFEST_VERSION,
        "seq_len": data.seq_len,
        "dtype": dtype.name,
        "tokenizer": {"path": "tokenizer", "source": tok_uri, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
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
    storage.write_bytes(storage.join(output, "manifest.json"), json.dumps(manifest, indent=2).encode(), cfg.storage)
    wall = time.perf_counter() - start
    return {**manifest, "output": output, "wall_s": wall, "tokens_per_s": tokens_kept / wall}


def _clear_previous(fs: pafs.FileSystem, out_dir: str) -> None:
    """Remove shards and manifest of an earlier run so no stale shard outlives its manifest."""
    fs.create_dir(out_dir, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(out_dir)):
        name = info.base_name
        if name == "manifest.json" or (name.endswith(".parquet") and name.split("-")[0] in SPLITS):
            fs.delete_file(info.path)


def read_manifest(uri: str, storage_cfg=None) -> tuple[dict, str]:
    """(manifest, its directory) from a manifest.json URI or the directory holding one."""
    path = uri if uri.endswith(".json") else storage.join(uri, "manifest.json")
    if not storage.exists(path, storage_cfg):
        raise DataError(f"{path}: no manifest; run `bigray prepare` first")
    return json.loads(storage.read_bytes(path, storage_cfg)), path.rsplit("/", 1)[0]


def load_split(manifest_uri: str, split: str = "train", storage_cfg=None):
    """A lazy, streaming Ray Dataset of a split's packed rows (column `tokens`, seq_len + 1 ids each)."""
    import ray.data

    manifest, root = read_manifest(manifest_uri, storage_cfg)
    if split not in manifest["splits"]:
        raise DataError(f"{manifest_uri}: no split {split!r}; splits: {sorted(manifest['splits'])}")
    shards = [s["path"] for s in manifest["splits"][split]["shards"]]
    if not shards:
        raise DataError(f"{manifest_uri}: split {split!r} is empty")
    fs, base = storage.filesystem(root, storage_cfg)
    return ray.data.read_parquet([f"{base}/{p}" for p in shards], filesystem=fs, columns=["tokens"])
