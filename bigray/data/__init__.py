"""Data preparation: raw text -> tokenized, packed parquet shards + manifest.json."""

from bigray.data.manifest import load_split, read_manifest
from bigray.data.prepare import PrepareResult, prepare
from bigray.data.tokenizer import TokenizerInfo, load_tokenizer, train_tokenizer

__all__ = [
    "PrepareResult", "TokenizerInfo", "load_split", "load_tokenizer", "prepare", "read_manifest", "train_tokenizer",
]
