"""Shared fixtures: a real local Ray instance, a real S3-compatible server on 127.0.0.1, the real ieee8023
bundle, and synthetic sources on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import SourceBuilder, copy_store, free_port  # noqa: F401 (copy_store: re-exported)

# Session-scoped stores and trained tiny models that several test modules share (tests/shared_stores.py).
pytest_plugins = ["tests.shared_stores"]

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE = REPO_ROOT.parent / "shared" / "data" / "ieee8023.bundle"


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Block until ``url`` answers (any HTTP status), failing fast if ``process`` died."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"server for {url} exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s} s") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, named by ``AWS_ENDPOINT_URL`` (with dummy credentials) for this
    process and - because Ray starts after it - for every Ray worker. AWS itself is never reached."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(endpoint, server)
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield endpoint
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.terminate()
    server.wait()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the local S3 server."""
    import boto3

    name = f"lxn-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def http_server() -> Iterator[Callable[[Path], str]]:
    """``serve(folder)`` -> the base URL of ``python -m http.server`` serving ``folder`` on 127.0.0.1."""
    servers: list[subprocess.Popen] = []

    def serve(folder: Path) -> str:
        port = free_port()
        command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory"]
        server = subprocess.Popen(
            [*command, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        servers.append(server)
        base = f"http://127.0.0.1:{port}/"
        wait_for_http(base, server)
        return base

    yield serve
    for server in servers:
        server.terminate()
        server.wait()


@pytest.fixture(scope="session", autouse=True)
def no_mlflow_unless_asked() -> Iterator[None]:
    """MLflow tracking off for the session's jobs (``LXN_MLFLOW_URI=off``): creating an MLflow store costs
    a few seconds per store, and most tests are about something else. The tracking tests ask for it - a
    job's ``--mlflow-uri``, or the default store with the variable removed (``monkeypatch.delenv``)."""
    previous = os.environ.get("LXN_MLFLOW_URI")
    os.environ["LXN_MLFLOW_URI"] = "off"
    yield
    if previous is None:
        os.environ.pop("LXN_MLFLOW_URI", None)
    else:
        os.environ["LXN_MLFLOW_URI"] = previous


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[None]:
    """One real local Ray instance for the whole test session (2 CPUs, like CI). It starts after the S3
    server so its workers inherit ``AWS_ENDPOINT_URL``."""
    import ray

    # A new instance even when `ray start` left a cluster running here ("local"), with its dashboard as
    # `ray start` runs it: Ray Train frees a stopped Tune trial's workers through the dashboard's State API.
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def bundle() -> Path:
    if not BUNDLE.is_file():
        pytest.skip(f"real data absent: {BUNDLE} (only the project's CI checkout has ../shared)")
    return BUNDLE


@pytest.fixture(scope="session")
def bundle_checkout(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``checkout("2020-04-20")`` -> a clone of the bundle with that snapshot checked out (cached)."""
    clones: dict[str, Path] = {}

    def checkout(date: str) -> Path:
        if date not in clones:
            target = tmp_path_factory.mktemp(f"ieee8023-{date}")
            subprocess.run(["git", "clone", "-q", str(bundle), str(target / "src")], check=True)
            subprocess.run(
                ["git", "-C", str(target / "src"), "checkout", "-q", f"snapshot-{date}"], check=True
            )
            clones[date] = target / "src"
        return clones[date]

    return checkout


@pytest.fixture
def source_builder(tmp_path: Path) -> Callable[[str], SourceBuilder]:
    return lambda name="source": SourceBuilder(tmp_path / name)


@pytest.fixture(scope="session")
def snapshot_2020_04_20(
    bundle_checkout: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory, ray_local: None
) -> tuple[Path, dict]:
    """The 2020-04-20 snapshot ingested once per session: (its store's folder, the ingest report as
    JSON would carry it). Read-only: a test that writes to the store works on a copy
    (:func:`tests.helpers.copy_store`)."""
    from lxn_ray.data.ingest import ingest
    from lxn_ray.infra.storage import Storage
    from lxn_ray.sources.transports import FolderSource

    folder = tmp_path_factory.mktemp("snapshot-2020-04-20") / "store"
    report = ingest(FolderSource(bundle_checkout("2020-04-20")), Storage.open(str(folder)))
    return folder, json.loads(json.dumps(report, default=str))
