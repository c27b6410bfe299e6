"""One vocabulary of findings, and tasks: the only place a finding becomes a label."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lxn_ray.data import dataset
from lxn_ray.data.ingest import STORED_TASK
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.tasks import (
    BUILTIN_TASKS,
    DEFAULT_TASK,
    Task,
    TaskError,
    category,
    normalise_finding,
    portable_task,
    resolve_task,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("No_findings", "No Finding"),
        ("no findings", "No Finding"),
        ("normal", "No Finding"),
        ("Normal", "No Finding"),
        ("No Finding", "No Finding"),
        ("  No   Finding ", "No Finding"),
        ("Covid-19", "COVID-19"),
        ("COVID19", "COVID-19"),
        ("covid", "COVID-19"),
        ("pneumonia", "Pneumonia"),
        # anything else keeps its own words (whitespace collapsed, underscores become spaces)
        ("Pneumonia/Viral/COVID-19", "Pneumonia/Viral/COVID-19"),
        ("COVID-19,  ARDS", "COVID-19, ARDS"),
        ("Tuberculosis", "Tuberculosis"),
        ("todo", "todo"),
    ],
)
def test_normalise_finding_gives_one_spelling(raw, normalised):
    assert normalise_finding(raw) == normalised


@pytest.mark.parametrize(
    ("finding", "kind"),
    [
        ("COVID-19", "covid"),
        ("COVID-19, ARDS", "covid"),  # flat, combined: COVID-19 anywhere wins
        ("Pneumonia/Viral/COVID-19", "covid"),  # hierarchical
        ("Pneumonia/Viral/SARS-CoV-2", "covid"),
        ("Covid-19", "covid"),
        ("No Finding", "normal"),
        ("No_findings", "normal"),
        ("normal", "normal"),
        ("Pneumonia", "pneumonia"),
        ("Pneumonia/Bacterial/Streptococcus", "pneumonia"),
        ("Pneumonia/Bacterial/Klebsiella", "pneumonia"),
        ("Pneumonia/Viral/SARS", "pneumonia"),
        ("Streptococcus", "pneumonia"),  # flat, before upstream's hierarchy
        ("Pneumonia/Fungal/Aspergillosis", "pneumonia"),
        ("Tuberculosis", "other"),
        ("ARDS", "other"),
        # phrases, as class folders and manifests write them (Kaggle: "Viral Pneumonia", "Lung_Opacity")
        ("Viral Pneumonia", "pneumonia"),
        ("Bacterial Pneumonia", "pneumonia"),
        ("PNEUMONIA", "pneumonia"),
        ("COVID-19 pneumonia", "covid"),
        ("Covid 19 Pneumonia", "covid"),
        ("Non-COVID pneumonia", "pneumonia"),
        ("non covid pneumonia", "pneumonia"),
        ("No pneumonia", "other"),
        ("not covid-19", "other"),
        ("Lung_Opacity", "other"),
        ("todo", None),
        ("unknown", None),
        ("", None),
        ("   ", None),
    ],
)
def test_category(finding, kind):
    assert category(finding) == kind
    assert category(normalise_finding(finding)) == kind  # normalising never changes the category


BUILTIN_TABLE = {
    # finding:                           covid-vs-rest, covid-vs-normal, covid-vs-pneumonia
    "COVID-19": (1, 1, 1),
    "COVID-19, ARDS": (1, 1, 1),
    "Pneumonia/Viral/COVID-19": (1, 1, 1),
    "No Finding": (0, 0, None),
    "No_findings": (0, 0, None),
    "Pneumonia": (0, None, 0),
    "Pneumonia/Bacterial/Streptococcus": (0, None, 0),
    "Pneumonia/Viral/SARS": (0, None, 0),
    "Viral Pneumonia": (0, None, 0),
    "COVID-19 pneumonia": (1, 1, 1),
    "Tuberculosis": (0, None, None),
    "ARDS": (0, None, None),
    "todo": (None, None, None),
    "": (None, None, None),
}


@pytest.mark.parametrize("finding", sorted(BUILTIN_TABLE))
def test_builtin_task_mapping_tables(finding):
    names = ("covid-vs-rest", "covid-vs-normal", "covid-vs-pneumonia")
    assert tuple(resolve_task(name).label_of(finding) for name in names) == BUILTIN_TABLE[finding]
    # the covid-vs-rest labelling is the label dataset versions record
    assert STORED_TASK.label_of(finding) == BUILTIN_TABLE[finding][0]


def test_builtin_tasks_resolve_by_name_and_default():
    assert set(BUILTIN_TASKS) == {"covid-vs-rest", "covid-vs-normal", "covid-vs-pneumonia"}
    assert resolve_task(None) is BUILTIN_TASKS[DEFAULT_TASK] and DEFAULT_TASK == "covid-vs-rest"
    task = resolve_task("covid-vs-normal")
    assert resolve_task(task) is task
    assert (task.label_name(1), task.label_name(0)) == ("COVID-19", "no finding")


def test_a_recorded_task_resolves_to_the_same_task():
    for task in BUILTIN_TASKS.values():
        recorded = json.loads(json.dumps(task.as_dict()))  # as a model card stores it
        assert resolve_task(recorded) == task


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


CUSTOM = """\
name: covid-vs-bacterial
positive: [covid]
negative: [Streptococcus, Klebsiella]
negative_name: bacterial pneumonia
"""


def test_custom_task_file(tmp_path):
    task = resolve_task(str(write(tmp_path / "task.yaml", CUSTOM)))
    assert task.name == "covid-vs-bacterial"
    assert task.positive == ("covid",) and task.negative == ("Streptococcus", "Klebsiella")
    assert (task.label_name(1), task.label_name(0)) == ("covid", "bacterial pneumonia")
    table = {
        "COVID-19": 1,
        "Pneumonia/Viral/COVID-19": 1,
        "COVID-19, ARDS": 1,
        "Pneumonia/Bacterial/Streptococcus": 0,
        "Streptococcus": 0,  # flat upstream spelling
        "streptococcus": 0,  # case-insensitive
        "Pneumonia/Bacterial/Klebsiella": 0,
        "Pneumonia/Bacterial/Staphylococcus": None,  # another bacterium: not used
        "Pneumonia/Viral/SARS": None,
        "No Finding": None,
        "Tuberculosis": None,
        "todo": None,
    }
    assert {finding: task.label_of(finding) for finding in table} == table


def test_a_task_file_in_the_settings_reads_the_same_from_any_directory(tmp_path, monkeypatch):
    """Tune trials run in their own directory (and workers on nodes without the file): the settings carry
    the file's definition, not its relative path."""
    from lxn_ray.training.config import TrainConfig
    from lxn_ray.tuning.settings import TuneSettings

    write(tmp_path / "task.yaml", CUSTOM)
    monkeypatch.chdir(tmp_path)
    tune, train = TuneSettings(task="task.yaml"), TrainConfig(task="task.yaml")
    monkeypatch.chdir(tmp_path.parent)  # the file is not here any more
    assert resolve_task(tune.task) == resolve_task(train.task) == resolve_task(str(tmp_path / "task.yaml"))
    assert portable_task(tune.task) == tune.task  # already portable: unchanged
    assert TrainConfig(task="covid-vs-normal").task == "covid-vs-normal"  # built-in names stay names
    with pytest.raises(TaskError, match="unknown task"):
        TuneSettings(task="task.yaml")


def test_task_file_terms_are_matched_in_any_source_spelling(tmp_path):
    """A term written as a source spells it (a darkcovidnet folder name) matches every spelling."""
    text = "name: covid-vs-none\npositive: [Covid-19]\nnegative: [No_findings]\n"
    task = resolve_task(str(write(tmp_path / "task.yaml", text)))
    assert task.label_of("No Finding") == 0
    assert task.label_of("No_findings") == 0
    assert task.label_of("Pneumonia/Viral/COVID-19") == 1
    assert task.label_of("Pneumonia") is None


def test_negative_rest_in_a_task_file(tmp_path):
    for spelling in ("rest", "[rest]", "Rest"):
        text = f"name: t\npositive: [Pneumonia/Viral/SARS, SARS]\nnegative: {spelling}\n"
        task = resolve_task(str(write(tmp_path / "task.yaml", text)))
        assert task.negative == ("rest",)
        assert task.label_of("Pneumonia/Viral/SARS") == 1
        assert task.label_of("COVID-19") == 0 and task.label_of("No Finding") == 0
        assert task.label_of("todo") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("positive: [covid]\nnegative: [normal]\n", "a task needs a name"),
        ("name: '  '\npositive: [covid]\nnegative: [normal]\n", "a task needs a name"),
        ("name: t\npositive: []\nnegative: [normal]\n", "'positive' must be a non-empty list"),
        ("name: t\npositive: [covid]\n", "'negative' must be a non-empty list"),
        ("name: t\npositive: [covid, '']\nnegative: [normal]\n", "'positive' must be a non-empty list"),
        ("name: t\npositive: [covid, [3]]\nnegative: [normal]\n", "'positive' must be a non-empty list"),
        ("name: t\npositive: [covid, normal]\nnegative: [No_findings]\n", "['normal'] on both sides"),
        ("name: t\npositive: [Covid-19]\nnegative: [COVID-19]\n", "on both sides"),
        ("name: t\npositive: [No_findings]\nnegative: [No Finding]\n", "on both sides"),
        ("name: t\npositive: rest\nnegative: [covid]\n", "'rest'"),
        ("- covid\n- normal\n", "a task is a mapping"),
        ("name: [unclosed\n", "not a readable task file"),
    ],
)
def test_invalid_task_files_raise_task_error(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(TaskError) as raised:
        resolve_task(str(path))
    assert message in str(raised.value)
    if "not a readable" not in message:
        assert str(path) in str(raised.value)  # the message names the file


def test_unknown_task_name():
    with pytest.raises(TaskError, match=r"unknown task 'covid-vs-everything'.*covid-vs-normal"):
        resolve_task("covid-vs-everything")


def test_a_task_error_is_a_value_error():
    assert issubclass(TaskError, ValueError)


def images_table() -> pa.Table:
    findings = [
        "COVID-19",
        "No Finding",
        "Pneumonia/Bacterial/Streptococcus",
        "Tuberculosis",
        "Pneumonia/Viral/COVID-19",
        "todo",
    ]
    return pa.table(
        {
            "filename": [f"f{i}.png" for i in range(len(findings))],
            "finding": findings,
            # the covid-vs-rest label the version recorded (None for the unlabelled row)
            "label": pa.array([1, 0, 0, 0, 1, None], pa.int64()),
            "split": ["train", "train", "val", "test", "test", "train"],
        }
    )


@pytest.mark.parametrize(
    ("task", "kept"),
    [
        ("covid-vs-rest", {"f0.png": 1, "f1.png": 0, "f2.png": 0, "f3.png": 0, "f4.png": 1}),
        ("covid-vs-normal", {"f0.png": 1, "f1.png": 0, "f4.png": 1}),
        ("covid-vs-pneumonia", {"f0.png": 1, "f2.png": 0, "f4.png": 1}),
        (None, {"f0.png": 1, "f1.png": 0, "f2.png": 0, "f3.png": 0, "f4.png": 1}),
    ],
)
def test_for_task_drops_unused_rows_and_sets_labels(task, kept):
    table = dataset.for_task(images_table(), task)
    assert dict(zip(table["filename"].to_pylist(), table["label"].to_pylist(), strict=True)) == kept
    assert table.schema.field("label").type == pa.int64()
    assert table["label"].null_count == 0
    # a version made before sources had names gets the one source it had
    assert set(table["source"].to_pylist()) <= {"ieee8023"} and "source" in table.column_names


def test_for_task_keeps_an_existing_source_column_and_takes_a_task_object(tmp_path):
    images = images_table().append_column("source", pa.array(["a", "b", "a", "b", "a", "b"]))
    task = resolve_task(str(write(tmp_path / "task.yaml", CUSTOM)))
    table = dataset.for_task(images, task)
    assert table.to_pydict()["filename"] == ["f0.png", "f2.png", "f4.png"]
    assert table.to_pydict()["label"] == [1, 0, 1] and table.to_pydict()["source"] == ["a", "a", "a"]
    assert dataset.for_task(images.slice(0, 0), task).num_rows == 0


def test_read_split_applies_the_task(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    dataset.publish(storage, "ds-1", {"images": images_table()}, {}, {"source_version": "s"})
    train = dataset.read_split(storage, None, "train", "covid-vs-normal")
    assert train.to_pydict()["filename"] == ["f0.png", "f1.png"] and train.to_pydict()["label"] == [1, 0]
    test = dataset.read_split(storage, "ds-1", "test", "covid-vs-pneumonia")
    assert test.to_pydict()["filename"] == ["f4.png"]
    assert dataset.read_split(storage, "latest", "val").to_pydict()["label"] == [0]
    with pytest.raises(ValueError, match="unknown split"):
        dataset.read_split(storage, None, "holdout")
    with pytest.raises(TaskError):
        dataset.read_split(storage, None, "train", "no-such-task")


def test_task_dataclass_is_usable_directly():
    task = Task("t", ("Tuberculosis",), ("normal",), "TB", "normal")
    assert task.label_of("Tuberculosis") == 1 and task.label_of("No_findings") == 0
    assert task.label_of("COVID-19") is None
