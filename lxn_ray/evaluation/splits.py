"""What a model version's card says of each split it was scored on: metrics pooled, per source and within
each source, the source-aware objective, the source-shortcut check in the task's words, and how many
images of each class each split holds (with a warning where there are too few for the metrics to mean
anything)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lxn_ray.data import dataset
from lxn_ray.evaluation import metrics
from lxn_ray.infra.storage import Storage

MIN_IMAGES_PER_CLASS = 20  # a split with fewer images of a class gets a warning: its metrics are noise


def source_evaluation(
    scored: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], threshold: float, task, seed: int = 0
) -> dict[str, Any]:
    """Per split: metrics pooled, per source and within each source holding both classes
    (:func:`lxn_ray.evaluation.metrics.group_metrics`), the source-aware objective with its basis, and the
    source-shortcut check (:func:`lxn_ray.evaluation.metrics.shortcut_check`, its classes named by the task).
    ``warnings`` collects the one-line shortcut warnings of the test split for the job summary."""
    result: dict[str, Any] = {"warnings": []}
    for split, (labels, scores, sources) in scored.items():
        groups = metrics.group_metrics(labels, scores, sources, threshold, seed=seed)
        objective, basis = metrics.source_aware_objective(groups["within_source"], groups["pooled"])
        shortcut = shortcut_check_for_task(labels, scores, sources, task, seed)
        result[split] = {**groups, "objective": objective, "objective_basis": basis, "shortcut": shortcut}
        if split == "test" and shortcut.get("warning"):
            result["warnings"].append(shortcut["warning"])
    return result


def shortcut_check_for_task(labels, scores, sources: list[str], task, seed: int = 0) -> dict[str, Any]:
    """:func:`lxn_ray.evaluation.metrics.shortcut_check` with its classes called by the task's label names."""
    shortcut = metrics.shortcut_check(labels, scores, sources, seed=seed)
    names = {"positive": task.positive_name, "negative": task.negative_name}

    def named(text: str) -> str:
        return text.replace("positive class", f"{names['positive']} class").replace(
            "negative class", f"{names['negative']} class"
        )

    shortcut["classes"] = {names[kind]: checks for kind, checks in shortcut["classes"].items()}
    shortcut["skipped"] = [named(reason) for reason in shortcut["skipped"]]
    if shortcut.get("warning"):
        shortcut["warning"] = named(shortcut["warning"])
    return shortcut


def split_counts(
    storage: Storage, version: str, task, sources: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[str]]:
    """Images per split, class and source for ``task``, and a warning for every split holding fewer than
    :data:`MIN_IMAGES_PER_CLASS` images of a class (model selection on it is noise)."""
    counts: dict[str, Any] = {}
    warnings = []
    table = dataset.read_split(storage, version, None, task, sources).select(["split", "label", "source"])
    every = table.to_pylist()
    for split in dataset.SPLITS:
        rows = [row for row in every if row["split"] == split]
        per_class = {task.label_name(label): sum(r["label"] == label for r in rows) for label in (1, 0)}
        by_source: dict[str, dict[str, int]] = {}
        for row in rows:
            name = task.label_name(row["label"])
            by_source.setdefault(row["source"], {task.positive_name: 0, task.negative_name: 0})[name] += 1
        counts[split] = {"images": len(rows), **per_class, "by_source": by_source}
        for name, count in per_class.items():
            if count < MIN_IMAGES_PER_CLASS:
                warnings.append(
                    f"the {split} split holds {count} {name} image(s) (< {MIN_IMAGES_PER_CLASS}): "
                    f"its metrics are noise"
                )
    return counts, warnings
