"""Find input files and turn them into documents, counting (or failing on) bad records.

Every document has a position: its file's index in the sorted input list and its record key in
that file (line number for jsonl, row for parquet and arrow, 0 for a text file), packed into one int64
that sorts in input order. Positions make dedup keep the first occurrence and make the output
independent of how files are grouped into tasks. `where` ("file:line", "file#row", "file") names
a document's source in errors and drop examples.

Hugging Face `datasets` inputs become input files too: a dir written by `save_to_disk` (local or s3://) is
its Arrow files (state.json lists them), and `hf:org/name[:split]` is the Arrow cache files of
`datasets.load_dataset` run offline. Read tasks stream their record batches like any other file, so the
dataset never passes through the driver.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import sysconfig
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from bigray.config import DataConfig
from bigray.data.sft import BadRecord, ChatFormat, render, to_messages
from bigray.errors import DataError
from bigray.storage import Store, join

_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
HF_PREFIX = "hf:"
_CHUNK = 4 << 20
# Input bytes per read task: a read task holds its tokens until the write tasks take them.
READ_TASK_BYTES = 64 << 20
# 2^40 records per file and 2^23 files: a position fits an int64 and sorts as (file, record).
KEY_BITS = 40


@dataclass(frozen=True)
class InputFile:
    uri: str
    format: str
    size: int


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def content_hash(text: str) -> int:
    """64-bit content hash for exact dedup (collision odds ~1e-4 at 1e8 docs)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def clean(text: str, min_chars: int) -> tuple[str, str | None]:
    """NFC-normalise; return (text, drop_reason)."""
    text = unicodedata.normalize("NFC", text)
    return text, ("too_short" if len(text) < min_chars else None)


def position(file_index: int, key: int) -> int:
    return (file_index << KEY_BITS) | key


def where_of(files: list[InputFile], pos: int) -> str:
    """The `where` of the document at `pos` (the inverse of `position`, as `records` names it)."""
    f, key = files[pos >> KEY_BITS], pos & ((1 << KEY_BITS) - 1)
    return {"jsonl": f"{f.uri}:{key}", "parquet": f"{f.uri}#{key}", "arrow": f"{f.uri}#{key}"}.get(f.format, f.uri)


def resolve_inputs(data: DataConfig, store: Store) -> list[InputFile]:
    """Expand `data.inputs` to a sorted, de-duplicated file list; a pattern matching nothing is an error."""
    if not data.inputs:
        raise DataError("data.inputs is empty: give local paths, globs or s3:// URIs")
    seen: dict[str, InputFile] = {}
    exclude = [p.replace("{stdlib}", stdlib_dir()) for p in data.exclude]
    for pattern in data.inputs:
        pattern = pattern.replace("{stdlib}", stdlib_dir())
        arrow = hub_dataset_files(pattern) if pattern.startswith(HF_PREFIX) else saved_dataset_files(pattern, store)
        if arrow is not None:
            seen.update((uri, InputFile(uri, "arrow", 0)) for uri in arrow if uri not in seen)
            continue
        uris = [u for u in store.expand(pattern) if not any(fnmatch.fnmatchcase(u, x) for x in exclude)]
        if not uris:
            raise DataError(f"{pattern}: matched no files" + (" (after data.exclude)" if exclude else ""))
        for uri in uris:
            if uri in seen:
                continue
            fmt = data.format if data.format != "auto" else _EXT_FORMAT.get(os.path.splitext(uri)[1].lower(), "text")
            seen[uri] = InputFile(uri, fmt, 0)
    if len(seen) >= 1 << (63 - KEY_BITS):
        raise DataError(f"data.inputs: {len(seen):,} files; at most {1 << (63 - KEY_BITS):,} (concatenate small files)")
    return [InputFile(f.uri, f.format, _size(f.uri, store)) for f in seen.values()]


def saved_dataset_files(path: str, store: Store) -> list[str] | None:
    """The Arrow files of a `Dataset.save_to_disk` dir (a `DatasetDict` dir: its train split), else None."""
    if any(c in path for c in "*?[") or not store.exists(join(path, "dataset_info.json")) and not store.exists(
            join(path, "dataset_dict.json")):
        return None
    if store.exists(join(path, "dataset_dict.json")):
        splits = json.loads(store.read_text(join(path, "dataset_dict.json"))).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{path}: a DatasetDict without a train split (splits: {splits}); "
                            f"name one split's dir in data.inputs, e.g. {join(path, splits[0] if splits else 'SPLIT')}")
        path = join(path, "train")
    try:
        state = json.loads(store.read_text(join(path, "state.json")))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a readable datasets save_to_disk dir (state.json: {exc})") from None
    return [join(path, n) for n in names]


def hub_dataset_files(spec: str) -> list[str]:
    """The cached Arrow files of `hf:org/name[:split]` (split defaults to train), loaded offline."""
    name, _, split = spec.removeprefix(HF_PREFIX).partition(":")
    split = split or "train"
    try:
        with _datasets_offline() as datasets:
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises a zoo of types for "not cached"; all mean the same here
        raise DataError(f"{spec}: not in the local datasets cache (offline; {type(exc).__name__}: {exc}); "
                        f"download it once where the hub is reachable (datasets.load_dataset({name!r})), or "
                        "save_to_disk it and give that dir") from None
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise DataError(f"{spec}: the dataset is held in memory, not in cache files; save_to_disk it and give that dir")
    return files


@contextlib.contextmanager
def _datasets_offline():
    """`datasets` with HF_DATASETS_OFFLINE=1 semantics for the duration of the block.

    datasets reads the environment once, at import, so setting the variable now would not reach an already
    imported module: its config flag is switched and restored instead.
    """
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _size(uri: str, store: Store) -> int:
    fs, path = store.filesystem(uri)
    return fs.get_file_info(path).size or 0


def read_groups(files: list[InputFile]) -> list[list[int]]:
    """Files cut into read tasks: >= 4 per CPU of the cluster, <= READ_TASK_BYTES of input each (bounds its memory)."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return group_files(files, max(4 * cpus, math.ceil(sum(f.size for f in files) / READ_TASK_BYTES)))


def group_files(files: list[InputFile], groups: int) -> list[list[int]]:
    """Indices of `files` cut into at most `groups` runs of consecutive files with similar byte counts."""
    total = sum(max(f.size, 1) for f in files)
    out: list[list[int]] = [[]]
    done = 0
    for i, f in enumerate(files):
        size = max(f.size, 1)
        # A file opens the next run when its middle lies past the current run's share.
        if out[-1] and done + size / 2 >= total * len(out) / groups:
            out.append([])
        out[-1].append(i)
        done += size
    return out


def _lines(stream) -> Iterator[bytes]:
    """Lines of a pyarrow input stream (whose NativeFile has no readline), read in large chunks."""
    rest = b""
    while chunk := stream.read(_CHUNK):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def records(
    f: InputFile, text_field: str | None, store: Store
) -> Iterator[tuple[int, str | dict | None, str, str | None]]:
    """(key, text, where, drop_reason) for each record of one file, keys increasing.

    `text_field` None yields whole records (dicts) instead of one text field: SFT records (not for text files).
    """
    fs, path = store.filesystem(f.uri)
    if f.format == "text":
        with fs.open_input_stream(path) as stream:
            raw = stream.read()
        try:
            yield 0, raw.decode("utf-8"), f.uri, None
        except UnicodeDecodeError as exc:
            yield 0, None, f"{f.uri} (byte {exc.start})", "invalid_utf8"
    elif f.format == "jsonl":
        with fs.open_input_stream(path) as stream:
            for lineno, line in enumerate(_lines(stream), start=1):
                if not line.strip():
                    continue
                where = f"{f.uri}:{lineno}"
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    yield lineno, None, where, "invalid_utf8"
                    continue
                except json.JSONDecodeError:
                    yield lineno, None, where, "invalid_json"
                    continue
                if text_field is None:
                    yield lineno, record, where, None if isinstance(record, dict) else "missing_field"
                    continue
                value = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    yield lineno, None, where, "missing_field"
                else:
                    yield lineno, value, where, None
    else:
        with fs.open_input_file(path) as handle:
            if f.format == "arrow":  # datasets writes the IPC stream format
                reader = pa.ipc.open_stream(handle)
                names, batches = reader.schema.names, iter(reader)
            else:
                pf = pq.ParquetFile(handle)
                names = pf.schema_arrow.names
                batches = pf.iter_batches(columns=None if text_field is None else [text_field])
            if text_field is not None and text_field not in names:
                raise DataError(f"{f.uri}: {f.format} file has no column {text_field!r} (data.text_field); "
                                f"columns: {names}")
            row = 0
            for batch in batches:
                if text_field is None:
                    for value in batch.to_pylist():
                        yield row, value, f"{f.uri}#{row}", None
                        row += 1
                    continue
                column = batch.column(text_field)
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                    raise DataError(f"{f.uri}: column {text_field!r} has type {column.type}, expected string")
                for value in column.to_pylist():
                    yield row, value, f"{f.uri}#{row}", None if value is not None else "missing_field"
                    row += 1


def documents(
    files: list[InputFile], indices: list[int], data: DataConfig, store: Store, fmt: ChatFormat | None = None
) -> Iterator[tuple[int, str | tuple | None, str, str | None]]:
    """(position, document, where, drop_reason) for every record of `files[i]` for i in `indices`, in order.

    A document is the cleaned text (pretrain) or, with `fmt` (sft), the rendered record's (text, is_target)
    pieces. Raises DataError naming the file (and line) for unreadable files and, with on_bad_record=error,
    bad records.
    """
    for i in indices:
        f = files[i]
        try:
            for key, doc, where, reason in records(f, None if fmt else data.text_field, store):
                if reason is None and fmt is None:
                    doc, reason = clean(doc, data.min_chars)
                elif reason is None:
                    try:
                        doc = render(to_messages(doc, fmt.messages_field), fmt)
                        reason = "too_short" if sum(len(t) for t, _ in doc) < data.min_chars else None
                    except BadRecord as bad:
                        doc, reason = None, bad.reason
                if reason and data.on_bad_record == "error" and reason != "too_short":
                    raise DataError(f"{where}: bad record ({reason.replace('_', ' ')}); "
                                    "set data.on_bad_record=drop to count and skip such records")
                yield position(i, key), doc, where, reason
        except DataError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{f.uri}: unreadable as {f.format} ({exc})") from None
