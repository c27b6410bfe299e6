"""Platt scaling, Brier score, expected calibration error and the reliability bins
(lxn_ray.evaluation.calibration) on hand-made and simulated scores."""

from __future__ import annotations

import numpy as np
import pytest

from lxn_ray.evaluation import calibration
from lxn_ray.evaluation.calibration import Calibration
from lxn_ray.evaluation.metrics import roc_auc


def simulated(
    slope: float, intercept: float, n: int = 20_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(slope * z + intercept) and a model that outputs sigmoid(z): over-confident
    (slope < 1) and with its base rate off (intercept != 0), as a class-weighted model is."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-(slope * z + intercept)))).astype(np.int64)
    return labels, 1.0 / (1.0 + np.exp(-z))


def test_platt_scaling_recovers_the_miscalibration_and_keeps_the_ranking():
    labels, outputs = simulated(slope=0.4, intercept=-1.0)
    fitted = Calibration.fit(labels, outputs)
    assert fitted.slope == pytest.approx(0.4, rel=0.06) and fitted.intercept == pytest.approx(-1.0, abs=0.08)
    calibrated = fitted(outputs)
    assert roc_auc(labels, calibrated) == pytest.approx(roc_auc(labels, outputs), abs=1e-12)
    assert np.all(np.diff(calibrated[np.argsort(outputs)]) >= 0)  # increasing: no decision changes order
    before = calibration.expected_calibration_error(labels, outputs)
    after = calibration.expected_calibration_error(labels, calibrated)
    assert before > 0.1 and after < 0.02
    assert calibration.brier_score(labels, calibrated) < calibration.brier_score(labels, outputs)


def test_a_calibrated_model_keeps_the_identity_and_edge_cases():
    labels, outputs = simulated(slope=1.0, intercept=0.0, seed=1)
    fitted = Calibration.fit(labels, outputs)
    assert fitted.slope == pytest.approx(1.0, rel=0.05) and fitted.intercept == pytest.approx(0.0, abs=0.05)
    assert Calibration.fit([1, 1, 1], [0.2, 0.7, 0.9]).is_identity  # one class: nothing to fit
    # a model that ranks the wrong way round on val still gets an increasing map (slope at its bound)
    assert Calibration.fit([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]).slope > 0
    np.testing.assert_array_equal(Calibration()([0.0, 0.3, 1.0]), [0.0, 0.3, 1.0])
    saturated = Calibration(slope=0.5)([0.0, 1.0])  # float32 sigmoids saturate: finite, in (0, 1)
    assert np.all(np.isfinite(saturated)) and 0 < saturated[0] < 0.01 and 0.99 < saturated[1] < 1
    with pytest.raises(ValueError, match="positive finite slope"):
        Calibration(slope=0.0)


def test_brier_ece_and_reliability_bins_by_hand():
    labels = [0, 0, 1, 1, 1]
    probabilities = [0.05, 0.15, 0.15, 0.95, 1.0]
    assert calibration.brier_score(labels, probabilities) == pytest.approx(
        (0.05**2 + 0.15**2 + 0.85**2 + 0.05**2 + 0.0) / 5
    )
    bins = calibration.reliability_bins(labels, probabilities)
    assert [(b["low"], b["n"]) for b in bins] == [(0.0, 1), (0.1, 2), (0.9, 2)]  # 1.0 in the last bin
    assert bins[1]["observed"] == 0.5 and bins[1]["mean_probability"] == pytest.approx(0.15)
    # ECE = 1/5 |0 - 0.05| + 2/5 |0.5 - 0.15| + 2/5 |1 - 0.975|
    assert calibration.expected_calibration_error(labels, probabilities) == pytest.approx(
        0.05 / 5 + 2 / 5 * 0.35 + 2 / 5 * 0.025
    )
    assert calibration.expected_calibration_error([], []) is None and calibration.brier_score([], []) is None


def test_a_card_without_calibration_is_served_as_saved():
    assert Calibration.of_card({"threshold": 0.4}).is_identity
    fitted = Calibration(1.7, -0.2)
    assert Calibration.of_card({"calibration": {**fitted.as_dict(), "method": "..."}}) == fitted
