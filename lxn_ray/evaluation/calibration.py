"""Calibrated probabilities: Platt scaling fitted on the validation split (:class:`Calibration`), and how
calibrated a model's probabilities are (Brier score, expected calibration error, the reliability
diagram's bins).

Why Platt scaling - a logistic map of the model's logit, ``sigmoid(slope * logit(p) + intercept)`` (Platt
1999; Niculescu-Mizil & Caruana, ICML 2005) - and not temperature scaling or isotonic regression:

- Temperature scaling (Guo et al., ICML 2017) is this map without the intercept. It cannot move the base
  rate, and here the base rate is off by construction: equation (1)'s class weights and balanced sampling
  train the model as if the classes were equally frequent. On the first two-source covid-vs-normal run it
  made test ECE worse (0.045 -> 0.205, T = 0.06) where Platt scaling gave Brier 0.243 -> 0.170.
- Isotonic regression needs far more validation films than these splits hold (tens to a few hundred), and
  its steps tie films the model ranked apart.

Two parameters fit on small splits, and with the slope kept positive the map is strictly increasing: it
changes no ranking - AUC, the ROC curve and every decision at the threshold stay as validated.

A model's card holds the fitted map (:meth:`Calibration.of_card`); every path that turns the model's
output into an answer - the endpoint, evaluation jobs, promotion - applies it. A card made before
calibration existed has none: its probabilities are served as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "Platt scaling (Platt 1999): sigmoid(slope * logit(p) + intercept), fitted on the validation split"
RELIABILITY_BINS = 10  # equal-width bins of the predicted probability, as in Guo et al.'s diagrams
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before the logit: a saturated float32 sigmoid
_LOG_SLOPE_BOUNDS = (-6.0, 6.0)  # slopes between e^-6 and e^6: positive, so the map keeps every ranking
_INTERCEPT_BOUNDS = (-30.0, 30.0)


def _logits(probabilities) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Calibration:
    """``sigmoid(slope * logit(p) + intercept)`` of a model's output probability ``p``; the identity by
    default (slope 1, intercept 0). ``slope`` must be a positive finite number (ValueError otherwise)."""

    slope: float = 1.0
    intercept: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.slope) and self.slope > 0 and np.isfinite(self.intercept)):
            raise ValueError(f"a calibration needs a positive finite slope and a finite intercept: {self}")

    @property
    def is_identity(self) -> bool:
        return self.slope == 1.0 and self.intercept == 0.0

    def __call__(self, probabilities) -> np.ndarray:
        """The calibrated probabilities of the model's outputs (any shape, float in [0, 1]): float64 of
        the same shape; the identity returns them unchanged (as float64)."""
        if self.is_identity:
            return np.asarray(probabilities, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-(self.slope * _logits(probabilities) + self.intercept)))

    @classmethod
    def fit(cls, labels, probabilities) -> Calibration:
        """The map minimising the negative log-likelihood of ``labels`` (int 0/1, ``(n,)``) under the
        calibrated ``probabilities``: L-BFGS-B over (log slope, intercept) within bounds
        (``scipy.optimize.minimize``). The identity when the labels hold one class only."""
        from scipy.optimize import minimize
        from scipy.special import log_expit

        y = np.asarray(labels, dtype=np.float64)
        z = _logits(probabilities)
        if y.size == 0 or y.min() == y.max():
            return cls()

        def nll(parameters: np.ndarray) -> float:
            scaled = np.exp(parameters[0]) * z + parameters[1]
            return float(-np.mean(y * log_expit(scaled) + (1.0 - y) * log_expit(-scaled)))

        result = minimize(nll, np.zeros(2), method="L-BFGS-B", bounds=[_LOG_SLOPE_BOUNDS, _INTERCEPT_BOUNDS])
        return cls(slope=float(np.exp(result.x[0])), intercept=float(result.x[1]))

    @classmethod
    def of_card(cls, card: Mapping[str, Any]) -> Calibration:
        """The map a model card records; the identity for a card made before calibration existed."""
        fitted = card.get("calibration") or {}
        return cls(float(fitted.get("slope", 1.0)), float(fitted.get("intercept", 0.0)))

    def as_dict(self) -> dict[str, float]:
        return {"slope": self.slope, "intercept": self.intercept}


def brier_score(labels, probabilities) -> float | None:
    """Mean squared difference between probability and label (Brier 1950; ``sklearn.metrics.
    brier_score_loss``): 0 is perfect, 0.25 is a constant 0.5. None for no films."""
    from sklearn.metrics import brier_score_loss

    y = np.asarray(labels)
    return float(brier_score_loss(y, np.asarray(probabilities, dtype=np.float64))) if y.size else None


def reliability_bins(labels, probabilities, bins: int = RELIABILITY_BINS) -> list[dict[str, float]]:
    """The reliability diagram's points: for each non-empty equal-width bin of the predicted probability
    (the last bin closed at 1), ``low``/``high`` (its edges), ``n``, ``mean_probability`` and
    ``observed`` (the fraction of positives in it)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    points = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            points.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(inside.sum()),
                    "mean_probability": float(p[inside].mean()),
                    "observed": float(y[inside].mean()),
                }
            )
    return points


def expected_calibration_error(labels, probabilities, bins: int = RELIABILITY_BINS) -> float | None:
    """ECE of the positive class's probability: ``sum_b n_b / n * |observed_b - mean_probability_b|`` over
    :func:`reliability_bins` (Naeini, Cooper & Hauskrecht, AAAI 2015; Guo et al. 2017 eq. 3, for a binary
    model's one probability). 0 is perfectly calibrated. None for no films."""
    points = reliability_bins(labels, probabilities, bins)
    total = sum(point["n"] for point in points)
    if not total:
        return None
    gaps = [point["n"] * abs(point["observed"] - point["mean_probability"]) for point in points]
    return float(sum(gaps) / total)


def summary(labels, raw: np.ndarray, calibrated: np.ndarray) -> dict[str, Any]:
    """Brier and ECE of one split before (``*_uncalibrated``) and after calibration, its ``n`` and the
    calibrated reliability bins."""
    return {
        "n": int(np.asarray(labels).size),
        "brier": brier_score(labels, calibrated),
        "ece": expected_calibration_error(labels, calibrated),
        "brier_uncalibrated": brier_score(labels, raw),
        "ece_uncalibrated": expected_calibration_error(labels, raw),
        "reliability": reliability_bins(labels, calibrated),
    }
