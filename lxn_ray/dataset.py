"""Immutable dataset versions under storage: layout, atomic publication, patient-level splits, readers.

A version is a folder ``datasets/<version>/`` holding Parquet tables (``images``: one row per usable
image; ``exclusions``; ``duplicates``; ``patients``; ``fingerprints``), ``report.json`` and
``manifest.json``. The manifest is written last and is the version's commit marker; ``datasets/LATEST``
then moves to it. A run that dies part-way leaves a folder without a manifest, which no reader sees
and the next run removes, so the latest good version is never touched.

Image bytes are stored once, by content, under ``blobs/sha256/``; tables refer to them by key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lxn_ray.storage import Storage

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


def read_split(storage: Storage, version: str | None, split: str) -> pa.Table:
    """The image rows of one split of a version (``latest`` by default)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    images = read_table(storage, resolve_version(storage, version), "images")
    return images.filter(pc.equal(images["split"], split))
