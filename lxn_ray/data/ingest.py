"""Ingest: the snapshots of one or more named sources -> one deduplicated, patient-split dataset version
of findings; :func:`ingest` ties the steps together and writes the report.

The steps, in order:

1. Read each source's rows in its layout (:mod:`lxn_ray.sources.layouts`: metadata.csv of any schema, class
   folders or a manifest) and exclude rows metadata alone rules out. Every row keeps its source's name.
2. Read the remaining rows' files safely and hash their bytes (sha256) (:mod:`lxn_ray.data.fetch`).
   Together with the rows this gives each source's version; when they and the config match the latest
   version, stop: nothing changed. Remote sources (S3, HTTP) are fetched by Ray Data tasks on the
   workers, which also fingerprint and store new contents as they go, so image bytes never pass through
   the driver.
3. Decode and fingerprint, as Ray Data tasks spread over the cluster, only contents never seen before
   (fingerprints are cached in storage by sha256). Unreadable files are excluded with the reason.
4. Drop duplicates, within and across sources (:mod:`lxn_ray.data.duplicates`): rows naming identical
   bytes, then the same radiograph published twice, found by :mod:`lxn_ray.dedupe` comparing new images
   with each other and with the whole previous version (files of the same name in two sources are
   candidates too). Kept: an image of the previous version; else the source listed first; else the
   larger image; else the smaller file name. Copies whose findings disagree are reported.
5. Split by patient (ids qualified by source), patients joined by a duplicate radiograph sharing a split
   across sources, earlier splits frozen (:mod:`lxn_ray.data.splits`).
6. Store new image bytes by content and publish the version atomically (:mod:`lxn_ray.data.dataset`), with
   what changed against the parent version.

A version stores each image's finding; a task (:mod:`lxn_ray.sources.tasks`) decides labels. The
``label`` column of the images table and the report's positives and negatives are the default task's
(:data:`STORED_TASK`), kept so that the stored format is what it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from lxn_ray.data import dataset
from lxn_ray.data.duplicates import (
    DUPLICATES_SCHEMA,
    drop_identical,
    drop_near_duplicates,
    dropped_key,
    label_disagreements,
    search_summary,
)
from lxn_ray.data.fetch import (
    EXCLUSIONS_SCHEMA,
    RECORD_COLUMNS,
    Exclusion,
    SourceFile,
    content_digest,
    exclusion_of,
    fetch_on_ray,
    fingerprint_contents,
    read_files,
    store_blobs,
    write_fingerprint_table,
)
from lxn_ray.data.settings import IngestConfig
from lxn_ray.data.splits import PATIENTS_SCHEMA, PreviousVersion, patient_of, split_patients
from lxn_ray.dedupe.thumbs import ThumbRef
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.layouts import DEFAULT_SOURCE_NAME, SourceRows, SourceSpec, read_rows
from lxn_ray.sources.metadata import DUPLICATE, MetadataRow
from lxn_ray.sources.tasks import Task, category, resolve_task
from lxn_ray.sources.transports import Snapshot, Source, SourceError


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
# The images table's ``label`` column and the report's positives/negatives: the default task's label
# (covid-vs-rest), decided by the task. Kept for the stored format; readers relabel rows for their own
# task when they read them (:func:`lxn_ray.data.dataset.for_task`).
STORED_TASK: Task = resolve_task(None)
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
    planned: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Bring the dataset in ``storage`` up to date with ``sources``; returns the ingest report.

    ``sources`` is a lone :class:`lxn_ray.sources.transports.Source` (``--source``) or the
    :class:`lxn_ray.sources.layouts.SourceSpec` list of a ``--sources`` file; their order is their priority
    when one film sits in two of them. ``planned``, when given, is called once every source's rows are
    read and before any file is, with the number of films metadata did not exclude (a job's plan).
    """
    started = time.monotonic()
    stages = _Stopwatch()
    reads: list[_Read] = []
    exclusions: list[Exclusion] = []
    named = named_sources(sources)
    salt = _patient_salt(storage, [spec for spec, _ in named])
    with stages("read"):
        opened = []
        for spec, source in named:
            snapshot = source.open()
            opened.append((spec, snapshot, read_rows(snapshot, spec, config.frontal_views, salt)))
        if planned is not None:
            planned(sum(not row.exclusion for _, _, found in opened for row in found.rows))
        for spec, snapshot, found in opened:
            log(f"source {spec.name}: {snapshot.description}")
            exclusions += [Exclusion(row, row.exclusion, row.detail) for row in found.rows if row.exclusion]
            wanted = [row for row in found.rows if not row.exclusion]
            fetched: dict[str, dict[str, Any]] = {}
            if snapshot.remote:
                files, unreadable, fetched = fetch_on_ray(snapshot, storage, wanted, config)
            else:
                files, unreadable = read_files(snapshot, wanted, config.limits)
            exclusions += unreadable
            version = snapshot.version(content_digest(found.listing, files))
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
    previous = PreviousVersion.load(storage, parent, [read.spec.name for read in reads])
    snapshots = {read.spec.name: read.snapshot for read in reads}
    priority = {read.spec.name: rank for rank, read in enumerate(reads)}
    rows = [row for read in reads for row in read.found.rows]
    files = sorted(
        (item for read in reads for item in read.files), key=lambda f: (priority[f.source], f.row.line)
    )
    fetched = {sha: record for read in reads for sha, record in read.fetched.items()}

    primaries, duplicates = drop_identical(files, previous.rows)
    with stages("fingerprint"):
        fingerprints, hashed = fingerprint_contents(snapshots, storage, primaries, config, fetched)
    readable = [item for item in primaries if not fingerprints[item.sha256].get("error")]
    for item in files:  # rows repeating an unreadable file are unreadable too
        if error := fingerprints[item.sha256].get("error"):
            exclusions.append(Exclusion(item.row, exclusion_of(error), error))
    duplicates = [entry for entry in duplicates if not fingerprints[entry["sha256"]].get("error")]

    log(f"comparing {len(readable)} images for duplicates ({len(previous.usable_shas)} already published)")
    with stages("dedupe"):
        kept, near, search = drop_near_duplicates(
            readable, fingerprints, previous.usable_shas, config.dedupe, priority
        )
    duplicates += near
    by_key = {item.row.key: item for item in files}
    exclusions += [
        Exclusion(
            by_key[dropped_key(entry)].row, DUPLICATE, f"duplicate of {entry['kept_source']}:{entry['kept']}"
        )
        for entry in duplicates
    ]
    splits = split_patients(kept, duplicates, by_key, previous.splits, config.splits)

    with stages("publish"):
        version = dataset.new_version_id(source_version, config_hash)
        log(f"storing images and publishing {version}")
        store_blobs(snapshots, storage, kept, previous.usable_shas, config.limits)
        images = _images_table(kept, fingerprints, splits)
        tables = {
            "images": images,
            "exclusions": pa.Table.from_pylist([e.as_dict() for e in exclusions], schema=EXCLUSIONS_SCHEMA),
            "duplicates": pa.Table.from_pylist(duplicates, schema=DUPLICATES_SCHEMA),
            "patients": pa.Table.from_pylist(
                [{"patient_id": p, "split": s} for p, s in sorted(splits.items())], schema=PATIENTS_SCHEMA
            ),
        }
        # written first and streamed: stored thumbnails are copied from the cache a row group at a time
        write_fingerprint_table(
            storage,
            dataset.version_key(version, "fingerprints.parquet"),
            [item.sha256 for item in kept],
            fingerprints,
        )
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
        report["dedupe"] = search_summary(search)
        report["label_disagreements"] = label_disagreements(duplicates, by_key)
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
            "tables": sorted([*tables, "fingerprints"]),
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


def _images_table(
    kept: list[SourceFile], fingerprints: Mapping[str, dict[str, Any]], splits: Mapping[str, str]
) -> pa.Table:
    """The version's ``images`` table: one row per kept image - source, file, patient, finding (and the
    :data:`STORED_TASK`'s label of it), view, split, content key, image facts and every metadata column."""
    rows = []
    for item in kept:
        record, row = fingerprints[item.sha256], item.row
        patient = patient_of(item)
        rows.append(
            {
                "source": row.source,
                "filename": row.filename,
                "image_path": row.image_path,
                "patient_id": patient,
                "label": STORED_TASK.label_of(row.finding),
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
                    if not isinstance(record[column], bytes | ThumbRef)  # a stored thumb: a ThumbRef
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
    def positive(item: SourceFile) -> bool:
        return STORED_TASK.label_of(item.row.finding) == 1

    positives = sum(map(positive, kept))
    per_split: dict[str, dict[str, Any]] = {}
    for name in dataset.SPLITS:
        members = [item for item in kept if splits[patient_of(item)] == name]
        per_split[name] = {
            "images": len(members),
            "positives": sum(map(positive, members)),
            "patients": len({patient_of(item) for item in members}),
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
