"""Steps 2 and 3 of ingest, and the storing of step 6: a row's file read safely and hashed (or an exclusion
with the reason), remote sources fetched by Ray Data tasks on the workers, contents decoded and
fingerprinted on Ray Data (tasks that read the files themselves) with a cache by sha256, and image bytes
stored by content."""

from __future__ import annotations

import hashlib
import io
import math
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from lxn_ray.data import dataset
from lxn_ray.data.settings import IngestConfig
from lxn_ray.dedupe.fingerprint import FINGERPRINT_COLUMNS, FINGERPRINT_VERSION, fingerprint_film
from lxn_ray.dedupe.thumbs import THUMB_ROWS_PER_GROUP, ThumbRef, compression_for, refs_of_shard
from lxn_ray.images.decode import ImageLimits, ImageRejected
from lxn_ray.images.dicom import REFUSALS, UnsupportedDicom
from lxn_ray.infra import cluster
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.metadata import (
    MISSING_FILE,
    UNREADABLE,
    UNSAFE_PATH,
    MetadataRow,
)
from lxn_ray.sources.transports import Snapshot, UnsafePath

FINGERPRINT_CACHE = "cache/fingerprints"
EXCLUSIONS_SCHEMA = pa.schema(
    [
        ("filename", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("line", pa.int64()),
        ("source", pa.string()),
    ]
)
IMAGE_COLUMNS = ("width", "height", "source_format", "source_mode")
# One record per content: decode outcome, image facts, then the dedupe fingerprint (names may overlap).
RECORD_COLUMNS = tuple(dict.fromkeys(("sha256", "error", *IMAGE_COLUMNS, *FINGERPRINT_COLUMNS)))
log = get_logger("ingest").info


@dataclass
class SourceFile:
    """A metadata row whose file was read: what ingest knows about it before decoding."""

    row: MetadataRow
    sha256: str
    size: int
    data: bytes | None = None  # kept only when the caller asked (evaluation); ingest re-reads on demand

    @property
    def source(self) -> str:
        return self.row.source


@dataclass
class Exclusion:
    """A row that is not used, with its reason (:mod:`lxn_ray.sources.metadata`'s reasons) and detail."""

    row: MetadataRow
    reason: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "filename": self.row.filename,
            "reason": self.reason,
            "detail": self.detail,
            "line": self.row.line,
            "source": self.row.source,
        }


# -- step 2: read and hash bytes ----------------------------------------------------------------------
def read_files(
    snapshot: Snapshot, rows: list[MetadataRow], limits: ImageLimits, keep_bytes: bool = False
) -> tuple[list[SourceFile], list[Exclusion]]:
    """Read each row's file safely; rows whose file cannot be read become exclusions with the reason."""
    files, exclusions = [], []
    for row in tqdm(rows, desc="reading files", unit="file", file=sys.stderr, disable=None):
        data, reason, detail = _read_one(snapshot, row.image_path, limits)
        if data is None:
            exclusions.append(Exclusion(row, reason, detail))
            continue
        digest = hashlib.sha256(data).hexdigest()
        files.append(SourceFile(row, digest, len(data), data if keep_bytes else None))
    return files, exclusions


def _read_one(snapshot: Snapshot, path: str, limits: ImageLimits) -> tuple[bytes | None, str, str]:
    """(bytes, "", "") or (None, exclusion reason, detail): the one place read failures get their reason."""
    try:
        return snapshot.read_file(path, limits.max_file_bytes), "", ""
    except UnsafePath as error:
        return None, UNSAFE_PATH, str(error)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, MISSING_FILE, f"{path} not in source"
    except (ValueError, OSError) as error:
        return None, UNREADABLE, str(error)


def fetch_batch(
    batch: dict[str, np.ndarray],
    snapshot: Snapshot,
    storage_uri: str,
    limits: ImageLimits,
    fingerprinted: frozenset[str],
    stored: frozenset[str],
) -> dict[str, list]:
    """Ray Data task for remote sources: fetch each row's file on this worker and hash it; fingerprint
    contents not in ``fingerprinted`` and store the bytes of readable contents not yet in storage
    (content-addressed, so a store of an image that is later dropped is harmless)."""
    storage = Storage.open(storage_uri)
    out: dict[str, list] = defaultdict(list)
    for line, path in zip(batch["line"], batch["image_path"], strict=True):
        data, reason, detail = _read_one(snapshot, str(path), limits)
        record: dict[str, Any] = {"line": int(line), "reason": reason or None, "detail": detail or None}
        if data is not None:
            sha256 = hashlib.sha256(data).hexdigest()
            record.update(sha256=sha256, size=len(data))
            if sha256 not in fingerprinted:
                record.update(_fingerprint_one(sha256, data, limits), fetched=True)
            blob = dataset.blob_key(sha256)
            if not record.get("error") and sha256 not in stored and not storage.exists(blob):
                storage.write_bytes(blob, storable(data, limits))
        for column in ("line", "reason", "detail", "size", "fetched", *RECORD_COLUMNS):
            out[column].append(record.get(column))
    return dict(out)


def fetch_on_ray(
    snapshot: Snapshot, storage: Storage, rows: list[MetadataRow], config: IngestConfig
) -> tuple[list[SourceFile], list[Exclusion], dict[str, dict[str, Any]]]:
    """Step 2 (and 3 and 6's storing) for a remote source, on the workers: (files, exclusions, records of
    the contents fingerprinted here)."""
    cluster.connect()
    import ray

    stored = _published_shas(storage)
    fingerprinted = _cached_shas(storage)
    log(f"fetching {len(rows)} files from {snapshot.description} on Ray Data")
    items = [{"line": row.line, "image_path": row.image_path} for row in rows]
    results = ray.data.from_items(
        items, override_num_blocks=_block_count(len(items), config.decode_batch_size, _cluster_cpus())
    ).map_batches(
        fetch_batch,
        fn_kwargs={
            "snapshot": snapshot,
            "storage_uri": storage.uri,
            "limits": config.limits,
            "fingerprinted": fingerprinted,
            "stored": stored,
        },
        batch_size=config.decode_batch_size,
    )
    by_line = {row.line: row for row in rows}
    files, exclusions, records = [], [], {}
    for result in sorted(results.take_all(), key=lambda r: r["line"]):
        row = by_line[result["line"]]
        if result["reason"]:
            exclusions.append(Exclusion(row, result["reason"], result["detail"]))
            continue
        files.append(SourceFile(row, result["sha256"], int(result["size"])))
        if result["fetched"]:
            records[result["sha256"]] = {column: result[column] for column in RECORD_COLUMNS}
    return files, exclusions, records


def _published_shas(storage: Storage) -> frozenset[str]:
    """Contents of the latest version's images (stored already), or none for an empty store."""
    version = dataset.latest_version(storage)
    if version is None:
        return frozenset()
    return frozenset(dataset.read_table(storage, version, "images").column("sha256").to_pylist())


def content_digest(metadata_bytes: bytes, files: Iterable[SourceFile]) -> str:
    """Hex sha256 of a source's listing (its metadata bytes) and every read file's path and content
    hash, in order: what a source's version is made of."""
    digest = hashlib.sha256(metadata_bytes)
    for item in files:
        digest.update(f"\n{item.row.image_path}\t{item.sha256}".encode())
    return digest.hexdigest()


# -- step 3: decode and fingerprint on Ray Data -------------------------------------------------------
def fingerprint_batch(batch: dict[str, np.ndarray], limits: ImageLimits) -> dict[str, list]:
    """Ray Data task: decode each image and fingerprint it, or record why it cannot be decoded."""
    out: dict[str, list] = defaultdict(list)
    for sha256, data in zip(batch["sha256"], batch["data"], strict=True):
        record = _fingerprint_one(sha256, bytes(data), limits)
        for column in RECORD_COLUMNS:
            out[column].append(record.get(column))
    return dict(out)


def _fingerprint_one(sha256: str, data: bytes, limits: ImageLimits) -> dict[str, Any]:
    """Decode one content and fingerprint it, or record why it cannot be decoded."""
    try:
        decoded, film_fingerprint = fingerprint_film(data, limits)
        record: dict[str, Any] = {
            "error": None,
            "width": decoded.width,
            "height": decoded.height,
            "source_format": decoded.source_format,
            "source_mode": decoded.source_mode,
            **film_fingerprint,
        }
    except UnsupportedDicom as error:  # its reason leads, so ingest excludes the file with it
        record = {"error": f"{error.reason}: {error}"}
    except ImageRejected as error:
        record = {"error": str(error)}
    except Exception as error:  # a hostile file must cost one row, never the run
        record = {"error": f"undecodable ({type(error).__name__}: {error})"}
    record["sha256"] = sha256
    return record


def exclusion_of(error: str) -> str:
    """The exclusion reason of a content that could not be fingerprinted, from its record's ``error``: a
    DICOM refusal's own reason (``no_pixel_data``, ``multi_frame``, ...: :data:`lxn_ray.images.dicom.
    REFUSALS`, which leads the message), else ``unreadable_image``."""
    head = error.split(":", 1)[0]
    return head if head in REFUSALS else UNREADABLE


def fingerprint_contents(
    snapshots: Mapping[str, Snapshot],
    storage: Storage,
    items: list[SourceFile],
    config: IngestConfig,
    fetched: Mapping[str, dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], int]:
    """Fingerprints of every item's content, computing only what the cache and ``fetched`` (records made
    while fetching a remote source) lack; (records, hashed)."""
    cache = _load_cache(storage)
    todo = [item for item in items if item.sha256 not in cache and item.sha256 not in fetched]
    log(f"{len(items) - len(todo)} images already fingerprinted, {len(todo)} to decode on Ray Data")
    computed: list[dict[str, Any]] = list(fetched.values())
    if todo:
        computed += _fingerprint_on_ray(snapshots, todo, config)
    fresh = [record for record in computed if not record["error"]]
    if fresh:  # only successes are cached: a rejected file is retried when limits change
        stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
        _write_grouped(storage, f"{FINGERPRINT_CACHE}/{stamp}.parquet", _records_table(fresh))
    records = dict(cache)
    records.update({record["sha256"]: record for record in computed})
    return records, len(fresh)


def _fingerprint_on_ray(
    snapshots: Mapping[str, Snapshot], items: list[SourceFile], config: IngestConfig
) -> list[dict[str, Any]]:
    """Records of ``items``' contents, decoded and fingerprinted on Ray Data. Each worker reads the files
    of its batch from their source itself (:func:`fingerprint_files`), so the bytes never pass through
    the driver or the object store; the few a worker cannot read as hashed (a node that does not share a
    local source's folder) are read by the driver and sent, at most ``config.decode_chunk_bytes`` at a
    time (:func:`_fingerprint_sent`)."""
    cluster.connect()
    import ray

    rows = [
        {"sha256": item.sha256, "source": item.source, "image_path": item.row.image_path} for item in items
    ]
    # A block is a task's batch (batch_size=None: Ray Data would bundle two short blocks into one task).
    blocks = _block_count(len(rows), config.decode_batch_size, _cluster_cpus(), max_blocks=len(rows))
    listing = ray.data.from_items(rows, override_num_blocks=blocks)
    # Ray Data's per-operator reservation left every CPU idle 0.15-0.4 s between two decode tasks (2 CPUs:
    # 8.6 -> 7.1 s for 200 films without it); the listing is in memory, so there is nothing to reserve for.
    # (Ray marks the switch for removal; where it is gone, Ray Data's default stays.)
    if hasattr(listing.context, "op_resource_reservation_enabled"):
        listing.context.op_resource_reservation_enabled = False
    results = listing.map_batches(
        fingerprint_files,
        fn_kwargs={"snapshots": dict(snapshots), "limits": config.limits},
        batch_size=None,
    )
    by_sha = {item.sha256: item for item in items}
    records, unseen = [], []
    for result in results.take_all():
        if result["unseen"]:
            unseen.append(by_sha[result["sha256"]])
        else:
            records.append({column: result[column] for column in RECORD_COLUMNS})
    if unseen:
        log(f"{len(unseen)} of {len(items)} files are not readable on the workers: the driver sends them")
        for chunk in _chunks(unseen, config.decode_chunk_bytes):
            records += _fingerprint_sent(snapshots, chunk, config)
    return records


def fingerprint_files(
    batch: dict[str, np.ndarray], snapshots: Mapping[str, Snapshot], limits: ImageLimits
) -> dict[str, list]:
    """Ray Data task: read each row's file (``source``, ``image_path``) from its snapshot on this worker and
    decode and fingerprint it (:func:`_fingerprint_one`). A file this worker cannot read, or reads with
    bytes other than the driver hashed (``sha256``: another node's folder of the same name), is
    ``unseen`` and has no record; content addressing makes any read that matches the hash a read of the
    driver's file."""
    out: dict[str, list] = defaultdict(list)
    for sha256, source, path in zip(batch["sha256"], batch["source"], batch["image_path"], strict=True):
        try:
            data, _, _ = _read_one(snapshots[str(source)], str(path), limits)
        except Exception:  # whatever keeps this worker from the file, the driver can send it
            data = None
        seen = data is not None and hashlib.sha256(data).hexdigest() == sha256
        record = _fingerprint_one(str(sha256), data, limits) if seen else {"sha256": str(sha256)}
        out["unseen"].append(not seen)
        for column in RECORD_COLUMNS:
            out[column].append(record.get(column))
    return dict(out)


def _fingerprint_sent(
    snapshots: Mapping[str, Snapshot], chunk: list[SourceFile], config: IngestConfig
) -> list[dict[str, Any]]:
    """Records of ``chunk``'s contents, their bytes read by the driver and sent through the object store.
    Raises RuntimeError when a file's bytes no longer match its hash, and the read's own error
    (FileNotFoundError, ValueError over the size cap, OSError) when it is gone or unreadable since."""
    import ray

    items = []
    for item in chunk:
        data = snapshots[item.source].read_file(item.row.image_path, config.limits.max_file_bytes)
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise RuntimeError(f"{item.row.image_path} changed while ingest was reading the source")
        items.append({"sha256": item.sha256, "data": data})
    blocks = _block_count(len(items), config.decode_batch_size, _cluster_cpus())
    images = ray.data.from_items(items, override_num_blocks=blocks)
    results = images.map_batches(
        fingerprint_batch, fn_kwargs={"limits": config.limits}, batch_size=config.decode_batch_size
    )
    return [dict(row) for row in results.take_all()]


def _block_count(n_items: int, batch_size: int, cpus: int, max_blocks: int = 64) -> int:
    """Ray Data blocks for ``n_items`` rows: one per ``batch_size`` rows (at most ``max_blocks``), but never
    fewer than ``cpus`` while there are rows for them, so that a few large films (a chunk the driver sends
    is bounded by bytes, not by count) still spread over every core. The tasks that read their films
    themselves pass ``max_blocks=n_items``: a task per batch however many (100,000 films: 6,250 tasks)."""
    return max(1, min(n_items, max(min(math.ceil(n_items / batch_size), max_blocks), cpus)))


def _cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def _chunks(items: list[SourceFile], max_bytes: int) -> Iterable[list[SourceFile]]:
    chunk, size = [], 0
    for item in items:
        if chunk and size + item.size > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item.size
    if chunk:
        yield chunk


def _cache_shards(storage: Storage) -> list[str]:
    return [key for key in storage.list(FINGERPRINT_CACHE) if key.endswith(".parquet")]


def _cached_shas(storage: Storage) -> frozenset[str]:
    """The contents the fingerprint cache holds a current fingerprint of (two small columns read)."""
    found = set()
    for key in _cache_shards(storage):
        with storage.filesystem.open_input_file(storage.path(key)) as stream:
            table = pq.ParquetFile(stream, pre_buffer=True).read(columns=["sha256", "dedupe_version"])
        versions = table["dedupe_version"].to_pylist()
        found.update(
            sha
            for sha, version in zip(table["sha256"].to_pylist(), versions, strict=True)
            if version == FINGERPRINT_VERSION
        )
    return frozenset(found)


def _load_cache(storage: Storage) -> dict[str, dict[str, Any]]:
    """sha256 -> cached record, every column but ``thumb``, which is a :class:`ThumbRef` to its row in
    the shard: the 16 KB thumbnails stay on storage until a verification worker reads the few it needs
    (:mod:`lxn_ray.dedupe.thumbs`), so loading the cache costs ~3 KB of memory per stored image.

    A shard written before row groups were small (one row group of the whole shard) keeps its thumbnails
    inline, as before: a ref into it would make every verification chunk decode the shard's whole
    ``thumb`` column."""
    cache: dict[str, dict[str, Any]] = {}
    for key in _cache_shards(storage):
        # pre_buffer: the column chunks of the shard's many row groups in coalesced reads (S3 requests)
        with storage.filesystem.open_input_file(storage.path(key)) as stream:
            shard = pq.ParquetFile(stream, pre_buffer=True)
            meta = shard.metadata
            grouped = all(
                meta.row_group(g).num_rows <= THUMB_ROWS_PER_GROUP for g in range(meta.num_row_groups)
            )
            columns = [name for name in shard.schema_arrow.names if name != "thumb" or not grouped]
            records = shard.read(columns=columns).to_pylist()
            refs = refs_of_shard(storage.uri, key, meta) if grouped else [None] * len(records)
        for record, ref in zip(records, refs, strict=True):
            if record.get("dedupe_version") == FINGERPRINT_VERSION:  # older fingerprints are recomputed
                if ref is not None:
                    record["thumb"] = ref
                cache[record["sha256"]] = record
    return cache


def _write_grouped(storage: Storage, key: str, table: pa.Table) -> None:
    """``table`` at ``key`` as Parquet (:func:`~lxn_ray.dedupe.thumbs.compression_for`) in row groups of
    :data:`THUMB_ROWS_PER_GROUP` rows, so one stored thumbnail can be read without the rest
    (:func:`lxn_ray.dedupe.thumbs.read_thumbs`)."""
    buffer = io.BytesIO()
    pq.write_table(
        table, buffer, compression=compression_for(table.column_names), row_group_size=THUMB_ROWS_PER_GROUP
    )
    storage.write_bytes(key, buffer.getvalue())


def _records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{column: record.get(column) for column in RECORD_COLUMNS} for record in records]
    )


FINGERPRINTS_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("dedupe_version", pa.int64()),
        ("phash", pa.string()),
        ("phash_trim", pa.string()),
        ("dhash_trim", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("trim_box", pa.string()),
        ("thumb_size", pa.int64()),
        ("thumb", pa.binary()),
        ("lowres", pa.binary()),
        ("windows", pa.binary()),
    ]
)


def fingerprint_table(shas: list[str], fingerprints: Mapping[str, dict[str, Any]]) -> pa.Table:
    """The version's ``fingerprints`` table: one row per content in ``shas``, its sha256 and dedupe
    fingerprint columns (every ``thumb`` inline: see :func:`write_fingerprint_table` for stored ones)."""
    return pa.Table.from_pylist(
        [
            {"sha256": sha, **{column: fingerprints[sha][column] for column in FINGERPRINT_COLUMNS}}
            for sha in shas
        ]
    )


def write_fingerprint_table(
    storage: Storage, key: str, shas: list[str], fingerprints: Mapping[str, dict[str, Any]]
) -> None:
    """Write the version's ``fingerprints`` table (:func:`fingerprint_table`'s rows) at ``key``, streaming:
    contents whose ``thumb`` is a :class:`ThumbRef` into the fingerprint cache are copied from their cache
    shard a row group at a time (in shard order, first), then those fingerprinted in this run (in
    ``shas`` order), so memory stays a row group, not the collection's thumbnails. On local storage the
    file is written beside ``key`` and renamed into place (atomic); elsewhere it is uploaded in one piece.
    When no thumb is a ref, the table is exactly :func:`fingerprint_table`'s."""
    refs: dict[tuple[str, int], list[int]] = defaultdict(list)
    inline = []
    for sha in shas:
        thumb = fingerprints[sha]["thumb"]
        if isinstance(thumb, ThumbRef):
            if thumb.storage != storage.uri:
                raise ValueError(f"{sha}: its thumbnail is stored in {thumb.storage}, not in {storage.uri}")
            refs[(thumb.key, thumb.row_group)].append(thumb.row)
        else:
            inline.append(sha)
    if not refs:
        _write_grouped(storage, key, fingerprint_table(shas, fingerprints))
        return
    columns = FINGERPRINTS_SCHEMA.names
    codecs = compression_for(columns)

    def write(writer: pq.ParquetWriter) -> None:
        for at in sorted({k for k, _ in refs}):
            with storage.filesystem.open_input_file(storage.path(at)) as stream:
                shard = pq.ParquetFile(stream)
                for group in sorted(g for k, g in refs if k == at):
                    table = shard.read_row_group(group, columns=columns).take(sorted(refs[(at, group)]))
                    writer.write_table(table.cast(FINGERPRINTS_SCHEMA), row_group_size=THUMB_ROWS_PER_GROUP)
        for start in range(0, len(inline), 1024):
            table = fingerprint_table(inline[start : start + 1024], fingerprints)
            writer.write_table(table.cast(FINGERPRINTS_SCHEMA), row_group_size=THUMB_ROWS_PER_GROUP)

    if not storage.is_local:
        sink = pa.BufferOutputStream()
        with pq.ParquetWriter(sink, FINGERPRINTS_SCHEMA, compression=codecs) as writer:
            write(writer)
        storage.write_bytes(key, sink.getvalue().to_pybytes())
        return
    final = storage.path(key)
    parent = final.rsplit("/", 1)[0]
    storage.filesystem.create_dir(parent, recursive=True)
    temporary = f"{parent}/.tmp-{uuid.uuid4().hex}"
    try:
        with (
            storage.filesystem.open_output_stream(temporary) as stream,
            pq.ParquetWriter(stream, FINGERPRINTS_SCHEMA, compression=codecs) as writer,
        ):
            write(writer)
        storage.filesystem.move(temporary, final)
    finally:
        if storage.filesystem.get_file_info(temporary).type != pafs.FileType.NotFound:
            storage.filesystem.delete_file(temporary)


# -- step 6: store image bytes by content -------------------------------------------------------------
def store_blobs(
    snapshots: Mapping[str, Snapshot],
    storage: Storage,
    kept: list[SourceFile],
    stored: frozenset[str],
    limits: ImageLimits,
) -> None:
    """Store the bytes (:func:`storable`) of every kept content not in ``stored`` nor in storage, read again
    from local sources. Raises RuntimeError when a file changed since it was hashed, or when a remote
    source's content was not stored by its fetch tasks."""
    todo = [
        item
        for item in kept
        if item.sha256 not in stored and not storage.exists(dataset.blob_key(item.sha256))
    ]
    for item in todo:
        if snapshots[item.source].remote:  # the fetch tasks store every readable content; never read it here
            raise RuntimeError(f"{item.row.image_path} of {item.source} was not stored by the fetch tasks")
    for item in tqdm(todo, desc="storing images", unit="image", file=sys.stderr, disable=None):
        data = snapshots[item.source].read_file(item.row.image_path, item.size)
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise RuntimeError(f"{item.row.image_path} changed while ingest was reading the source")
        storage.write_bytes(dataset.blob_key(item.sha256), storable(data, limits))


def storable(data: bytes, limits: ImageLimits) -> bytes:
    """What a blob holds for a source file: PNG and JPEG bytes as they are; a DICOM file as the PNG of
    its film as a viewer shows it (:func:`lxn_ray.images.dicom.decode`), so no header field - names, dates,
    ids - is ever stored. The blob keeps the source file's sha256 as its key: a film's identity is the
    file the source holds."""
    from lxn_ray.images.dicom import decode, is_dicom

    if not is_dicom(data):
        return data
    buffer = io.BytesIO()
    decode(data, limits).image.save(buffer, format="PNG")  # no text chunks: pixels only
    return buffer.getvalue()
