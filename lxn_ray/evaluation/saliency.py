"""Saliency inside the lungs: how much of a model's Grad-CAM mass falls inside the lung fields, a second
shortcut signal beside the source-shortcut check.

A model that reads burnt-in text, markers, borders or collimation - the shortcuts of public COVID-19 sets
(DeGrave, Janizek & Lee 2021; Maguolo & Nanni 2021 reached similar scores with the lungs blacked out) -
puts its Grad-CAM (:class:`lxn_ray.model.gradcam.GradCam`) outside the lung fields. For every test film,
:func:`lung_share` is the share of the mass of its predicted class's map (a film scored negative has an
empty positive-class map) inside the segmented lung fields; :func:`summary` gives
its mean and spread over the films, beside the share of the image the lungs cover (what a map spread
evenly would reach), and warns by :data:`RULE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from lxn_ray.data import dataset
from lxn_ray.images.preprocess import PreprocessConfig
from lxn_ray.infra.storage import Storage

MAX_FILMS = 500  # films of a test split mapped at most (evenly spaced): bounds the seconds it adds
LOW_SHARE = 0.5  # the rule's threshold: less than half of the mass inside the lung fields
RULE = (
    f"warn when the mean share of Grad-CAM mass inside the lung fields over the test films is below "
    f"{LOW_SHARE:g}: the model draws most of its score from outside the lungs (text, markers, borders, "
    "the abdomen)"
)


def lung_share(heatmap: np.ndarray, mask: np.ndarray) -> tuple[float | None, float]:
    """(share of ``heatmap``'s mass inside ``mask``, share of the area ``mask`` covers).

    ``heatmap``: Grad-CAM, float ``(h, w)`` >= 0 in model-input coordinates (any resolution); ``mask``:
    bool ``(H, W)``, the lung fields of the same film region the model saw. Both are brought to the
    mask's resolution (the map bilinearly, as an overlay draws it). The mass share is None for an
    all-zero map (nothing to place)."""
    inside = np.asarray(mask, dtype=bool)
    height, width = inside.shape
    heat = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize(
        (width, height), Image.BILINEAR
    )
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    total = heat.sum()
    return (float(heat[inside].sum() / total) if total > 0 else None), float(inside.mean())


def summary(shares: Sequence[float | None], areas: Sequence[float], segmenter: str | None) -> dict[str, Any]:
    """Over the test films: ``n`` (films with a map), ``mean``, ``sd``, ``q25``/``median``/``q75`` of the
    mass share inside the lungs, ``lung_area`` (the mean share of the image the lungs cover), the
    ``segmenter`` version, the ``rule`` and a ``warning`` (a sentence, or None) by :data:`RULE`."""
    values = np.asarray([share for share in shares if share is not None], dtype=np.float64)
    result: dict[str, Any] = {"measured": bool(values.size), "segmenter": segmenter, "n": int(values.size)}
    if not values.size:
        return {**result, "reason": "no test film gave a Grad-CAM map", "rule": RULE, "warning": None}
    q25, median, q75 = (float(q) for q in np.percentile(values, [25, 50, 75]))
    mean = float(values.mean())
    result.update(
        mean=mean,
        sd=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        q25=q25,
        median=median,
        q75=q75,
        lung_area=float(np.mean(areas)) if len(areas) else None,
        rule=RULE,
        warning=None,
    )
    if mean < LOW_SHARE:
        result["warning"] = (
            f"saliency outside the lungs: on average {mean:.0%} of the Grad-CAM mass of the test films lies "
            f"inside the lung fields (which cover {result['lung_area']:.0%} of the image); the model draws "
            "most of its score from elsewhere"
        )
    return result


def not_measured(reason: str) -> dict[str, Any]:
    """The card's ``saliency`` when no share could be measured (e.g. the store has no lung segmenter)."""
    return {"measured": False, "reason": reason, "rule": RULE, "warning": None}


def test_split_saliency(
    model,
    storage: Storage,
    version: str,
    task,
    sources: tuple[str, ...],
    image_size: int,
    preprocessing: PreprocessConfig,
) -> dict[str, Any]:
    """The :func:`summary` of a Keras LxN ``model`` on the test split of dataset ``version`` (``task``'s
    rows of ``sources``): each film through the model's own preprocessing and Grad-CAM, its lung fields
    from the segmenter that preprocessing names, else the store's newest. At most :data:`MAX_FILMS` films,
    evenly spaced. :func:`not_measured` when the store has no lung segmenter."""
    from lxn_ray import registry
    from lxn_ray.evaluation.predict import segmenter_finder
    from lxn_ray.images.decode import ImageRejected
    from lxn_ray.images.preprocess import preprocess_for_explanation
    from lxn_ray.model.gradcam import GradCam

    segmenter = preprocessing.segmenter or (registry.list_segmenters(storage) or [None])[-1]
    if segmenter is None:
        return not_measured("no lung segmenter in this store: train one with jobs/lungs.py")
    lungs = segmenter_finder(storage.uri, segmenter)
    keys = dataset.read_split(storage, version, "test", task, sources).column("image_key").to_pylist()
    if len(keys) > MAX_FILMS:
        keys = [keys[i] for i in np.linspace(0, len(keys) - 1, MAX_FILMS).round().astype(int)]
    explain = GradCam(model)
    shares, areas = [], []
    for key in keys:
        try:
            image, _, mask = preprocess_for_explanation(
                storage.read_bytes(key), image_size, preprocessing=preprocessing, lungs=lungs
            )
        except ImageRejected:  # scored films decoded before; a film that no longer does is skipped
            continue
        share, area = lung_share(explain(image).of_predicted_class(), mask)
        shares.append(share)
        areas.append(area)
    return summary(shares, areas, segmenter)
