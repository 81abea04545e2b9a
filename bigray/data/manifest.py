"""`manifest.json`: what `bigray prepare` wrote, and how training reads a split back.

Version 2 lists, per split, the shard files (`shards`: path, rows, bytes) and every block
(`blocks`: id, path, row_group, rows, offset, length, start): a block is one parquet row group of
`block_rows` rows whose bytes are `length` bytes at `offset` of its file, so a reader fetches any
block with one ranged read (plus the file's footer once). `start` is the block's first row in the split.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from bigray.errors import DataError
from bigray.storage import Store, join

MANIFEST_VERSION = 2
SPLITS = ("train", "val")


def read_manifest(uri: str, store: Store | None = None) -> tuple[dict, str]:
    """(manifest, its directory) from a manifest.json URI or the directory holding one; v1 and v2 load."""
    store = store or Store()
    path = uri if uri.endswith(".json") else join(uri, "manifest.json")
    if not store.exists(path):
        raise DataError(f"{path}: no manifest; run `bigray prepare` first")
    manifest = json.loads(store.read_bytes(path))
    if manifest.get("version") not in (1, MANIFEST_VERSION):
        raise DataError(f"{path}: manifest version {manifest.get('version')!r}, this bigray reads 1 and "
                        f"{MANIFEST_VERSION}; re-run `bigray prepare` with this version")
    return manifest, path.rsplit("/", 1)[0]


def blocks(manifest: dict, split: str) -> list[dict]:
    """The addressable blocks of `split` (manifest v2); a v1 manifest has none and says how to get them."""
    if manifest.get("version", 1) < 2:
        raise DataError(f"manifest version {manifest.get('version')} (an older bigray prepare) lists shards, not "
                        "blocks; re-run `bigray prepare` to write a version 2 manifest")
    return manifest["splits"][split]["blocks"]


def load_split(manifest_uri: str, split: str = "train", store: Store | None = None):
    """A lazy, streaming Ray Dataset of a split's packed rows (`tokens`, seq_len + 1 ids each, plus the split's
    listed `loss_mask` / `segment_ids`)."""
    import ray.data

    store = store or Store()
    manifest, root = read_manifest(manifest_uri, store)
    if split not in manifest["splits"]:
        raise DataError(f"{manifest_uri}: no split {split!r}; splits: {sorted(manifest['splits'])}")
    shards = [s["path"] for s in manifest["splits"][split]["shards"]]
    if not shards:
        raise DataError(f"{manifest_uri}: split {split!r} is empty")
    fs, base = store.filesystem(root)
    columns = manifest["splits"][split].get("columns", ["tokens"])
    return ray.data.read_parquet([f"{base}/{p}" for p in shards], filesystem=fs, columns=columns)


def clear_previous(store: Store, output: str) -> None:
    """Remove shards and manifest of an earlier run so no stale shard outlives its manifest."""
    fs, out_dir = store.filesystem(output)
    fs.create_dir(out_dir, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(out_dir)):
        name = info.base_name
        if name == "manifest.json" or (name.endswith(".parquet") and name.split("-")[0] in SPLITS):
            fs.delete_file(info.path)
