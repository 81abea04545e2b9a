"""Finding inputs and reading records, without Ray: each record carries where it came from."""

from __future__ import annotations

import json
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigray.config import DataConfig
from bigray.data.read import InputFile, _records, clean, content_hash, resolve_inputs
from bigray.errors import DataError
from bigray.storage import Store


def test_resolve_inputs_sorts_dedups_excludes_and_picks_formats(tmp_path):
    for name in ("b.jsonl", "a.parquet", "c.txt", "skip.jsonl"):
        (tmp_path / name).write_bytes(b"x")
    data = DataConfig(inputs=[str(tmp_path), str(tmp_path / "*.jsonl")], exclude=["*skip*"])
    files = resolve_inputs(data, Store())
    assert [(f.uri.rsplit("/", 1)[1], f.format, f.size) for f in files] == [
        ("a.parquet", "parquet", 1), ("b.jsonl", "jsonl", 1), ("c.txt", "text", 1)]
    with pytest.raises(DataError, match="matched no files"):
        resolve_inputs(DataConfig(inputs=[str(tmp_path / "*.none")]), Store())


def test_jsonl_records_name_file_and_line_and_reason(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "one"}\n\n{bad\n{"other": 1}\n{"text": "\xff"}\n{"text": "two"}')
    got = list(_records(InputFile(str(path), "jsonl", 0), "text", Store()))
    assert got == [("one", f"{path}:1", None), (None, f"{path}:3", "invalid_json"),
                   (None, f"{path}:4", "missing_field"),
                   (None, f"{path}:5", "invalid_utf8"), ("two", f"{path}:6", None)]


def test_parquet_and_text_records(tmp_path):
    pq.write_table(pa.table({"body": ["a", None, "c"]}), tmp_path / "x.parquet")
    got = list(_records(InputFile(str(tmp_path / "x.parquet"), "parquet", 0), "body", Store()))
    expected = [("a", "0", None), (None, "1", "missing_field"), ("c", "2", None)]
    assert [(t, w.rsplit("#", 1)[1], r) for t, w, r in got] == expected
    with pytest.raises(DataError, match="no column 'text'"):
        list(_records(InputFile(str(tmp_path / "x.parquet"), "parquet", 0), "text", Store()))
    (tmp_path / "t.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert list(_records(InputFile(str(tmp_path / "t.txt"), "text", 0), "text", Store()))[0][2] == "invalid_utf8"


def test_clean_is_nfc_and_hash_sees_the_cleaned_text():
    nfd = unicodedata.normalize("NFD", "café au lait")
    text, reason = clean(nfd, min_chars=3)
    assert text == unicodedata.normalize("NFC", nfd) and reason is None
    assert clean("ab", min_chars=3)[1] == "too_short"
    assert content_hash(text) == content_hash(clean(text, 0)[0]) != content_hash(nfd)
    assert json.dumps(content_hash("x")).isdigit()
