"""Shortcut baselines: what knowing the archive alone scores on a task, before any model is trained.

Public COVID-19 sets put each class in a different archive, so a classifier can score well by telling
archives apart (DeGrave, Janizek & Lee 2021). For a task's rows of a dataset version, each baseline is a
classifier given one kind of non-image fact, fitted on the train split and scored on the test split - the
same patients a model is judged on - with the AUC's 95% bootstrap interval
(:func:`lxn_ray.evaluation.metrics.bootstrap_auc_ci`):

- ``source``: the source's name; the score is the train split's positive share in that source
  (additively smoothed towards the overall share): the best any function of the source alone can rank.
- ``view``: the view (PA, AP, AP Supine, L, ...), scored the same way.
- ``format and size``: the file's format and its pixel width and height, through scikit-learn's
  gradient-boosted trees (depth 3): what the file, not the film, gives away.
- ``bits per pixel``: the format and the file's compressed size per pixel (8 x bytes / (width x height)),
  the same way. Not an archive fact but a *content* statistic - a losslessly stored film's size follows
  its texture, so it may carry the finding itself, or how the film was taken (a portable AP film's noise)
  - hence reported beside the others and left out of :func:`verdict` (:data:`CONTENT_BASELINES`). Measured
  on the NIH films of darkcovidnet (all 512 x 512 PNG), pneumonia against no finding: 0.86.

When the source alone reaches :data:`CONFOUNDED_AUC`, the task is confounded with its source on these data
and pooled metrics cannot show that a model learned anything (the plan and the card say so). A model whose
pooled test AUC does not rise above every archive baseline's interval is labelled as such
(:func:`verdict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from lxn_ray.evaluation.metrics import bootstrap_auc_ci, fmt, roc_auc

CONFOUNDED_AUC = 0.8  # the source alone reaching this on test: the task is confounded with source
SMOOTHING = 1.0  # pseudo-images at the overall positive share added to each category's count
CONFOUNDED_WARNING = "this task is confounded with source on these data; pooled metrics cannot show learning"
BASELINES = {
    "source": ("source",),
    "view": ("view",),
    "format and size": ("source_format", "width", "height"),
    "bits per pixel": ("source_format", "width", "height", "bytes"),
}
CONTENT_BASELINES = frozenset({"bits per pixel"})  # shown, but not archive facts: not in the verdict


def _category_scores(train: pa.Table, test: pa.Table, column: str) -> np.ndarray:
    """Per test row, the smoothed positive share of its category among the train rows (unseen: the overall
    share)."""
    labels = np.asarray(train.column("label").to_pylist(), dtype=np.float64)
    prior = float(labels.mean())
    positives: dict[Any, float] = {}
    counts: dict[Any, int] = {}
    for value, label in zip(train.column(column).to_pylist(), labels, strict=True):
        positives[value] = positives.get(value, 0.0) + label
        counts[value] = counts.get(value, 0) + 1
    return np.asarray(
        [
            (positives.get(value, 0.0) + SMOOTHING * prior) / (counts.get(value, 0) + SMOOTHING)
            for value in test.column(column).to_pylist()
        ]
    )


def _file_features(table: pa.Table, formats: list[str], name: str) -> np.ndarray:
    """Baseline ``name``'s features, float64 ``(n, 3)`` for ``format and size`` (format index among
    ``formats``, NaN when unseen; width; height) or ``(n, 2)`` for ``bits per pixel`` (format index, bits per
    pixel)."""
    index = {value: i for i, value in enumerate(formats)}
    formats_, widths, heights, sizes = (
        table.column(column).to_pylist() if column in table.column_names else [None] * table.num_rows
        for column in BASELINES["bits per pixel"]
    )
    rows = []
    for format_, width, height, size in zip(formats_, widths, heights, sizes, strict=True):
        width, height = float(width or np.nan), float(height or np.nan)
        if name == "bits per pixel":
            rows.append([index.get(format_, np.nan), 8.0 * float(size or np.nan) / (width * height)])
        else:
            rows.append([index.get(format_, np.nan), width, height])
    return np.asarray(rows, dtype=np.float64)


def _file_scores(train: pa.Table, test: pa.Table, name: str, seed: int) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier

    formats = sorted({str(value) for value in train.column("source_format").to_pylist()})
    classifier = HistGradientBoostingClassifier(
        max_depth=3,
        max_iter=100,
        learning_rate=0.1,
        categorical_features=[0],
        early_stopping=False,
        random_state=seed,
    )
    classifier.fit(_file_features(train, formats, name), np.asarray(train.column("label").to_pylist()))
    return classifier.predict_proba(_file_features(test, formats, name))[:, 1]


def shortcut_baselines(rows: pa.Table, seed: int = 0) -> dict[str, Any]:
    """The shortcut baselines of a task's rows (a :func:`lxn_ray.data.dataset.read_split` table of every
    split: ``split``, ``label`` int 0/1, ``source``, ``view``, ``source_format``, ``width``, ``height``,
    ``bytes``): fitted on ``train``, scored on ``test``.

    Returns ``{"fitted_on": "train", "scored_on": "test", "n": test rows, "baselines": {name: {"features",
    "auc", "auc_ci"}}, "confounded": bool, "warning": str | None}``; a baseline's ``auc`` is None (with a
    ``reason``) when a split lacks a class or the column is absent (a version made before it existed)."""
    train = rows.filter(np.asarray(rows.column("split").to_pylist()) == "train")
    test = rows.filter(np.asarray(rows.column("split").to_pylist()) == "test")
    test_labels = np.asarray(test.column("label").to_pylist(), dtype=np.int64)
    train_labels = np.asarray(train.column("label").to_pylist(), dtype=np.int64)
    result: dict[str, Any] = {"fitted_on": "train", "scored_on": "test", "n": int(test.num_rows)}
    result["baselines"] = {}
    for name, features in BASELINES.items():
        entry: dict[str, Any] = {"features": list(features), "auc": None, "auc_ci": None}
        missing = [column for column in features if column not in rows.column_names]
        if missing:
            entry["reason"] = f"the dataset version has no {', '.join(missing)} column"
        elif len(set(train_labels)) < 2 or len(set(test_labels)) < 2:
            entry["reason"] = "the train or test split holds one class only"
        else:
            scores = (
                _category_scores(train, test, features[0])
                if len(features) == 1
                else _file_scores(train, test, name, seed)
            )
            interval = bootstrap_auc_ci(test_labels, scores, seed=seed)
            entry.update(auc=roc_auc(test_labels, scores), auc_ci=list(interval) if interval else None)
        result["baselines"][name] = entry
    source_auc = result["baselines"]["source"]["auc"]
    result["confounded"] = bool(source_auc is not None and source_auc >= CONFOUNDED_AUC)
    result["warning"] = None
    if result["confounded"]:
        result["warning"] = f"the source alone reaches test AUC {fmt(source_auc)}: {CONFOUNDED_WARNING}"
    return result


def describe(baselines: Mapping[str, Any]) -> str:
    """One line: each baseline's test AUC with its interval, e.g. ``source 0.97 (0.94-0.99), view ...``."""
    parts = []
    for name, entry in baselines["baselines"].items():
        ci = entry.get("auc_ci")
        parts.append(f"{name} {fmt(entry['auc'])}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""))
    return ", ".join(parts)


def verdict(test_auc: float | None, baselines: Mapping[str, Any]) -> dict[str, Any]:
    """Whether a model's pooled test AUC beats the shortcut baselines: above the upper end of every
    archive baseline's 95% interval (not :data:`CONTENT_BASELINES`'). ``{"beats_baselines": bool | None,
    "label": str | None}``: None when the model or no baseline has an AUC; ``label`` names the strongest
    baseline it does not beat."""
    measured = [
        (name, entry)
        for name, entry in baselines["baselines"].items()
        if entry.get("auc_ci") and name not in CONTENT_BASELINES
    ]
    if test_auc is None or not measured:
        return {"beats_baselines": None, "label": None}
    name, entry = max(measured, key=lambda item: item[1]["auc_ci"][1])
    low, high = entry["auc_ci"]
    if test_auc > high:
        return {"beats_baselines": True, "label": None}
    return {
        "beats_baselines": False,
        "label": f"the model's test AUC {fmt(test_auc)} does not beat the {name}-only baseline "
        f"(AUC {fmt(entry['auc'])}, 95% CI {low:.3f}-{high:.3f}): knowing the {name} alone scores as well",
    }
