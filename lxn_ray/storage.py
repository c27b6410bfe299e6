"""One URI-addressed store for everything lxn_ray keeps: dataset versions, image blobs, caches, reports.

Every persistent thing goes through :class:`Storage`, so a local folder (``./lxn-store``, ``file://...``)
and an object store (``s3://bucket/prefix``) behave the same to the rest of the package. Paths inside
the store are always relative, ``/``-separated keys such as ``datasets/LATEST``.

Writes are atomic per object: locally a temporary file is renamed into place, on S3 a PUT is atomic.
Multi-object publications (a dataset version) are made atomic one level up by writing a commit marker
last (see :mod:`lxn_ray.dataset`).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

DEFAULT_STORAGE = "./lxn-store"


def default_storage_uri() -> str:
    """``$LXN_STORAGE`` when set, else ``./lxn-store`` - the default of every job's ``--storage``."""
    return os.environ.get("LXN_STORAGE") or DEFAULT_STORAGE


class StorageError(RuntimeError):
    """A storage URI that cannot be used, or a key that escapes the store."""


@dataclass(frozen=True)
class Storage:
    """A store rooted at ``uri``; all keys are relative to it."""

    uri: str
    filesystem: pafs.FileSystem
    root: str  # path of the store inside ``filesystem`` (no trailing slash)

    @classmethod
    def open(cls, uri: str | None = None) -> Storage:
        """Open (and for local paths create) the store at ``uri`` (default: :func:`default_storage_uri`)."""
        uri = uri or default_storage_uri()
        if "://" not in uri or uri.startswith("file://"):
            local = Path(uri.removeprefix("file://")).expanduser().resolve()
            local.mkdir(parents=True, exist_ok=True)
            return cls(uri=local.as_uri(), filesystem=pafs.LocalFileSystem(), root=str(local))
        if uri.startswith("s3://"):
            filesystem, root = pafs.FileSystem.from_uri(uri)
            return cls(uri=uri.rstrip("/"), filesystem=filesystem, root=root.rstrip("/"))
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    # -- addressing -------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The filesystem path of ``key``; refuses keys that would leave the store."""
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if not parts or any(p == ".." for p in parts):
            raise StorageError(f"invalid storage key {key!r}")
        return "/".join([self.root, *parts])

    def uri_of(self, key: str) -> str:
        """A full URI for ``key`` (what reports and model cards cite)."""
        return f"{self.uri.rstrip('/')}/{key.lstrip('/')}"

    # -- queries ----------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.filesystem.get_file_info(self.path(key)).type != pafs.FileType.NotFound

    def list(self, prefix: str) -> list[str]:
        """Keys of the direct children of ``prefix`` (files and folders), sorted; [] when absent."""
        folder = self.path(prefix) if prefix.strip("/") else self.root
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
        base = self.root + "/"
        return sorted(info.path.removeprefix(base) for info in self.filesystem.get_file_info(selector))

    # -- bytes ------------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        try:
            with self.filesystem.open_input_stream(self.path(key)) as stream:
                return stream.read()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{self.uri_of(key)} does not exist") from error

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically: readers see the old object or the new one, never half."""
        final = self.path(key)
        parent = final.rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        if not self.is_local:
            with self.filesystem.open_output_stream(final) as stream:
                stream.write(data)
            return
        temporary = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            self.filesystem.move(temporary, final)
        finally:
            if self.filesystem.get_file_info(temporary).type != pafs.FileType.NotFound:
                self.filesystem.delete_file(temporary)

    def delete_tree(self, key: str) -> None:
        """Remove ``key`` and everything below it (used to clear abandoned, unpublished work)."""
        if self.exists(key):
            self.filesystem.delete_dir(self.path(key))

    # -- structured -------------------------------------------------------------------------------
    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, json.dumps(value, indent=2, sort_keys=False, default=str).encode() + b"\n")

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def read_table(self, key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(key)))

    def write_table(self, key: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(key, buffer.getvalue())
