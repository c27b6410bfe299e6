"""Named sources and their layouts, alone and together in one dataset version: class folders, manifests,
sources files, duplicates across sources, and what changed since the parent version. Real files on disk
(and in a local S3 server), synthetic radiographs, ingest through a real local Ray instance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest
from PIL import Image

from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.layouts import SourceSpec, detect_layout, read_rows, read_sources_file
from lxn_ray.sources.metadata import DUPLICATE, MISSING_FILE, UNLABELLED, UNSAFE_PATH, MetadataRow
from lxn_ray.sources.tasks import resolve_task
from lxn_ray.sources.transports import SourceError
from tests.helpers import SourceBuilder, radiograph

SIZE = (96, 112)  # small, but large enough that two seeds are never taken for one film
PATTERN = r"^(\d{8})_"


def film(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    return radiograph(seed, size=size)


def save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def label(row: MetadataRow) -> int | None:
    """A row's covid-vs-rest label: rows carry findings, and the task decides (lxn_ray.sources.tasks)."""
    return resolve_task("covid-vs-rest").label_of(row.finding)


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images_of(storage: Storage, version: str) -> list[dict]:
    return dataset.read_table(storage, version, "images").to_pylist()


# -- class folders ------------------------------------------------------------------------------------
def nih_archive(root: Path) -> Path:
    """An NIH-like archive in class folders: patient 00001234 has two films, the others one each."""
    save(root / "Covid-19" / "00001234_000.png", film(101))
    save(root / "Covid-19" / "00001234_001.png", film(102))
    save(root / "Covid-19" / "00005678_000.jpg", film(103).convert("RGB"), quality=92)
    save(root / "No_findings" / "00004321_000.png", film(104))
    save(root / "No_findings" / "00008765_000.png", film(105))
    save(root / "Pneumonia" / "00002468_000.png", film(106))
    (root / "README.txt").write_text("an archive of chest films\n")
    (root / "No_findings" / "notes.txt").write_text("not an image\n")
    return root


def test_class_folder_rows_carry_the_folders_finding_and_the_patient_from_the_name(tmp_path):
    root = nih_archive(tmp_path / "nih")
    spec = SourceSpec("nih", str(root), patient_id_pattern=PATTERN)  # auto: no metadata.csv, no manifest
    snapshot = spec.open().open()
    assert detect_layout(snapshot, spec) == "class-folders"
    found = read_rows(snapshot, spec)
    assert found.layout == "class-folders"
    rows = {row.image_path: row for row in found.rows}
    assert set(rows) == {
        "Covid-19/00001234_000.png",
        "Covid-19/00001234_001.png",
        "Covid-19/00005678_000.jpg",
        "No_findings/00004321_000.png",
        "No_findings/00008765_000.png",
        "Pneumonia/00002468_000.png",
    }  # README.txt at the root and notes.txt are not rows
    assert found.notes["files_ignored"] == 2
    assert "patients" not in found.notes  # every name matched the pattern
    facts = {path: (row.finding, label(row), row.patient_id, row.source) for path, row in rows.items()}
    assert facts["Covid-19/00001234_001.png"] == ("COVID-19", 1, "00001234", "nih")
    assert facts["No_findings/00004321_000.png"] == ("No Finding", 0, "00004321", "nih")
    assert facts["Pneumonia/00002468_000.png"] == ("Pneumonia", 0, "00002468", "nih")
    assert all(row.exclusion is None for row in rows.values())


def test_class_folders_map_and_exclude_classes(tmp_path):
    root = tmp_path / "kaggle"
    save(root / "PNEUMONIA_BACT" / "a.png", film(1))
    save(root / "COVID" / "b.png", film(2))
    save(root / "unsorted" / "c.png", film(3))
    classes = {"PNEUMONIA_BACT": "Pneumonia/Bacterial", "unsorted": "todo"}
    spec = SourceSpec("kaggle", str(root), layout="class-folders", classes=classes)
    found = read_rows(spec.open().open(), spec)
    rows = {row.image_path: row for row in found.rows}
    assert (rows["PNEUMONIA_BACT/a.png"].finding, label(rows["PNEUMONIA_BACT/a.png"])) == (
        "Pneumonia/Bacterial",
        0,
    )
    assert (rows["COVID/b.png"].finding, label(rows["COVID/b.png"])) == ("COVID-19", 1)
    assert rows["unsorted/c.png"].exclusion == UNLABELLED
    # without a pattern, every usable file is its own patient, and the notes say so
    assert found.notes["files_without_patient"] == 2 and "own patient" in found.notes["patients"]


def test_auto_detects_the_upstream_layout(tmp_path):
    builder = SourceBuilder(tmp_path / "ieee")
    builder.add("a.png", "p1", finding="Pneumonia/Viral/COVID-19", image=film(1))
    builder.add("b.png", "p2", finding="No_findings", view="L", image=film(2))
    (builder.write() / "manifest.csv").write_text("filename,finding\nb.png,COVID-19\n")  # metadata.csv wins
    spec = SourceSpec("ieee", str(tmp_path / "ieee"))
    found = read_rows(spec.open().open(), spec)
    assert found.layout == "upstream" and found.notes == {}
    assert [(r.image_path, r.finding, label(r), r.patient_id, r.source, r.exclusion) for r in found.rows] == [
        ("images/a.png", "Pneumonia/Viral/COVID-19", 1, "p1", "ieee", None),
        ("images/b.png", "No Finding", 0, "p2", "ieee", "non_frontal_view"),
    ]


def test_an_empty_class_folder_source_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("nothing here yet")
    spec = SourceSpec("empty", str(tmp_path / "empty"), layout="class-folders")
    with pytest.raises(SourceError, match="no <class>/<image> files"):
        read_rows(spec.open().open(), spec)


@pytest.mark.usefixtures("ray_local")
def test_class_folders_ingest_keeps_a_patients_films_in_one_split(tmp_path):
    root = nih_archive(tmp_path / "nih")
    storage = Storage.open(str(tmp_path / "store"))
    report = ingest(
        [SourceSpec("nih", str(root), layout="class-folders", patient_id_pattern=PATTERN)], storage
    )
    assert report["changed"] and report["usable"] == 6 and report["positives"] == 3
    assert report["sources"]["nih"]["layout"] == "class-folders"
    assert report["sources"]["nih"]["usable"] == 6 and "patients" not in report["sources"]["nih"]
    images = {row["filename"]: row for row in images_of(storage, report["dataset_version"])}
    assert set(images) == {
        "00001234_000.png",
        "00001234_001.png",
        "00005678_000.jpg",
        "00004321_000.png",
        "00008765_000.png",
        "00002468_000.png",
    }
    first, second = images["00001234_000.png"], images["00001234_001.png"]
    assert first["patient_id"] == second["patient_id"] == "nih:00001234"
    assert first["split"] == second["split"] == report["split_of_patient"]["nih:00001234"]
    assert {row["source"] for row in images.values()} == {"nih"}
    assert images["00004321_000.png"]["finding"] == "No Finding"
    assert images["00002468_000.png"]["finding"] == "Pneumonia"
    assert len(report["split_of_patient"]) == 5  # five patients, six films


@pytest.mark.usefixtures("ray_local")
def test_class_folders_without_a_pattern_make_each_file_its_own_patient(tmp_path):
    root = nih_archive(tmp_path / "nih")
    storage = Storage.open(str(tmp_path / "store"))
    report = ingest([SourceSpec("nih", str(root), layout="class-folders")], storage)
    note = report["sources"]["nih"]
    assert note["files_without_patient"] == 6
    assert "no patient_id_pattern" in note["patients"] and "its own patient" in note["patients"]
    images = images_of(storage, report["dataset_version"])
    assert sorted(row["patient_id"] for row in images) == sorted(
        f"unknown-{row['sha256'][:12]}" for row in images
    )
    assert len(report["split_of_patient"]) == 6


# -- manifests ----------------------------------------------------------------------------------------
def hospital(root: Path) -> Path:
    """A manifest source: ``labels.csv`` with the hospital's own column names, files under scans/."""
    save(root / "scans" / "a.png", film(201))
    save(root / "scans" / "b.png", film(202))
    save(root / "scans" / "2020" / "c.jpg", film(203).convert("RGB"), quality=92)
    save(root / "scans" / "d.png", film(204))
    save(root.parent / "outside.png", film(205))  # a real file the unsafe row would reach
    (root / "labels.csv").write_text(
        "file,diagnosis,pid,ward\n"
        "scans/a.png,Covid-19,h1,ICU\n"
        "scans/b.png,normal,h1,ICU\n"
        "scans/2020/c.jpg,Pneumonia/Bacterial/Streptococcus,h2,B\n"
        "scans/missing.png,COVID-19,h3,B\n"
        "../outside.png,COVID-19,h4,B\n"
        "scans/d.png,todo,h5,B\n",
        encoding="utf-8",
    )
    return root


HOSPITAL_COLUMNS = {"filename": "file", "finding": "diagnosis", "patient_id": "pid"}


def test_manifest_rows_use_the_mapped_columns(tmp_path):
    root = hospital(tmp_path / "hospital")
    spec = SourceSpec("hosp", str(root), manifest="labels.csv", columns=HOSPITAL_COLUMNS)
    snapshot = spec.open().open()
    assert detect_layout(snapshot, spec) == "manifest"
    found = read_rows(snapshot, spec)
    assert found.layout == "manifest" and found.notes == {}
    rows = {row.image_path: row for row in found.rows}
    assert (rows["scans/a.png"].finding, label(rows["scans/a.png"]), rows["scans/a.png"].patient_id) == (
        "COVID-19",
        1,
        "h1",
    )
    assert (rows["scans/b.png"].finding, label(rows["scans/b.png"])) == ("No Finding", 0)
    assert label(rows["scans/2020/c.jpg"]) == 0 and rows["scans/a.png"].extra["ward"] == "ICU"
    assert rows["../outside.png"].exclusion == UNSAFE_PATH
    assert rows["scans/d.png"].exclusion == UNLABELLED


@pytest.mark.usefixtures("ray_local")
def test_manifest_ingest(tmp_path):
    root = hospital(tmp_path / "hospital")
    storage = Storage.open(str(tmp_path / "store"))
    spec = SourceSpec("hosp", str(root), layout="manifest", manifest="labels.csv", columns=HOSPITAL_COLUMNS)
    report = ingest([spec], storage)
    assert report["usable"] == 3 and report["positives"] == 1 and report["rows"] == 6
    reasons = {e["filename"]: (e["reason"], e["source"]) for e in report["exclusions"]}
    assert reasons == {
        "scans/missing.png": (MISSING_FILE, "hosp"),
        "../outside.png": (UNSAFE_PATH, "hosp"),
        "scans/d.png": (UNLABELLED, "hosp"),
    }
    images = {row["image_path"]: row for row in images_of(storage, report["dataset_version"])}
    assert set(images) == {"scans/a.png", "scans/b.png", "scans/2020/c.jpg"}
    assert images["scans/a.png"]["patient_id"] == images["scans/b.png"]["patient_id"] == "hosp:h1"
    assert images["scans/a.png"]["split"] == images["scans/b.png"]["split"]
    assert images["scans/a.png"]["finding"] == "COVID-19" and images["scans/b.png"]["label"] == 0
    # the stored label column is the default task's label of the finding, decided by the task
    assert all(row["label"] == resolve_task().label_of(row["finding"]) for row in images.values())
    assert report["sources"]["hosp"]["layout"] == "manifest" and "patients" not in report["sources"]["hosp"]


def test_a_manifest_without_patients_takes_them_from_the_pattern(tmp_path):
    root = tmp_path / "m"
    save(root / "00000001_000.png", film(1))
    save(root / "x.png", film(2))
    (root / "manifest.csv").write_text("filename,finding\n00000001_000.png,COVID-19\nx.png,No Finding\n")
    spec = SourceSpec("m", str(root), patient_id_pattern=PATTERN)
    found = read_rows(spec.open().open(), spec)
    assert found.layout == "manifest"
    assert [row.patient_id for row in found.rows] == ["00000001", ""]
    assert found.notes["files_without_patient"] == 1 and "did not match" in found.notes["patients"]


def test_mapped_manifest_columns_win_over_columns_with_builtin_names(tmp_path):
    root = tmp_path / "m"
    save(root / "a.png", film(1))
    (root / "manifest.csv").write_text("filename,finding,label\na.png,bilateral opacities,COVID-19\n")
    spec = SourceSpec("m", str(root), columns={"finding": "label"})
    [row] = read_rows(spec.open().open(), spec).rows
    assert (row.finding, label(row)) == ("COVID-19", 1)


# -- sources files ------------------------------------------------------------------------------------
SOURCES = r"""
sources:
  - name: ieee8023
    uri: data/ieee
    layout: upstream
  - name: nih
    uri: ./archives/nih
    layout: class-folders
    patient_id_pattern: '^(\d{8})_'
    classes: {No_findings: No Finding}
  - name: mirror
    uri: s3://bucket/prefix
  - name: github
    uri: git@github.com:ieee8023/covid-chestxray-dataset.git
    ref: v1
  - name: hospital
    uri: /data/hospital
    layout: manifest
    manifest: labels.csv
    columns: {filename: file, finding: diagnosis}
"""


def test_sources_file_in_order_with_relative_locations_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "sources.yaml"
    path.write_text(SOURCES, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    specs = read_sources_file(Path("conf/sources.yaml"))
    assert [spec.name for spec in specs] == ["ieee8023", "nih", "mirror", "github", "hospital"]
    cwd = Path.cwd().resolve()
    assert specs[0].uri == str(cwd / "data" / "ieee")  # the current directory, not the file's
    assert specs[1].uri == str(cwd / "archives" / "nih")
    assert specs[1].patient_id_pattern == r"^(\d{8})_" and specs[1].classes == {"No_findings": "No Finding"}
    assert (specs[2].uri, specs[2].layout) == ("s3://bucket/prefix", "auto")
    assert (specs[3].uri, specs[3].ref) == ("git@github.com:ieee8023/covid-chestxray-dataset.git", "v1")
    assert specs[4].uri == "/data/hospital" and specs[4].manifest == "labels.csv"
    assert specs[4].columns == {"filename": "file", "finding": "diagnosis"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sources:\n- name: a\n  uri: x\n  patient_pattern: '(\\d+)'\n", "unknown keys ['patient_pattern']"),
        ("sources:\n- name: a\n  uri: x\n- name: b\n  uri: y\n- name: a\n  uri: z\n", "must be unique"),
        ("sources:\n- name: a\n  layout: upstream\n", "needs 'name' and 'uri'"),
        ("sources:\n- uri: x\n", "needs 'name' and 'uri'"),
        ("sources:\n- name: a\n  uri:\n", "uri"),
        ("sources:\n- name: a\n  uri: ''\n", "uri"),
        ("sources:\n- name: a\n  uri: '  '\n", "uri must be a non-empty string"),
        ("sources:\n- name: a\n  uri: x\n  patient_id_pattern: '^\\d{8}_'\n", "needs a (group)"),
        ("sources:\n- name: a\n  uri: x\n  patient_id_pattern: '^(\\d{8}_'\n", "patient_id_pattern"),
        ("sources:\n- name: a\n  uri: x\n  patient_id_pattern: 5\n", "patient_id_pattern"),
        ("sources:\n- name: a\n  uri: x\n  classes: [Covid-19, normal]\n", "classes"),
        ("sources:\n- name: a\n  uri: x\n  columns: file\n", "columns"),
        ("sources:\n- name: a\n  uri: x\n  columns: {file: f}\n", "unknown manifest columns ['file']"),
        ("sources:\n- name: a\n  uri: x\n  manifest: ../labels.csv\n", "inside the source"),
        ("sources:\n- name: a\n  uri: x\n  layout: folders\n", "layout 'folders'"),
        ("sources:\n- name: a b\n  uri: x\n", "source name 'a b'"),
        ("sources: []\n", "top-level 'sources:' list"),
        ("- name: a\n  uri: x\n", "top-level 'sources:' list"),
        ("sources: [\n", "not a readable sources file"),
    ],
)
def test_invalid_sources_files(tmp_path, monkeypatch, body, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sources.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(SourceError) as raised:
        read_sources_file(path)
    assert message in str(raised.value)


def test_a_missing_sources_file(tmp_path):
    with pytest.raises(SourceError, match="not a readable sources file"):
        read_sources_file(tmp_path / "nowhere.yaml")


# -- several sources ----------------------------------------------------------------------------------
def two_sources(tmp_path: Path) -> tuple[list[SourceSpec], dict[str, Path]]:
    """ieee (upstream, listed first) holds film X as COVID-19; archive (class folders, no patient ids)
    holds a re-encoded copy of X, enlarged, under the same name in No_findings/ and another, renamed, in
    Covid-19/ - both with more pixels than ieee's. The archive also has a different film that happens to
    share a name with one of ieee's (y.png), and two films of its own."""
    builder = SourceBuilder(tmp_path / "ieee")
    x = radiograph(300, size=(128, 152))
    builder.add("x.png", "p1", finding="COVID-19", image=x)
    builder.add("y.png", "p2", finding="No Finding", image=film(301))
    builder.add("z.png", "p3", finding="Pneumonia/Viral/SARS", image=film(302))
    ieee = builder.write()
    archive = tmp_path / "archive"
    paths = {
        "same_name": save(archive / "No_findings" / "x.png", x.resize((160, 190), Image.LANCZOS)),
        "renamed": save(
            archive / "Covid-19" / "covid-0042.jpg", x.resize((144, 171)).convert("RGB"), quality=85
        ),
        "other_y": save(archive / "No_findings" / "y.png", film(305)),  # same name, another film
        "own_normal": save(archive / "No_findings" / "n1.png", film(303)),
        "own_covid": save(archive / "Covid-19" / "c1.png", film(304)),
    }
    specs = [
        SourceSpec("ieee", str(ieee), layout="upstream"),
        SourceSpec("archive", str(archive), layout="class-folders"),
    ]
    return specs, paths


@pytest.mark.usefixtures("ray_local")
def test_a_film_in_two_sources_is_kept_once_from_the_first_source(tmp_path):
    specs, paths = two_sources(tmp_path)
    storage = Storage.open(str(tmp_path / "store"))
    report = ingest(specs, storage)
    assert report["changed"] and report["rows"] == 8 and report["usable"] == 6

    # ieee is listed first: its copy of X is kept although both archive copies have more pixels
    dropped = {(d["dropped_source"], d["dropped"]): d for d in report["duplicates"]}
    assert set(dropped) == {("archive", "x.png"), ("archive", "covid-0042.jpg")}
    assert all((d["kept_source"], d["kept"]) == ("ieee", "x.png") for d in dropped.values())
    assert report["cross_source_duplicates"] == 2
    reasons = {(e["source"], e["filename"]): e["reason"] for e in report["exclusions"]}
    assert reasons == {("archive", "x.png"): DUPLICATE, ("archive", "covid-0042.jpg"): DUPLICATE}

    # only the No_findings copy disagrees with the kept finding (the Covid-19 copy agrees)
    [disagreement] = report["label_disagreements"]
    assert disagreement["kept"] == "ieee:images/x.png" and disagreement["kept_finding"] == "COVID-19"
    assert disagreement["dropped"] == "archive:No_findings/x.png"
    assert disagreement["dropped_finding"] == "No Finding"
    assert "ieee" in disagreement["decision"] and "COVID-19" in disagreement["decision"]

    # the copies' patients (the archive names none: one per image) share the split of ieee's patient
    splits = report["split_of_patient"]
    for path in (paths["same_name"], paths["renamed"]):
        assert splits[f"unknown-{sha_of(path)[:12]}"] == splits["ieee:p1"]

    images = images_of(storage, report["dataset_version"])
    assert {row["source"] for row in images} == {"ieee", "archive"}
    by_file = {(row["source"], row["image_path"]): row for row in images}
    assert set(by_file) == {
        ("ieee", "images/x.png"),
        ("ieee", "images/y.png"),
        ("ieee", "images/z.png"),
        ("archive", "No_findings/y.png"),  # a shared name alone does not make a duplicate
        ("archive", "No_findings/n1.png"),
        ("archive", "Covid-19/c1.png"),
    }
    kept_x = by_file[("ieee", "images/x.png")]
    assert (kept_x["finding"], kept_x["label"], kept_x["patient_id"]) == ("COVID-19", 1, "ieee:p1")
    assert (kept_x["width"], kept_x["height"]) == (128, 152)
    assert by_file[("archive", "Covid-19/c1.png")]["finding"] == "COVID-19"
    assert report["sources"]["ieee"]["usable"] == 3 and report["sources"]["archive"]["usable"] == 3
    assert report["sources"]["archive"]["layout"] == "class-folders"
    assert report["sources"]["ieee"]["layout"] == "upstream"
    manifest = dataset.read_manifest(storage, report["dataset_version"])
    assert [source["name"] for source in manifest["sources"]] == ["ieee", "archive"]

    again = ingest(specs, storage)
    assert again["changed"] is False and again["dataset_version"] == report["dataset_version"]
    assert again["images_hashed"] == 0 and dataset.latest_version(storage) == report["dataset_version"]


@pytest.mark.usefixtures("ray_local")
def test_the_copy_already_published_is_kept_before_the_first_listed_source(tmp_path):
    """The archive alone first; then ieee, listed first, brings its copy of X: the published copy stays,
    its finding stands, and the disagreement is reported."""
    specs, paths = two_sources(tmp_path)
    storage = Storage.open(str(tmp_path / "store"))
    first = ingest([specs[1]], storage)
    # within the archive, the larger of its two copies of X is kept
    assert first["usable"] == 4 and [(d["dropped"], d["kept"]) for d in first["duplicates"]] == [
        ("covid-0042.jpg", "x.png")
    ]
    second = ingest(specs, storage)
    pairs = {(d["dropped_source"], d["dropped"], d["kept_source"], d["kept"]) for d in second["duplicates"]}
    assert pairs == {
        ("ieee", "x.png", "archive", "x.png"),
        ("archive", "covid-0042.jpg", "archive", "x.png"),
    }
    assert second["cross_source_duplicates"] == 1
    decided = {d["dropped"]: d for d in second["label_disagreements"]}
    assert set(decided) == {"ieee:images/x.png", "archive:Covid-19/covid-0042.jpg"}
    assert decided["ieee:images/x.png"]["kept"] == "archive:No_findings/x.png"
    assert "archive" in decided["ieee:images/x.png"]["decision"]
    changes = second["changes"]
    assert {k: changes[k] for k in ("added", "removed", "relabelled", "patient_changed")} == {
        "added": 2,  # ieee's y.png and z.png
        "removed": 0,  # nothing published before is dropped
        "relabelled": 0,
        "patient_changed": 0,
    }
    splits = second["split_of_patient"]
    assert splits["ieee:p1"] == splits[f"unknown-{sha_of(paths['same_name'])[:12]}"]
    assert splits == {**splits, **first["split_of_patient"]}  # earlier splits frozen


def identical_copy_sources(tmp_path: Path) -> list[SourceSpec]:
    """ieee (listed first) holds film Z as a SARS pneumonia; the archive holds the very same bytes, renamed,
    in Covid-19/."""
    builder = SourceBuilder(tmp_path / "ieee")
    builder.add("z.png", "p3", finding="Pneumonia/Viral/SARS", image=film(500))
    builder.add("w.png", "p4", finding="No Finding", image=film(501))
    ieee = builder.write()
    archive = tmp_path / "archive"
    (archive / "Covid-19").mkdir(parents=True)
    (archive / "Covid-19" / "zz.png").write_bytes((ieee / "images" / "z.png").read_bytes())
    save(archive / "Covid-19" / "c1.png", film(502))
    return [
        SourceSpec("ieee", str(ieee), layout="upstream"),
        SourceSpec("archive", str(archive), layout="class-folders"),
    ]


@pytest.mark.usefixtures("ray_local")
def test_identical_bytes_in_two_sources(tmp_path):
    specs = identical_copy_sources(tmp_path)
    storage = Storage.open(str(tmp_path / "store"))
    report = ingest(specs, storage)
    assert report["usable"] == 3
    [duplicate] = report["duplicates"]
    assert (
        duplicate["dropped_source"],
        duplicate["dropped"],
        duplicate["kept_source"],
        duplicate["kept"],
    ) == (
        "archive",
        "zz.png",
        "ieee",
        "z.png",
    )
    assert duplicate["distance"] == 0 and report["cross_source_duplicates"] == 1
    [disagreement] = report["label_disagreements"]
    assert (disagreement["kept_finding"], disagreement["dropped_finding"]) == (
        "Pneumonia/Viral/SARS",
        "COVID-19",
    )
    sha = sha_of(Path(specs[0].uri) / "images" / "z.png")
    # both rows name one content: the stand-in patient of the archive's row is that content's
    assert report["split_of_patient"][f"unknown-{sha[:12]}"] == report["split_of_patient"]["ieee:p3"]


@pytest.mark.usefixtures("ray_local")
def test_identical_bytes_already_published_keep_their_row(tmp_path):
    specs = identical_copy_sources(tmp_path)
    storage = Storage.open(str(tmp_path / "store"))
    ingest([specs[1]], storage)  # the archive alone: zz.png published as COVID-19
    second = ingest(specs, storage)
    assert second["changes"]["relabelled"] == 0 and second["changes"]["patient_changed"] == 0
    [duplicate] = second["duplicates"]
    assert (duplicate["kept_source"], duplicate["kept"]) == ("archive", "zz.png")


@pytest.mark.usefixtures("ray_local")
def test_changes_against_the_parent_version(tmp_path):
    builder = SourceBuilder(tmp_path / "ieee")
    for i in range(5):
        builder.add(f"f{i}.png", f"p{i}", finding="COVID-19" if i % 2 else "No Finding", image=film(400 + i))
    root = builder.write()
    spec = [SourceSpec("ieee", str(root), layout="upstream")]
    storage = Storage.open(str(tmp_path / "store"))
    first = ingest(spec, storage)
    assert first["usable"] == 5 and first["changes"]["added"] == 5

    builder.rows[1][4] = "Pneumonia/Bacterial/Streptococcus"  # f1: COVID-19 -> a bacterial pneumonia
    del builder.rows[2]  # f2 is withdrawn
    builder.write()
    second = ingest(spec, storage)
    assert second["changed"] and second["parent_version"] == first["dataset_version"]
    changes = second["changes"]
    assert {k: changes[k] for k in ("added", "removed", "relabelled", "view_changed", "patient_changed")} == {
        "added": 0,
        "removed": 1,
        "relabelled": 1,
        "view_changed": 0,
        "patient_changed": 0,
    }
    [relabelled] = changes["rows"]["relabelled"]
    assert relabelled["image_path"] == "images/f1.png" and relabelled["source"] == "ieee"
    assert (relabelled["before"], relabelled["after"]) == ("COVID-19", "Pneumonia/Bacterial/Streptococcus")
    [removed] = changes["rows"]["removed"]
    assert removed["image_path"] == "images/f2.png"
    for patient, split in first["split_of_patient"].items():
        assert second["split_of_patient"][patient] == split  # splits stay frozen


# -- remote class folders -----------------------------------------------------------------------------
@pytest.mark.usefixtures("ray_local")
def test_class_folders_from_s3_give_the_folder_rows(tmp_path, s3_bucket):
    root = nih_archive(tmp_path / "nih")
    client = boto3.client("s3")
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"archive/{path.relative_to(root).as_posix()}")
    folder_store = Storage.open(str(tmp_path / "folder"))
    s3_store = Storage.open(str(tmp_path / "s3"))
    folder = ingest([SourceSpec("nih", str(root), patient_id_pattern=PATTERN)], folder_store)
    remote = ingest([SourceSpec("nih", f"s3://{s3_bucket}/archive", patient_id_pattern=PATTERN)], s3_store)

    assert remote["sources"]["nih"]["layout"] == "class-folders"  # auto, over S3
    columns = ("source", "image_path", "finding", "label", "patient_id", "split", "sha256")

    def rows(storage, report):
        return sorted(tuple(row[c] for c in columns) for row in images_of(storage, report["dataset_version"]))

    assert rows(s3_store, remote) == rows(folder_store, folder) and len(rows(s3_store, remote)) == 6
    # the same listing and bytes: the same source version (the location is part of the dataset's)
    assert remote["sources"]["nih"]["source_version"] == folder["sources"]["nih"]["source_version"]
    assert all(s3_store.exists(row["image_key"]) for row in images_of(s3_store, remote["dataset_version"]))


@pytest.mark.usefixtures("ray_local")
def test_a_manifest_over_http_gives_the_folder_rows(tmp_path, http_server):
    root = hospital(tmp_path / "hospital")
    spec = {"layout": "manifest", "manifest": "labels.csv", "columns": HOSPITAL_COLUMNS}
    folder_store, http_store = Storage.open(str(tmp_path / "folder")), Storage.open(str(tmp_path / "http"))
    folder = ingest([SourceSpec("hosp", str(root), **spec)], folder_store)
    remote = ingest([SourceSpec("hosp", http_server(root), **spec)], http_store)
    columns = ("source", "image_path", "finding", "label", "patient_id", "split", "sha256")

    def rows(storage, report):
        return sorted(tuple(row[c] for c in columns) for row in images_of(storage, report["dataset_version"]))

    assert rows(http_store, remote) == rows(folder_store, folder) and len(rows(http_store, remote)) == 3
    reasons = {e["filename"]: e["reason"] for e in remote["exclusions"]}
    assert reasons == {e["filename"]: e["reason"] for e in folder["exclusions"]}
    assert reasons["scans/missing.png"] == MISSING_FILE and reasons["../outside.png"] == UNSAFE_PATH
