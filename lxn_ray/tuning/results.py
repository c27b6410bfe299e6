"""What a finished search leaves: one row per trial (:func:`trial_rows`), the best trial, ``trials.csv`` and
``search.png``, and the model versions made from it - the best trial's best checkpoint published
(:func:`publish_best`) and, with ``--repeats``, its config trained again with other seeds."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from typing import Any

from lxn_ray import registry
from lxn_ray.evaluation import metrics
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.training.runs import RUNS, published_versions
from lxn_ray.tuning.settings import TuneSettings
from lxn_ray.tuning.space import (
    LR_RANGE,
    METRIC,
    MODE,
    augment_strength,
    train_run_name,
    trial_train_config,
)

log = get_logger("tune").info  # progress for the person watching; stdout keeps the summary


# -- the trials -----------------------------------------------------------------------------------------
def trial_rows(results: Any, settings: TuneSettings) -> list[dict[str, Any]]:
    """One row per trial of a ``ray.tune.ResultGrid``, sorted by trial id: ``trial_id`` (str), ``config``
    (the sampled values, keys sorted), ``objective_best`` / ``objective_last`` (float in [0, 1] or None:
    the val objective over the epochs that did not collapse), ``epochs_run`` (int), ``status``
    (COMPLETED, STOPPED, COLLAPSED or ERROR), ``seconds`` (float, the trial's wall time) and ``error``
    (the exception's type name, or None)."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        history = frame.to_dict("records") if frame is not None and METRIC in frame else []
        collapsed = any(_flag(r.get("collapsed")) for r in history)
        # A collapsed epoch (lxn_ray.training.loop.is_collapsed) never counts: its constant output scores 0.5.
        history = [r for r in history if not _flag(r.get("collapsed"))]
        aucs = [float(r[METRIC]) for r in history if r.get(METRIC) is not None and not _isnan(r[METRIC])]
        epochs = [int(r["epoch"]) for r in history if r.get("epoch") is not None and not _isnan(r["epoch"])]
        epochs_run = max(epochs, default=0)
        if result.error is not None:
            status = "ERROR"
        elif collapsed:
            status = "COLLAPSED"
        elif epochs_run >= settings.epochs:
            status = "COMPLETED"
        else:
            status = "STOPPED"  # ASHA stopped it early, or the time budget ran out (see --resume)
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        rows.append(
            {
                "trial_id": trial_id,
                "config": {key: result.config[key] for key in sorted(result.config)},
                "objective_best": max(aucs) if aucs else None,
                "objective_last": aucs[-1] if aucs else None,
                "epochs_run": epochs_run,
                "status": status,
                "seconds": round(float(metrics.get("time_total_s") or 0.0), 1),
                "error": None if result.error is None else f"{type(result.error).__name__}",
            }
        )
    return sorted(rows, key=lambda row: row["trial_id"])


# A val split whose AUC has a standard error above this cannot rank trials that differ by a few hundredths:
# the plan says so (Hanley & McNeil's SE at AUC 0.75; a 95% interval about +-0.05 wide at the limit).
COARSE_VAL_SE = 0.025
NOMINAL_AUC = 0.75  # the AUC at which the plan states the val split's resolution, before any trial ran


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which trial a search publishes, and why (:func:`select_best`)."""

    best: dict[str, Any]  # the chosen row of :func:`trial_rows`
    tied: list[str]  # ids of the trials within ``tolerance`` of the highest objective (the chosen included)
    tolerance: float  # one standard error of the val objective at the highest value (0: plain maximum)
    positives: int  # the val split's images of each class, for the task
    negatives: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the report's ``selection``."""
        return {
            "rule": "one standard error" if self.tolerance > 0 else "highest val objective",
            "tolerance": round(self.tolerance, 4),
            "tied": self.tied,
            "val_positives": self.positives,
            "val_negatives": self.negatives,
        }


def val_counts(storage: Storage, version: str, task: str) -> tuple[int, int]:
    """(positives, negatives) of ``version``'s val split for ``task``."""
    from lxn_ray.data import dataset

    labels = dataset.read_split(storage, version, "val", task).column("label").to_pylist()
    return sum(labels), len(labels) - sum(labels)


def val_resolution(positives: int, negatives: int) -> str:
    """The plan's sentence on how finely a val split of ``positives`` and ``negatives`` ranks trials."""
    se = metrics.auc_standard_error(NOMINAL_AUC, positives, negatives)
    counts = f"val split: {positives} positive and {negatives} negative films"
    if se <= COARSE_VAL_SE:
        return f"{counts} (standard error of an AUC ~{se:.3f}); the best trial is the highest val objective"
    return (
        f"{counts}: too few to rank trials - an AUC on it has a standard error of ~{se:.2f} (Hanley & "
        "McNeil), so trials within one standard error of the best count as tied and the one that trained "
        "the most epochs is published (the one-standard-error rule)"
    )


def choose_best(
    rows: Sequence[dict[str, Any]], name: str = "the search", tolerance: float = 0.0
) -> dict[str, Any]:
    """The trial to publish, by the one-standard-error rule (Breiman et al. 1984, section 3.4.3; Hastie,
    Tibshirani & Friedman 2009, section 7.10): the trials whose best val objective is within
    ``tolerance`` (one standard error, unitless AUC) of the highest are tied - the val split cannot tell
    them apart - and of those the one that trained the most epochs wins (ASHA let it go on, so its score
    rests on more than one early peak), then the higher objective, then the faster. ``tolerance`` 0 is
    the plain maximum. A trial that collapsed is never the best, even by an epoch before it collapsed;
    raises RuntimeError when no trial is left."""
    tied = _tied(rows, name, tolerance)
    return max(tied, key=lambda row: (row["epochs_run"], row["objective_best"], -row["seconds"]))


def _tied(rows: Sequence[dict[str, Any]], name: str, tolerance: float) -> list[dict[str, Any]]:
    """The usable trials within ``tolerance`` of the highest best val objective; raises RuntimeError when
    none is usable (all collapsed or unscored)."""
    candidates = [row for row in rows if row["objective_best"] is not None and row["status"] != "COLLAPSED"]
    if not candidates:
        collapsed = sum(row["status"] == "COLLAPSED" for row in rows)
        raise RuntimeError(
            f"no trial of {name} has a usable val objective ({len(rows)} trials, {collapsed} collapsed to "
            "a constant output: search lower learning rates)"
        )
    top = max(row["objective_best"] for row in candidates)
    return [row for row in candidates if row["objective_best"] >= top - tolerance]


def select_best(
    rows: Sequence[dict[str, Any]], positives: int, negatives: int, name: str = "the search"
) -> Selection:
    """:func:`choose_best` with the tolerance one standard error of an AUC at the highest val objective
    on a val split of ``positives`` and ``negatives`` (:func:`lxn_ray.evaluation.metrics.auc_standard_error`;
    for a within-source objective the pooled counts make it a lower bound) when that split is coarse
    (SE above :data:`COARSE_VAL_SE`), else 0. Raises RuntimeError as :func:`choose_best`."""
    usable = [row["objective_best"] for row in rows if row["objective_best"] is not None]
    se = metrics.auc_standard_error(max(usable, default=NOMINAL_AUC), positives, negatives)
    tolerance = se if COARSE_VAL_SE < se < math.inf else 0.0
    best = choose_best(rows, name, tolerance)
    tied = [row["trial_id"] for row in _tied(rows, name, tolerance)]
    return Selection(best, tied, tolerance, positives, negatives)


def _flag(value: Any) -> bool:
    """A boolean metric as Tune's dataframe gives it back (bool, 0/1, NaN before it existed)."""
    return bool(value) and not _isnan(value)


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _trial_id_from_path(path: str) -> str:
    """A trial's id from its folder ``<trainable>_<trial id>_<index>_<config>_<date>`` (no metrics yet)."""
    folder = path.rstrip("/").rsplit("/", 1)[-1]
    for part in folder.split("_"):
        if len(part) == 8 and all(c in "0123456789abcdef" for c in part):
            return part
    return folder


def trials_csv(rows: Sequence[dict[str, Any]]) -> bytes:
    """``trials.csv``: one line per row of :func:`trial_rows` (UTF-8), config keys as ``config/<name>``
    columns, plus each trial's ``augment_strength`` (0..1)."""
    keys = sorted({key for row in rows for key in row["config"]})
    fields = [
        "trial_id",
        *[f"config/{k}" for k in keys],
        "augment_strength",
        "objective_best",
        "objective_last",
        "epochs_run",
        "status",
        "seconds",
        "error",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                **{k: v for k, v in row.items() if k != "config"},
                **{f"config/{k}": row["config"].get(k) for k in keys},
                "augment_strength": round(augment_strength(row["config"]), 4),
            }
        )
    return buffer.getvalue().encode()


def search_plot(rows: Sequence[dict[str, Any]], about: str = "") -> bytes:
    """``search.png`` (PNG bytes): each trial's best val objective against its learning rate, coloured by
    augmentation strength; trials without an objective are left out. ``about`` is the picture's caption."""
    from lxn_ray.evaluation.plots import search_results

    points = [
        {
            "learning_rate": row["config"]["learning_rate"],
            "objective": row["objective_best"],
            "augment_strength": augment_strength(row["config"]),
            "epochs_run": row["epochs_run"],
        }
        for row in rows
        if row["objective_best"] is not None
    ]
    return search_results(points, LR_RANGE, about)


# -- the model versions made from it --------------------------------------------------------------------
def publish_best(
    storage: Storage,
    version: str,
    settings: TuneSettings,
    experiment: str,
    best_row: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Evaluate the best trial's best checkpoint (by the val objective) on test and register it as a model
    version; ``seconds`` is the search's wall time so far, recorded on the card. Returns
    :func:`lxn_ray.training.publish.publish_model_version`'s report (``model_version``, ``test``,
    ``threshold``, ...) plus ``train_run``.

    Idempotent: when that checkpoint was already published (a ``--resume`` of a finished search), the
    existing model version is reported instead of a duplicate. Raises RuntimeError when the trial's
    training run has no checkpoint.
    """
    import ray.train

    from lxn_ray.training.publish import publish_model_version
    from lxn_ray.training.runs import read_checkpoint_state

    run_name = train_run_name(experiment, best_row["trial_id"])
    result = ray.train.Result.from_path(
        storage.path(f"{RUNS}/{run_name}"), storage_filesystem=storage.filesystem
    )
    checkpoint = result.get_best_checkpoint(metric=METRIC, mode=MODE) or result.checkpoint
    if checkpoint is None or result.checkpoint is None:
        raise RuntimeError(f"the best trial's training run {run_name} has no checkpoint")
    latest, best_state = read_checkpoint_state(result.checkpoint), read_checkpoint_state(checkpoint)
    already = published_versions(storage, run_name, best_epoch=best_state["epoch"])
    if already:
        card = registry.read_card(storage, already[0])
        log(f"best checkpoint already published as {already[0]}")
        return {
            "model_version": already[0],
            "test": card["test"],
            "threshold": card["threshold"],
            "train_run": run_name,
            "dataset_version": version,
            **{key: card.get(key) for key in ("baselines", "saliency", "calibration")},
        }
    config = trial_train_config(best_row["config"], settings)
    published = publish_model_version(storage, version, config, checkpoint, latest, seconds, run_name)
    return {**published, "train_run": run_name}


def repeat_best(
    storage: Storage,
    version: str,
    settings: TuneSettings,
    best_row: dict[str, Any],
    published: dict[str, Any],
) -> dict[str, Any]:
    """``--repeats N``: train the best trial's config again with seeds ``seed+1 .. seed+N`` (each a model
    version, never promoted) and report every run with the spread of its val objective and test AUC, so a
    difference between trials can be read against the noise of one config. Every run is measured the
    same way, from its model card (the published model's val objective and test AUC); a repeat already
    published (a ``--resume``) is reported, not trained again. The spread is the sample standard deviation
    (ddof=1) beside min and max; with N+1 runs it is a rough guide, not an interval.

    Returns ``runs`` (one dict per run: ``seed``, ``val_objective``, ``test_auc``, ``collapsed``,
    ``model_version``; the published best first) and ``val_objective`` / ``test_auc``: ``mean``, ``std``,
    ``min``, ``max`` (floats rounded to 4 places) and ``n``, or None with fewer than two values."""
    import numpy as np

    from lxn_ray.training.runs import run_name_of
    from lxn_ray.training.train import train

    config = trial_train_config(best_row["config"], settings)
    versions = [(published["model_version"], config.seed)]
    for offset in range(1, settings.repeats + 1):
        repeat = dataclasses.replace(config, seed=config.seed + offset)
        done = published_versions(storage, run_name_of(version, repeat))
        if done:
            log(f"repeat {offset}/{settings.repeats} (seed {repeat.seed}) already published as {done[-1]}")
            versions.append((done[-1], repeat.seed))
            continue
        log(f"repeat {offset}/{settings.repeats}: the best config with seed {repeat.seed}")
        # logged to MLflow by the search, nested under it (lxn_ray.tuning.tracking)
        versions.append((train(storage, version, repeat, track=False)["model_version"], repeat.seed))
    runs = []
    for model_version, seed in versions:
        card = registry.read_card(storage, model_version)
        runs.append(
            {
                "seed": seed,
                "val_objective": ((card.get("sources") or {}).get("val") or {}).get("objective"),
                "test_auc": card["test"]["auc"],
                "collapsed": bool(card.get("collapsed", False)),
                "model_version": model_version,
            }
        )

    def spread(key: str) -> dict[str, float] | None:
        values = np.array([run[key] for run in runs if run.get(key) is not None], dtype=float)
        if len(values) < 2:
            return None
        return {
            "mean": round(float(values.mean()), 4),
            "std": round(float(values.std(ddof=1)), 4),
            "min": round(float(values.min()), 4),
            "max": round(float(values.max()), 4),
            "n": len(values),
        }

    return {"runs": runs, "val_objective": spread("val_objective"), "test_auc": spread("test_auc")}
