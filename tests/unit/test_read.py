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


def test_saved_datasets_are_their_arrow_files_read_row_by_row(tmp_path):
    import datasets

    rows = {"text": ["a", "b", None], "messages": [[{"role": "user", "content": "hi"}]] * 3}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "one"), num_shards=2)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "nodefault"))

    files = resolve_inputs(DataConfig(inputs=[str(tmp_path / "one"), str(tmp_path / "dict")]), Store())
    assert [(f.uri.removeprefix(str(tmp_path)), f.format) for f in files] == [
        ("/one/data-00000-of-00002.arrow", "arrow"), ("/one/data-00001-of-00002.arrow", "arrow"),
        ("/dict/train/data-00000-of-00001.arrow", "arrow")]
    assert files[0].size > 0
    texts = [r for f in files[:2] for r in records(f, "text", Store())]
    assert [(k, t, r) for k, t, _, r in texts] == [(0, "a", None), (1, "b", None), (0, None, "missing_field")]
    assert texts[1][2] == f"{files[0].uri}#1"
    whole = list(records(files[2], None, Store()))
    assert [r[1] for r in whole] == ds.to_list()
    with pytest.raises(DataError, match="without a train split.*nodefault/test"):
        resolve_inputs(DataConfig(inputs=[str(tmp_path / "nodefault")]), Store())


def test_hub_ids_load_offline_from_the_cache_or_say_so(tmp_path, monkeypatch):
    """hf:org/name is found in the datasets cache (a hub-style cache entry built here); anything else is a DataError."""
    import shutil

    import datasets

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(5)))
    built = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(tmp_path / "build"))
    entry = tmp_path / "cache" / "org___name" / "default" / "0.0.0" / "abc"
    entry.mkdir(parents=True)
    shutil.copy(built.cache_files[0]["filename"], entry / "name-train.arrow")
    info = json.loads((tmp_path / "build").glob("json/*/0.0.0/*/dataset_info.json").__next__().read_text())
    (entry / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default", "builder_name": "name",
                                                         "dataset_name": "name"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    files = resolve_inputs(DataConfig(inputs=["hf:org/name:train"]), Store())
    assert [(f.uri, f.format) for f in files] == [(str(entry / "name-train.arrow"), "arrow")]
    assert [r[1] for r in records(files[0], None, Store())] == built.to_list()
    assert datasets.config.HF_HUB_OFFLINE is False, "offline mode is switched on only while loading"
    with pytest.raises(DataError, match="hf:org/missing: not in the local datasets cache"):
        resolve_inputs(DataConfig(inputs=["hf:org/missing"]), Store())
