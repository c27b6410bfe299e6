"""Ingest end to end on synthetic sources the tests write: hostile input, growth, no change, failure."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image, ImageOps

from lxn_ray.cli.ingest import main as ingest_main
from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.data.settings import IngestConfig
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.transports import FolderSnapshot, FolderSource
from tests.helpers import encode, huge_png, own_stderr_lines, radiograph

pytestmark = pytest.mark.usefixtures("ray_local")

_opened: list[str] = []
_watching = False


def _audit(event: str, args: tuple) -> None:
    if _watching and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)


def hostile_source(builder) -> Path:
    """The issue's hostile folder: broken files, escaping names, odd-but-valid formats."""
    jpeg = encode(radiograph(1), "JPEG", quality=90)
    builder.add("ok.jpeg", "p1", image=jpeg)
    builder.add("truncated.jpeg", "p2", image=jpeg[: len(jpeg) // 3])
    builder.add("empty.png", "p3", image=b"")
    builder.add("text.png", "p4", image=b"I am not an image, despite my name\n")
    builder.add("bomb.png", "p5", image=huge_png(20000, 20000))
    builder.add("../../../etc/passwd", "p6")
    builder.add("/etc/hostname", "p7")
    builder.add("absent.png", "p8")
    builder.add_raw_line("p9,0,F,50,COVID-19,PA,X-ray,2020,x,images,toomany.png,,,,,,surplus,fields,here")
    sixteen = (np.asarray(radiograph(2), dtype=np.uint16) * 16).astype(np.uint16)
    builder.add("sixteen.png", "p10", finding="Pneumonia", image=Image.fromarray(sixteen))
    builder.add("cmyk.jpeg", "p11", finding="No Finding", image=radiograph(3).convert("CMYK"))
    builder.add("rgba.png", "p12", image=radiograph(4).convert("RGBA"))
    builder.add("lateral.png", "p13", view="L", image=radiograph(5))
    builder.add("later.png", "p14", finding="todo", image=radiograph(6))
    return builder.write()


def test_hostile_source_loses_nothing_and_reads_nothing_outside(source_builder, tmp_path):
    global _watching
    root = hostile_source(source_builder())
    report_path = tmp_path / "report.json"
    _opened.clear()
    _watching = True
    try:
        code = ingest_main(
            ["--source", str(root), "--storage", str(tmp_path / "store"), "--report", str(report_path)]
        )
    finally:
        _watching = False
    assert code == 0
    report = json.loads(report_path.read_text())
    reasons = {e["filename"]: e["reason"] for e in report["exclusions"]}
    assert reasons == {
        "truncated.jpeg": "unreadable_image",
        "empty.png": "unreadable_image",
        "text.png": "unreadable_image",
        "bomb.png": "unreadable_image",
        "../../../etc/passwd": "unsafe_path",
        "/etc/hostname": "unsafe_path",
        "absent.png": "missing_file",
        "toomany.png": "malformed_row",
        "lateral.png": "non_frontal_view",
        "later.png": "unlabelled_finding",
    }
    assert report["usable"] == 4 and report["positives"] == 2 and report["negatives"] == 2
    assert report["rows"] == 14 and sum(report["excluded"].values()) == 10
    assert any(p.startswith(str(root)) for p in _opened)  # the hook does see the source's reads
    assert [p for p in _opened if os.path.realpath(p) in ("/etc/passwd", "/etc/hostname")] == []
    stored = Storage.open(str(tmp_path / "store"))
    assert dataset.latest_version(stored) == report["dataset_version"]
    assert len(stored.list("reports/ingest")) == 1


def grow(builder, seeds, patient_of=lambda seed: f"p{seed}"):
    for seed in seeds:
        builder.add(
            f"img{seed}.png",
            patient_of(seed),
            finding="COVID-19" if seed % 2 else "SARS",
            image=radiograph(seed),
        )
    return builder.write()


def test_growth_then_no_change(source_builder, tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    builder = source_builder()
    first = ingest(FolderSource(grow(builder, range(20))), storage)
    assert first["changed"] and first["images_hashed"] == 20 and first["usable"] == 20

    root = grow(builder, range(20, 30))
    copy = ImageOps.expand(radiograph(3).resize((240, 288)), border=12, fill=0)  # a re-published img3
    builder.add("img3-again.jpg", "p-other", image=copy, quality=80)
    builder.write()
    second = ingest(FolderSource(root), storage)
    assert second["changed"] and second["dataset_version"] != first["dataset_version"]
    assert second["parent_version"] == first["dataset_version"]
    assert second["images_hashed"] == 11  # only contents never seen before
    assert {k: second["duplicates"][0][k] for k in ("dropped", "kept")} == {
        "dropped": "img3-again.jpg",
        "kept": "img3.png",
    }
    assert len(second["duplicates"]) == 1
    for patient, split in first["split_of_patient"].items():
        assert second["split_of_patient"][patient] == split
    # patient ids are qualified by their source's name (a lone --source is "ieee8023")
    assert second["split_of_patient"]["ieee8023:p-other"] == second["split_of_patient"]["ieee8023:p3"]

    third = ingest(FolderSource(root), storage)
    assert third["changed"] is False and third["dataset_version"] == second["dataset_version"]
    assert third["images_hashed"] == 0
    images = dataset.read_table(storage, third["dataset_version"], "images").to_pylist()
    assert len(images) == 30 and all(storage.exists(row["image_key"]) for row in images)

    other = ingest(FolderSource(root), storage, IngestConfig(frontal_views=("AP",)))
    assert other["changed"] and other["usable"] == 0  # a config change is a new version


def test_failed_run_leaves_the_latest_version(source_builder, tmp_path, monkeypatch):
    storage = Storage.open(str(tmp_path / "store"))
    builder = source_builder()
    good = ingest(FolderSource(grow(builder, range(5))), storage)
    root = grow(builder, range(5, 8))

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Storage, "write_json", disk_full)
    with pytest.raises(OSError):
        ingest(FolderSource(root), storage)
    monkeypatch.undo()
    assert dataset.latest_version(storage) == good["dataset_version"]
    retry = ingest(FolderSource(root), storage)
    assert retry["changed"] and retry["usable"] == 8 and retry["images_hashed"] == 0  # cached by content
    assert [key.rsplit("/", 1)[-1] for key in storage.list("datasets") if "/ds-" in key] == sorted(
        [good["dataset_version"], retry["dataset_version"]]
    )


def test_job_prints_one_line_error(tmp_path, capsys):
    assert ingest_main(["--source", str(tmp_path / "nowhere"), "--storage", str(tmp_path / "s")]) == 1
    err = own_stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ingest failed")


@dataclass(frozen=True)
class _DriverOnlySnapshot(FolderSnapshot):
    """A folder only the driver's node has (a cluster without shared storage): in any other process a
    file is missing, or (``other_bytes``) another file of the same name."""

    driver_pid: int = 0
    other_bytes: frozenset[str] = frozenset()

    def read_file(self, relative_path: str, max_bytes: int) -> bytes:
        if os.getpid() == self.driver_pid:
            return super().read_file(relative_path, max_bytes)
        if relative_path in self.other_bytes:
            return encode(radiograph(99), "PNG")
        raise FileNotFoundError(relative_path)


@dataclass(frozen=True)
class _DriverOnlySource(FolderSource):
    other_bytes: frozenset[str] = frozenset()

    def open(self) -> FolderSnapshot:
        opened = super().open()
        return _DriverOnlySnapshot(
            opened.root, opened.description, driver_pid=os.getpid(), other_bytes=self.other_bytes
        )


def test_workers_read_the_files_and_the_driver_sends_what_they_cannot(source_builder, tmp_path, monkeypatch):
    """Decoding tasks read a local source's files themselves (no bytes through the driver); files a worker
    cannot read as the driver hashed them - missing there, or other bytes under the name - are read and
    sent by the driver, with the same fingerprints as a worker's read gives."""
    from lxn_ray.data import fetch

    sent: list[int] = []
    real_sent = fetch._fingerprint_sent
    monkeypatch.setattr(
        fetch, "_fingerprint_sent", lambda s, chunk, c: sent.append(len(chunk)) or real_sent(s, chunk, c)
    )
    root = grow(source_builder(), range(8))
    shared = Storage.open(str(tmp_path / "shared"))
    read_by_workers = ingest(FolderSource(root), shared)
    assert read_by_workers["images_hashed"] == 8 and sent == []

    other = frozenset({"images/img1.png", "images/img2.png"})
    alone = Storage.open(str(tmp_path / "alone"))
    read_by_driver = ingest(
        _DriverOnlySource(root, other_bytes=other), alone, IngestConfig(decode_batch_size=2)
    )
    assert read_by_driver["images_hashed"] == 8 and sum(sent) == 8
    tables = [
        dataset.read_table(s, r["dataset_version"], "fingerprints")
        for s, r in ((shared, read_by_workers), (alone, read_by_driver))
    ]
    assert tables[0].sort_by("sha256").equals(tables[1].sort_by("sha256"))
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled  # set for ingest's dataset only


def test_a_few_large_films_spread_over_every_cpu():
    """Ray Data blocks: one per decode batch, but at least one per CPU while there are films for them
    (a byte-bounded chunk of a few 20 MP films was one block on one core)."""
    from lxn_ray.data.fetch import _block_count

    assert _block_count(30, 16, cpus=8) == 8
    assert _block_count(3, 16, cpus=8) == 3
    assert _block_count(1000, 16, cpus=2) == 63
    assert _block_count(100_000, 16, cpus=2) == 64
    assert _block_count(100_000, 16, cpus=256) == 256
    assert _block_count(0, 16, cpus=2) == 1


def test_the_lossless_original_is_kept_over_its_lossy_copy(tmp_path):
    """The keep rule kept a q80 JPEG re-encode of a film because its name sorted first; the lossless
    original (same pixels, more bytes) is kept and the copy dropped against it."""
    from lxn_ray.sources.layouts import SourceSpec

    root = tmp_path / "films"
    (root / "Covid-19").mkdir(parents=True)
    (root / "No_findings").mkdir()
    film = radiograph(31)
    (root / "Covid-19" / "a-copy.jpg").write_bytes(encode(film, "JPEG", quality=80))
    (root / "Covid-19" / "b-original.png").write_bytes(encode(film, "PNG"))
    (root / "No_findings" / "n.png").write_bytes(encode(radiograph(32), "PNG"))
    storage = Storage.open(str(tmp_path / "store"))
    report = ingest([SourceSpec("films", str(root), layout="class-folders")], storage)
    assert [(d["dropped"], d["kept"]) for d in report["duplicates"]] == [("a-copy.jpg", "b-original.png")]
    kept = dataset.read_table(storage, report["dataset_version"], "images").to_pylist()
    assert sorted(row["image_path"] for row in kept) == ["Covid-19/b-original.png", "No_findings/n.png"]
