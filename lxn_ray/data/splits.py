"""Step 5 of ingest: patients qualified by source and split as groups joined by duplicate radiographs, and
what the parent version fixes for a run (its images, always kept, and its patients' splits)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lxn_ray.data import dataset
from lxn_ray.data.duplicates import dropped_key, kept_key
from lxn_ray.data.fetch import SourceFile
from lxn_ray.infra.storage import Storage

PATIENTS_SCHEMA = pa.schema([("patient_id", pa.string()), ("split", pa.string())])


@dataclass(frozen=True)
class PreviousVersion:
    """What the parent version fixes for this run: its images (always kept) and its patients' splits."""

    usable_shas: frozenset[str] = frozenset()
    splits: Mapping[str, str] = field(default_factory=dict)
    images: pa.Table | None = None

    @classmethod
    def load(cls, storage: Storage, version: str | None, names: Sequence[str] = ()) -> PreviousVersion:
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


def patient_of(item: SourceFile) -> str:
    """The patient id qualified by its source (``darkcovidnet:00001280``: two sources' ids never meet),
    or a stand-in unique to the image when the source names no patient."""
    if not item.row.patient_id:
        return f"unknown-{item.sha256[:12]}"
    return f"{item.source}:{item.row.patient_id}"


def split_patients(
    kept: list[SourceFile],
    duplicates: list[dict[str, Any]],
    by_key: Mapping[tuple[str, int], SourceFile],
    previous: Mapping[str, str],
    config: dataset.SplitConfig,
) -> dict[str, str]:
    """``{patient id: split}`` of every patient with a usable or a dropped image, and of every patient of
    ``previous`` (the parent version's map, never changed). Patients of a dropped duplicate and its kept
    copy form one group (union-find over ``duplicates``, whose rows ``by_key`` finds by (source, line));
    groups are split by :func:`lxn_ray.data.dataset.assign_splits`."""
    parent: dict[str, str] = {}

    def find(patient: str) -> str:
        parent.setdefault(patient, patient)
        while parent[patient] != patient:
            parent[patient] = parent[parent[patient]]
            patient = parent[patient]
        return patient

    for item in kept:
        find(patient_of(item))
    for entry in duplicates:
        a = patient_of(by_key[dropped_key(entry)])
        b = patient_of(by_key[kept_key(entry)])
        parent[find(a)] = find(b)
    groups: dict[str, set[str]] = defaultdict(set)
    for patient in list(parent):
        groups[find(patient)].add(patient)
    # Patients of earlier versions stay in the map even when none of their images is usable now.
    return {**previous, **dataset.assign_splits(groups.values(), previous, config)}
