"""Binary-classifier metrics the way reviewers read them: AUC with a bootstrap interval, the operating
threshold chosen on validation data (Youden's J), sensitivity, specificity and the confusion matrix.

Plain numpy, so training workers, the evaluation job and tests all compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} scores")
    return y, p


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None when one class is absent."""
    y, p = _as_arrays(labels, scores)
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse]  # 1-based ranks, ties share their average
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending; predict >= t."""
    y, p = _as_arrays(labels, scores)
    thresholds = np.concatenate(([np.inf], np.unique(p)[::-1]))
    positives, negatives = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    tpr = np.array([((p >= t) & (y == 1)).sum() / positives for t in thresholds])
    fpr = np.array([((p >= t) & (y == 0)).sum() / negatives for t in thresholds])
    return fpr, tpr, thresholds


def youden_threshold(labels, scores) -> float:
    """The threshold maximising sensitivity + specificity - 1 on (validation) data.

    Ties go to the higher threshold (fewer positive calls). With one class missing the default 0.5 is
    returned, since no threshold can be chosen honestly.
    """
    y, _ = _as_arrays(labels, scores)
    if y.sum() == 0 or y.sum() == y.size:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # skip the +inf threshold that calls nothing positive
    return float(thresholds[best])


@dataclass(frozen=True)
class BinaryMetrics:
    auc: float | None
    accuracy: float
    sensitivity: float | None  # recall of COVID-19; None without positives
    specificity: float | None  # recall of other findings; None without negatives
    threshold: float
    confusion: list[list[int]]  # [[TN, FP], [FN, TP]]: rows are the truth, columns the prediction

    def as_dict(self) -> dict:
        return {
            "auc": self.auc,
            "accuracy": self.accuracy,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "threshold": self.threshold,
            "confusion": self.confusion,
        }


def binary_metrics(labels, scores, threshold: float) -> BinaryMetrics:
    y, p = _as_arrays(labels, scores)
    predicted = (p >= threshold).astype(np.int64)
    tp = int(((predicted == 1) & (y == 1)).sum())
    tn = int(((predicted == 0) & (y == 0)).sum())
    fp = int(((predicted == 1) & (y == 0)).sum())
    fn = int(((predicted == 0) & (y == 1)).sum())
    return BinaryMetrics(
        auc=roc_auc(y, p),
        accuracy=(tp + tn) / y.size if y.size else 0.0,
        sensitivity=tp / (tp + fn) if tp + fn else None,
        specificity=tn / (tn + fp) if tn + fp else None,
        threshold=float(threshold),
        confusion=[[tn, fp], [fn, tp]],
    )


def bootstrap_auc_ci(
    labels, scores, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the AUC (resampling images, stratified by class)."""
    y, p = _as_arrays(labels, scores)
    positive, negative = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if positive.size == 0 or negative.size == 0:
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(resamples):
        sample = np.concatenate((rng.choice(positive, positive.size), rng.choice(negative, negative.size)))
        aucs.append(roc_auc(y[sample], p[sample]))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(low), float(high)


def fmt(value: float | None) -> str:
    """A metric for people: three decimals, or ``n/a`` when undefined (e.g. AUC on a one-class split)."""
    return "n/a" if value is None else f"{value:.3f}"


def paired_bootstrap_auc_difference(
    labels, scores_a, scores_b, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float | None, tuple[float, float] | None]:
    """AUC(a) - AUC(b) on the same images, and its percentile bootstrap interval (95% by default).

    Paired: every resample draws the same images for both models, so what the two have in common (which
    images are hard) cancels and the interval is much narrower than two separate ones. Resampling is
    stratified by class, as in :func:`bootstrap_auc_ci`, so no resample is one-class; with one class in
    the data itself no AUC exists and ``(None, None)`` is returned.
    """
    y, a = _as_arrays(labels, scores_a)
    _, b = _as_arrays(labels, scores_b)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} scores of model a but {b.size} of model b")
    auc_a, auc_b = roc_auc(y, a), roc_auc(y, b)
    if auc_a is None or auc_b is None:
        return None, None
    positive, negative = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    differences = np.empty(n_resamples)
    for i in range(n_resamples):
        sample = np.concatenate((rng.choice(positive, positive.size), rng.choice(negative, negative.size)))
        differences[i] = roc_auc(y[sample], a[sample]) - roc_auc(y[sample], b[sample])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return auc_a - auc_b, (float(low), float(high))
