"""bigray's byte-level BPE, checked against HF's own AutoTokenizer loading it (no Ray)."""

from __future__ import annotations

import pytest

from bigray.data.tokenizer import EOS, backend, load_tokenizer, train_bpe
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
