"""The ``tune`` job: hyperparameter search over the Ray Train loop with Ray Tune, and promotion of its best
model.

:func:`tune_job` ingests first when the store has no dataset version (or ``--source``/``--sources`` is
given); :func:`search` then runs the search (:mod:`lxn_ray.tuning.search`), writes its trials and picture
and publishes the best trial's best checkpoint (:mod:`lxn_ray.tuning.results`), and promotes that model
version by :mod:`lxn_ray.evaluation.promotion`'s superiority rule (a paired bootstrap on the same test
images). Trials, epochs and checkpoints are ranked by the source-aware validation objective
(:data:`lxn_ray.training.runs.OBJECTIVE`); where the val split is too small to rank trials, the trial
published is chosen by the one-standard-error rule (:func:`lxn_ray.tuning.results.select_best`).

The tuning layer in the order its data flows: :mod:`~lxn_ray.tuning.settings` (one search's settings),
:mod:`~lxn_ray.tuning.space` (what is searched, and the names of experiments and trial runs),
:mod:`~lxn_ray.tuning.search` (running the trials on Ray Tune), :mod:`~lxn_ray.tuning.results` (what a
finished search leaves, and the model versions made from it), then this job.

Why apart from training: the search adds a second level of orchestration (trials, schedulers,
searchers, experiment state, resumption), while a trial is exactly one training run; keeping them apart
lets ``jobs/train.py`` stay a single run and every trial reuse the same loop, data path and evaluation.

Layout under storage: ``tune/<experiment>/`` is the Tune experiment (restorable with ``--resume``) plus
``search_settings.json``, ``trials.csv`` and ``search.png``; each trial's Ray Train run lives in
``runs/<experiment>-<trial id>``, so an interrupted trial resumes its training run from the last epoch
checkpoint when the search resumes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from lxn_ray import registry
from lxn_ray.data import dataset
from lxn_ray.evaluation.promotion import decide, evaluate_pair
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.infra.tracking import Tracker
from lxn_ray.sources.tasks import task_name
from lxn_ray.training.train import announce_plan, segmenter_version
from lxn_ray.tuning.results import (
    publish_best,
    repeat_best,
    search_plot,
    select_best,
    trial_rows,
    trials_csv,
    val_counts,
)
from lxn_ray.tuning.search import (
    ResourceKeeper,
    build_tuner,
    fit_and_give_back,
    ingest_plan,
)
from lxn_ray.tuning.settings import TuneSettings
from lxn_ray.tuning.space import (
    TUNE,
    choose_experiment,
    experiment_name,
)
from lxn_ray.tuning.tracking import TrialRuns, finish_search_run, start_search_run

log = get_logger("tune").info  # progress for the person watching; stdout keeps the summary


# -- the search, its record and its best model ----------------------------------------------------------
def search(
    storage: Storage,
    settings: TuneSettings,
    dataset_version: str | None = "latest",
    resume: bool = False,
    crash_once: dict[str, Any] | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Run (or ``resume``) the search on ``dataset_version`` ("latest" by default), write its
    ``trials.csv`` and ``search.png``, publish its best trial and decide promotion. The job's report (a
    JSON-ready dict: ``experiment``, ``trials``, ``best`` with its ``model_version``, ``test``,
    ``promoted``, ``repeats``, ``seconds``, ...). The search, its trials and its best model are logged to
    MLflow and the registry mirrored there (:mod:`lxn_ray.tuning.tracking`).

    ``promote=False`` leaves the champion alone (``promoted`` is then False): for callers with their own
    promotion rule, such as scheduled retraining. Raises :class:`lxn_ray.infra.resources.StalledError`
    when the search stalls, RuntimeError when no trial has a usable val objective, FileExistsError when a
    fresh search would overwrite an experiment.
    """
    from lxn_ray.infra import cluster

    cluster.connect()
    started = time.monotonic()
    version = dataset.resolve_version(storage, dataset_version)
    segmenter = segmenter_version(storage, settings.lungs, settings.segmenter)
    settings = dataclasses.replace(settings, segmenter=segmenter)
    announce_plan(storage, version, settings.task, seed=settings.seed, what=f"{settings.num_samples} trials")
    name = choose_experiment(storage, experiment_name(version, settings), resume)
    keeper = ResourceKeeper(settings.stall_timeout_s, what=f"search {name}")
    with Tracker.for_storage(storage) as tracker:
        parent = start_search_run(tracker, name, version, settings)
        trial_runs = TrialRuns(tracker, storage, parent, name, version, settings)
        try:
            report = _search(
                storage, settings, version, name, keeper, trial_runs, resume, crash_once, promote
            )
        except BaseException:
            trial_runs.end_open("KILLED")
            tracker.end_run(parent, "FAILED")
            raise
        finish_search_run(tracker, storage, trial_runs, report)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _search(
    storage: Storage,
    settings: TuneSettings,
    version: str,
    name: str,
    keeper: ResourceKeeper,
    trial_runs: TrialRuns,
    resume: bool,
    crash_once: dict[str, Any] | None,
    promote: bool,
) -> dict[str, Any]:
    """:func:`search` once its experiment is named and tracked: fit, record, publish, promote."""
    started = time.monotonic()
    tuner, searcher_name, max_concurrent = build_tuner(
        storage,
        version,
        settings,
        name,
        resume=resume,
        crash_once=crash_once,
        keeper=keeper,
        trial_runs=trial_runs,
    )
    results, held = fit_and_give_back(tuner, keeper)
    rows = trial_rows(results, settings)
    storage.write_bytes(f"{TUNE}/{name}/trials.csv", trials_csv(rows))
    storage.write_bytes(
        f"{TUNE}/{name}/search.png", search_plot(rows, f"experiment {name}, dataset {version}")
    )
    selection = select_best(rows, *val_counts(storage, version, settings.task), name)
    best_row = selection.best
    collapsed = sum(row["status"] == "COLLAPSED" for row in rows)
    published = publish_best(storage, version, settings, name, best_row, time.monotonic() - started)
    promotion = None
    promoted, reason = False, "not asked"
    if promote:
        promotion = evaluate_pair(storage, version, published["model_version"], registry.champion(storage))
        promoted, reason = decide(
            promotion, published["model_version"], registry.champion(storage), margin=None
        )
    if promoted:
        registry.promote(storage, published["model_version"], reason=f"tune {name}: {reason}")
    errored = [row["trial_id"] for row in rows if row["status"] == "ERROR"]
    repeats = repeat_best(storage, version, settings, best_row, published) if settings.repeats else None
    return {
        "job": "tune",
        "experiment": storage.uri_of(f"{TUNE}/{name}"),
        "dataset_version": version,
        "searcher": searcher_name,
        "scheduler": "asha" if settings.asha else "fifo",
        "settings": dataclasses.asdict(settings),
        "max_concurrent": max_concurrent,
        "resources": {
            "placement_groups_released": len(keeper.released),
            "placement_groups_held_after": [group.id for group in held],
        },
        "n_trials": len(rows),
        "trials": {
            "count": len(rows),
            "completed": sum(row["status"] == "COMPLETED" for row in rows),
            "stopped_early": sum(row["status"] == "STOPPED" for row in rows),
            "collapsed": collapsed,
            "errored": errored,
            "csv": storage.uri_of(f"{TUNE}/{name}/trials.csv"),
            "plot": storage.uri_of(f"{TUNE}/{name}/search.png"),
        },
        "model_files": {  # what a person opens next about the published model
            "card": storage.uri_of(registry.model_key(published["model_version"], "card.json")),
            "plots": storage.uri_of(registry.model_key(published["model_version"], "plots")),
        },
        "best": {
            "trial_id": best_row["trial_id"],
            "config": best_row["config"],
            "val_objective": best_row["objective_best"],
            "model_version": published["model_version"],
            "train_run": published["train_run"],
        },
        "selection": selection.as_dict(),
        "test": published["test"],
        "threshold": published["threshold"],
        "repeats": repeats,
        "champion": registry.champion(storage),
        "promoted": promoted,
        "promotion_reason": reason,
        "promotion": promotion,
        "task": task_name(settings.task),
        "sources": published.get("sources"),
        **{key: published.get(key) for key in ("baselines", "saliency", "calibration")},
        "warnings": published.get("warnings", []),
    }


# -- the job --------------------------------------------------------------------------------------------
def tune_job(
    storage: Storage,
    settings: TuneSettings,
    sources: Any = None,
    resume: bool = False,
    crash_once: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest when needed (empty store, or ``sources`` given: what :func:`lxn_ray.data.ingest.ingest` takes),
    then :func:`search` the latest dataset version. :func:`search`'s report plus ``ingest``
    (``dataset_version`` and ``changed`` of the ingest, or None when none ran)."""
    ingested = None
    if sources is not None or dataset.latest_version(storage) is None:
        from lxn_ray.data.ingest import ingest
        from lxn_ray.infra import cluster
        from lxn_ray.sources.transports import open_source

        def announce(films: int) -> None:  # the plan comes first: before any of ingest's own lines
            cluster.connect()  # the plan needs the cluster's size (a source that cannot be read has failed)
            log(ingest_plan(settings, films)[0])

        what = "the sources" if sources is not None else "the upstream repository"
        log(f"reading {what} first")
        report = ingest(sources if sources is not None else open_source(None), storage, planned=announce)
        ingested = {"dataset_version": report["dataset_version"], "changed": report["changed"]}
    report = search(storage, settings, resume=resume, crash_once=crash_once)
    return {**report, "ingest": ingested}
