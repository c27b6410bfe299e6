"""What lxn_ray tells MLflow about its training runs and model versions, and its registry's mirror there.

One MLflow experiment and one registered model per task, both named ``lxn-<task>``
(:func:`experiment_of`). A training run - ``jobs/train.py``, a Tune trial, a repeat of a search's best -
is an MLflow run with its parameters (the whole recipe, the task, the sources, the dataset version) and
its metrics per epoch (the step is the epoch); the run whose model was published also gets that model
version's final metrics (:func:`model_version_metrics`: pooled, within-source, shortcut baselines,
saliency in the lungs, calibration) and its card and plots as artifacts (:func:`log_model_version`).

The registry mirror (:func:`mirror_registry`) follows lxn_ray's own registry, which stays the source of
truth and is always written first: every published model version is registered in ``lxn-<task>`` (its
``model.keras`` and ``card.json`` as the artifacts of the run that made it, tagged
``lxn.model_version``), the alias ``champion`` marks the version lxn_ray serves, and ``challenger`` the
newest version of the task published after it. The mirror is rebuilt from the registry on every job that
publishes or promotes, so a promotion made while MLflow was down is mirrored by the next job.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lxn_ray import registry
from lxn_ray.infra.tracking import Run, Tracker
from lxn_ray.sources.tasks import resolve_task

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lxn_ray.infra.storage import Storage

PREFIX = "lxn-"
VERSION_TAG = "lxn.model_version"  # on a run that made a model version, and on the registered version
KIND_TAG = "lxn.kind"  # train, search, trial, repeat, model version
CHAMPION, CHALLENGER = "champion", "challenger"
PLOTS = ("training_curves.png", "roc.png", "confusion_test.png", "reliability.png")


def experiment_of(task: Any) -> str:
    """``lxn-<task name>``: the MLflow experiment and the registered model of ``task`` (a name, a task file
    or definition, or a card's task dict)."""
    return PREFIX + resolve_task(task).name


def run_params(config: Mapping[str, Any], dataset_version: str) -> dict[str, Any]:
    """A training run's MLflow parameters: its :class:`~lxn_ray.training.config.TrainConfig` as a dict
    (nested settings flattened by the tracker), the task by name and the dataset version."""
    params = {key: value for key, value in config.items() if key != "task"}
    return {**params, "task": resolve_task(config.get("task")).name, "dataset_version": dataset_version}


def epoch_metrics(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics of one epoch, from its history entry or its Tune result (whose bookkeeping - ``pid``,
    ``timestamp``, ... - is left out): ``train_*``, ``val_*``, ``learning_rate``, ``epoch_seconds``."""
    return {
        key: value
        for key, value in entry.items()
        if key.startswith(("train_", "val_")) or key in ("learning_rate", "epoch_seconds")
    }


def model_version_metrics(card: Mapping[str, Any]) -> dict[str, Any]:
    """A model version's final numbers from its card, as MLflow metric names: ``test.auc``,
    ``test.auc_ci_low``/``high``, ``test.sensitivity``, ..., ``val.auc``, ``threshold``,
    ``test.<source>.auc`` (per source, and ``within.<source>.auc`` where the source holds both classes),
    ``baseline.<name>.auc`` (shortcut baselines), ``saliency.in_lungs_mean``/``lung_area``,
    ``calibration.test.brier``/``ece`` (and their uncalibrated values)."""
    test, val = card.get("test") or {}, card.get("val") or {}
    ci = test.get("auc_ci") or [None, None]
    numbers: dict[str, Any] = {
        "test": {k: test.get(k) for k in ("auc", "sensitivity", "specificity", "accuracy", "objective")},
        "val": {k: val.get(k) for k in ("auc", "objective")},
        "threshold": card.get("threshold"),
    }
    numbers["test"].update(auc_ci_low=ci[0], auc_ci_high=ci[1])
    evaluation = (card.get("sources") or {}).get("test") or {}
    for scope in ("per_source", "within_source"):
        prefix = "test" if scope == "per_source" else "within"
        for source, row in (evaluation.get(scope) or {}).items():
            numbers[f"{prefix}.{source}.auc"] = row.get("auc")
    for name, row in ((card.get("baselines") or {}).get("baselines") or {}).items():
        numbers[f"baseline.{name}.auc"] = row.get("auc")
    looked = card.get("saliency") or {}
    if looked.get("measured"):
        numbers["saliency"] = {"in_lungs_mean": looked.get("mean"), "lung_area": looked.get("lung_area")}
    calibrated = (card.get("calibration") or {}).get("test") or {}
    numbers["calibration.test"] = {
        k: calibrated.get(k) for k in ("brier", "ece", "brier_uncalibrated", "ece_uncalibrated")
    }
    return numbers


def log_model_version(
    tracker: Tracker, run: Run, storage: Storage, model_version: str, history: bool = False
) -> None:
    """Log ``model_version``'s final metrics (:func:`model_version_metrics`), card and plots to ``run``
    and tag it with the version; ``history`` also logs the run's parameters and per-epoch metrics from the
    card (a run whose epochs were not logged as they happened: ``jobs/train.py``)."""
    if tracker.enabled:
        with tracker.guard(f"log model version {model_version}"):
            _log_model_version(tracker, run, storage, model_version, history)


def _log_model_version(
    tracker: Tracker, run: Run, storage: Storage, model_version: str, history: bool
) -> None:
    card = registry.read_card(storage, model_version)
    if history:
        tracker.log_params(run, run_params(card.get("config") or {}, card.get("dataset_version", "")))
        for entry in card.get("history") or []:
            tracker.log_metrics(run, epoch_metrics(entry), step=int(entry.get("epoch", 0)))
    tracker.log_metrics(run, model_version_metrics(card))
    tracker.set_tags(run, {VERSION_TAG: model_version})
    tracker.log_files(run, {"card.json": storage.read_bytes(registry.model_key(model_version, "card.json"))})
    plots = {
        name: storage.read_bytes(registry.model_key(model_version, f"plots/{name}"))
        for name in PLOTS
        if storage.exists(registry.model_key(model_version, f"plots/{name}"))
    }
    tracker.log_files(run, plots, "plots")


def track_training_run(
    tracker: Tracker, storage: Storage, model_version: str, kind: str = "train", parent: Run | None = None
) -> None:
    """One finished training run that published ``model_version`` (``jobs/train.py``, a search's repeat,
    nested under ``parent``): an MLflow run with everything :func:`log_model_version` logs, history
    included. The caller mirrors the registry (:func:`mirror_registry`) once it is done publishing."""
    if not tracker.enabled:
        return
    with tracker.guard(f"log the training run of {model_version}"):
        card = registry.read_card(storage, model_version)
        tags = {KIND_TAG: kind, "lxn.train_run": card.get("train_run", ""), VERSION_TAG: model_version}
        # taken up again, not repeated, when the same run is logged twice (a finished search re-reported)
        run = tracker.start_run(
            experiment_of(registry.card_task(card)),
            card.get("train_run") or model_version,
            tags,
            parent=parent,
            reuse={KIND_TAG: kind, VERSION_TAG: model_version},
        )
        log_model_version(tracker, run, storage, model_version, history=True)
        tracker.end_run(run)


def mirror_now(storage: Storage) -> None:
    """:func:`mirror_registry` with a tracker of its own, waiting for it: after a promotion or rollback."""
    with Tracker.for_storage(storage, announce=False) as tracker:
        mirror_registry(tracker, storage)


def mirror_registry(tracker: Tracker, storage: Storage) -> None:
    """Mirror lxn_ray's registry into MLflow's (the module's rules), in the tracker's thread: register every
    published version not registered yet, then point ``champion`` and ``challenger`` at the versions
    lxn_ray's registry names (an alias with no version to name is removed)."""
    tracker.submit("mirror the registry", lambda client: _mirror(client, tracker, storage))


def mirrored_versions(tracker: Tracker, storage: Storage) -> dict[str, str]:
    """lxn_ray model version -> its MLflow registered version (``lxn-<task>/<n>``), read now (``registry
    list``); empty when tracking is off or unreachable, or the store was never tracked."""
    target = tracker.target
    if target is None or (target.uri.startswith("sqlite:") and not _exists(target.uri)):
        return {}

    def read(client: MlflowClient) -> dict[str, str]:
        found = {}
        for model in client.search_registered_models(f"name LIKE '{PREFIX}%'"):
            for version in client.search_model_versions(f"name = '{model.name}'"):
                if VERSION_TAG in (version.tags or {}):
                    found[version.tags[VERSION_TAG]] = f"{model.name}/{version.version}"
        return found

    return tracker.query("read the registered models", read, default={})


def _exists(sqlite_uri: str) -> bool:
    from pathlib import Path

    return Path(sqlite_uri.removeprefix("sqlite:///")).is_file()


_MIRRORING = threading.Lock()  # one mirror at a time in a process: a second would register a version twice


def _mirror(client: MlflowClient, tracker: Tracker, storage: Storage) -> None:
    with _MIRRORING:
        _mirror_locked(client, tracker, storage)


def _mirror_locked(client: MlflowClient, tracker: Tracker, storage: Storage) -> None:
    champion = registry.champion(storage)
    by_task: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for version in registry.list_versions(storage):  # oldest first: MLflow numbers them in that order
        card = registry.read_card(storage, version)
        by_task.setdefault(experiment_of(registry.card_task(card)), []).append((version, card))
    for name, versions in by_task.items():
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name, description="LxN chest X-ray classifiers made by lxn_ray")
        registered = {
            mv.tags.get(VERSION_TAG): mv.version
            for mv in client.search_model_versions(f"name = '{name}'")
            if mv.tags and VERSION_TAG in mv.tags
        }
        for version, card in versions:
            if version not in registered:
                registered[version] = _register(client, tracker, storage, name, version, card)
        _point(client, name, CHAMPION, registered.get(champion))
        newer = [v for v, _ in versions if v != champion and (champion is None or v > champion)]
        _point(client, name, CHALLENGER, registered[newer[-1]] if newer else None)


def _register(
    client: MlflowClient, tracker: Tracker, storage: Storage, name: str, version: str, card: dict[str, Any]
) -> str:
    """Register ``version`` in ``name``: its model file and card as the ``model/`` artifacts of the run
    that made it (found by its tag, else a run made for it), that folder as the version's source."""
    import tempfile
    from pathlib import Path

    experiment_id = tracker.experiment_id(client, name)
    found = client.search_runs([experiment_id], f"tags.`{VERSION_TAG}` = '{version}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:  # published while MLflow was off or down, or by a job that does not log runs
        run_id = client.create_run(
            experiment_id,
            tags={VERSION_TAG: version, KIND_TAG: "model version", "mlflow.runName": version},
        ).info.run_id
        client.set_terminated(run_id)
    with tempfile.TemporaryDirectory() as folder:
        for file in ("model.keras", "card.json"):
            (Path(folder) / file).write_bytes(storage.read_bytes(registry.model_key(version, file)))
        client.log_artifacts(run_id, folder, "model")
    test = card.get("test") or {}
    registered = client.create_model_version(
        name,
        f"runs:/{run_id}/model",
        run_id=run_id,
        tags={VERSION_TAG: version, "lxn.dataset_version": str(card.get("dataset_version"))},
        description=f"lxn_ray {version}: test AUC {test.get('auc')}, dataset {card.get('dataset_version')}",
    )
    return registered.version


def _point(client: MlflowClient, name: str, alias: str, version: str | None) -> None:
    """Set ``alias`` of ``name`` to ``version``, or remove it when ``version`` is None."""
    current = client.get_registered_model(name).aliases.get(alias)
    if version is None:
        if current is not None:
            client.delete_registered_model_alias(name, alias)
    elif str(current) != str(version):
        client.set_registered_model_alias(name, alias, version)
