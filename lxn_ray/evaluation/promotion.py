"""Whether a new model replaces the champion: one statistical rule, shared by tune and retrain.

Both models are scored on the SAME test images (the new model's dataset version, the task it was trained
for, each model at its own input size and its own threshold). The metric is the source-aware objective
(:func:`lxn_ray.evaluation.metrics.source_aware_objective`: the mean within-source AUC where sources hold both
classes, else the pooled AUC) and the comparison a paired bootstrap of its difference
(:func:`lxn_ray.evaluation.metrics.paired_bootstrap_objective_difference`). Rules:

* retrain (non-inferiority): promote when the lower bound of the 95% interval of
  objective(challenger) - objective(champion) is >= -margin: a model trained on more data may replace an
  equally good one.
* tune (superiority, ``margin=None``): promote only when the lower bound is > 0: a search on the same data
  must show it found something better, not noise - a constant-output model at AUC 0.500 does not "beat"
  0.483.
* guard, both: a challenger whose source-shortcut check fires on the test split
  (:func:`lxn_ray.evaluation.metrics.shortcut_check`) is never promoted automatically (``registry promote``
  still can),
  nor one whose training run collapsed to a constant or non-finite output (its card's ``collapsed``),
  nor one that is no better than chance: the 95% bootstrap interval of its test AUC includes 0.5, or there
  is no test AUC (:func:`lxn_ray.evaluation.metrics.no_better_than_chance`). It stays a published
  candidate; ``registry promote`` makes it the champion by hand, and the endpoint then flags every answer.
* a store without a champion takes the first model that passes the guard.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lxn_ray import registry
from lxn_ray.evaluation import metrics
from lxn_ray.evaluation.predict import score_registered
from lxn_ray.evaluation.splits import shortcut_check_for_task
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.tasks import resolve_task


def score_on_test(
    storage: Storage, model_version: str, version: str, task: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(labels, scores, sources, metrics) of a registered model on ``version``'s test split for ``task``
    (default: the model's own), at its own input size and threshold (chosen on its own validation split)."""
    labels, scores, sources, reference = score_registered(storage, model_version, version, "test", task)
    result = metrics.binary_metrics(labels, scores, reference.threshold)
    objective, basis = metrics.selection_objective(labels, scores, sources)
    auc_ci = metrics.bootstrap_auc_ci(labels, scores)
    return (
        labels,
        scores,
        sources,
        {
            "model_version": model_version,
            "objective": objective,
            "objective_basis": basis,
            "auc": result.auc,
            "auc_ci": list(auc_ci) if auc_ci else None,
            "no_better_than_chance": metrics.no_better_than_chance(auc_ci),
            "sensitivity": result.sensitivity,
            "specificity": result.specificity,
            "accuracy": result.accuracy,
            "threshold": result.threshold,
            "n": int(len(labels)),
            "positives": int(np.sum(labels)),
            "image_size": int(reference.card.get("config", {}).get("image_size", 0)) or None,
            "trained_on": reference.card.get("dataset_version"),
        },
    )


def evaluate_pair(
    storage: Storage,
    version: str,
    challenger: str,
    champion: str | None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Both models on the same test images (the challenger's task), the paired bootstrap of their
    objective difference, and the challenger's source-shortcut check."""
    card = registry.read_card(storage, challenger)
    task = registry.card_task(card)
    labels, challenger_scores, sources, challenger_metrics = score_on_test(storage, challenger, version, task)
    evaluation: dict[str, Any] = {
        "split": "test",
        "dataset_version": version,
        "task": registry.card_task_name(card),
        "n": challenger_metrics["n"],
        "positives": challenger_metrics["positives"],
        "challenger": challenger_metrics,
        "champion": None,
        "basis": challenger_metrics["objective_basis"],
        "difference": None,
        "difference_ci": None,
        "resamples": resamples,
        "shortcut": shortcut_check_for_task(labels, challenger_scores, sources, resolve_task(task), seed),
        "collapsed": bool(card.get("collapsed", False)),
    }
    if champion is None:
        return evaluation
    champion_labels, champion_scores, _, champion_metrics = score_on_test(storage, champion, version, task)
    if list(champion_labels) != list(labels):
        raise RuntimeError("the two models were not scored on the same test images")
    difference, interval, basis = metrics.paired_bootstrap_objective_difference(
        labels, challenger_scores, champion_scores, sources, n_resamples=resamples, seed=seed
    )
    evaluation.update(
        champion=champion_metrics,
        basis=basis,
        difference=difference,
        difference_ci=list(interval) if interval else None,
    )
    return evaluation


def guard(version: str, collapsed: bool, shortcut: dict[str, Any], test: dict[str, Any]) -> str | None:
    """Why ``version`` may not become the champion by itself, or None: the module's guard, shared by every
    job that promotes (tune, retrain, and train's first model). ``shortcut`` is a
    :func:`lxn_ray.evaluation.metrics.shortcut_check` result; ``test`` holds the test split's ``auc`` and
    ``auc_ci`` (``[low, high]`` or None)."""
    by_hand = f"kept as a candidate; `registry promote {version}` makes it the champion by hand"
    if collapsed:
        return f"{version}'s training run collapsed to a constant or non-finite output"
    if shortcut.get("fired"):
        return f"{shortcut.get('warning')} ({by_hand})"
    if metrics.no_better_than_chance(test.get("auc_ci")):
        ci = test.get("auc_ci")
        measured = (
            f"test AUC {metrics.fmt(test.get('auc'))}, 95% CI {ci[0]:.3f}-{ci[1]:.3f} includes 0.5"
            if ci
            else "no test AUC (one class in the test split)"
        )
        return f"{version} is no better than chance ({measured}): {by_hand}"
    return None


def decide(
    evaluation: dict[str, Any], challenger: str, champion: str | None, margin: float | None
) -> tuple[bool, str]:
    """(promote?, why) by the module's rules; ``margin`` None is tune's superiority rule."""
    if challenger == champion:
        return False, f"{challenger} is already the champion"
    refused = guard(
        challenger,
        bool(evaluation.get("collapsed")),
        evaluation.get("shortcut") or {},
        evaluation.get("challenger") or {},
    )
    if refused:
        return False, refused
    if champion is None:
        return True, (
            f"no champion yet: {challenger} is the first model to pass the guard (no collapse, no source "
            "shortcut, better than chance)"
        )
    difference, interval = evaluation["difference"], evaluation["difference_ci"]
    if difference is None or interval is None:
        return False, "no AUC on the test split (one class): no comparison possible; champion kept"
    low, high = interval
    stated = (
        f"{evaluation['basis']}: difference (challenger - champion) {difference:+.3f}, 95% CI "
        f"[{low:+.3f}, {high:+.3f}] on {evaluation['n']} test images"
    )
    if margin is None:
        if low > 0:
            return True, f"{stated}: lower bound > 0, better beyond noise"
        return False, f"{stated}: lower bound <= 0, not shown to be better; champion kept"
    if low >= -margin:
        return True, f"{stated}: lower bound >= -{margin:g}, not worse beyond the margin"
    return False, f"{stated}: lower bound < -{margin:g}, possibly worse beyond the margin; champion kept"
