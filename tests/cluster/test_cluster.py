"""The whole service on a 3-node Ray cluster with its storage on S3 (:mod:`tests.cluster.conftest`): ingest,
train, evaluate, serve and a retraining tick (the search: :mod:`tests.cluster.test_node_failure`), each
submitted with ``ray job submit --working-dir .`` from a folder that is not the checkout, with where their
work ran read back from Ray's state API; and a local store refused on that cluster before any work starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from lxn_ray import registry
from lxn_ray.data import dataset
from lxn_ray.evaluation import predict
from lxn_ray.infra.storage import Storage
from lxn_ray.serving import auth
from tests.cluster.conftest import TINY, WORKERS, ClusterStore, Jobs, latest_report, upload
from tests.cluster.local_cluster import LocalCluster
from tests.helpers import SourceBuilder, encode, radiograph
from tests.shared_stores import labelled_source

pytestmark = pytest.mark.slow


def placed(cluster: LocalCluster, submission_id: str, *kinds: str) -> set[str]:
    """Names of the nodes where the job's actors and tasks whose names start with one of ``kinds`` ran,
    read from Ray's state API; fails when there were none."""
    job_id = cluster.job_id(submission_id)
    names = cluster.node_names(include_dead=True)
    rows = [(row["class_name"], row) for row in cluster.state("actors", job_id=job_id)]
    rows += [(row["name"], row) for row in cluster.state("tasks", job_id=job_id)]
    nodes = {
        names.get(row["node_id"], "?") for name, row in rows if name.startswith(kinds) and row.get("node_id")
    }
    assert nodes, f"no {kinds} ran for job {submission_id}"
    return nodes


def serve_replicas(cluster: LocalCluster, app: str) -> list[str]:
    """The node names of app ``app``'s live replicas (state API)."""
    names = cluster.node_names()
    actors = cluster.state("actors", state="ALIVE")
    return sorted(
        names.get(a["node_id"], "?") for a in actors if a["class_name"] == f"ServeReplica:{app}:LxnServer"
    )


def assert_published(storage: Storage, report: dict, epochs: int) -> None:
    """A train job's report and what it published in storage: metrics with intervals, the model and its
    card and plots, per-epoch checkpoints, and a model that loads in Keras safe mode from S3."""
    assert report["dataset_version"] == dataset.latest_version(storage)
    for split in ("val", "test"):
        assert set(report[split]) >= {"auc", "accuracy", "sensitivity", "specificity"}
    assert len(report["test"]["auc_ci"]) == 2 and report["test"]["auc_ci"][0] <= report["test"]["auc_ci"][1]
    assert 0.0 <= report["threshold"] <= 1.0
    version = report["model_version"]
    assert report["checkpoint"].endswith(f"models/{version}/model.keras")
    plots = ("plots/training_curves.png", "plots/roc.png", "plots/confusion_test.png")
    for name in ("model.keras", "card.json", *plots):
        assert storage.exists(registry.model_key(version, name)), name
    card = registry.read_card(storage, version)
    assert card["dataset_version"] == report["dataset_version"] and card["threshold"] == report["threshold"]
    assert [entry["epoch"] for entry in card["history"]] == list(range(1, epochs + 1))
    metrics = {"train_loss", "val_loss", "val_auc", "val_sensitivity", "val_specificity"}
    assert metrics <= set(card["history"][0])
    assert "not a diagnostic" in card["intended_use"].lower()
    runs = [key for key in storage.list("runs") if "train-" in key]
    assert any("checkpoint_" in key for run in runs for key in storage.list(run))  # epochs kept on S3
    model = predict.load(storage, version).model  # safe mode
    assert model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 1)


def test_the_service_runs_on_the_cluster_with_its_work_on_the_worker_nodes(
    ray_cluster: LocalCluster, jobs: Jobs, cluster_store: ClusterStore, tmp_path: Path
):
    store, storage = cluster_store.store, cluster_store.storage
    # Ray Data's tasks fetched the S3 source and decoded it on the workers (the head has no CPUs for them)
    assert placed(ray_cluster, cluster_store.ingest.submission_id, "MapBatches") <= WORKERS

    # two data-parallel Train workers, one on each worker node; the run's coordinators on the head
    trained = jobs.run("train", store, *TINY, "--lr", "1e-3", "--epochs", "1", "--workers", "2")
    assert placed(ray_cluster, trained.submission_id, "RayTrainWorker") == WORKERS
    assert placed(ray_cluster, trained.submission_id, "TrainController", "_Step") == {"head"}
    report = latest_report(storage, "train")
    version = report["model_version"]
    assert_published(storage, report, epochs=1)
    # (tune on the cluster: test_node_failure.py's search, which also loses a node)

    other = labelled_source(SourceBuilder(tmp_path / "other"), 16, offset=500)
    held_out = upload(other, cluster_store.bucket, "other")
    jobs.run("evaluate", store, "--model", version, "--source", held_out)  # scores on its driver
    assert latest_report(storage, "evaluate")["n"] == 16

    # two replicas, one per worker node, behind the head's proxy; the model and the API keys read from S3
    key = auth.mint(storage, "cluster-tests")
    port = ray_cluster.serve_port
    serving = ["--model", version, "--detach", "--port", str(port), "--proxy-location", "HeadOnly"]
    jobs.run("serve", store, *serving, "--min-replicas", "2", "--max-replicas", "2")
    try:
        assert serve_replicas(ray_cluster, "lxn") == sorted(WORKERS)
        film = encode(radiograph(7, size=(96, 96)), "PNG")
        url = f"http://127.0.0.1:{port}/predict"
        assert requests.post(url, data=film, timeout=60).status_code == 401
        answer = requests.post(url, data=film, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model_version"] == version
        assert 0.0 <= answer.json()["probability"] <= 1.0
    finally:
        ray_cluster.serve_shutdown()

    # one retraining tick on grown data (a copy of the source with 10 more patients): ingest, train, judge
    grown = SourceBuilder(tmp_path / "grown")
    labelled_source(grown, 70)
    ticked = jobs.run(
        "retrain", store, "--source", upload(grown.root, cluster_store.bucket, "grown"), "--once",
        "--min-new-images", "5", *TINY, "--epochs", "1",
    )  # fmt: skip
    assert placed(ray_cluster, ticked.submission_id, "RayTrainWorker") <= WORKERS
    assert latest_report(storage, "retrain")["decision"] not in ("below-threshold", "error")


def test_a_local_store_is_refused_on_the_cluster_before_any_work(ray_cluster: LocalCluster, tmp_path: Path):
    """``python jobs/train.py --storage /tmp/x`` pointed at the cluster: one error line in seconds that
    says what to use instead, and no folder left behind."""
    folder = tmp_path / "x"
    env = {**ray_cluster.env, "RAY_ADDRESS": f"127.0.0.1:{ray_cluster.gcs_port}"}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "jobs/train.py", "--storage", str(folder), "--epochs", "1"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 1 and len(errors) == 1, run.stderr[-3000:]
    assert "StorageNotShared" in errors[0] and "s3://" in errors[0] and "--shared-storage" in errors[0]
    assert not folder.exists()
    assert seconds < 60, seconds
    print(f"local store refused in {seconds:.1f} s: {errors[0]}")
