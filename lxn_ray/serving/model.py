"""A model version ready to answer requests (:class:`LoadedModel`): loaded through
:func:`lxn_ray.evaluation.predict.load`, its forward pass traced once for any batch size, Grad-CAM built
once, and the answer a response reports (probability, label in its task's names, threshold, version).

Importing this module imports neither TensorFlow nor Keras; :func:`load_model_version` does.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from lxn_ray import registry
from lxn_ray.evaluation.calibration import Calibration
from lxn_ray.evaluation.metrics import fmt, no_better_than_chance
from lxn_ray.infra.storage import Storage

RESEARCH_NOTE = "research use only - not a diagnostic device"
# The label names of a card made before tasks existed (covid-vs-rest).
POSITIVE_LABEL = "COVID-19"
NEGATIVE_LABEL = "negative"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to answer: traced forward pass, Grad-CAM, and what a response reports about it."""

    version: str | None
    card: dict[str, Any]
    threshold: float
    image_size: int
    preprocessing: Any  # lxn_ray.images.preprocess.PreprocessConfig, the card's: as trained and validated
    forward: Callable[[np.ndarray], np.ndarray]  # (n, s, s, 3) float32 -> (n,) probabilities
    explainer: Any  # lxn_ray.model.gradcam.GradCam, built once here rather than per request
    # The lung segmenter (a LungFinder): the card's when it crops or masks to the lungs, else the store's
    # newest, for /explain's outline; None when the store has none.
    segmenter: Callable[[np.ndarray], np.ndarray] | None = None
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def no_better_than_chance(self) -> bool:
        """True when the card's test AUC interval includes 0.5 or the card has none
        (:func:`lxn_ray.evaluation.metrics.no_better_than_chance`): such a model is served only when a
        person promoted or pinned it, and every answer says so."""
        return no_better_than_chance(self.card.get("test", {}).get("auc_ci"))

    @property
    def warning(self) -> str | None:
        """The sentence every answer of a model no better than chance carries (None for any other)."""
        if not self.no_better_than_chance:
            return None
        test = self.card.get("test", {})
        ci = test.get("auc_ci")
        measured = (
            f"its test AUC {fmt(test.get('auc'))} (95% CI {ci[0]:.3f}-{ci[1]:.3f}) includes 0.5"
            if ci
            else "it has no test AUC on record"
        )
        return f"model {self.version} is no better than chance: {measured}; do not act on this label"

    @property
    def lungs(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The segmenter its preprocessing needs (None when it does not crop or mask to the lungs)."""
        return self.segmenter if self.preprocessing.lungs != "none" else None

    @property
    def calibration(self) -> Calibration:
        """The card's calibration (the identity for a card made before calibration existed)."""
        return Calibration.of_card(self.card)

    def prediction(self, output: float) -> dict[str, Any]:
        """The JSON answer for one image's model ``output`` (its sigmoid, float in [0, 1]): ``probability``
        (calibrated by the card's :class:`~lxn_ray.evaluation.calibration.Calibration`, as its
        threshold and test metrics were), ``calibrated`` (bool), ``label`` (``probability >= threshold`` is
        positive, in the card's label names), ``threshold``, ``model_version``, ``task``,
        ``no_better_than_chance`` (bool) and ``warning`` (a sentence, or None).
        """
        probability = float(self.calibration(output))
        return {
            "probability": probability,
            "calibrated": "calibration" in self.card,
            "label": label_for(probability, self.threshold, self.card.get("label_names")),
            "threshold": self.threshold,
            "model_version": self.version,
            "task": registry.card_task_name(self.card),
            "no_better_than_chance": self.no_better_than_chance,
            "warning": self.warning,
        }


def label_for(probability: float, threshold: float, names: dict[str, str] | None = None) -> str:
    """The same rule as evaluation (``probability >= threshold`` is positive), in the model's task's label
    names (``label_names`` of its card; a card made before tasks existed is covid-vs-rest)."""
    names = names or {"1": POSITIVE_LABEL, "0": NEGATIVE_LABEL}
    return names["1"] if probability >= threshold else names["0"]


def load_model_version(storage: Storage, reference: str, task: str | None = None) -> LoadedModel:
    """Resolve ``reference`` (``champion``, a model version id or a ``.keras`` path), load it (safe mode),
    trace its forward pass (``(n, s, s, 3)`` float32 in [0, 1] -> ``(n,)`` float32 probabilities) and warm
    it and its Grad-CAM on one blank image. Blocking (seconds): call it off the event loop.

    Raises FileNotFoundError for an unknown model; ValueError when ``task`` is given and the model was
    trained for another (a card made before tasks existed is covid-vs-rest), or when it does not take
    square RGB images."""
    import tensorflow as tf

    from lxn_ray.evaluation import predict
    from lxn_ray.model.gradcam import GradCam

    loaded = predict.load(storage, reference, task)
    model, size = loaded.model, loaded.image_size

    # One traced graph for any batch size (the batch dimension is left open), so batches of 1..max never
    # retrace; called from one batch at a time.
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def graph(images):
        return tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])

    def forward(images: np.ndarray) -> np.ndarray:
        return np.asarray(graph(tf.convert_to_tensor(images, dtype=tf.float32)))

    explainer = GradCam(model)
    segmenter = loaded.lungs
    if segmenter is None:
        try:  # the outline of /explain: the store's newest segmenter, if it has one
            segmenter = predict.segmenter_finder(storage.uri, "latest")
        except FileNotFoundError:
            segmenter = None
    warm = np.zeros((1, size, size, 3), dtype=np.float32)
    forward(warm)  # trace now, not in the first request
    explainer(warm[0])
    return LoadedModel(
        version=loaded.version,
        card=loaded.card,
        threshold=loaded.threshold,
        image_size=size,
        preprocessing=loaded.preprocessing,
        forward=forward,
        explainer=explainer,
        segmenter=segmenter,
    )
