"""Ingest: the snapshots of one or more named sources -> one labelled, deduplicated, patient-split
dataset version.

The steps, in order:

1. Read each source's rows in its layout (:mod:`lxn_ray.sources.layouts`: metadata.csv of any schema, class
   folders or a manifest) and exclude rows metadata alone rules out. Every row keeps its source's name.
2. Read the remaining rows' files safely and hash their bytes (sha256). Together with the rows this
   gives each source's version; when they and the config match the latest version, stop: nothing
   changed. Remote sources (S3, HTTP) are fetched by Ray Data tasks on the workers, which also
   fingerprint and store new contents as they go, so image bytes never pass through the driver.
3. Decode and fingerprint, as Ray Data tasks spread over the cluster, only contents never seen before
   (fingerprints are cached in storage by sha256). Unreadable files are excluded with the reason.
4. Drop duplicates, within and across sources: rows naming identical bytes, then the same radiograph
   published twice, found by :mod:`lxn_ray.dedupe.duplicates` comparing new images with each other and with
   the
   whole previous version (files of the same name in two sources are candidates too). Kept: an image of
   the previous version; else the source listed first; else the larger image; else the smaller file
   name. Copies whose findings disagree are reported.
5. Split by patient (ids qualified by source), patients joined by a duplicate radiograph sharing a split
   across sources, earlier splits frozen.
6. Store new image bytes by content and publish the version atomically (:mod:`lxn_ray.data.dataset`), with
   what changed against the parent version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from lxn_ray.data import dataset
from lxn_ray.data.settings import IngestConfig
from lxn_ray.dedupe.duplicates import (
    FINGERPRINT_COLUMNS,
    FINGERPRINT_VERSION,
    DedupeConfig,
    DuplicatePair,
    DuplicateSearch,
    fingerprint,
    search_duplicates,
)
from lxn_ray.images.decode import ImageLimits, ImageRejected, decode_image, to_grayscale
from lxn_ray.infra import cluster
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.layouts import DEFAULT_SOURCE_NAME, SourceRows, SourceSpec, read_rows
from lxn_ray.sources.metadata import (
    DUPLICATE,
    MISSING_FILE,
    UNREADABLE,
    UNSAFE_PATH,
    MetadataRow,
)
from lxn_ray.sources.tasks import category
from lxn_ray.sources.transports import Snapshot, Source, SourceError, UnsafePath

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
DUPLICATES_SCHEMA = pa.schema(
    [
        ("dropped", pa.string()),
        ("kept", pa.string()),
        ("distance", pa.int64()),
        ("score", pa.float64()),
        ("dropped_line", pa.int64()),
        ("kept_line", pa.int64()),
        ("sha256", pa.string()),
        ("dropped_source", pa.string()),
        ("kept_source", pa.string()),
        ("mirrored", pa.bool_()),  # the dropped film is the kept one flipped left-right
    ]
)
PATIENTS_SCHEMA = pa.schema([("patient_id", pa.string()), ("split", pa.string())])
IMAGE_COLUMNS = ("width", "height", "source_format", "source_mode")
# One record per content: decode outcome, image facts, then the dedupe fingerprint (names may overlap).
RECORD_COLUMNS = tuple(dict.fromkeys(("sha256", "error", *IMAGE_COLUMNS, *FINGERPRINT_COLUMNS)))


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


class _Stopwatch:
    """Seconds spent per stage, for the report and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def start(self, name: str) -> None:
        self.stop()
        self._current = (name, time.monotonic())

    def stop(self) -> None:
        if self._current:
            name, began = self._current
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - began, 3)
            self._current = None

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop()


DEFAULT_CONFIG = IngestConfig()
log = get_logger("ingest").info  # progress for the person watching; stdout keeps the summary


@dataclass
class _Read:
    """One source as this run read it."""

    spec: SourceSpec
    snapshot: Snapshot
    found: SourceRows
    files: list[SourceFile]
    fetched: dict[str, dict[str, Any]]  # records of contents fingerprinted while fetching (remote)
    version: str


def _patient_salt(storage: Storage, specs: Sequence[SourceSpec]) -> bytes | None:
    """The store's patient-id salt when a source pseudonymises its ids, checked against the salt the
    latest version was made with (a new salt would make every such patient new, and move their splits)."""
    if not any(spec.pseudonymised for spec in specs):
        return None
    salt = dataset.patient_id_salt(storage)
    latest = dataset.latest_version(storage)
    if latest is not None:
        for entry in dataset.read_manifest(storage, latest).get("sources", []):
            recorded = entry.get("patient_id_salt_check")
            if recorded and recorded != dataset.salt_check(salt):
                raise SourceError(
                    f"source {entry.get('name')}: the patient-id salt differs from the one {latest} was "
                    f"made with; set {dataset.PATIENT_SALT_ENV} back (or unset it to use the store's own)"
                )
    return salt


def named_sources(
    sources: Source | SourceSpec | Sequence[SourceSpec], name: str = DEFAULT_SOURCE_NAME
) -> list[tuple[SourceSpec, Source]]:
    """``(spec, source)`` pairs for whatever the caller has: a lone :class:`Source` in the upstream layout
    (``--source``, named ``name``), one spec, or the specs of a sources file."""
    if isinstance(sources, SourceSpec):
        sources = [sources]
    if isinstance(sources, Sequence):
        return [(spec, spec.open()) for spec in sources]
    return [(SourceSpec(name=name, layout="upstream"), sources)]


def ingest(
    sources: Source | SourceSpec | Sequence[SourceSpec],
    storage: Storage,
    config: IngestConfig = DEFAULT_CONFIG,
) -> dict[str, Any]:
    """Bring the dataset in ``storage`` up to date with ``sources``; returns the ingest report.

    ``sources`` is a lone :class:`lxn_ray.sources.transports.Source` (``--source``) or the
    :class:`lxn_ray.sources.layouts.SourceSpec` list of a ``--sources`` file; their order is their priority
    when
    one film sits in two of them.
    """
    started = time.monotonic()
    stages = _Stopwatch()
    reads: list[_Read] = []
    exclusions: list[Exclusion] = []
    named = named_sources(sources)
    salt = _patient_salt(storage, [spec for spec, _ in named])
    with stages("read"):
        for spec, source in named:
            snapshot = source.open()
            log(f"source {spec.name}: {snapshot.description}")
            found = read_rows(snapshot, spec, config.frontal_views, salt)
            exclusions += [Exclusion(row, row.exclusion, row.detail) for row in found.rows if row.exclusion]
            wanted = [row for row in found.rows if not row.exclusion]
            fetched: dict[str, dict[str, Any]] = {}
            if snapshot.remote:
                files, unreadable, fetched = fetch_on_ray(snapshot, storage, wanted, config)
            else:
                files, unreadable = read_files(snapshot, wanted, config.limits)
            exclusions += unreadable
            version = snapshot.version(_content_digest(found.listing, files))
            reads.append(_Read(spec, snapshot, found, files, fetched, version))
    source_version = _combined_version(reads)
    config_hash = config.digest()

    dataset.remove_unpublished(storage)
    parent = dataset.latest_version(storage)
    if parent is not None:
        manifest = dataset.read_manifest(storage, parent)
        if (manifest["source_version"], manifest["config_hash"]) == (source_version, config_hash):
            log(f"unchanged since {parent}")
            report = storage.read_json(dataset.version_key(parent, "report.json"))
            seconds = round(time.monotonic() - started, 2)
            return {
                **report,
                "changed": False,
                "images_hashed": 0,
                "stage_seconds": stages.seconds,
                "seconds": seconds,
            }
    previous = _Previous.load(storage, parent, [read.spec.name for read in reads])
    snapshots = {read.spec.name: read.snapshot for read in reads}
    priority = {read.spec.name: rank for rank, read in enumerate(reads)}
    rows = [row for read in reads for row in read.found.rows]
    files = sorted(
        (item for read in reads for item in read.files), key=lambda f: (priority[f.source], f.row.line)
    )
    fetched = {sha: record for read in reads for sha, record in read.fetched.items()}

    primaries, duplicates = _drop_identical(files, previous.rows)
    with stages("fingerprint"):
        fingerprints, hashed = _fingerprints(snapshots, storage, primaries, config, fetched)
    readable = [item for item in primaries if not fingerprints[item.sha256].get("error")]
    for item in files:  # rows repeating an unreadable file are unreadable too
        if error := fingerprints[item.sha256].get("error"):
            exclusions.append(Exclusion(item.row, UNREADABLE, error))
    duplicates = [entry for entry in duplicates if not fingerprints[entry["sha256"]].get("error")]

    log(f"comparing {len(readable)} images for duplicates ({len(previous.usable_shas)} already published)")
    with stages("dedupe"):
        kept, near, search = _drop_near_duplicates(
            readable, fingerprints, previous.usable_shas, config.dedupe, priority
        )
    duplicates += near
    by_key = {item.row.key: item for item in files}
    exclusions += [
        Exclusion(
            by_key[_dropped_key(entry)].row, DUPLICATE, f"duplicate of {entry['kept_source']}:{entry['kept']}"
        )
        for entry in duplicates
    ]
    splits = _split_patients(kept, duplicates, by_key, previous.splits, config.splits)

    with stages("publish"):
        version = dataset.new_version_id(source_version, config_hash)
        log(f"storing images and publishing {version}")
        _store_blobs(snapshots, storage, kept, previous.usable_shas, config.limits)
        images = _images_table(kept, fingerprints, splits)
        tables = {
            "images": images,
            "exclusions": pa.Table.from_pylist([e.as_dict() for e in exclusions], schema=EXCLUSIONS_SCHEMA),
            "duplicates": pa.Table.from_pylist(duplicates, schema=DUPLICATES_SCHEMA),
            "patients": pa.Table.from_pylist(
                [{"patient_id": p, "split": s} for p, s in sorted(splits.items())], schema=PATIENTS_SCHEMA
            ),
            "fingerprints": _fingerprint_table([item.sha256 for item in kept], fingerprints),
        }
        report = _report(version, source_version, rows, kept, exclusions, duplicates, splits, hashed, parent)
        report["sources"] = {
            read.spec.name: {
                "location": read.snapshot.description,
                "layout": read.found.layout,
                "source_version": read.version,
                "rows": len(read.found.rows),
                "usable": sum(item.source == read.spec.name for item in kept),
                **read.found.notes,
            }
            for read in reads
        }
        report["dedupe"] = _search_summary(search)
        report["label_disagreements"] = _label_disagreements(duplicates, by_key)
        report["changes"] = dataset.changes_between(previous.images, images)
        manifest = {
            "dataset_version": version,
            "parent_version": parent,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": ", ".join(read.snapshot.description for read in reads),
            "source_version": source_version,
            "sources": [
                {
                    **read.spec.as_dict(),
                    "source_version": read.version,
                    **(
                        {"patient_id_salt_check": dataset.salt_check(salt)} if read.spec.pseudonymised else {}
                    ),
                }
                for read in reads
            ],
            "config_hash": config_hash,
            # the date of the data: the latest source commit's (git sources); None for folders and mirrors
            "data_date": max(
                (d for read in reads if (d := getattr(read.snapshot, "commit_date", None))), default=None
            ),
            "config": dataclasses.asdict(config),
            "counts": {
                k: report[k] for k in ("rows", "usable", "positives", "negatives", "excluded", "splits")
            },
            "tables": sorted(tables),
        }
        dataset.publish(storage, version, tables, report, manifest)
    report["stage_seconds"] = stages.seconds
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def _combined_version(reads: list[_Read]) -> str:
    """A lone source's own version (as before several sources existed); else a digest of every source's
    name, settings and version, in order."""
    if len(reads) == 1 and reads[0].spec.layout == "upstream":
        return reads[0].version
    described = [[read.spec.as_dict(), read.version] for read in reads]
    return "sources:" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


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

    previous = dataset.latest_version(storage)
    stored = _Previous.load(storage, previous).usable_shas
    fingerprinted = frozenset(_load_cache(storage))
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


def _content_digest(metadata_bytes: bytes, files: Iterable[SourceFile]) -> str:
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
        decoded = decode_image(data, limits)
        record: dict[str, Any] = {
            "error": None,
            "width": decoded.width,
            "height": decoded.height,
            "source_format": decoded.source_format,
            "source_mode": decoded.source_mode,
            **fingerprint(to_grayscale(decoded.image)),
        }
    except ImageRejected as error:
        record = {"error": str(error)}
    except Exception as error:  # a hostile file must cost one row, never the run
        record = {"error": f"undecodable ({type(error).__name__}: {error})"}
    record["sha256"] = sha256
    return record


def _fingerprints(
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
    for chunk in _chunks(todo, config.decode_chunk_bytes):
        computed += _fingerprint_on_ray(snapshots, chunk, config)
    fresh = [record for record in computed if not record["error"]]
    if fresh:  # only successes are cached: a rejected file is retried when limits change
        stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
        storage.write_table(f"{FINGERPRINT_CACHE}/{stamp}.parquet", _records_table(fresh))
    records = dict(cache)
    records.update({record["sha256"]: record for record in computed})
    return records, len(fresh)


def _fingerprint_on_ray(
    snapshots: Mapping[str, Snapshot], chunk: list[SourceFile], config: IngestConfig
) -> list[dict[str, Any]]:
    cluster.connect()
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
    fewer than ``cpus`` while there are rows for them, so that a few large films (a chunk is bounded by
    bytes, not by count) still spread over every core."""
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


def _load_cache(storage: Storage) -> dict[str, dict[str, Any]]:
    cache: dict[str, dict[str, Any]] = {}
    for key in storage.list(FINGERPRINT_CACHE):
        if key.endswith(".parquet"):
            for record in storage.read_table(key).to_pylist():
                if record.get("dedupe_version") == FINGERPRINT_VERSION:  # older fingerprints are recomputed
                    cache[record["sha256"]] = record
    return cache


def _records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{column: record.get(column) for column in RECORD_COLUMNS} for record in records]
    )


def _fingerprint_table(shas: list[str], fingerprints: Mapping[str, dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"sha256": sha, **{column: fingerprints[sha][column] for column in FINGERPRINT_COLUMNS}}
            for sha in shas
        ]
    )


# -- step 4: duplicates -------------------------------------------------------------------------------
def _drop_identical(
    files: list[SourceFile], published: frozenset[tuple[str, str]] = frozenset()
) -> tuple[list[SourceFile], list[dict[str, Any]]]:
    """Keep one row per content: the row already published (``published``: (source, image path) of the
    parent version's rows), else the first (``files`` come in priority order: sources in the order given,
    then metadata lines); the other rows with the same bytes are exact duplicates."""
    first: dict[str, SourceFile] = {}
    duplicates = []
    for item in sorted(files, key=lambda f: (f.source, f.row.image_path) not in published):  # stable
        if item.sha256 in first:
            duplicates.append(_duplicate_entry(item, first[item.sha256], distance=0, score=0.0))
        else:
            first[item.sha256] = item
    return list(first.values()), duplicates


def _duplicate_entry(
    dropped: SourceFile, kept: SourceFile, distance: int, score: float | None, mirrored: bool = False
) -> dict[str, Any]:
    return {
        "dropped": dropped.row.filename,
        "kept": kept.row.filename,
        "distance": int(distance),
        "score": score,
        "dropped_line": dropped.row.line,
        "kept_line": kept.row.line,
        "sha256": dropped.sha256,
        "dropped_source": dropped.source,
        "kept_source": kept.source,
        "mirrored": mirrored,
    }


def _dropped_key(entry: Mapping[str, Any]) -> tuple[str, int]:
    return (entry["dropped_source"], entry["dropped_line"])


def _kept_key(entry: Mapping[str, Any]) -> tuple[str, int]:
    return (entry["kept_source"], entry["kept_line"])


def _drop_near_duplicates(
    items: list[SourceFile],
    fingerprints: Mapping[str, dict[str, Any]],
    previous_shas: frozenset[str],
    config: DedupeConfig,
    priority: Mapping[str, int] | None = None,
) -> tuple[list[SourceFile], list[dict[str, Any]], DuplicateSearch]:
    """Split ``items`` into the kept ones and drop records ``{dropped, kept, distance, ...}``; and the
    duplicate search's counts and timings.

    Confirmed pairs form components. In each, images of the previous version are kept (they were judged
    distinct then); if there are none, the image of the source listed first (``priority``: a curated
    source's label and metadata beat a republished copy's), then the one with the most pixels, then the
    smallest file name. The kept image's row - its finding, patient and metadata - is what survives.
    Every other member is dropped against the kept image it was paired with (or the component's first).
    """
    by_sha = {item.sha256: item for item in items}
    known = {sha: fingerprints[sha] for sha in by_sha if sha in previous_shas}
    new = {sha: fingerprints[sha] for sha in by_sha if sha not in previous_shas}
    search = search_duplicates(
        known,
        new,
        config,
        map_chunks=functools.partial(cluster.map_chunks_on_ray, progress=_verified) if new else None,
        named_pairs=_same_name_pairs(items),
    )
    edges: dict[str, dict[str, DuplicatePair]] = defaultdict(dict)
    for pair in search.pairs:
        edges[pair.a][pair.b] = pair
        edges[pair.b][pair.a] = pair

    def rank(sha: str) -> tuple:
        record = fingerprints[sha]
        item = by_sha[sha]
        rank_of_source = (priority or {}).get(item.source, 0)
        return (
            sha not in previous_shas,
            rank_of_source,
            -(record["width"] * record["height"]),
            item.row.filename,
        )

    dropped: list[dict[str, Any]] = []
    dropped_shas: set[str] = set()
    for component in _components(edges):
        ordered = sorted(component, key=rank)
        keepers = [sha for sha in ordered if sha in previous_shas] or ordered[:1]
        for sha in ordered:
            if sha in keepers:
                continue
            partners = [edges[sha][k] for k in keepers if k in edges[sha]]
            pair = min(partners, key=lambda p: (p.score, p.distance)) if partners else None
            kept_sha = (pair.b if pair.a == sha else pair.a) if pair else keepers[0]
            distance = (
                pair.distance
                if pair
                else _hamming(fingerprints[sha]["phash"], fingerprints[kept_sha]["phash"])
            )
            dropped_shas.add(sha)
            score = float(pair.score) if pair else None
            mirrored = bool(pair and pair.mirrored)
            dropped.append(_duplicate_entry(by_sha[sha], by_sha[kept_sha], distance, score, mirrored))
    kept = [item for item in items if item.sha256 not in dropped_shas]
    dropped.sort(key=lambda d: (d["kept_source"], d["kept"], d["dropped_source"], d["dropped"]))
    return kept, dropped, search


def _verified(done: int, total: int) -> None:
    log(f"duplicate check: {done} of {total} chunks of candidate pairs verified")


def _search_summary(search: DuplicateSearch) -> dict[str, Any]:
    """The report's ``dedupe`` entry: how many pairs were verified per new image and where time went."""
    return {
        "new_images": search.new_images,
        "candidate_pairs": search.candidates,
        "candidates_per_new_image": round(search.candidates / max(search.new_images, 1), 2),
        "duplicate_pairs": len(search.pairs),
        "index_seconds": round(search.index_seconds, 3),
        "query_seconds": round(search.query_seconds, 3),
        "verify_seconds": round(search.verify_seconds, 3),
    }


def _same_name_pairs(items: list[SourceFile]) -> list[tuple[str, str]]:
    """Content pairs whose files carry the same name (case-insensitive) in two different sources: a
    republished copy often keeps its name, so these are verified as candidates whatever their hashes."""
    by_name: dict[str, list[SourceFile]] = defaultdict(list)
    for item in items:
        by_name[item.row.filename.rsplit("/", 1)[-1].casefold()].append(item)
    return [
        (a.sha256, b.sha256)
        for group in by_name.values()
        for i, a in enumerate(group)
        for b in group[i + 1 :]
        if a.source != b.source and a.sha256 != b.sha256
    ]


def _components(edges: Mapping[str, Mapping[str, Any]]) -> list[set[str]]:
    seen: set[str] = set()
    components = []
    for start in sorted(edges):
        if start in seen:
            continue
        stack, component = [start], set()
        while stack:
            node = stack.pop()
            if node not in component:
                component.add(node)
                stack.extend(edges[node])
        seen |= component
        components.append(component)
    return components


def _hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


# -- step 5: splits -----------------------------------------------------------------------------------
def _patient_of(item: SourceFile) -> str:
    """The patient id qualified by its source (``darkcovidnet:00001280``: two sources' ids never meet),
    or a stand-in unique to the image when the source names no patient."""
    if not item.row.patient_id:
        return f"unknown-{item.sha256[:12]}"
    return f"{item.source}:{item.row.patient_id}"


def _split_patients(
    kept: list[SourceFile],
    duplicates: list[dict[str, Any]],
    by_key: Mapping[tuple[str, int], SourceFile],
    previous: Mapping[str, str],
    config: dataset.SplitConfig,
) -> dict[str, str]:
    """Split of every patient with a usable or a dropped image; duplicates join their patients' groups."""
    parent: dict[str, str] = {}

    def find(patient: str) -> str:
        parent.setdefault(patient, patient)
        while parent[patient] != patient:
            parent[patient] = parent[parent[patient]]
            patient = parent[patient]
        return patient

    for item in kept:
        find(_patient_of(item))
    for entry in duplicates:
        a = _patient_of(by_key[_dropped_key(entry)])
        b = _patient_of(by_key[_kept_key(entry)])
        parent[find(a)] = find(b)
    groups: dict[str, set[str]] = defaultdict(set)
    for patient in list(parent):
        groups[find(patient)].add(patient)
    # Patients of earlier versions stay in the map even when none of their images is usable now.
    return {**previous, **dataset.assign_splits(groups.values(), previous, config)}


# -- step 6: store and describe -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Previous:
    """What the parent version fixes for this run: its images (always kept) and its patients' splits."""

    usable_shas: frozenset[str] = frozenset()
    splits: Mapping[str, str] = field(default_factory=dict)
    images: pa.Table | None = None

    @classmethod
    def load(cls, storage: Storage, version: str | None, names: Sequence[str] = ()) -> _Previous:
        """The parent version's facts. A version made before sources had names holds unqualified patient
        ids of its one source: with one source now, they are read as that source's (same splits)."""
        if version is None:
            return cls()
        images = dataset.read_table(storage, version, "images")
        patients = dataset.read_table(storage, version, "patients").to_pylist()
        splits = {row["patient_id"]: row["split"] for row in patients}
        if "source" not in images.column_names and len(names) == 1:
            splits = {(p if p.startswith("unknown-") else f"{names[0]}:{p}"): s for p, s in splits.items()}
            images = images.append_column("source", pa.array([names[0]] * images.num_rows, pa.string()))
            qualified = [
                p if p.startswith("unknown-") else f"{names[0]}:{p}"
                for p in images.column("patient_id").to_pylist()
            ]
            images = images.set_column(
                images.column_names.index("patient_id"), "patient_id", pa.array(qualified)
            )
        return cls(usable_shas=frozenset(images.column("sha256").to_pylist()), splits=splits, images=images)

    @property
    def rows(self) -> frozenset[tuple[str, str]]:
        """(source, image path) of every published row."""
        if self.images is None:
            return frozenset()
        return frozenset(
            zip(self.images["source"].to_pylist(), self.images["image_path"].to_pylist(), strict=True)
        )


def _store_blobs(
    snapshots: Mapping[str, Snapshot],
    storage: Storage,
    kept: list[SourceFile],
    stored: frozenset[str],
    limits: ImageLimits,
) -> None:
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


def _images_table(
    kept: list[SourceFile], fingerprints: Mapping[str, dict[str, Any]], splits: Mapping[str, str]
) -> pa.Table:
    rows = []
    for item in kept:
        record, row = fingerprints[item.sha256], item.row
        patient = _patient_of(item)
        rows.append(
            {
                "source": row.source,
                "filename": row.filename,
                "image_path": row.image_path,
                "patient_id": patient,
                "label": row.label,
                "finding": row.finding,
                "view": row.view,
                "modality": row.modality,
                "sex": row.extra.get("sex", ""),
                "age": row.extra.get("age", ""),
                "location": row.extra.get("location", ""),
                "split": splits[patient],
                "sha256": item.sha256,
                "image_key": dataset.blob_key(item.sha256),
                "bytes": item.size,
                **{
                    column: record[column]
                    for column in RECORD_COLUMNS[2:]
                    if not isinstance(record[column], bytes)
                },
                "line": row.line,
                "metadata": json.dumps(row.extra, ensure_ascii=False, sort_keys=True),
            }
        )
    return pa.Table.from_pylist(rows)


def _report(
    version: str,
    source_version: str,
    rows: list[MetadataRow],
    kept: list[SourceFile],
    exclusions: list[Exclusion],
    duplicates: list[dict[str, Any]],
    splits: Mapping[str, str],
    hashed: int,
    parent: str | None,
) -> dict[str, Any]:
    positives = sum(item.row.label == 1 for item in kept)
    per_split: dict[str, dict[str, Any]] = {}
    for name in dataset.SPLITS:
        members = [item for item in kept if splits[_patient_of(item)] == name]
        per_split[name] = {
            "images": len(members),
            "positives": sum(item.row.label == 1 for item in members),
            "patients": len({_patient_of(item) for item in members}),
            "by_source": {
                source: dict(
                    sorted(Counter(category(i.row.finding) for i in members if i.source == source).items())
                )
                for source in sorted({item.source for item in members})
            },
        }
    ordered = sorted(exclusions, key=lambda e: (e.row.source, e.row.line))
    keys = ("dropped", "dropped_source", "kept", "kept_source", "distance", "score")
    return {
        "dataset_version": version,
        "changed": True,
        "source_version": source_version,
        "parent_version": parent,
        "rows": len(rows),
        "usable": len(kept),
        "positives": positives,
        "negatives": len(kept) - positives,
        "findings": dict(sorted(Counter(category(item.row.finding) for item in kept).items())),
        "excluded": dict(sorted(Counter(e.reason for e in exclusions).items())),
        "exclusions": [e.as_dict() for e in ordered],
        "images_hashed": hashed,
        "duplicates": [{k: d[k] for k in keys} for d in duplicates],
        "cross_source_duplicates": sum(d["dropped_source"] != d["kept_source"] for d in duplicates),
        "splits": per_split,
        "split_of_patient": dict(sorted(splits.items())),
    }


def _label_disagreements(
    duplicates: list[dict[str, Any]], by_key: Mapping[tuple[str, int], SourceFile]
) -> list[dict[str, Any]]:
    """Copies of one film whose findings fall in different categories (covid, normal, pneumonia, other),
    and what was decided: the kept copy's finding stands (see :func:`_drop_near_duplicates` for which)."""
    found = []
    for entry in duplicates:
        dropped, kept = by_key[_dropped_key(entry)].row, by_key[_kept_key(entry)].row
        if category(dropped.finding) != category(kept.finding):
            found.append(
                {
                    "kept": f"{kept.source}:{kept.image_path}",
                    "kept_finding": kept.finding,
                    "dropped": f"{dropped.source}:{dropped.image_path}",
                    "dropped_finding": dropped.finding,
                    "decision": f"kept {kept.source}'s finding {kept.finding!r}; the copy's "
                    f"{dropped.finding!r} was dropped with it",
                }
            )
    return found
