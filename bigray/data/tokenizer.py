"""Train a byte-level BPE with HF `tokenizers`, or load an existing HF tokenizer dir."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

from bigray import storage
from bigray.config import StorageConfig
from bigray.errors import DataError

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the workers and the manifest need: the fast tokenizer as JSON, and its facts."""

    json: str
    local_dir: str
    vocab_size: int
    eos_id: int
    sha256: str


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> None:
    """Byte-level BPE (GPT-2 style: any byte sequence encodes, no unknown token), saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    hf.save_pretrained(out_dir)
    # transformers 5 writes its own backend class name; the generic fast class loads in 4.x and 5.x.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)


def load_tokenizer(uri: str, storage_cfg: StorageConfig | None = None) -> TokenizerInfo:
    """Load an HF tokenizer dir (local or s3://) offline; it must be a fast tokenizer with an EOS token."""
    from transformers import AutoTokenizer

    if not storage.exists(uri, storage_cfg):
        raise DataError(f"data.tokenizer: {uri} does not exist; train one with `bigray tokenizer train` or set data.tokenizer=null")
    local = storage.local_dir(uri, storage_cfg)
    try:
        tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"data.tokenizer: {uri} is not a loadable HF tokenizer dir ({exc})") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"data.tokenizer: {uri} has no fast (tokenizers) backend; add a tokenizer.json")
    if tok.eos_token_id is None:
        raise DataError(f"data.tokenizer: {uri} defines no eos_token; documents are joined with EOS")
    text = tok.backend_tokenizer.to_str()
    return TokenizerInfo(text, local, len(tok), tok.eos_token_id, hashlib.sha256(text.encode()).hexdigest())


@functools.lru_cache(maxsize=2)
def backend(tokenizer_json: str):
    """The Rust tokenizer, built once per worker process and reused for every batch."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def save_dir(train_fn, out_uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Run `train_fn(local_dir)` and put the result at `out_uri` (local or s3://)."""
    if not storage.is_remote(out_uri):
        os.makedirs(storage.filesystem(out_uri)[1], exist_ok=True)
        train_fn(storage.filesystem(out_uri)[1])
        return
    with tempfile.TemporaryDirectory(prefix="bigray-tok-") as tmp:
        train_fn(tmp)
        storage.copy_dir(tmp, out_uri, storage_cfg)
