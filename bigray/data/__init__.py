"""Data preparation: raw text -> tokenized, packed parquet shards + manifest.json."""

from bigray.data.prepare import load_split, prepare, read_manifest, train_tokenizer
from bigray.data.tokenizer import load_tokenizer

__all__ = ["load_split", "load_tokenizer", "prepare", "read_manifest", "train_tokenizer"]
