"""The tune job end to end on a tiny synthetic dataset and a real local Ray cluster: ingest-then-search to a
champion, the promotion rule on the same test split (and re-scoring across dataset versions), and a
second search of the same series that ``--resume`` finishes twice: once after its driver process was
killed, once after a crashed trial.

The module's searches share one store and run in file order: the second search must run on the first
one's dataset version, before the promotion test ingests a newer one."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lxn_ray import registry
from lxn_ray.cli.registry import main as registry_main
from lxn_ray.cli.tune import main as tune_main
from lxn_ray.cli.tune import make_parser as tune_parser
from lxn_ray.cli.tune import settings as tune_settings
from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.evaluation.promotion import decide, evaluate_pair
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.transports import FolderSource
from lxn_ray.training.runs import registered_epoch
from lxn_ray.tuning.space import TUNE, experiment_name, train_run_name
from lxn_ray.tuning.tune import search
from tests.helpers import SourceBuilder, job_env, mlflow_server, stop_group, wait_for
from tests.shared_stores import labelled_source

TINY = ["--image-size", "32", "--width", "0.125", "--batch-size", "8"]
# Every search of this module: one series. 3 epochs leave a killed driver's trial epochs to resume.
SEARCH = ["--num-samples", "2", "--epochs", "3", "--no-asha", *TINY]


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``mlflow server`` on 127.0.0.1 for the module's first search: (its URI, its process). The
    stop test stops it; the module's later jobs log to the store's own (default) MLflow store."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_uri(mlflow) -> str:
    return mlflow[0]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_local, mlflow_uri) -> tuple[Storage, dict, Path]:
    """An empty store and one ``tune`` job that ingests a synthetic source first, then searches, logging to
    the MLflow server; the module's later jobs log to the store's own (default) MLflow store."""
    root = tmp_path_factory.mktemp("tune")
    source = labelled_source(SourceBuilder(root / "source"))
    storage = Storage.open(str(root / "store"))
    report_path = root / "report.json"
    argv = ["--storage", storage.uri, "--mlflow-uri", mlflow_uri, "--source", str(source), *SEARCH]
    assert tune_main([*argv, "--repeats", "1", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    if registry.champion(storage) is None:  # a model no better than chance: promoted by hand, as a user can
        by_hand = ["--storage", storage.uri, "--mlflow-uri", mlflow_uri, "promote"]
        assert registry_main([*by_hand, report["best"]["model_version"]]) == 0
    return storage, report, root


@pytest.mark.slow  # whole searches: `-m "not slow"` skips them
def test_search_ingests_registers_and_promotes_only_past_the_guard(searched):
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
    # The first model becomes the champion only when it is better than chance (on 9 test films of a tiny
    # model it seldom is): otherwise it stays a candidate, and the summary says so in one line.
    chance = report["test"]["no_better_than_chance"]
    assert report["promoted"] is (not chance)
    if chance:
        assert report["champion"] is None
        assert report["promotion_reason"].startswith(f"{best['model_version']} is no better than chance")
        assert f"`registry promote {best['model_version']}`" in report["promotion_reason"]
    else:
        assert report["promotion_reason"].startswith("no champion yet")
        assert report["champion"] == best["model_version"]
    assert report["task"] == "covid-vs-rest" and report["promotion"]["shortcut"]["fired"] is False
    assert registry.champion(storage) == best["model_version"]  # by hand, where the guard kept it out
    assert report["selection"]["val_positives"] + report["selection"]["val_negatives"] > 0
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
    # Its name: the dataset version and a digest of the settings that decide the trials.
    settings = tune_settings(tune_parser().parse_args(["--storage", storage.uri, *SEARCH]))
    assert experiment == experiment_name(version, settings)


@pytest.mark.slow
def test_the_search_is_in_mlflow_with_its_trials_and_the_champion_alias(searched, mlflow_uri, capsys):
    """One parent run, its two trial runs with their recipes and per-epoch metrics, the best trial's model
    version (metrics, card, plots), the repeat nested beside them, and the registered versions with
    ``champion`` on the version lxn_ray made champion; ``registry list`` names each one's MLflow version."""
    from mlflow import MlflowClient

    storage, report, _ = searched
    client = MlflowClient(mlflow_uri, mlflow_uri)
    experiment = client.get_experiment_by_name("lxn-covid-vs-rest")
    name = report["experiment"].rsplit("/", 1)[-1]
    runs = client.search_runs([experiment.experiment_id], f"tags.`lxn.search` = '{name}'")
    (parent,) = [run for run in runs if run.data.tags["lxn.kind"] == "search"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["dataset_version"] == report["dataset_version"]
    assert parent.data.tags["lxn.best_model_version"] == report["best"]["model_version"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"trials.csv", "search.png"}
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    trials = {run.data.tags["lxn.trial_id"]: run for run in children if run.data.tags["lxn.kind"] == "trial"}
    assert len(trials) == 2 and {run.info.status for run in trials.values()} == {"FINISHED"}
    for trial in trials.values():
        assert {"learning_rate", "optimizer", "task", "dataset_version"} <= set(trial.data.params)
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_auc")]
        assert sorted(steps) == [1, 2, 3]  # every epoch, the epoch as step
        assert "history.json" in {a.path for a in client.list_artifacts(trial.info.run_id)}
    best = trials[report["best"]["trial_id"]]
    assert best.data.params["learning_rate"] == str(report["best"]["config"]["learning_rate"])
    assert best.data.tags["lxn.model_version"] == report["best"]["model_version"]
    assert best.data.metrics["test.auc"] == pytest.approx(report["test"]["auc"])
    assert "baseline.source.auc" in best.data.metrics
    artifacts = {a.path for a in client.list_artifacts(best.info.run_id)}
    assert {"card.json", "plots", "model"} <= artifacts
    assert "plots/roc.png" in {a.path for a in client.list_artifacts(best.info.run_id, "plots")}
    (repeat,) = [run for run in children if run.data.tags["lxn.kind"] == "repeat"]
    assert repeat.data.tags["lxn.model_version"] == report["repeats"]["runs"][1]["model_version"]

    versions = {
        mv.tags["lxn.model_version"]: mv for mv in client.search_model_versions("name = 'lxn-covid-vs-rest'")
    }
    assert set(versions) == set(registry.list_versions(storage))
    champion = client.get_model_version_by_alias("lxn-covid-vs-rest", "champion")
    assert champion.tags["lxn.model_version"] == registry.champion(storage)
    assert champion.run_id == best.info.run_id and champion.source == f"runs:/{best.info.run_id}/model"
    challenger = client.get_model_version_by_alias("lxn-covid-vs-rest", "challenger")
    assert challenger.tags["lxn.model_version"] == report["repeats"]["runs"][1]["model_version"]

    assert registry_main(["--storage", storage.uri, "--mlflow-uri", mlflow_uri, "list"]) == 0
    listed = capsys.readouterr().out
    for version, registered in versions.items():
        assert f"{version}  " in listed and f"MLflow lxn-covid-vs-rest/{registered.version}" in listed


@pytest.mark.slow
def test_a_search_finishes_with_one_warning_when_its_mlflow_server_stops(searched, mlflow, tmp_path):
    """The module's server is stopped once this search's parent run is in it - before any trial has
    trained; the search goes on, publishes its model, exits 0, and says so in one warning line."""
    import sys

    from mlflow import MlflowClient

    storage, _, _ = searched
    uri, server = mlflow
    versions = registry.list_versions(storage)
    client = MlflowClient(uri, uri)
    experiment_id = client.get_experiment_by_name("lxn-covid-vs-rest").experiment_id

    def searches() -> int:
        return len(client.search_runs([experiment_id], "tags.`lxn.kind` = 'search'"))

    before = searches()
    argv = ["--storage", storage.uri, "--num-samples", "1", "--epochs", "1", *TINY]
    driver = subprocess.Popen(
        [sys.executable, "jobs/tune.py", *argv, "--mlflow-uri", uri],
        cwd=Path(__file__).parents[2],
        env=job_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.txt").open("w"),
    )

    def parent_logged() -> bool:
        assert driver.poll() is None, "the search ended before its server could be stopped"
        return searches() > before

    try:
        wait_for(parent_logged, 120, "the search's parent run in MLflow")
        stop_group(server)
        driver.wait(timeout=600)
    finally:
        stop_group(driver)
    err = (tmp_path / "stderr.txt").read_text()
    assert driver.returncode == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if "MLflow tracking at" in line]
    assert len(warnings) == 1 and "the job goes on without it" in warnings[0], warnings
    assert len(registry.list_versions(storage)) == len(versions) + 1  # published all the same


@pytest.mark.slow
def test_resume_of_a_finished_search_reports_it_again(searched):
    storage, report, _ = searched
    argv = ["--storage", storage.uri, *SEARCH]
    # --resume of a finished search re-reports it without a duplicate model version.
    versions = registry.list_versions(storage)
    resumed = Path(storage.root) / "resumed.json"
    assert tune_main([*argv, "--resume", "--report", str(resumed)]) == 0
    again = json.loads(resumed.read_text())
    assert again["experiment"] == report["experiment"]
    assert again["best"]["model_version"] == report["best"]["model_version"]
    assert registry.list_versions(storage) == versions
    assert again["promoted"] is False and "already the champion" in again["promotion_reason"]


@pytest.mark.slow
def test_a_rerun_is_a_new_search_that_resume_finishes_after_a_killed_driver_and_a_crashed_trial(
    searched, tmp_path, monkeypatch
):
    """The fixture's command again (``python jobs/tune.py`` as its own driver process, one trial at a
    time) is a new search of the same series. Its driver is killed (SIGKILL) once Ray Train has
    registered a trial's first epoch checkpoint; ``--resume`` with a trial crashing at the start of
    epoch 2 (no retries) still publishes its best; ``--resume`` again finishes the search. Each cut-off
    trial continues its own training run from its last checkpoint instead of starting over."""
    import os
    import signal
    import subprocess
    import sys

    import ray.train

    from lxn_ray.training.runs import read_checkpoint_state

    storage, report, _ = searched
    monkeypatch.delenv("LXN_MLFLOW_URI")  # tracked in the store's own MLflow store, as by default
    argv = ["--storage", storage.uri, *SEARCH, "--max-concurrent", "1"]
    settings = tune_settings(tune_parser().parse_args(argv))
    first = report["experiment"].rsplit("/", 1)[-1]
    first_trials = storage.read_bytes(f"{TUNE}/{first}/trials.csv")
    versions = registry.list_versions(storage)
    # The same command again is a new search of the same series, never a clobbered old one.
    experiment = f"{first}-2"
    runs = Path(storage.path("runs"))

    def a_checkpointed_run() -> str | None:
        assert driver.poll() is None, "the search ended before it could be interrupted"
        return next(
            (run.name for run in runs.glob(f"{experiment}-*") if registered_epoch(storage, run.name)), None
        )

    driver = subprocess.Popen(
        [sys.executable, "jobs/tune.py", *argv],
        cwd=Path(__file__).parents[2],
        env=job_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cut = wait_for(a_checkpointed_run, 300, "a trial's first epoch checkpoint", 0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    assert not storage.exists(f"{TUNE}/{experiment}/trials.csv")  # the search really was cut short
    assert storage.read_bytes(f"{TUNE}/{first}/trials.csv") == first_trials  # the first one untouched

    # Every trial's training process dies at the start of epoch 2 until the marker exists: the first one
    # to get there errors (no retries), the other completes; the search still publishes its best.
    marker = tmp_path / "crashed"
    crashed = search(
        storage, settings, resume=True, crash_once={"epoch": 2, "rank": 0, "marker": str(marker)}
    )
    assert marker.exists()
    assert crashed["experiment"].endswith(experiment) and len(crashed["trials"]["errored"]) == 1
    assert crashed["trials"]["completed"] == 1
    assert crashed["best"]["model_version"] in registry.list_versions(storage)
    assert crashed["best"]["model_version"] not in versions
    assert crashed["resources"]["placement_groups_held_after"] == []

    report_path = tmp_path / "resumed.json"
    assert tune_main([*argv, "--resume", "--report", str(report_path)]) == 0
    resumed = json.loads(report_path.read_text())
    assert resumed["trials"]["errored"] == [] and resumed["trials"]["completed"] == 2
    assert resumed["trials"]["count"] == 2
    assert resumed["experiment"] == crashed["experiment"]
    assert resumed["experiment"].endswith(experiment_name(report["dataset_version"], settings) + "-2")
    assert resumed["best"]["model_version"] in registry.list_versions(storage)
    assert resumed["resources"]["placement_groups_held_after"] == []
    assert isinstance(resumed["promoted"], bool) and resumed["promotion_reason"]
    # Tracked in the store's own MLflow store (no --mlflow-uri): one parent run for the search and one run per
    # trial, each taken up again by the resumes, with every epoch logged.
    from mlflow import MlflowClient

    database = f"sqlite:///{storage.path('mlflow/mlflow.db')}"
    client = MlflowClient(database, database)
    ids = [client.get_experiment_by_name("lxn-covid-vs-rest").experiment_id]
    (parent,) = client.search_runs(ids, f"tags.`lxn.search` = '{experiment}' and tags.`lxn.kind` = 'search'")
    assert parent.info.status == "FINISHED"
    trials = client.search_runs(ids, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 2 and {run.info.status for run in trials} == {"FINISHED"}
    for trial in trials:
        assert {m.step for m in client.get_metric_history(trial.info.run_id, "val_auc")} == {1, 2, 3}

    # The trial cut off by the kill and the crashed one (the same trial, or not) each continued their own
    # Ray Train run from a checkpoint; a trial that started after the restarts never resumed.
    continued = {cut, train_run_name(experiment, crashed["trials"]["errored"][0])}
    for run in sorted(runs.glob(f"{experiment}-*")):
        result = ray.train.Result.from_path(str(run), storage_filesystem=storage.filesystem)
        state = read_checkpoint_state(result.checkpoint)
        assert [entry["epoch"] for entry in state["history"]] == [1, 2, 3], run.name
        assert state["resumes"] == (1 if run.name in continued else 0), run.name


@pytest.mark.slow
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
    better = {**evaluation["challenger"], "auc": 0.8, "auc_ci": [0.7, 0.9]}  # past the chance guard
    noisy = {**evaluation, "difference": 0.017, "difference_ci": [-0.05, 0.09], "challenger": better}
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
