"""Scheduled retraining: keep the champion current as the source grows, safely from cron or a long job.

One tick, under a lease lock in storage so that two runs never overlap:

1. Ingest the sources incrementally (an unchanged set of sources is detected without starting Ray).
2. Count the rows the task trains on that changed since the champion's dataset version
   (:func:`lxn_ray.data.dataset.changes_between` on both versions' rows for the task, by content): added,
   removed, relabelled (another label for the task) or changed in view or patient. Any correction (a row
   removed, relabelled, or changed in view or patient) trains: a metadata fix that relabels three films
   must not leave a champion trained on the wrong labels. Added rows alone train from ``min_new_images``
   of them (and ``min_growth`` times the champion's dataset size) on. Otherwise a
   challenger is trained with the champion's hyperparameters (flags given explicitly override them)
   through :func:`lxn_ray.training.train.train`, or searched again with :func:`lxn_ray.tuning.tune.search`.
   With no
   champion yet, the first tick always trains.
3. Challenger and champion are scored on the SAME images - the new version's test split - each at its
   own input size and its own threshold (from its card).
4. Promotion rule (non-inferiority, :mod:`lxn_ray.evaluation.promotion`): a paired bootstrap over the test
images of
   the source-aware objective's difference, challenger - champion; promote when the lower bound of its 95%
   interval is >= -margin and the challenger's source-shortcut check does not fire. Why non-inferiority
   and not "strictly better": the newer model has seen more (and more recent) data, so it should replace
   the champion unless it is measurably worse; "strictly higher AUC" on a few dozen test images mostly
   measures noise.

Crash safety comes from the layers below: ingest and model publication are atomic, a rerun of an
interrupted training resumes its Ray Train run (named after dataset version + config), and promotion -
one atomic pointer write - is the last step. Every decision is appended to ``retrain/history.jsonl``
(read-modify-write under the lock, each write atomic) and drawn in ``retrain/history.png``.

The lock is a :class:`lxn_ray.infra.lease.LeaseLock` on ``retrain/LOCK``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from lxn_ray import registry
from lxn_ray.data import dataset
from lxn_ray.infra.lease import LeaseLock
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.retraining.settings import RetrainSettings, TrainOverrides
from lxn_ray.training.tracking import mirror_now

if TYPE_CHECKING:
    from lxn_ray.training.config import TrainConfig

RETRAIN = "retrain"
LOCK = f"{RETRAIN}/LOCK"
HISTORY = f"{RETRAIN}/history.jsonl"
HISTORY_PLOT = f"{RETRAIN}/history.png"
DECISIONS = ("no-change", "below-threshold", "promoted", "rejected")  # plus "locked" with --no-wait


log = get_logger("retrain").info  # progress for the person watching; stdout keeps the summary


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def promotion_rule(settings: RetrainSettings) -> str:
    """The rule in words, as every report states it."""
    return (
        f"non-inferiority on the new dataset version's test split: a paired bootstrap "
        f"({settings.resamples} resamples of the test images, stratified by source and class) of the "
        f"source-aware objective (mean within-source AUC where sources hold both classes, else pooled AUC) "
        f"of the challenger minus the champion's, both models scoring the same images; promote when the "
        f"lower bound of its 95% interval is >= -{settings.margin:g} and the challenger's source-shortcut "
        f"check does not fire. With no champion the first published model that passes the shortcut check is "
        f"promoted; without a test AUC (one-class test split) the champion is kept."
    )


# -- history ------------------------------------------------------------------------------------------
def read_history(storage: Storage) -> list[dict[str, Any]]:
    """Every recorded tick, oldest first."""
    if not storage.exists(HISTORY):
        return []
    entries = []
    for line in storage.read_text(HISTORY).splitlines():
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:
                log(f"skipping an unreadable line of {storage.uri_of(HISTORY)}")
    return entries


def append_history(storage: Storage, entry: dict[str, Any], lock: LeaseLock) -> None:
    """Append one decision (read-modify-write under the lock; each write atomic) and redraw the plot."""
    from lxn_ray.evaluation.plots import retrain_history

    lock.ensure_held()
    entries = [*read_history(storage), entry]
    text = "".join(json.dumps(e, default=str, sort_keys=True) + "\n" for e in entries)
    storage.write_bytes(HISTORY, text.encode())
    storage.write_bytes(HISTORY_PLOT, retrain_history(entries, data_dates(storage, entries)))


def data_dates(storage: Storage, entries: Sequence[dict[str, Any]]) -> dict[str, str | None]:
    """dataset version -> the date of its data (its manifest's ``data_date``), for the history plot."""
    dates: dict[str, str | None] = {}
    for version in {e.get("dataset_version") for e in entries if e.get("dataset_version")}:
        try:
            dates[version] = dataset.read_manifest(storage, version).get("data_date")
        except (FileNotFoundError, ValueError):
            dates[version] = None
    return dates


# -- the tick -----------------------------------------------------------------------------------------
def count_changes(
    storage: Storage, version: str, base_version: str | None, task: str | None
) -> tuple[dict[str, Any], int]:
    """(changes of the rows ``task`` trains on between ``base_version`` and ``version``, rows in the
    base): :func:`lxn_ray.data.dataset.changes_between` with the task's label, plus ``total``."""
    latest = dataset.for_task(dataset.read_table(storage, version, "images"), task)
    if base_version is not None and not storage.exists(dataset.version_key(base_version, "manifest.json")):
        log(f"the champion's dataset version {base_version} is not in this store: every image counts as new")
        base_version = None
    before = (
        dataset.for_task(dataset.read_table(storage, base_version, "images"), task) if base_version else None
    )
    changes = dataset.changes_between(before, latest, label_column="label")
    kinds = ("added", "removed", "relabelled", "view_changed", "patient_changed")
    changes["total"] = sum(changes[kind] for kind in kinds)
    return changes, before.num_rows if before is not None else 0


def describe_changes(changes: dict[str, Any]) -> str:
    kinds = ("added", "removed", "relabelled", "view_changed", "patient_changed")
    named = ", ".join(f"{changes[kind]} {kind.replace('_', ' ')}" for kind in kinds if changes[kind])
    return f"{changes['total']} changed rows ({named or 'none'})"


def gate(
    champion: str | None,
    base_version: str | None,
    changes: dict[str, Any],
    base_size: int,
    settings: RetrainSettings,
) -> tuple[str | None, str]:
    """("no-change" | "below-threshold", why) when nothing should be trained; (None, why) to train."""
    changed, described = changes["total"], describe_changes(changes)
    if champion is None:
        return None, "no champion yet: the first tick trains"
    if changed == 0:
        return "no-change", f"no row of the task changed since the champion's dataset version {base_version}"
    corrections = changed - changes["added"]
    if corrections:  # the champion learnt from, or was judged on, rows that are now known to be wrong
        return None, f"{described} since {base_version}: corrections always retrain"
    if changed < settings.min_new_images:
        return "below-threshold", f"{described} < --min-new-images {settings.min_new_images}"
    if settings.min_growth is not None and changed < settings.min_growth * base_size:
        return "below-threshold", (
            f"{described} < --min-growth {settings.min_growth:g} x {base_size} images in the "
            f"champion's dataset version {base_version}"
        )
    growth = f" ({changed / base_size:.1%} of its rows)" if base_size else ""
    return None, f"{described} since {base_version}{growth}"


def train_config_from_card(card: dict[str, Any] | None, overrides: TrainOverrides) -> TrainConfig:
    """The champion's :class:`TrainConfig` (its card's ``config``), with explicitly given flags on top."""
    from lxn_ray.training.config import TrainConfig

    settings = card["config"] if card and isinstance(card.get("config"), dict) else {}
    return dataclasses.replace(TrainConfig.from_dict(settings), **overrides.given())


def train_challenger(
    storage: Storage, version: str, settings: RetrainSettings, champion_card: dict[str, Any] | None
) -> dict[str, Any]:
    """Train (or, in tune mode, search) a challenger on ``version``; returns its model version and how."""
    started = time.monotonic()
    config = train_config_from_card(champion_card, settings.overrides)
    if settings.mode == "tune":
        from lxn_ray.tuning.settings import TuneSettings
        from lxn_ray.tuning.tune import search

        tune_settings = TuneSettings(
            num_samples=settings.num_samples,
            epochs=config.epochs,
            image_size=config.image_size,
            width=config.width,
            batch_size=config.batch_size,
            workers_per_trial=config.workers,
            stall_timeout_s=settings.stall_timeout_s,
            task=config.task,
            precision=config.precision,
            patience=config.patience,
        )
        # resume=True: a tick that crashed mid-search continues the same experiment (named after the
        # dataset version and settings), and a finished one is re-reported without a duplicate model.
        report = search(storage, tune_settings, dataset_version=version, resume=True, promote=False)
        return {
            "model_version": report["best"]["model_version"],
            "mode": "tune",
            "config": report["best"]["config"],
            "experiment": report["experiment"],
            "seconds": round(time.monotonic() - started, 1),
        }
    from lxn_ray.training.runs import published_versions, run_name_of
    from lxn_ray.training.train import train

    run_name = run_name_of(version, config)  # the name lxn_ray.training.train.train gives this run
    reused = published_versions(storage, run_name, dataset_version=version)
    if reused:  # a tick that crashed after publishing: reuse it
        log(f"run {run_name} was already published as {reused[0]}: reusing it")
        return {
            "model_version": reused[0],
            "mode": "train",
            "config": dataclasses.asdict(config),
            "train_run": run_name,
            "reused": True,
            "seconds": round(time.monotonic() - started, 1),
        }
    log(f"training a challenger on {version}: {json.dumps(dataclasses.asdict(config), sort_keys=True)}")
    report = train(storage, version, config, stall_timeout_s=settings.stall_timeout_s)
    return {
        "model_version": report["model_version"],
        "mode": "train",
        "config": dataclasses.asdict(config),
        "train_run": run_name,
        "reused": False,
        "best_epoch": report.get("best_epoch"),
        "seconds": round(time.monotonic() - started, 1),
    }


def tick(
    storage: Storage, settings: RetrainSettings, lock: LeaseLock, report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One retraining tick (the caller holds ``lock``); returns the report and records the decision.

    ``report`` is filled in as the tick goes, so a caller can record how far a failed tick got.
    """
    report = {} if report is None else report
    from lxn_ray.data.ingest import ingest
    from lxn_ray.evaluation.promotion import decide, evaluate_pair
    from lxn_ray.sources.layouts import SourceSpec

    started = time.monotonic()
    sources = list(settings.sources) or [SourceSpec("ieee8023", settings.source, settings.ref, "upstream")]
    ingested = ingest(sources, storage)
    version = ingested["dataset_version"]
    champion = registry.champion(storage)
    card = registry.read_card(storage, champion) if champion else None
    base_version = card.get("dataset_version") if card else None
    task = settings.overrides.task or ((card or {}).get("config") or {}).get("task")
    changes, base_size = count_changes(storage, version, base_version, task)
    decision, reason = gate(champion, base_version, changes, base_size, settings)
    log(f"dataset {version}: {describe_changes(changes)}; champion {champion or 'none'}: {reason}")
    report.update(
        {
            "job": "retrain",
            "decision": decision,
            "reason": reason,
            "trigger": reason,  # why this tick trained (or not); "reason" becomes the promotion's
            "dataset_version": version,
            "new_images": changes["added"],
            "changed_rows": changes["total"],
            "changes": changes,
            "champion_before": champion,
            "champion": champion,
            "challenger": None,
            "metrics": None,
            "rule": promotion_rule(settings),
            "mode": settings.mode,
            "thresholds": {
                "min_new_images": settings.min_new_images,
                "min_growth": settings.min_growth,
                "champion_dataset_version": base_version,
                "champion_dataset_images": base_size,
            },
            "ingest": {
                key: ingested.get(key)
                for key in ("dataset_version", "changed", "usable", "images_hashed", "seconds")
            },
            "training": None,
        }
    )
    if decision is None:
        training = train_challenger(storage, version, settings, card)
        challenger = training["model_version"]
        report.update(challenger=challenger, training=training)
        evaluation = evaluate_pair(
            storage, version, challenger, champion, settings.resamples, settings.bootstrap_seed
        )
        evaluation["margin"] = settings.margin
        promote, reason = decide(evaluation, challenger, champion, settings.margin)
        decision = "promoted" if promote else "rejected"
        report.update(
            decision=decision, reason=reason, challenger=challenger, metrics=evaluation, training=training
        )
        lock.ensure_held()
        if promote:  # the last step: one atomic pointer write (Serve polls it)
            registry.promote(storage, challenger, reason=f"retrain on {version}: {reason}")
            mirror_now(storage)  # MLflow's champion alias follows, after lxn_ray's pointer
            report["champion"] = challenger
        log(f"{decision}: {reason}")
    report["seconds"] = round(time.monotonic() - started, 1)
    report["history"] = storage.uri_of(HISTORY)
    report["history_plot"] = storage.uri_of(HISTORY_PLOT)
    append_history(storage, history_entry(report, lock), lock)
    return report


def history_entry(report: dict[str, Any], lock: LeaseLock | None) -> dict[str, Any]:
    """The line a tick adds to ``retrain/history.jsonl``: what was decided, on what, and why."""
    evaluation = report.get("metrics") or {}
    return {
        "at": _iso(_now()),
        "decision": report["decision"],
        "reason": report.get("reason"),
        "dataset_version": report.get("dataset_version"),
        "new_images": report.get("new_images"),
        "changed_rows": report.get("changed_rows"),
        "champion_before": report.get("champion_before"),
        "champion": report.get("champion"),
        "challenger": report.get("challenger"),
        "challenger_auc": (evaluation.get("challenger") or {}).get("auc"),
        "champion_auc": (evaluation.get("champion") or {}).get("auc"),
        "objective_basis": evaluation.get("basis"),
        "auc_difference": evaluation.get("difference"),
        "auc_difference_ci": evaluation.get("difference_ci"),
        "n_test": evaluation.get("n"),
        "mode": report.get("mode"),
        "seconds": report.get("seconds"),
        "error": report.get("error"),
        "holder": lock.holder if lock else None,
        "lock_acquired_at": _iso(lock.acquired_at) if lock and lock.acquired_at else None,
    }


def run_once(
    storage: Storage, settings: RetrainSettings, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Take the lock (waiting for it unless ``--no-wait``), run one tick, release the lock."""
    started = time.monotonic()
    lock = LeaseLock(storage, LOCK, ttl_s=settings.lock_ttl_s, poll_s=settings.lock_poll_s)
    if not lock.acquire(settings.lock_timeout_s, wait=settings.wait_for_lock, stop=stop):
        holder = lock.blocker.describe() if lock.blocker else "another run"
        why = "stopped while waiting" if stop is not None and stop.is_set() else "--no-wait"
        log(f"another retrain holds the lock ({holder}): nothing done ({why})")
        return {
            "job": "retrain",
            "decision": "locked",
            "reason": f"another retrain holds the lock: {holder}; nothing done ({why})",
            "dataset_version": dataset.latest_version(storage),
            "new_images": None,
            "champion": registry.champion(storage),
            "challenger": None,
            "metrics": None,
            "rule": promotion_rule(settings),
            "ingest": None,
            "lock": {
                "holder": None,
                "blocked_by": dataclasses.asdict(lock.blocker) if lock.blocker else None,
            },
            "seconds": round(time.monotonic() - started, 1),
        }
    lock_report = {"holder": lock.holder, "waited_s": lock.waited_s, "took_over": lock.took_over}
    if lock.waited_s:
        log(f"acquired the retrain lock after waiting {lock.waited_s} s")
    progress: dict[str, Any] = {"mode": settings.mode}
    with lock.holding():
        try:
            report = tick(storage, settings, lock, progress)
        except Exception as error:
            _record_failure(storage, lock, error, progress)
            raise
    report["lock"] = lock_report
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _record_failure(storage: Storage, lock: LeaseLock, error: Exception, progress: dict[str, Any]) -> None:
    """A failed tick leaves a line in the history too - how far it got and the error - when the lock is
    still ours to write it."""
    cause = getattr(error, "cause", None) or error
    message = f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}"
    failed = {**progress, "decision": "error", "error": message, "metrics": None}
    try:
        append_history(storage, history_entry(failed, lock), lock)
    except Exception as failure:  # the original error matters more than the history line
        log(f"could not record the failed tick in the history: {type(failure).__name__}: {failure}")


def next_tick_delay(started: float, now: float, every_s: float) -> float:
    """Seconds until the next tick on the fixed grid ``started + k * every_s``; ticks that a long run
    overlapped are skipped rather than run back to back."""
    if now < started + every_s:
        return started + every_s - now
    missed = math.floor((now - started) / every_s)
    return started + (missed + 1) * every_s - now


def run_every(
    storage: Storage,
    settings: RetrainSettings,
    every_s: float,
    stop: threading.Event,
    on_report: Callable[[dict[str, Any]], None] | None = None,
    rearm: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Tick, wait until the next tick time, repeat until ``stop`` is set. A failing tick is logged (and
    recorded in the history) and the loop carries on. ``rearm`` runs after every tick (re-installing the
    signal handlers). Returns the last tick's report plus a summary."""
    decisions: list[str] = []
    last: dict[str, Any] | None = None
    errors: list[str] = []
    while not stop.is_set():
        started = time.monotonic()
        try:
            last = run_once(storage, settings, stop=stop)
            decisions.append(last["decision"])
            if on_report is not None:
                on_report(last)
        except Exception as error:
            cause = getattr(error, "cause", None) or error
            message = f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}"
            log(f"error: tick failed: {message} (carrying on)")
            decisions.append("error")
            errors.append(message)
        if rearm is not None:
            rearm()
        delay = next_tick_delay(started, time.monotonic(), every_s)
        if not stop.is_set():
            log(f"next tick at {datetime.now() + timedelta(seconds=delay):%Y-%m-%d %H:%M:%S}")
        stop.wait(delay)
    schedule = {"every_s": every_s, "ticks": len(decisions), "decisions": decisions, "errors": errors}
    if last is None:
        return {
            "job": "retrain",
            "decision": "error" if errors else "stopped",
            "reason": errors[-1] if errors else "stopped before the first tick",
            "dataset_version": None,
            "new_images": None,
            "champion": registry.champion(storage),
            "challenger": None,
            "metrics": None,
            "rule": promotion_rule(settings),
            "ingest": None,
            "seconds": 0.0,
            "schedule": schedule,
        }
    return {**last, "schedule": schedule}
