"""Remote sources and S3 storage, end to end against real local servers: an HTTP base URL in the upstream
raw layout (``python -m http.server``) and an S3 mirror plus S3 storage (moto's server) through ingest,
training and serving. Both sources are fetched by Ray Data tasks and must give the same dataset as
reading the folder itself."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.data.settings import IngestConfig
from lxn_ray.images.decode import ImageLimits
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.metadata import MISSING_FILE, UNREADABLE, UNSAFE_PATH
from lxn_ray.sources.transports import (
    FolderSource,
    GitSource,
    HttpSnapshot,
    HttpSource,
    S3Snapshot,
    S3Source,
    UnsafePath,
    open_source,
)
from tests.helpers import encode, radiograph
from tests.model.test_train import labelled_source


def usable_rows(storage: Storage) -> set[tuple]:
    table = dataset.read_table(storage, dataset.latest_version(storage), "images")
    return {(r["filename"], r["label"], r["split"], r["sha256"]) for r in table.to_pylist()}


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory) -> Path:
    """A labelled source plus rows that must be excluded: a missing file, a path out of the root, an
    oversized file (with a 300 kB cap), and a file that is not an image."""
    from tests.helpers import SourceBuilder

    builder = SourceBuilder(tmp_path_factory.mktemp("remote") / "source")
    labelled_source(builder, patients=16)
    builder.add("missing.png", "m1")
    builder.add("../../etc/passwd", "m2")
    builder.add("big.png", "m3", image=encode(radiograph(7, size=(1400, 1400)), "PNG"))
    builder.add("text.png", "m4", image=b"this is not an image")
    return builder.write()


SMALL_FILES = IngestConfig(limits=ImageLimits(max_file_bytes=300_000))


@pytest.fixture(scope="module")
def folder_dataset(mixed_source, tmp_path_factory, ray_local) -> tuple[Storage, dict]:
    """``mixed_source`` ingested from the folder itself, once for the module: (its storage, the report),
    what each remote source's dataset must equal. Read-only."""
    storage = Storage.open(str(tmp_path_factory.mktemp("remote-folder") / "store"))
    return storage, ingest(FolderSource(mixed_source), storage, SMALL_FILES)


def exclusions_by_file(report: dict) -> dict[str, str]:
    return {e["filename"]: e["reason"] for e in report["exclusions"]}


@pytest.mark.usefixtures("ray_local")
def test_http_source_gives_the_folder_dataset(mixed_source, folder_dataset, http_server, tmp_path):
    folder_store, folder_report = folder_dataset
    base = http_server(mixed_source)
    source = open_source(base)
    assert isinstance(source, HttpSource)
    http_store = Storage.open(str(tmp_path / "http"))
    report = ingest(source, http_store, SMALL_FILES)

    assert usable_rows(http_store) == usable_rows(folder_store) and report["usable"] == 16
    assert report["source_version"] == folder_report["source_version"]  # same bytes, same content hash
    reasons = exclusions_by_file(report)
    assert reasons["missing.png"] == MISSING_FILE
    assert reasons["../../etc/passwd"] == UNSAFE_PATH
    assert reasons["big.png"] == UNREADABLE and reasons["text.png"] == UNREADABLE
    assert reasons == exclusions_by_file(folder_report)
    # The blobs were stored by the fetch tasks; training data reads them from storage.
    for key in dataset.read_split(http_store, report["dataset_version"], "train").column("image_key"):
        assert http_store.exists(key.as_py())
    # Unchanged source: the same version is reported, nothing new published.
    again = ingest(open_source(base), http_store, SMALL_FILES)
    assert again["changed"] is False and again["dataset_version"] == report["dataset_version"]


def test_http_paths_cannot_leave_the_base_url():
    snapshot = HttpSnapshot(base="http://127.0.0.1:9/data/", description="x")
    assert snapshot.url_of("images/a b#?.png") == "http://127.0.0.1:9/data/images/a%20b%23%3F.png"
    for hostile in ("../secret", "/etc/passwd", "images/../../x", "http://evil/x", "C:/x"):
        with pytest.raises(UnsafePath):
            snapshot.url_of(hostile)


def test_a_url_without_metadata_is_a_git_remote(http_server, tmp_path):
    (tmp_path / "empty").mkdir()
    base = http_server(tmp_path / "empty")
    assert isinstance(open_source(base), GitSource)
    assert isinstance(open_source("https://github.com/ieee8023/covid-chestxray-dataset.git"), GitSource)


def upload(folder: Path, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def bucket_keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.mark.usefixtures("ray_local")
def test_s3_mirror_into_s3_storage(mixed_source, folder_dataset, s3_bucket):
    upload(mixed_source, s3_bucket, "mirror")
    source = open_source(f"s3://{s3_bucket}/mirror")
    assert isinstance(source, S3Source)
    storage = Storage.open(f"s3://{s3_bucket}/store")
    report = ingest(source, storage, SMALL_FILES)

    folder_store, folder_report = folder_dataset
    assert usable_rows(storage) == usable_rows(folder_store)
    reasons = exclusions_by_file(report)
    assert reasons["../../etc/passwd"] == UNSAFE_PATH and reasons["missing.png"] == MISSING_FILE
    assert reasons == exclusions_by_file(folder_report)
    keys = bucket_keys(s3_bucket, "store/")
    assert f"store/datasets/{report['dataset_version']}/manifest.json" in keys
    assert any(key.startswith("store/blobs/sha256/") for key in keys)
    # Training and serving from S3 storage run on the 3-node cluster (tests/cluster/test_cluster.py).


def test_s3_keys_stay_below_the_prefix():
    snapshot = S3Snapshot(bucket="b", prefix="mirror", description="s3://b/mirror")
    for hostile in ("../other/metadata.csv", "/abs", "images/../../x"):
        with pytest.raises(UnsafePath):
            snapshot.read_file(hostile, 10)
