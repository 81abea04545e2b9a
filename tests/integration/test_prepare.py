"""`bigray prepare` on real Ray Data and the real S3 protocol (moto), checked against HF's tokenizer."""

from __future__ import annotations

import importlib
import json
import random
import unicodedata

import numpy as np
import pyarrow.parquet as pq
import pytest

from bigray.config import load_config
from bigray.data import load_split, prepare, read_manifest, train_tokenizer
from bigray.errors import DataError

WORDS = "alpha beta gamma delta ray train tune serve token shard packed stream zero stage".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for i in range(n)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, ray_cluster):
    """A small byte-level BPE trained by bigray itself, shared by the prepare tests."""
    root = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(root / "corpus.jsonl", make_docs(300, seed=99))
    tok = root / "tokenizer"
    cfg = load_config(overrides=[f"data.inputs=[{corpus}]", "data.vocab_size=300", f"data.tokenizer={tok}"])
    return train_tokenizer(cfg).uri


def cfg_for(inputs, output, tokenizer, *extra):
    return load_config(overrides=[
        f"data.inputs={json.dumps([str(i) for i in inputs])}", f"data.output={output}",
        f"data.tokenizer={tokenizer}", "data.seq_len=31", "data.val_fraction=0", "data.partitions=1", *extra,
    ])


def hf_stream(tokenizer_dir, docs):
    """The reference: HF AutoTokenizer (offline) encodes each doc, EOS appended, concatenated."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids = []
    for d in docs:
        ids += tok(unicodedata.normalize("NFC", d), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return np.array(ids)


def split_rows(out_dir, split):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    shards = manifest["splits"][split]["shards"]
    tables = [pq.read_table(out_dir / s["path"]) for s in shards]
    if not tables:
        return manifest, None
    return manifest, np.concatenate([np.stack(t["tokens"].to_numpy(zero_copy_only=False)) for t in tables])


def check_blocks(output: str, manifest: dict) -> None:
    """Every block of every split is its row group, fetched with one ranged read (plus its file's footer once)."""
    import pyarrow as pa

    from bigray.data.manifest import blocks
    from bigray.storage import Store, join

    assert manifest["version"] == 2
    for split, info in manifest["splits"].items():
        listed = blocks(manifest, split)
        assert sum(b["rows"] for b in listed) == info["rows"]
        assert [b["start"] for b in listed] == np.cumsum([0] + [b["rows"] for b in listed])[:-1].tolist()
        assert len({b["id"] for b in listed}) == len(listed)
        sizes = {s["path"]: s["bytes"] for s in info["shards"]}
        assert sorted({b["path"] for b in listed}) == sorted(sizes)
        footers = {}
        for block in listed:
            fs, path = Store().filesystem(join(output, block["path"]))
            with fs.open_input_file(path) as f:
                size = sizes[block["path"]]
                if block["path"] not in footers:
                    length = int.from_bytes(f.read_at(8, size - 8)[:4], "little") + 8
                    footers[block["path"]] = f.read_at(length, size - length)
                    whole = pq.ParquetFile(f)
                    assert whole.metadata.num_row_groups == sum(b["path"] == block["path"] for b in listed)
                data = f.read_at(block["length"], block["offset"])
                reference = pq.ParquetFile(f).read_row_group(block["row_group"])
            sparse = bytearray(size)
            sparse[block["offset"]: block["offset"] + block["length"]] = data
            sparse[size - len(footers[block["path"]]):] = footers[block["path"]]
            table = pq.ParquetFile(pa.BufferReader(bytes(sparse))).read_row_group(block["row_group"])
            assert table.num_rows == block["rows"] and table.equals(reference)
            if block is not listed[-1] and listed[listed.index(block) + 1]["path"] == block["path"]:
                assert block["rows"] == manifest["block_rows"], "only a file's last block may be short"


def test_local_roundtrip_reproduces_token_stream(tmp_path, tokenizer_dir):
    docs = make_docs(120)
    a = write_jsonl(tmp_path / "a.jsonl", docs[:70])
    b = tmp_path / "b.parquet"
    import pyarrow as pa

    pq.write_table(pa.table({"text": docs[70:]}), b)
    out = tmp_path / "out"
    result = prepare(cfg_for([a, b], out, tokenizer_dir, "data.shard_mb=0.0005", "data.block_rows=4"))

    manifest, rows = split_rows(out, "train")
    L = 32
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1, "shard_mb this small must give several shards"
    assert sum(s["rows"] for s in train["shards"]) == train["rows"] == len(rows)
    assert train["tokens"] == train["rows"] * L
    assert rows.shape[1] == L and rows.dtype == np.uint16
    expected = hf_stream(tokenizer_dir, docs)
    assert len(expected) - train["tokens"] == manifest["stats"]["tail_tokens_dropped"]["train"] < L
    np.testing.assert_array_equal(rows.reshape(-1), expected[: train["tokens"]])
    assert manifest["stats"]["docs_read"] == manifest["stats"]["docs_kept"] == 120
    assert manifest["tokenizer"]["eos_id"] == int(expected[-1])
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert result.tokens_per_s > 0 and result.splits["train"].rows == train["rows"]
    assert result.splits["train"].blocks == len(train["blocks"]) > len(train["shards"])
    check_blocks(str(out), manifest)


def test_s3_roundtrip_and_streaming_reader(tmp_path, s3, tokenizer_dir, ray_cluster):
    from bigray.storage import Store

    docs = make_docs(200, seed=3)
    client = s3.client()
    for i in range(2):
        body = "".join(json.dumps({"body": d}) + "\n" for d in docs[i::2])
        client.put_object(Bucket=s3.bucket, Key=f"raw/part-{i}.jsonl", Body=body)
    Store().copy_dir(tokenizer_dir, s3.uri("tok"))
    out = s3.uri("prepared")
    cfg = cfg_for([s3.uri("raw/*.jsonl")], out, s3.uri("tok"), "data.text_field=body", "data.val_fraction=0.2",
                  "data.partitions=3", "data.block_rows=8")
    prepare(cfg)

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix="prepared/")["Contents"]}
    manifest, _ = read_manifest(out)
    assert "prepared/manifest.json" in keys and "prepared/tokenizer/tokenizer.json" in keys
    for split in manifest["splits"].values():
        assert split["tokens"] == split["rows"] * 32
        assert sum(s["rows"] for s in split["shards"]) == split["rows"]
        assert all(f"prepared/{s['path']}" in keys for s in split["shards"])
    assert manifest["splits"]["val"]["rows"] > 0
    assert manifest["stats"]["docs_kept"] == 200
    check_blocks(out, manifest)

    ds = load_split(out, "train")
    batches = list(ds.iter_torch_batches(batch_size=8, drop_last=True))
    assert batches[0]["tokens"].shape == (8, 32)
    assert sum(len(b["tokens"]) for b in batches) == manifest["splits"]["train"]["rows"] // 8 * 8


def test_dedup_nfc_and_min_chars(tmp_path, tokenizer_dir):
    docs = make_docs(50)
    nfd = unicodedata.normalize("NFD", "café " * 20)
    corpus = docs + docs[:10] + ["tiny", nfd, unicodedata.normalize("NFC", nfd)]
    src = write_jsonl(tmp_path / "c.jsonl", corpus)
    out = tmp_path / "out"
    prepare(cfg_for([src], out, tokenizer_dir, "data.min_chars=10", "data.dedup=exact"))
    manifest, rows = split_rows(out, "train")
    stats = manifest["stats"]
    assert stats["docs_read"] == 63
    assert stats["dropped"] == {"duplicate": 11, "too_short": 1}
    assert stats["drop_examples"]["duplicate"] == f"{src}:51"
    expected = hf_stream(tokenizer_dir, docs + [nfd])
    np.testing.assert_array_equal(rows.reshape(-1), expected[: rows.size])

    prepare(cfg_for([src], out, tokenizer_dir, "data.min_chars=10", "data.dedup=false"))
    assert json.loads((out / "manifest.json").read_text())["stats"]["dropped"] == {"too_short": 1}


def test_split_is_deterministic_and_byte_identical(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(300, seed=5))
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        prepare(cfg_for([src], out, tokenizer_dir, "data.val_fraction=0.25", f"data.seed={seed}"))
        manifest = json.loads((out / "manifest.json").read_text())
        shards = {s["path"]: (out / s["path"]).read_bytes() for sp in manifest["splits"].values() for s in sp["shards"]}
        runs.append((manifest, shards))
    (ma, sa), (mb, sb), (mc, _) = runs
    assert sa == sb
    assert ma["stats"] == mb["stats"] and ma["splits"] == mb["splits"]
    assert 0 < ma["splits"]["val"]["rows"] < ma["splits"]["train"]["rows"]
    assert mc["splits"] != ma["splits"]


def test_prepare_trains_tokenizer_when_none_given(tmp_path, ray_cluster):
    from transformers import AutoTokenizer

    src = write_jsonl(tmp_path / "c.jsonl", make_docs(150))
    out = tmp_path / "out"
    prepare(load_config(overrides=[f"data.inputs=[{src}]", f"data.output={out}", "data.vocab_size=280",
                                   "data.seq_len=15"]))
    tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    assert tok.eos_token == "<|endoftext|>" and len(tok) == 280
    assert tok.decode(tok("doc 7: gamma ray")["input_ids"]) == "doc 7: gamma ray"


# --- bad input -------------------------------------------------------------------------------


def test_bad_records_are_counted(tmp_path, tokenizer_dir):
    good = make_docs(20)
    jl = tmp_path / "mixed.jsonl"
    jl.write_bytes(
        (json.dumps({"text": good[0]}) + "\n").encode()
        + b"{not json\n"
        + (json.dumps({"other": "x"}) + "\n").encode()
        + b'{"text": "bad \xff\xfe utf8"}\n'
        + (json.dumps({"text": 42}) + "\n").encode()
        + "".join(json.dumps({"text": d}) + "\n" for d in good[1:]).encode()
    )
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("caf\xe9 au lait".encode("latin-1"))
    out = tmp_path / "out"
    prepare(cfg_for([jl, txt], out, tokenizer_dir))
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["dropped"] == {"invalid_json": 1, "invalid_utf8": 2, "missing_field": 2}
    assert stats["drop_examples"]["invalid_json"] == f"{jl}:2"
    assert stats["drop_examples"]["missing_field"] == f"{jl}:3"
    assert stats["docs_kept"] == 20 and stats["docs_read"] == 25


def test_bad_record_error_policy_names_file_and_line(tmp_path, tokenizer_dir):
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"text": "fine document here"}) + "\n" + "{broken\n")
    with pytest.raises(DataError, match=rf"{jl}:2: bad record \(invalid json\)"):
        try:
            prepare(cfg_for([jl], tmp_path / "out", tokenizer_dir, "data.on_bad_record=error"))
        except Exception as exc:  # Ray wraps task errors; the CLI unwraps the same way
            from bigray.cli import user_error

            raise (user_error(exc) or exc) from None


@pytest.mark.parametrize("kind", ["missing_path", "missing_glob", "missing_bucket", "missing_prefix"])
def test_missing_inputs_fail_before_work(tmp_path, s3, tokenizer_dir, kind):
    target = {
        "missing_path": str(tmp_path / "nope.jsonl"),
        "missing_glob": str(tmp_path / "*.jsonl"),
        "missing_bucket": "s3://no-such-bucket-bigray/x.jsonl",
        "missing_prefix": s3.uri("absent/*.jsonl"),
    }[kind]
    with pytest.raises(DataError, match="no such|matched no files"):
        prepare(cfg_for([target], tmp_path / "out", tokenizer_dir))
    assert not (tmp_path / "out").exists()


def test_unreadable_file_is_an_error_naming_it(tmp_path, tokenizer_dir):
    from bigray.cli import user_error

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(Exception) as info:
        prepare(cfg_for([broken], tmp_path / "out", tokenizer_dir))
    err = user_error(info.value)
    assert isinstance(err, DataError) and f"{broken}: unreadable as parquet" in str(err)


def test_empty_corpus_is_an_error(tmp_path, tokenizer_dir):
    jl = tmp_path / "empty.jsonl"
    jl.write_text(json.dumps({"text": "hi"}) + "\n" + "{nope\n")
    with pytest.raises(DataError, match=r"empty corpus: 2 documents read .* 'invalid_json': 1"):
        prepare(cfg_for([jl], tmp_path / "out", tokenizer_dir, "data.min_chars=5"))
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- corpus scale: tasks, partitions, determinism, the driver --------------------------------


def planted_corpus(tmp_path, n_files=5, per_file=40):
    """jsonl files whose documents repeat within and across files (the repeats land in other read tasks)."""
    docs = make_docs(n_files * per_file, seed=11)
    rng = random.Random(4)
    files, corpus = [], []
    for k in range(n_files):
        part = docs[k * per_file: (k + 1) * per_file]
        part = [rng.choice(corpus) if corpus and rng.random() < 0.2 else d for d in part]
        corpus += part
        files.append(write_jsonl(tmp_path / f"in-{k}.jsonl", part))
    return files, corpus


def output_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_output_is_byte_identical_whatever_the_task_layout(tmp_path, tokenizer_dir, monkeypatch):
    """Read tasks and their batches are what the CPU count changes: one task, one per file, the cluster's default."""
    from bigray.data.read import read_groups

    prep = importlib.import_module("bigray.data.prepare")  # the package's `prepare` name is the function

    files, _ = planted_corpus(tmp_path)
    out = tmp_path / "out"
    layouts = {
        "one task, one doc per batch": (lambda fs: [list(range(len(fs)))], 1),
        "a task per file": (lambda fs: [[i] for i in range(len(fs))], 256),
        "cluster default": (read_groups, 7),
    }
    runs = {}
    for name, (groups, batch) in layouts.items():
        monkeypatch.setattr(prep, "read_groups", groups)
        prepare(cfg_for(files, out, tokenizer_dir, "data.partitions=3", "data.val_fraction=0.2", "data.block_rows=4",
                        f"data.docs_per_task={batch}"))
        runs[name] = output_bytes(out)
    first, *others = runs.values()
    assert sum(n.endswith(".parquet") for n in first) >= 4 and "manifest.json" in first
    for name, got in runs.items():
        assert got == first, f"{name} differs"


def test_exact_dedup_keeps_first_occurrence_across_partitions(tmp_path, tokenizer_dir, monkeypatch):
    from bigray.data.pack import partition_of
    from bigray.data.read import content_hash

    prep = importlib.import_module("bigray.data.prepare")

    files, corpus = planted_corpus(tmp_path)
    monkeypatch.setattr(prep, "read_groups", lambda fs: [[i] for i in range(len(fs))])
    out = tmp_path / "out"
    result = prepare(cfg_for(files, out, tokenizer_dir, "data.partitions=4", "data.docs_per_task=3"))

    kept, seen, first_dup = [], set(), None
    for i, doc in enumerate(corpus):
        if doc in seen:
            first_dup = first_dup or f"{files[i // 40]}:{i % 40 + 1}"
        else:
            seen.add(doc)
            kept.append(doc)
    assert result.dropped == {"duplicate": len(corpus) - len(kept)} and result.drop_examples["duplicate"] == first_dup
    parts = partition_of(np.array([content_hash(unicodedata.normalize("NFC", d)) for d in kept], dtype=np.uint64), 4)
    tail = 0
    for p in range(4):
        expected = hf_stream(tokenizer_dir, [d for d, q in zip(kept, parts) if q == p])
        shards = sorted(out.glob(f"train-{p:05d}-*.parquet"))
        rows = np.concatenate([np.stack(pq.read_table(s)["tokens"].to_numpy(zero_copy_only=False)) for s in shards])
        np.testing.assert_array_equal(rows.reshape(-1), expected[: rows.size])
        assert len(expected) - rows.size < 32
        tail += len(expected) - rows.size
    assert result.manifest["stats"]["tail_tokens_dropped"]["train"] == tail


def test_driver_receives_metadata_only(tmp_path, tokenizer_dir, monkeypatch):
    """Every object the driver gets from a task is small and holds no arrays, while MBs of tokens are written."""
    import pickle

    import ray

    received = []
    real_get = ray.get

    def spying_get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        received.append(value)
        return value

    def arrays(value):
        if isinstance(value, np.ndarray):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from arrays(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from arrays(v)

    docs = make_docs(10000, seed=8)
    files = [write_jsonl(tmp_path / f"big-{k}.jsonl", docs[k::4]) for k in range(4)]
    monkeypatch.setattr(ray, "get", spying_get)
    result = prepare(cfg_for(files, tmp_path / "out", tokenizer_dir, "data.partitions=4", "data.val_fraction=0.1"))
    monkeypatch.undo()
    token_bytes = result.tokens_kept * 2
    got = sum(len(pickle.dumps(v)) for v in received)
    assert token_bytes > 1_000_000
    assert not [a for v in received for a in arrays(v)], "the driver received arrays"
    assert got < token_bytes / 50, f"driver received {got:,} bytes for {token_bytes:,} bytes of tokens"


def test_minhash_drops_planted_near_duplicates_only(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    rng = random.Random(5)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(3000)]
    base = [[rng.choice(vocab) for _ in range(rng.randint(120, 200))] for _ in range(60)]
    variants = []
    for words in base[:40]:
        edited = list(words)
        for i in rng.sample(range(len(edited)), 3):
            edited[i] = rng.choice(vocab)
        variants.append(edited)
    texts = [" ".join(w) for w in base + variants]
    src = write_jsonl(tmp_path / "near.jsonl", texts)
    result = prepare(cfg_for([src], tmp_path / "out", tokenizer_dir, "data.dedup=minhash", "data.partitions=3"))

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

    def shingles(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return {tuple(ids[i: i + 5]) for i in range(len(ids) - 4)}

    sets = [shingles(t) for t in texts]
    jaccard = [len(sets[i] & sets[60 + i]) / len(sets[i] | sets[60 + i]) for i in range(40)]
    above = [i for i, j in enumerate(jaccard) if j >= 0.8]
    assert len(above) >= 30, f"planted pairs mostly above the threshold: {sorted(jaccard)}"
    # Which documents survived: each partition's rows are its kept documents' stream (EOS after each), cut at a row.
    eos = tok.eos_token_id
    complete, partials = set(), []
    for p in range(3):
        flat = np.concatenate([np.stack(pq.read_table(f)["tokens"].to_numpy(zero_copy_only=False)).reshape(-1)
                               for f in sorted((tmp_path / "out").glob(f"train-{p:05d}-*.parquet"))] or [np.zeros(0)])
        pieces = np.split(flat, np.flatnonzero(flat == eos) + 1)
        complete |= {tuple(x[:-1].tolist()) for x in pieces[:-1]}
        partials.append(tuple(pieces[-1].tolist()))
    ids = [tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]

    def kept(i):
        return ids[i] in complete or any(part and ids[i][: len(part)] == part for part in partials)

    assert all(kept(i) for i in range(60)), "an original (earlier in input order) or unrelated document was dropped"
    found = sum(not kept(60 + i) for i in above)
    assert found >= 0.9 * len(above), f"recall {found}/{len(above)}"
    assert result.docs_kept + result.dropped["near_duplicate"] == 100 and set(result.dropped) == {"near_duplicate"}
    later, earlier = result.drop_examples["near_duplicate"].split(" ~ ")
    assert int(later.rsplit(":", 1)[1]) > 60 and int(earlier.rsplit(":", 1)[1]) == int(later.rsplit(":", 1)[1]) - 60


def test_sft_from_a_saved_dataset_packs_masked_documents(tmp_path, tokenizer_dir, s3):
    """A `datasets` Dataset saved to disk (plus a jsonl file) -> task sft: masks against the template, drops named."""
    import datasets
    import pyarrow as pa
    from transformers import AutoTokenizer

    from bigray.data.sft import DEFAULT_CHAT_TEMPLATE

    rng = random.Random(3)
    convs = [[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))},
              {"role": "assistant", "content": f"answer {i}: " + " ".join(rng.choice(WORDS) for _ in range(3))}]
             for i in range(40)]
    convs[7] = [{"role": "user", "content": "no reply"}]
    convs[9] = [{"role": "user", "content": "long " * 80}, {"role": "assistant", "content": "x"}]
    datasets.Dataset.from_dict({"messages": convs}).save_to_disk(str(tmp_path / "ds"))
    extra = tmp_path / "more.jsonl"
    extra.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" +
                     json.dumps({"messages": [{"role": "wizard", "content": "?"}]}) + "\n")
    out = tmp_path / "out"
    result = prepare(cfg_for([tmp_path / "ds", extra], out, tokenizer_dir, "data.task=sft", "data.partitions=2",
                             "data.seq_len=127"))

    manifest = result.manifest
    arrow = str(tmp_path / "ds" / "data-00000-of-00001.arrow")
    assert result.dropped == {"no_assistant_turn": 1, "too_long": 1, "unknown_role": 1}
    assert result.drop_examples == {"no_assistant_turn": f"{arrow}#7", "too_long": f"{arrow}#9",
                                    "unknown_role": f"{extra}:2"}
    assert manifest["splits"]["train"]["columns"] == ["tokens", "loss_mask", "segment_ids"]
    assert manifest["sft"]["chat_template"] == DEFAULT_CHAT_TEMPLATE and manifest["sft"]["train_on"] == "assistant"
    check_blocks(str(out), manifest)
    table = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("train-*.parquet"))])
    assert table.schema.names == ["tokens", "loss_mask", "segment_ids"]
    tokens, mask, seg = (np.stack(table[c].to_numpy(zero_copy_only=False)) for c in table.schema.names)
    assert mask.dtype == np.uint8 and seg.dtype == np.int32 and tokens.shape == mask.shape == (len(table), 128)
    assert len(np.unique(seg[0])) > 2, "several conversations share a row"
    assert load_split(str(out), "train").columns() == ["tokens", "loss_mask", "segment_ids"]
    assert manifest["stats"]["pad_tokens"]["train"] == int((mask == 0).sum() - sum(
        (m[s == d] == 0).sum() for t, m, s in zip(tokens, mask, seg) for d in np.unique(s) if m[s == d].any()))

    # The reference: HF renders the prompt with the template saved beside the shards and tokenizes it; each
    # document of a row is that prompt (mask 0) then the assistant's reply and EOS (mask 1), then a newline.
    tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    wanted = {}
    for c in [*convs, [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]]:
        prompt = tok.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=False)
        reply = tok(" " + c[-1]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        wanted[tuple(tok(prompt, add_special_tokens=False)["input_ids"])] = reply
    seen = 0
    for t, m, s in zip(tokens, mask, seg):
        for d in np.unique(s):
            ids, targets = t[s == d].tolist(), m[s == d]
            if not targets.any():
                continue  # padding
            n = int(np.argmax(targets))
            assert wanted[tuple(ids[:n])] == ids[n: n + int(targets.sum())] and not targets[n:].all()
            assert targets[n: n + int(targets.sum())].all()
            seen += 1
    assert seen == result.docs_kept == 39

    # The same dir on S3: found by its state.json, its Arrow file streamed through the Store's filesystem.
    from bigray.config import DataConfig
    from bigray.data.read import records, resolve_inputs
    from bigray.storage import Store

    Store().copy_dir(str(tmp_path / "ds"), s3.uri("chats-ds"))
    files = resolve_inputs(DataConfig(inputs=[s3.uri("chats-ds")]), Store())
    assert [(f.uri, f.format) for f in files] == [(s3.uri("chats-ds", "data-00000-of-00001.arrow"), "arrow")]
    assert [r[1]["messages"] for r in records(files[0], None, Store())] == convs
