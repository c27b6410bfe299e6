"""One URI-addressed store for everything lxn_ray keeps: dataset versions, image blobs, caches, reports.

Every persistent thing goes through :class:`Storage`, so a local folder (``./lxn-store``, ``file://...``)
and an object store (``s3://bucket/prefix``) behave the same to the rest of the package. Paths inside
the store are always relative, ``/``-separated keys such as ``datasets/LATEST``.

Writes are atomic per object: locally a temporary file is renamed into place, on S3 a PUT is atomic.
Multi-object publications (a dataset version) are made atomic one level up by writing a commit marker
last (see :mod:`lxn_ray.data.dataset`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
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
            root = uri.removeprefix("s3://").rstrip("/")
            filesystem = _s3_filesystem(root.split("/", 1)[0], os.environ.get("AWS_ENDPOINT_URL"))
            return cls(uri=uri.rstrip("/"), filesystem=filesystem, root=root)
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
        if not self.is_local:  # one PutObject: atomic, and no multipart upload to complete or leave behind
            self._s3_put(key, data)
            return
        self.filesystem.create_dir(parent, recursive=True)
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

    # -- conditional writes (leases) ----------------------------------------------------------------
    # Objects that several processes race for (a lock) need compare-and-swap, not just atomic writes.
    # S3 has it natively (conditional PUT: If-None-Match / If-Match, boto3 honouring AWS_ENDPOINT_URL);
    # locally an exclusive hard link creates, and a compare-then-replace under a kernel file lock swaps.
    # A token names one written state of an object: the S3 ETag, or locally inode + mtime + size + digest.

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` unless it exists; True when this call created it.

        Of any number of concurrent callers exactly one gets True, and readers never see a partial object
        (locally the bytes are written to a temporary file first and hard-linked into place).
        """
        if not self.is_local:
            return self._s3_put(key, data, IfNoneMatch="*")
        final = self.path(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        temporary = f"{final}.new-{uuid.uuid4().hex}"
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, final)  # fails if ``final`` exists: the atomic "create if absent"
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            return self._create_exclusive_unlinked(final, data)
        finally:
            os.unlink(temporary)

    @staticmethod
    def _create_exclusive_unlinked(final: str, data: bytes) -> bool:
        try:
            descriptor = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        return True

    def read_with_token(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and a token naming this written state of it; None when absent."""
        if not self.is_local:
            from botocore.exceptions import ClientError

            bucket, name = self._s3_location(key)
            try:
                response = s3_client().get_object(Bucket=bucket, Key=name)
            except ClientError as error:
                if _s3_error_code(error) in ("NoSuchKey", "404"):
                    return None
                raise
            return response["Body"].read(), response["ETag"]
        try:
            with open(self.path(key), "rb") as stream:
                data, info = stream.read(), os.fstat(stream.fileno())
        except FileNotFoundError:
            return None
        return data, _local_token(info, data)

    def replace_if_unchanged(self, key: str, data: bytes, token: str) -> bool:
        """Replace ``key`` only if it is still the state ``token`` names (compare-and-swap); of callers
        racing with the same token at most one succeeds, and the object is never absent meanwhile.

        S3: a conditional PUT (If-Match). Locally: compare and replace under :meth:`_guard`.
        """
        if not self.is_local:
            return self._s3_put(key, data, IfMatch=token)
        with self._guard(key):
            current = self.read_with_token(key)
            if current is None or current[1] != token:
                return False
            self.write_bytes(key, data)
            return True

    def delete_if_unchanged(self, key: str, token: str) -> bool:
        """Delete ``key`` only if it is still the state ``token`` names (releasing one's own lease only)."""
        if self.is_local:
            with self._guard(key):
                current = self.read_with_token(key)
                if current is None or current[1] != token:
                    return False
                os.unlink(self.path(key))
                return True
        from botocore.exceptions import ClientError

        bucket, name = self._s3_location(key)
        client = s3_client()
        try:
            client.delete_object(Bucket=bucket, Key=name, IfMatch=token)
            return True
        except ClientError as error:
            code = _s3_error_code(error)
            if code in ("PreconditionFailed", "412", "NoSuchKey", "404", "ConditionalRequestConflict"):
                return False
            if code not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                raise
        # A store without conditional DELETE: compare, then delete (the instant between the two is open
        # only to a contender taking over an expired lease).
        current = self.read_with_token(key)
        if current is None or current[1] != token:
            return False
        client.delete_object(Bucket=bucket, Key=name)
        return True

    @contextlib.contextmanager
    def _guard(self, key: str) -> Iterator[None]:
        """Local compare-and-swap: an exclusive ``flock`` on ``<key>.guard`` (kept, empty) serialises the
        compare and the replace among processes and threads. The kernel drops it if its holder dies, so it
        never goes stale; Linux NFS clients map it to NFS byte-range locks.

        Why not rename the old object aside and create anew: a contender whose read is outdated would move
        a fresh object aside, and everyone reading in that instant would see no object at all.
        """
        import fcntl

        final = self.path(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        descriptor = os.open(f"{final}.guard", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the flock

    # -- S3 -------------------------------------------------------------------------------------------
    def _s3_location(self, key: str) -> tuple[str, str]:
        bucket, _, name = self.path(key).partition("/")
        return bucket, name

    def _s3_put(self, key: str, data: bytes, **condition: str) -> bool:
        """A conditional PUT; False when the condition does not hold (or a racing conditional write won)."""
        from botocore.exceptions import ClientError

        bucket, name = self._s3_location(key)
        try:
            s3_client().put_object(Bucket=bucket, Key=name, Body=data, **condition)
        except ClientError as error:
            if _s3_error_code(error) in (
                "PreconditionFailed",
                "412",
                "ConditionalRequestConflict",
                "409",
                "NoSuchKey",
                "404",
            ):
                return False
            raise
        return True


@functools.cache
def _s3_filesystem(bucket: str, endpoint: str | None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for ``bucket``, made once per process: Ray Data and Serve open the store
    per batch and per replica, and finding the bucket's region is a request to S3.

    ``endpoint`` (``AWS_ENDPOINT_URL``) names an S3-compatible server instead of AWS. Delayed open makes an
    object that fits one part a single PutObject - no multipart upload to complete or leave behind; Ray
    Train and Tune checkpoint through this filesystem too.
    """
    if endpoint:
        region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        server = {"endpoint_override": endpoint, "scheme": endpoint.split("://")[0]}
    else:
        region, server = pafs.resolve_s3_region(bucket), {}
    return pafs.S3FileSystem(region=region, allow_delayed_open=True, **server)


@functools.cache
def s3_client():
    """One boto3 S3 client per process, shared by storage and S3 sources. Credentials, region and
    ``AWS_ENDPOINT_URL`` come from the environment (an instance profile on a cluster); timeouts are
    bounded and transient errors (throttling, 5xx, resets) retried."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=30, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", config=config)


def _local_token(info: os.stat_result, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()[:16]
    return f"{info.st_ino}-{info.st_mtime_ns}-{info.st_size}-{digest}"


def _s3_error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
