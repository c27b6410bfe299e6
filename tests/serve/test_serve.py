"""The Serve endpoint end to end: a real local Ray, real Serve applications, real HTTP on 127.0.0.1.

Tiny LxN models (32 and 36 px, untrained) are published straight into a temporary store, as
jobs/train.py would publish them, so no training runs here. One module-scoped Serve instance holds a
champion-following application at ``/`` and a pinned one at ``/pinned``; it is shut down at the end so
other test modules see a plain Ray instance.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from lxn_ray import registry
from lxn_ray.cli import serve_main
from lxn_ray.explain import display_size, jet
from lxn_ray.imaging import ImageRejected
from lxn_ray.serve import (
    RESEARCH_NOTE,
    InputError,
    ServeSettings,
    build_app,
    deploy,
    parse_multipart,
    rejected_image,
)
from lxn_ray.storage import Storage
from tests.helpers import encode, free_port, huge_png, own_stderr_lines, radiograph

pytestmark = pytest.mark.usefixtures("ray_local")

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # seconds for any single HTTP request (a 2-core CI machine under load)
SWITCH_DEADLINE = 60  # seconds for a replica to move to a new champion (polls every 0.5 s)
# (version, image size, threshold): b has another input size, so a swap also changes preprocessing.
MODELS = (("lxn-a", 32, 0.5), ("lxn-b", 36, 0.45), ("lxn-c", 32, 0.55))


def publish_tiny_model(storage: Storage, version: str, image_size: int, threshold: float, seed: int) -> None:
    """A model version as jobs/train.py's publish_model_version writes it: model.keras, then card.json."""
    import keras

    from lxn_ray.model import ModelConfig, build_lxn, save_model

    keras.utils.set_random_seed(seed)
    config = ModelConfig(image_size=image_size, width=0.125)
    model = build_lxn(config)
    path = save_model(model, Path(storage.root) / "tmp" / f"{version}.keras")
    storage.write_bytes(registry.model_key(version, "model.keras"), path.read_bytes())
    test = {"auc": 0.5, "accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5, "auc_ci": [0.4, 0.6]}
    storage.write_json(
        registry.model_key(version, "card.json"),
        {
            "model_version": version,
            "model": "LxN (Umer et al., 2020)",
            "intended_use": "Research only. Not a diagnostic device; not validated for clinical use.",
            "dataset_version": "ds-test",
            "config": {"image_size": image_size, "width": 0.125, "task": "covid-vs-normal"},
            "task": {"name": "covid-vs-normal"},
            "label_names": {"1": "COVID-19", "0": "no finding"},
            "conv_padding": config.conv_padding,
            "parameters": int(model.count_params()),
            "threshold": threshold,
            "threshold_rule": "Youden's J (max sensitivity + specificity - 1) on the validation split",
            "val": {"auc": 0.5},
            "test": {**test, "n": 10, "positives": 5, "confusion": [[2, 3], [2, 3]]},
        },
    )


@dataclass(frozen=True)
class Endpoint:
    storage: Storage
    port: int
    url: str  # follows the champion
    pinned_url: str  # pinned to lxn-a


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Iterator[Endpoint]:
    from ray import serve

    storage = Storage.open(str(tmp_path_factory.mktemp("serve") / "store"))
    for seed, (version, size, threshold) in enumerate(MODELS):
        publish_tiny_model(storage, version, size, threshold, seed)
    registry.promote(storage, "lxn-a")
    port = free_port()
    small = dict(storage=storage.uri, port=port, cpus_per_replica=0, max_replicas=1, poll_seconds=0.5)
    try:
        deploy(ServeSettings(**small))
        deploy(ServeSettings(**small, model="lxn-a", app_name="lxn-pinned", route_prefix="/pinned"))
        yield Endpoint(storage, port, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/pinned")
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def local_model() -> Callable[[Storage, str], object]:
    """The same model version loaded in this process, to check the endpoint's numbers against."""
    cache: dict[str, object] = {}

    def load(storage: Storage, version: str):
        if version not in cache:
            cache[version] = registry.resolve(storage, version).load()
        return cache[version]

    return load


def post_image(url: str, data: bytes, content_type: str = "image/png", path: str = "/predict"):
    return requests.post(url + path, data=data, headers={"Content-Type": content_type}, timeout=TIMEOUT)


def assert_answers(url: str) -> dict:
    """A normal request right after anything else: the replica still answers."""
    response = post_image(url, encode(radiograph(7), "PNG"))
    assert response.status_code == 200, response.text
    return response.json()


def local_probability(model, data: bytes) -> float:
    from lxn_ray.preprocess import preprocess_bytes

    size = int(model.input_shape[1])
    return float(np.asarray(model(preprocess_bytes(data, size)[np.newaxis], training=False))[0, 0])


# -- predictions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["raw-png", "raw-jpeg", "multipart-png", "multipart-jpeg-no-type"])
def test_predict_matches_the_model_run_locally(endpoint, local_model, how):
    image = radiograph(1)
    data = encode(image, "JPEG", quality=90) if "jpeg" in how else encode(image, "PNG")
    if how.startswith("raw"):
        response = post_image(endpoint.url, data, "image/jpeg" if "jpeg" in how else "image/png")
    else:
        part = ("x.png", data, "image/png") if how == "multipart-png" else ("x.jpg", data)
        response = requests.post(endpoint.url + "/predict", files={"file": part}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"probability", "label", "threshold", "model_version", "task"}
    version = answer["model_version"]
    assert response.headers["X-Model-Version"] == version
    assert answer["threshold"] == registry.read_card(endpoint.storage, version)["threshold"]
    # Same bytes, same preprocessing function, same weights: the same number (no train/serve skew).
    expected = local_probability(local_model(endpoint.storage, version), data)
    assert answer["probability"] == pytest.approx(expected, abs=1e-5)
    # the label names are the model's task's (its card's label_names)
    names = registry.read_card(endpoint.storage, version)["label_names"]
    assert answer["task"] == "covid-vs-normal"
    assert answer["label"] == (names["1"] if answer["probability"] >= answer["threshold"] else names["0"])


def test_predict_batch_answers_in_order(endpoint):
    images = [encode(radiograph(seed, size=(200 + 40 * seed, 260)), "PNG") for seed in range(6)]
    files = [("files", (f"x{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = requests.post(endpoint.pinned_url + "/predict/batch", files=files, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    batch = response.json()
    assert len(batch) == len(images)
    singles = [post_image(endpoint.pinned_url, data).json() for data in images]
    assert [a["probability"] for a in batch] == pytest.approx([s["probability"] for s in singles], abs=1e-5)
    assert len({a["probability"] for a in batch}) == len(images)  # distinct images, so order is tested
    assert {a["model_version"] for a in batch} == {"lxn-a"}

    files[3] = ("files", ("broken.png", images[3][:100], "image/png"))
    response = requests.post(endpoint.pinned_url + "/predict/batch", files=files, timeout=TIMEOUT)
    assert response.status_code == 400
    assert "image 3 (broken.png)" in response.json()["error"]
    assert_answers(endpoint.pinned_url)


def test_explain_draws_the_heat_map_over_the_radiograph(endpoint, local_model):
    from lxn_ray.explain import GradCam
    from lxn_ray.preprocess import preprocess_bytes

    image = radiograph(3, size=(320, 384))
    data = encode(image, "PNG")
    response = post_image(endpoint.pinned_url, data, path="/explain")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG" and picture.mode == "RGB"
    assert picture.size == display_size(*image.size) == (320, 384)

    model = local_model(endpoint.storage, "lxn-a")
    explanation = GradCam(model)(preprocess_bytes(data, 32))
    assert float(response.headers["X-Probability"]) == pytest.approx(explanation.probability, abs=1e-5)
    pixels = np.asarray(picture, dtype=np.float32)[80:]  # below the caption band
    cam = Image.fromarray(explanation.heatmap, mode="F").resize(picture.size, Image.BILINEAR)
    plain_heat_map = jet(np.asarray(cam)).astype(np.float32)[80:]
    assert np.abs(pixels - plain_heat_map).mean() > 20  # not just the heat map...
    film = np.asarray(image, dtype=np.float32)[80:]
    assert np.corrcoef(pixels.mean(axis=2).ravel(), film.ravel())[0, 1] > 0.5  # ...the film shows through


def test_a_model_of_another_task_is_refused(endpoint):
    from lxn_ray.serve import load_model_version

    with pytest.raises(ValueError, match="is for task covid-vs-normal, not covid-vs-rest"):
        load_model_version(endpoint.storage, "lxn-a", task="covid-vs-rest")
    assert load_model_version(endpoint.storage, "lxn-a", task="covid-vs-normal").version == "lxn-a"


def test_health_model_card_and_docs(endpoint):
    health = requests.get(endpoint.url + "/healthz", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    card = requests.get(endpoint.url + "/model", timeout=TIMEOUT).json()
    assert card["serving"] == "champion" and card["intended_use"] == RESEARCH_NOTE
    assert card["card"]["model_version"] == card["model_version"]
    assert card["image_size"] == card["card"]["config"]["image_size"]
    assert card["no_better_than_chance"] is True  # its test AUC interval [0.4, 0.6] includes 0.5
    pinned = requests.get(endpoint.pinned_url + "/model", timeout=TIMEOUT).json()
    assert pinned["serving"] == "pinned" and pinned["model_version"] == "lxn-a"
    docs = requests.get(endpoint.url + "/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = requests.get(endpoint.url + "/openapi.json", timeout=TIMEOUT).json()["paths"]
    assert {"/predict", "/predict/batch", "/explain", "/healthz", "/model"} <= set(paths)
    assert "image/png" in paths["/predict"]["post"]["requestBody"]["content"]
    missing = requests.get(endpoint.url + "/nowhere", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}


# -- hostile input ------------------------------------------------------------------------------------
def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    """A body with no Content-Length (chunked transfer), ``total`` bytes of zeros."""
    for start in range(0, total, size):
        yield b"\0" * min(size, total - start)


def _png() -> bytes:
    return encode(radiograph(5), "PNG")


def _raw(data: bytes | Iterator[bytes], content_type: str | None = "image/png") -> dict:
    return {"data": data, "headers": {"Content-Type": content_type} if content_type else {}}


# case -> (expected status, the request's keyword arguments, built when the case runs)
BAD_INPUTS: dict[str, tuple[int, Callable[[], dict]]] = {
    "not-an-image": (400, lambda: _raw(b"hello, not an image")),
    "truncated": (400, lambda: _raw(_png()[: len(_png()) // 2])),
    "empty-body": (400, lambda: _raw(b"")),
    "over-20mb": (413, lambda: _raw(b"\0" * (20 * 1024 * 1024 + 1), "image/jpeg")),
    "over-20mb-chunked": (413, lambda: _raw(_chunks(21 * 1024 * 1024))),
    "over-50-megapixels": (413, lambda: _raw(huge_png(8000, 6300))),
    "text-plain": (415, lambda: _raw(b"hello", "text/plain")),
    "no-content-type": (415, lambda: _raw(_png(), None)),
    "json": (415, lambda: {"json": {"image": "aGVsbG8="}}),
    "multipart-without-file": (400, lambda: {"files": {"picture": ("x.png", _png(), "image/png")}}),
    "multipart-empty-file": (400, lambda: {"files": {"file": ("x.png", b"", "image/png")}}),
    "multipart-text-part": (415, lambda: {"files": {"file": ("x.txt", b"hello", "text/plain")}}),
    "multipart-two-files": (400, lambda: {"files": [("file", ("a.png", _png()))] * 2}),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_json_error_and_the_replica_keeps_answering(endpoint, case):
    status, request = BAD_INPUTS[case]
    response = requests.post(endpoint.url + "/predict", timeout=TIMEOUT, **request())
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()
    assert set(error) == {"error"} and error["error"]
    assert_answers(endpoint.url)
    assert requests.get(endpoint.url + "/healthz", timeout=TIMEOUT).status_code == 200


def test_200_concurrent_requests_all_answered(endpoint):
    images = [encode(radiograph(seed), "PNG") for seed in range(8)]
    start = threading.Barrier(200)

    def one(i: int) -> int:
        start.wait(timeout=TIMEOUT)
        return post_image(endpoint.url, images[i % len(images)]).status_code

    with ThreadPoolExecutor(max_workers=200) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses == [200] * 200


# -- hot reload ---------------------------------------------------------------------------------------
def wait_for(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll a cheap observation until true, failing after ``deadline_s`` (synchronisation, not a sleep)."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.05)


def test_promotion_moves_the_champion_app_without_dropping_requests(endpoint):
    current = registry.champion(endpoint.storage)
    target = "lxn-b" if current != "lxn-b" else "lxn-c"  # lxn-b also changes the input size
    images = [encode(radiograph(seed), "PNG") for seed in range(4)]
    log: list[tuple[float, float, int, str | None]] = []  # (started, finished, status, model_version)
    lock, stop = threading.Lock(), threading.Event()

    def stream(worker: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = post_image(endpoint.url, images[worker])
            version = response.json().get("model_version") if response.status_code == 200 else None
            with lock:
                log.append((started, time.monotonic(), response.status_code, version))

    def seen(predicate: Callable[[tuple], bool], count: int = 1) -> Callable[[], bool]:
        def check() -> bool:
            with lock:
                return sum(1 for entry in log if predicate(entry)) >= count

        return check

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(images))]
    for thread in threads:
        thread.start()
    try:
        wait_for(seen(lambda e: e[3] == current, 10), SWITCH_DEADLINE, f"answers from {current}")
        registry.promote(endpoint.storage, target, reason="test hot reload")
        wait_for(seen(lambda e: e[3] == target), SWITCH_DEADLINE, f"the first answer from {target}")
        with lock:
            switched_at = min(finished for _, finished, _, version in log if version == target)
        wait_for(seen(lambda e: e[0] > switched_at, 20), SWITCH_DEADLINE, "answers after the switch")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=TIMEOUT)
    statuses = {status for _, _, status, _ in log}
    assert statuses == {200}, f"statuses during the switch: {statuses}"
    assert {version for *_, version in log} == {current, target}
    # One replica: once it has answered with the new model, every later request gets the new model.
    assert {version for started, _, _, version in log if started > switched_at} == {target}
    assert requests.get(endpoint.url + "/model", timeout=TIMEOUT).json()["model_version"] == target


def test_pinned_version_does_not_follow_promotions(endpoint):
    target = "lxn-c" if registry.champion(endpoint.storage) != "lxn-c" else "lxn-b"
    registry.promote(endpoint.storage, target, reason="test pinned")

    def champion_app_moved() -> bool:
        return assert_answers(endpoint.url)["model_version"] == target

    wait_for(champion_app_moved, SWITCH_DEADLINE, f"the champion app to serve {target}")
    assert assert_answers(endpoint.pinned_url)["model_version"] == "lxn-a"
    card = requests.get(endpoint.pinned_url + "/model", timeout=TIMEOUT).json()
    assert card["model_version"] == "lxn-a" and card["serving"] == "pinned"


def test_a_champion_that_fails_to_load_leaves_the_old_model_serving(tmp_path):
    """The replica's reload step in-process: a broken champion is logged and skipped, not served."""
    from lxn_ray.serve import LxnServer

    storage = Storage.open(str(tmp_path / "store"))
    publish_tiny_model(storage, "lxn-a", 32, 0.5, seed=0)
    publish_tiny_model(storage, "lxn-b", 36, 0.45, seed=1)
    storage.write_bytes(registry.model_key("lxn-broken", "model.keras"), b"not a keras archive")
    storage.write_json(registry.model_key("lxn-broken", "card.json"), {"model_version": "lxn-broken"})
    registry.promote(storage, "lxn-a")
    # Outside Serve (no poller, no batching): the reload step is driven by hand.
    server = LxnServer(ServeSettings(storage=storage.uri))
    image = radiograph(1)

    async def scenario() -> None:
        assert server.current.version == "lxn-a"
        registry.promote(storage, "lxn-broken")
        with pytest.raises(Exception):  # noqa: B017 - whatever Keras raises for a corrupt archive
            await server.reload_if_changed()
        assert not await server.reload_if_changed()  # not reloaded on every poll
        assert server.describe()["model_version"] == "lxn-a"
        registry.promote(storage, "lxn-b")
        assert await server.reload_if_changed()
        described = server.describe()
        assert (described["model_version"], described["threshold"], described["image_size"]) == (
            "lxn-b",
            0.45,
            36,
        )
        batch = np.stack([np.repeat(np.asarray(image.resize((36, 36)), np.float32)[..., None] / 255, 3, 2)])
        assert server.current.forward(batch).shape == (1,)

    asyncio.run(scenario())


# -- the job and the config file ----------------------------------------------------------------------
def test_serve_job_detach_deploys_and_reports(endpoint, tmp_path, capsys):
    from ray import serve

    report = tmp_path / "serve.json"
    args = ["--storage", endpoint.storage.uri, "--model", "lxn-c", "--port", str(endpoint.port)]
    args += ["--app-name", "lxn-job", "--route-prefix", "/job", "--cpus-per-replica", "0"]
    args += ["--max-replicas", "1", "--report", str(report), "--detach"]
    try:
        assert serve_main(args) == 0
        out = capsys.readouterr().out
        url = f"http://127.0.0.1:{endpoint.port}/job"
        assert f"serving model lxn-c (pinned) at {url}" in out and RESEARCH_NOTE in out
        assert json.loads(report.read_text())["model_version"] == "lxn-c"
        assert assert_answers(url)["model_version"] == "lxn-c"
    finally:
        serve.delete("lxn-job")
    assert assert_answers(endpoint.url)  # the other applications are untouched


def test_serve_job_fails_in_one_line_without_a_model(tmp_path, capsys):
    empty = str(tmp_path / "empty-store")
    assert serve_main(["--storage", empty, "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    own = own_stderr_lines(err)
    assert "Traceback" not in err
    assert len(own) == 1 and own[0].startswith("error: serve failed: FileNotFoundError: no champion model")
    assert serve_main(["--storage", empty, "--model", "lxn-missing", "--detach"]) == 1


def test_serve_job_in_the_foreground_stops_cleanly_on_sigterm(tmp_path):
    """``python jobs/serve.py`` as a person runs it: its own local Ray (RAY_ADDRESS=local keeps it off
    this session's instance), serving until SIGTERM, then Serve shut down and exit 0."""
    storage = Storage.open(str(tmp_path / "store"))
    publish_tiny_model(storage, "lxn-a", 32, 0.5, seed=0)
    registry.promote(storage, "lxn-a")
    port = free_port()
    command = [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--storage", storage.uri]
    command += ["--port", str(port), "--cpus-per-replica", "0", "--max-replicas", "1"]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO_ROOT)}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    watchdog = threading.Timer(240, process.kill)  # a hung job fails the test instead of hanging it
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving until"):
                break
        out = "".join(lines)
        assert f"serving model lxn-a (follows the champion) at http://127.0.0.1:{port}" in out, out
        assert RESEARCH_NOTE in out
        assert assert_answers(f"http://127.0.0.1:{port}")["model_version"] == "lxn-a"
        process.send_signal(signal.SIGTERM)
        rest = process.stdout.read()
        assert process.wait(timeout=120) == 0
        assert "SIGTERM: Serve shut down" in rest
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
        process.stdout.close()


def test_serve_config_file_builds_the_application(tmp_path):
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    (application,) = config["applications"]
    assert application["import_path"] == "lxn_ray.serve:build_app"
    settings = ServeSettings.from_mapping(application["args"])
    assert settings == ServeSettings(storage=application["args"]["storage"])  # documented defaults
    assert isinstance(build_app({**application["args"], "storage": str(tmp_path)}), Application)
    with pytest.raises(ValueError, match="unknown serve settings"):
        ServeSettings.from_mapping({"storage": "x", "replicas": 3})


# -- units --------------------------------------------------------------------------------------------
def test_settings_refuse_inconsistent_values():
    settings = ServeSettings(storage="s", min_replicas=2, max_replicas=3, gpus_per_replica=1)
    options = settings.deployment_options()
    assert options["autoscaling_config"]["min_replicas"] == 2
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    for bad in (
        dict(min_replicas=3, max_replicas=2),
        dict(target_ongoing_requests=64),  # above max_ongoing_requests
        dict(max_batch_size=0),
        dict(port=0),
        dict(route_prefix="api"),
        dict(cpus_per_replica=-1),
    ):
        with pytest.raises(ValueError):
            ServeSettings(storage="s", **bad)


def test_multipart_parser_and_error_mapping():
    body = (
        b'preamble\r\n--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a b.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--X\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="note"\r\n\r\nhi\r\n--XyZ--\r\nepilogue'
    )
    first, second = parse_multipart(body, 'multipart/form-data; boundary="XyZ"')
    assert (first.name, first.filename, first.content_type, first.data) == (
        "file",
        "a b.png",
        "image/png",
        b"\x89PNG\r\n--X",
    )
    assert (second.name, second.data) == ("note", b"hi")
    for broken, content_type in (
        (body, "multipart/form-data"),  # no boundary
        (body[: body.index(b"--XyZ--")], "multipart/form-data; boundary=XyZ"),  # truncated
        (b"no parts at all", "multipart/form-data; boundary=XyZ"),
    ):
        with pytest.raises(InputError) as caught:
            parse_multipart(broken, content_type)
        assert caught.value.status == 400
    assert rejected_image(ImageRejected("image is 9x9 pixels, over the 5-pixel cap")).status == 413
    assert rejected_image(ImageRejected("not a PNG or JPEG image")).reason == "not_image"
    assert rejected_image(ImageRejected("corrupt image: truncated")).status == 400
