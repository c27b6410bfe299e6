"""The tune job end to end on a tiny synthetic dataset and a real local Ray cluster: ingest-then-search to a
champion, the promotion rule on the same test split (and re-scoring across dataset versions), and
searches that ``--resume`` finishes: one with a crashed trial, one whose driver process was killed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lxn_ray import registry
from lxn_ray.cli.main import tune_main, tune_parser, tune_settings
from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.evaluation.promotion import decide, evaluate_pair
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.transports import FolderSource
from lxn_ray.training.train import registered_epoch
from lxn_ray.tuning.tune import (
    TUNE,
    experiment_name,
    search,
    train_run_name,
)
from tests.helpers import SourceBuilder, job_env
from tests.model.test_train import labelled_source

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # whole jobs: `-m "not slow"` skips

TINY = ["--image-size", "32", "--width", "0.125", "--batch-size", "8"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Storage, dict, Path]:
    """An empty store and one ``tune`` job that ingests a synthetic source first, then searches."""
    root = tmp_path_factory.mktemp("tune")
    source = labelled_source(SourceBuilder(root / "source"))
    storage = Storage.open(str(root / "store"))
    report_path = root / "report.json"
    argv = ["--storage", storage.uri, "--source", str(source), "--num-samples", "2", "--epochs", "1", *TINY]
    assert tune_main([*argv, "--repeats", "1", "--report", str(report_path)]) == 0
    return storage, json.loads(report_path.read_text()), root


def test_search_ingests_registers_and_sets_a_champion(searched):
    storage, report, _ = searched
    version = dataset.latest_version(storage)
    assert report["dataset_version"] == version
    assert report["n_trials"] == 2 and report["trials"]["count"] == 2
    best = report["best"]
    assert {"learning_rate", "rotation", "zoom", "shift", "horizontal_flip", "brightness", "contrast"} <= set(
        best["config"]
    )
    assert 1e-5 <= best["config"]["learning_rate"] <= 1e-2
    assert {"optimizer", "schedule", "architecture", "sampling", "equalization", "trim_borders"} <= set(
        best["config"]
    )  # the default (full) space searches the recipe
    assert 0.0 <= best["val_objective"] <= 1.0
    # --repeats 1: the best config trained again with the next seed, the spread over both runs reported.
    repeats = report["repeats"]
    assert [run["seed"] for run in repeats["runs"]] == [0, 1]
    assert repeats["runs"][0]["model_version"] == best["model_version"]
    assert repeats["runs"][1]["model_version"] in registry.list_versions(storage)
    assert repeats["test_auc"]["n"] == 2 and repeats["test_auc"]["min"] <= repeats["test_auc"]["max"]
    assert report["trials"]["collapsed"] >= 0
    assert set(report["test"]) >= {"auc", "auc_ci", "sensitivity", "specificity", "n"}
    assert report["promoted"] is True and report["promotion_reason"].startswith("no champion yet")
    assert report["task"] == "covid-vs-rest" and report["promotion"]["shortcut"]["fired"] is False
    assert report["champion"] == best["model_version"] == registry.champion(storage)
    card = registry.read_card(storage, best["model_version"])
    assert (
        card["dataset_version"] == version
        and card["config"]["learning_rate"] == best["config"]["learning_rate"]
    )
    assert card["train_run"] == best["train_run"]

    experiment = report["experiment"].rsplit("/", 1)[-1]
    assert storage.exists(f"{TUNE}/{experiment}/search.png")
    assert storage.read_bytes(f"{TUNE}/{experiment}/search.png")[:4] == b"\x89PNG"
    rows = list(csv.DictReader(storage.read_text(f"{TUNE}/{experiment}/trials.csv").splitlines()))
    assert len(rows) == 2
    assert {
        "trial_id",
        "config/learning_rate",
        "objective_best",
        "objective_last",
        "epochs_run",
        "status",
        "seconds",
    } <= (set(rows[0]))
    assert {row["status"] for row in rows} <= {"COMPLETED", "STOPPED"}
    assert best["trial_id"] in {row["trial_id"] for row in rows}
    # Each trial was its own Ray Train run under storage, named after the experiment and trial.
    assert storage.exists(f"runs/{train_run_name(experiment, best['trial_id'])}")


def test_rerunning_a_search_starts_a_new_one_and_resume_continues_the_latest(searched):
    storage, report, _ = searched
    argv = ["--storage", storage.uri, "--num-samples", "2", "--epochs", "1", *TINY]
    first = report["experiment"].rsplit("/", 1)[-1]
    # --resume of a finished search re-reports it without a duplicate model version.
    versions = registry.list_versions(storage)
    resumed = Path(storage.root) / "resumed.json"
    assert tune_main([*argv, "--resume", "--report", str(resumed)]) == 0
    again = json.loads(resumed.read_text())
    assert again["experiment"] == report["experiment"]
    assert again["best"]["model_version"] == report["best"]["model_version"]
    assert registry.list_versions(storage) == versions
    assert again["promoted"] is False and "already the champion" in again["promotion_reason"]
    # The same command again is a new search of the same series, never a clobbered old one.
    rerun = Path(storage.root) / "rerun.json"
    assert tune_main([*argv, "--report", str(rerun)]) == 0
    second = json.loads(rerun.read_text())
    assert second["experiment"].endswith(f"{first}-2")
    assert second["best"]["model_version"] not in versions
    assert second["resources"]["placement_groups_held_after"] == []


def test_promotion_compares_both_models_on_the_same_test_images(searched):
    storage, report, root = searched
    champion = registry.champion(storage)
    version = report["dataset_version"]
    # The champion against itself: the same images and scores, so the paired difference is exactly 0.
    evaluation = evaluate_pair(storage, version, champion, champion, resamples=200)
    assert evaluation["n"] == evaluation["challenger"]["n"] == evaluation["champion"]["n"] > 0
    assert evaluation["basis"].startswith(("pooled AUC", "mean within-source AUC"))
    assert evaluation["difference"] == 0.0 and evaluation["difference_ci"] == [0.0, 0.0]
    promoted, reason = decide(evaluation, champion, champion, margin=None)
    assert not promoted and "already the champion" in reason
    # A difference whose interval includes 0 is noise: tune keeps the champion, retrain's margin does not.
    noisy = {**evaluation, "difference": 0.017, "difference_ci": [-0.05, 0.09]}
    assert decide(noisy, "candidate", champion, margin=None)[0] is False
    assert decide(noisy, "candidate", champion, margin=0.05)[0] is True

    # A newer dataset version: the champion is re-scored on that version's test split before comparing.
    grown = labelled_source(SourceBuilder(root / "source"), patients=20, offset=60)
    new_version = ingest(FolderSource(grown), storage)["dataset_version"]
    assert new_version != version
    again = evaluate_pair(storage, new_version, champion, champion, resamples=200)
    assert again["dataset_version"] == new_version
    assert again["n"] == dataset.read_split(storage, new_version, "test").num_rows
    assert again["champion"]["trained_on"] != new_version


def test_resume_finishes_a_search_with_a_crashed_trial(searched, tmp_path):
    storage, _, _ = searched
    argv = [
        "--storage",
        storage.uri,
        "--num-samples",
        "2",
        "--epochs",
        "2",
        "--no-asha",
        "--seed",
        "7",
        *TINY,
    ]
    settings = tune_settings(tune_parser().parse_args(argv))
    # Every trial's training process dies at the start of epoch 2 until the marker exists: the first one
    # to get there errors (no retries), the other completes; the search still publishes its best.
    marker = tmp_path / "crashed"
    first = search(storage, settings, crash_once={"epoch": 2, "rank": 0, "marker": str(marker)})
    assert marker.exists()
    assert len(first["trials"]["errored"]) >= 1
    crashed = first["trials"]["errored"][0]

    report_path = tmp_path / "resumed.json"
    assert tune_main([*argv, "--resume", "--report", str(report_path)]) == 0
    resumed = json.loads(report_path.read_text())
    assert resumed["trials"]["errored"] == [] and resumed["trials"]["completed"] == 2
    assert resumed["experiment"] == first["experiment"]
    assert resumed["experiment"].endswith(experiment_name(first["dataset_version"], settings))
    # The restarted trial continued its own Ray Train run from the epoch-1 checkpoint.
    import ray.train

    from lxn_ray.training.train import read_checkpoint_state

    run = storage.path(f"runs/{train_run_name(resumed['experiment'].rsplit('/', 1)[-1], crashed)}")
    state = read_checkpoint_state(
        ray.train.Result.from_path(run, storage_filesystem=storage.filesystem).checkpoint
    )
    assert [entry["epoch"] for entry in state["history"]] == [1, 2]
    assert state["resumes"] == 1
    assert isinstance(resumed["promoted"], bool) and resumed["promotion_reason"]


def test_search_whose_driver_is_killed_finishes_with_resume(searched, tmp_path):
    """``python jobs/tune.py`` as its own driver process on the test cluster, killed (SIGKILL) once Ray
    Train has registered a trial's first epoch checkpoint; ``--resume`` then finishes the same experiment,
    and the trial that was cut off continues its own training run instead of starting over."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    storage, _, _ = searched
    argv = ["--storage", storage.uri, "--num-samples", "2", "--epochs", "3", "--seed", "11", "--no-asha"]
    argv += [*TINY, "--max-concurrent", "1"]
    settings = tune_settings(tune_parser().parse_args(argv))
    experiment = experiment_name(dataset.latest_version(storage), settings)
    runs = Path(storage.path("runs"))
    env = job_env()
    driver = subprocess.Popen(
        [sys.executable, "jobs/tune.py", *argv],
        cwd=Path(__file__).parents[2],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(registered_epoch(storage, run.name) for run in runs.glob(f"{experiment}-*")):
            assert driver.poll() is None, "the search ended before it could be interrupted"
            assert time.monotonic() < deadline, "no trial checkpointed within 5 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    assert not storage.exists(f"{TUNE}/{experiment}/trials.csv")  # the search really was cut short

    report_path = tmp_path / "resumed.json"
    assert tune_main([*argv, "--resume", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["experiment"].endswith(experiment)
    assert report["trials"]["count"] == 2 and report["trials"]["completed"] == 2
    assert report["best"]["model_version"] in registry.list_versions(storage)
    import ray.train

    from lxn_ray.training.train import read_checkpoint_state

    resumed_runs = []
    for run in sorted(runs.glob(f"{experiment}-*")):
        result = ray.train.Result.from_path(str(run), storage_filesystem=storage.filesystem)
        state = read_checkpoint_state(result.checkpoint)
        assert [entry["epoch"] for entry in state["history"]] == [1, 2, 3]
        resumed_runs += [run.name] if state["resumes"] else []
    assert len(resumed_runs) == 1  # the interrupted trial resumed; the other started after the restart


def test_tune_without_network_fails_fast_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """The README's main command offline: an unreachable source leaves no empty store nor an empty
    cached clone, and the error names the offline alternative."""
    from tests.helpers import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LXN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LXN_STORAGE", raising=False)
    unreachable = f"http://127.0.0.1:{free_port()}/covid-chestxray-dataset.git"  # nothing listens there
    assert tune_main(["--source", unreachable]) == 1
    err = capsys.readouterr().err
    assert "error: tune failed: SourceError" in err and "Without network, point --source at a local" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no lxn-store/, no cache/
