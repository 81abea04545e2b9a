"""Find input files and turn them into documents, counting (or failing on) bad records.

Every document carries `where` ("file:line" for jsonl, "file#row" for parquet, "file" for text)
so an error or a dropped record can be traced back to its source.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
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

DOC_SCHEMA = pa.schema([("text", pa.large_string()), ("where", pa.string()), ("reason", pa.string())])
_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_CHUNK = 4 << 20


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
    return [InputFile(f.uri, f.format, _size(f.uri, store)) for f in seen.values()]


def _size(uri: str, store: Store) -> int:
    fs, path = store.filesystem(uri)
    return fs.get_file_info(path).size or 0


def _lines(stream) -> Iterator[bytes]:
    """Lines of a pyarrow input stream (whose NativeFile has no readline), read in large chunks."""
    rest = b""
    while chunk := stream.read(_CHUNK):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _records(f: InputFile, text_field: str, store: Store) -> Iterator[tuple[str | None, str, str | None]]:
    """(text, where, drop_reason) for each record of one file."""
    fs, path = store.filesystem(f.uri)
    if f.format == "text":
        with fs.open_input_stream(path) as stream:
            raw = stream.read()
        try:
            yield raw.decode("utf-8"), f.uri, None
        except UnicodeDecodeError as exc:
            yield None, f"{f.uri} (byte {exc.start})", "invalid_utf8"
    elif f.format == "jsonl":
        with fs.open_input_stream(path) as stream:
            for lineno, line in enumerate(_lines(stream), start=1):
                if not line.strip():
                    continue
                where = f"{f.uri}:{lineno}"
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    yield None, where, "invalid_utf8"
                    continue
                except json.JSONDecodeError:
                    yield None, where, "invalid_json"
                    continue
                value = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    yield None, where, "missing_field"
                else:
                    yield value, where, None
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
                    yield value, f"{f.uri}#{row}", None if value is not None else "missing_field"
                    row += 1


def read_files(
    batch: dict, text_field: str, store: Store, on_bad_record: str, docs_per_batch: int
) -> Iterator[pa.Table]:
    """Ray Data map_batches UDF: rows of input files in, rows of documents out (streamed)."""
    rows: list[tuple] = []
    for uri, fmt, size in zip(batch["uri"], batch["format"], batch["size"]):
        f = InputFile(str(uri), str(fmt), int(size))
        try:
            for text, where, reason in _records(f, text_field, store):
                if reason and on_bad_record == "error":
                    raise DataError(f"{where}: bad record ({reason.replace('_', ' ')}); "
                                    "set data.on_bad_record=drop to count and skip such records")
                rows.append((text, where, reason))
                if len(rows) >= docs_per_batch:
                    yield _table(rows)
                    rows = []
        except DataError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{f.uri}: unreadable as {f.format} ({exc})") from None
    if rows:
        yield _table(rows)


def _table(rows: list[tuple]) -> pa.Table:
    text, where, reason = zip(*rows)
    columns = [pa.array(text, pa.large_string()), pa.array(where), pa.array(reason, pa.string())]
    return pa.Table.from_arrays(columns, schema=DOC_SCHEMA)


def documents(files: list[InputFile], data: DataConfig, store: Store):
    """A Ray Dataset of documents (text, where, reason) in input-file order."""
    import ray.data

    items = [{"uri": f.uri, "format": f.format, "size": f.size} for f in files]
    # Several blocks per CPU keep both cores busy while small files are batched into one task.
    blocks = max(1, min(len(items), 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))))
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        read_files,
        batch_size=None,
        fn_kwargs={"text_field": data.text_field, "store": store, "on_bad_record": data.on_bad_record,
                   "docs_per_batch": data.docs_per_task},
    )
