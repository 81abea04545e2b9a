"""`bigray prepare`: read -> clean -> tokenize -> dedup -> split -> pack -> write, all in Ray tasks.

Two phases, the classic map/reduce shuffle on Ray core tasks:

- read tasks (one per run of input files) parse, NFC-clean, hash and tokenize their documents and
  split them by content hash into `data.partitions` parts (plus, for minhash, LSH band keys into
  as many parts);
- write tasks (one per partition) take their part from every read task, sort it by input position,
  drop exact (and near-) duplicates keeping the first occurrence, split by content hash, pack rows
  and write that partition's shards.

SFT (`data.task: sft`): read tasks render each record with its chat template into (text, is_target) pieces
(bigray/data/sft.py), tokenize them with a mask and apply `data.truncate`; write tasks pack whole documents
into rows with `loss_mask` and `segment_ids` columns (bigray/data/pack.py says what they mean).

Tokens go from read tasks to write tasks through Ray's object store; the driver only sees counts,
drop examples and the block list. Equal documents share a hash, so they always meet in one write
task: dedup is exact over the whole corpus with no global set. Output depends only on the inputs
and the config (positions, hashes, `data.partitions`), never on task sizes or the cluster.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from bigray.config import Config, DataConfig, require
from bigray.data.dedup import band_keys, first_occurrence, lsh_params, near_duplicates, signatures
from bigray.data.manifest import MANIFEST_VERSION, SPLITS, clear_previous
from bigray.data.pack import (
    block_rows_for,
    gather,
    is_val,
    pack,
    pack_documents,
    partition_of,
    shards,
    stream_segments,
    token_dtype,
)
from bigray.data.read import InputFile, content_hash, documents, read_groups, resolve_inputs, where_of
from bigray.data.sft import BadRecord, ChatFormat, chat_format, encode_pieces, truncate
from bigray.data.tokenizer import (
    TokenizerInfo,
    backend,
    copy_tokenizer,
    fit_tokenizer,
    load_tokenizer,
    sample_format,
    save_chat_template,
)
from bigray.errors import DataError
from bigray.runtime import init_ray
from bigray.storage import Store, join

# Keys of the data section that change how the work is cut, never what is written.
EXECUTION_ONLY = ("docs_per_task",)


@dataclass(frozen=True)
class SplitSummary:
    """One split as written: packed rows, their tokens, and the shard files holding them."""

    rows: int
    tokens: int
    shards: int
    blocks: int
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


def prepare(cfg: Config) -> PrepareResult:
    """`bigray prepare`: the whole pipeline, from `data.inputs` to shards + manifest.json in `data.output`."""
    data = cfg.data
    output = require(data.output, "data.output", "prepare")
    store = Store(cfg.storage)
    files = resolve_inputs(data, store)
    start = time.perf_counter()
    init_ray(cfg.ray)
    tok_uri = data.tokenizer or fit_tokenizer(data, store, join(output, "tokenizer"), files, sample_format(data))
    tok = load_tokenizer(tok_uri, store)
    manifest = write_dataset(data, store, output, files, tok)
    wall = time.perf_counter() - start
    stats = manifest["stats"]
    splits = {name: SplitSummary(s["rows"], s["tokens"], len(s["shards"]), len(s["blocks"]),
                                 sum(x["bytes"] for x in s["shards"])) for name, s in manifest["splits"].items()}
    return PrepareResult(output, manifest, splits, stats["docs_read"], stats["docs_kept"], stats["dropped"],
                         stats["drop_examples"], stats["tokens_kept"], data.seq_len, tok.vocab_size, wall)


def sft_format(data: DataConfig, tokenizer_template: str | None, special_tokens: dict) -> ChatFormat | None:
    """How SFT records are rendered (None for pretraining): data.chat_template, the tokenizer's, or bigray's."""
    if data.task != "sft":
        return None
    return chat_format(data.chat_template, tokenizer_template, special_tokens, data.train_on, data.messages_field)


def columns_for(data: DataConfig) -> list[str]:
    """The parquet columns of the shards, `tokens` first."""
    if data.task == "sft":
        return ["tokens", "loss_mask", "segment_ids"]
    return ["tokens", "segment_ids"] if data.pack_boundaries else ["tokens"]


def write_dataset(data: DataConfig, store: Store, output: str, files: list[InputFile], tok: TokenizerInfo) -> dict:
    """Run the read and write tasks for `files`; returns the manifest written to `output`."""
    import ray

    fmt = sft_format(data, tok.chat_template, dict(tok.special_tokens))
    parts = data.partitions
    lsh = lsh_params(data.minhash_threshold, data.minhash_permutations) if data.dedup == "minhash" else None
    dtype = token_dtype(tok.vocab_size)
    files_ref, tok_ref = ray.put(files), ray.put(tok.json)
    read = ray.remote(read_task).options(num_returns=1 + parts * (2 if lsh else 1))
    outs = [read.remote(files_ref, g, data, store, tok_ref, tok.eos_id, dtype.str, lsh, fmt)
            for g in read_groups(files)]
    reads = ray.get([o[0] for o in outs])
    if sum(r["docs"] for r in reads) == 0:
        dropped = sum((Counter(r["dropped"]) for r in reads), Counter())
        raise DataError(f"empty corpus: {sum(r['docs_read'] for r in reads)} documents read from {len(files)} files, "
                        f"none kept (dropped: {dict(dropped) or 'none'})")
    marks = band_marks(outs, data) if lsh else [[] for _ in range(parts)]

    clear_previous(store, output)
    row_len = data.seq_len + 1
    block_rows = block_rows_for(data.seq_len, dtype, data.block_rows)
    rows_per_shard = max(1, int(data.shard_mb * (1 << 20)) // (row_len * dtype.itemsize))
    write = ray.remote(write_task)
    written = ray.get([
        write.remote(p, data, store, output, row_len, rows_per_shard, block_rows, len(outs), tok.eos_id,
                     *(o[1 + p] for o in outs), *marks[p])
        for p in range(parts)
    ])
    del outs, marks  # the token parts: free the object store as soon as every write task is done

    splits = {split: {**merge_split([w["splits"][split] for w in written], row_len), "columns": columns_for(data)}
              for split in SPLITS}
    tokens_kept = sum(w["tokens_kept"] for w in written)
    if splits["train"]["rows"] == 0:
        raise DataError(f"corpus too small: {tokens_kept} tokens kept, not one train row of "
                        f"seq_len + 1 = {row_len} tokens in any of the {parts} partitions (data.partitions)")
    dropped, examples = drop_report(reads + written, files)

    tok_out = join(output, "tokenizer")
    if tok.uri.rstrip("/") != tok_out:
        copy_tokenizer(tok.uri, tok_out, store)
    if fmt is not None and fmt.template != tok.chat_template:
        # The trained model is exported with this tokenizer dir, so bigray serve renders chats as training did.
        save_chat_template(tok_out, fmt.template, store)
    manifest = {
        "version": MANIFEST_VERSION,
        "seq_len": data.seq_len,
        "dtype": dtype.name,
        "block_rows": block_rows,
        "partitions": parts,
        "tokenizer": {"path": "tokenizer", "source": tok.uri, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id},
        "splits": splits,
        "sources": [f.uri for f in files],
        "stats": {
            "docs_read": sum(r["docs_read"] for r in reads),
            "docs_kept": sum(w["docs_kept"] for w in written),
            "dropped": dropped,
            "drop_examples": examples,
            "tokens_kept": tokens_kept,
            # At most one partial row per split and partition: rows never span partitions.
            "tail_tokens_dropped": {s: sum(w["splits"][s]["tail"] for w in written) for s in SPLITS},
            # SFT rows end in padding where the next document did not fit.
            "pad_tokens": {s: sum(w["splits"][s]["pad"] for w in written) for s in SPLITS},
        },
        "config": data.model_dump(mode="json", exclude=set(EXECUTION_ONLY)),
    }
    if fmt is not None:
        manifest["sft"] = {
            "chat_template": fmt.template, "template_source": fmt.source, "train_on": fmt.train_on,
            "truncate": data.truncate, "messages_field": fmt.messages_field,
            "loss_mask": "loss_mask[i] = 1: tokens[i] is a training target (the label of position i - 1); "
                         f"{'assistant turns' if fmt.train_on == 'assistant' else 'every token'} of each document",
            "segment_ids": "document index within the row (0, 1, ...); trailing padding is one more segment "
                           "(mask 0); a target counts only when tokens[i - 1] has the same segment id",
            "pad_id": tok.eos_id,
        }
    store.write_text(join(output, "manifest.json"), json.dumps(manifest, indent=2))
    return manifest


def band_marks(outs: list, data: DataConfig) -> list[list]:
    """Submit a band task per key range; returns, per document partition, refs to its (later, first) pairs."""
    import ray

    parts = data.partitions
    band = ray.remote(band_task).options(num_returns=parts) if parts > 1 else ray.remote(band_task)
    marks: list[list] = [[] for _ in range(parts)]
    for q in range(parts):
        got = band.remote(parts, data.minhash_threshold, *(o[1 + parts + q] for o in outs))
        for p, ref in enumerate(got if parts > 1 else [got]):
            marks[p].append(ref)
    return marks


def merge_split(parts: list[dict], row_len: int) -> dict:
    """One split's manifest entry from its partitions' (in partition order): shards, blocks with their start row."""
    blocks, start = [], 0
    for block in itertools.chain.from_iterable(p["blocks"] for p in parts):
        blocks.append({**block, "start": start})
        start += block["rows"]
    return {"rows": start, "tokens": start * row_len, "shards": [s for p in parts for s in p["shards"]],
            "blocks": blocks}


def drop_report(summaries: list[dict], files: list[InputFile]) -> tuple[dict[str, int], dict[str, str]]:
    """Drop counts by reason, and where the first (in input order) of each was."""
    dropped: Counter = Counter()
    first: dict[str, tuple] = {}
    for s in summaries:
        dropped.update(s["dropped"])
        for reason, example in s["first"].items():
            first[reason] = min(first.get(reason, example), example)
    examples = {reason: where for reason, (_, where) in first.items()}
    if "duplicate" in first:
        examples["duplicate"] = where_of(files, first["duplicate"][0])
    if "near_duplicate" in first:
        later, earlier = first["near_duplicate"]
        examples["near_duplicate"] = f"{where_of(files, later)} ~ {where_of(files, earlier)}"
    return dict(sorted(dropped.items())), dict(sorted(examples.items()))


def read_task(files: list[InputFile], indices: list[int], data: DataConfig, store: Store, tok_json: str, eos_id: int,
              dtype: str, lsh: tuple[int, int] | None, fmt: ChatFormat | None = None) -> list:
    """Ray task: read, clean and tokenize `files[indices]`; returns [summary, doc part per partition, band parts].

    A doc part holds (pos, hash, lengths, tokens + EOS) of the documents whose hash the partition owns; SFT
    documents (`fmt`) are their rendered template's tokens (no EOS added) with a `mask` (1 = training target).
    """
    # A read task holds one of Ray's CPUs, so it encodes on one thread: tokenizers' own pool would put
    # n_cpus threads in each of n_cpus concurrent tasks. Read per call, so this worker's next task sees it too.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    dtype = np.dtype(dtype)
    eos = dtype.type(eos_id)
    tok = backend(tok_json)
    dropped: Counter = Counter()
    first: dict[str, tuple[int, str]] = {}
    pos, hashes, lengths, chunks, masks = [], [], [], [], []
    docs_read = 0
    batch: list[tuple[int, str, str]] = []

    def encode() -> None:
        try:
            if fmt is not None:
                return encode_sft()
            encodings = tok.encode_batch_fast([text for _, text, _ in batch], add_special_tokens=False)
        except Exception as exc:  # noqa: BLE001 - name the document range instead of a bare tokenizer error
            where = f"{batch[0][2]} .. {batch[-1][2]}"
            raise DataError(f"{where}: tokenizer failed ({type(exc).__name__}: {exc})") from None
        ids = [e.ids for e in encodings]
        n = [len(x) + 1 for x in ids]
        chunks.append(np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                                  dtype=dtype, count=sum(n)))
        lengths.extend(n)
        pos.extend(p for p, _, _ in batch)
        hashes.extend(content_hash(text) for _, text, _ in batch)
        batch.clear()

    def encode_sft() -> None:
        for (p, pieces, where), (ids, mask) in zip(batch, encode_pieces([d for _, d, _ in batch], tok)):
            try:
                ids, mask = truncate(ids, mask, data.seq_len + 1, data.truncate)
            except BadRecord as bad:
                dropped[bad.reason] += 1
                first.setdefault(bad.reason, (p, where))
                continue
            chunks.append(np.array(ids, dtype=dtype))
            masks.append(mask)
            lengths.append(len(ids))
            pos.append(p)
            hashes.append(content_hash("".join(text for text, _ in pieces)))
        batch.clear()

    for p, text, where, reason in documents(files, indices, data, store, fmt):
        docs_read += 1
        if reason is not None:
            dropped[reason] += 1
            first.setdefault(reason, (p, where))
            continue
        batch.append((p, text, where))
        if len(batch) >= data.docs_per_task:
            encode()
    if batch:
        encode()

    pos_a = np.array(pos, dtype=np.int64)
    hash_a = np.array(hashes, dtype=np.uint64)
    len_a = np.array(lengths, dtype=np.int64)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    mask = (np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)) if fmt is not None else None
    starts = np.cumsum(len_a) - len_a
    part = partition_of(hash_a, data.partitions)
    summary = {"docs_read": docs_read, "docs": len(pos_a), "dropped": dict(dropped), "first": first}
    out: list = [summary]
    for p in range(data.partitions):
        idx = np.flatnonzero(part == p)
        out.append({"pos": pos_a[idx], "hash": hash_a[idx], "lengths": len_a[idx],
                    "tokens": gather(tokens, starts[idx], len_a[idx]),
                    "mask": None if mask is None else gather(mask, starts[idx], len_a[idx])})
    if lsh:
        bands, rows = lsh
        # Shingles of the document's own tokens (its EOS left out).
        sigs, has = signatures(tokens, starts, len_a - 1, data.minhash_ngram, data.minhash_permutations, data.seed)
        keys = band_keys(sigs, bands, rows).reshape(-1)
        doc = np.repeat(np.arange(len(has)), bands)
        # One byte per permutation is enough to verify a candidate pair (b-bit MinHash), 4x less to shuffle.
        sig8 = (sigs & 0xFF).astype(np.uint8)
        owner = (keys % np.uint64(data.partitions)).astype(np.int64)
        for q in range(data.partitions):
            idx = np.flatnonzero(owner == q)
            out.append({"key": keys[idx], "pos": pos_a[has][doc[idx]], "part": part[has][doc[idx]],
                        "sig8": sig8[doc[idx]]})
    return out


def band_task(partitions: int, threshold: float, *band_parts: dict) -> list | dict:
    """Ray task: for one range of LSH band keys, the (later, first) near-duplicate pairs, per document partition."""
    keys = np.concatenate([b["key"] for b in band_parts])
    pos = np.concatenate([b["pos"] for b in band_parts])
    part = np.concatenate([b["part"] for b in band_parts])
    sig8 = np.concatenate([b["sig8"] for b in band_parts])
    later, first = near_duplicates(keys, pos, sig8, threshold)
    later_part = dict(zip(pos.tolist(), part.tolist())) if len(later) else {}
    owner = np.array([later_part[p] for p in later.tolist()], dtype=np.int64)
    out = [{"later": later[owner == p], "first": first[owner == p]} for p in range(partitions)]
    return out if partitions > 1 else out[0]


def write_task(p: int, data: DataConfig, store: Store, output: str, row_len: int, rows_per_shard: int,
               block_rows: int, n_reads: int, pad_id: int, *parts: dict) -> dict:
    """Ray task: dedup, split, pack and write partition `p`; returns its shards, blocks and counts."""
    docs, marks = parts[:n_reads], parts[n_reads:]
    pos = np.concatenate([d["pos"] for d in docs])
    hashes = np.concatenate([d["hash"] for d in docs])
    lengths = np.concatenate([d["lengths"] for d in docs])
    tokens = np.concatenate([d["tokens"] for d in docs])
    mask = np.concatenate([d["mask"] for d in docs]) if data.task == "sft" else None
    starts = np.cumsum(lengths) - lengths
    order = np.argsort(pos, kind="stable")
    pos, hashes, lengths, starts = pos[order], hashes[order], lengths[order], starts[order]

    dropped: dict[str, int] = {}
    first: dict[str, tuple] = {}
    keep = np.ones(len(pos), dtype=bool)
    if data.dedup != "none":
        keep = first_occurrence(hashes)
        if (~keep).any():
            dropped["duplicate"] = int((~keep).sum())
            first["duplicate"] = (int(pos[~keep][0]), "")
    if marks:
        later = np.concatenate([m["later"] for m in marks])
        earlier = np.concatenate([m["first"] for m in marks])
        near = keep & np.isin(pos, later)
        if near.any():
            dropped["near_duplicate"] = int(near.sum())
            at = int(pos[near][0])
            first["near_duplicate"] = (at, int(earlier[later == at].min()))
            keep &= ~near

    val = is_val(hashes, data.seed, data.val_fraction)
    splits = {}
    for split, chosen in (("train", keep & ~val), ("val", keep & val)):
        stream = gather(tokens, starts[chosen], lengths[chosen])
        extra, pad = {}, 0
        if mask is not None:
            rows, loss_mask, segments, pad = pack_documents(stream, gather(mask, starts[chosen], lengths[chosen]),
                                                            lengths[chosen], row_len, pad_id)
            extra, tail = {"loss_mask": loss_mask, "segment_ids": segments}, 0
        else:
            rows, tail = pack(stream, row_len)
            if data.pack_boundaries:
                extra = {"segment_ids": stream_segments(lengths[chosen], len(rows), row_len)}
        written = shards(rows, f"{split}-{p:05d}", rows_per_shard, block_rows, extra) if len(rows) else []
        for shard in written:
            try:
                store.write_bytes(join(output, shard.name), shard.data)
            except OSError as exc:
                raise DataError(f"{join(output, shard.name)}: cannot write ({exc})") from None
        splits[split] = {"rows": len(rows), "tail": tail, "pad": pad,
                         "shards": [{"path": s.name, "rows": s.rows, "bytes": len(s.data)} for s in written],
                         "blocks": [b for s in written for b in s.blocks]}
    return {"splits": splits, "dropped": dropped, "first": first, "docs_kept": int(keep.sum()),
            "tokens_kept": int(lengths[keep].sum())}
