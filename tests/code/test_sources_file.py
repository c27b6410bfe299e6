"""Sources and task files are read as written: YAML 1.1's implicit types (actions/setup-python#662's kind)
never turn a ref, a class folder, a finding or a name into a number or a boolean. Real files and a real git
repository on disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lxn_ray.sources.layouts import read_rows, read_sources_file
from lxn_ray.sources.tasks import TaskError, resolve_task
from lxn_ray.sources.transports import SourceError
from lxn_ray.sources.yamltext import WrittenScalar, load_text_yaml, typed_value
from tests.helpers import encode, radiograph

COVID_VS_REST = resolve_task("covid-vs-rest")


def sources_file(folder: Path, body: str) -> Path:
    path = folder / "sources.yaml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("written", "yaml_1_1"),
    [
        ("1.10", 1.1),  # float
        ("0123", 83),  # octal
        ("1:30", 90),  # sexagesimal
        ("1_000", 1000),
        ("0x1F", 31),
        ("2020-03-15", "2020-03-15"),  # a date
        ("yes", True),
        ("Off", False),
        ("1e3", "1e3"),  # a string in YAML 1.1 already: plain str
        ("v1.10", "v1.10"),
    ],
)
def test_yaml_implicit_types_in_a_sources_file_are_kept_as_written(tmp_path, monkeypatch, written, yaml_1_1):
    monkeypatch.chdir(tmp_path)
    path = sources_file(
        tmp_path, f"sources:\n  - name: a\n    uri: git@example.org:x.git\n    ref: {written}\n"
    )
    [spec] = read_sources_file(path)
    assert spec.ref == written and type(spec.ref) is str
    assert str(typed_value(load_text_yaml(f"ref: {written}")["ref"])) == str(yaml_1_1)  # what YAML made


def test_yes_and_no_class_names_map_their_folders(tmp_path, monkeypatch):
    """``classes: {Yes: COVID-19, No: No Finding}`` became {True: ..., False: ...}, matched no folder,
    and the films fell to ``other`` with label 0: the folders Yes/ and No/ are now mapped as written."""
    root = tmp_path / "films"
    for folder, seed in (("Yes", 1), ("No", 2)):
        (root / folder).mkdir(parents=True)
        (root / folder / f"{folder}-1.png").write_bytes(encode(radiograph(seed, size=(96, 112)), "PNG"))
    monkeypatch.chdir(tmp_path)
    path = sources_file(
        tmp_path,
        "sources:\n  - name: films\n    uri: films\n    layout: class-folders\n"
        "    classes: {Yes: COVID-19, No: No Finding}\n",
    )
    [spec] = read_sources_file(path)
    assert spec.classes == {"Yes": "COVID-19", "No": "No Finding"}
    found = read_rows(spec.open().open(), spec)
    labels = {row.image_path: (row.finding, COVID_VS_REST.label_of(row.finding)) for row in found.rows}
    assert labels == {"Yes/Yes-1.png": ("COVID-19", 1), "No/No-1.png": ("No Finding", 0)}


def git(cwd: Path, *args: str) -> str:
    environment = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=environment
    ).stdout.strip()


@pytest.mark.parametrize("tag", ["1.10", "0123"])
def test_a_numeric_looking_ref_ingests_the_tag_written(tmp_path, monkeypatch, tag):
    """``ref: 1.10`` ingested tag ``1.1`` and ``ref: 0123`` failed naming ref '83': each names its tag."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    (repo / "metadata.csv").write_text("patientid,finding,view,filename\n")
    for name in ("1.1", "83", tag):
        (repo / "version.txt").write_text(name)
        git(repo, "add", ".")
        git(repo, "commit", "-q", "-m", name)
        git(repo, "tag", name)
    monkeypatch.setenv("LXN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = sources_file(tmp_path, f"sources:\n  - name: upstream\n    uri: upstream\n    ref: {tag}\n")
    [spec] = read_sources_file(path)
    snapshot = spec.open(cache_dir=tmp_path / "cache").open()
    assert snapshot.read_file("version.txt", 100) == tag.encode()
    assert snapshot.commit == git(repo, "rev-parse", f"{tag}^{{commit}}")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("    hash_patient_ids: maybe\n", "hash_patient_ids must be true or false"),
        ("    classes: {Covid: [a, b]}\n", "classes must map names to names"),
        ("    classes: {Covid: }\n", "classes must map names to names"),
        ("    ref: [v1]\n", "ref must be a string"),
        ("    layout: {a: b}\n", "layout must be a string"),
    ],
)
def test_values_of_the_wrong_kind_fail_with_one_clear_line(tmp_path, monkeypatch, entry, message):
    monkeypatch.chdir(tmp_path)
    path = sources_file(tmp_path, "sources:\n  - name: a\n    uri: x\n" + entry)
    with pytest.raises(SourceError) as raised:
        read_sources_file(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_booleans_and_empty_values_keep_their_meaning_where_meant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = sources_file(
        tmp_path,
        "sources:\n"
        "  - name: a\n    uri: x\n    hash_patient_ids: yes\n    ref:\n    patient_id_pattern: ~\n"
        "  - name: b\n    uri: y\n    hash_patient_ids: false\n    layout: class-folders\n",
    )
    first, second = read_sources_file(path)
    assert (first.hash_patient_ids, first.ref, first.patient_id_pattern, first.layout) == (
        True,
        None,
        None,
        "auto",
    )
    assert (second.hash_patient_ids, second.layout) == (False, "class-folders")


def test_a_task_file_is_read_as_written(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("name: 1.10\npositive: [Yes]\nnegative: [No, Off]\npositive_name: On\n", encoding="utf-8")
    task = resolve_task(str(path))
    assert (task.name, task.positive, task.negative, task.positive_name) == (
        "1.10",
        ("Yes",),
        ("No", "Off"),
        "On",
    )
    assert task.label_of("Yes") == 1 and task.label_of("No") == 0  # findings as a hospital's manifest writes
    path.write_text("name: t\npositive: [covid, 3]\nnegative: [0]\n", encoding="utf-8")
    assert (resolve_task(str(path)).positive, resolve_task(str(path)).negative) == (("covid", "3"), ("0",))
    path.write_text("name: t\npositive: [Yes]\nnegative: [yes]\n", encoding="utf-8")
    with pytest.raises(TaskError, match="on both sides"):
        resolve_task(str(path))


def test_written_scalars_are_strings_with_yaml_s_value_beside():
    document = load_text_yaml("a: 1.10\nb: '1.10'\nc: true\nd:\n")
    assert all(isinstance(document[key], str) for key in "abc")
    assert isinstance(document["a"], WrittenScalar) and not isinstance(document["b"], WrittenScalar)
    assert [typed_value(document[key]) for key in "abcd"] == [1.1, "1.10", True, None]
