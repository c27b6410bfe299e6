"""Monitoring end to end: ``serve run serve_config.yaml`` started for real, films like the champion's test
split and then unlike them sent to it, the drift job passing the first window and failing the second, and
Ray's Prometheus endpoint exposing the endpoint's metrics.

One test on purpose (CI time): the application is the repository's own ``serve_config.yaml`` with only
``storage`` and the HTTP port changed, run by the ``serve`` CLI in a child process that joins the test
session's Ray cluster (``RAY_ADDRESS``, as ``ray job submit`` jobs join theirs), so its replica's metrics
go through that node's metrics agent. The champion is a tiny untrained model (``publish_tiny_model``)
whose card names a dataset version of 300 synthetic films (``tests/serve/monitor_films.py``). Its key is
minted into the store, as ``jobs/serve.py --mint-key`` does, so auth stays on as the file says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from lxn_ray import registry
from lxn_ray.cli.monitor import main as monitor_main
from lxn_ray.infra.storage import Storage
from lxn_ray.serving import auth
from lxn_ray.serving.summaries import read_window
from tests.helpers import SUMMARY_FIELDS, free_port, job_env, wait_for
from tests.serve.monitor_films import UNLIKE_CHANGES, like_film, publish_reference_dataset, unlike_film
from tests.serve.test_serve import publish_tiny_model

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE = Path(sys.executable).parent / "serve"
START_DEADLINE = 180  # seconds for `serve run` to answer /healthz (Serve, a replica, TensorFlow, 2 cores)
TIMEOUT = 120  # seconds for any one HTTP request
FILMS = 200  # per window
BATCH = 32  # films per /predict/batch request (max_batch_images)


class ServeRun:
    """``serve run CONFIG`` in its own process group; stopped with SIGINT (serve run then shuts Serve
    down), and killed by its group id if it does not end."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as stream:
            self.process = subprocess.Popen(
                [str(SERVE), "run", str(config)],
                cwd=REPO_ROOT,
                env=job_env(),
                stdout=stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Storage, str, str, ServeRun]]:
    """(the store, the endpoint's URL, an API key, the ``serve run`` process) once /healthz answers."""
    import ray
    from ray import serve

    # the file's replica reserves 1 CPU (cpus_per_replica: 1): say so rather than wait for a placement
    free = ray.available_resources().get("CPU", 0)
    assert free >= 1, f"serve_config.yaml's replica needs 1 CPU; the session's Ray has {free} free"
    storage = Storage.open(str(tmp_path / "store"))
    publish_reference_dataset(storage, [like_film(seed) for seed in range(300)], "ds-test")
    publish_tiny_model(storage, "lxn-a", 32, 0.5, 0, [0.6, 0.8], (1.0, 0.0))  # card: dataset ds-test
    registry.promote(storage, "lxn-a")
    key = auth.mint(storage, "monitor-test")  # before the start: replicas read the key file then
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    (application,) = config["applications"]
    application["args"]["storage"] = storage.uri
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = ServeRun(path, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert run.alive(), f"serve run exited with {run.process.returncode}:\n{run.tail()}"
        try:
            return requests.get(url + "/healthz", timeout=5).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or no replica yet
            return False

    try:
        wait_for(healthy, START_DEADLINE, f"serve run to answer /healthz; its log:\n{run.tail()}", 0.5)
        yield storage, url, key, run
    finally:
        run.stop()
        serve.shutdown()  # in case serve run could not: the next module starts Serve on its own port


def send(session: requests.Session, url: str, films: list[bytes]) -> list[dict]:
    """Score ``films`` through /predict/batch, 32 a request; every request must answer 200."""
    answers: list[dict] = []
    for start in range(0, len(films), BATCH):
        files = [
            ("files", (f"f{i}.png", data, "image/png")) for i, data in enumerate(films[start : start + BATCH])
        ]
        response = session.post(url + "/predict/batch", files=files, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        answers += response.json()
    return answers


def summaries_at_least(storage: Storage, rows: int) -> bool:
    return len(read_window(storage).rows) >= rows


def metric_samples(port: int) -> dict[str, list]:
    """The node's Prometheus exposition, parsed: metric family name -> its samples."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_served_films_drift_job_and_metrics(served, tmp_path, capsys):
    import ray

    storage, url, key, run = served
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    film = like_film(999)
    assert requests.post(url + "/predict", data=film, timeout=TIMEOUT).status_code == 401  # auth is on
    answer = session.post(url + "/predict", data=film, headers={"Content-Type": "image/png"}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "lxn-a" and 0 <= answer.json()["probability"] <= 1

    # 200 films like the test split (and the one above): the replica writes them in batches of 50
    assert len(send(session, url, [like_film(seed) for seed in range(1000, 1000 + FILMS)])) == FILMS
    wait_for(lambda: summaries_at_least(storage, FILMS), 120, f"{FILMS} summaries in storage", 0.2)
    report = tmp_path / "like.json"
    code = monitor_main(["--storage", storage.uri, "--window", str(FILMS), "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    like = json.loads(report.read_text())
    assert like["status"] == "no drift" and like["drifted"] == [] and like["window"]["rows"] == FILMS
    assert like["reference"] == {
        "model_version": "lxn-a",
        "dataset_version": "ds-test",
        "split": "test",
        "task": "covid-vs-normal",
        "films": 300,
        "skipped": 0,
    }
    # what the replica measured is what the reference's function measures: no PHI, only statistics
    (row, *_) = read_window(storage, 1).rows
    assert set(row) == SUMMARY_FIELDS

    # 200 films unlike them: the drift job, as cron runs it, exits 3 naming the statistics that moved
    assert len(send(session, url, [unlike_film(seed) for seed in range(2000, 2000 + FILMS)])) == FILMS
    wait_for(lambda: summaries_at_least(storage, 2 * FILMS), 120, f"{2 * FILMS} summaries in storage", 0.2)
    report = tmp_path / "unlike.json"
    job = subprocess.run(
        [
            sys.executable,
            "jobs/monitor.py",
            "--storage",
            storage.uri,
            "--window",
            str(FILMS),
            "--report",
            str(report),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert job.returncode == 3, job.stdout + job.stderr
    unlike = json.loads(report.read_text())
    assert unlike["status"] == "drift" and set(unlike["drifted"]) == UNLIKE_CHANGES
    first = job.stdout.splitlines()[0]
    assert first.startswith("DRIFT: ") and all(name in first for name in UNLIKE_CHANGES), job.stdout
    print("PSI like:", {k: round(v["psi"], 3) for k, v in like["statistics"].items()})
    print("PSI unlike:", {k: round(v["psi"], 3) for k, v in unlike["statistics"].items()})

    # Ray's Prometheus endpoint on the node: the metrics agent reports every few seconds, so poll
    (node,) = [node for node in ray.nodes() if node["Alive"]]
    port = node["MetricsExportPort"]

    def exported() -> dict[str, list] | None:
        samples = metric_samples(port)
        requests_ = [s for s in samples.get("ray_lxn_requests", []) if s.name == "ray_lxn_requests_total"]
        by = {(s.labels.get("route"), s.labels.get("status")): s.value for s in requests_}
        scored = sum(
            s.value for s in samples.get("ray_lxn_probability", []) if s.name == "ray_lxn_probability_count"
        )
        if (
            by.get(("/predict/batch", "200"), 0) >= 14
            and by.get(("/predict", "401"), 0) >= 1
            and scored >= 401
        ):
            return samples
        return None

    samples = wait_for(exported, 90, "lxn_ray's metrics on the node's Prometheus endpoint", 1.0)
    buckets = [s for s in samples["ray_lxn_probability"] if s.name == "ray_lxn_probability_bucket"]
    assert {s.labels["le"] for s in buckets} >= {"0.1", "0.5", "0.9", "+Inf"}
    assert {s.labels.get("model_version") for s in buckets} >= {"lxn-a"}
    predictions = [s for s in samples["ray_lxn_predictions"] if s.name == "ray_lxn_predictions_total"]
    assert sum(s.value for s in predictions if s.labels["model_version"] == "lxn-a") >= 2 * FILMS + 1
    formats = [s for s in samples["ray_lxn_input_format"] if s.name == "ray_lxn_input_format_total"]
    assert sum(s.value for s in formats if s.labels["format"] == "PNG") >= 2 * FILMS + 1
    for name in ("ray_lxn_input_mean_intensity", "ray_lxn_input_film_fraction", "ray_lxn_input_megapixels"):
        assert any(s.name == f"{name}_count" and s.value >= 2 * FILMS for s in samples[name]), name
    assert run.alive()
