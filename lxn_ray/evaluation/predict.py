"""A model version, ready to score: the one place that turns a registry entry into a Keras model with its
input size, preprocessing, threshold and task, and scores images with it.

Training (test-split metrics on publishing), evaluation on a new source, promotion, leave-one-source-out
and the endpoint all load models through :func:`load` and score through :func:`score_split` or
:func:`lxn_ray.model.network.predict_probabilities`, so a model is always scored as it was validated:
at its own input size, through its own preprocessing, in the precision it was saved in.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lxn_ray import registry
from lxn_ray.data import dataset
from lxn_ray.evaluation.calibration import Calibration
from lxn_ray.images.preprocess import DEFAULT_PREPROCESSING, LungFinder, PreprocessConfig
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.tasks import DEFAULT_TASK, Task, resolve_task

SCORE_BATCH = 32  # images decoded, preprocessed and scored at a time by score_split


@dataclass(frozen=True)
class ScoringModel:
    """A loaded model version and what scoring it needs."""

    reference: registry.ModelRef  # the card and file it was loaded from
    model: Any  # keras.Model taking (n, image_size, image_size, 3) float32 in [0, 1] -> (n, 1) probability
    task: Task
    image_size: int  # input side in pixels
    preprocessing: PreprocessConfig  # as trained and validated (the card's)
    threshold: float  # chosen on the model's validation split, on the calibrated scale
    calibration: Calibration  # the card's (the identity for a card made before calibration existed)
    lungs: LungFinder | None  # the card's lung segmenter when its preprocessing crops or masks to the lungs

    @property
    def version(self) -> str | None:
        return self.reference.version

    @property
    def card(self) -> dict[str, Any]:
        return self.reference.card


def load_keras(reference: registry.ModelRef):
    """The Keras model of ``reference`` in safe mode (:func:`lxn_ray.model.network.load_model`), from a
    temporary copy of its stored file."""
    from lxn_ray.model.network import load_model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        path.write_bytes(reference.model_bytes)
        return load_model(path)


def load(storage: Storage, reference: str | registry.ModelRef, task: str | None = None) -> ScoringModel:
    """Resolve ``reference`` (``champion``, a model version id or a ``.keras`` path) and load it.

    Raises FileNotFoundError for an unknown model; ValueError when ``task`` is given and names another
    task than the model was trained for, or when the model does not take square RGB images
    ``(n, s, s, 3)``."""
    ref = reference if isinstance(reference, registry.ModelRef) else registry.resolve(storage, reference)
    trained_for = resolve_task(ref.task)
    if task is not None and resolve_task(task).name != trained_for.name:
        raise ValueError(f"model {ref.version or reference} is for task {trained_for.name}, not {task}")
    model = load_keras(ref)
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise ValueError(f"expected an LxN model taking (n, s, s, 3) images, got input shape {shape}")
    return ScoringModel(
        reference=ref,
        model=model,
        task=trained_for,
        image_size=int(shape[1]),  # the model says what it was trained on
        preprocessing=ref.preprocessing,
        threshold=ref.threshold,
        calibration=Calibration.of_card(ref.card),
        lungs=lung_finder(storage.uri, ref.preprocessing),
    )


def lung_finder(storage_uri: str, preprocessing: PreprocessConfig) -> LungFinder | None:
    """The :data:`~lxn_ray.images.preprocess.LungFinder` that ``preprocessing`` needs: its segmenter
    version (``latest`` when unnamed) of the store at ``storage_uri``, loaded once per process; None when
    it does not crop or mask to the lung fields. Raises FileNotFoundError when the store has no such
    segmenter."""
    if preprocessing.lungs == "none":
        return None
    return segmenter_finder(storage_uri, preprocessing.segmenter or "latest")


@functools.lru_cache(maxsize=4)
def segmenter_finder(storage_uri: str, version: str) -> LungFinder:
    """The lung masks of a registered segmenter (:class:`lxn_ray.model.lungs.LungSegmenter`) as a
    one-film :data:`~lxn_ray.images.preprocess.LungFinder`, loaded once per process and version (a Ray
    Data task building a pixel cache, a replica, a job)."""
    from lxn_ray.model.lungs import LungSegmenter

    segmenter = LungSegmenter.load(Storage.open(storage_uri), version)
    return lambda gray: segmenter.masks([gray])[0]


def score_split(
    model,
    storage: Storage,
    version: str,
    split: str | None,
    image_size: int,
    task: str | Task = DEFAULT_TASK,
    sources: tuple[str, ...] = (),
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    calibration: Calibration = Calibration(),
    lungs: LungFinder | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels int64 (n,), probabilities float64 (n,), source names (n,)) of a Keras ``model`` on the rows
    of one split (None: all splits) of dataset ``version`` that ``task`` uses, from ``sources`` (empty:
    all), through ``preprocessing`` at ``image_size`` px, calibrated by ``calibration``
    (:class:`lxn_ray.evaluation.calibration.Calibration`; the identity: the model's own output);
    ``lungs`` finds the lung fields when ``preprocessing`` crops or masks to them (default:
    :func:`lung_finder`'s). Images are decoded and scored :data:`SCORE_BATCH` at a time (the batches
    :func:`lxn_ray.model.network.predict_probabilities` would make of the whole split), never the split
    at once."""
    from lxn_ray.images.preprocess import preprocess_bytes
    from lxn_ray.model.network import predict_probabilities

    lungs = lungs or lung_finder(storage.uri, preprocessing)
    table = dataset.read_split(storage, version, split, task, sources)
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    keys = table.column("image_key").to_pylist()
    scores = [np.zeros(0, dtype=np.float32)]
    for start in range(0, len(keys), SCORE_BATCH):
        images = [
            preprocess_bytes(storage.read_bytes(key), image_size, preprocessing=preprocessing, lungs=lungs)
            for key in keys[start : start + SCORE_BATCH]
        ]
        scores.append(predict_probabilities(model, images, batch_size=SCORE_BATCH))
    probabilities = calibration(np.concatenate(scores))
    return labels, probabilities, table.column("source").to_pylist()


def score_registered(
    storage: Storage, model_version: str, version: str, split: str | None, task: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], registry.ModelRef]:
    """(labels, scores, sources, ModelRef) of a registered model on one split of dataset ``version`` for
    ``task`` (default: the model's own), at the model's own input size, preprocessing and calibration -
    how promotion rules compare two models on the same images."""
    loaded = load(storage, model_version)
    labels, scores, sources = score_split(
        loaded.model,
        storage,
        version,
        split,
        loaded.image_size,
        task or loaded.task,
        (),
        loaded.preprocessing,
        loaded.calibration,
        loaded.lungs,
    )
    return labels, scores, sources, loaded.reference
