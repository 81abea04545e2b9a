"""Paths that may be local or on S3, through pyarrow's filesystems (what Ray Data uses too)."""

from __future__ import annotations

import fnmatch
import glob as _glob
import os
import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from bigray.config import StorageConfig
from bigray.errors import DataError

_WILDCARDS = "*?["


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts) if is_remote(uri) else os.path.join(uri, *parts)


def _scheme(uri: str) -> str:
    return uri[: uri.index("://") + 3] if is_remote(uri) else ""


@dataclass(frozen=True)
class Store:
    """Object-store access for one config's `storage` section: made once per command, passed inward.

    Picklable (a frozen dataclass of strings), so it travels to Ray tasks, actors and Train workers.
    Paths are plain strings: local paths, `file://` or `s3://` URIs; `join` and `is_remote` need no
    store and stay module functions.
    """

    cfg: StorageConfig = field(default_factory=StorageConfig)

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem for `uri` and the path inside it.

        s3:// honours `storage.endpoint_url` (else AWS_ENDPOINT_URL, as boto3 does) so the same code
        talks to AWS, MinIO or a local moto server.
        """
        if uri.startswith("s3://"):
            endpoint = self.cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            region = (self.cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                      or "us-east-1")
            fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region, allow_bucket_creation=True)
            return fs, uri[len("s3://"):].rstrip("/")
        if is_remote(uri):
            fs, path = pafs.FileSystem.from_uri(uri)
            return fs, path
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))

    def expand(self, pattern: str) -> list[str]:
        """Files matched by a path, directory (recursive) or glob; sorted; [] when nothing matches.

        Raises DataError when the location itself (directory, bucket) does not exist.
        """
        if not is_remote(pattern):
            path = os.path.expanduser(pattern[len("file://"):] if pattern.startswith("file://") else pattern)
            if any(c in path for c in _WILDCARDS):
                return sorted(p for p in _glob.glob(path, recursive=True) if os.path.isfile(p))
            if os.path.isdir(path):
                return sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
            if os.path.isfile(path):
                return [path]
            raise DataError(f"{pattern}: no such file or directory")
        fs, path = self.filesystem(pattern)
        scheme = _scheme(pattern)
        wild = min((path.index(c) for c in _WILDCARDS if c in path), default=None)
        base = path if wild is None else path[: path.rfind("/", 0, wild) + 1].rstrip("/")
        try:
            info = fs.get_file_info(base)
        except OSError as exc:
            raise DataError(f"{pattern}: cannot access ({exc})") from None
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{scheme}{base}: no such bucket, prefix or object")
        if info.type == pafs.FileType.File:
            return [scheme + base] if wild is None else []
        try:
            found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        except OSError as exc:
            raise DataError(f"{pattern}: cannot list ({exc})") from None
        files = sorted(f.path for f in found if f.type == pafs.FileType.File)
        if wild is not None:
            files = [f for f in files if fnmatch.fnmatchcase(f, path)]
        return [scheme + f for f in files]

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self.filesystem(uri)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode()

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode())

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def copy_dir(self, src: str, dst: str) -> None:
        """Copy a directory tree between any two of local / S3."""
        src_fs, src_path = self.filesystem(src)
        dst_fs, dst_path = self.filesystem(dst)
        dst_fs.create_dir(dst_path, recursive=True)
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)

    def local_dir(self, uri: str) -> str:
        """A local directory holding `uri`'s files: itself when local, else a fresh temporary copy."""
        if not is_remote(uri):
            return self.filesystem(uri)[1]
        target = tempfile.mkdtemp(prefix="bigray-")
        self.copy_dir(uri, target)
        return target
