"""The paired bootstrap of an AUC difference: the point difference, its interval, and the one-class case."""

import numpy as np
import pytest

from lxn_ray.metrics import paired_bootstrap_auc_difference, roc_auc


def _scores(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    strong = labels * 1.0 + rng.normal(0, 0.6, n)  # separates the classes well
    weak = labels * 0.2 + rng.normal(0, 0.6, n)  # barely
    return labels, strong, weak


def test_difference_and_interval_of_a_better_model():
    labels, strong, weak = _scores(0)
    difference, (low, high) = paired_bootstrap_auc_difference(labels, strong, weak, n_resamples=500)
    assert difference == pytest.approx(roc_auc(labels, strong) - roc_auc(labels, weak))
    assert 0 < low < difference < high
    # The same call gives the same interval (seeded); the reversed pair mirrors it.
    assert paired_bootstrap_auc_difference(labels, strong, weak, n_resamples=500)[1] == (low, high)
    back, (back_low, back_high) = paired_bootstrap_auc_difference(labels, weak, strong, n_resamples=500)
    assert back == pytest.approx(-difference)
    assert (back_low, back_high) == pytest.approx((-high, -low))


def test_identical_models_differ_by_exactly_zero():
    labels, strong, _ = _scores(1)
    same = paired_bootstrap_auc_difference(labels, strong, strong.copy(), n_resamples=200)
    assert same == (0.0, (0.0, 0.0))


def test_pairing_narrows_the_interval():
    """Two models that share most of their errors: pairing cancels what they share."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 80)
    shared = labels * 0.8 + rng.normal(0, 0.7, 80)
    a, b = shared + rng.normal(0, 0.05, 80), shared + rng.normal(0, 0.05, 80)
    _, (low, high) = paired_bootstrap_auc_difference(labels, a, b, n_resamples=500)
    assert high - low < 0.05  # separate intervals of each AUC are ~0.2 wide here


def test_one_class_and_mismatched_inputs():
    assert paired_bootstrap_auc_difference([1, 1, 1], [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]) == (None, None)
    with pytest.raises(ValueError):
        paired_bootstrap_auc_difference([0, 1, 1], [0.1, 0.5, 0.9], [0.2, 0.3])
    # a tiny two-class set: every stratified resample keeps both classes, so the interval exists
    difference, interval = paired_bootstrap_auc_difference([0, 1], [0.2, 0.8], [0.8, 0.2], n_resamples=50)
    assert difference == 1.0 and interval == (1.0, 1.0)
