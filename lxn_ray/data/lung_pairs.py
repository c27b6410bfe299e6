"""Which film each lung-field mask belongs to, whose film it is and which split it falls in.

A mask of a masks folder (:mod:`lxn_ray.sources.masks`) is paired with its film from, in this order: the
folder itself (a ``film`` column), ``--films`` (a folder or git repository holding the films by file
name, at its root or under ``images/``), or the dataset version (its ``images`` row of the same
``filename``, source ``ieee8023`` preferred; the film's bytes are the version's blob).

Splits are by patient, so the classifier's held-out patients stay held out: a film in the dataset version
keeps its patient's split, and every other film of a manifest patient who has one there takes that split
too; any other film takes ``SplitConfig().split_of(patient)``, the patient being the manifest's (or, with
none, the film itself). A film the dataset version excluded (CT, a lateral view, a dropped duplicate) is
skipped with the version's reason. Patient ids stay in memory: reports carry counts only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lxn_ray.data import dataset
from lxn_ray.images.decode import decode_image, to_grayscale
from lxn_ray.images.types import ImageRejected
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.masks import UNKNOWN_FILM, UNREADABLE, MaskError, MaskFolder, MaskRow, check_film_size
from lxn_ray.sources.transports import Snapshot, UnsafePath

PREFERRED_SOURCE = "ieee8023"  # the masks of /work/shared/data/lungmasks are of this source's films
INGEST_HINT = (
    "python jobs/ingest.py --source ../shared/data/ieee8023.bundle --ref snapshot-2020-06-22 --storage {uri}"
)


@dataclass(frozen=True)
class PairedFilm:
    """A mask row and where its film is: ``patient`` is a grouping key (pseudonymised in the dataset
    version; in memory only), ``split`` one of train/val/test."""

    row: MaskRow
    patient: str
    split: str
    image_key: str | None = None  # the film's blob in storage, when the dataset version provides it


@dataclass
class Pairing:
    """The paired films, and the rows skipped with why (``{reason: count}`` and one entry per row)."""

    films: list[PairedFilm]
    film_source: str  # "dataset version <id>", "films location" or "masks folder"
    dataset_version: str | None
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, error: MaskError) -> None:
        """Count ``error``'s row as skipped (its line and kind, nothing about the patient)."""
        self.skipped[error.kind] += 1
        self.skipped_rows.append({"line": error.line, "reason": str(error)})


def pair_films(
    storage: Storage,
    masks: MaskFolder,
    dataset_version: str | None = "latest",
    films: Snapshot | None = None,
    splits: dataset.SplitConfig | None = None,
) -> Pairing:
    """Pair every mask row with its film, patient and split (see the module). ``dataset_version``: an id,
    ``latest``, or None for none. Rows whose film is nowhere, or excluded by the dataset version, are
    skipped (:meth:`Pairing.skip`). Raises ``FileNotFoundError`` with the ingest command to run when
    neither a dataset version nor ``films`` (nor the folder's ``film`` column) can give the films."""
    splits = splits or dataset.SplitConfig()
    version = _find_version(storage, dataset_version)
    rows_by_name, excluded = {}, {}
    if version is not None:
        for row in sorted(
            dataset.read_table(storage, version, "images").to_pylist(),
            key=lambda r: (r.get("source") != PREFERRED_SOURCE, r.get("source") or ""),
        ):
            rows_by_name.setdefault(row["filename"], row)
        for row in dataset.read_table(storage, version, "exclusions").to_pylist():
            excluded.setdefault(row["filename"], row["reason"])
    in_folder = all(row.film is not None for row in masks.rows)
    if version is None and films is None and not in_folder:
        raise FileNotFoundError(
            f"no films for the masks: {storage.uri} holds no dataset version and no --films was given. "
            f"Ingest the films first: {INGEST_HINT.format(uri=storage.uri)} (or pass --films LOCATION)"
        )
    source = "masks folder" if in_folder else "films location" if films is not None else f"dataset {version}"
    pairing = Pairing(films=[], film_source=source, dataset_version=version)
    # A manifest patient with a film in the dataset version takes that film's split for all their films.
    patient_splits = {
        row.patient: rows_by_name[row.image]["split"]
        for row in masks.rows
        if row.patient and row.image in rows_by_name
    }
    for row in masks.rows:
        known = rows_by_name.get(row.image)
        if known is None and row.image in excluded:
            pairing.skip(
                MaskError(row.line, f"film excluded from the dataset version ({excluded[row.image]})")
            )
        elif known is not None:
            key = known["image_key"] if row.film is None and films is None else None
            pairing.films.append(PairedFilm(row, known["patient_id"], known["split"], key))
        elif row.film is None and films is None:
            pairing.skip(MaskError(row.line, UNKNOWN_FILM, f"{row.image} is not in the dataset version"))
        else:
            patient = f"masks:{row.patient}" if row.patient else f"film:{row.image}"
            split = patient_splits.get(row.patient) or splits.split_of(patient)
            pairing.films.append(PairedFilm(row, patient, split))
    return pairing


def _find_version(storage: Storage, reference: str | None) -> str | None:
    """The dataset version to match films in; None when ``reference`` is None or ``latest`` of an empty
    store. A named version that is not published raises ``FileNotFoundError``."""
    if reference is None:
        return None
    if reference == "latest":
        return dataset.latest_version(storage)
    return dataset.resolve_version(storage, reference)


def load_pair(
    storage: Storage, masks: MaskFolder, film: PairedFilm, films: Snapshot | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(film uint8 ``(h, w)``, mask bool ``(h, w)``) of a paired film, the film in grayscale. Raises
    :class:`MaskError` for any problem of the row (missing mask, not binary, sizes differ, film missing or
    unreadable)."""
    row = film.row
    mask = masks.read_mask(row)
    pixels = masks.read_film(row) if row.film is not None else _read_film(storage, masks, film, films)
    check_film_size(row, mask, pixels)
    return pixels, mask


def _read_film(storage: Storage, masks: MaskFolder, film: PairedFilm, films: Snapshot | None) -> np.ndarray:
    row, limits = film.row, masks.limits
    try:
        if film.image_key is not None:
            data = storage.read_bytes(film.image_key)
        else:
            data = _read_by_name(films, row.image, limits.max_file_bytes)
        return np.asarray(to_grayscale(decode_image(data, limits).image))
    except (FileNotFoundError, UnsafePath):
        raise MaskError(row.line, UNKNOWN_FILM, f"{row.image} is not in the films location") from None
    except (ImageRejected, ValueError) as error:
        raise MaskError(row.line, UNREADABLE, f"film {row.image}: {error}") from None


def _read_by_name(films: Snapshot | None, name: str, max_bytes: int) -> bytes:
    """A film's bytes from a films location, at its root or under ``images/`` (the upstream layout)."""
    if films is None:
        raise FileNotFoundError(name)
    for path in (name, f"images/{name}"):
        try:
            return films.read_file(path, max_bytes)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(name)
