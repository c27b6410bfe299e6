"""A hospital's DICOM films as a source: the ``dicom`` layout, end to end through a real local Ray.

The films are the bundle's own radiographs written as DICOM files by pydicom (MONOCHROME1 and 2, 8 and
12 bit, RLE and JPEG 2000), with protected health information in their headers that must never reach
storage, beside objects that are not chest films.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lxn_ray.cli.ingest import main as ingest_main
from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.images.decode import PNG_SIGNATURE
from lxn_ray.images.dicom import MULTI_FRAME, NOT_RADIOGRAPH
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.layouts import SourceSpec, pseudonymise, read_rows
from lxn_ray.sources.metadata import MISSING_FILE, NON_FRONTAL, UNREADABLE
from lxn_ray.sources.transports import FolderSource, SourceError
from tests.helpers import PHI_FIELDS, copy_store, dicom_film

pytestmark = pytest.mark.usefixtures("ray_local")

# file -> (patient id in the header, finding in the manifest, dicom_film options)
FILMS = {
    "a1.dcm": ("MRN-1001", "COVID-19", {}),
    "a2.dcm": ("MRN-1001", "COVID-19", {"photometric": "MONOCHROME1", "bits": 16}),
    "b1.dcm": ("MRN-2002", "No Finding", {"bits": 16, "compression": "jpeg2000"}),
    "c1.dcm": ("MRN-3003", "Pneumonia/Bacterial", {"compression": "rle"}),
}
NOT_FILMS = {  # file -> (options, the exclusion reason)
    "ct.dcm": ({"modality": "CT"}, NOT_RADIOGRAPH),
    "lateral.dcm": ({"view": "LL"}, NON_FRONTAL),
    "cine.dcm": ({"frames": 2}, MULTI_FRAME),
}


def bundle_films(root: Path, count: int) -> list[Image.Image]:
    """The first ``count`` PA films of the checkout, as grayscale images at most 384 px."""
    films = []
    with open(root / "metadata.csv", newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            path = root / "images" / row["filename"]
            if (
                row.get("view") == "PA"
                and path.suffix.lower() in (".png", ".jpg", ".jpeg")
                and path.is_file()
            ):
                image = Image.open(path).convert("L")
                image.thumbnail((384, 384))
                films.append(image)
            if len(films) == count:
                return films
    raise AssertionError("the checkout has too few PA films")


def hospital_folder(root: Path, films: list[Image.Image]) -> Path:
    root.mkdir(parents=True)
    manifest = [["filename", "finding"]]
    for (name, (patient, finding, options)), film in zip(FILMS.items(), films, strict=False):
        (root / name).write_bytes(dicom_film(film, patient_id=patient, **options))
        manifest.append([name, finding])
    for (name, (options, _)), film in zip(NOT_FILMS.items(), films, strict=False):
        (root / name).write_bytes(dicom_film(film, patient_id="MRN-9009", **options))
        manifest.append([name, "COVID-19"])
    (root / "broken.dcm").write_bytes(dicom_film(films[0], patient_id="MRN-9010")[:200])
    manifest += [["broken.dcm", "COVID-19"], ["missing.dcm", "No Finding"]]
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows(manifest)
    return root


@pytest.fixture(scope="module")
def hospital(bundle_checkout, tmp_path_factory) -> tuple[Path, list[Image.Image]]:
    films = bundle_films(bundle_checkout("2020-06-22"), len(FILMS))
    return hospital_folder(tmp_path_factory.mktemp("dicom") / "films", films), films


@pytest.fixture(scope="module")
def hospital_store(hospital, tmp_path_factory) -> tuple[Path, dict]:
    """The hospital folder ingested once for the module as source "hospital": (the store's folder, the
    report). Read-only: a test that ingests again works on a copy (:func:`tests.conftest.copy_store`)."""
    root, _ = hospital
    folder = tmp_path_factory.mktemp("dicom-store") / "store"
    return folder, ingest([SourceSpec("hospital", str(root), layout="dicom")], Storage.open(str(folder)))


def every_stored_byte(storage_root: Path) -> bytes:
    return b"\n".join(path.read_bytes() for path in sorted(storage_root.rglob("*")) if path.is_file())


def test_dicom_films_are_ingested_and_no_header_field_beyond_those_used_is_stored(
    hospital, hospital_store, tmp_path
):
    root, films = hospital
    folder, report = hospital_store
    storage = Storage.open(str(folder))

    assert report["usable"] == len(FILMS)
    reasons = {entry["filename"]: entry["reason"] for entry in report["exclusions"]}
    assert reasons == {
        **{name: reason for name, (_, reason) in NOT_FILMS.items()},
        "broken.dcm": UNREADABLE,
        "missing.dcm": MISSING_FILE,
    }
    images = {
        row["filename"]: row
        for row in dataset.read_table(storage, report["dataset_version"], "images").to_pylist()
    }
    assert set(images) == set(FILMS)
    assert {row["modality"] for row in images.values()} == {"DX"}
    assert {row["view"] for row in images.values()} == {"PA"}
    assert {row["metadata"] for row in images.values()} == {"{}"}  # no other column kept
    # the patient is the header's Patient ID, stored only as a salted hash: a1 and a2 are one patient
    salt = dataset.patient_id_salt(storage)
    assert (
        images["a1.dcm"]["patient_id"]
        == images["a2.dcm"]["patient_id"]
        == "hospital:" + pseudonymise("MRN-1001", salt)
    )
    assert len({row["patient_id"] for row in images.values()}) == 3
    assert images["a1.dcm"]["split"] == images["a2.dcm"]["split"]
    assert report["sources"]["hospital"]["patient_ids"] == "salted hashes"

    # Nothing stored anywhere (tables, reports, manifests, blobs) holds a header field beyond those used.
    stored = every_stored_byte(Path(storage.root))
    for value in [*PHI_FIELDS.values(), "MRN-1001", "MRN-2002", "MRN-3003", "MRN-9009"]:
        assert value.encode() not in stored, value
    # Blobs are the films' pixels as PNG, as a viewer shows them (MONOCHROME1 inverted back).
    for name, film in zip(FILMS, films, strict=False):
        blob = storage.read_bytes(images[name]["image_key"])
        assert blob.startswith(PNG_SIGNATURE)
        pixels = np.asarray(Image.open(io.BytesIO(blob))).astype(int)
        assert np.abs(pixels - np.asarray(film).astype(int)).max() <= 1, name

    copy = Storage.open(str(copy_store(folder, tmp_path / "store")))
    again = ingest([SourceSpec("hospital", str(root), layout="dicom")], copy)
    assert again["changed"] is False and again["dataset_version"] == report["dataset_version"]


def test_a_different_salt_is_refused_rather_than_making_every_patient_new(
    hospital, hospital_store, tmp_path, monkeypatch
):
    root, _ = hospital
    storage = Storage.open(str(copy_store(hospital_store[0], tmp_path / "store")))
    spec = SourceSpec("hospital", str(root), layout="dicom")
    monkeypatch.setenv(dataset.PATIENT_SALT_ENV, "another-salt-of-enough-length")
    with pytest.raises(SourceError, match="salt differs"):
        ingest([spec], storage)


def test_the_dicom_layout_reads_class_folders_and_refuses_rows_without_a_salt(tmp_path):
    from tests.helpers import radiograph

    root = tmp_path / "folders"
    for finding, seed in (("COVID-19", 1), ("No_findings", 2)):
        (root / finding).mkdir(parents=True)
        (root / finding / "IM000001").write_bytes(
            dicom_film(radiograph(seed, (64, 72)), patient_id=f"P{seed}")
        )
    (root / "DICOMDIR").write_bytes(b"not a film")
    spec = SourceSpec("ward", str(root), layout="dicom")
    snapshot = FolderSource(root, marker=None).open()
    with pytest.raises(SourceError, match="salt"):
        read_rows(snapshot, spec)
    found = read_rows(snapshot, spec, patient_salt=b"0123456789abcdef")
    assert sorted(row.finding for row in found.rows) == ["COVID-19", "No Finding"]
    assert {row.patient_id for row in found.rows} == {
        pseudonymise(p, b"0123456789abcdef") for p in ("P1", "P2")
    }


def test_ingest_job_takes_a_dicom_folder_as_layout_equals_location(hospital, tmp_path, capsys):
    root, _ = hospital
    store = tmp_path / "store"
    assert ingest_main(["--source", f"dicom={root}", "--storage", str(store)]) == 0
    out = capsys.readouterr().out
    assert "dicom (dicom, 4 usable)" in out
    assert "MRN-" not in out
