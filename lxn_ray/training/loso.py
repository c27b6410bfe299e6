"""Leave-one-source-out: how a model does on a source it never saw, next to how it does on its own.

For every source of a dataset version that holds rows of the task, one LxN is trained (through
:func:`lxn_ray.training.train.train`, so a run is watched, checkpointed and published as a model version like
any
other) on every *other* source - their train split to learn, their val split to pick the epoch and the
threshold - and scored on *all* rows of the source left out (every split: none of it was seen). Its
internal test metrics (the other sources' test split) sit beside the held-out ones. A model whose
internal AUC is high and held-out AUC near or below 0.5 learned something that does not travel - most
often which archive a film came from (DeGrave et al. 2021). Models trained here are never promoted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lxn_ray.data import dataset
from lxn_ray.evaluation import metrics, predict
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.resources import DEFAULT_STALL_TIMEOUT_S
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.tasks import resolve_task
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.train import train

log = get_logger("loso").info  # progress for the person watching; stdout keeps the summary


def held_out_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float, seed: int = 0
) -> dict[str, Any]:
    """n, positives, AUC with its 95% interval, and sensitivity/specificity at the model's threshold."""
    result = metrics.binary_metrics(labels, scores, threshold)
    interval = metrics.bootstrap_auc_ci(labels, scores, seed=seed)
    return {
        "n": int(len(labels)),
        "positives": int(np.sum(labels)),
        "auc": result.auc,
        "auc_ci": list(interval) if interval else None,
        "no_better_than_chance": metrics.no_better_than_chance(interval),
        "sensitivity": result.sensitivity,
        "specificity": result.specificity,
        "accuracy": result.accuracy,
        "threshold": threshold,
    }


def leave_one_source_out(
    storage: Storage,
    dataset_version: str | None,
    config: TrainConfig,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
) -> dict[str, Any]:
    """Train on all sources but one, for each source in turn; the job's report.

    Raises ValueError when the version holds fewer than two sources with rows of the task.
    """
    version = dataset.resolve_version(storage, dataset_version)
    task = resolve_task(config.task)
    rows = dataset.read_split(storage, version, None, task).select(["source", "label"]).to_pylist()
    sources = sorted({row["source"] for row in rows})
    if len(sources) < 2:
        raise ValueError(
            f"dataset {version} holds {len(sources)} source(s) with rows of {task.name}: need two"
        )
    folds = []
    for held_out in sources:
        training = tuple(name for name in sources if name != held_out)
        log(f"holding out {held_out}: training on {', '.join(training)}")
        published = train(
            storage,
            version,
            dataclasses.replace(config, sources=training),
            stall_timeout_s=stall_timeout_s,
        )
        loaded = predict.load(storage, published["model_version"])
        labels, scores, _ = predict.score_split(
            loaded.model,
            storage,
            version,
            None,
            loaded.image_size,
            config.task,
            (held_out,),
            loaded.preprocessing,
            loaded.calibration,
            loaded.lungs,
        )
        folds.append(
            {
                "held_out": held_out,
                "trained_on": list(training),
                "model_version": published["model_version"],
                "held_out_metrics": held_out_metrics(labels, scores, loaded.threshold, config.seed),
                "internal_test": published["test"],
                "internal_objective": published["sources"]["test"]["objective"],
                "warnings": published["warnings"],
            }
        )
    return {
        "job": "loso",
        "dataset_version": version,
        "task": task.name,
        "config": dataclasses.asdict(config),
        "folds": folds,
        "note": "held-out metrics are on every row of a source no model here saw; internal ones on the test "
        "split of the sources it trained on. Research use only - not a diagnostic device.",
    }
