"""Running a search on Ray Tune: the plan, the searcher and scheduler, how many trials run at once, the
trial function, the driver's callbacks, and the Tuner that ties them together.

One Ray Train run per Tune trial (the Ray 2.60 "Tune over Train V2" pattern): the plain trial function
:func:`run_trial` builds the trainer through :func:`lxn_ray.training.train.run_trainer` with
``TuneReportCallback``, so rank 0's per-epoch metrics reach Tune. ASHA stops weak trials early; Optuna's
TPE samples when ``optuna`` is installed (seeded random search otherwise). :func:`run_trial` must stay a
top-level function of this module: Ray pickles trials by module path.

Resources: a trial actor holds no CPU itself; its Ray Data loading uses free CPUs, then its Ray Train run
reserves the workers in a placement group. When Tune ends a trial early (ASHA, ``max_t``, the time
budget, an error) the trial actor dies and its Train controller with it, leaving the worker group's
placement group orphaned. :class:`ResourceKeeper`, a Tune callback on the driver, removes this job's
orphaned groups every couple of seconds (Ray Train's own cleaner is not relied on: it fails whenever
another Ray instance runs on the machine), and ends the search with one clear error when nothing made
progress for ``--stall-timeout-s`` while the cluster could take on no new work (see
:mod:`lxn_ray.infra.resources`). A search then waits for everything of its trials to be given back
(:func:`fit_and_give_back`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback

from lxn_ray.data import dataset
from lxn_ray.infra import cluster, quiet
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.resources import (
    POLL_S,
    StalledError,
    Watchdog,
    await_release,
    current_job_id,
    release_orphans,
)
from lxn_ray.infra.storage import Storage
from lxn_ray.tuning.results import val_counts, val_resolution
from lxn_ray.tuning.settings import TuneSettings
from lxn_ray.tuning.space import (
    METRIC,
    MODE,
    TUNE,
    search_space,
    train_run_name,
    trial_train_config,
)
from lxn_ray.tuning.tracking import TrialRuns

log = get_logger("tune").info  # progress for the person watching; stdout keeps the summary


# -- the plan, the searcher and the scheduler -----------------------------------------------------------
# Training throughput of LxN per CPU core, in FLOP/s of a training step (3x the forward pass), with each
# epoch's validation and checkpoint: measured on a 2-core AVX-512 + AMX machine (benchmarks/RESULTS.md:
# 3.3e11 bfloat16 and 9.8e10 float32 at 200 px on a quiet machine, ~1e11 bfloat16 at 128 px beside other
# work) and rounded down, so the plan's time is an upper bound.
TRAIN_FLOPS_PER_CORE = {"bfloat16": 1e11, "float32": 4e10}
TRAIN_FLOPS_PER_GPU = 5e12  # a conservative float16 figure for a data-centre GPU
TRIAL_START_S = 30.0  # a trial's Ray Train worker and TensorFlow start-up on a small machine


# Ingest's cost per film per CPU core - read, decode, fingerprint, duplicate search and verification - an
# upper bound from benchmarks/RESULTS.md (0.09 s per film on a quiet 2-core machine, ~0.3 s beside a test
# suite, ~0.13 s among 1,593 look-alike NIH films).
INGEST_S_PER_FILM_CORE = 0.6


def _cluster() -> tuple[int, int]:
    """(GPUs, CPUs) of the connected Ray cluster."""
    import ray

    total = ray.cluster_resources()
    return int(total.get("GPU", 0)), max(1, int(total.get("CPU", 1)))


def search_bound(settings: TuneSettings, images: int) -> tuple[float, str]:
    """(upper bound in seconds on a search of ``settings`` over ``images`` training images, precision).

    Every trial running every epoch, from :data:`TRAIN_FLOPS_PER_CORE` times the cluster's CPUs (trials
    side by side share them), or one GPU per running trial, plus each trial's start-up; ASHA and early
    stopping usually end the search sooner."""
    from lxn_ray.model.network import ModelConfig, flops_per_image, resolve_precision

    gpus, cpus = _cluster()
    precision = resolve_precision(settings.precision, on_gpu=gpus > 0)
    sizes = settings.image_sizes or (settings.image_size,)
    step = 3 * max(flops_per_image(ModelConfig(image_size=size, width=settings.width)) for size in sizes)
    work = settings.num_samples * settings.epochs * images * step
    seconds = work / (TRAIN_FLOPS_PER_GPU * gpus if gpus else TRAIN_FLOPS_PER_CORE[precision] * cpus)
    return seconds + settings.num_samples * TRIAL_START_S, precision


def _trials(settings: TuneSettings, images: str, precision: str) -> str:
    sizes = "/".join(map(str, settings.image_sizes or (settings.image_size,)))
    return (
        f"{settings.num_samples} trials x up to {settings.epochs} epochs of {images} training images at "
        f"{sizes} px in {precision}"
    )


def ingest_plan(settings: TuneSettings, films: int) -> tuple[str, float]:
    """(the line a tune job prints before it ingests ``films`` films, its upper bound in seconds): ingest's
    share and the search's, with every film counted as a training image (the train split is a part of
    them), so the search's own plan after ingest can only be lower."""
    ingest_s = films * INGEST_S_PER_FILM_CORE / _cluster()[1]
    search_s, precision = search_bound(settings, films)
    line = (
        f"plan: ingest {films} films (at most ~{_minutes(ingest_s)}), then "
        f"{_trials(settings, f'at most {films}', precision)} (at most ~{_minutes(search_s)}); in all at most "
        f"~{_minutes(ingest_s + search_s)} (ASHA and early stopping usually end sooner)"
    )
    return line, ingest_s + search_s


def plan(storage: Storage, version: str, settings: TuneSettings) -> tuple[list[str], float]:
    """(the lines a search prints before it starts, its upper bound in seconds): trials, epochs, image
    size, precision and time (:func:`search_bound`); then how finely the val split ranks trials
    (:func:`lxn_ray.tuning.results.val_resolution`). A rough guide, printed so a user can stop and shrink a
    search that would not fit their time."""
    images = dataset.read_split(storage, version, "train", settings.task).num_rows
    seconds, precision = search_bound(settings, images)
    lines = [
        f"plan: {_trials(settings, str(images), precision)}; at most ~{_minutes(seconds)} "
        "(ASHA and early stopping usually end sooner)",
        f"plan: {val_resolution(*val_counts(storage, version, settings.task))}",
    ]
    return lines, seconds


def _minutes(seconds: float) -> str:
    """A duration for people, in whole minutes (at least 1): ``3 min``."""
    return f"{max(1, round(seconds / 60))} min"


def make_searcher(settings: TuneSettings, max_concurrent: int = 0) -> tuple[Any, str]:
    """Optuna's TPE when asked for and installed, else seeded random search starting at most
    ``max_concurrent`` trials at once (0: no limit); returns (searcher, name).

    The random search's own limit is what holds there: Tune wraps a Searcher such as Optuna's in a
    ConcurrencyLimiter for ``max_concurrent_trials``, but not a BasicVariantGenerator it is handed, which
    then starts every trial at once - each loading its data and waiting for workers, on CPUs the running
    trials need (a trial's start-up measured 22-65 s that way, benchmarks/tune.py)."""
    if settings.searcher == "optuna":
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            if not quiet.verbose():  # optuna resets its logger to INFO when first used: its notices off
                optuna.logging.set_verbosity(optuna.logging.WARNING)
            return OptunaSearch(metric=METRIC, mode=MODE, seed=settings.seed), "optuna"
        except ImportError:
            log("optuna is not installed: falling back to random search")
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent), "random"


def make_scheduler(settings: TuneSettings) -> Any:
    """ASHA on val AUC (grace 1 epoch, max_t = epochs), or FIFO (every trial runs to the end).

    ``time_attr`` is ``training_iteration``: one Tune iteration is one reported epoch.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not settings.asha:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(1, settings.epochs),
        grace_period=1,
        reduction_factor=2,
    )


# -- resources ------------------------------------------------------------------------------------------
# A trial function only drives its trainer: Ray refuses an all-zero bundle, so it reserves a token amount of
# memory and no CPU. The CPUs are taken by its Ray Data loading (free CPUs, before training) and then by its
# Train workers' placement group; plan_concurrency sizes how many trials run at once so those fit.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}


def plan_concurrency(
    settings: TuneSettings, total: dict[str, float] | None = None, largest_node: int | None = None
) -> tuple[int, int]:
    """(trials at once, CPUs per Train worker) for the cluster's resources ``total`` (default: Ray's) and
    the CPUs of its ``largest_node`` (default: Ray's; a worker lives on one node, so it never asks for more).

    Each Train worker takes one GPU and one CPU where the cluster has GPUs, else ``cpus_per_worker``
    CPUs. Narrow trials side by side beat one wide trial on a CPU box (ASHA compares trials that report
    together), so as many trials run as fit one CPU (or GPU) per worker, never more than ``num_samples``,
    and the CPUs are then shared out among them. A trial's data loading runs before its workers start, on
    CPUs a finished trial has given back. ``--max-concurrent`` above what fits is honoured (the extra
    trials queue for workers), below it narrows the search and widens each worker.
    """
    import ray

    if total is None:
        total, largest_node = ray.cluster_resources(), cluster.largest_node_cpus()
    workers = max(1, settings.workers_per_trial)
    cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
    fits = max(1, (min(gpus, cpus) if gpus else cpus) // workers)
    wanted = settings.max_concurrent or fits
    if wanted > fits:
        log(f"--max-concurrent {wanted} exceeds what fits ({fits}); extra trials will queue for workers")
    concurrent = max(1, min(wanted, settings.num_samples))
    cpus_per_worker = 1 if gpus else max(1, cpus // (min(concurrent, fits) * workers))
    return concurrent, min(cpus_per_worker, largest_node or cpus_per_worker)


class TrialRetries(Callback):
    """How often a failed trial is run again (from its Train run's last checkpoint in storage), set on
    every trial as it starts. Tune pickles ``FailureConfig.max_failures`` into each trial when it creates
    it, so a restored search would otherwise keep the policy of the run that created its trials."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **_info: Any) -> None:
        trial.max_failures = self.max_failures


class Progress(Callback):
    """A Tune callback on the driver: one line per trial epoch and per finished trial, with the time left.

    The time left is one estimate that only shrinks: the lowest of the plan's upper bound less the time
    spent (``bound_s``), every earlier estimate, and the epochs still possible (every unfinished trial
    running all its epochs; ASHA and early stopping only shorten it) times the mean seconds per epoch so
    far, divided by the trials that run at once."""

    def __init__(self, num_samples: int, epochs: int, concurrent: int, bound_s: float = math.inf) -> None:
        self.num_samples, self.epochs, self.concurrent = num_samples, epochs, max(1, concurrent)
        self.bound_s = bound_s
        self.setup()

    def setup(self, **_info: Any) -> None:
        self.started = time.monotonic()
        self.epochs_done: dict[str, int] = {}
        self.finished: set[str] = set()
        self.estimate_s = self.bound_s

    def _left(self) -> str:
        elapsed = time.monotonic() - self.started
        done = sum(self.epochs_done.values())
        estimates = [self.estimate_s, self.bound_s - elapsed]
        if done:
            seconds_per_epoch = elapsed * self.concurrent / done  # one trial's epoch
            running = [t for t in self.epochs_done if t not in self.finished]
            possible = sum(self.epochs - self.epochs_done[t] for t in running)
            possible += (self.num_samples - len(self.epochs_done)) * self.epochs  # trials not started yet
            estimates.append(possible * seconds_per_epoch / self.concurrent)
        self.estimate_s = max(0.0, min(estimates))
        if self.estimate_s == math.inf:
            return "time left: estimated after the first epoch"
        if self.estimate_s < 60:
            return "under a minute left"
        return f"at most ~{_minutes(self.estimate_s)} left"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_info: Any) -> None:
        self.epochs_done[trial.trial_id] = int(
            result.get("epoch", self.epochs_done.get(trial.trial_id, 0) + 1)
        )
        value = result.get(METRIC)
        shown = f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
        log(
            f"trial {trial.trial_id} epoch {self.epochs_done[trial.trial_id]}/{self.epochs}: val objective "
            f"{shown}; {len(self.finished)} of {self.num_samples} trials done, {self._left()}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **_info: Any) -> None:
        self.finished.add(trial.trial_id)
        log(f"trial {trial.trial_id} ended; {len(self.finished)} of {self.num_samples} trials done")

    on_trial_error = on_trial_complete


class ResourceKeeper(Callback):
    """A Tune callback on the driver: gives back what ended trials held, and ends a stalled search.

    Every ``POLL_S`` seconds it removes this job's orphaned placement groups - the Ray Train worker groups
    of trials that Tune stopped or that failed (:func:`lxn_ray.infra.resources.release_orphans`) - and asks
    its
    :class:`~lxn_ray.infra.resources.Watchdog` whether the search stalled; a trial starting, reporting or
    ending
    is progress. A stall raises :class:`~lxn_ray.infra.resources.StalledError` out of Tune's loop, which stops
    every trial before ``Tuner.fit`` lets the error through.
    """

    def __init__(self, stall_timeout_s: float, what: str) -> None:
        self.stall_timeout_s, self.what = stall_timeout_s, what
        self.released: list[str] = []
        self.setup()

    def setup(self, **_info: Any) -> None:
        """Fresh state at the start of every run (also of a restored search, which unpickles this)."""
        self.watchdog = Watchdog(self.stall_timeout_s, self.what)
        self._next_sweep = 0.0

    def on_step_begin(self, iteration: int, trials: list, **_info: Any) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + POLL_S
        for group in release_orphans():
            self.released.append(group.id)
            log(f"released placement group {group.id[:12]} {group.resources} of an ended trial")
        diagnosis = self.watchdog.check(lambda: describe_trials(trials))
        if diagnosis is not None:
            raise StalledError(diagnosis)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **_info: Any) -> None:
        self.watchdog.progress()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_info: Any) -> None:
        self.watchdog.progress()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **_info: Any) -> None:
        self.watchdog.progress()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **_info: Any) -> None:
        self.watchdog.progress()


def describe_trials(trials: Sequence[Any]) -> str:
    """``trials: 2 RUNNING (a1b2c3d4 after 1 epochs, ...), 2 TERMINATED`` for a stall diagnosis."""
    by_status: dict[str, list[str]] = {}
    for trial in trials:
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        by_status.setdefault(trial.status, []).append(f"{trial.trial_id} after {epochs} epochs")
    return "trials: " + ", ".join(
        f"{len(names)} {status}" + (f" ({'; '.join(names)})" if status in ("RUNNING", "PENDING") else "")
        for status, names in sorted(by_status.items())
    )


# -- the trial ------------------------------------------------------------------------------------------
def run_trial(
    trial: dict[str, Any],
    storage_uri: str,
    version: str,
    settings: dict[str, Any],
    experiment: str,
    cpus_per_worker: int,
    crash_once: dict[str, Any] | None = None,
) -> None:
    """One Tune trial: one Ray Train run of the sampled config, its epochs reported to Tune."""
    import ray.data
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lxn_ray.training.train import run_trainer

    ray.data.DataContext.get_current().enable_progress_bars = False  # Tune's table is the progress view
    storage = Storage.open(storage_uri)
    tune_settings = _settings_from_dict(settings)
    config = trial_train_config(trial, tune_settings)
    run_name = train_run_name(experiment, ray.tune.get_context().get_trial_id())
    run_trainer(
        storage,
        version,
        config,
        run_name,
        callbacks=[TuneReportCallback()],
        # fault injection (tests): the trial errors instead of retrying, so --resume has work to do
        max_failures=0 if crash_once else 2,
        crash_once=crash_once,
        cpus_per_worker=cpus_per_worker,
    )


def _settings_from_dict(settings: dict[str, Any]) -> TuneSettings:
    settings = dict(settings)
    for key in ("image_sizes", "batch_sizes"):
        settings[key] = tuple(settings[key])
    return TuneSettings(**settings)


# -- the search -----------------------------------------------------------------------------------------
def _searcher_used(storage: Storage, name: str) -> str | None:
    """The searcher experiment ``name`` recorded in its ``search_settings.json`` (None without one)."""
    key = f"{TUNE}/{name}/search_settings.json"
    return storage.read_json(key).get("searcher_used") if storage.exists(key) else None


def build_tuner(
    storage: Storage,
    version: str,
    settings: TuneSettings,
    name: str,
    resume: bool = False,
    points: list[dict[str, Any]] | None = None,
    crash_once: dict[str, Any] | None = None,
    keeper: ResourceKeeper | None = None,
    trial_runs: TrialRuns | None = None,
) -> tuple[Any, str, int]:
    """A new (or with ``resume`` a restored) Tuner for ``name``: (tuner, searcher name, max concurrent).

    ``points``: fixed trial configs evaluated in order instead of sampled ones (the benchmark's same trials).
    ``keeper``: the search's :class:`ResourceKeeper`, ``trial_runs`` its MLflow callback
    (:class:`~lxn_ray.tuning.tracking.TrialRuns`); a restored search gets these, not its old copies.
    """
    from ray import tune

    path = storage.path(f"{TUNE}/{name}")
    max_concurrent, cpus_per_worker = plan_concurrency(settings)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            storage_uri=storage.uri,
            version=version,
            settings=dataclasses.asdict(settings),
            experiment=name,
            cpus_per_worker=cpus_per_worker,
            crash_once=crash_once,
        ),
        TRIAL_RESOURCES,
    )
    # A trial whose node is lost is run again, and its Train run resumes from its last checkpoint in storage
    # (the run is named by the trial); fault injection (tests) wants the error instead.
    retries = TrialRetries(max_failures=0 if crash_once else 2)
    exists = tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem)
    if resume and exists:
        log(f"resuming search {name} (errored and unfinished trials restart)")
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_errored=True, storage_filesystem=storage.filesystem
        )
        # Tune restores the callbacks it pickled; this run's keeper and retry policy instead
        run_config = tuner._local_tuner.get_run_config()
        replaced = (ResourceKeeper, TrialRetries, TrialRuns)
        kept = [c for c in run_config.callbacks or [] if not isinstance(c, replaced)]
        run_config.callbacks = [*kept, retries, *(c for c in (keeper, trial_runs) if c is not None)]
        return tuner, _searcher_used(storage, name) or settings.searcher, max_concurrent
    if exists:
        raise FileExistsError(f"search {name} already exists in {storage.uri_of(TUNE)}")
    if resume:
        log(f"nothing to resume for {name}: starting it")
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if points:
        searcher = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent)
        searcher_name = "fixed points"  # limited as make_searcher's random search is
    else:
        searcher, searcher_name = make_searcher(settings, max_concurrent)
    storage.write_json(
        f"{TUNE}/{name}/search_settings.json",
        {**dataclasses.asdict(settings), "searcher_used": searcher_name, "dataset_version": version},
    )
    plan_lines, bound_s = plan(storage, version, settings)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(settings),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=len(points) if points else settings.num_samples,
            search_alg=searcher,
            scheduler=make_scheduler(settings),
            # a random or fixed-points search limits itself (make_searcher); Tune would only warn
            max_concurrent_trials=None if isinstance(searcher, BasicVariantGenerator) else max_concurrent,
            time_budget_s=settings.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage.path(TUNE),
            storage_filesystem=storage.filesystem,
            # Tune's own status table only with --verbose; by default Progress prints a line per epoch
            verbose=1 if quiet.verbose() else 0,
            callbacks=[
                retries,
                *(c for c in (keeper, trial_runs) if c is not None),
                Progress(settings.num_samples, settings.epochs, max_concurrent, bound_s),
            ],
        ),
    )
    log(
        f"search {name}: {settings.num_samples} trials x {settings.epochs} epochs on dataset {version}, "
        f"{searcher_name} search of the {settings.space} space, {'ASHA' if settings.asha else 'FIFO'}, "
        f"up to {max_concurrent} at once "
        f"({settings.workers_per_trial} worker(s) x {cpus_per_worker} CPU each)"
    )
    for line in plan_lines:
        log(line)
    return tuner, searcher_name, max_concurrent


def fit_and_give_back(tuner: Any, keeper: ResourceKeeper) -> tuple[Any, list]:
    """``tuner.fit()`` (with ``keeper`` among its callbacks), then wait (bounded) until every trial's Train
    run has given its placement group back: (results, groups this job still holds - empty unless Ray
    failed to remove one). A stall (:class:`StalledError`) is raised as itself, whatever Tune wrapped it
    in, after the same wait."""
    job_id = current_job_id()
    try:
        results = tuner.fit()
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, StalledError):
            cause = cause.__cause__ or cause.__context__
        await_release(job_id)
        if cause is not None:
            raise StalledError(str(cause)) from None
        raise
    released, held = await_release(job_id)
    keeper.released += [group.id for group in released]
    if held:
        log(f"still held after the search: {'; '.join(group.describe(job_id) for group in held)}")
    return results, held
