"""How well a lung-field segmenter agrees with the true masks: per-film Dice and IoU, their mean over
films, and a 95% interval from a bootstrap that resamples patients.

Dice (Dice, 1945; Sorensen, 1948) ``2|A n B| / (|A| + |B|)`` and IoU (Jaccard, 1912) ``|A n B| / |A u B|``
of the predicted and the true mask, computed at the film's own resolution by the caller (the prediction
upsampled to the film). Both are 1 when both masks are empty (perfect agreement on "no lung"). The
interval is a percentile cluster bootstrap (Davison & Hinkley, 1997, section 3.8): a patient's films are
correlated, so whole patients are drawn with replacement and the mean is taken over all their films; the
conventions (percentile bounds, seeded, 2000 resamples) are those of :mod:`lxn_ray.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
_BOOTSTRAP_BLOCK = 500  # resamples drawn per vectorised block (bounds memory for many patients)


def dice_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two boolean masks of the same shape; (1.0, 1.0) when both are empty. Raises
    ValueError when the shapes differ."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {predicted.shape} and {truth.shape}")
    overlap = int(np.count_nonzero(predicted & truth))
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0, 1.0
    return 2.0 * overlap / total, overlap / (total - overlap)


def cluster_bootstrap_ci(
    values: Sequence[float],
    groups: Sequence[str],
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile interval (low, high) of the mean of ``values`` (one per film) when whole ``groups``
    (patients, one per film) are resampled with replacement; None for no films. Seeded: the same call
    returns the same interval. Raises ValueError when the lengths differ or ``confidence`` is not in (0, 1).
    """
    values_array = np.asarray(values, dtype=np.float64)
    if values_array.size != len(groups):
        raise ValueError(f"{values_array.size} values but {len(groups)} groups")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if values_array.size == 0:
        return None
    _, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    sums = np.bincount(index, weights=values_array)
    counts = np.bincount(index).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _BOOTSTRAP_BLOCK):
        rows = min(_BOOTSTRAP_BLOCK, resamples - start)
        drawn = rng.integers(0, sums.size, size=(rows, sums.size))
        means[start : start + rows] = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize(
    predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray], patients: Sequence[str], seed: int = 0
) -> dict[str, Any]:
    """The segmentation metrics of one split: ``dice`` and ``iou`` (each ``{"value": mean over films,
    "interval": [low, high] patient-bootstrap 95%}``), ``per_film`` ``{"dice": [...], "iou": [...]}``
    in input order, and ``n_films``/``n_patients``. Masks are paired by position; each pair must match
    in shape (the film's own resolution)."""
    if not len(predicted) == len(truth) == len(patients):
        raise ValueError(f"{len(predicted)} predictions, {len(truth)} masks, {len(patients)} patients")
    scores = [dice_iou(p, t) for p, t in zip(predicted, truth, strict=True)]
    dice = [s[0] for s in scores]
    iou = [s[1] for s in scores]
    result: dict[str, Any] = {"n_films": len(scores), "n_patients": len(set(patients))}
    for name, values in (("dice", dice), ("iou", iou)):
        interval = cluster_bootstrap_ci(values, patients, seed=seed)
        result[name] = {
            "value": float(np.mean(values)) if values else None,
            "interval": list(interval) if interval else None,
        }
    result["per_film"] = {"dice": dice, "iou": iou}
    return result
