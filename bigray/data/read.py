"""Find input files and turn them into documents, counting (or failing on) bad records.

Every document has a position: its file's index in the sorted input list and its record key in
that file (line number for jsonl, row for parquet, 0 for a text file), packed into one int64 that
sorts in input order. Positions make dedup keep the first occurrence and make the output
independent of how files are grouped into tasks. `where` ("file:line", "file#row", "file") names
a document's source in errors and drop examples.
"""

from __future__ import annotations

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
from bigray.errors import DataError
from bigray.storage import Store

_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
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
    return {"jsonl": f"{f.uri}:{key}", "parquet": f"{f.uri}#{key}"}.get(f.format, f.uri)


def resolve_inputs(data: DataConfig, store: Store) -> list[InputFile]:
    """Expand `data.inputs` to a sorted, de-duplicated file list; a pattern matching nothing is an error."""
    if not data.inputs:
        raise DataError("data.inputs is empty: give local paths, globs or s3:// URIs")
    seen: dict[str, InputFile] = {}
    exclude = [p.replace("{stdlib}", stdlib_dir()) for p in data.exclude]
    for pattern in data.inputs:
        pattern = pattern.replace("{stdlib}", stdlib_dir())
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


def records(f: InputFile, text_field: str, store: Store) -> Iterator[tuple[int, str | None, str, str | None]]:
    """(key, text, where, drop_reason) for each record of one file, keys increasing."""
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
                value = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    yield lineno, None, where, "missing_field"
                else:
                    yield lineno, value, where, None
    else:
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            if text_field not in pf.schema_arrow.names:
                raise DataError(f"{f.uri}: parquet file has no column {text_field!r} (data.text_field); "
                                f"columns: {pf.schema_arrow.names}")
            row = 0
            for batch in pf.iter_batches(columns=[text_field]):
                column = batch.column(0)
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                    raise DataError(f"{f.uri}: column {text_field!r} has type {column.type}, expected string")
                for value in column.to_pylist():
                    yield row, value, f"{f.uri}#{row}", None if value is not None else "missing_field"
                    row += 1


def documents(
    files: list[InputFile], indices: list[int], data: DataConfig, store: Store
) -> Iterator[tuple[int, str | None, str, str | None]]:
    """(position, cleaned text, where, drop_reason) for every record of `files[i]` for i in `indices`, in order.

    Raises DataError naming the file (and line) for unreadable files and, with on_bad_record=error, bad records.
    """
    for i in indices:
        f = files[i]
        try:
            for key, text, where, reason in records(f, data.text_field, store):
                if reason and data.on_bad_record == "error":
                    raise DataError(f"{where}: bad record ({reason.replace('_', ' ')}); "
                                    "set data.on_bad_record=drop to count and skip such records")
                if reason is None:
                    text, reason = clean(text, data.min_chars)
                yield position(i, key), text, where, reason
        except DataError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{f.uri}: unreadable as {f.format} ({exc})") from None
