"""Training and evaluation end to end on a tiny synthetic dataset: a real local Ray cluster, two
data-parallel workers, a worker killed mid-run, an interrupted job rerun, and the evaluation job."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from lxn_ray import registry
from lxn_ray.cli.evaluate import main as evaluate_main
from lxn_ray.cli.train import main as train_main
from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.evaluation import predict
from lxn_ray.infra.storage import Storage
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.train import train
from tests.helpers import copy_store, radiograph
from tests.shared_stores import TINY, labelled_source  # other test modules import both from here

# Every test but the GPU-request one trains on the session's real Ray cluster (its fixtures start it): those
# are marked `slow`, which `-m "not slow"` skips.


@pytest.fixture(scope="module")
def store(labelled_store, tmp_path_factory) -> Storage:
    """The session's 60-patient store, copied: this module's tests train into it, one after another."""
    return Storage.open(str(copy_store(labelled_store, tmp_path_factory.mktemp("train") / "store")))


@pytest.mark.slow
def test_bfloat16_trains_and_publishes_a_model_that_computes_as_validated(trained_store):
    # The session's shared tiny model: one epoch in bfloat16 (tests/shared_stores.py).
    store, published = Storage.open(str(trained_store.store)), trained_store.report
    card = registry.read_card(store, published["model_version"])
    assert card["config"]["precision"] == "bfloat16" and card["history"][0]["precision"] == "bfloat16"
    assert card["precision"]["training"] == "bfloat16" and card["precision"]["inference"] == "bfloat16"
    assert card["history"][0]["train_loss"] > 0
    model = predict.load(store, published["model_version"]).model  # computes as it was validated
    assert model.get_layer("block1_conv1").dtype_policy.name == "mixed_bfloat16"
    probabilities = model.predict(np.full((2, 32, 32, 3), 0.5, np.float32), verbose=0)
    assert probabilities.dtype == np.float32 and np.all((probabilities >= 0) & (probabilities <= 1))


@pytest.mark.slow
def test_a_searched_recipe_trains_is_recorded_and_scores_with_its_own_preprocessing(store, tiny_segmenter):
    from lxn_ray.evaluation.predict import score_registered, segmenter_finder
    from lxn_ray.images.decode import decode_image, to_grayscale
    from lxn_ray.images.preprocess import PreprocessConfig

    # Lung fields found by a segmenter of the store, blanked outside: in the pixel cache the workers train
    # on, in publishing's scoring, and in promotion's rescoring below - the same pixels everywhere.
    segmenter = tiny_segmenter.copy_into(Path(store.root))
    first = store.read_bytes(dataset.read_split(store, None, "test").column("image_key")[0].as_py())
    gray = np.asarray(to_grayscale(decode_image(first).image))
    assert 0.05 < segmenter_finder(store.uri, segmenter)(gray).mean() < 0.95  # it blanks part of each film
    preprocessing = PreprocessConfig(trim_borders=True, equalization="clahe", lungs="mask")
    config = TrainConfig(
        **TINY,
        epochs=3,
        optimizer="adamw",
        schedule="cosine",
        warmup_epochs=1,
        patience=1,
        sampling="source-balanced",
        architecture="lxn-bn",
        preprocessing=preprocessing,
        precision="auto",
        workers=2,  # lxn-bn's batch normalisation synchronised over two workers
    )
    published = train(store, None, config)
    card = registry.read_card(store, published["model_version"])
    # the card names the segmenter the run resolved (the store's newest), and everything else it measured
    config = dataclasses.replace(
        config, preprocessing=dataclasses.replace(preprocessing, segmenter=segmenter)
    )
    assert TrainConfig.from_dict(card["config"]) == config
    assert f"lungs mask ({segmenter})" in published["recipe"]
    assert card["saliency"]["measured"] and card["saliency"]["segmenter"] == segmenter
    assert 0 <= card["saliency"]["mean"] <= 1 and card["saliency"]["n"] == card["test"]["n"]
    assert card["calibration"]["slope"] > 0 and card["calibration"]["test"]["n"] == card["test"]["n"]
    assert set(card["baselines"]["baselines"]) == {"source", "view", "format and size", "bits per pixel"}
    assert store.exists(f"models/{published['model_version']}/plots/reliability.png")
    assert "lxn-bn, adamw" in published["recipe"] and "trim+clahe" in published["recipe"]
    assert card["precision"]["training"] in ("bfloat16", "float32") and not card["collapsed"]
    assert 1 <= card["epochs_run"] <= 3 and card["history"][-1]["stop"] in (None, "early stopping")
    rates = [entry["learning_rate"] for entry in card["history"]]
    assert rates == sorted(rates, reverse=True)  # cosine decay after the warm-up epoch
    reference = registry.resolve(store, published["model_version"])
    assert reference.preprocessing == config.preprocessing
    # Promotion rescoring sees the test split through the model's own preprocessing: the published
    # test AUC is reproduced exactly.
    labels, scores, _, _ = score_registered(
        store, published["model_version"], card["dataset_version"], "test"
    )
    from lxn_ray.evaluation import metrics

    assert metrics.binary_metrics(labels, scores, card["threshold"]).auc == pytest.approx(card["test"]["auc"])


@pytest.mark.slow
def test_evaluate_job_scores_a_folder_with_subgroups_and_overlap(
    trained_store, tmp_path, source_builder, capsys
):
    # The session's shared tiny model, in a copy of its store (the job writes its report there).
    store = Storage.open(str(copy_store(trained_store.store, tmp_path / "store")))
    trained = trained_store.report
    builder = source_builder("hospital")
    root = labelled_source(builder, patients=20, offset=500)
    # re-publish two training images in the external folder: they must be counted as overlap
    train_rows = dataset.read_split(store, trained["dataset_version"], "train").to_pylist()[:2]
    for row in train_rows:
        (root / "images" / f"copy-{row['filename']}").write_bytes(store.read_bytes(row["image_key"]))
        builder.add(f"copy-{row['filename']}", "ext-copy", finding="COVID-19" if row["label"] else "SARS")
    builder.add("broken.png", "ext-9", image=b"not an image")
    builder.write()
    report_path = tmp_path / "e.json"
    code = evaluate_main(
        [
            "--storage",
            store.uri,
            "--model",
            trained["model_version"],
            "--source",
            str(root),
            "--report",
            str(report_path),
        ]
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == 22 and report["positives"] == 10 + sum(r["label"] for r in train_rows)
    assert report["overlap_with_training"] == 2
    unseen = report["not_overlapping"]["pooled"]  # the same metrics without the two copies
    assert unseen["n"] == 20 and unseen["positives"] == 10
    out = capsys.readouterr().out
    assert "all films" in out and re.search(r"not in training +n=20 \(10 positive\)", out)
    assert report["threshold"] == trained["threshold"]
    assert {e["filename"]: e["reason"] for e in report["exclusions"]} == {"broken.png": "unreadable_image"}
    assert set(report["subgroups"]) >= {"view", "sex", "location"}
    assert set(report["subgroups"]["view"]) == {"PA", "AP"}
    with open(report["predictions"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 22
    assert {"filename", "patient_id", "label", "probability", "predicted_label", "location"} <= set(rows[0])
    assert all(0.0 <= float(row["probability"]) <= 1.0 for row in rows)


def _two_source_store(root: Path) -> Storage:
    """ieee8023-like COVID-19 films (upstream layout) and an archive of no-finding films in class folders:
    the mix in which a model can score by telling the archives apart."""
    from lxn_ray.sources.layouts import SourceSpec
    from tests.helpers import SourceBuilder

    builder = SourceBuilder(root / "ieee")
    for i in range(30):
        finding = "COVID-19" if i % 3 else "No Finding"
        builder.add(f"c{i}.png", f"pc{i}", finding=finding, image=radiograph(2000 + i, size=(80, 80)))
    builder.write()
    archive = root / "archive"
    for folder, count in (("No_findings", 24), ("Covid-19", 6)):
        (archive / folder).mkdir(parents=True)
        for i in range(count):
            radiograph(3000 + i + 100 * len(folder), size=(72, 72)).save(
                archive / folder / f"{i:08d}_000.png"
            )
    storage = Storage.open(str(root / "store"))
    specs = [
        SourceSpec("ieee8023", str(root / "ieee"), layout="upstream"),
        SourceSpec("archive", str(archive), layout="class-folders", patient_id_pattern=r"^(\d{8})_"),
    ]
    ingest(specs, storage)
    return storage


def _tiny_task_argv(storage: Storage, report_path: Path) -> list[str]:
    """Flags of a one-epoch covid-vs-normal run of a tiny LxN."""
    return [
        *(
            "--storage",
            storage.uri,
            "--task",
            "covid-vs-normal",
            "--epochs",
            "1",
            "--report",
            str(report_path),
        ),
        *("--image-size", "32", "--width", "0.125", "--batch-size", "8"),
    ]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, ray_local) -> Storage:
    return _two_source_store(tmp_path_factory.mktemp("two-sources"))


@pytest.mark.slow
def test_a_task_on_two_sources_records_per_source_metrics_and_the_shortcut_check(two_sources, tmp_path):
    storage = two_sources
    report_path = tmp_path / "t.json"
    assert train_main(_tiny_task_argv(storage, report_path)) == 0
    report = json.loads(report_path.read_text())
    card = registry.read_card(storage, report["model_version"])
    assert card["task"]["name"] == "covid-vs-normal" and card["label_names"] == {
        "1": "COVID-19",
        "0": "no finding",
    }
    test = card["sources"]["test"]
    assert set(test["per_source"]) <= {"ieee8023", "archive"} and test["pooled"]["n"] == card["test"]["n"]
    assert set(test["within_source"]) <= set(test["per_source"])
    assert {"rule", "fired", "classes", "skipped"} <= set(test["shortcut"])
    assert set(test["shortcut"]["classes"]) == {"COVID-19", "no finding"}
    assert isinstance(card["test"]["no_better_than_chance"], bool)
    counts = card["split_counts"]
    assert sum(counts[s]["images"] for s in ("train", "val", "test")) == 30 + 30
    assert any("(< 20)" in warning for warning in card["warnings"])  # tiny splits are flagged
    # every film the task does not use (none here) and every film it does is in exactly one split
    assert counts["train"]["by_source"]["archive"]["no finding"] > 0


@pytest.mark.slow
def test_leave_one_source_out_scores_each_source_with_a_model_that_never_saw_it(two_sources, tmp_path):
    from lxn_ray.cli.loso import main as loso_main

    report_path = tmp_path / "loso.json"
    assert loso_main(_tiny_task_argv(two_sources, report_path)) == 0
    report = json.loads(report_path.read_text())
    champion = registry.champion(two_sources)
    assert [fold["held_out"] for fold in report["folds"]] == ["archive", "ieee8023"]
    for fold in report["folds"]:
        card = registry.read_card(two_sources, fold["model_version"])
        assert card["config"]["sources"] == fold["trained_on"] and fold["held_out"] not in fold["trained_on"]
        held = fold["held_out_metrics"]
        every = dataset.read_split(two_sources, None, None, "covid-vs-normal", [fold["held_out"]])
        assert held["n"] == every.num_rows and held["positives"] == sum(every.column("label").to_pylist())
        assert set(card["sources"]["test"]["per_source"]) <= set(fold["trained_on"])
        assert fold["model_version"] != champion  # never promoted
