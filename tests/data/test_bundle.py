"""The issue's acceptance runs on the real ieee8023 bundle: growth, no change, git source, duplicates.

Skipped, with the reason, where ../shared/data/ieee8023.bundle is absent (a user's clone).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lxn_ray.cli.main import ingest_main
from lxn_ray.data import dataset
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.metadata import parse_metadata

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # whole jobs: `-m "not slow"` skips

KNOWN_DUPLICATES = [
    {"353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpeg", "case_72_RX-TORACE1.jpg"},
    {"16660_2_1.jpg", "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-admission.jpg"},
]


def run(tmp_path: Path, name: str, *args: str) -> dict:
    report = tmp_path / f"{name}.json"
    assert ingest_main([*args, "--report", str(report)]) == 0
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def grown(bundle_checkout, tmp_path_factory) -> tuple[dict, dict, dict, str]:
    """2020-04-20, then 2020-06-22, then 06-22 again, into one store (the issue's first three runs)."""
    tmp = tmp_path_factory.mktemp("grown")
    store = str(tmp / "store")
    early = run(tmp, "r1", "--source", str(bundle_checkout("2020-04-20")), "--storage", store)
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


def test_unchanged_source_makes_no_version(grown):
    _, late, again, _ = grown
    assert again["changed"] is False
    assert again["dataset_version"] == late["dataset_version"]
    assert again["images_hashed"] == 0
    assert again["seconds"] < late["seconds"] / 2


def test_git_bundle_source_gives_the_same_rows_as_the_folder(bundle, grown, tmp_path):
    early, *_ = grown
    via_git = run(
        tmp_path,
        "git",
        "--source",
        str(bundle),
        "--ref",
        "snapshot-2020-04-20",
        "--storage",
        str(tmp_path / "store2"),
    )
    assert via_git["source_version"].startswith("git:")
    assert via_git["usable"] == early["usable"]
    assert via_git["split_of_patient"] == early["split_of_patient"]
    assert via_git["exclusions"] == early["exclusions"]
