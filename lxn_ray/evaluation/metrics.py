"""Binary-classifier metrics the way reviewers read them, and the checks that keep them honest.

This module owns every number the service reports about a binary classifier (label 1 = the task's
positive class, e.g. COVID-19; label 0 = its negative class; the score is the model's probability of
label 1):

* AUC and the ROC curve (computed by scikit-learn), the operating threshold chosen on validation data
  (Youden's J), sensitivity, specificity, accuracy and the confusion matrix at that threshold;
* bootstrap intervals: of one AUC (:func:`bootstrap_auc_ci`) and of the difference of two models' AUCs on
  the same images (:func:`paired_bootstrap_auc_difference`);
* source-aware evaluation, for data pooled from several archives: metrics pooled, per source and within
  each source that holds both classes (:func:`group_metrics`), the source-shortcut check
  (:func:`shortcut_check`) and the model-selection objective (:func:`source_aware_objective`).

The bootstraps are stratified (by class) percentile bootstraps (Efron & Tibshirani, *An Introduction to
the Bootstrap*, Chapman & Hall 1993, ch. 13): each resample draws, with replacement, as many positive
images from the positives and as many negative images from the negatives as the data holds, so no resample
is one-class and the class mix stays that of the data; the interval is the (1 - confidence)/2 and
1 - (1 - confidence)/2 quantiles of the resampled statistic. DeLong's analytic variance is not used. The
AUCs of all resamples are computed at once from rank counts in numpy (no per-resample Python loop), which
equals the Mann-Whitney AUC with ties counted half, i.e. what ``roc_auc_score`` returns.

Inputs are array-likes: ``labels`` of 0/1 integers (or bools), shape (n,); ``scores`` of floats, shape
(n,); ``groups`` of source names (str), shape (n,). Training workers, the evaluation job and tests all
compute the same numbers through these functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SHORTCUT_CONFIDENCE = 0.95
"""Confidence level of the intervals used by :func:`shortcut_check`."""

SHORTCUT_MIN_EFFECT = 0.15
"""Smallest |AUC - 0.5| of a source-vs-source comparison inside one class that counts as a shortcut."""

SHORTCUT_RULE = (
    f"a comparison fires when, inside one class, the {SHORTCUT_CONFIDENCE:.0%} bootstrap interval of the AUC "
    f"of the model's score at telling one source from the others excludes 0.5 and "
    f"|AUC - 0.5| >= {SHORTCUT_MIN_EFFECT:.2f}"
)
"""The rule of :func:`shortcut_check`, in one sentence (it is copied into the check's result)."""

CLASS_NAMES = {0: "negative", 1: "positive"}
"""Names of the two classes in :func:`shortcut_check` results; callers map them to the task's labels."""

_BOOTSTRAP_CELLS = 4_000_000  # resamples x images drawn per vectorised block (bounds memory, ~100 MB)


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """labels -> int64 (n,) of 0/1, scores -> float64 (n,); ValueError on other labels or lengths."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} scores")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()) - {0, 1})}")
    return y, p


def _as_groups(groups, n: int) -> np.ndarray:
    """Source names -> str array (n,); ValueError when there are not exactly n of them."""
    g = np.array([str(name) for name in groups], dtype=str).reshape(-1)
    if g.size != n:
        raise ValueError(f"{n} labels but {g.size} groups")
    return g


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); None when one class is absent.

    Equals the Mann-Whitney statistic P(score of a positive > score of a negative), ties counted half.
    """
    y, p = _as_arrays(labels, scores)
    if y.sum() == 0 or y.sum() == y.size:
        return None
    from sklearn.metrics import roc_auc_score  # imported here: sklearn costs a process ~0.8 s to import

    return float(roc_auc_score(y, p))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), each float64 of shape (k + 1,).

    ``thresholds`` are +inf followed by the k distinct scores in descending order; at threshold t an image
    is called positive when its score >= t. Computed by ``sklearn.metrics.roc_curve`` with every threshold
    kept. With a class absent its rate is 0 throughout (not NaN), so the curve can still be drawn.
    """
    y, p = _as_arrays(labels, scores)
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    if positives and negatives:
        from sklearn.metrics import roc_curve as sklearn_roc_curve

        fpr, tpr, thresholds = sklearn_roc_curve(y, p, drop_intermediate=False)
        return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)
    thresholds = np.concatenate(([np.inf], np.unique(p)[::-1]))
    called = np.concatenate(([0], np.cumsum(np.unique(p, return_counts=True)[1][::-1])))  # n with p >= t
    rate = called / max(y.size, 1)
    zeros = np.zeros_like(rate)
    return (zeros, rate, thresholds) if positives else (rate if negatives else zeros, zeros, thresholds)


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
    sensitivity: float | None  # recall of the positive class; None without positives
    specificity: float | None  # recall of the negative class; None without negatives
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
    """AUC, and accuracy, sensitivity, specificity, confusion matrix calling score >= threshold positive."""
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


# --- bootstrap ------------------------------------------------------------------------------------------


def _resampled_aucs(
    positive_scores: np.ndarray,
    negative_scores: np.ndarray,
    positive_draw: np.ndarray,
    negative_draw: np.ndarray,
) -> np.ndarray:
    """AUC of each resample, float64 (R,), without a Python loop over resamples.

    ``positive_draw`` (R, P) and ``negative_draw`` (R, N) hold, per resample, indices into
    ``positive_scores`` (P,) and ``negative_scores`` (N,). Per resample, the negatives drawn are counted at
    each distinct score value; a running sum gives, for every drawn positive, how many drawn negatives score
    below it and how many tie with it. AUC = sum(below + tied / 2) / (P * N), the Mann-Whitney AUC.
    """
    n_pos, n_neg = positive_scores.size, negative_scores.size
    values, inverse = np.unique(np.concatenate((positive_scores, negative_scores)), return_inverse=True)
    inverse = inverse.reshape(-1)
    positive_rank, negative_rank = inverse[:n_pos], inverse[n_pos:]
    rows, width = negative_draw.shape[0], values.size
    offsets = (np.arange(rows, dtype=np.int64) * width)[:, None]
    counts = np.bincount((negative_rank[negative_draw] + offsets).ravel(), minlength=rows * width)
    counts = counts.reshape(rows, width)
    credit = (np.cumsum(counts, axis=1) - counts) + 0.5 * counts  # negatives below + half the ties
    wins = np.take_along_axis(credit, positive_rank[positive_draw], axis=1).sum(axis=1)
    return wins / (n_pos * n_neg)


def _stratified_bootstrap_aucs(
    y: np.ndarray, score_sets: Sequence[np.ndarray], resamples: int, seed: int
) -> list[np.ndarray]:
    """AUCs of ``resamples`` class-stratified resamples of (y, scores), float64 (resamples,) per score set.

    Every score set is evaluated on the same resamples (the pairing of
    :func:`paired_bootstrap_auc_difference`). ``y`` must hold both classes.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    positive, negative = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_CELLS // (2 * y.size))
    results = [np.empty(resamples) for _ in score_sets]
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        positive_draw = rng.integers(0, positive.size, (rows, positive.size))
        negative_draw = rng.integers(0, negative.size, (rows, negative.size))
        for result, scores in zip(results, score_sets, strict=True):
            result[start : start + rows] = _resampled_aucs(
                scores[positive], scores[negative], positive_draw, negative_draw
            )
    return results


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_auc_ci(
    labels, scores, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval (low, high) of the AUC; None when one class is absent.

    A stratified (by class) percentile bootstrap (Efron & Tibshirani 1993): ``resamples`` resamples of the
    images, each drawing with replacement as many positives from the positives and negatives from the
    negatives as the data holds; the bounds are the (1 - confidence)/2 and (1 + confidence)/2 quantiles of
    the resampled AUCs (linear interpolation). Seeded: the same call returns the same interval.
    """
    y, p = _as_arrays(labels, scores)
    if y.sum() == 0 or y.sum() == y.size:
        return None
    (aucs,) = _stratified_bootstrap_aucs(y, [p], resamples, seed)
    return _percentile_interval(aucs, confidence)


def fmt(value: float | None, digits: int = 3) -> str:
    """A metric for people: ``digits`` decimals, or ``n/a`` when undefined (e.g. AUC on a one-class split)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


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
    resampled_a, resampled_b = _stratified_bootstrap_aucs(y, [a, b], n_resamples, seed)
    return auc_a - auc_b, _percentile_interval(resampled_a - resampled_b, confidence)


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC measured on ``positives`` and ``negatives`` images (Hanley & McNeil 1982,
    Radiology 143:29, eq. 2): sqrt((A(1-A) + (n1-1)(Q1-A^2) + (n2-1)(Q2-A^2)) / (n1 n2)) with
    Q1 = A/(2-A), Q2 = 2A^2/(1+A). Unitless; ``inf`` when either class is empty. Used before any scores
    exist, to say how far apart two models must be on a split for it to tell them apart."""
    if positives < 1 or negatives < 1:
        return math.inf
    a = min(max(float(auc), 0.0), 1.0)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)
    return math.sqrt(max(variance, 0.0) / (positives * negatives))


def no_better_than_chance(auc_ci: Sequence[float] | None) -> bool:
    """True when an AUC interval [low, high] includes 0.5, or is None (no AUC): chance not ruled out."""
    if auc_ci is None:
        return True
    low, high = auc_ci
    return bool(low <= 0.5 <= high)


# --- source-aware evaluation -----------------------------------------------------------------------------


def _summary(y: np.ndarray, p: np.ndarray, threshold: float, resamples: int, seed: int) -> dict:
    result = binary_metrics(y, p, threshold)
    interval = bootstrap_auc_ci(y, p, resamples=resamples, seed=seed)
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "auc": result.auc,
        "auc_ci": list(interval) if interval else None,
        "sensitivity": result.sensitivity,
        "specificity": result.specificity,
        "accuracy": result.accuracy,
    }


def group_metrics(
    labels, scores, groups: Sequence[str], threshold: float, resamples: int = 2000, seed: int = 0
) -> dict:
    """Metrics over all images, per source, and within each source that holds both classes.

    ``labels`` (n,) 0/1, ``scores`` (n,) float, ``groups`` (n,) the source name (str) of each image;
    ``threshold``: an image is called positive when its score >= threshold. Returns::

        {"pooled": S, "per_source": {name: S}, "within_source": {name: S}}

    where each S is ``{"n", "positives", "auc", "auc_ci", "sensitivity", "specificity", "accuracy"}``
    (``auc`` None and ``auc_ci`` None where one class is absent; ``auc_ci`` is ``[low, high]`` from
    :func:`bootstrap_auc_ci` with ``resamples`` and ``seed``; sensitivity / specificity None without
    positives / negatives). ``per_source`` lists every source and ``within_source`` only those holding both
    classes, both sorted by name. A within-source AUC cannot be earned by recognising the source, a pooled
    one can (see :func:`source_aware_objective`).
    """
    y, p = _as_arrays(labels, scores)
    g = _as_groups(groups, y.size)
    per_source = {}
    for name in sorted(set(g.tolist())):
        mask = g == name
        per_source[name] = _summary(y[mask], p[mask], threshold, resamples, seed)
    return {
        "pooled": _summary(y, p, threshold, resamples, seed),
        "per_source": per_source,
        "within_source": {
            name: summary for name, summary in per_source.items() if 0 < summary["positives"] < summary["n"]
        },
    }


def _fires(auc: float, interval: tuple[float, float]) -> bool:
    low, high = interval
    return (low > 0.5 or high < 0.5) and abs(auc - 0.5) >= SHORTCUT_MIN_EFFECT


def shortcut_check(
    labels, scores, groups: Sequence[str], resamples: int = 2000, seed: int = 0, min_per_group: int = 5
) -> dict:
    """The source-shortcut check: inside one class, can the score tell the sources apart?

    Inside a class every image has the same truth, so a score that still differs by source has learned
    something about the source (archive, scanner, text markers, preprocessing), not the finding (DeGrave et
    al. 2021, Nature Machine Intelligence 3:610). For each class (0 "negative", 1 "positive"), the sources
    holding at least ``min_per_group`` images of that class are compared; smaller sources are left out and
    listed in ``skipped``, as is a class with fewer than two such sources. With exactly two sources A and B
    (sorted by name) one comparison is made: AUC = P(score of an A image > score of a B image), ties half.
    With three or more, each source is compared with the rest of them (one-vs-rest inside the class). Each
    AUC has a stratified (by source) percentile bootstrap interval at ``SHORTCUT_CONFIDENCE`` from
    ``resamples`` resamples and ``seed``. 0.5 means the score ignores the source.

    Rule (:data:`SHORTCUT_RULE`): a comparison fires when its 95% interval excludes 0.5 and
    |AUC - 0.5| >= :data:`SHORTCUT_MIN_EFFECT` (0.15): the difference must be both real (not resampling
    noise) and large enough to matter. Returns::

        {"rule": str, "fired": bool,
         "classes": {"negative": [C, ...], "positive": [C, ...]},   # [] where nothing was compared
         "skipped": [str, ...],
         "warning": str | None}                                       # one line, when any fired

    with each C ``{"source", "versus": [names], "n", "n_versus", "auc", "auc_ci": [low, high], "fired"}``.
    """
    if min_per_group < 1:
        raise ValueError(f"min_per_group must be >= 1, got {min_per_group}")
    y, p = _as_arrays(labels, scores)
    g = _as_groups(groups, y.size)
    classes: dict[str, list[dict]] = {}
    skipped: list[str] = []
    fired: list[tuple[str, dict]] = []
    for label, class_name in sorted(CLASS_NAMES.items()):
        classes[class_name] = []
        in_class = y == label
        names, counts = np.unique(g[in_class], return_counts=True)
        eligible = []
        for name, count in zip(names.tolist(), counts.tolist(), strict=True):
            if count < min_per_group:
                skipped.append(
                    f"{class_name} class: source {name} has {count} image(s) (< {min_per_group}), "
                    "not compared"
                )
            else:
                eligible.append(name)
        if len(eligible) < 2:
            held = f"only {eligible[0]}" if eligible else "none"
            skipped.append(
                f"{class_name} class: fewer than two sources with >= {min_per_group} images ({held}), "
                "no source comparison"
            )
            continue
        subjects = eligible[:1] if len(eligible) == 2 else eligible
        for name in subjects:
            versus = [other for other in eligible if other != name]
            keep = in_class & np.isin(g, eligible)
            is_source = (g[keep] == name).astype(np.int64)
            auc = roc_auc(is_source, p[keep])
            interval = bootstrap_auc_ci(
                is_source, p[keep], resamples=resamples, confidence=SHORTCUT_CONFIDENCE, seed=seed
            )
            comparison = {
                "source": name,
                "versus": versus,
                "n": int(is_source.sum()),
                "n_versus": int(is_source.size - is_source.sum()),
                "auc": auc,
                "auc_ci": list(interval),
                "fired": _fires(auc, interval),
            }
            classes[class_name].append(comparison)
            if comparison["fired"]:
                fired.append((class_name, comparison))
    return {
        "rule": SHORTCUT_RULE,
        "fired": bool(fired),
        "classes": classes,
        "skipped": skipped,
        "warning": _shortcut_warning(fired),
    }


def _shortcut_warning(fired: list[tuple[str, dict]]) -> str | None:
    """One line naming the strongest fired comparison, put so that its AUC reads above 0.5."""
    if not fired:
        return None
    class_name, strongest = max(fired, key=lambda item: abs(item[1]["auc"] - 0.5))
    auc, (low, high) = strongest["auc"], strongest["auc_ci"]
    source = strongest["source"]
    others = ", ".join(strongest["versus"])
    if len(strongest["versus"]) > 1:
        others = f"the other {class_name} sources ({others})"
    higher, lower = (source, others) if auc >= 0.5 else (others, source)
    if auc < 0.5:
        auc, low, high = 1 - auc, 1 - high, 1 - low
    more = f" (and {len(fired) - 1} more comparison(s))" if len(fired) > 1 else ""
    return (
        f"source shortcut: inside the {class_name} class the score tells {higher} from {lower} "
        f"(AUC {auc:.2f}, 95% CI {low:.2f}-{high:.2f}; {higher} scores higher){more}; "
        "the model may be recognising the archive, not the finding"
    )


def source_aware_objective(
    within_source: Mapping[str, Mapping], pooled: Mapping, min_per_class: int = 5
) -> tuple[float | None, str]:
    """The model-selection metric: (value, basis), the basis a sentence naming what the value is.

    The value is the unweighted mean of the within-source AUCs over the sources holding at least
    ``min_per_class`` images of each class (``within_source`` as in :func:`group_metrics`: name ->
    ``{"n", "positives", "auc", ...}``); basis e.g. ``"mean within-source AUC over hospital, ieee8023"``.
    When no source qualifies it falls back to ``pooled["auc"]`` (None when undefined), basis
    ``"pooled AUC (no source holds >= 5 images of each class)"``.

    Why: when sources differ in their class mix (e.g. COVID-19 images from one archive, other findings from
    another), a pooled AUC rewards a model that recognises the source rather than the disease (DeGrave,
    Janizek & Lee 2021, "AI for radiographic COVID-19 detection selects shortcuts over signal", Nature
    Machine Intelligence 3:610-619). Inside one source the source is constant, so only the image content can
    separate the classes. Each source counts equally, so a large source does not drown out the others.
    """
    qualifying = {
        name: summary["auc"]
        for name, summary in sorted(within_source.items())
        if summary.get("auc") is not None
        and summary["positives"] >= min_per_class
        and summary["n"] - summary["positives"] >= min_per_class
    }
    if qualifying:
        value = float(np.mean(list(qualifying.values())))
        return value, f"mean within-source AUC over {', '.join(qualifying)}"
    auc = pooled.get("auc")
    return (None if auc is None else float(auc)), (
        f"pooled AUC (no source holds >= {min_per_class} images of each class)"
    )


def selection_objective(
    labels, scores, groups: Sequence[str], min_per_class: int = 5
) -> tuple[float | None, str]:
    """:func:`source_aware_objective` straight from scores, without intervals: cheap enough for every
    epoch of every trial. ``labels`` (n,) 0/1, ``scores`` (n,), ``groups`` (n,) source names."""
    y, p = _as_arrays(labels, scores)
    g = _as_groups(groups, y.size)
    within = {}
    for name in sorted(set(g.tolist())):
        mask = g == name
        within[name] = {
            "n": int(mask.sum()),
            "positives": int(y[mask].sum()),
            "auc": roc_auc(y[mask], p[mask]),
        }
    return source_aware_objective(within, {"auc": roc_auc(y, p)}, min_per_class)


def _qualifying_sources(y: np.ndarray, g: np.ndarray, min_per_class: int) -> list[str]:
    return [
        name
        for name in sorted(set(g.tolist()))
        if (y[g == name] == 1).sum() >= min_per_class and (y[g == name] == 0).sum() >= min_per_class
    ]


def paired_bootstrap_objective_difference(
    labels,
    scores_a,
    scores_b,
    groups: Sequence[str],
    min_per_class: int = 5,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float | None, tuple[float, float] | None, str]:
    """Objective(a) - objective(b) on the same images, its paired bootstrap interval, and the basis.

    The objective is :func:`source_aware_objective`'s: the mean within-source AUC over the sources holding
    ``min_per_class`` images of each class, else the pooled AUC (then this is
    :func:`paired_bootstrap_auc_difference`). Within-source: every source is resampled on its own,
    stratified by class, with the same draws for both models; resample r's difference is the mean over
    sources of (AUC_a - AUC_b) in that source's resample r. (None, None, basis) when no AUC exists.
    """
    y, a = _as_arrays(labels, scores_a)
    _, b = _as_arrays(labels, scores_b)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} scores of model a but {b.size} of model b")
    g = _as_groups(groups, y.size)
    names = _qualifying_sources(y, g, min_per_class)
    if not names:
        difference, interval = paired_bootstrap_auc_difference(y, a, b, n_resamples, seed, confidence)
        return difference, interval, f"pooled AUC (no source holds >= {min_per_class} images of each class)"
    point, resampled = [], []
    for offset, name in enumerate(names):
        mask = g == name
        point.append(roc_auc(y[mask], a[mask]) - roc_auc(y[mask], b[mask]))
        auc_a, auc_b = _stratified_bootstrap_aucs(y[mask], [a[mask], b[mask]], n_resamples, seed + offset)
        resampled.append(auc_a - auc_b)
    interval = _percentile_interval(np.mean(resampled, axis=0), confidence)
    return float(np.mean(point)), interval, f"mean within-source AUC over {', '.join(names)}"
