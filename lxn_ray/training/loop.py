"""The Ray Train worker loop: what every worker of a data-parallel run does, epoch by epoch - draw the
epoch's plan, train on its share, score the validation split, report to Ray Train (and Tune), checkpoint.
The same :func:`train_loop_per_worker` serves ``jobs/train.py`` and every Ray Tune trial, with the recipe
of :class:`lxn_ray.training.config.TrainConfig`.

Why a custom training step: Keras 3 ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` with two
workers (keras-team/keras#20585), so each step is ``strategy.run`` over a ``GradientTape``; the loss is
the per-example weighted BCE of equation (1) (or plain BCE under balanced sampling) divided by the global
batch.

Reproducible and exactly resumable: the epoch order is drawn from ``(seed, epoch)`` (:func:`epoch_order`),
augmentation is reseeded from ``(seed, epoch, rank)`` (:func:`reseed`), initial weights come from the seed,
and each epoch's checkpoint holds the weights, the optimizer's variables and the history; a worker that
dies is replaced and the run continues from the latest checkpoint as if never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lxn_ray.evaluation import metrics
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.pixel_cache import VAL_BATCH, PixelCache, epoch_shard, iter_cache
from lxn_ray.training.runs import (
    CHECKPOINT_OPTIMIZER,
    CHECKPOINT_STATE,
    CHECKPOINT_WEIGHTS,
    OBJECTIVE,
    registered_epoch,
)

if TYPE_CHECKING:
    import tensorflow as tf

log = get_logger("train").info  # rank 0's progress lines, forwarded to the driver's stderr by Ray


def epoch_order(labels: np.ndarray, sources: np.ndarray, sampling: str, seed: int, epoch: int) -> np.ndarray:
    """Indices of the images one epoch trains on, in order: int64 ``(n,)``, a function of
    ``(seed, epoch)`` only, so a rerun and a resumed run see exactly the uninterrupted run's batches.

    ``weighted``: a permutation (every image once). ``class-balanced`` / ``source-balanced``: n draws with
    replacement, each class drawn with probability 1/2 (within a class uniformly, or each source of the
    class equally often) - the sampler of PyTorch's ``WeightedRandomSampler``, seeded.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(labels)
    if sampling == "weighted":
        return rng.permutation(n)
    cells = labels.astype(np.int64).astype(str)
    if sampling == "source-balanced":
        cells = np.char.add(np.char.add(cells, "|"), sources.astype(str))
    weights = np.zeros(n)
    for label in np.unique(labels):
        in_class = labels == label
        class_cells, counts = np.unique(cells[in_class], return_counts=True)
        for cell, count in zip(class_cells, counts, strict=True):
            weights[cells == cell] = 1.0 / (count * len(class_cells))
    weights /= weights.sum()
    return rng.choice(n, size=n, replace=True, p=weights)


def is_collapsed(scores: np.ndarray, losses: np.ndarray) -> bool:
    """A collapsed model: non-finite loss or scores, or (with more than one image) one constant output -
    typically a learning rate too high for the sigmoid to recover from saturation."""
    if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(losses))):
        return True
    return len(scores) > 1 and float(np.ptp(scores)) < COLLAPSE_RANGE


COLLAPSE_RANGE = 1e-6  # validation scores spanning less than this are one constant output


# -- the training loop (runs on every Ray Train worker) -----------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker of a data-parallel run. ``loop_config``: TrainConfig fields plus class weights.

    Every epoch's plan (:func:`epoch_order`, a function of ``(seed, epoch)``) streams through Ray Data's
    ``streaming_split`` (:func:`lxn_ray.training.pixel_cache.epoch_shard`): each rank receives
    ``n // world`` of the planned rows, in plan order and the same rows in every run, and trains on global
    batches of ``world`` x ``batch_size // world`` images, one share per rank, the loss averaged over the
    global batch - the ``DistributedSampler`` scheme: N workers take global batches as one worker would,
    each with its own augmentation draws, and lxn-bn's batch normalisation is synchronised over them. Each
    epoch's checkpoint holds the weights, the optimizer's variables and the history; shuffling and
    augmentation are reseeded from ``(seed, epoch, rank)`` at every epoch, so a resumed run continues
    exactly as the uninterrupted one (float32 on CPUs; bfloat16 to rounding; GPU kernels are not
    deterministic by default).
    """
    entered = time.time()
    strategy, on_gpu = _start_tensorflow(int(loop_config.get("cpus_per_worker", 1)))
    tensorflow_ready = time.time()
    worker = _build_worker(loop_config, strategy, on_gpu)
    history, start_epoch, resumes = _restore(worker)
    # a worker group restarted within the run (resumes > 0) has no driver timeline of its own
    timeline = loop_config.get("timeline", {}) if resumes == 0 else {}
    startup = startup_seconds(timeline, entered, tensorflow_ready, time.time())
    crash = loop_config.get("crash_once")  # fault injection for tests: {"epoch", "rank", "marker"}
    for epoch in range(start_epoch, worker.config.epochs + 1):
        if crash:
            _crash_if_due(crash, epoch, worker.rank)
        entry = _run_epoch(worker, epoch)
        history.append(entry)
        entry["stop"] = stop_reason(history, worker.config)
        _report(worker, entry, history, resumes, startup)
        if entry["stop"]:
            break


#: The phases of a run's start-up (:func:`startup_seconds`), reported with every epoch as
#: ``startup_<phase>_s`` (Tune's results and ``benchmarks/tune.py`` read them).
STARTUP_PHASES = ("data", "workers", "tensorflow", "model")


def startup_seconds(
    timeline: dict[str, float], entered: float, tensorflow_ready: float, model_ready: float
) -> dict[str, float]:
    """Where a run's seconds went before its first step (wall clock, ``time.time()`` of the driver's and
    this worker's node): ``data`` - the split's pixel caches made or found (``run_trainer``); ``workers`` -
    Ray Train's controller, the worker group's placement and processes, up to this loop; ``tensorflow`` -
    TensorFlow imported and its collective ops started; ``model`` - the model, optimizer and compiled steps
    built and a checkpoint restored. Phases the ``timeline`` (``started``, ``data``, ``fit``) lacks are
    left out (a run started by hand)."""
    phases = {"tensorflow": tensorflow_ready - entered, "model": model_ready - tensorflow_ready}
    if {"started", "data", "fit"} <= timeline.keys():
        phases = {
            "data": timeline["data"] - timeline["started"],
            "workers": entered - timeline["fit"],
            **phases,
        }
    return {f"startup_{name}_s": round(max(0.0, seconds), 3) for name, seconds in phases.items()}


@dataclass(frozen=True)
class _Worker:
    """What one worker trains with, built once by :func:`_build_worker`."""

    config: TrainConfig
    rank: int
    world: int
    precision: str  # the compute precision: float32, bfloat16 or float16
    strategy: Any  # tf.distribute.MultiWorkerMirroredStrategy
    model: Any  # keras.Model (LxN)
    optimizer: Any  # keras optimizer (wrapped in a LossScaleOptimizer under float16)
    augmenter: Any  # keras.Sequential of random layers, or None
    train_cache: PixelCache
    val_cache: PixelCache
    local_batch: int  # this rank's share of a global batch
    w_pos: float  # equation (1)'s class weights (0.5 each under balanced sampling)
    w_neg: float
    train_step: Any  # tf.function: (uint8 images, float32 labels, int global batch) -> (losses, scores)
    predict: Any  # tf.function: uint8 (m, s, s) -> float32 (m,)


def _start_tensorflow(cpus: int) -> tuple[Any, bool]:
    """Thread pools, GPU memory growth, then collective ops: all before any TF op runs in this process.
    Returns the ``MultiWorkerMirroredStrategy`` and whether this worker has a GPU."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)  # share the card; no up-front grab
    return tf.distribute.MultiWorkerMirroredStrategy(), bool(gpus)


def _build_worker(loop_config: dict[str, Any], strategy: Any, on_gpu: bool) -> _Worker:
    """The model (same initial weights on every rank, from the seed), its optimizer and augmenter, in the
    run's precision; the two caches; this rank's batch share and the loss's class weights."""
    import keras
    import ray.train

    from lxn_ray.images.preprocess import build_augmenter
    from lxn_ray.model.network import build_lxn, make_optimizer, precision_policy, resolve_precision

    config = TrainConfig.from_dict(loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    precision = resolve_precision(config.precision, on_gpu=on_gpu)
    keras.utils.set_random_seed(config.seed)  # same initial weights on every rank
    augmenter = build_augmenter(config.augment, seed=config.seed + rank)  # float32, before the policy
    keras.mixed_precision.set_global_policy(precision_policy(precision))

    import ray.data

    # Ordered blocks: the streaming split then hands rows to ranks as a function of the epoch plan alone.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    storage = Storage.open(loop_config["storage_uri"])
    train_cache = PixelCache.open(storage, loop_config["train_cache"])
    val_cache = PixelCache.open(storage, loop_config["val_cache"])
    local_batch = max(1, config.batch_size // world)  # every rank's share of a global batch
    steps_per_epoch = -(-(len(train_cache) // world) // local_batch)
    with strategy.scope():
        model = build_lxn(config.model)
        optimizer = make_optimizer(config.optimizer_config(steps_per_epoch))
        if precision == "float16":  # scales the loss so float16 gradients do not underflow
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    if config.sampling == "weighted":
        w_pos, w_neg = float(loop_config["w_pos"]), float(loop_config["w_neg"])
    else:  # the sampler balances the classes; equation (1)'s weights would balance them twice
        w_pos = w_neg = 0.5
    train_step, predict = _compile_steps(strategy, model, optimizer, augmenter, precision, w_pos, w_neg)
    return _Worker(
        config=config,
        rank=rank,
        world=world,
        precision=precision,
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        augmenter=augmenter,
        train_cache=train_cache,
        val_cache=val_cache,
        local_batch=local_batch,
        w_pos=w_pos,
        w_neg=w_neg,
        train_step=train_step,
        predict=predict,
    )


def to_model_input(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 ``(n, s, s)`` -> float32 ``(n, s, s, 3)`` in [0, 1]: preprocess_bytes's values exactly."""
    import tensorflow as tf

    images = tf.cast(pixels, tf.float32) / 255.0
    return tf.repeat(images[..., tf.newaxis], 3, axis=-1)


def _compile_steps(strategy, model, optimizer, augmenter, precision: str, w_pos: float, w_neg: float):
    """The worker's two compiled functions: ``train_step`` (one synchronous step of every replica:
    augment, forward, weighted BCE over the global batch, apply gradients; returns the per-example losses
    and probabilities) and ``predict`` (uint8 images -> float32 probabilities, inference mode)."""
    import tensorflow as tf

    from lxn_ray.model.network import weighted_bce

    def replica_step(pixels, labels, global_batch):
        images = to_model_input(pixels)
        if augmenter is not None:
            images = augmenter(images, training=True)
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example = weighted_bce(labels, probabilities, w_pos, w_neg)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if precision == "float16":
                loss = optimizer.scale_loss(loss)  # apply_gradients unscales
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return per_example, tf.reshape(probabilities, [-1])

    @tf.function(reduce_retracing=True)
    def train_step(pixels, labels, global_batch):
        return strategy.run(replica_step, args=(pixels, labels, global_batch))

    @tf.function(reduce_retracing=True)
    def predict(pixels):
        return tf.reshape(model(to_model_input(pixels), training=False), [-1])

    return train_step, predict


def _restore(worker: _Worker) -> tuple[list[dict[str, Any]], int, int]:
    """(history, first epoch to run, resumes) from the run's latest checkpoint - a replaced worker group,
    or a rerun of an interrupted job - after loading its weights and optimizer variables; ``([], 1, 0)``
    for a new run."""
    import ray.train

    from lxn_ray.model.network import restore_optimizer_state

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return [], 1, 0
    with checkpoint.as_directory() as folder:
        worker.model.load_weights(Path(folder) / CHECKPOINT_WEIGHTS)
        with (
            np.load(Path(folder) / CHECKPOINT_OPTIMIZER, allow_pickle=False) as saved,
            worker.strategy.scope(),
        ):
            restore_optimizer_state(worker.optimizer, worker.model, {key: saved[key] for key in saved.files})
        state = json.loads((Path(folder) / CHECKPOINT_STATE).read_text())
    if worker.rank == 0:
        log(f"resuming after epoch {state['epoch']}")
    return state["history"], state["epoch"] + 1, state.get("resumes", 0) + 1


def _crash_if_due(crash: dict[str, Any], epoch: int, rank: int) -> None:
    """Fault injection for tests: the first time ``(epoch, rank)`` is ``crash``'s, once the previous
    epoch's checkpoint is registered, the process dies as a lost node would: no exception, no cleanup."""
    if (epoch, rank) == (crash["epoch"], crash["rank"]) and not Path(crash["marker"]).exists():
        _wait_until_registered(crash["storage_uri"], crash["run_name"], epoch - 1)
        Path(crash["marker"]).touch()
        os._exit(1)


def _run_epoch(worker: _Worker, epoch: int) -> dict[str, Any]:
    """Train one epoch (:func:`_train_epoch`), then score the whole validation split: the epoch's history
    entry (train and val metrics, the validation objective, whether the model collapsed, which images in
    which order, precision, learning rate, seconds)."""
    import keras

    from lxn_ray.model.network import weighted_bce

    started = time.monotonic()
    order, labels, scores, train_losses = _train_epoch(worker, epoch)
    train_seconds = time.monotonic() - started
    train = _epoch_metrics(labels, scores, train_losses)
    y, p, val_sources = validate(worker.predict, worker.val_cache)
    val_losses = weighted_bce(y, p, worker.w_pos, worker.w_neg).numpy()
    val = _epoch_metrics(y, p, val_losses)
    collapsed = is_collapsed(p, np.concatenate([train_losses, val_losses]))
    objective = None
    if not collapsed:
        objective, _ = metrics.selection_objective(y.astype(np.int64), p, val_sources.tolist())
    return {
        "epoch": epoch,
        **{f"train_{k}": v for k, v in train.items()},
        **{f"val_{k}": v for k, v in val.items()},
        "val_objective": objective,
        "collapsed": collapsed,
        "batch_order": hashlib.sha256(order.tobytes()).hexdigest()[:12],  # which images, in which order
        "precision": worker.precision,
        "learning_rate": float(keras.ops.convert_to_numpy(worker.optimizer.learning_rate)),
        "train_seconds": train_seconds,
        "epoch_seconds": time.monotonic() - started,
    }


def _train_epoch(worker: _Worker, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reseed the augmentation, draw the epoch's plan and train on this rank's share of it, batch by
    batch: (the plan int64 ``(n,)``, and for the rows this rank trained on, in order: labels float32,
    probabilities float32 and per-example losses float32, each ``(n // world,)``)."""
    import tensorflow as tf

    config, rank, world = worker.config, worker.rank, worker.world
    reseed(worker.augmenter, config.seed, epoch, rank)
    order = epoch_order(
        worker.train_cache.labels, worker.train_cache.sources, config.sampling, config.seed, epoch
    )
    losses, scores, labels = [], [], []
    shard = epoch_shard(worker.train_cache, order, rank, world)
    for batch in shard.iter_batches(batch_size=worker.local_batch, batch_format="numpy"):
        # Every rank holds len(order) // world rows cut into the same batch sizes: the global batch of
        # this step is world times this rank's.
        per_example, probabilities = worker.train_step(
            tf.constant(batch["image"]),
            tf.constant(batch["label"]),
            tf.constant(world * len(batch["label"])),
        )
        losses.append(per_example.numpy())
        scores.append(probabilities.numpy())
        labels.append(batch["label"])
    return order, np.concatenate(labels), np.concatenate(scores), np.concatenate(losses)


def _report(
    worker: _Worker,
    entry: dict[str, Any],
    history: list[dict[str, Any]],
    resumes: int,
    startup: dict[str, float] | None = None,
) -> None:
    """Print the epoch's line (rank 0), report its metrics and this worker's ``startup`` seconds
    (:func:`startup_seconds`) to Ray Train (every rank; Tune reads rank 0's) and attach rank 0's
    checkpoint: the weights, the optimizer's variables and ``{epoch, history, resumes}``."""
    import ray.train

    epoch, stop = entry["epoch"], entry["stop"]
    if worker.rank == 0:
        log(
            f"epoch {epoch}/{worker.config.epochs}: loss {metrics.fmt(entry['train_loss'], 4)} "
            f"val_loss {metrics.fmt(entry['val_loss'], 4)} val_auc {metrics.fmt(entry['val_auc'])} "
            f"val_acc {metrics.fmt(entry['val_accuracy'])} "
            f"({entry['epoch_seconds']:.1f} s, {worker.precision}){f'; stopping: {stop}' if stop else ''}"
        )
    report = {
        **entry,
        **(startup or {}),
        "val_auc": 0.5 if entry["val_auc"] is None else entry["val_auc"],
        "stop": stop or "",
    }
    # What ranks epochs, checkpoints and trials: a collapsed epoch gets 0 so nothing prefers it over a
    # model that learned something (its val AUC reads exactly 0.5, often above weak real ones).
    objective = entry["val_objective"]
    report[OBJECTIVE] = 0.0 if entry["collapsed"] else (0.5 if objective is None else objective)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if worker.rank == 0:
            from lxn_ray.model.network import optimizer_state

            worker.model.save_weights(Path(folder) / CHECKPOINT_WEIGHTS)
            np.savez(Path(folder) / CHECKPOINT_OPTIMIZER, **optimizer_state(worker.optimizer))
            (Path(folder) / CHECKPOINT_STATE).write_text(
                json.dumps({"epoch": epoch, "history": history, "resumes": resumes})
            )
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(report, checkpoint=checkpoint)


def validate(predict, cache: PixelCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels float32 ``(n,)``, probabilities float32 ``(n,)``, sources str ``(n,)``) of the whole validation
    split, streamed from its cache :data:`VAL_BATCH` images at a time through ``predict`` (uint8
    ``(m, s, s)`` -> float32 ``(m,)``); every rank scores every image, so all ranks agree on the metrics."""
    import tensorflow as tf

    labels, scores, sources = [], [], []
    for images, batch_labels, batch_sources in iter_cache(cache, VAL_BATCH):
        scores.append(predict(tf.constant(images)).numpy())
        labels.append(batch_labels)
        sources.append(batch_sources)
    return np.concatenate(labels), np.concatenate(scores), np.concatenate(sources)


def reseed(augmenter, seed: int, epoch: int, rank: int) -> None:
    """Put every random layer of ``augmenter`` at a state that depends on ``(seed, epoch, rank)`` only, so
    an epoch's augmentation is the same in a run that resumed before it as in one that never stopped."""
    if augmenter is None:
        return
    base = int(np.random.default_rng([seed, epoch, rank, 1]).integers(0, 2**31 - 1))
    generators = [g for layer in augmenter.layers for g in getattr(layer, "_seed_generators", [])]
    for index, generator in enumerate(generators):
        generator.state.assign(np.array([base + index, 0], dtype=generator.state.dtype))


def stop_reason(history: list[dict[str, Any]], config: TrainConfig) -> str | None:
    """Why a run ends before ``config.epochs``: ``collapsed`` (see :func:`is_collapsed`), or ``early
    stopping`` when ``patience`` epochs passed without a better validation objective; None to go on."""
    latest = history[-1]
    if latest["collapsed"]:
        return "collapsed"
    if config.patience and latest["epoch"] < config.epochs:
        scored = [
            (e["val_objective"] if e["val_objective"] is not None else 0.5, -e["epoch"]) for e in history
        ]
        best_epoch = -max(scored)[1]
        if latest["epoch"] - best_epoch >= config.patience:
            return "early stopping"
    return None


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
    """Loss, accuracy, AUC, sensitivity, specificity at 0.5 (the operating threshold is chosen once, on
    val, after training); all None when the scores or losses are not finite (a collapsed epoch)."""
    if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(losses))):
        return dict.fromkeys(("loss", "accuracy", "auc", "sensitivity", "specificity"))
    result = metrics.binary_metrics(labels, scores, 0.5)
    return {
        "loss": float(np.mean(losses)),
        "accuracy": result.accuracy,
        "auc": result.auc,
        "sensitivity": result.sensitivity,
        "specificity": result.specificity,
    }
