"""Monitoring without Ray: the film statistics, the PSI rule, the bounded summary store and the drift job
(``lxn monitor``) end to end on a store with a champion's card and its test split."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lxn_ray import registry
from lxn_ray.cli.monitor import main as monitor_main
from lxn_ray.infra.storage import Storage
from lxn_ray.serving import drift, summaries
from lxn_ray.serving.summaries import SummaryWriter, film_statistics, read_window, summary_row
from tests.helpers import PHI_FIELDS, SUMMARY_FIELDS, dicom_film, encode, radiograph
from tests.serve.monitor_films import UNLIKE_CHANGES, like_film, publish_reference_dataset, unlike_film

ANSWER = {"probability": 0.123456, "label": "no finding", "model_version": "lxn-a"}


# -- the statistics -----------------------------------------------------------------------------------
def test_film_statistics_of_png_jpeg_and_dicom():
    pixels = np.full((80, 100), 10, np.uint8)
    pixels[10:70, 20:80] = np.asarray(radiograph(1, size=(60, 60)))  # a film inside a uniform dark frame
    film = Image.fromarray(pixels)
    for fmt, data in (
        ("PNG", encode(film, "PNG")),
        ("JPEG", encode(film, "JPEG", quality=100)),
        ("DICOM", dicom_film(film, photometric="MONOCHROME1")),  # inverted in the file, shown as above
    ):
        found = film_statistics(data)
        assert (found.format, found.width, found.height) == (fmt, 100, 80), fmt
        assert found.mean_intensity == pytest.approx(pixels.mean(), abs=1.0), fmt
        assert found.film_fraction == pytest.approx(60 * 60 / (80 * 100), abs=0.02), fmt
    plain = film_statistics(encode(radiograph(3, size=(120, 100)), "PNG"))
    assert plain.film_fraction == 1.0 and 0 < plain.mean_intensity < 255


def test_a_summary_row_holds_no_patient_information():
    data = dicom_film(radiograph(5, size=(90, 90)), patient_id="MRN-778812")
    row = summary_row(film_statistics(data), ANSWER)
    assert set(row) == SUMMARY_FIELDS
    text = json.dumps(row)
    for value in [*PHI_FIELDS.values(), "MRN-778812", "CHEST", "DX"]:
        assert value not in text
    assert row["probability"] == 0.1235


# -- the rule -----------------------------------------------------------------------------------------
def test_psi_by_hand_and_the_siddiqi_threshold():
    # reference 50/50, window 80/20: (0.8 - 0.5) ln(0.8/0.5) + (0.2 - 0.5) ln(0.2/0.5)
    found = drift.categorical_psi(["PNG"] * 50 + ["JPEG"] * 50, ["PNG"] * 80 + ["JPEG"] * 20)
    expected = 0.3 * math.log(0.8 / 0.5) - 0.3 * math.log(0.2 / 0.5)
    assert found["psi"] == pytest.approx(expected) and found["categories"] == ["JPEG", "PNG"]
    same = drift.categorical_psi(["PNG"] * 10, ["PNG"] * 3)
    assert same["psi"] == 0.0
    # an empty bin counts as a share of 0.0001, not infinity
    unseen = drift.categorical_psi(["PNG"] * 10, ["DICOM"] * 10)
    assert math.isfinite(unseen["psi"]) and unseen["psi"] > 10
    rows = lambda values: [{"format": "PNG", "width": v} for v in values]  # noqa: E731
    at = drift.compare(rows([1.0] * 100), rows([1.0] * 100), threshold=0.25)["width"]
    assert at["psi"] == 0.0 and not at["drifted"]
    # drift is PSI strictly above the threshold
    assert (
        drift.compare(rows([0] * 50 + [1] * 50), rows([0] * 80 + [1] * 20), threshold=expected)["format"][
            "drifted"
        ]
        is False
    )


def test_numeric_bins_are_reference_quantiles_and_shrink_with_the_reference():
    rng = np.random.default_rng(0)
    reference = rng.normal(100, 10, 1000)
    found = drift.numeric_psi(reference, rng.normal(100, 10, 500))
    assert len(found["edges"]) == 9 and found["psi"] < 0.05  # deciles; the same distribution
    assert found["reference"] == pytest.approx([0.1] * 10, abs=0.002)
    assert 0 <= found["ks"] <= 1 and 0 <= found["ks_p"] <= 1
    shifted = drift.numeric_psi(reference, rng.normal(115, 10, 500))
    assert shifted["psi"] > 0.25
    assert drift.bin_count(1000) == 10 and drift.bin_count(100) == 5 and drift.bin_count(30) == 2
    # a value most films share merges its quantile edges: one edge, two bins
    ties = drift.numeric_psi([1.0] * 90 + [0.5] * 10, [1.0] * 50)
    assert ties["edges"] == [1.0] and len(ties["reference"]) == 2
    with pytest.raises(ValueError):
        drift.numeric_psi([], [1.0])


# -- the bounded store --------------------------------------------------------------------------------
def test_the_writer_flushes_by_rows_and_by_age_and_prunes_the_oldest(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    clock = [0.0]
    writer = SummaryWriter(storage, rows_per_file=3, max_age_s=10, max_files=2, clock=lambda: clock[0])
    assert writer.add({"n": 1}) is None and writer.add({"n": 2}) is None
    assert writer.due() is None
    batch = writer.add({"n": 3})
    assert [row["n"] for row in batch] == [1, 2, 3] and writer.drain() is None
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    writer.write(batch, now=start)
    writer.add({"n": 4})
    clock[0] = 9.9
    assert writer.due() is None
    clock[0] = 10.0
    assert [row["n"] for row in writer.due()] == [4]  # by age
    writer.write([{"n": 4}], now=start + timedelta(hours=1))
    writer.write([{"n": 5}, {"n": 6}], now=start + timedelta(hours=2))
    files = summaries.batch_files(storage)
    assert len(files) == 2  # capped: the oldest file was deleted
    assert [summaries.written_at(key) for key in files] == [start + timedelta(hours=h) for h in (1, 2)]
    assert not any(".tmp" in key for key in storage.list(summaries.SUMMARIES))
    # another replica's files sit beside these, never overwritten
    other = SummaryWriter(storage, max_files=10)
    key = other.write([{"n": 7}], now=start + timedelta(hours=2))
    assert key not in files and len(summaries.batch_files(storage)) == 3


def test_the_window_is_the_last_rows_and_may_be_limited_by_hours(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    writer = SummaryWriter(storage)
    now = datetime.now(timezone.utc)
    for hour, numbers in ((5, [1, 2, 3]), (3, [4, 5]), (1, [6, 7, 8])):
        writer.write([{"n": n} for n in numbers], now=now - timedelta(hours=hour))
    last = [row["n"] for row in read_window(storage, 4).rows]  # a file's rows are shuffled when written
    assert sorted(last[1:]) == [6, 7, 8] and last[0] in (4, 5)
    window = read_window(storage, 100, hours=4, now=now)
    assert sorted(row["n"] for row in window.rows) == [4, 5, 6, 7, 8] and window.files == 2
    assert window.first < window.last
    assert read_window(storage).rows[0]["n"] in (1, 2, 3)  # every row, oldest file first
    assert read_window(Storage.open(str(tmp_path / "empty")), 10).rows == []
    with pytest.raises(ValueError):
        read_window(storage, 0)


# -- the drift job ------------------------------------------------------------------------------------
def _store(tmp_path: Path, reference_films: int = 300) -> Storage:
    """A store with a champion's card (no model file: the drift job never loads the model) whose dataset
    version's test split holds ``reference_films`` like films."""
    storage = Storage.open(str(tmp_path / "store"))
    publish_reference_dataset(storage, [like_film(seed) for seed in range(reference_films)], "ds-test")
    card = {"model_version": "lxn-a", "dataset_version": "ds-test", "task": {"name": "covid-vs-normal"}}
    storage.write_json(registry.model_key("lxn-a", "card.json"), card)
    registry.promote(storage, "lxn-a")
    return storage


def _serve(storage: Storage, films: list[bytes]) -> None:
    """Summaries as the replicas would write them for ``films``."""
    summaries.write_rows(storage, [summary_row(film_statistics(data), ANSWER) for data in films])


def _run(storage: Storage, tmp_path: Path, *flags: str) -> tuple[int, dict]:
    """The drift job's exit code and the report it wrote with --report."""
    report = tmp_path / "report.json"
    code = monitor_main(["--storage", storage.uri, "--report", str(report), *flags])
    return code, json.loads(report.read_text())


def test_the_drift_job_passes_like_films_and_fails_unlike_ones(tmp_path, capsys):
    storage = _store(tmp_path)
    _serve(storage, [like_film(seed) for seed in range(1000, 1200)])
    code, report = _run(storage, tmp_path, "--window", "200")
    out = capsys.readouterr().out
    assert code == 0 and report["status"] == "no drift" and report["drifted"] == []
    assert out.startswith("no drift: every statistic's PSI <= 0.25")
    assert report["window"]["rows"] == 200 and report["reference"]["films"] == 300
    assert storage.exists(drift.reference_key("lxn-a"))  # cached per model version
    plot = report["plot"].removeprefix(storage.uri + "/")
    assert storage.read_bytes(plot).startswith(b"\x89PNG")

    _serve(storage, [unlike_film(seed) for seed in range(2000, 2200)])
    code, report = _run(storage, tmp_path, "--window", "200")
    out = capsys.readouterr().out
    assert code == drift.DRIFT == 3 and report["status"] == "drift"
    assert set(report["drifted"]) == UNLIKE_CHANGES
    first = out.splitlines()[0]
    assert first.startswith("DRIFT: ") and all(name in first for name in UNLIKE_CHANGES)
    assert "Siddiqi" in report["rule"]["source"] and report["rule"]["threshold"] == 0.25
    # the stored reports: JSON under reports/monitor/, one per run, and their plots beside them
    stored = storage.list("reports/monitor")
    assert (
        sum(key.endswith(".json") for key in stored) == 2 and sum(key.endswith(".png") for key in stored) == 2
    )


def test_the_reference_keeps_the_format_the_source_held(tmp_path):
    """Ingest stores a DICOM film as the PNG of its pixels; the reference says DICOM, as the endpoint
    will, so a hospital sending the same DICOM films shows no format drift."""
    storage = Storage.open(str(tmp_path / "store"))
    films = [like_film(seed) for seed in range(45)]
    publish_reference_dataset(storage, films, "ds-dicom", source_format="DICOM")
    card = {"model_version": "lxn-d", "dataset_version": "ds-dicom", "task": {"name": "covid-vs-normal"}}
    storage.write_json(registry.model_key("lxn-d", "card.json"), card)
    reference = drift.reference_statistics(storage, "lxn-d")
    assert {row["format"] for row in reference["rows"]} == {"DICOM"} and len(reference["rows"]) == 45
    assert reference["rows"][0]["width"] == film_statistics(films[0]).width
    with pytest.raises(FileNotFoundError, match="not published"):
        drift.reference_statistics(storage, "lxn-nothing")


def test_bad_input_gets_one_line_or_not_enough_data(tmp_path, capsys):
    empty = Storage.open(str(tmp_path / "empty"))
    assert monitor_main(["--storage", empty.uri]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: monitor failed: FileNotFoundError: no champion model") and "\n" not in err

    storage = _store(tmp_path)
    code, report = _run(storage, tmp_path)
    out = capsys.readouterr().out.strip()
    assert code == drift.NOT_ENOUGH_DATA == 4 and report["status"] == "not enough data"
    assert (
        out.splitlines()[0] == "not enough data to judge drift: 0 summaries in the window, need at least 100"
    )
    _serve(storage, [like_film(seed) for seed in range(1000, 1050)])
    code, report = _run(storage, tmp_path, "--hours", "1")
    assert code == 4 and "50 summaries from the last 1 h in the window" in report["reason"]

    small = _store(tmp_path / "small", reference_films=20)
    _serve(small, [like_film(seed) for seed in range(1000, 1100)])
    code, report = _run(small, tmp_path)
    assert code == 4 and "has 20 films, need at least 40" in report["reason"]
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_flag:
        monitor_main(["--storage", storage.uri, "--window", "0"])
    assert bad_flag.value.code == 2
