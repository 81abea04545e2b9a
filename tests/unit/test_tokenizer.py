"""bigray's byte-level BPE, checked against HF's own AutoTokenizer loading it (no Ray)."""

from __future__ import annotations

import pytest

from bigray.data.tokenizer import EOS, backend, copy_tokenizer, load_tokenizer, train_bpe
from bigray.errors import DataError
from bigray.storage import Store

TEXTS = [f"def f{i}(x):\n    return x * {i} + 'café'\n" for i in range(200)]


def test_trained_bpe_loads_in_transformers_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    train_bpe(TEXTS, 300, str(tmp_path))
    info = load_tokenizer(str(tmp_path), Store())
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert info.vocab_size == len(hf) == 300 and info.eos_id == hf.convert_tokens_to_ids(EOS)
    text = "def g(y):\n    return 'naïve ☃'"
    ids = backend(info.json).encode(text, add_special_tokens=False).ids
    assert ids == hf(text, add_special_tokens=False)["input_ids"] and hf.decode(ids) == text


def test_load_tokenizer_errors_name_the_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"), Store())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a loadable HF tokenizer dir"):
        load_tokenizer(str(tmp_path / "empty"), Store())


def test_a_tokenizer_in_a_model_dir_travels_without_the_model(tmp_path):
    """data.tokenizer = model.pretrained: the shards' tokenizer/ (copied into every checkpoint and the export)
    must not carry the base model's weights or config, or the export ships the base model."""
    model_dir, out = tmp_path / "model", tmp_path / "out"
    train_bpe(TEXTS, 300, str(model_dir))
    tokenizer_files = sorted(p.name for p in model_dir.iterdir())
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "config.json", "generation_config.json"):
        (model_dir / name).write_bytes(b"weights")
    copy_tokenizer(str(model_dir), str(out), Store())
    assert sorted(p.name for p in out.iterdir()) == tokenizer_files
    assert load_tokenizer(str(out), Store()).vocab_size == 300
