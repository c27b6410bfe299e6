"""The Serve endpoint end to end: a real local Ray, real Serve applications, real HTTP on 127.0.0.1.

Tiny LxN models (32 and 36 px, untrained) are published straight into a temporary store, as
jobs/train.py would publish them, so no training runs here. One module-scoped Serve instance holds a
champion-following application at ``/`` (API keys on, one key minted into the store) and a pinned one
at ``/pinned`` (``auth=False``, as ``--no-auth`` deploys it); it is shut down at the end so other test
modules see a plain Ray instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from lxn_ray import registry
from lxn_ray.cli.serve import main as serve_main
from lxn_ray.evaluation import predict
from lxn_ray.infra.storage import Storage
from lxn_ray.model.gradcam import display_size, jet
from lxn_ray.serving import auth
from lxn_ray.serving.model import RESEARCH_NOTE
from lxn_ray.serving.serve import deploy
from lxn_ray.serving.settings import ServeSettings
from tests.helpers import (
    BUSY_CORE,
    Background,
    dicom_film,
    encode,
    free_port,
    huge_png,
    own_stderr_lines,
    printed_lines,
    radiograph,
    synthetic_film,
)

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # whole jobs: `-m "not slow"` skips

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # seconds for any single HTTP request (a 2-core CI machine under load)
SWITCH_DEADLINE = 60  # seconds for a replica to move to a new champion (polls every 0.5 s)
# (version, image size, threshold, test AUC interval, calibration (slope, intercept)): b has another input
# size, so a swap also changes preprocessing; a and b are no better than chance (their intervals include
# 0.5), c is better; b's card predates calibration (None), a's map softens and shifts its outputs, c's
# sharpens them.
MODELS = (
    ("lxn-a", 32, 0.5, [0.4, 0.6], (0.5, 0.3)),
    ("lxn-b", 36, 0.45, [0.45, 0.65], None),
    ("lxn-c", 32, 0.55, [0.7, 0.9], (2.0, 0.0)),
)
# What a card of a task confounded with its source says (lxn_ray.evaluation.baselines.shortcut_baselines).
SHORTCUT_BASELINES = {
    "baselines": {
        "source": {"auc": 0.97, "auc_ci": [0.94, 0.99]},
        "view": {"auc": 0.61, "auc_ci": [0.52, 0.7]},
        "format and size": {"auc": 0.95, "auc_ci": [0.9, 0.98]},
    },
    "confounded": True,
    "warning": "the source alone reaches test AUC 0.970: this task is confounded with source on these data; "
    "pooled metrics cannot show learning",
    "model": {
        "beats_baselines": False,
        "label": "the model's test AUC 0.500 does not beat the source-only baseline",
    },
}
# Every request of this module goes through this session; the endpoint fixture gives it a minted key.
API = requests.Session()


def publish_tiny_model(
    storage: Storage,
    version: str,
    image_size: int,
    threshold: float,
    seed: int,
    auc_ci: list[float],
    calibration: tuple[float, float] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> None:
    """A model version as jobs/train.py's publish_model_version writes it: model.keras, then card.json."""
    import keras

    from lxn_ray.model.network import ModelConfig, build_lxn, save_model

    keras.utils.set_random_seed(seed)
    config = ModelConfig(image_size=image_size, width=0.125)
    model = build_lxn(config)
    path = save_model(model, Path(storage.root) / "tmp" / f"{version}.keras")
    storage.write_bytes(registry.model_key(version, "model.keras"), path.read_bytes())
    test = {"auc": 0.5, "accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5, "auc_ci": auc_ci}
    storage.write_json(
        registry.model_key(version, "card.json"),
        {
            "model_version": version,
            "model": "LxN (Umer et al., 2020)",
            "intended_use": "Research only. Not a diagnostic device; not validated for clinical use.",
            "dataset_version": "ds-test",
            "config": {
                "image_size": image_size,
                "width": 0.125,
                "task": "covid-vs-normal",
                **({"preprocessing": preprocessing} if preprocessing else {}),
            },
            "task": {"name": "covid-vs-normal"},
            "label_names": {"1": "COVID-19", "0": "no finding"},
            "conv_padding": config.conv_padding,
            "parameters": int(model.count_params()),
            "threshold": threshold,
            "threshold_rule": "Youden's J (max sensitivity + specificity - 1) on the validation split",
            "val": {"auc": 0.5},
            "test": {**test, "n": 10, "positives": 5, "confusion": [[2, 3], [2, 3]]},
            **(
                {
                    "calibration": dict(
                        zip(("slope", "intercept"), calibration, strict=True),
                        test={"ece": 0.04, "brier": 0.2},
                    )
                }
                if calibration
                else {}
            ),
            "baselines": SHORTCUT_BASELINES,
        },
    )


@dataclass(frozen=True)
class Endpoint:
    storage: Storage
    port: int
    url: str  # follows the champion
    pinned_url: str  # pinned to lxn-a


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_segmenter) -> Iterator[Endpoint]:
    from ray import serve

    folder = tmp_path_factory.mktemp("serve") / "store"
    storage = Storage.open(str(folder))
    for seed, (version, size, threshold, auc_ci, calibration) in enumerate(MODELS):
        publish_tiny_model(storage, version, size, threshold, seed, auc_ci, calibration)
    # lxn-d crops every film to the lung fields its store's segmenter finds
    lungs = {"lungs": "crop", "segmenter": tiny_segmenter.copy_into(folder)}
    publish_tiny_model(storage, "lxn-d", 32, 0.5, 7, [0.6, 0.8], (1.5, -0.2), lungs)
    registry.promote(storage, "lxn-a")
    API.headers["Authorization"] = f"Bearer {auth.mint(storage, 'tests')}"
    port = free_port()
    small = dict(storage=storage.uri, port=port, cpus_per_replica=0, max_replicas=1, poll_seconds=0.5)
    try:
        deploy(ServeSettings(**small))
        pinned = dict(model="lxn-a", app_name="lxn-pinned", route_prefix="/pinned", auth=False)
        deploy(ServeSettings(**small, **pinned))
        yield Endpoint(storage, port, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/pinned")
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def local_model() -> Callable[[Storage, str], object]:
    """The same model version loaded in this process (a ScoringModel), to check the endpoint's numbers
    against."""
    cache: dict[str, object] = {}

    def load(storage: Storage, version: str):
        if version not in cache:
            cache[version] = predict.load(storage, version)
        return cache[version]

    return load


def post_image(
    url: str, data: bytes, content_type: str = "image/png", path: str = "/predict", session=API
) -> requests.Response:
    return session.post(url + path, data=data, headers={"Content-Type": content_type}, timeout=TIMEOUT)


def assert_answers(url: str, session: requests.Session = API) -> dict:
    """A normal request right after anything else: the replica still answers."""
    response = post_image(url, encode(radiograph(7), "PNG"), session=session)
    assert response.status_code == 200, response.text
    return response.json()


def local_probability(loaded, data: bytes) -> float:
    """What evaluation gives for ``data``: the model's output, calibrated by its card's map."""
    from lxn_ray.images.preprocess import preprocess_bytes

    image = preprocess_bytes(data, loaded.image_size, preprocessing=loaded.preprocessing, lungs=loaded.lungs)
    image = image[np.newaxis]
    return float(loaded.calibration(np.asarray(loaded.model(image, training=False))[0, 0]))


# -- predictions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["raw-png", "raw-jpeg", "multipart-png", "multipart-jpeg-no-type"])
def test_predict_matches_the_model_run_locally(endpoint, local_model, how):
    image = radiograph(1)
    data = encode(image, "JPEG", quality=90) if "jpeg" in how else encode(image, "PNG")
    if how.startswith("raw"):
        response = post_image(endpoint.url, data, "image/jpeg" if "jpeg" in how else "image/png")
    else:
        part = ("x.png", data, "image/png") if how == "multipart-png" else ("x.jpg", data)
        response = API.post(endpoint.url + "/predict", files={"file": part}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {
        "probability",
        "calibrated",
        "label",
        "threshold",
        "model_version",
        "task",
        "no_better_than_chance",
        "warning",
    }
    version = answer["model_version"]
    # Every answer says whether its model is no better than chance (its test AUC interval includes 0.5).
    low, high = registry.read_card(endpoint.storage, version)["test"]["auc_ci"]
    assert answer["no_better_than_chance"] is (low <= 0.5 <= high)
    assert (answer["warning"] is not None) is answer["no_better_than_chance"]
    assert response.headers["X-Model-Version"] == version
    assert answer["threshold"] == registry.read_card(endpoint.storage, version)["threshold"]
    # Same bytes, same preprocessing function, same weights, same calibration: the same number (no
    # train/serve skew), calibrated as the card's threshold and test metrics were.
    assert answer["calibrated"] is ("calibration" in registry.read_card(endpoint.storage, version))
    expected = local_probability(local_model(endpoint.storage, version), data)
    assert answer["probability"] == pytest.approx(expected, abs=1e-5)
    # the label names are the model's task's (its card's label_names)
    names = registry.read_card(endpoint.storage, version)["label_names"]
    assert answer["task"] == "covid-vs-normal"
    assert answer["label"] == (names["1"] if answer["probability"] >= answer["threshold"] else names["0"])


def test_predict_batch_answers_in_order(endpoint):
    images = [encode(radiograph(seed, size=(200 + 40 * seed, 260)), "PNG") for seed in range(6)]
    files = [("files", (f"x{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = API.post(endpoint.pinned_url + "/predict/batch", files=files, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    batch = response.json()
    assert len(batch) == len(images)
    singles = [post_image(endpoint.pinned_url, data).json() for data in images]
    assert [a["probability"] for a in batch] == pytest.approx([s["probability"] for s in singles], abs=1e-5)
    assert len({a["probability"] for a in batch}) == len(images)  # distinct images, so order is tested
    assert {a["model_version"] for a in batch} == {"lxn-a"}
    assert all(a["no_better_than_chance"] and "no better than chance" in a["warning"] for a in batch)

    files[3] = ("files", ("broken.png", images[3][:100], "image/png"))
    response = API.post(endpoint.pinned_url + "/predict/batch", files=files, timeout=TIMEOUT)
    assert response.status_code == 400
    assert "image 3 (broken.png)" in response.json()["error"]
    assert_answers(endpoint.pinned_url)


# -- uploads as clients send them, and DICOM -----------------------------------------------------------
@pytest.mark.parametrize(
    "part_type", ["image/jpg", "application/octet-stream", None, "multipart/form-data", "image/png"]
)
def test_multipart_parts_are_judged_by_their_bytes_not_their_type(endpoint, part_type):
    data = encode(radiograph(2), "JPEG", quality=92)
    part = ("film.jpg", data) if part_type is None else ("film.jpg", data, part_type)
    response = API.post(endpoint.url + "/predict", files={"file": part}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    expected = post_image(endpoint.url, data, "image/jpeg").json()["probability"]
    assert response.json()["probability"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("label", ["image/png", "text/plain", "application/dicom", None])
def test_raw_bodies_are_judged_by_their_bytes_not_their_label(endpoint, label):
    data = encode(radiograph(4), "JPEG", quality=92)
    headers = {"Content-Type": label} if label else {}
    response = API.post(endpoint.url + "/predict", data=data, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text


# The same film as PNG, JPEG and DICOM: (label, bytes, Content-Type); PNG first, the reference.
TWINS = (
    ("png", lambda film: encode(film, "PNG"), "image/png"),
    ("jpeg", lambda film: encode(film, "JPEG", quality=95), "image/jpeg"),
    ("dicom-mono2-8bit", lambda film: dicom_film(film), "application/dicom"),
    ("dicom-mono1-8bit", lambda film: dicom_film(film, photometric="MONOCHROME1"), "application/dicom"),
    ("dicom-mono2-12bit", lambda film: dicom_film(film, bits=16), "application/dicom"),
    (
        "dicom-mono1-12bit",
        lambda film: dicom_film(film, bits=16, photometric="MONOCHROME1"),
        "application/dicom",
    ),
    (
        "dicom-jpeg2000",
        lambda film: dicom_film(film, bits=16, compression="jpeg2000"),
        "application/octet-stream",
    ),
)


def test_a_film_as_png_jpeg_and_dicom_gets_the_same_prediction(endpoint):
    film = radiograph(11, size=(300, 360))
    answers = {}
    for name, make, content_type in TWINS:
        response = post_image(endpoint.pinned_url, make(film), content_type)
        assert response.status_code == 200, (name, response.text)
        answers[name] = response.json()["probability"]
    for name, probability in answers.items():
        # the DICOM films hold the PNG's pixels exactly; JPEG differs by its compression
        tolerance = 0.01 if name == "jpeg" else 1e-5
        assert probability == pytest.approx(answers["png"], abs=tolerance), name
    files = [("files", (f"{name}.bin", make(film))) for name, make, _ in TWINS]
    batch = API.post(endpoint.pinned_url + "/predict/batch", files=files, timeout=TIMEOUT)
    assert batch.status_code == 200, batch.text
    assert [a["probability"] for a in batch.json()] == pytest.approx(list(answers.values()), abs=1e-5)
    explained = post_image(endpoint.pinned_url, dicom_film(film, photometric="MONOCHROME1"), path="/explain")
    assert explained.status_code == 200 and explained.headers["Content-Type"] == "image/png"
    assert float(explained.headers["X-Probability"]) == pytest.approx(answers["png"], abs=1e-5)


# -- API keys -----------------------------------------------------------------------------------------
def test_protected_routes_need_a_known_key_and_probes_do_not(endpoint):
    film = encode(radiograph(6), "PNG")
    for headers in (
        {},
        {"Authorization": "Bearer lxn_not-a-key-of-this-store"},
        {"Authorization": "Basic x"},
    ):
        for method, path in (
            ("post", "/predict"),
            ("post", "/predict/batch"),
            ("post", "/explain"),
            ("get", "/model"),
        ):
            response = requests.request(
                method,
                endpoint.url + path,
                data=film,
                headers={**headers, "Content-Type": "image/png"},
                timeout=TIMEOUT,
            )
            assert response.status_code == 401, (path, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert "Authorization: Bearer KEY" in response.json()["error"]
    for path in ("/healthz", "/", "/docs", "/openapi.json"):
        assert requests.get(endpoint.url + path, timeout=TIMEOUT).status_code == 200, path
    assert post_image(endpoint.pinned_url, film, session=requests.Session()).status_code == 200  # auth off


def test_keys_minted_and_revoked_apply_without_a_restart(endpoint, tmp_path):
    before = registry.champion(endpoint.storage)
    assert (
        serve_main(
            ["--storage", endpoint.storage.uri, "--mint-key", "nurse", "--key-out", str(tmp_path / "k")]
        )
        == 0
    )
    key_file = tmp_path / "k"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    key = key_file.read_text().strip()
    stored = endpoint.storage.read_bytes(auth.KEY_FILE).decode()
    assert key not in stored and auth.digest(key) in stored  # kept hashed
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    film = encode(radiograph(8), "PNG")
    wait_for(lambda: post_image(endpoint.url, film, session=session).status_code == 200, 30, "the new key")
    assert (
        serve_main(
            ["--storage", endpoint.storage.uri, "--mint-key", "nurse", "--key-out", str(tmp_path / "k2")]
        )
        == 1
    )
    assert serve_main(["--storage", endpoint.storage.uri, "--revoke-key", "nurse"]) == 0
    wait_for(lambda: post_image(endpoint.url, film, session=session).status_code == 401, 30, "the revocation")
    assert_answers(endpoint.url)  # the other key still works
    assert registry.champion(endpoint.storage) == before


def test_the_page_is_served_with_the_research_notice(endpoint):
    page = requests.get(endpoint.url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "Research use only - not a diagnostic device" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere


# -- the page, in a real browser ----------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's packages (.ci/run)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages, driven by Selenium through the matching chromedriver,
    with the network blocked: every host name but the loopback address fails to resolve, as on an
    air-gapped hospital network."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are missing: .ci/run installs them")
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.parametrize("where", ["url", "pinned_url"])
def test_docs_render_with_the_network_blocked(endpoint, browser, where):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = getattr(endpoint, where)
    browser.get(url + "/docs")
    WebDriverWait(browser, TIMEOUT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title")
    )
    assert "LxN COVID-19 chest X-ray classifier" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {
        e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert {"/predict", "/predict/batch", "/explain", "/model", "/healthz"} <= paths
    assert "cdn" not in API.get(url + "/docs", timeout=TIMEOUT).text


def test_the_page_scores_an_uploaded_film_in_a_real_browser(endpoint, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    film = dicom_film(radiograph(12, size=(300, 360)), photometric="MONOCHROME1", bits=16)
    (tmp_path / "film.dcm").write_bytes(film)
    (tmp_path / "notes.txt").write_text("not a film")
    expected = post_image(endpoint.url, film, "application/dicom").json()
    wait = WebDriverWait(browser, TIMEOUT)

    def upload(path: Path) -> str:
        """Pick a file as a person would, then wait for the page to finish with it."""
        browser.execute_script("document.getElementById('status').textContent = ''")
        browser.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: d.find_element(By.ID, "status").text not in ("", "Scoring..."))
        return browser.find_element(By.ID, "status").text

    browser.get(endpoint.url + "/")
    assert "Research use only - not a diagnostic device." in browser.find_element(By.ID, "notice").text
    assert upload(tmp_path / "film.dcm") == "Refused (HTTP 401)."  # no key yet
    assert "Authorization: Bearer KEY" in browser.find_element(By.ID, "error").text

    browser.find_element(By.ID, "key").send_keys(API.headers["Authorization"].split(" ", 1)[1], Keys.TAB)
    browser.find_element(By.ID, "file").clear()
    assert upload(tmp_path / "film.dcm") == "Done."
    assert float(browser.find_element(By.ID, "probability").text) == pytest.approx(
        expected["probability"], abs=6e-4
    )
    assert browser.find_element(By.ID, "label").text == expected["label"]
    assert browser.find_element(By.ID, "version").text == expected["model_version"]
    overlay = browser.find_element(By.ID, "overlay")
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) > 300  # film + colour bar
    wait.until(lambda d: d.find_elements(By.ID, "card-version"))
    assert browser.find_element(By.ID, "card-version").text == expected["model_version"]
    assert "no better than chance" in browser.find_element(By.ID, "chance").text
    # beside its AUCs: what knowing the archive alone scores, and how its probabilities were calibrated
    assert browser.find_element(By.ID, "baselines").text.startswith("source 0.970 (0.94-0.99); view 0.610")
    assert "confounded with source" in browser.find_element(By.ID, "confounded").text
    assert "does not beat the source-only baseline" in browser.find_element(By.ID, "not-beaten").text
    assert "Platt scaling, slope 0.50, intercept 0.30" in browser.find_element(By.ID, "calibration").text
    assert browser.find_element(By.ID, "p-calibrated").text == "calibrated on validation"
    # The champion (lxn-a) is no better than chance: said at the top of the page and above the answer,
    # and its label is in no reassuring colour.
    for warning in ("chance-banner", "answer-warning"):
        shown = browser.find_element(By.ID, warning)
        assert shown.is_displayed() and "no better than chance" in shown.text, warning
    answer = browser.find_element(By.ID, "answer")
    assert browser.find_element(By.ID, "answer-warning").location["y"] < answer.location["y"]
    assert browser.find_element(By.ID, "chance-banner").location["y"] < answer.location["y"]
    assert browser.find_element(By.ID, "label").get_attribute("class") == "unproven"
    if shot := os.environ.get("LXN_PAGE_SCREENSHOT"):  # README's picture: LXN_PAGE_SCREENSHOT=docs/page.png
        browser.save_screenshot(shot)

    browser.find_element(By.ID, "file").clear()
    assert upload(tmp_path / "notes.txt") == "Refused (HTTP 415)."
    assert "not a PNG, JPEG or DICOM file" in browser.find_element(By.ID, "error").text


def test_explain_draws_the_heat_map_over_the_radiograph(endpoint, local_model):
    from lxn_ray.images.preprocess import preprocess_bytes
    from lxn_ray.model.gradcam import GradCam

    image = radiograph(3, size=(320, 384))
    data = encode(image, "PNG")
    response = post_image(endpoint.pinned_url, data, path="/explain")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG" and picture.mode == "RGB"
    x, y, width, height = map(int, response.headers["X-Film-Box"].split(","))
    assert (width, height) == display_size(*image.size) == (320, 384)
    assert x == 0 and y > 20 and picture.size[0] > width + 30  # caption above the film, colour bar beside
    caption_band = np.asarray(picture, dtype=np.float32)[:y, :width]
    assert caption_band.mean() > 200 and caption_band.min() < 60  # dark text on white, not on the film
    bar = np.asarray(picture, dtype=np.int64)[y + 35 : y + height - 15, width + 12]  # the scale's column
    (top_r, _, top_b), (bottom_r, _, bottom_b) = bar[0], bar[-1]
    assert top_r > top_b + 40 and bottom_b > bottom_r + 40  # high (red) at the top, low (blue) below
    picture = picture.crop((x, y, x + width, y + height))  # the film under its heat map

    loaded = local_model(endpoint.storage, "lxn-a")
    explanation = GradCam(loaded.model)(preprocess_bytes(data, 32))
    # the answer is calibrated (lxn-a's map: slope 0.5, intercept 0.3), the heat map is the model's own
    expected = float(loaded.calibration(explanation.probability))
    assert loaded.calibration.slope == 0.5 and response.headers["X-Calibrated"] == "true"
    assert float(response.headers["X-Probability"]) == pytest.approx(expected, abs=1e-5)
    pixels = np.asarray(picture, dtype=np.float32)
    cam = Image.fromarray(explanation.heatmap, mode="F").resize(picture.size, Image.BILINEAR)
    plain_heat_map = jet(np.asarray(cam)).astype(np.float32)
    assert np.abs(pixels - plain_heat_map).mean() > 20  # not just the heat map...
    film = np.asarray(image, dtype=np.float32)
    assert np.corrcoef(pixels.mean(axis=2).ravel(), film.ravel())[0, 1] > 0.5  # ...the film shows through


def test_a_model_of_another_task_is_refused(endpoint):
    from lxn_ray.serving.model import load_model_version

    with pytest.raises(ValueError, match="is for task covid-vs-normal, not covid-vs-rest"):
        load_model_version(endpoint.storage, "lxn-a", task="covid-vs-rest")
    assert load_model_version(endpoint.storage, "lxn-a", task="covid-vs-normal").version == "lxn-a"


def test_health_model_card_and_docs(endpoint):
    health = API.get(endpoint.url + "/healthz", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    card = API.get(endpoint.url + "/model", timeout=TIMEOUT).json()
    assert card["serving"] == "champion" and card["intended_use"] == RESEARCH_NOTE
    assert card["card"]["model_version"] == card["model_version"]
    assert card["image_size"] == card["card"]["config"]["image_size"]
    assert card["no_better_than_chance"] is True  # its test AUC interval [0.4, 0.6] includes 0.5
    assert "no better than chance" in card["warning"]
    pinned = API.get(endpoint.pinned_url + "/model", timeout=TIMEOUT).json()
    assert pinned["serving"] == "pinned" and pinned["model_version"] == "lxn-a"
    docs = API.get(endpoint.url + "/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = API.get(endpoint.url + "/openapi.json", timeout=TIMEOUT).json()["paths"]
    assert {"/predict", "/predict/batch", "/explain", "/healthz", "/model"} <= set(paths)
    assert "image/png" in paths["/predict"]["post"]["requestBody"]["content"]
    missing = API.get(endpoint.url + "/nowhere", timeout=TIMEOUT)
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
    "not-an-image": (415, lambda: _raw(b"hello, not an image")),
    "truncated": (400, lambda: _raw(_png()[: len(_png()) // 2])),
    "empty-body": (400, lambda: _raw(b"")),
    "over-20mb": (413, lambda: _raw(b"\0" * (20 * 1024 * 1024 + 1), "image/jpeg")),
    "over-20mb-chunked": (413, lambda: _raw(_chunks(21 * 1024 * 1024))),
    "over-50-megapixels": (413, lambda: _raw(huge_png(8000, 6300))),
    "text-plain": (415, lambda: _raw(b"hello", "text/plain")),
    "text-labelled-png": (415, lambda: _raw(b"hello, not an image", "image/png")),
    "dicom-ct": (422, lambda: _raw(dicom_film(radiograph(5), modality="CT"), "application/dicom")),
    "dicom-multi-frame": (422, lambda: _raw(dicom_film(radiograph(5), frames=3), "application/dicom")),
    "dicom-truncated": (400, lambda: _raw(dicom_film(radiograph(5))[:-2000], "application/dicom")),
    "json": (415, lambda: {"json": {"image": "aGVsbG8="}}),
    "multipart-without-file": (400, lambda: {"files": {"picture": ("x.png", _png(), "image/png")}}),
    "multipart-empty-file": (400, lambda: {"files": {"file": ("x.png", b"", "image/png")}}),
    "multipart-text-part": (415, lambda: {"files": {"file": ("x.txt", b"hello", "text/plain")}}),
    "multipart-text-labelled-png": (415, lambda: {"files": {"file": ("x.png", b"hello", "image/png")}}),
    "multipart-two-files": (400, lambda: {"files": [("file", ("a.png", _png()))] * 2}),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_json_error_and_the_replica_keeps_answering(endpoint, case):
    status, request = BAD_INPUTS[case]
    response = API.post(endpoint.url + "/predict", timeout=TIMEOUT, **request())
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()
    assert set(error) == {"error"} and error["error"]
    assert_answers(endpoint.url)
    assert API.get(endpoint.url + "/healthz", timeout=TIMEOUT).status_code == 200


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
    assert API.get(endpoint.url + "/model", timeout=TIMEOUT).json()["model_version"] == target


def test_pinned_version_does_not_follow_promotions(endpoint):
    target = "lxn-c" if registry.champion(endpoint.storage) != "lxn-c" else "lxn-b"
    registry.promote(endpoint.storage, target, reason="test pinned")

    def champion_app_moved() -> bool:
        return assert_answers(endpoint.url)["model_version"] == target

    wait_for(champion_app_moved, SWITCH_DEADLINE, f"the champion app to serve {target}")
    assert assert_answers(endpoint.pinned_url)["model_version"] == "lxn-a"
    card = API.get(endpoint.pinned_url + "/model", timeout=TIMEOUT).json()
    assert card["model_version"] == "lxn-a" and card["serving"] == "pinned"


def test_a_model_that_crops_to_the_lungs_answers_as_evaluation_scores_it(endpoint, local_model):
    registry.promote(endpoint.storage, "lxn-d", reason="test lungs")
    wait_for(
        lambda: assert_answers(endpoint.url)["model_version"] == "lxn-d", SWITCH_DEADLINE, "lxn-d serving"
    )
    film, _ = synthetic_film(7)  # a film whose lung fields the store's tiny segmenter finds
    data = encode(Image.fromarray(film), "PNG")
    loaded = local_model(endpoint.storage, "lxn-d")
    assert loaded.preprocessing.lungs == "crop" and loaded.lungs is not None
    answer = post_image(endpoint.url, data).json()
    assert answer["probability"] == pytest.approx(local_probability(loaded, data), abs=1e-5)
    # /explain shows the crop the model saw (smaller than the film), its lung fields outlined
    response = post_image(endpoint.url, data, path="/explain")
    assert response.status_code == 200 and float(response.headers["X-Probability"]) == pytest.approx(
        answer["probability"], abs=1e-5
    )
    _, _, width, height = map(int, response.headers["X-Film-Box"].split(","))
    assert width * height < film.size and width < film.shape[1] + 1


def test_a_champion_that_fails_to_load_leaves_the_old_model_serving(tmp_path):
    """The replica's reload step in-process: a broken champion is logged and skipped, not served."""
    from lxn_ray.serving.serve import LxnServer

    storage = Storage.open(str(tmp_path / "store"))
    publish_tiny_model(storage, "lxn-a", 32, 0.5, seed=0, auc_ci=[0.4, 0.6])
    publish_tiny_model(storage, "lxn-b", 36, 0.45, seed=1, auc_ci=[0.7, 0.9])
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


def test_a_film_that_fails_in_a_batch_fails_only_its_own_request(tmp_path):
    """The replica's batch target in-process (``serve.batch`` itself needs a replica): of four films, one
    is not an image and one makes preprocessing raise something unexpected; the other two are scored in
    the batch's one forward pass, and each failure is its own request's - 415, and the error itself
    (which the route answers as a 500)."""
    from lxn_ray.serving.serve import LxnServer
    from lxn_ray.serving.uploads import InputError

    storage = Storage.open(str(tmp_path / "store"))
    publish_tiny_model(storage, "lxn-a", 32, 0.5, seed=0, auc_ci=[0.4, 0.6])
    server = LxnServer(ServeSettings(storage=storage.uri, model="lxn-a"))  # outside Serve: no poller
    prepare, forward, batches = server._prepare, server.current.forward, []

    def unexpected(data: bytes, model):
        if data == b"boom":
            raise KeyError("a bug in preprocessing")
        return prepare(data, model)

    def counted(images: np.ndarray) -> np.ndarray:
        batches.append(len(images))
        return forward(images)

    server._prepare = unexpected
    object.__setattr__(server.current, "forward", counted)
    film = _png()
    scored, rejected, failed, again = asyncio.run(server._score_batch([film, b"not an image", b"boom", film]))
    assert batches == [2]  # one forward pass, for the two films that decoded
    assert scored.model.version == again.model.version == "lxn-a" and scored.probability == again.probability
    assert isinstance(failed, KeyError)

    async def alone(data: bytes):  # predict_bytes with a batch of one, as serve.batch would hand it back
        return (await server._score_batch([data]))[0]

    server._batched = alone
    with pytest.raises(InputError) as refused:
        asyncio.run(server.predict_bytes(b"not an image"))
    assert refused.value.status == 415
    with pytest.raises(KeyError):
        asyncio.run(server.predict_bytes(b"boom"))
    assert asyncio.run(server.predict_bytes(film))["probability"] == pytest.approx(scored.probability)


# -- the job ------------------------------------------------------------------------------------------
def test_serve_job_detach_deploys_and_reports(endpoint, tmp_path, capsys):
    from ray import serve

    report = tmp_path / "serve.json"
    args = ["--storage", endpoint.storage.uri, "--model", "lxn-c", "--port", str(endpoint.port)]
    args += ["--app-name", "lxn-job", "--route-prefix", "/job", "--cpus-per-replica", "0"]
    args += ["--max-replicas", "1", "--report", str(report), "--detach", "--no-auth"]
    try:
        assert serve_main(args) == 0
        out = capsys.readouterr().out
        url = f"http://127.0.0.1:{endpoint.port}/job"
        assert f"serving model lxn-c (pinned) at {url}" in out and RESEARCH_NOTE in out
        assert f"auth: OFF (--no-auth): anyone who can reach {url} can call every route" in out
        assert json.loads(report.read_text())["model_version"] == "lxn-c"
        assert assert_answers(url, requests.Session())["model_version"] == "lxn-c"
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
    this session's instance), on a loaded host (a busy core beside it), serving until SIGTERM, then Serve
    shut down and exit 0. It prints only its own lines - none of Serve's start-up logging -, each once."""
    busy = Background(BUSY_CORE)
    try:
        _serve_in_the_foreground(tmp_path)
    finally:
        busy.stop()


def test_serve_job_through_haproxy(tmp_path):
    """``jobs/serve.py --ingress haproxy``: HAProxy (Ray Serve's ingress) serves the port and hands each
    request straight to the replica - the same answers and API key check as through Serve's proxy -, its
    files and ports this Ray instance's own; SIGTERM stops it with Serve (no HAProxy left holding the
    port). Not asserted here: that the job prints only its own lines - Ray 2.60's HAProxy manager now and
    then logs an ERROR when a reload's new HAProxy does not answer in time on a loaded host (CI,
    2026-12-07), though the endpoint keeps answering."""
    _serve_in_the_foreground(tmp_path, ingress="haproxy")


def haproxy_serving(port: int) -> dict[int, str]:
    """The HAProxy processes whose configuration (``haproxy ... -f FILE``) binds ``port``: pid -> that
    configuration's text."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or one that just ended
            continue
        if not argv[0].endswith(b"haproxy") or b"-f" not in argv:
            continue
        config = Path(argv[argv.index(b"-f") + 1].decode())
        with contextlib.suppress(OSError):
            if f":{port}\n" in (text := config.read_text()):
                found[int(entry.name)] = f"{config}\n{text}"
    return found


def _serve_in_the_foreground(tmp_path: Path, ingress: str = "proxy") -> None:
    storage = Storage.open(str(tmp_path / "store"))
    publish_tiny_model(storage, "lxn-a", 32, 0.5, seed=0, auc_ci=[0.4, 0.6])
    registry.promote(storage, "lxn-a")
    port = free_port()
    command = [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--storage", storage.uri]
    command += ["--port", str(port), "--cpus-per-replica", "0", "--max-replicas", "1", "--ingress", ingress]
    key = "a-key-from-the-environment-0123"
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO_ROOT), auth.ENV_KEYS: key}
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
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
        assert f"HTTP ingress: {ingress}" in out
        haproxy = haproxy_serving(port)
        if ingress == "haproxy":
            ((pid, config),) = haproxy.items()
            assert "/lxn-haproxy-" in config.splitlines()[0]  # its files in a folder of this job's own
            assert ":9101\n" not in config and ":8404\n" not in config  # nor Ray's fixed ports
        else:
            assert haproxy == {}
        assert RESEARCH_NOTE in out
        assert "WARNING: model lxn-a is no better than chance" in out  # its start-up says so
        assert "auth: on" in out and "1 from LXN_API_KEYS" in out and "--mint-key NAME" in out
        assert key not in out
        assert assert_answers(f"http://127.0.0.1:{port}", session)["model_version"] == "lxn-a"
        assert post_image(f"http://127.0.0.1:{port}", _png(), session=requests.Session()).status_code == 401
        process.send_signal(signal.SIGTERM)
        rest = process.stdout.read()
        assert process.wait(timeout=120) == 0
        assert "SIGTERM: Serve shut down" in rest
        assert haproxy_serving(port) == {}  # stopped with Serve, reloaded ones too
        with socket.create_server(("127.0.0.1", port)):  # and the port is free again
            pass
        if ingress == "haproxy":
            assert not Path(config.splitlines()[0]).parent.exists()  # the folder is removed
        printed, others = printed_lines(out + rest, (tmp_path / "stderr.txt").read_text())
        if ingress == "proxy":  # see test_serve_job_through_haproxy
            assert others == [], "lines that are not the job's own:\n" + "\n".join(others)
        assert len(set(printed)) == len(printed), printed
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
        process.stdout.close()
