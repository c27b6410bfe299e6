"""Hyperparameter search over the Ray Train loop with Ray Tune, and promotion of its best model.

This module owns the ``tune`` job: it ingests first when the store has no dataset version (or
``--source``/``--sources`` is given), runs one Ray Train run per Tune trial (the Ray 2.60 "Tune over Train V2"
pattern: a plain trial function builds the trainer through :func:`lxn_ray.training.train.run_trainer` with
``TuneReportCallback`` so rank 0's per-epoch metrics reach Tune), stops weak trials early with ASHA,
samples with Optuna's TPE when ``optuna`` is installed (random search otherwise), then evaluates the best
trial's best checkpoint on test with :func:`lxn_ray.training.train.publish_model_version` and promotes it by
:mod:`lxn_ray.evaluation.promotion`'s superiority rule (a paired bootstrap on the same test images). Trials,
epochs
and checkpoints are ranked by the source-aware validation objective
(:data:`lxn_ray.training.train.OBJECTIVE`).

Why here and not in ``train.py``: the search adds a second level of orchestration (trials, schedulers,
searchers, experiment state, resumption), while a trial is exactly one training run; keeping them apart
lets ``jobs/train.py`` stay a single run and every trial reuse the same loop, data path and evaluation.

Layout under storage: ``tune/<experiment>/`` is the Tune experiment (restorable with ``--resume``) plus
``trials.csv`` and ``search.png``; each trial's Ray Train run lives in ``runs/<experiment>-<trial id>``,
so an interrupted trial resumes its training run from the last epoch checkpoint when the search resumes.

Resources: a trial actor holds no CPU itself; its Ray Data loading uses free CPUs, then its Ray Train run
reserves the workers in a placement group. When Tune ends a trial early (ASHA, ``max_t``, the time
budget, an error) the trial actor dies and its Train controller with it, leaving the worker group's
placement group orphaned. :class:`ResourceKeeper`, a Tune callback on the driver, removes this job's
orphaned groups every couple of seconds (Ray Train's own cleaner is not relied on: it fails whenever
another Ray instance runs on the machine), and ends the search with one clear error when nothing made
progress for ``--stall-timeout-s`` while the cluster could take on no new work (see
:mod:`lxn_ray.infra.resources`). A search then waits for everything of its trials to be given back.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback

from lxn_ray import registry
from lxn_ray.data import dataset
from lxn_ray.evaluation.promotion import decide, evaluate_pair
from lxn_ray.images.preprocess import AugmentConfig, PreprocessConfig
from lxn_ray.infra import quiet
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
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.train import OBJECTIVE, RUNS
from lxn_ray.tuning.settings import TuneSettings

TUNE = "tune"
METRIC, MODE = OBJECTIVE, "max"  # the source-aware validation metric (lxn_ray.training.train.OBJECTIVE)

# The searched augmentation: (config key, upper bound); the lower bound of each is 0 (off).
AUGMENT_RANGES: dict[str, float] = {
    "rotation": 15.0,
    "zoom": 0.15,
    "shift": 0.1,
    "brightness": 0.2,
    "contrast": 0.2,
}
LR_RANGE = (1e-5, 1e-2)
# The recipe's searched switches (space "full"); "paper" fixes each at its first value, the paper's.
RECIPE_CHOICES: dict[str, tuple[Any, ...]] = {
    "optimizer": ("rmsprop", "adam", "adamw"),
    "schedule": ("constant", "cosine"),
    "architecture": ("lxn", "lxn-bn"),
    "sampling": ("weighted", "class-balanced", "source-balanced"),
    "equalization": ("none", "histogram", "clahe"),
    "trim_borders": (False, True),
}
WARMUP_EPOCHS = 1  # of a cosine schedule in a trial


log = get_logger("tune").info  # progress for the person watching; stdout keeps the summary


def experiment_name(version: str, settings: TuneSettings) -> str:
    """Deterministic: the same dataset version and search settings name the same series of experiments
    (``NAME``, then ``NAME-2``, ``NAME-3``, ... for each new search with those settings)."""
    return f"tune-{version}-{settings.digest()}"


def experiment_series(storage: Storage, base: str) -> list[str]:
    """The experiments of one name's series that exist in storage, oldest first."""
    names: list[str] = []
    while True:
        name = base if not names else f"{base}-{len(names) + 1}"
        if not storage.exists(f"{TUNE}/{name}"):
            return names
        names.append(name)


def choose_experiment(storage: Storage, base: str, resume: bool) -> str:
    """``resume``: the newest experiment of the series (the base name when there is none yet);
    otherwise the next free name, so rerunning the same command starts a fresh search."""
    existing = experiment_series(storage, base)
    if resume or not existing:
        return existing[-1] if existing else base
    return f"{base}-{len(existing) + 1}"


# -- the search space -----------------------------------------------------------------------------------
def search_space(settings: TuneSettings) -> dict[str, Any]:
    """Learning rate (log-uniform), augmentation strengths and, in the ``full`` space, the recipe
    (:data:`RECIPE_CHOICES`); batch and image size when choices are given."""
    from ray import tune

    space: dict[str, Any] = {
        "learning_rate": tune.loguniform(*LR_RANGE),
        **{name: tune.uniform(0.0, upper) for name, upper in AUGMENT_RANGES.items()},
        "horizontal_flip": tune.choice([True, False]),
    }
    if settings.space == "full":
        space.update({name: tune.choice(list(choices)) for name, choices in RECIPE_CHOICES.items()})
    if settings.batch_sizes:
        space["batch_size"] = tune.choice(list(settings.batch_sizes))
    if settings.image_sizes:
        space["image_size"] = tune.choice(list(settings.image_sizes))
    return space


def trial_train_config(trial: dict[str, Any], settings: TuneSettings) -> TrainConfig:
    """The :class:`TrainConfig` of one trial: the sampled values over the search's fixed settings."""
    augment = AugmentConfig(
        **{name: float(trial[name]) for name in AUGMENT_RANGES},
        horizontal_flip=bool(trial["horizontal_flip"]),
    )
    recipe = {name: trial.get(name, choices[0]) for name, choices in RECIPE_CHOICES.items()}
    return TrainConfig(
        image_size=int(trial.get("image_size", settings.image_size)),
        width=settings.width,
        epochs=settings.epochs,
        batch_size=int(trial.get("batch_size", settings.batch_size)),
        learning_rate=float(trial["learning_rate"]),
        augment=augment,
        workers=settings.workers_per_trial,
        seed=settings.seed,
        task=settings.task,
        precision=settings.precision,
        patience=settings.patience,
        optimizer=recipe["optimizer"],
        schedule=recipe["schedule"],
        warmup_epochs=WARMUP_EPOCHS if recipe["schedule"] == "cosine" else 0,
        sampling=recipe["sampling"],
        architecture=recipe["architecture"],
        preprocessing=PreprocessConfig(
            trim_borders=bool(recipe["trim_borders"]), equalization=recipe["equalization"]
        ),
    )


def augment_strength(trial: dict[str, Any]) -> float:
    """0 (no augmentation) .. 1 (every searched transform at its upper bound), flip not counted."""
    return sum(float(trial.get(name, 0.0)) / upper for name, upper in AUGMENT_RANGES.items()) / len(
        AUGMENT_RANGES
    )


# Training throughput of LxN per CPU core, in FLOP/s of a training step (3x the forward pass), with each
# epoch's validation and checkpoint: measured on a 2-core AVX-512 + AMX machine (benchmarks/RESULTS.md:
# 3.3e11 bfloat16 and 9.8e10 float32 at 200 px on a quiet machine, ~1e11 bfloat16 at 128 px beside other
# work) and rounded down, so the plan's time is an upper bound.
TRAIN_FLOPS_PER_CORE = {"bfloat16": 1e11, "float32": 4e10}
TRAIN_FLOPS_PER_GPU = 5e12  # a conservative float16 figure for a data-centre GPU
TRIAL_START_S = 30.0  # a trial's Ray Train worker and TensorFlow start-up on a small machine


def plan(storage: Storage, version: str, settings: TuneSettings) -> str:
    """The line a search prints before it starts: trials, epochs, image size, precision, expected time.

    The time is an upper bound - every trial running every epoch - from :data:`TRAIN_FLOPS_PER_CORE` times
    the cluster's CPUs (trials side by side share them), or one GPU per running trial; ASHA and early
    stopping usually end the search sooner. A rough guide, printed so a user can stop and shrink a
    search that would not fit their time."""
    import ray

    from lxn_ray.model.network import ModelConfig, flops_per_image, resolve_precision

    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), max(1, int(total.get("CPU", 1)))
    precision = resolve_precision(settings.precision, on_gpu=gpus > 0)
    sizes = settings.image_sizes or (settings.image_size,)
    images = dataset.read_split(storage, version, "train", settings.task).num_rows
    step = 3 * max(flops_per_image(ModelConfig(image_size=size, width=settings.width)) for size in sizes)
    work = settings.num_samples * settings.epochs * images * step
    seconds = work / (TRAIN_FLOPS_PER_GPU * gpus if gpus else TRAIN_FLOPS_PER_CORE[precision] * cpus)
    seconds += settings.num_samples * TRIAL_START_S
    return (
        f"plan: {settings.num_samples} trials x up to {settings.epochs} epochs of {images} training images "
        f"at {'/'.join(map(str, sizes))} px in {precision}; expected at most ~{seconds / 60:.0f} min "
        "(ASHA and early stopping usually end sooner)"
    )


def make_searcher(settings: TuneSettings) -> tuple[Any, str]:
    """Optuna's TPE when asked for and installed, else seeded random search; returns (searcher, name)."""
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

    return BasicVariantGenerator(random_state=settings.seed), "random"


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


def plan_concurrency(settings: TuneSettings, total: dict[str, float] | None = None) -> tuple[int, int]:
    """(trials at once, CPUs per Train worker) for the cluster's resources ``total`` (default: Ray's).

    Each Train worker takes one GPU and one CPU where the cluster has GPUs, else ``cpus_per_worker``
    CPUs. Narrow trials side by side beat one wide trial on a CPU box (ASHA compares trials that report
    together), so as many trials run as fit one CPU (or GPU) per worker, never more than ``num_samples``,
    and the CPUs are then shared out among them. A trial's data loading runs before its workers start, on
    CPUs a finished trial has given back. ``--max-concurrent`` above what fits is honoured (the extra
    trials queue for workers), below it narrows the search and widens each worker.
    """
    import ray

    total = ray.cluster_resources() if total is None else total
    workers = max(1, settings.workers_per_trial)
    cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
    fits = max(1, (min(gpus, cpus) if gpus else cpus) // workers)
    wanted = settings.max_concurrent or fits
    if wanted > fits:
        log(f"--max-concurrent {wanted} exceeds what fits ({fits}); extra trials will queue for workers")
    concurrent = max(1, min(wanted, settings.num_samples))
    cpus_per_worker = 1 if gpus else max(1, cpus // (min(concurrent, fits) * workers))
    return concurrent, cpus_per_worker


class Progress(Callback):
    """A Tune callback on the driver: one line per trial epoch and per finished trial, with the time left.

    The estimate is an upper bound, like the plan's: the epochs still possible (every unfinished trial
    running all its epochs; ASHA and early stopping only shorten it) times the mean seconds per epoch so
    far, divided by the trials that run at once."""

    def __init__(self, num_samples: int, epochs: int, concurrent: int) -> None:
        self.num_samples, self.epochs, self.concurrent = num_samples, epochs, max(1, concurrent)
        self.setup()

    def setup(self, **_info: Any) -> None:
        self.started = time.monotonic()
        self.epochs_done: dict[str, int] = {}
        self.finished: set[str] = set()

    def _left(self) -> str:
        done = sum(self.epochs_done.values())
        if not done:
            return "time left: estimated after the first epoch"
        seconds_per_epoch = (time.monotonic() - self.started) * self.concurrent / done  # one trial's epoch
        running = [t for t in self.epochs_done if t not in self.finished]
        possible = sum(self.epochs - self.epochs_done[t] for t in running)
        possible += (self.num_samples - len(self.epochs_done)) * self.epochs  # trials not started yet
        minutes = possible * seconds_per_epoch / self.concurrent / 60
        return f"at most ~{minutes:.0f} min left" if minutes >= 1 else "under a minute left"

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


def train_run_name(experiment: str, trial_id: str) -> str:
    """A trial's Ray Train run: stable across ``--resume``, so a restarted trial resumes its epochs."""
    return f"{experiment}-{trial_id}"


def _settings_from_dict(settings: dict[str, Any]) -> TuneSettings:
    settings = dict(settings)
    for key in ("image_sizes", "batch_sizes"):
        settings[key] = tuple(settings[key])
    return TuneSettings(**settings)


# -- the search -----------------------------------------------------------------------------------------
def build_tuner(
    storage: Storage,
    version: str,
    settings: TuneSettings,
    name: str,
    resume: bool = False,
    points: list[dict[str, Any]] | None = None,
    crash_once: dict[str, Any] | None = None,
    keeper: ResourceKeeper | None = None,
) -> tuple[Any, str, int]:
    """A new (or with ``resume`` a restored) Tuner for ``name``: (tuner, searcher name, max concurrent).

    ``points``: fixed trial configs evaluated in order instead of sampled ones (the benchmark's same trials).
    ``keeper``: the search's :class:`ResourceKeeper` (a restored search gets this one, not its old copy).
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
    exists = tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem)
    if resume and exists:
        log(f"resuming search {name} (errored and unfinished trials restart)")
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_errored=True, storage_filesystem=storage.filesystem
        )
        if keeper is not None:  # Tune restores the callbacks it pickled; use this run's keeper instead
            run_config = tuner._local_tuner.get_run_config()
            kept = [c for c in run_config.callbacks or [] if not isinstance(c, ResourceKeeper)]
            run_config.callbacks = [*kept, keeper]
        return tuner, _searcher_used(storage, name) or settings.searcher, max_concurrent
    if exists:
        raise FileExistsError(f"search {name} already exists in {storage.uri_of(TUNE)}")
    if resume:
        log(f"nothing to resume for {name}: starting it")
    if points:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        searcher, searcher_name = BasicVariantGenerator(points_to_evaluate=points), "fixed points"
    else:
        searcher, searcher_name = make_searcher(settings)
    storage.write_json(
        f"{TUNE}/{name}/search_settings.json",
        {**dataclasses.asdict(settings), "searcher_used": searcher_name, "dataset_version": version},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(settings),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=len(points) if points else settings.num_samples,
            search_alg=searcher,
            scheduler=make_scheduler(settings),
            max_concurrent_trials=max_concurrent,
            time_budget_s=settings.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage.path(TUNE),
            storage_filesystem=storage.filesystem,
            # Tune's own status table only with --verbose; by default Progress prints a line per epoch
            verbose=1 if quiet.verbose() else 0,
            callbacks=[
                *([keeper] if keeper is not None else []),
                Progress(settings.num_samples, settings.epochs, max_concurrent),
            ],
        ),
    )
    log(
        f"search {name}: {settings.num_samples} trials x {settings.epochs} epochs on dataset {version}, "
        f"{searcher_name} search of the {settings.space} space, {'ASHA' if settings.asha else 'FIFO'}, "
        f"up to {max_concurrent} at once "
        f"({settings.workers_per_trial} worker(s) x {cpus_per_worker} CPU each)"
    )
    log(plan(storage, version, settings))
    return tuner, searcher_name, max_concurrent


def search(
    storage: Storage,
    settings: TuneSettings,
    dataset_version: str | None = "latest",
    resume: bool = False,
    crash_once: dict[str, Any] | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Run (or ``resume``) the search, then publish its best trial and decide promotion. The job's report.

    ``promote=False`` leaves the champion alone (``promoted`` is then False): for callers with their own
    promotion rule, such as scheduled retraining.
    """
    from lxn_ray.infra import cluster

    cluster.connect()
    started = time.monotonic()
    version = dataset.resolve_version(storage, dataset_version)
    name = choose_experiment(storage, experiment_name(version, settings), resume)
    keeper = ResourceKeeper(settings.stall_timeout_s, what=f"search {name}")
    tuner, searcher_name, max_concurrent = build_tuner(
        storage, version, settings, name, resume=resume, crash_once=crash_once, keeper=keeper
    )
    results, held = fit_and_give_back(tuner, keeper)
    rows = trial_rows(results, settings)
    storage.write_bytes(f"{TUNE}/{name}/trials.csv", trials_csv(rows))
    storage.write_bytes(
        f"{TUNE}/{name}/search.png", search_plot(rows, f"experiment {name}, dataset {version}")
    )
    best_row = choose_best(rows, name)
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
        "best": {
            "trial_id": best_row["trial_id"],
            "config": best_row["config"],
            "val_objective": best_row["objective_best"],
            "model_version": published["model_version"],
            "train_run": published["train_run"],
        },
        "test": published["test"],
        "threshold": published["threshold"],
        "repeats": repeats,
        "champion": registry.champion(storage),
        "promoted": promoted,
        "promotion_reason": reason,
        "promotion": promotion,
        "task": settings.task,
        "sources": published.get("sources"),
        "warnings": published.get("warnings", []),
        "seconds": round(time.monotonic() - started, 1),
    }


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


def _searcher_used(storage: Storage, name: str) -> str | None:
    key = f"{TUNE}/{name}/search_settings.json"
    return storage.read_json(key).get("searcher_used") if storage.exists(key) else None


def trial_rows(results: Any, settings: TuneSettings) -> list[dict[str, Any]]:
    """One row per trial from a ``ResultGrid``: config, best/last val AUC, epochs run, status, seconds."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        history = frame.to_dict("records") if frame is not None and METRIC in frame else []
        collapsed = any(_flag(r.get("collapsed")) for r in history)
        # A collapsed epoch (lxn_ray.training.train.is_collapsed) never counts: its constant output scores
        # 0.5.
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


def choose_best(rows: Sequence[dict[str, Any]], name: str = "the search") -> dict[str, Any]:
    """The trial with the highest best val objective (ties: the faster). A trial that collapsed is never
    the best, even by an epoch before it collapsed; raises RuntimeError when no trial is left."""
    candidates = [row for row in rows if row["objective_best"] is not None and row["status"] != "COLLAPSED"]
    if not candidates:
        collapsed = sum(row["status"] == "COLLAPSED" for row in rows)
        raise RuntimeError(
            f"no trial of {name} has a usable val objective ({len(rows)} trials, {collapsed} collapsed to "
            "a constant output: search lower learning rates)"
        )
    return max(candidates, key=lambda row: (row["objective_best"], -row["seconds"]))


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
    """All trials as CSV; config keys become ``config/<name>`` columns."""
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
    """The search picture: best val AUC against learning rate, coloured by augmentation strength."""
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


# -- publication and promotion --------------------------------------------------------------------------
def publish_best(
    storage: Storage,
    version: str,
    settings: TuneSettings,
    experiment: str,
    best_row: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Evaluate the best trial's best checkpoint (by val AUC) on test and register it as a model version.

    Idempotent: when that checkpoint was already published (a ``--resume`` of a finished search), the
    existing model version is reported instead of a duplicate.
    """
    import ray.train

    from lxn_ray.training.train import publish_model_version, read_checkpoint_state

    run_name = train_run_name(experiment, best_row["trial_id"])
    result = ray.train.Result.from_path(
        storage.path(f"{RUNS}/{run_name}"), storage_filesystem=storage.filesystem
    )
    checkpoint = result.get_best_checkpoint(metric=METRIC, mode=MODE) or result.checkpoint
    if checkpoint is None or result.checkpoint is None:
        raise RuntimeError(f"the best trial's training run {run_name} has no checkpoint")
    latest, best_state = read_checkpoint_state(result.checkpoint), read_checkpoint_state(checkpoint)
    for existing in registry.list_versions(storage):
        card = registry.read_card(storage, existing)
        if card.get("train_run") == run_name and card.get("best_epoch") == best_state["epoch"]:
            log(f"best checkpoint already published as {existing}")
            return {
                "model_version": existing,
                "test": card["test"],
                "threshold": card["threshold"],
                "train_run": run_name,
                "dataset_version": version,
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
    (ddof=1) beside min and max; with N+1 runs it is a rough guide, not an interval."""
    import numpy as np

    from lxn_ray.training.train import run_name_of, train

    config = trial_train_config(best_row["config"], settings)
    versions = [(published["model_version"], config.seed)]
    for offset in range(1, settings.repeats + 1):
        repeat = dataclasses.replace(config, seed=config.seed + offset)
        done = [
            existing
            for existing in registry.list_versions(storage)
            if registry.read_card(storage, existing).get("train_run") == run_name_of(version, repeat)
        ]
        if done:
            log(f"repeat {offset}/{settings.repeats} (seed {repeat.seed}) already published as {done[-1]}")
            versions.append((done[-1], repeat.seed))
            continue
        log(f"repeat {offset}/{settings.repeats}: the best config with seed {repeat.seed}")
        versions.append((train(storage, version, repeat)["model_version"], repeat.seed))
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


# -- the job --------------------------------------------------------------------------------------------
def tune_job(
    storage: Storage,
    settings: TuneSettings,
    sources: Any = None,
    resume: bool = False,
    crash_once: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest when needed (empty store, or ``sources`` given: what :func:`lxn_ray.data.ingest.ingest` takes),
    then search and publish."""
    ingested = None
    if sources is not None or dataset.latest_version(storage) is None:
        from lxn_ray.data.ingest import ingest
        from lxn_ray.sources.transports import open_source

        log(
            "ingesting the sources first"
            if sources is not None
            else "ingesting the upstream repository first"
        )
        report = ingest(sources if sources is not None else open_source(None), storage)
        ingested = {"dataset_version": report["dataset_version"], "changed": report["changed"]}
    report = search(storage, settings, resume=resume, crash_once=crash_once)
    return {**report, "ingest": ingested}
