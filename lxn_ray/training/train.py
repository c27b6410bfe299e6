"""The training job's driver: run Ray Train over a dataset version (watched, resumable), then publish the
run's best checkpoint as a model version.

:func:`train` names the run after the dataset version and config (:func:`lxn_ray.training.runs.run_name_of`),
so a rerun of the same job resumes it; :func:`run_trainer` builds the Ray Train trainer (TensorFlow's
backend, :mod:`lxn_ray.training.backend`) that runs
:func:`lxn_ray.training.loop.train_loop_per_worker` on every worker over the uint8 pixel cache
(:mod:`lxn_ray.training.pixel_cache`), shared with each Tune trial; afterwards the best checkpoint by the
validation objective picks its threshold on val and is scored once on test
(:func:`lxn_ray.training.publish.publish_model_version`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from lxn_ray.data import dataset
from lxn_ray.infra import cluster
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.resources import (
    DEFAULT_STALL_TIMEOUT_S,
    Watchdog,
    point_ray_train_at_this_cluster,
    run_watched,
)
from lxn_ray.infra.storage import Storage
from lxn_ray.infra.tracking import Tracker
from lxn_ray.sources.tasks import task_name
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.loop import train_loop_per_worker
from lxn_ray.training.pixel_cache import pixel_cache
from lxn_ray.training.publish import publish_model_version, recipe
from lxn_ray.training.runs import (
    OBJECTIVE,
    read_checkpoint_state,
    registered_epoch,
    run_config,
    run_name_of,
)
from lxn_ray.training.tracking import mirror_registry, track_training_run

if TYPE_CHECKING:
    import ray.train

log = get_logger("train").info  # progress for the person watching; stdout keeps the summary
warn = get_logger("train").warning


def run_trainer(
    storage: Storage,
    version: str,
    config: TrainConfig,
    run_name: str,
    callbacks: list | None = None,
    max_failures: int = 2,
    crash_once: dict | None = None,
    cpus_per_worker: int | None = None,
) -> ray.train.Result:
    """Fit LxN with Ray Train on ``version``; returns the ``ray.train.Result``.

    Shared by ``jobs/train.py`` (through :func:`fit_run` in a watched actor) and the Tune trials (which
    pass a reporting callback). It points this process's ``RAY_ADDRESS`` at the cluster it is connected
    to (:func:`lxn_ray.infra.resources.point_ray_train_at_this_cluster`).
    """
    import ray
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from lxn_ray.training.backend import TensorflowBackendConfig

    timeline = {"started": time.time()}  # the run's start-up: loop.startup_seconds
    point_ray_train_at_this_cluster()
    images = dataset.read_split(storage, version, "train", config.task, config.sources)
    positives = int(sum(images.column("label").to_pylist()))
    negatives = images.num_rows - positives
    from lxn_ray.model.network import class_weights

    w_pos, w_neg = class_weights(positives, negatives)
    train = pixel_cache(storage, version, "train", config)
    val = pixel_cache(storage, version, "val", config)
    timeline["data"] = time.time()
    scaling = scaling_config(config, ray.cluster_resources(), cpus_per_worker, cluster.largest_node_cpus())
    use_gpu, cpus = scaling.use_gpu, int(scaling.resources_per_worker["CPU"])
    timeline["fit"] = time.time()  # Ray Train starts its controller and worker group from here
    trainer = DataParallelTrainer(  # = ray.train.tensorflow.TensorflowTrainer (lxn_ray.training.backend)
        train_loop_per_worker,
        backend_config=TensorflowBackendConfig(),
        train_loop_config={
            "train": dataclasses.asdict(config),
            "w_pos": w_pos,
            "w_neg": w_neg,
            "cpus_per_worker": cpus,
            "storage_uri": storage.uri,
            "train_cache": train.key,
            "val_cache": val.key,
            "crash_once": crash_once and {**crash_once, "storage_uri": storage.uri, "run_name": run_name},
            "timeline": timeline,
        },
        scaling_config=scaling,
        run_config=run_config(storage, run_name, max_failures, callbacks),
    )
    log(
        f"training {config.workers} worker(s){' on GPU' if use_gpu else ''}: {len(train)} train / "
        f"{len(val)} val images streamed from the uint8 cache {storage.uri_of(train.key.rsplit('/', 1)[0])}"
        f", class weights w+={w_pos:.3f} w-={w_neg:.3f}"
    )
    return trainer.fit()


def scaling_config(
    config: TrainConfig,
    available: dict[str, float],
    cpus_per_worker: int | None = None,
    largest_node: int | None = None,
) -> ray.train.ScalingConfig:
    """What each Ray Train worker asks for: one GPU (and a CPU to feed it) when the cluster has GPUs or
    ``use_gpu`` is set; otherwise ``cpus_per_worker`` CPUs (Tune's sizing) or an even share of the
    ``available`` CPUs - never more than the ``largest_node`` has, since a worker lives on one node."""
    from ray.train import ScalingConfig

    workers = max(config.workers, 1)
    if config.use_gpu or available.get("GPU", 0) > 0:
        return ScalingConfig(num_workers=workers, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1})
    cpus = cpus_per_worker or max(1, int(available.get("CPU", 1) // workers))
    if largest_node:
        cpus = min(cpus, largest_node)
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus})


def segmenter_version(storage: Storage, lungs: Iterable[str], segmenter: str) -> str:
    """The segmenter version a run with these ``lungs`` modes uses: ``segmenter`` checked, or the store's
    newest when it names none; "" when no mode crops or masks to the lungs. Recorded by version, so the
    run name, the pixel cache and the card say which segmenter made the pixels. Raises FileNotFoundError
    when the store has no such segmenter (train one with ``jobs/lungs.py``)."""
    from lxn_ray import registry

    if all(mode == "none" for mode in lungs):
        return ""
    return registry.resolve_segmenter(storage, segmenter or "latest").version


def with_segmenter(storage: Storage, config: TrainConfig) -> TrainConfig:
    """``config`` with its lung preprocessing's segmenter named by version (:func:`segmenter_version`)."""
    preprocessing = config.preprocessing
    version = segmenter_version(storage, [preprocessing.lungs], preprocessing.segmenter)
    return dataclasses.replace(config, preprocessing=dataclasses.replace(preprocessing, segmenter=version))


def announce_plan(
    storage: Storage, version: str, task: str, sources: tuple[str, ...] = (), seed: int = 0, what: str = ""
) -> dict[str, Any]:
    """Log the plan of a run or search (``what``) before any training: the task's images per split and its
    shortcut baselines (:func:`lxn_ray.evaluation.baselines.shortcut_baselines`), with a warning when the
    source alone separates the classes. Returns the baselines."""
    from lxn_ray.evaluation import baselines

    rows = dataset.read_split(storage, version, None, task, sources)
    pairs = list(zip(rows.column("split").to_pylist(), rows.column("label").to_pylist(), strict=True))
    counts = ", ".join(
        f"{split} {sum(s == split for s, _ in pairs)} ({sum(s == split and y for s, y in pairs)} positive)"
        for split in dataset.SPLITS
    )
    shortcut = baselines.shortcut_baselines(rows, seed=seed)
    log(f"plan: {task_name(task)} on dataset {version}: {counts} images" + (f"; {what}" if what else ""))
    log(f"plan: shortcut baselines, test AUC of a classifier given only: {baselines.describe(shortcut)}")
    if shortcut["warning"]:
        warn(f"warning: {shortcut['warning']}")
    return shortcut


def fit_run(
    storage_uri: str, version: str, config: TrainConfig, run_name: str, **trainer_options: Any
) -> ray.train.Result:
    """:func:`run_trainer` by storage URI: the step :func:`train` runs in a watched actor."""
    return run_trainer(Storage.open(storage_uri), version, config, run_name, **trainer_options)


def train(
    storage: Storage,
    dataset_version: str | None,
    config: TrainConfig,
    fresh: bool = False,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    track: bool = True,
    **trainer_options,
) -> dict[str, Any]:
    """The training job: fit, pick the best epoch, choose the threshold on val, score test, publish; with
    ``track``, log the run to MLflow and mirror the registry there (:mod:`lxn_ray.training.tracking`; a
    search's repeats are logged by the search instead, nested under it).

    The run is named after the dataset version and config, so rerunning an interrupted job resumes it
    (and rerunning a finished one re-publishes its result); ``fresh`` starts a new run instead.
    The run is watched (:func:`lxn_ray.infra.resources.run_watched`): when no epoch is registered for
    ``stall_timeout_s`` seconds while the cluster can take on no new work, it is ended, its resources
    are given back, and :class:`lxn_ray.infra.resources.StalledError` says who holds them.
    """
    cluster.connect()
    started = time.monotonic()
    version = dataset.resolve_version(storage, dataset_version)
    config = with_segmenter(storage, config)
    announce_plan(storage, version, config.task, config.sources, config.seed, recipe(config))
    run_name = run_name_of(version, config)
    if fresh:
        run_name += f"-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    result = run_watched(
        fit_run,
        storage.uri,
        version,
        config,
        run_name,
        watchdog=Watchdog(stall_timeout_s, what=f"training run {run_name}"),
        progress=lambda: registered_epoch(storage, run_name),
        activity=lambda: f"epochs registered: {registered_epoch(storage, run_name)} of {config.epochs}",
        **trainer_options,
    )
    best = result.get_best_checkpoint(metric=OBJECTIVE, mode="max") or result.checkpoint
    if best is None or result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} produced no checkpoint")
    latest = read_checkpoint_state(result.checkpoint)  # holds every epoch's metrics and the resume count
    seconds = time.monotonic() - started
    published = publish_model_version(storage, version, config, best, latest, seconds, run_name)
    if track:
        with Tracker.for_storage(storage) as tracker:  # in MLflow too: the run, then the registry's mirror
            track_training_run(tracker, storage, published["model_version"])
            mirror_registry(tracker, storage)
    return published
