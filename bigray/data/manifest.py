"""`manifest.json`: what `bigray prepare` wrote, and how training reads a split back."""

from __future__ import annotations

import json

from bigray.config import StorageConfig
from bigray.errors import DataError
from bigray.storage import Store, join

MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def _store(store: Store | StorageConfig | None) -> Store:
    # NOTE: accepts the storage section until bigray/train/trainer.py passes a Store (issue 12).
    return store if isinstance(store, Store) else Store(store or StorageConfig())


def read_manifest(uri: str, store: Store | None = None) -> tuple[dict, str]:
    """(manifest, its directory) from a manifest.json URI or the directory holding one."""
    store = _store(store)
    path = uri if uri.endswith(".json") else join(uri, "manifest.json")
    if not store.exists(path):
        raise DataError(f"{path}: no manifest; run `bigray prepare` first")
    return json.loads(store.read_bytes(path)), path.rsplit("/", 1)[0]


def load_split(manifest_uri: str, split: str = "train", store: Store | None = None):
    """A lazy, streaming Ray Dataset of a split's packed rows (column `tokens`, seq_len + 1 ids each)."""
    import ray.data

    store = _store(store)
    manifest, root = read_manifest(manifest_uri, store)
    if split not in manifest["splits"]:
        raise DataError(f"{manifest_uri}: no split {split!r}; splits: {sorted(manifest['splits'])}")
    shards = [s["path"] for s in manifest["splits"][split]["shards"]]
    if not shards:
        raise DataError(f"{manifest_uri}: split {split!r} is empty")
    fs, base = store.filesystem(root)
    return ray.data.read_parquet([f"{base}/{p}" for p in shards], filesystem=fs, columns=["tokens"])
