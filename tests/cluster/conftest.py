"""Fixtures of the cluster tests: one 3-node Ray cluster on this machine (a head with no CPUs and two
worker nodes, :mod:`tests.cluster.local_cluster`) with its storage on the local S3 server, the folder jobs
are submitted from (a copy of the checkout's jobs and package, not the checkout itself), and one labelled
source on S3 ingested once into a store every cluster test shares. They are package-scoped: the cluster's
processes stop when the last test of this folder ends, not at the end of the session, so the rest of the
suite does not share the machine's cores with an idle cluster."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from lxn_ray.data import dataset
from lxn_ray.infra.storage import Storage
from tests.cluster.local_cluster import JobResult, LocalCluster
from tests.helpers import SourceBuilder, free_port
from tests.shared_stores import labelled_source

REPO_ROOT = Path(__file__).resolve().parents[2]
# A tiny LxN (jobs' flags): seconds per epoch on the 60-patient source.
TINY = ["--image-size", "32", "--width", "0.125", "--batch-size", "8"]
WORKERS = {"worker0", "worker1"}


def upload(folder: Path, bucket: str, prefix: str) -> str:
    """``folder`` copied to ``s3://bucket/prefix``; returns that URI."""
    client = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


@dataclass
class Jobs:
    """Submits ``python jobs/<stage>.py`` to the cluster from the submit folder, timing each job."""

    cluster: LocalCluster
    submit_dir: Path
    seconds: dict[str, float]

    def entrypoint(self, stage: str, store: str, *arguments: str) -> list[str]:
        return ["python", f"jobs/{stage}.py", "--storage", store, *arguments]

    def start(self, stage: str, store: str, *arguments: str) -> str:
        """Submit without waiting; the submission id."""
        return self.cluster.submit(self.entrypoint(stage, store, *arguments), self.submit_dir)

    def run(self, stage: str, store: str, *arguments: str) -> JobResult:
        """Submit and wait; fails with the job's logs unless it succeeded."""
        started = time.monotonic()
        result = self.cluster.run(self.entrypoint(stage, store, *arguments), self.submit_dir)
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.monotonic() - started, 1)
        return result


def latest_report(storage: Storage, job: str) -> dict:
    """The newest report ``job`` kept under ``reports/<job>/`` in storage."""
    return storage.read_json(storage.list(f"reports/{job}")[-1])


@pytest.fixture(scope="package")
def submit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user submits from: the jobs and the package, copied out of the checkout (so nothing of the
    submitter's disk but what ``--working-dir .`` uploads reaches the cluster)."""
    folder = tmp_path_factory.mktemp("submit")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("jobs", "lxn_ray"):
        shutil.copytree(REPO_ROOT / name, folder / name, ignore=ignore)
    shutil.copy(REPO_ROOT / "pyproject.toml", folder)
    return folder


@pytest.fixture(scope="package")
def ray_cluster(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The 3-node cluster (head: 0 CPUs; worker0, worker1: 2 CPUs each), its nodes reaching S3 at the
    local server. A test that loses a worker node starts it again before it ends."""
    aws = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    cluster = LocalCluster.start(tmp_path_factory.mktemp("cluster"), extra_env=aws)
    yield cluster
    print(f"cluster jobs (seconds): {cluster.job_seconds}")
    cluster.stop()


@pytest.fixture(scope="package")
def jobs(ray_cluster: LocalCluster, submit_dir: Path) -> Jobs:
    return Jobs(ray_cluster, submit_dir, ray_cluster.job_seconds)


@dataclass
class ClusterStore:
    bucket: str
    source: str  # s3:// URI of the 60-patient labelled source (upstream layout)
    source_folder: Path  # its local original
    store: str  # s3:// URI of the store the source was ingested into
    ingest: JobResult  # that ingest job
    version: str  # the dataset version it published (tests may publish later ones)

    @property
    def storage(self) -> Storage:
        return Storage.open(self.store)


@pytest.fixture(scope="package")
def cluster_store(jobs: Jobs, tmp_path_factory: pytest.TempPathFactory) -> ClusterStore:
    """The labelled source uploaded to a new bucket and ingested by ``jobs/ingest.py`` on the cluster.
    Tests add models to the store; none removes anything, and none changes the source."""
    bucket = f"lxn-cluster-{free_port()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    folder = labelled_source(SourceBuilder(tmp_path_factory.mktemp("cluster-source") / "source"))
    source = upload(folder, bucket, "source")
    store = f"s3://{bucket}/store"
    ingested = jobs.run("ingest", store, "--source", source)
    return ClusterStore(bucket, source, folder, store, ingested, dataset.latest_version(Storage.open(store)))
