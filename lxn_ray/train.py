"""Data-parallel LxN training with Ray Train, and the honest evaluation that turns it into a model version.

Why a custom training step: Keras 3 ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` with two
workers (keras-team/keras#20585), so each step is ``strategy.run`` over a ``GradientTape``; the loss is
the per-example weighted BCE of equation (1) divided by the global batch. The same
:func:`train_loop_per_worker` serves ``jobs/train.py`` and every Ray Tune trial.

Data comes from a dataset version through Ray Data: images are read from storage and preprocessed by
Ray Data tasks with the one :func:`lxn_ray.preprocess.preprocess_bytes`, materialised once, and the
training split is sharded equally over the workers (no worker holds the whole set). Every worker
validates on the full (small) validation split so all ranks agree on the metrics.

Each epoch reports train/val loss, accuracy, AUC, sensitivity and specificity with a checkpoint from
rank 0; a worker that dies is replaced and resumes from the latest checkpoint, and a rerun of the same
job (same dataset version and config) resumes its run. Afterwards the best checkpoint by val AUC picks
its threshold on val (Youden's J) and is scored once on test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lxn_ray import cluster, dataset, metrics, plots, registry
from lxn_ray.model import ModelConfig
from lxn_ray.preprocess import LIGHT_AUGMENT, AugmentConfig
from lxn_ray.resources import (
    DEFAULT_STALL_TIMEOUT_S,
    Watchdog,
    point_ray_train_at_this_cluster,
    run_watched,
)
from lxn_ray.storage import Storage
from lxn_ray.tasks import DEFAULT_TASK, resolve_task

RUNS = "runs"
# What picks the best epoch, the best trial and the champion: the source-aware validation metric
# (lxn_ray.metrics.source_aware_objective - mean within-source AUC where sources hold both classes).
OBJECTIVE = "val_objective"


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults are the paper's: 200 px, batch 20, 10 epochs, RMSprop at 1e-4."""

    image_size: int = 200
    width: float = 1.0
    epochs: int = 10
    batch_size: int = 20  # global: split over the workers
    learning_rate: float = 1e-4
    augment: AugmentConfig = field(default_factory=lambda: LIGHT_AUGMENT)
    workers: int = 1
    use_gpu: bool = False  # also on whenever the cluster has GPUs
    mixed_precision: bool = False  # float16 compute on GPUs (float32 weights and output); off by default
    seed: int = 0
    task: str = DEFAULT_TASK  # a built-in task name or a task file (lxn_ray.tasks)
    sources: tuple[str, ...] = ()  # train and validate on these sources only (empty: all); see loso.py

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(image_size=self.image_size, width=self.width)

    def digest(self) -> str:
        settings = dataclasses.asdict(self)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def log(message: str) -> None:
    print(f"[train {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------------
def _load_batch(batch: dict[str, np.ndarray], storage_uri: str, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: image bytes from storage -> the shared preprocessing -> float32 arrays."""
    from lxn_ray.preprocess import preprocess_bytes

    storage = Storage.open(storage_uri)
    images = [preprocess_bytes(storage.read_bytes(str(key)), image_size) for key in batch["image_key"]]
    return {"image": np.stack(images), "label": batch["label"].astype(np.float32), "source": batch["source"]}


def split_dataset(storage: Storage, version: str, split: str, config: TrainConfig):
    """One split of a dataset version, the rows a run uses (its task's, from its sources), as a
    materialised Ray Dataset of ``image`` (float32), ``label`` (float32, the task's) and ``source`` (str)."""
    import ray

    table = dataset.read_split(storage, version, split, config.task, config.sources)
    table = table.select(["image_key", "label", "source"])
    if table.num_rows == 0:
        raise ValueError(f"split {split!r} of dataset {version} holds no image of task {config.task}")
    image_size = config.image_size
    blocks = max(1, min(table.num_rows // 32, 32))
    return (
        ray.data.from_arrow(table)
        .repartition(blocks)
        .map_batches(
            _load_batch, fn_kwargs={"storage_uri": storage.uri, "image_size": image_size}, batch_size=32
        )
        .materialize()
    )


# -- the training loop (runs on every Ray Train worker) -----------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker of a data-parallel run. ``loop_config``: TrainConfig fields plus class weights."""
    import tensorflow as tf

    # Thread pools, GPU memory growth, then collective ops: all before any TF op runs in this process.
    cpus = int(loop_config.get("cpus_per_worker", 1))
    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)  # share the card; no up-front grab
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import ray.train

    from lxn_ray.model import build_lxn, make_optimizer, weighted_bce
    from lxn_ray.preprocess import build_augmenter

    config = _config_from_dict(loop_config["train"])
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    keras.utils.set_random_seed(config.seed)  # same initial weights on every rank

    with strategy.scope():
        model = build_lxn(config.model)
        optimizer = make_optimizer(config.learning_rate)
        if config.mixed_precision:  # scales the loss so float16 gradients do not underflow
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    augmenter = build_augmenter(config.augment, seed=config.seed + rank)
    w_pos, w_neg = float(loop_config["w_pos"]), float(loop_config["w_neg"])
    local_batch = max(1, config.batch_size // world)

    history: list[dict[str, Any]] = []
    start_epoch, resumes = 1, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a replaced worker group, or a rerun of an interrupted job
        with checkpoint.as_directory() as folder:
            model.load_weights(Path(folder) / "model.weights.h5")
            state = json.loads((Path(folder) / "state.json").read_text())
        history, start_epoch, resumes = state["history"], state["epoch"] + 1, state.get("resumes", 0) + 1
        if rank == 0:
            print(f"[train] resuming after epoch {state['epoch']}", flush=True)
    crash = loop_config.get("crash_once")  # fault injection for tests: {"epoch", "rank", "marker"}

    def replica_step(images, labels):
        if augmenter is not None:
            images = augmenter(images, training=True)
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example = weighted_bce(labels, probabilities, w_pos, w_neg)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=tf.shape(images)[0] * world)
            if config.mixed_precision:
                loss = optimizer.scale_loss(loss)  # apply_gradients unscales
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return per_example, tf.reshape(probabilities, [-1])

    @tf.function(reduce_retracing=True)
    def train_step(images, labels):
        return strategy.run(replica_step, args=(images, labels))

    @tf.function(reduce_retracing=True)
    def predict(images):
        return tf.reshape(model(images, training=False), [-1])

    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, config.epochs + 1):
        if crash and (epoch, rank) == (crash["epoch"], crash["rank"]) and not Path(crash["marker"]).exists():
            _wait_until_registered(crash["storage_uri"], crash["run_name"], epoch - 1)
            Path(crash["marker"]).touch()
            os._exit(1)  # the process dies as a lost node would: no exception, no cleanup
        started = time.monotonic()
        losses, scores, labels = [], [], []
        for batch in train_shard.iter_batches(batch_size=local_batch, batch_format="numpy", drop_last=False):
            per_example, probabilities = train_step(tf.constant(batch["image"]), tf.constant(batch["label"]))
            losses.append(per_example.numpy())
            scores.append(probabilities.numpy())
            labels.append(batch["label"])
        train_seconds = time.monotonic() - started
        train = _epoch_metrics(np.concatenate(labels), np.concatenate(scores), np.concatenate(losses))
        val_labels, val_scores, val_sources = [], [], []
        for batch in val_data.iter_batches(batch_size=64, batch_format="numpy"):
            val_scores.append(predict(tf.constant(batch["image"])).numpy())
            val_labels.append(batch["label"])
            val_sources.append(batch["source"])
        y, p = np.concatenate(val_labels), np.concatenate(val_scores)
        val_loss = weighted_bce(y, p, w_pos, w_neg).numpy()
        val = _epoch_metrics(y, p, val_loss)
        objective, _ = metrics.selection_objective(
            y.astype(np.int64), p, np.concatenate(val_sources).tolist()
        )
        entry = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()},
            "val_objective": objective,
            "train_seconds": train_seconds,
            "epoch_seconds": time.monotonic() - started,
        }
        history.append(entry)
        if rank == 0:
            print(
                f"[train] epoch {epoch}/{config.epochs}: loss {train['loss']:.4f} val_loss {val['loss']:.4f} "
                f"val_auc {metrics.fmt(val['auc'])} val_acc {val['accuracy']:.3f} "
                f"({entry['epoch_seconds']:.1f} s)",
                flush=True,
            )
        undefined = {"val_auc": val["auc"], "val_objective": objective}  # a one-class val split: chance
        report = {**entry, **{key: 0.5 if value is None else value for key, value in undefined.items()}}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                model.save_weights(Path(folder) / "model.weights.h5")
                (Path(folder) / "state.json").write_text(
                    json.dumps({"epoch": epoch, "history": history, "resumes": resumes})
                )
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(report, checkpoint=checkpoint)


CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # where Ray Train records registered checkpoints


def registered_epoch(storage: Storage, run_name: str) -> int:
    """The epoch of the latest checkpoint Ray Train has registered for ``run_name`` (0 while none, or
    while the snapshot is being written) - a rerun of the run resumes after that epoch."""
    try:
        snapshot = storage.read_json(f"{RUNS}/{run_name}/{CHECKPOINT_SNAPSHOT}")
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int((snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("epoch", 0))


def _wait_until_registered(storage_uri: str, run_name: str, epoch: int, timeout_s: float = 120.0) -> None:
    """Fault injection only: block until Ray Train's controller has recorded ``epoch``'s checkpoint.

    The controller polls workers every few seconds; a worker lost before that poll loses the report it
    just made. Tests inject the failure after the registration so they test resumption, not that race.
    """
    storage = Storage.open(storage_uri)
    deadline = time.monotonic() + timeout_s
    while registered_epoch(storage, run_name) != epoch:
        if time.monotonic() > deadline:
            raise TimeoutError(f"checkpoint of epoch {epoch} never registered for run {run_name}")
        time.sleep(0.2)


def _epoch_metrics(labels: np.ndarray, scores: np.ndarray, losses: np.ndarray) -> dict[str, float | None]:
    # 0.5 during training: the operating threshold is chosen once, on val, after training.
    result = metrics.binary_metrics(labels, scores, 0.5)
    return {
        "loss": float(np.mean(losses)),
        "accuracy": result.accuracy,
        "auc": result.auc,
        "sensitivity": result.sensitivity,
        "specificity": result.specificity,
    }


def _config_from_dict(settings: dict[str, Any]) -> TrainConfig:
    settings = dict(settings)
    settings["augment"] = AugmentConfig(**settings["augment"])
    return TrainConfig(**settings)


# -- the driver ---------------------------------------------------------------------------------------
def run_trainer(
    storage: Storage,
    version: str,
    config: TrainConfig,
    run_name: str,
    callbacks: list | None = None,
    max_failures: int = 2,
    crash_once: dict | None = None,
    cpus_per_worker: int | None = None,
):
    """Fit LxN with Ray Train on ``version``; returns the ``ray.train.Result``.

    Shared by ``jobs/train.py`` (through :func:`fit_run` in a watched actor) and the Tune trials (which
    pass a reporting callback). It points this process's ``RAY_ADDRESS`` at the cluster it is connected
    to (:func:`lxn_ray.resources.point_ray_train_at_this_cluster`).
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.tensorflow import TensorflowTrainer

    point_ray_train_at_this_cluster()
    images = dataset.read_split(storage, version, "train", config.task, config.sources)
    positives = int(sum(images.column("label").to_pylist()))
    negatives = images.num_rows - positives
    from lxn_ray.model import class_weights

    w_pos, w_neg = class_weights(positives, negatives)
    train = split_dataset(storage, version, "train", config)
    val = split_dataset(storage, version, "val", config)
    scaling = scaling_config(config, ray.cluster_resources(), cpus_per_worker)
    use_gpu, cpus = scaling.use_gpu, int(scaling.resources_per_worker["CPU"])
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": dataclasses.asdict(config),
            "w_pos": w_pos,
            "w_neg": w_neg,
            "cpus_per_worker": cpus,
            "crash_once": crash_once and {**crash_once, "storage_uri": storage.uri, "run_name": run_name},
        },
        scaling_config=scaling,
        datasets={"train": train, "val": val},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.path(RUNS),
            storage_filesystem=storage.filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=OBJECTIVE, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks or None,
        ),
    )
    log(
        f"training {config.workers} worker(s){' on GPU' if use_gpu else ''}: {train.count()} train / "
        f"{val.count()} val images, class weights w+={w_pos:.3f} w-={w_neg:.3f}"
    )
    return trainer.fit()


def scaling_config(config: TrainConfig, available: dict[str, float], cpus_per_worker: int | None = None):
    """What each Ray Train worker asks for: one GPU (and a CPU to feed it) when the cluster has GPUs or
    ``use_gpu`` is set; otherwise ``cpus_per_worker`` CPUs (Tune's sizing) or an even share of the CPUs."""
    from ray.train import ScalingConfig

    workers = max(config.workers, 1)
    if config.use_gpu or available.get("GPU", 0) > 0:
        return ScalingConfig(num_workers=workers, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1})
    cpus = cpus_per_worker or max(1, int(available.get("CPU", 1) // workers))
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus})


def fit_run(storage_uri: str, version: str, config: TrainConfig, run_name: str, **trainer_options):
    """:func:`run_trainer` by storage URI: the step :func:`train` runs in a watched actor."""
    return run_trainer(Storage.open(storage_uri), version, config, run_name, **trainer_options)


def train(
    storage: Storage,
    dataset_version: str | None,
    config: TrainConfig,
    fresh: bool = False,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    **trainer_options,
) -> dict[str, Any]:
    """The training job: fit, pick the best epoch, choose the threshold on val, score test, publish.

    The run is named after the dataset version and config, so rerunning an interrupted job resumes it
    (and rerunning a finished one re-publishes its result); ``fresh`` starts a new run instead.
    The run is watched (:func:`lxn_ray.resources.run_watched`): when no epoch is registered for
    ``stall_timeout_s`` seconds while the cluster can take on no new work, it is ended, its resources
    are given back, and :class:`lxn_ray.resources.StalledError` says who holds them.
    """
    cluster.connect()
    started = time.monotonic()
    version = dataset.resolve_version(storage, dataset_version)
    run_name = f"train-{version}-{config.digest()}"
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
    return publish_model_version(storage, version, config, best, latest, seconds, run_name)


def read_checkpoint_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "state.json").read_text())


def publish_model_version(
    storage: Storage,
    version: str,
    config: TrainConfig,
    checkpoint,
    latest: dict[str, Any],
    seconds: float,
    run_name: str,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (threshold on val, metrics on test) and write a model version.

    ``latest`` is the run's last saved state: the full history, which the best checkpoint may predate.
    """
    history = latest["history"]
    from lxn_ray.model import build_lxn, save_model

    model = build_lxn(config.model)
    with checkpoint.as_directory() as folder:
        model.load_weights(Path(folder) / "model.weights.h5")
        state = json.loads((Path(folder) / "state.json").read_text())
    task = resolve_task(config.task)
    val_labels, val_scores, val_sources = score_split(
        model, storage, version, "val", config.image_size, config.task, config.sources
    )
    test_labels, test_scores, test_sources = score_split(
        model, storage, version, "test", config.image_size, config.task, config.sources
    )
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

    model_version = f"lxn-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{config.digest()[:6]}"
    prefix = registry.model_key(model_version, "").rstrip("/")
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(model, Path(folder) / "model.keras")
        storage.write_bytes(f"{prefix}/model.keras", path.read_bytes())
    storage.write_bytes(f"{prefix}/plots/training_curves.png", plots.training_curves(history))
    storage.write_bytes(
        f"{prefix}/plots/roc.png",
        plots.roc(
            {
                "val": (val_labels, val_scores),
                "test": (test_labels, test_scores),
                **plots.within_source_curves(test_labels, test_scores, test_sources, prefix="test, "),
            },
            threshold,
        ),
    )
    storage.write_bytes(f"{prefix}/plots/confusion_test.png", plots.confusion_matrix(test.confusion))
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
        task=task.as_dict(),
        label_names={"1": task.positive_name, "0": task.negative_name},
        sources=evaluation,
        split_counts=counts,
        warnings=warnings + evaluation["warnings"],
    )
    storage.write_json(f"{prefix}/card.json", card)  # written last: the version's commit marker
    log(
        f"published model {model_version}: val AUC {metrics.fmt(val.auc)}, test AUC {metrics.fmt(test.auc)} "
        f"95% CI {auc_ci}, threshold {threshold:.3f}"
    )
    return {
        "model_version": model_version,
        "dataset_version": version,
        "checkpoint": storage.uri_of(f"{prefix}/model.keras"),
        "threshold": threshold,
        "best_epoch": state["epoch"],
        "val": val_summary,
        "test": test_summary,
        "plots": [
            storage.uri_of(f"{prefix}/plots/{name}")
            for name in ("training_curves.png", "roc.png", "confusion_test.png")
        ],
        "card": storage.uri_of(f"{prefix}/card.json"),
        "task": task.name,
        "sources": evaluation,
        "split_counts": counts,
        "warnings": card["warnings"],
        "seconds": round(seconds, 1),
    }


MIN_IMAGES_PER_CLASS = 20  # a split with fewer images of a class gets a warning: its metrics are noise


def source_evaluation(
    scored: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], threshold: float, task, seed: int = 0
) -> dict[str, Any]:
    """Per split: metrics pooled, per source and within each source holding both classes
    (:func:`lxn_ray.metrics.group_metrics`), the source-aware objective with its basis, and the
    source-shortcut check (:func:`lxn_ray.metrics.shortcut_check`, its classes named by the task).
    ``warnings`` collects the one-line shortcut warnings of the test split for the job summary."""
    result: dict[str, Any] = {"warnings": []}
    for split, (labels, scores, sources) in scored.items():
        groups = metrics.group_metrics(labels, scores, sources, threshold, seed=seed)
        objective, basis = metrics.source_aware_objective(groups["within_source"], groups["pooled"])
        shortcut = shortcut_check_for_task(labels, scores, sources, task, seed)
        result[split] = {**groups, "objective": objective, "objective_basis": basis, "shortcut": shortcut}
        if split == "test" and shortcut.get("warning"):
            result["warnings"].append(shortcut["warning"])
    return result


def shortcut_check_for_task(labels, scores, sources: list[str], task, seed: int = 0) -> dict[str, Any]:
    """:func:`lxn_ray.metrics.shortcut_check` with its classes called by the task's label names."""
    shortcut = metrics.shortcut_check(labels, scores, sources, seed=seed)
    names = {"positive": task.positive_name, "negative": task.negative_name}

    def named(text: str) -> str:
        return text.replace("positive class", f"{names['positive']} class").replace(
            "negative class", f"{names['negative']} class"
        )

    shortcut["classes"] = {names[kind]: checks for kind, checks in shortcut["classes"].items()}
    shortcut["skipped"] = [named(reason) for reason in shortcut["skipped"]]
    if shortcut.get("warning"):
        shortcut["warning"] = named(shortcut["warning"])
    return shortcut


def split_counts(
    storage: Storage, version: str, task, sources: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[str]]:
    """Images per split, class and source for ``task``, and a warning for every split holding fewer than
    :data:`MIN_IMAGES_PER_CLASS` images of a class (model selection on it is noise)."""
    counts: dict[str, Any] = {}
    warnings = []
    table = dataset.read_split(storage, version, None, task, sources).select(["split", "label", "source"])
    every = table.to_pylist()
    for split in dataset.SPLITS:
        rows = [row for row in every if row["split"] == split]
        per_class = {task.label_name(label): sum(r["label"] == label for r in rows) for label in (1, 0)}
        by_source: dict[str, dict[str, int]] = {}
        for row in rows:
            name = task.label_name(row["label"])
            by_source.setdefault(row["source"], {task.positive_name: 0, task.negative_name: 0})[name] += 1
        counts[split] = {"images": len(rows), **per_class, "by_source": by_source}
        for name, count in per_class.items():
            if count < MIN_IMAGES_PER_CLASS:
                warnings.append(
                    f"the {split} split holds {count} {name} image(s) (< {MIN_IMAGES_PER_CLASS}): "
                    f"its metrics are noise"
                )
    return counts, warnings


def score_split(
    model,
    storage: Storage,
    version: str,
    split: str | None,
    image_size: int,
    task: str = DEFAULT_TASK,
    sources: tuple[str, ...] = (),
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels int64 (n,), probabilities float32 (n,), source names (n,)) of ``model`` on the rows of one
    split (None: all splits) that ``task`` uses, from ``sources`` (empty: all)."""
    from lxn_ray.model import predict_probabilities
    from lxn_ray.preprocess import preprocess_bytes

    table = dataset.read_split(storage, version, split, task, sources)
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    images = [
        preprocess_bytes(storage.read_bytes(key), image_size) for key in table.column("image_key").to_pylist()
    ]
    return labels, predict_probabilities(model, images), table.column("source").to_pylist()


def score_registered(storage: Storage, model_version: str, version: str, split: str, task: str | None = None):
    """(labels, scores, sources, ModelRef) of a registered model on one split of ``version`` for ``task``
    (default: the model's own), at the model's own input size - how promotion rules compare two models on
    the same images."""
    reference = registry.resolve(storage, model_version)
    model = reference.load()
    task = task or reference.card.get("config", {}).get("task") or DEFAULT_TASK
    labels, scores, sources = score_split(model, storage, version, split, int(model.input_shape[1]), task)
    return labels, scores, sources, reference


def _model_card(
    model_version, dataset_version, config, state, latest, threshold, val, test, seconds, run_name
):
    import keras
    import ray
    import tensorflow as tf

    from lxn_ray import __version__
    from lxn_ray.model import build_lxn

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
