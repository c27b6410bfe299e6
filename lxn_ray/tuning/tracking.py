"""A search in MLflow: one parent run per search, one nested run per trial, logged from the driver.

:func:`start_search_run` opens (or, for ``--resume``, takes up again) the search's parent run in the
task's experiment (:func:`lxn_ray.training.tracking.experiment_of`) with the search's settings as
parameters. :class:`TrialRuns`, a Tune callback on the driver, opens a run per trial as it starts (a
restarted trial takes up its own run again, found by its tags) with the trial's whole recipe as
parameters, logs each reported epoch's metrics with the epoch as step, and ends the run with the trial
(its history as an artifact).
After the search, :func:`finish_search_run` gives the best trial's run its model version's metrics, card
and plots, the parent the search's table and picture, nests the repeats of the best, and mirrors the
registry. Every call only queues work for the :class:`~lxn_ray.infra.tracking.Tracker`'s thread.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from ray.tune import Callback

from lxn_ray.infra.storage import Storage
from lxn_ray.infra.tracking import Run, Tracker
from lxn_ray.sources.tasks import resolve_task
from lxn_ray.training.runs import latest_history
from lxn_ray.training.tracking import (
    KIND_TAG,
    epoch_metrics,
    experiment_of,
    log_model_version,
    mirror_registry,
    model_version_metrics,
    run_params,
    track_training_run,
)
from lxn_ray.tuning.settings import TuneSettings
from lxn_ray.tuning.space import METRIC, TUNE, train_run_name, trial_train_config

SEARCH_TAG, TRIAL_TAG = "lxn.search", "lxn.trial_id"


def start_search_run(tracker: Tracker, name: str, version: str, settings: TuneSettings) -> Run:
    """The parent run of search ``name`` on dataset ``version`` (taken up again when it exists)."""
    tags = {KIND_TAG: "search", SEARCH_TAG: name}
    params = {**dataclasses.asdict(settings), "task": resolve_task(settings.task).name}
    return tracker.start_run(
        experiment_of(settings.task), name, tags, reuse=tags, params={**params, "dataset_version": version}
    )


class TrialRuns(Callback):
    """A Tune callback on the driver: each trial an MLflow run nested under the search's ``parent``.

    Pickled with the search's state, it keeps no tracker there: a restored search is given a new one
    (:func:`lxn_ray.tuning.search.build_tuner`)."""

    def __init__(
        self,
        tracker: Tracker,
        storage: Storage,
        parent: Run,
        name: str,
        version: str,
        settings: TuneSettings,
    ) -> None:
        self.tracker, self.storage, self.parent, self.name = tracker, storage, parent, name
        self.version, self.settings = version, settings
        self.runs: dict[str, Run] = {}
        self.ended: set[str] = set()  # trial ids whose runs this search ended

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, tracker=Tracker(None), runs={}, ended=set())

    def run_of(self, trial: Any) -> Run:
        """The MLflow run of ``trial`` (a Tune trial): opened, with the trial's recipe as parameters, when
        first asked for, or taken up again."""
        if trial.trial_id not in self.runs:
            config = trial_train_config(trial.config, self.settings)
            return self.run_by_id(trial.trial_id, run_params(dataclasses.asdict(config), self.version))
        return self.runs[trial.trial_id]

    def run_by_id(self, trial_id: str, params: dict[str, Any] | None = None) -> Run:
        """The MLflow run of the trial ``trial_id``, taken up again (or opened, with ``params``)."""
        if trial_id not in self.runs:
            tags = {KIND_TAG: "trial", SEARCH_TAG: self.name, TRIAL_TAG: trial_id}
            self.runs[trial_id] = self.tracker.start_run(
                experiment_of(self.settings.task),
                f"{self.name} {trial_id}",
                tags,
                self.parent,
                reuse=tags,
                params=params,
            )
        return self.runs[trial_id]

    # Tune's hooks: nothing when tracking is off, and never an exception into Tune's loop.
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **_info: Any) -> None:
        if self.tracker.enabled:
            with self.tracker.guard("open a trial's run"):
                self.run_of(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_info: Any) -> None:
        if self.tracker.enabled:
            with self.tracker.guard("log a trial's epoch"):
                step = int(result.get("epoch") or result.get("training_iteration") or 0)
                metrics = {**epoch_metrics(result), METRIC: result.get(METRIC)}
                self.tracker.log_metrics(self.run_of(trial), metrics, step)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **_info: Any) -> None:
        if self.tracker.enabled:
            with self.tracker.guard("end a trial's run"):
                self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **_info: Any) -> None:
        if self.tracker.enabled:
            with self.tracker.guard("end a trial's run"):
                self._end(trial, "FAILED")

    def end_open(self, status: str) -> None:
        """End every trial run still open (a search that failed or was interrupted), as ``status``; a
        ``--resume`` takes them up again."""
        for trial_id, run in self.runs.items():
            if trial_id not in self.ended:
                self.tracker.end_run(run, status)

    def _end(self, trial: Any, status: str) -> None:
        """End ``trial``'s run. Before, from its Ray Train run's latest checkpoint (read on the tracker's
        thread): the epochs a killed driver never sent, and ``history.json`` (every epoch's metrics;
        MLflow's UI draws the curves from the logged metrics)."""
        run, run_name = self.run_of(trial), train_run_name(self.name, trial.trial_id)

        @functools.cache
        def history() -> list[dict[str, Any]]:
            try:
                return latest_history(self.storage, run_name)
            except Exception:  # nothing to add: the epochs Tune reported are logged already
                return []

        self.tracker.backfill(
            run,
            METRIC,
            lambda: [(e["epoch"], {**epoch_metrics(e), METRIC: e.get(METRIC)}) for e in history()],
        )
        self.tracker.log_files(
            run, lambda: {"history.json": json.dumps(history(), indent=1).encode()} if history() else {}
        )
        self.tracker.end_run(run, status)
        self.ended.add(trial.trial_id)


def finish_search_run(
    tracker: Tracker,
    storage: Storage,
    trials: TrialRuns,
    report: dict[str, Any],
) -> None:
    """After search ``report`` (:func:`lxn_ray.tuning.tune.search`'s): the best trial's run gets its model
    version (:func:`~lxn_ray.training.tracking.log_model_version`), the parent the best's metrics, the
    ``trials.csv`` and ``search.png`` and the repeats as nested runs; then the parent ends and the registry
    is mirrored."""
    if tracker.enabled:
        with tracker.guard("log the search's result"):
            _finish(tracker, storage, trials, report)


def _finish(tracker: Tracker, storage: Storage, trials: TrialRuns, report: dict[str, Any]) -> None:
    best = report["best"]
    model_version = best["model_version"]
    best_run = trials.run_by_id(best["trial_id"])  # taken up again (so running) if it ended before a resume
    log_model_version(tracker, best_run, storage, model_version)
    tracker.end_run(best_run)
    parent = trials.parent
    from lxn_ray import registry

    tracker.log_metrics(parent, model_version_metrics(registry.read_card(storage, model_version)))
    tracker.set_tags(parent, {"lxn.best_model_version": model_version, "lxn.best_trial": best["trial_id"]})
    folder = f"{TUNE}/{trials.name}"
    tracker.log_files(
        parent, {name: storage.read_bytes(f"{folder}/{name}") for name in ("trials.csv", "search.png")}
    )
    for repeat in ((report.get("repeats") or {}).get("runs") or [])[1:]:
        track_training_run(tracker, storage, repeat["model_version"], kind="repeat", parent=parent)
    tracker.end_run(parent)
    mirror_registry(tracker, storage)
