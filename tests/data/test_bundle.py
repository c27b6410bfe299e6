"""The issue's acceptance runs on the real ieee8023 bundle: growth, no change, git source, duplicates.

Skipped, with the reason, where ../shared/data/ieee8023.bundle is absent (a user's clone).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lxn_ray.cli.ingest import main as ingest_main
from lxn_ray.data import dataset
from lxn_ray.dedupe.fingerprint import fingerprint
from lxn_ray.dedupe.search import find_duplicates
from lxn_ray.images.decode import decode_image, to_grayscale
from lxn_ray.infra.cluster import map_chunks_on_ray
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.metadata import parse_metadata
from tests.helpers import copy_store

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # whole jobs: `-m "not slow"` skips

# Two lateral films of one patient 10 days apart (2020-06-22), differently positioned on a large black
# background: the background matches trivially and must not make them look like a duplicate.
SERIAL_LATERALS = ("covid-19-caso-95-2-16.png", "covid-19-caso-95-4-12.png")
KNOWN_DUPLICATES = [
    {"353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpeg", "case_72_RX-TORACE1.jpg"},
    {"16660_2_1.jpg", "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-admission.jpg"},
]


def run(tmp_path: Path, name: str, *args: str) -> dict:
    report = tmp_path / f"{name}.json"
    assert ingest_main([*args, "--report", str(report)]) == 0
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def grown(snapshot_2020_04_20, bundle_checkout, tmp_path_factory) -> tuple[dict, dict, dict, str]:
    """2020-04-20, then 2020-06-22, then 06-22 again, into one store (the issue's first three runs). The
    first is the session's ingest of 2020-04-20 (``snapshot_2020_04_20``), grown in a copy of its store."""
    tmp = tmp_path_factory.mktemp("grown")
    folder, early = snapshot_2020_04_20
    store = str(copy_store(folder, tmp / "store"))
    late = run(tmp, "r2", "--source", str(bundle_checkout("2020-06-22")), "--storage", store)
    again = run(tmp, "r3", "--source", str(bundle_checkout("2020-06-22")), "--storage", store)
    return early, late, again, store


def test_first_version_report(grown):
    early, *_ = grown
    assert early["changed"] and early["rows"] == 345
    assert early["usable"] == early["positives"] + early["negatives"]
    assert early["positives"] > early["negatives"] > 0
    assert sum(early["excluded"].values()) + early["usable"] == early["rows"]
    assert {"ct", "non_frontal_view", "missing_file"} <= set(early["excluded"])
    assert early["images_hashed"] >= early["usable"]
    splits = early["splits"]
    assert sum(s["images"] for s in splits.values()) == early["usable"]
    assert 0.55 < splits["train"]["patients"] / sum(s["patients"] for s in splits.values()) < 0.85


def test_growth_hashes_only_new_images_and_keeps_splits(grown):
    early, late, *_ = grown
    assert late["changed"] and late["dataset_version"] != early["dataset_version"]
    assert late["rows"] == 751 and late["usable"] > early["usable"]
    assert 0 < late["images_hashed"] <= 751 - 345  # only contents not seen in the first run
    assert "unlabelled_finding" in late["excluded"]  # 2020-06-22 brought `todo` findings
    for patient, split in early["split_of_patient"].items():
        assert late["split_of_patient"][patient] == split


def test_known_duplicates_found_and_few_dropped(grown, bundle_checkout):
    _, late, _, store = grown
    pairs = [{d["dropped"], d["kept"]} for d in late["duplicates"]]
    for pair in KNOWN_DUPLICATES:
        assert pair in pairs
    assert len(late["duplicates"]) <= 40
    assert late["excluded"]["duplicate"] == len(late["duplicates"])
    images = dataset.read_table(Storage.open(store), late["dataset_version"], "images").to_pylist()
    in_version = {row["filename"] for row in images}
    metadata = parse_metadata((bundle_checkout("2020-06-22") / "metadata.csv").read_bytes())
    patient_of = {row.filename: f"ieee8023:{row.patient_id}" for row in metadata}
    for entry in late["duplicates"]:
        assert entry["kept"] in in_version and entry["distance"] >= 0
    assert len({row["sha256"] for row in images}) == len(images)
    # patients joined by a duplicate share a split, so no radiograph is on two sides of one
    for entry in late["duplicates"]:
        dropped, kept = patient_of[entry["dropped"]], patient_of[entry["kept"]]
        assert late["split_of_patient"][dropped] == late["split_of_patient"][kept]


def test_films_ingest_leaves_out_add_few_duplicates(grown, bundle_checkout):
    """The detector over every X-ray film of 2020-06-22, not only those ingest compares: the films it
    leaves out before decoding (other views, unlabelled findings), fingerprinted here as ingest does,
    against each other and the version's stored fingerprints, add few pairs, and not the serial laterals."""
    _, late, _, store = grown
    storage, version = Storage.open(store), late["dataset_version"]
    filename_of = {
        row["sha256"]: row["filename"] for row in dataset.read_table(storage, version, "images").to_pylist()
    }
    known = {
        filename_of[row.pop("sha256")]: row
        for row in dataset.read_table(storage, version, "fingerprints").to_pylist()
    }
    root = bundle_checkout("2020-06-22")
    left_out = [
        row.filename
        for row in parse_metadata((root / "metadata.csv").read_bytes())
        if row.modality == "X-ray" and row.exclusion and (root / "images" / row.filename).is_file()
    ]
    assert set(SERIAL_LATERALS) <= set(left_out) and len(left_out) > 100
    new = {
        name: fingerprint(to_grayscale(decode_image((root / "images" / name).read_bytes()).image))
        for name in left_out
    }
    pairs = {(pair.a, pair.b) for pair in find_duplicates(known, new, map_chunks=map_chunks_on_ray)}
    assert SERIAL_LATERALS not in pairs
    assert len(pairs) + len(late["duplicates"]) <= 40


def test_unchanged_source_makes_no_version(grown):
    _, late, again, _ = grown
    assert again["changed"] is False
    assert again["dataset_version"] == late["dataset_version"]
    assert again["images_hashed"] == 0
    assert again["seconds"] < late["seconds"] / 2


def test_git_bundle_source_gives_the_same_rows_as_the_folder(bundle, snapshot_2020_04_20, tmp_path):
    """A git bundle at a snapshot's tag gives what its checkout folder gives: ingested over the folder's
    version (in a copy of its store), its rows - read, hashed and excluded from git - make a new version
    (another source version) that changes no usable row, with the same exclusions and duplicates. The
    contents are the folder's: none is decoded again, and only the duplicates the folder's version
    dropped are compared again (with its published images)."""
    folder, early = snapshot_2020_04_20
    store = copy_store(folder, tmp_path / "store")
    via_git = run(
        tmp_path, "git", "--source", str(bundle), "--ref", "snapshot-2020-04-20", "--storage", str(store)
    )
    assert via_git["source_version"].startswith("git:")
    assert via_git["changed"] and via_git["parent_version"] == early["dataset_version"]
    assert via_git["images_hashed"] == 0
    kinds = ("added", "removed", "relabelled", "view_changed", "patient_changed")
    assert {kind: via_git["changes"][kind] for kind in kinds} == dict.fromkeys(kinds, 0)
    assert via_git["rows"] == early["rows"] and via_git["duplicates"] == early["duplicates"]
    assert via_git["usable"] == early["usable"]
    assert via_git["split_of_patient"] == early["split_of_patient"]
    assert via_git["exclusions"] == early["exclusions"]
