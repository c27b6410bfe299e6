"""Metrics: sklearn-backed AUC/ROC, the (paired) bootstrap intervals, and source-aware evaluation."""

import time

import numpy as np
import pytest

from lxn_ray.evaluation.metrics import (
    SHORTCUT_MIN_EFFECT,
    SHORTCUT_RULE,
    _resampled_aucs,
    binary_metrics,
    bootstrap_auc_ci,
    group_metrics,
    no_better_than_chance,
    paired_bootstrap_auc_difference,
    roc_auc,
    roc_curve,
    shortcut_check,
    source_aware_objective,
    youden_threshold,
)


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


# --- AUC and ROC from scikit-learn --------------------------------------------------------------------


def test_roc_auc_counts_ties_half_and_needs_both_classes():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.5, 0.5, 0.9, 0.3, 0.3]
    # pairs (positive, negative): 0.5 beats 0.1, 0.3 and ties 0.5; 0.9 beats all three; 0.3 beats 0.1,
    # ties 0.3 and loses to 0.5 -> (2.5 + 3 + 1.5) / 9
    assert roc_auc(labels, scores) == pytest.approx(7 / 9)
    assert roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert roc_auc([0, 0], [0.1, 0.2]) is None
    assert bootstrap_auc_ci([0, 0], [0.1, 0.2]) is None
    with pytest.raises(ValueError):
        roc_auc([0, 2], [0.1, 0.2])


def test_roc_curve_thresholds_and_youden():
    fpr, tpr, thresholds = roc_curve([0, 1, 1, 0], [0.1, 0.5, 0.5, 0.3])
    assert thresholds[0] == np.inf
    assert list(thresholds[1:]) == [0.5, 0.3, 0.1]  # every distinct score, descending
    assert list(tpr) == [0.0, 1.0, 1.0, 1.0]  # called positive when score >= threshold
    assert list(fpr) == [0.0, 0.0, 0.5, 1.0]
    assert youden_threshold([0, 1, 1, 0], [0.1, 0.5, 0.5, 0.3]) == 0.5
    # one class: the absent class's rate is 0, not NaN, and the threshold falls back to 0.5
    fpr, tpr, _ = roc_curve([1, 1], [0.2, 0.7])
    assert list(fpr) == [0.0, 0.0, 0.0] and list(tpr) == [0.0, 0.5, 1.0]
    assert youden_threshold([1, 1], [0.2, 0.7]) == 0.5


def test_vectorised_resample_aucs_match_roc_auc_per_resample():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50), 1)  # many ties
    positive, negative = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    positive_draw = rng.integers(0, positive.size, (30, positive.size))
    negative_draw = rng.integers(0, negative.size, (30, negative.size))
    fast = _resampled_aucs(scores[positive], scores[negative], positive_draw, negative_draw)
    for row in range(30):
        sample = np.concatenate((positive[positive_draw[row]], negative[negative_draw[row]]))
        assert fast[row] == pytest.approx(roc_auc(labels[sample], scores[sample]), abs=1e-12)


def test_bootstrap_interval_is_seeded_and_surrounds_the_auc():
    labels, strong, _ = _scores(4, n=200)
    low, high = bootstrap_auc_ci(labels, strong, resamples=500)
    assert low < roc_auc(labels, strong) < high
    assert bootstrap_auc_ci(labels, strong, resamples=500) == (low, high)
    assert bootstrap_auc_ci(labels, strong, resamples=500, seed=1) != (low, high)


def test_bootstrap_is_fast():
    labels, strong, weak = _scores(5, n=500)
    started = time.perf_counter()
    assert bootstrap_auc_ci(labels, strong, resamples=2000) is not None
    assert time.perf_counter() - started < 1.5
    started = time.perf_counter()
    paired_bootstrap_auc_difference(labels, strong, weak, n_resamples=2000)
    assert time.perf_counter() - started < 1.5


def test_no_better_than_chance():
    assert no_better_than_chance(None)
    assert no_better_than_chance([0.45, 0.7])
    assert no_better_than_chance((0.3, 0.5))
    assert not no_better_than_chance([0.55, 0.8])
    assert not no_better_than_chance([0.1, 0.4])


# --- source-aware evaluation --------------------------------------------------------------------------


def test_group_metrics_pooled_per_source_and_within_source():
    rng = np.random.default_rng(6)
    # hospital: both classes; covid_archive: positives only; normals: negatives only
    groups = ["hospital"] * 40 + ["covid_archive"] * 25 + ["normals"] * 30
    labels = np.array([0] * 20 + [1] * 20 + [1] * 25 + [0] * 30)
    scores = labels * 0.4 + rng.random(labels.size) * 0.6
    result = group_metrics(labels, scores, groups, threshold=0.5, resamples=200)
    keys = {"n", "positives", "auc", "auc_ci", "sensitivity", "specificity", "accuracy"}
    assert set(result) == {"pooled", "per_source", "within_source"}
    assert set(result["pooled"]) == keys
    assert (result["pooled"]["n"], result["pooled"]["positives"]) == (95, 45)
    assert result["pooled"]["auc"] == pytest.approx(roc_auc(labels, scores))
    assert result["pooled"]["accuracy"] == binary_metrics(labels, scores, 0.5).accuracy
    assert list(result["per_source"]) == ["covid_archive", "hospital", "normals"]
    assert {name: (s["n"], s["positives"]) for name, s in result["per_source"].items()} == {
        "covid_archive": (25, 25),
        "hospital": (40, 20),
        "normals": (30, 0),
    }
    archive = result["per_source"]["covid_archive"]
    assert archive["auc"] is None and archive["auc_ci"] is None and archive["specificity"] is None
    assert list(result["within_source"]) == ["hospital"]
    hospital = result["within_source"]["hospital"]
    assert set(hospital) == keys
    low, high = hospital["auc_ci"]
    assert low <= hospital["auc"] <= high
    assert hospital["auc"] == pytest.approx(roc_auc(labels[:40], scores[:40]))
    with pytest.raises(ValueError):
        group_metrics(labels, scores, groups[:-1], threshold=0.5)


def _class_with_two_sources(shift: float, seed: int, n: int = 60):
    """Negatives from sources a and b (scores ~0.2 and ~0.2 + shift), positives from a single source c."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate(
        (rng.normal(0.2, 0.1, n), rng.normal(0.2 + shift, 0.1, n), rng.normal(0.8, 0.1, n))
    )
    labels = np.array([0] * (2 * n) + [1] * n)
    groups = ["a"] * n + ["b"] * n + ["c"] * n
    return labels, scores, groups


def test_shortcut_fires_when_the_score_tells_the_sources_apart():
    labels, scores, groups = _class_with_two_sources(shift=0.5, seed=7)
    result = shortcut_check(labels, scores, groups, resamples=500)
    assert result["fired"] is True
    assert result["rule"] == SHORTCUT_RULE and "0.15" in result["rule"]
    (comparison,) = result["classes"]["negative"]
    assert comparison["source"] == "a" and comparison["versus"] == ["b"]
    assert (comparison["n"], comparison["n_versus"]) == (60, 60)
    assert comparison["auc"] < 0.1  # a scores lower than b: P(score of a > score of b) is small
    assert comparison["auc_ci"][1] < 0.5 and comparison["fired"] is True
    # the only positive source is not compared, and says why
    assert result["classes"]["positive"] == []
    assert any(reason.startswith("positive class") and "only c" in reason for reason in result["skipped"])
    warning = result["warning"]
    # put the way round that reads above 0.5: b scores higher than a
    assert warning.startswith("source shortcut: inside the negative class the score tells b from a (AUC ")
    assert f"(AUC {1 - comparison['auc']:.2f}, 95% CI {1 - comparison['auc_ci'][1]:.2f}-" in warning
    assert "recognising the archive" in warning and "\n" not in warning


def test_shortcut_does_not_fire_when_scores_ignore_the_source():
    labels, scores, groups = _class_with_two_sources(shift=0.0, seed=8)
    result = shortcut_check(labels, scores, groups, resamples=500)
    assert result["fired"] is False and result["warning"] is None
    (comparison,) = result["classes"]["negative"]
    assert comparison["fired"] is False
    assert abs(comparison["auc"] - 0.5) < SHORTCUT_MIN_EFFECT


def test_shortcut_small_effect_that_is_real_does_not_fire():
    """A shift the interval detects but smaller than the minimum effect: real, too small to report."""
    labels, scores, groups = _class_with_two_sources(shift=0.03, seed=9, n=3000)
    (comparison,) = shortcut_check(labels, scores, groups, resamples=300)["classes"]["negative"]
    assert comparison["auc_ci"][1] < 0.5  # excludes 0.5 ...
    assert abs(comparison["auc"] - 0.5) < SHORTCUT_MIN_EFFECT  # ... but the effect is small
    assert comparison["fired"] is False


def test_shortcut_one_vs_rest_and_tiny_sources():
    rng = np.random.default_rng(10)
    # positives from three sources (x scores high), plus a tiny source of 3 positives; negatives from one
    scores = np.concatenate(
        (rng.normal(0.9, 0.05, 40), rng.normal(0.6, 0.1, 40), rng.normal(0.6, 0.1, 40), [0.5, 0.6, 0.7])
    )
    scores = np.concatenate((scores, rng.normal(0.2, 0.1, 50)))
    groups = ["x"] * 40 + ["y"] * 40 + ["z"] * 40 + ["tiny"] * 3 + ["n"] * 50
    labels = np.array([1] * 123 + [0] * 50)
    result = shortcut_check(labels, scores, groups, resamples=300, min_per_group=5)
    comparisons = {c["source"]: c for c in result["classes"]["positive"]}
    assert set(comparisons) == {"x", "y", "z"}  # tiny is left out, of the rest too
    assert comparisons["x"]["versus"] == ["y", "z"]
    assert (comparisons["x"]["n"], comparisons["x"]["n_versus"]) == (40, 80)
    assert comparisons["x"]["fired"] and comparisons["x"]["auc"] > 0.9
    assert any("tiny has 3 image(s) (< 5)" in reason for reason in result["skipped"])
    assert result["classes"]["negative"] == []  # a single negative source
    assert "the other positive sources (y, z)" in result["warning"]


# --- model-selection objective ------------------------------------------------------------------------


def test_objective_is_mean_within_source_auc_where_sources_qualify():
    within = {
        "ieee8023": {"n": 30, "positives": 10, "auc": 0.8},
        "hospital": {"n": 40, "positives": 20, "auc": 0.6},
        "small": {"n": 6, "positives": 2, "auc": 0.1},  # < 5 positives: left out
    }
    value, basis = source_aware_objective(within, {"auc": 0.99})
    assert value == pytest.approx(0.7)
    assert basis == "mean within-source AUC over hospital, ieee8023"


def test_objective_falls_back_to_pooled_auc():
    within = {"small": {"n": 6, "positives": 2, "auc": 0.1}}
    assert source_aware_objective(within, {"auc": 0.93}) == (
        0.93,
        "pooled AUC (no source holds >= 5 images of each class)",
    )
    assert source_aware_objective({}, {"auc": None}, min_per_class=3) == (
        None,
        "pooled AUC (no source holds >= 3 images of each class)",
    )
    # the same call on group_metrics output
    labels, scores, groups = _class_with_two_sources(shift=0.5, seed=11)
    result = group_metrics(labels, scores, groups, threshold=0.5, resamples=50)
    assert result["within_source"] == {}
    assert source_aware_objective(result["within_source"], result["pooled"]) == (
        result["pooled"]["auc"],
        "pooled AUC (no source holds >= 5 images of each class)",
    )
