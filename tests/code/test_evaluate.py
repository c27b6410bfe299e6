"""Evaluation's overlap-with-training check and its decoding, without a model or Ray: a file with a
training image's bytes is that image, folder images are compared with training images only, and each
file is decoded once."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from lxn_ray.data.fetch import SourceFile
from lxn_ray.dedupe import fingerprint as fingerprint_module
from lxn_ray.dedupe.fingerprint import fingerprint
from lxn_ray.dedupe.search import candidate_pairs, find_duplicates
from lxn_ray.evaluation import evaluate
from lxn_ray.images import preprocess
from lxn_ray.images.decode import ImageLimits, decode_image, to_grayscale
from lxn_ray.infra.storage import Storage
from lxn_ray.registry import ModelRef
from lxn_ray.sources.metadata import MetadataRow
from tests.helpers import encode, radiograph


def _png(image: Image.Image) -> tuple[str, bytes]:
    data = encode(image, "PNG")
    return hashlib.sha256(data).hexdigest(), data


def _fingerprint(data: bytes) -> dict:
    return fingerprint(to_grayscale(decode_image(data).image))


def _file(name: str, data: bytes) -> SourceFile:
    row = MetadataRow(
        line=1,
        filename=name,
        folder="images",
        patient_id="p",
        finding="COVID-19",
        view="PA",
        modality="X-ray",
    )
    return SourceFile(row, hashlib.sha256(data).hexdigest(), len(data), data)


@pytest.fixture(scope="module")
def training() -> tuple[evaluate.TrainingImages, dict[str, bytes]]:
    """Four training films, their stored fingerprints, and their bytes by sha256."""
    films = dict(_png(radiograph(700 + i, size=(96, 112))) for i in range(4))
    stored = {sha: {"sha256": sha, **_fingerprint(data)} for sha, data in films.items()}
    return evaluate.TrainingImages("ds-test", frozenset(films), frozenset(films), stored), films


def test_a_training_images_bytes_count_as_overlap_and_folder_images_are_never_compared_together(
    training, tmp_path, monkeypatch
) -> None:
    images, films = training
    train_shas = sorted(films)
    copied = train_shas[0]  # republished byte for byte
    resized_sha, resized = _png(Image.open(io.BytesIO(films[train_shas[1]])).resize((80, 93)))
    # two folder films that are near-duplicates of each other but of no training film
    own = radiograph(900, size=(96, 112))
    own_sha, own_data = _png(own)
    own_copy_sha, own_copy = _png(own.resize((88, 103)))
    fingerprints = {sha: _fingerprint(data) for sha, data in ((resized_sha, resized), (own_sha, own_data))}
    fingerprints[own_copy_sha] = _fingerprint(own_copy)
    # the two folder-only films would be a candidate pair if folder images were compared together
    together = {f"folder:{sha}": fingerprints[sha] for sha in (own_sha, own_copy_sha)}
    assert tuple(sorted(together)) in candidate_pairs({}, together)
    folder = {
        "copy.png": copied,
        "copy-again.png": copied,
        "resized.png": resized_sha,
        "own.png": own_sha,
        "own-copy.png": own_copy_sha,
    }
    compared: list[tuple[set, set, bool]] = []

    def recording(known, new, **options):
        compared.append((set(known), set(new), options["within_new"]))
        return find_duplicates(known, new, **options)

    monkeypatch.setattr(evaluate, "find_duplicates", recording)
    # no fingerprint is given for the copied bytes: they must count without being verified
    overlap = evaluate._overlap_with_training(
        Storage.open(str(tmp_path / "store")), images, folder, fingerprints, map_chunks=None
    )
    assert overlap == {"copy.png": copied, "copy-again.png": copied, "resized.png": train_shas[1]}
    [(known, new, within_new)] = compared
    assert known == set(films) and within_new is False  # folder films are compared with training films only
    assert new == {f"folder:{sha}" for sha in (resized_sha, own_sha, own_copy_sha)}


def test_decode_decodes_each_file_once_and_fingerprints_only_contents_new_to_the_version(
    training, monkeypatch
) -> None:
    images, films = training
    train_shas = sorted(films)
    extra_sha, extra = _png(radiograph(950, size=(96, 112)))
    # train_shas[3] is a validation film of the version: judged distinct at ingest, not fingerprinted
    images = evaluate.TrainingImages(
        images.version, images.shas - {train_shas[3]}, images.published, images.fingerprints
    )
    files = [
        _file("train.png", films[train_shas[0]]),
        _file("val.png", films[train_shas[3]]),
        _file("new.png", extra),
        _file("broken.png", b"not an image"),
    ]
    decodes, fingerprinted = [], []
    real_decode, real_fingerprint_film = preprocess.decode_image, evaluate.fingerprint_film

    def decode(data, limits, *args, **kwargs):
        decodes.append(data)
        return real_decode(data, limits, *args, **kwargs)

    monkeypatch.setattr(preprocess, "decode_image", decode)
    monkeypatch.setattr(fingerprint_module, "decode_image", decode)  # fingerprint_film's decode

    def fingerprint_film(data, limits):
        made = real_fingerprint_film(data, limits)  # raises for the broken file: not counted
        fingerprinted.append(data)
        return made

    monkeypatch.setattr(evaluate, "fingerprint_film", fingerprint_film)
    model_ref = ModelRef("m", {}, b"")
    scored, inputs, fingerprints, exclusions = evaluate._decode(files, 32, ImageLimits(), model_ref, images)
    assert [item.row.filename for item in scored] == ["train.png", "val.png", "new.png"]
    assert [e.row.filename for e in exclusions] == ["broken.png"]
    assert len(decodes) == len(files)  # once each
    assert len(fingerprinted) == 1  # only the content that is not an image of the version
    assert set(fingerprints) == {extra_sha}
    assert fingerprints[extra_sha] == _fingerprint(extra)
    for item, model_input in zip(scored, inputs, strict=True):
        assert np.array_equal(model_input, preprocess.preprocess_bytes(item.data, 32))
