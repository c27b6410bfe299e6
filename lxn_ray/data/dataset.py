"""Immutable dataset versions under storage: layout, atomic publication, patient-level splits, readers.

A version is a folder ``datasets/<version>/`` holding Parquet tables (``images``: one row per usable
image; ``exclusions``; ``duplicates``; ``patients``; ``fingerprints``), ``report.json`` and
``manifest.json``. The manifest is written last and is the version's commit marker; ``datasets/LATEST``
then moves to it. A run that dies part-way leaves a folder without a manifest, which no reader sees
and the next run removes, so the latest good version is never touched.

Image bytes are stored once, by content, under ``blobs/sha256/``; tables refer to them by key. The key is
the sha256 of the file the source holds. For PNG and JPEG files the blob is that file; for a DICOM file
it is the PNG of its film (:func:`lxn_ray.data.fetch.storable`), so no header field reaches storage - a blob
made so is not re-rendered when the DICOM pipeline changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lxn_ray.infra.storage import Storage
from lxn_ray.sources.tasks import Task, resolve_task

DATASETS = "datasets"
LATEST = f"{DATASETS}/LATEST"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level split fractions. The salt makes the assignment reproducible across machines."""

    train: float = 0.70
    val: float = 0.15
    salt: str = "lxn-ray-split-v1"

    def split_of(self, group_key: str) -> str:
        """The split of a new patient group, from a hash of its key: stable, uniform, deterministic."""
        digest = hashlib.sha256(f"{self.salt}:{group_key}".encode()).hexdigest()
        fraction = int(digest[:15], 16) / 16**15
        if fraction < self.train:
            return "train"
        return "val" if fraction < self.train + self.val else "test"


def blob_key(sha256: str) -> str:
    """Where the bytes of an image with this content hash live in storage."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def version_key(version: str, name: str = "") -> str:
    return f"{DATASETS}/{version}/{name}".rstrip("/")


PATIENT_SALT_KEY = "secrets/patient-id-salt"
PATIENT_SALT_ENV = "LXN_PATIENT_ID_SALT"


def patient_id_salt(storage: Storage) -> bytes:
    """The secret that pseudonymises this store's patient ids (:func:`lxn_ray.sources.layouts.pseudonymise`).

    ``$LXN_PATIENT_ID_SALT`` when set (keep it apart from a store others read), else
    ``secrets/patient-id-salt`` in storage, created once from 32 random bytes. The same salt must be
    used for every ingest into a store: ingest refuses a salt whose check differs from the last version's
    (:func:`salt_check`), since new pseudonyms would make every patient new."""
    import os
    import secrets

    if value := os.environ.get(PATIENT_SALT_ENV, "").strip():
        if len(value) < 16:
            raise ValueError(f"{PATIENT_SALT_ENV} must have at least 16 characters")
        return value.encode("utf-8")
    if not storage.exists(PATIENT_SALT_KEY):
        storage.write_bytes(PATIENT_SALT_KEY, secrets.token_hex(32).encode())
    return storage.read_bytes(PATIENT_SALT_KEY).strip()


def salt_check(salt: bytes) -> str:
    """A short digest that tells salts apart without revealing one (recorded in the manifest)."""
    return hashlib.sha256(b"lxn_ray patient-id salt check:" + salt).hexdigest()[:16]


def new_version_id(source_version: str, config_hash: str, now: datetime | None = None) -> str:
    """A sortable, unique id: creation time plus a digest of what the version was made from."""
    now = now or datetime.now(timezone.utc)
    digest = hashlib.sha256(f"{source_version}|{config_hash}|{now.isoformat()}".encode()).hexdigest()[:8]
    return f"ds-{now:%Y%m%d-%H%M%S}-{digest}"


def latest_version(storage: Storage) -> str | None:
    """The published version LATEST points at, or None for an empty store."""
    if not storage.exists(LATEST):
        return None
    version = storage.read_text(LATEST).strip()
    if not storage.exists(version_key(version, "manifest.json")):
        raise RuntimeError(f"{storage.uri_of(LATEST)} names {version}, which has no manifest")
    return version


def resolve_version(storage: Storage, version: str | None = "latest") -> str:
    """``latest`` (or None) to the latest version id; checks a named version is published."""
    if version in (None, "latest"):
        found = latest_version(storage)
        if found is None:
            raise FileNotFoundError(f"no dataset version in {storage.uri}: run jobs/ingest.py first")
        return found
    if not storage.exists(version_key(version, "manifest.json")):
        raise FileNotFoundError(f"dataset version {version} is not published in {storage.uri}")
    return version


def read_manifest(storage: Storage, version: str) -> dict[str, Any]:
    return storage.read_json(version_key(version, "manifest.json"))


def read_table(storage: Storage, version: str, name: str) -> pa.Table:
    """A table of a version: images, exclusions, duplicates, patients or fingerprints."""
    return storage.read_table(version_key(version, f"{name}.parquet"))


def remove_unpublished(storage: Storage) -> list[str]:
    """Delete version folders a failed run left without a manifest; returns their names."""
    removed = []
    for key in storage.list(DATASETS):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("ds-") and not storage.exists(f"{key}/manifest.json"):
            storage.delete_tree(key)
            removed.append(name)
    return removed


def publish(
    storage: Storage,
    version: str,
    tables: Mapping[str, pa.Table],
    report: Mapping[str, Any],
    manifest: Mapping[str, Any],
) -> None:
    """Write a complete version, then its manifest (the commit marker), then move LATEST to it."""
    for name, table in tables.items():
        storage.write_table(version_key(version, f"{name}.parquet"), table)
    storage.write_json(version_key(version, "report.json"), report)
    storage.write_json(version_key(version, "manifest.json"), manifest)
    storage.write_text(LATEST, version + "\n")


def assign_splits(
    groups: Iterable[Iterable[str]], previous: Mapping[str, str], config: SplitConfig = SplitConfig()
) -> dict[str, str]:
    """Split of every patient, by group; a patient seen in an earlier version never changes split.

    A group is a set of patient ids that must share a split (joined by a duplicate radiograph). A new
    group takes the split of its hashed smallest id. A group that grew around patients already split
    gives its new members the split of its smallest already-split member; the old members keep theirs.
    """
    splits: dict[str, str] = {}
    for group in groups:
        members = sorted(set(group))
        known = [patient for patient in members if patient in previous]
        shared = previous[known[0]] if known else config.split_of(members[0])
        for patient in members:
            splits[patient] = previous.get(patient, shared)
    return splits


def for_task(images: pa.Table, task: Task | str | None = None) -> pa.Table:
    """The rows ``task`` uses, with ``label`` (int64: 1 positive, 0 negative) set by the task from each
    row's finding; rows the task does not use are dropped. A version made before sources had names gets
    a ``source`` column holding ``ieee8023``, the one source it had."""
    task = resolve_task(task)
    labels = [task.label_of(finding) for finding in images.column("finding").to_pylist()]
    if "source" not in images.column_names:
        images = images.append_column("source", pa.array(["ieee8023"] * images.num_rows, pa.string()))
    images = images.set_column(images.column_names.index("label"), "label", pa.array(labels, pa.int64()))
    return images.filter(pc.is_valid(images["label"]))


def read_split(
    storage: Storage,
    version: str | None,
    split: str | None,
    task: Task | str | None = None,
    sources: Iterable[str] = (),
) -> pa.Table:
    """The image rows of one split (None: every split) of a version (``latest`` by default) that ``task``
    uses (default covid-vs-rest), labelled for it (:func:`for_task`); only rows of ``sources`` when given."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    images = read_table(storage, resolve_version(storage, version), "images")
    if split is not None:
        images = images.filter(pc.equal(images["split"], split))
    images = for_task(images, task)
    sources = list(sources)
    return images.filter(pc.is_in(images["source"], pa.array(sources, pa.string()))) if sources else images


CHANGE_LIST_LIMIT = 200  # rows listed per kind in a report; the counts are always complete


def changes_between(
    before: pa.Table | None, after: pa.Table, label_column: str = "finding"
) -> dict[str, Any]:
    """What changed in the usable rows between two versions' ``images`` tables, keyed by image content
    (sha256): rows added, removed, relabelled (another ``label_column``: the finding, or a task's label
    after :func:`for_task`), or changed in view or patient.

    Returns ``{"added": n, "removed": n, "relabelled": n, "view_changed": n, "patient_changed": n,
    "rows": {kind: [{"sha256", "source", "image_path", "before", "after"}, ...]}}``; retraining reads it.
    """
    kinds = ("added", "removed", "relabelled", "view_changed", "patient_changed")
    result: dict[str, Any] = {kind: 0 for kind in kinds}
    listed: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    old = {row["sha256"]: row for row in before.to_pylist()} if before is not None else {}
    new = {row["sha256"]: row for row in after.to_pylist()}

    def note(kind: str, row: Mapping[str, Any], was: Any = None, now: Any = None) -> None:
        result[kind] += 1
        if len(listed[kind]) < CHANGE_LIST_LIMIT:
            entry = {
                "sha256": row["sha256"],
                "source": row.get("source", ""),
                "image_path": row["image_path"],
            }
            listed[kind].append({**entry, **({"before": was, "after": now} if kind not in kinds[:2] else {})})

    if before is not None:
        for sha, row in new.items():
            if sha not in old:
                note("added", row)
                continue
            was = old[sha]
            if was[label_column] != row[label_column]:
                note("relabelled", row, was[label_column], row[label_column])
            if was["view"] != row["view"]:
                note("view_changed", row, was["view"], row["view"])
            if was["patient_id"] != row["patient_id"]:
                note("patient_changed", row, was["patient_id"], row["patient_id"])
        for sha, row in old.items():
            if sha not in new:
                note("removed", row)
    else:
        result["added"] = len(new)
    result["rows"] = {kind: rows for kind, rows in listed.items() if rows}
    return result
