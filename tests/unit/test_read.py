"""Finding inputs and reading records, without Ray: each record carries where it came from."""

from __future__ import annotations

import json
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigray.config import DataConfig
from bigray.data.read import InputFile, clean, content_hash, group_files, position, records, resolve_inputs, where_of
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
    got = list(records(InputFile(str(path), "jsonl", 0), "text", Store()))
    expected = [(1, "one", None), (3, None, "invalid_json"), (4, None, "missing_field"), (5, None, "invalid_utf8"),
                (6, "two", None)]
    assert [(k, t, r) for k, t, _, r in got] == expected
    assert [w for _, _, w, _ in got] == [f"{path}:{k}" for k, _, _, _ in got]


def test_parquet_and_text_records(tmp_path):
    pq.write_table(pa.table({"body": ["a", None, "c"]}), tmp_path / "x.parquet")
    got = list(records(InputFile(str(tmp_path / "x.parquet"), "parquet", 0), "body", Store()))
    expected = [(0, "a", "0", None), (1, None, "1", "missing_field"), (2, "c", "2", None)]
    assert [(k, t, w.rsplit("#", 1)[1], r) for k, t, w, r in got] == expected
    with pytest.raises(DataError, match="no column 'text'"):
        list(records(InputFile(str(tmp_path / "x.parquet"), "parquet", 0), "text", Store()))
    (tmp_path / "t.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert list(records(InputFile(str(tmp_path / "t.txt"), "text", 0), "text", Store()))[0][3] == "invalid_utf8"


def test_clean_is_nfc_and_hash_sees_the_cleaned_text():
    nfd = unicodedata.normalize("NFD", "café au lait")
    text, reason = clean(nfd, min_chars=3)
    assert text == unicodedata.normalize("NFC", nfd) and reason is None
    assert clean("ab", min_chars=3)[1] == "too_short"
    assert content_hash(text) == content_hash(clean(text, 0)[0]) != content_hash(nfd)
    assert json.dumps(content_hash("x")).isdigit()


def test_positions_sort_in_input_order_and_name_their_source():
    files = [InputFile("a.jsonl", "jsonl", 0), InputFile("b.parquet", "parquet", 0), InputFile("c.txt", "text", 0)]
    pos = [position(0, 7), position(0, 1 << 30), position(1, 0), position(1, 3), position(2, 0)]
    assert pos == sorted(pos)
    expected = ["a.jsonl:7", f"a.jsonl:{1 << 30}", "b.parquet#0", "b.parquet#3", "c.txt"]
    assert [where_of(files, p) for p in pos] == expected


def test_group_files_cuts_consecutive_runs_by_bytes():
    files = [InputFile(str(i), "text", size) for i, size in enumerate([10, 10, 10, 10, 40, 0, 0])]
    assert group_files(files, 2) == [[0, 1, 2, 3], [4, 5, 6]]
    assert group_files(files, 100) == [[i] for i in range(7)]
    assert group_files(files, 1) == [list(range(7))]
