"""Publishing a model version: the best checkpoint of a training run, rebuilt in its inference precision,
picks its threshold on val (Youden's J), is scored once on test, and is written to the registry with its
plots and model card (the card last: the version's commit marker).

One writer of model versions for ``jobs/train.py``, every Tune search and leave-one-source-out; the card's
``train_run`` names the run it came from (:func:`lxn_ray.training.runs.published_versions` finds them).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lxn_ray import registry
from lxn_ray.data import dataset
from lxn_ray.evaluation import baselines, calibration, metrics, plots, saliency
from lxn_ray.evaluation.predict import score_split
from lxn_ray.evaluation.splits import source_evaluation, split_counts
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.model.network import ModelConfig
from lxn_ray.sources.tasks import resolve_task
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.runs import CHECKPOINT_STATE, CHECKPOINT_WEIGHTS

if TYPE_CHECKING:
    import keras
    import ray.train

log = get_logger("train").info  # progress for the person watching; stdout keeps the summary


def publish_model_version(
    storage: Storage,
    version: str,
    config: TrainConfig,
    checkpoint: ray.train.Checkpoint,
    latest: dict[str, Any],
    seconds: float,
    run_name: str,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (threshold on val, metrics on test) and write a model version.

    ``latest`` is the run's last saved state: the full history, which the best checkpoint may predate.
    The model is evaluated, and saved, in its inference precision (:func:`inference_precision`): the
    saved file carries the dtype policy, so evaluation jobs, promotion and the endpoint compute exactly
    as the threshold and test metrics were validated.
    """
    from lxn_ray.model.network import save_model

    history = latest["history"]
    model, state, trained_in = _load_in_inference_precision(checkpoint, config, history)
    task = resolve_task(config.task)
    val_labels, val_scores, val_sources = score_split(
        model, storage, version, "val", config.image_size, config.task, config.sources, config.preprocessing
    )
    test_labels, test_scores, test_sources = score_split(
        model, storage, version, "test", config.image_size, config.task, config.sources, config.preprocessing
    )
    # Calibrated on val first: the threshold, every metric and the endpoint are on the calibrated scale.
    fitted = calibration.Calibration.fit(val_labels, val_scores)
    raw = {"val": val_scores, "test": test_scores}
    val_scores, test_scores = fitted(val_scores), fitted(test_scores)
    threshold = metrics.youden_threshold(val_labels, val_scores)
    val = metrics.binary_metrics(val_labels, val_scores, threshold)
    test = metrics.binary_metrics(test_labels, test_scores, threshold)
    auc_ci = metrics.bootstrap_auc_ci(test_labels, test_scores, seed=config.seed)
    evaluation = source_evaluation(
        {"val": (val_labels, val_scores, val_sources), "test": (test_labels, test_scores, test_sources)},
        threshold,
        task,
        config.seed,
    )
    counts, warnings = split_counts(storage, version, task, config.sources)
    rows = dataset.read_split(storage, version, None, task, config.sources)
    shortcut = baselines.shortcut_baselines(rows, seed=config.seed)
    shortcut["model"] = baselines.verdict(test.auc, shortcut)
    looked = saliency.test_split_saliency(
        model, storage, version, task, config.sources, config.image_size, config.preprocessing
    )
    warnings += [
        text for text in (shortcut["warning"], shortcut["model"]["label"], looked["warning"]) if text
    ]

    model_version = f"lxn-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{config.digest()[:6]}"
    prefix = registry.model_key(model_version, "").rstrip("/")
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(model, Path(folder) / "model.keras")
        storage.write_bytes(f"{prefix}/model.keras", path.read_bytes())
    about = f"model {model_version}, dataset {version}, {task.name}"
    prevalence = float(np.mean(val_labels)) if len(val_labels) else None
    storage.write_bytes(
        f"{prefix}/plots/training_curves.png", plots.training_curves(history, about, prevalence)
    )
    storage.write_bytes(
        f"{prefix}/plots/roc.png",
        plots.roc(
            {
                "val": (val_labels, val_scores),
                "test": (test_labels, test_scores),
                **plots.within_source_curves(test_labels, test_scores, test_sources, prefix="test, "),
            },
            threshold,
            about,
        ),
    )
    calibrated = {
        "method": calibration.METHOD,
        **fitted.as_dict(),
        "val": calibration.summary(val_labels, raw["val"], val_scores),
        "test": calibration.summary(test_labels, raw["test"], test_scores),
        "plot": "plots/reliability.png",
        "note": "the threshold, metrics and the endpoint's probabilities are calibrated; AUC is unchanged",
    }
    storage.write_bytes(f"{prefix}/plots/reliability.png", plots.reliability(calibrated, about))
    names = (task.negative_name, task.positive_name)
    storage.write_bytes(
        f"{prefix}/plots/confusion_test.png", plots.confusion_matrix(test.confusion, "test", names, about)
    )
    val_summary = {
        **{k: val.as_dict()[k] for k in ("auc", "accuracy", "sensitivity", "specificity")},
        "objective": evaluation["val"]["objective"],
    }
    test_summary = {
        **{k: test.as_dict()[k] for k in ("auc", "accuracy", "sensitivity", "specificity")},
        "auc_ci": list(auc_ci) if auc_ci else None,
        "no_better_than_chance": metrics.no_better_than_chance(auc_ci),
        "objective": evaluation["test"]["objective"],
        "confusion": test.confusion,
        "n": int(len(test_labels)),
        "positives": int(np.sum(test_labels)),
    }
    card = _model_card(
        model_version, version, config, state, latest, threshold, val_summary, test_summary, seconds, run_name
    )
    card.update(
        precision={
            "training": trained_in,
            "inference": inference_precision(trained_in),
            "note": "threshold and test metrics were computed in the inference precision; the saved "
            "model computes in it wherever it is loaded (evaluation, promotion, serving)",
        },
        collapsed=any(entry.get("collapsed", False) for entry in history),  # the run, not only the best epoch
        epochs_run=len(history),
        stopped=history[-1].get("stop") if history else None,
        calibration=calibrated,
        baselines=shortcut,
        saliency=looked,
        task=task.as_dict(),
        label_names={"1": task.positive_name, "0": task.negative_name},
        sources=evaluation,
        split_counts=counts,
        warnings=warnings + evaluation["warnings"],
    )
    storage.write_json(f"{prefix}/card.json", card)  # written last: the version's commit marker
    log(
        f"published model {model_version}: val AUC {metrics.fmt(val.auc)}, test AUC {metrics.fmt(test.auc)}"
        + (f" (95% CI {auc_ci[0]:.3f}-{auc_ci[1]:.3f})" if auc_ci else "")
        + f", threshold {threshold:.3f}"
    )
    return {
        "model_version": model_version,
        "dataset_version": version,
        "collapsed": card["collapsed"],
        "precision": card["precision"],
        "recipe": recipe(config),
        "epochs_run": card["epochs_run"],
        "stopped": card["stopped"],
        "checkpoint": storage.uri_of(f"{prefix}/model.keras"),
        "threshold": threshold,
        "best_epoch": state["epoch"],
        "val": val_summary,
        "test": test_summary,
        "calibration": calibrated,
        "baselines": shortcut,
        "saliency": looked,
        "plots": [
            storage.uri_of(f"{prefix}/plots/{name}")
            for name in ("training_curves.png", "roc.png", "confusion_test.png", "reliability.png")
        ],
        "card": storage.uri_of(f"{prefix}/card.json"),
        "task": task.name,
        "sources": evaluation,
        "split_counts": counts,
        "warnings": card["warnings"],
        "seconds": round(seconds, 1),
    }


def _load_in_inference_precision(
    checkpoint: ray.train.Checkpoint, config: TrainConfig, history: list[dict[str, Any]]
) -> tuple[keras.Model, dict[str, Any], str]:
    """(LxN with ``checkpoint``'s weights in its inference precision, the checkpoint's state, the precision
    its epoch trained in - from ``history``, float32 when the epoch does not say)."""
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / CHECKPOINT_STATE).read_text())
        best_entry = next((e for e in history if e["epoch"] == state["epoch"]), {})
        trained_in = best_entry.get("precision", "float32")
        model = build_in_precision(config.model, inference_precision(trained_in))
        model.load_weights(Path(folder) / CHECKPOINT_WEIGHTS)
    return model, state, trained_in


def inference_precision(trained_in: str) -> str:
    """The precision a model is validated and served in: bfloat16 when it trained in bfloat16 (a CPU that
    computes it natively; ~3x float32's inference rate there, see benchmarks/RESULTS.md), else float32 -
    a float16 model trained on GPUs is validated in float32, which every CPU and GPU runs exactly."""
    return "bfloat16" if trained_in == "bfloat16" else "float32"


def build_in_precision(model_config: ModelConfig, precision: str) -> keras.Model:
    """:func:`lxn_ray.model.network.build_lxn` under ``precision``'s dtype policy (the global policy is
    restored)."""
    import keras

    from lxn_ray.model.network import build_lxn, precision_policy

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision_policy(precision))
    try:
        return build_lxn(model_config)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def recipe(config: TrainConfig) -> str:
    """One line naming every recipe switch of ``config`` (job summaries and the search table)."""
    preprocessing = config.preprocessing
    prep = ["trim"] if preprocessing.trim_borders else []
    if preprocessing.equalization != "none":
        prep.append(preprocessing.equalization)
    if preprocessing.lungs != "none":
        prep.append(f"lungs {preprocessing.lungs} ({preprocessing.segmenter or 'newest segmenter'})")
    schedule = config.schedule + (f"+{config.warmup_epochs} warm-up" if config.schedule == "cosine" else "")
    return (
        f"{config.architecture}, {config.optimizer} lr {config.learning_rate:.2g} {schedule}, "
        f"{config.sampling} sampling, preprocessing {'+'.join(prep) or 'none'}, "
        f"{config.epochs} epochs max" + (f" (patience {config.patience})" if config.patience else "")
    )


def _model_card(
    model_version, dataset_version, config, state, latest, threshold, val, test, seconds, run_name
):
    import keras
    import ray
    import tensorflow as tf

    from lxn_ray import __version__
    from lxn_ray.model.network import build_lxn

    return {
        "model_version": model_version,
        "model": "LxN (Umer et al., 2020)",
        "intended_use": "Research only. Not a diagnostic device; not validated for clinical use.",
        "dataset_version": dataset_version,
        "config": dataclasses.asdict(config),
        "conv_padding": config.model.conv_padding,
        "parameters": int(build_lxn(config.model).count_params()),
        "best_epoch": state["epoch"],
        "resumes": latest.get("resumes", 0),
        "history": latest["history"],
        "threshold": threshold,
        "threshold_rule": "Youden's J (max sensitivity + specificity - 1) on the validation split",
        "val": val,
        "test": test,
        "evaluation": "patient-disjoint test split; patients joined by duplicate radiographs share a split",
        "training_seconds": round(seconds, 1),
        "train_run": run_name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "lxn_ray": __version__,
            "ray": ray.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": sys.version.split()[0],
        },
    }
