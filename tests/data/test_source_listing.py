"""One tree, every transport: a folder, a git repository, an S3 mirror (moto's server on 127.0.0.1) and an
HTTP manifest list the same files - hidden and system files (``.ipynb_checkpoints``, ``._*`` AppleDouble
forks, ``__MACOSX``, ``Thumbs.db``) are never data - and every file a layout does not read is named in the
report with its reason. Real files on disk and in the S3 server; one ingest through the session's Ray."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import boto3
import pytest
from PIL import Image

from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.images.dicom import NO_PIXELS
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.layouts import DICOM_HEADER_BYTES, SourceSpec, read_rows
from lxn_ray.sources.metadata import (
    HIDDEN_FILE,
    NOT_IN_CLASS_FOLDER,
    UNSUPPORTED_FORMAT,
    MetadataError,
)
from lxn_ray.sources.tasks import resolve_task
from lxn_ray.sources.transports import FolderSource, GitSource, SourceError
from tests.helpers import dicom_film, encode, radiograph

COVID_VS_REST = resolve_task("covid-vs-rest")


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def tree_with_system_files(root: Path) -> Path:
    """Class folders as a notebook user on a Mac zips them: each film has a Jupyter checkpoint copy (the same
    bytes) in ``.ipynb_checkpoints/``, an AppleDouble fork ``._NAME`` (not an image) beside it and again
    under ``__MACOSX/``, plus Finder and Explorer files. And what a layout does not read: TIFF and BMP films,
    a film at the root, a README and notes."""
    covid = encode(radiograph(11, size=(96, 112)), "PNG")
    normal = encode(radiograph(12, size=(96, 112)), "PNG")
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64
    write(root / "Covid-19" / "c1.png", covid)
    write(root / "No_findings" / "n1.png", normal)
    write(root / ".ipynb_checkpoints" / "c1-checkpoint.png", covid)  # sorts before Covid-19/
    write(root / "Covid-19" / ".ipynb_checkpoints" / "c1-checkpoint.png", covid)
    write(root / "Covid-19" / "._c1.png", apple_double)
    write(root / "__MACOSX" / "Covid-19" / "._c1.png", apple_double)
    write(root / "Covid-19" / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(root / "No_findings" / "Thumbs.db", b"\xd0\xcf\x11\xe0")
    write(root / "No_findings" / "desktop.ini", b"[.ShellClassInfo]\r\n")
    # files the class-folder layout does not read, each to be named with its reason
    buffer = io.BytesIO()
    radiograph(13, size=(96, 112)).save(buffer, format="TIFF")
    write(root / "Covid-19" / "c2.tif", buffer.getvalue())
    buffer = io.BytesIO()
    radiograph(14, size=(96, 112)).save(buffer, format="BMP")
    write(root / "No_findings" / "n2.bmp", buffer.getvalue())
    write(root / "stray.png", encode(radiograph(15, size=(96, 112)), "PNG"))
    write(root / "README.md", b"# chest films\n")
    write(root / "No_findings" / "notes.txt", b"scanned 2020\n")
    return root


def upload(root: Path, bucket: str, prefix: str) -> str:
    client = boto3.client("s3")
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def git_repository(root: Path, target: Path) -> Path:
    """``root`` committed as it is, hidden files included, into a new git repository at ``target``."""
    shutil.copytree(root, target)
    environment = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    for command in (["init", "-q", "-b", "main"], ["add", "-A", "-f", "."], ["commit", "-q", "-m", "films"]):
        subprocess.run(["git", "-C", str(target), *command], check=True, env=environment, capture_output=True)
    return target


def storage_images(storage: Storage, version: str) -> list[dict]:
    return dataset.read_table(storage, version, "images").to_pylist()


def described(found) -> list[tuple]:
    """What a layout made of a source: every row with its finding, label and exclusion, and the notes."""
    rows = [
        (row.image_path, row.finding, COVID_VS_REST.label_of(row.finding), row.exclusion)
        for row in found.rows
    ]
    return [*sorted(rows, key=str), found.listing, sorted(found.notes.items(), key=str)]


def test_s3_and_local_listings_of_one_tree_give_the_same_dataset(tmp_path, s3_bucket):
    """pytorch/vision#2831's kind: S3 listed every key, so ``.ipynb_checkpoints`` became a class whose
    copy of a COVID-19 film sorted first and trained as a negative. Folder, git and S3 now list alike."""
    root = tree_with_system_files(tmp_path / "tree")
    spec = SourceSpec("films", str(root))  # auto: class folders
    local = read_rows(FolderSource(root, marker=None).open(), spec)
    s3_spec = SourceSpec("films", upload(root, s3_bucket, "films"))
    remote = read_rows(s3_spec.open().open(), s3_spec)
    repository = git_repository(root, tmp_path / "repo")
    git = read_rows(GitSource(str(repository), cache_dir=tmp_path / "cache").open(), spec)

    assert described(remote) == described(local) == described(git)
    rows = {row.image_path: row for row in local.rows}
    assert not any(part.startswith((".", "__MACOSX")) for path in rows for part in path.split("/"))
    usable = {path: COVID_VS_REST.label_of(row.finding) for path, row in rows.items() if not row.exclusion}
    assert usable == {"Covid-19/c1.png": 1, "No_findings/n1.png": 0}


def test_every_file_a_class_folder_layout_skips_is_named_with_its_reason(tmp_path):
    root = tree_with_system_files(tmp_path / "tree")
    spec = SourceSpec("films", str(root), layout="class-folders")
    found = read_rows(FolderSource(root, marker=None).open(), spec)
    excluded = {row.image_path: (row.exclusion, row.detail) for row in found.rows if row.exclusion}
    assert excluded.keys() == {"Covid-19/c2.tif", "No_findings/n2.bmp", "stray.png"}
    assert excluded["Covid-19/c2.tif"][0] == UNSUPPORTED_FORMAT and ".tif" in excluded["Covid-19/c2.tif"][1]
    assert excluded["No_findings/n2.bmp"][0] == UNSUPPORTED_FORMAT
    assert excluded["stray.png"][0] == NOT_IN_CLASS_FOLDER
    assert found.notes["files_skipped"] == {
        "README.md": "not in a class folder",
        "No_findings/notes.txt": "not a film: class-folders reads PNG or JPEG (.png, .jpg, .jpeg); "
        "DICOM films need layout: dicom",
    }
    assert found.notes["files_ignored"] == 2


@pytest.mark.usefixtures("ray_local")
def test_s3_and_local_ingests_of_one_tree_give_the_same_dataset_and_name_every_skipped_file(
    tmp_path, s3_bucket
):
    root = tree_with_system_files(tmp_path / "tree")
    reports, images = {}, {}
    for where, uri in (("folder", str(root)), ("s3", upload(root, s3_bucket, "films"))):
        storage = Storage.open(str(tmp_path / f"store-{where}"))
        reports[where] = ingest([SourceSpec("films", uri)], storage)
        table = storage_images(storage, reports[where]["dataset_version"])
        images[where] = sorted((r["image_path"], r["finding"], r["label"], r["sha256"]) for r in table)
    assert images["s3"] == images["folder"]
    assert [(path, label) for path, _, label, _ in images["s3"]] == [
        ("Covid-19/c1.png", 1),
        ("No_findings/n1.png", 0),
    ]
    for report in reports.values():
        assert (report["usable"], report["positives"], report["duplicates"]) == (2, 1, [])
        reasons = {e["filename"]: e["reason"] for e in report["exclusions"]}
        assert reasons == {
            "c2.tif": UNSUPPORTED_FORMAT,
            "n2.bmp": UNSUPPORTED_FORMAT,
            "stray.png": NOT_IN_CLASS_FOLDER,
        }
        assert set(report["sources"]["films"]["files_skipped"]) == {"README.md", "No_findings/notes.txt"}
    assert (
        reports["s3"]["sources"]["films"]["source_version"]
        == reports["folder"]["sources"]["films"]["source_version"]
    )


def test_manifest_rows_naming_hidden_files_are_excluded_by_the_same_rule(tmp_path, http_server):
    """A manifest made with ``find`` names the checkpoint copies and AppleDouble forks: over HTTP (which
    cannot be listed) and from the folder they are excluded as ``hidden_file``, by the listing's rule."""
    root = tree_with_system_files(tmp_path / "tree")
    (root / "labels.csv").write_text(
        "file,diagnosis\n"
        "Covid-19/c1.png,COVID-19\n"
        ".ipynb_checkpoints/c1-checkpoint.png,No Finding\n"
        "Covid-19/._c1.png,COVID-19\n"
        "__MACOSX/Covid-19/._c1.png,COVID-19\n"
        "No_findings/Thumbs.db,No Finding\n"
        "No_findings/n1.png,No Finding\n",
        encoding="utf-8",
    )
    options = {
        "layout": "manifest",
        "manifest": "labels.csv",
        "columns": {"filename": "file", "finding": "diagnosis"},
    }
    folder_spec = SourceSpec("hosp", str(root), **options)
    http_spec = SourceSpec("hosp", http_server(root), **options)
    local = read_rows(folder_spec.open().open(), folder_spec)
    remote = read_rows(http_spec.open().open(), http_spec)
    assert described(remote) == described(local)
    reasons = {row.image_path: row.exclusion for row in local.rows}
    assert reasons == {
        "Covid-19/c1.png": None,
        ".ipynb_checkpoints/c1-checkpoint.png": HIDDEN_FILE,
        "Covid-19/._c1.png": HIDDEN_FILE,
        "__MACOSX/Covid-19/._c1.png": HIDDEN_FILE,
        "No_findings/Thumbs.db": HIDDEN_FILE,
        "No_findings/n1.png": None,
    }


def test_a_manifest_parse_error_names_the_manifest_file(tmp_path):
    root = tmp_path / "hospital"
    write(root / "a.png", encode(radiograph(1, size=(96, 112)), "PNG"))
    (root / "labels.csv").write_text("image,diagnosis\na.png,COVID-19\n", encoding="utf-8")
    spec = SourceSpec("hosp", str(root), layout="manifest", manifest="labels.csv")
    with pytest.raises(MetadataError) as raised:
        read_rows(spec.open().open(), spec)
    assert "labels.csv has no filename column" in str(raised.value) and "hosp" in str(raised.value)
    assert "metadata.csv" not in str(raised.value)


def test_a_class_mapping_that_matches_no_folder_is_an_error_naming_it(tmp_path):
    root = tree_with_system_files(tmp_path / "tree")
    spec = SourceSpec("films", str(root), classes={"covid": "COVID-19", "No_findings": "No Finding"})
    with pytest.raises(SourceError) as raised:
        read_rows(spec.open().open(), spec)
    message = str(raised.value)
    assert "['covid']" in message and "match no class folder" in message and "'Covid-19'" in message


def test_a_class_mapping_on_a_source_with_a_metadata_file_is_an_error(source_builder):
    """``classes:`` only maps class folders; on a source whose findings come from its metadata.csv it
    would be ignored, so it is refused, naming the layout."""
    builder = source_builder()
    builder.add("a.png", "p1", finding="COVID-19", image=radiograph(1, size=(96, 96)))
    spec = SourceSpec("ieee", str(builder.write()), classes={"Yes": "COVID-19"})
    with pytest.raises(
        SourceError, match="classes: maps class folders to findings, but its layout is upstream"
    ):
        read_rows(spec.open().open(), spec)


def film_without_pixel_data(padding: int = 0) -> bytes:
    """A DX chest film's header with Rows and Columns but no Pixel Data (a header-only export); ``padding``
    bytes of ImageComments push the end of the header past the first ``padding`` bytes."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_film(Image.new("L", (96, 112), 128))))
    del ds.PixelData
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that so long a comment is over LT's length
        if padding:
            ds.ImageComments = "y" * padding
        ds.save_as(buffer)
    return buffer.getvalue()


def test_a_dicom_file_without_pixel_data_is_excluded_as_no_pixel_data(tmp_path):
    root = tmp_path / "dicom"
    write(root / "COVID-19" / "header-only.dcm", film_without_pixel_data())
    write(root / "COVID-19" / "long-header.dcm", film_without_pixel_data(padding=DICOM_HEADER_BYTES + 1000))
    write(root / "COVID-19" / "film.dcm", dicom_film(radiograph(3, size=(96, 112))))
    spec = SourceSpec("hospital", str(root), layout="dicom")
    found = read_rows(spec.open().open(), spec, patient_salt=b"test salt")
    reasons = {row.image_path: row.exclusion for row in found.rows}
    assert reasons == {
        "COVID-19/header-only.dcm": NO_PIXELS,
        "COVID-19/long-header.dcm": NO_PIXELS,
        "COVID-19/film.dcm": None,
    }


def test_a_dicom_without_pixel_data_named_by_metadata_is_excluded_as_no_pixel_data():
    """Outside the dicom layout (a metadata.csv or a manifest names the file), decoding refuses it with
    the same reason, not ``unreadable_image``; bytes that are no image stay ``unreadable_image``."""
    from lxn_ray.data.fetch import _fingerprint_one, exclusion_of
    from lxn_ray.images.decode import ImageLimits
    from lxn_ray.sources.metadata import UNREADABLE

    header_only = _fingerprint_one("a" * 64, film_without_pixel_data(), ImageLimits())
    assert exclusion_of(header_only["error"]) == NO_PIXELS
    garbage = _fingerprint_one("b" * 64, b"not an image at all", ImageLimits())
    assert exclusion_of(garbage["error"]) == UNREADABLE
