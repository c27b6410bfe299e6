"""Data-parallel LxN training with Ray Train, and the honest evaluation that turns it into a model version.

Why a custom training step: Keras 3 ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` with two
workers (keras-team/keras#20585), so each step is ``strategy.run`` over a ``GradientTape``; the loss is
the per-example weighted BCE of equation (1) (or plain BCE under balanced sampling) divided by the global
batch. The same :func:`train_loop_per_worker` serves ``jobs/train.py`` and every Ray Tune trial, with the
recipe of :class:`TrainConfig` (optimizer, schedule, early stopping, sampling, architecture,
preprocessing, precision).

Data streams (:class:`PixelCache`): each split a run uses is preprocessed once, by Ray Data tasks, with the
one :func:`lxn_ray.images.preprocess.preprocess_pixels` into one uint8 channel per image at the model's size
(a
twelfth of float32 RGB) and stored under ``cache/pixels/`` in storage, where later runs and Tune trials
with the same task, sources, size and preprocessing find it. Every epoch, rank 0 draws the epoch's plan
(:func:`epoch_order`: row indices from the small label/source arrays), makes it a Ray Dataset whose tasks
read the planned rows from the cache (:func:`stream_rows`), and hands it to the workers through Ray Data's
``streaming_split`` (:func:`epoch_shard`); each worker pulls batches as it trains and expands them to float32
RGB on its device. No split is ever held whole (as pixels, let alone float32) by a worker, the driver or
the object store, so a training set larger than memory trains. Every worker streams the full
validation split from its cache so all ranks agree on the metrics.

Reproducible and exactly resumable: the epoch order is drawn from ``(seed, epoch)``, augmentation is
reseeded from ``(seed, epoch, rank)``, initial weights come from the seed, and each epoch's checkpoint
holds the weights, the optimizer's variables and the history; a worker that dies is replaced and the
run continues from the latest checkpoint as if never stopped, and a rerun of the same job (same dataset
version and config) resumes its run. Afterwards the best checkpoint by the validation objective picks
its threshold on val (Youden's J) and is scored once on test, in its inference precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lxn_ray import registry
from lxn_ray.data import dataset
from lxn_ray.evaluation import metrics, plots
from lxn_ray.evaluation.predict import score_split
from lxn_ray.evaluation.splits import source_evaluation, split_counts
from lxn_ray.images.preprocess import PreprocessConfig
from lxn_ray.infra import cluster
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.resources import (
    DEFAULT_STALL_TIMEOUT_S,
    Watchdog,
    point_ray_train_at_this_cluster,
    run_watched,
)
from lxn_ray.infra.storage import Storage
from lxn_ray.model.network import ModelConfig
from lxn_ray.sources.tasks import resolve_task
from lxn_ray.training.config import TrainConfig

RUNS = "runs"
# What picks the best epoch, the best trial and the champion: the source-aware validation metric
# (lxn_ray.evaluation.metrics.source_aware_objective - mean within-source AUC where sources hold both
# classes).
OBJECTIVE = "val_objective"


log = get_logger("train").info  # progress for the person watching; stdout keeps the summary


# -- data -------------------------------------------------------------------------------------------
PIXEL_CACHE = (
    "cache/pixels"  # under storage: <version>/<digest>/<split>/{chunk-NNNNNN.u8, index.parquet, cache.json}
)
CACHE_FORMAT = 1  # bump when the stored layout changes: older caches are then ignored, not misread
CACHE_CHUNK_ROWS = 64  # images per cache file: one Ray Data task preprocesses and writes one file
STREAM_BLOCK_ROWS = 64  # rows per block of an epoch's stream (what the streaming split hands out)
VAL_BATCH = 64


@dataclass(frozen=True)
class PixelCache:
    """One split of a dataset version for one run's task, sources, image size and preprocessing, stored once
    as uint8, one channel per image, at the model's size: row ``i`` (rows sorted by ``image_key``) is the
    ``s * s`` bytes at offset ``(i % chunk_rows) * s * s`` of file ``chunk-{i // chunk_rows:06d}.u8``.

    The worker expands a batch to the model's float32 three channels on the device (``to_model_input``),
    so nothing holds a split as float32 - a twelfth of the memory and I/O - and reading a row is one
    ranged read (local file or S3 object), so a split larger than memory streams. ``labels`` (float32
    ``(n,)``, the task's), ``sources`` (str ``(n,)``) and ``image_keys`` (str ``(n,)``) are the small arrays
    the epoch order is drawn from.
    """

    storage_uri: str
    key: str  # the cache's folder in storage
    image_size: int
    chunk_rows: int
    image_keys: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def without_index(self) -> PixelCache:
        """This cache's location alone (empty arrays): what a reading task needs, whatever the split size."""
        empty = np.empty(0, dtype=str)
        return dataclasses.replace(self, image_keys=empty, labels=np.empty(0, np.float32), sources=empty)

    @classmethod
    def open(cls, storage: Storage, key: str) -> PixelCache:
        """The cache at ``key`` (its ``cache.json`` is the commit marker: written after every other file)."""
        meta = storage.read_json(f"{key}/cache.json")
        index = storage.read_table(f"{key}/index.parquet")
        return cls(
            storage_uri=storage.uri,
            key=key,
            image_size=int(meta["image_size"]),
            chunk_rows=int(meta["chunk_rows"]),
            image_keys=np.asarray(index.column("image_key").to_pylist(), dtype=str),
            labels=np.asarray(index.column("label").to_pylist(), dtype=np.float32),
            sources=np.asarray(index.column("source").to_pylist(), dtype=str),
        )


def cache_key(version: str, split: str, config: TrainConfig) -> str:
    """Where the pixel cache of ``split`` lives for ``config``: runs (and Tune trials) that differ only in
    their recipe share it; a task, source selection, image size or preprocessing of their own gets its own,
    and so does a change to the preprocessing code (the source of the modules that make the pixels)."""
    import inspect

    from lxn_ray.images import decode, preprocess

    code = inspect.getsource(preprocess) + inspect.getsource(decode)  # a change to the pixels: a new cache
    what = {
        "format": CACHE_FORMAT,
        "code": hashlib.sha256(code.encode()).hexdigest(),
        "task": config.task,
        "sources": sorted(config.sources),
        "image_size": config.image_size,
        "preprocessing": dataclasses.asdict(config.preprocessing),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{PIXEL_CACHE}/{version}/{digest}/{split}"


def _write_cache_chunks(
    batch: dict[str, np.ndarray], storage_uri: str, key: str, image_size: int, preprocessing: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Ray Data task: for each chunk (``chunk`` int64, ``image_keys`` a list of str), image bytes from
    storage -> the shared :func:`lxn_ray.images.preprocess.preprocess_pixels` -> uint8 ``(rows, s, s)``
    written
    as one cache file. Returns the chunks' row counts; no pixel passes through the object store."""
    from lxn_ray.images.preprocess import preprocess_pixels

    storage = Storage.open(storage_uri)
    config = PreprocessConfig.from_mapping(preprocessing)
    rows = []
    for chunk, keys in zip(batch["chunk"], batch["image_keys"], strict=True):
        pixels = np.stack(
            [preprocess_pixels(storage.read_bytes(str(k)), image_size, preprocessing=config) for k in keys]
        ).astype(np.uint8)
        storage.write_bytes(f"{key}/chunk-{int(chunk):06d}.u8", np.ascontiguousarray(pixels).tobytes())
        rows.append(len(pixels))
    return {"chunk": batch["chunk"], "rows": np.asarray(rows, dtype=np.int64)}


@contextlib.contextmanager
def _no_progress_bars():
    """Ray Data datasets created inside draw no progress bars (their cursor-moving redraws, forwarded from
    a worker, land in the middle of the job's own lines)."""
    import ray

    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = before


def pixel_cache(storage: Storage, version: str, split: str, config: TrainConfig) -> PixelCache:
    """The uint8 pixel cache of one split (:class:`PixelCache`), built on first use by Ray Data tasks that
    each decode, preprocess and write one chunk of images, in parallel over the cluster; later runs and
    Tune trials with the same task, sources, size and preprocessing read it as it is. Two runs building
    the same cache at once write identical files (each write is atomic)."""
    import ray

    key = cache_key(version, split, config)
    if storage.exists(f"{key}/cache.json"):
        return PixelCache.open(storage, key)
    table = dataset.read_split(storage, version, split, config.task, config.sources)
    if table.num_rows == 0:
        raise ValueError(f"split {split!r} of dataset {version} holds no image of task {config.task}")
    table = table.select(["image_key", "label", "source"]).sort_by("image_key")
    keys = table.column("image_key").to_pylist()
    chunks = [
        {"chunk": c, "image_keys": keys[start : start + CACHE_CHUNK_ROWS]}
        for c, start in enumerate(range(0, len(keys), CACHE_CHUNK_ROWS))
    ]
    options = {
        "storage_uri": storage.uri,
        "key": key,
        "image_size": config.image_size,
        "preprocessing": dataclasses.asdict(config.preprocessing),
    }
    with _no_progress_bars():  # drawn in a watched actor, they only garble the job's own output
        written = (
            ray.data.from_items(chunks, override_num_blocks=len(chunks))
            .map_batches(_write_cache_chunks, fn_kwargs=options, batch_size=1)
            .take_all()
        )
    if sum(int(row["rows"]) for row in written) != table.num_rows:
        raise RuntimeError(f"pixel cache {key}: {len(written)} chunk(s) do not hold {table.num_rows} images")
    storage.write_table(f"{key}/index.parquet", table)
    meta = {"format": CACHE_FORMAT, "rows": table.num_rows, "image_size": config.image_size}
    storage.write_json(f"{key}/cache.json", {**meta, "chunk_rows": CACHE_CHUNK_ROWS})
    return PixelCache.open(storage, key)


def read_cached_rows(cache: PixelCache, rows: np.ndarray) -> np.ndarray:
    """uint8 ``(len(rows), s, s)``: the cached images of ``rows`` (int64 ``(m,)``, any order, repeats
    allowed), each one ranged read of ``s * s`` bytes; every chunk file is opened once per call."""
    storage = Storage.open(cache.storage_uri)
    size = cache.image_size * cache.image_size
    images = np.empty((len(rows), cache.image_size, cache.image_size), dtype=np.uint8)
    rows = np.asarray(rows, dtype=np.int64)
    for chunk in np.unique(rows // cache.chunk_rows):
        where = np.flatnonzero(rows // cache.chunk_rows == chunk)
        with storage.filesystem.open_input_file(storage.path(f"{cache.key}/chunk-{chunk:06d}.u8")) as file:
            for i in where:
                data = file.read_at(size, int(rows[i] % cache.chunk_rows) * size)
                images[i] = np.frombuffer(data, dtype=np.uint8).reshape(cache.image_size, cache.image_size)
    return images


def _fetch_pixels(batch: dict[str, np.ndarray], cache: PixelCache) -> dict[str, np.ndarray]:
    """Ray Data task: blocks of an epoch's plan (per block ``row`` int64, ``label`` float32 and ``source``
    str lists) -> one row per image: ``row``, ``label``, ``source`` and its cached ``image`` (uint8
    ``(m, s, s)``), in plan order."""
    rows = np.concatenate([np.asarray(part, dtype=np.int64) for part in batch["row"]])
    return {
        "row": rows,
        "label": np.concatenate([np.asarray(part, dtype=np.float32) for part in batch["label"]]),
        "source": np.concatenate([np.asarray(part, dtype=str) for part in batch["source"]]),
        "image": read_cached_rows(cache, rows),
    }


def stream_rows(cache: PixelCache, rows: np.ndarray):
    """A streaming Ray Dataset of ``rows`` of ``cache`` in that order (int64 ``(n,)``; an epoch's plan from
    :func:`epoch_order`): an index dataset built from the small label/source arrays (one item per
    :data:`STREAM_BLOCK_ROWS` rows, put in the object store by this process: no task, so no CPU is
    needed while training workers hold every CPU), mapped to the cached uint8 images by tasks that run
    as the consumers pull. Never materialised; the reads are I/O and reserve no CPU either."""
    import ray

    rows = np.asarray(rows, dtype=np.int64)
    items = [
        {
            "row": part.tolist(),
            "label": cache.labels[part].tolist(),
            "source": cache.sources[part].tolist(),
        }
        for part in (
            rows[start : start + STREAM_BLOCK_ROWS] for start in range(0, len(rows), STREAM_BLOCK_ROWS)
        )
    ]
    with _no_progress_bars():  # a dataset keeps the context it was made in
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _fetch_pixels, fn_kwargs={"cache": cache.without_index()}, batch_size=1, num_cpus=0
        )


def iter_cache(cache: PixelCache, batch_rows: int = VAL_BATCH):
    """Every row of ``cache`` in order, ``batch_rows`` at a time, read in this process: (uint8 ``(m, s, s)``,
    float32 labels ``(m,)``, str sources ``(m,)``) - how every worker streams the validation split."""
    for start in range(0, len(cache), batch_rows):
        rows = np.arange(start, min(start + batch_rows, len(cache)))
        yield read_cached_rows(cache, rows), cache.labels[rows], cache.sources[rows]


def epoch_shard(cache: PixelCache, plan: np.ndarray, rank: int, world: int):
    """This worker's share of one epoch: rank 0 builds the epoch's stream (:func:`stream_rows` of ``plan``)
    and splits it with Ray Data's ``streaming_split(world, equal=True)``; every rank gets its iterator.
    Each rank receives ``len(plan) // world`` rows (the remainder waits for the next epoch's draw), in plan
    order. With ``preserve_order`` (set in the worker) the split hands the ordered blocks to the
    consumer with the fewest rows so far, so which rank trains on which rows is a function of the plan
    alone - a resumed run sees exactly the uninterrupted run's batches."""
    import logging

    import ray.train.collective

    splits = None
    if rank == 0:
        splits = stream_rows(cache, plan).streaming_split(world, equal=True)
    # The iterators (a handle on the split's coordinator actor each) pickle to a few kB, over the 1 kB the
    # broadcast warns about at every call; they travel through the object store, so the size is harmless.
    broadcast_log = logging.getLogger("ray.train.v2._internal.execution.collective_impl")
    level = broadcast_log.level
    broadcast_log.setLevel(logging.ERROR)
    try:
        return ray.train.collective.broadcast_from_rank_zero(splits)[rank]
    finally:
        broadcast_log.setLevel(level)


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
    ``streaming_split`` (:func:`epoch_shard`): each rank receives ``n // world`` of the planned rows, in
    plan order and the same rows in every run, and trains on global batches of ``world`` x
    ``batch_size // world`` images, one share per rank, the loss averaged over the global batch - the
    ``DistributedSampler`` scheme: N workers take global batches as one worker would, each with its own
    augmentation draws, and lxn-bn's batch normalisation is synchronised over them. Each epoch's
    checkpoint holds the weights, the optimizer's variables and the history; shuffling and augmentation
    are reseeded from ``(seed, epoch, rank)`` at every epoch, so a resumed run continues exactly as the
    uninterrupted one (float32 on CPUs; bfloat16 to rounding; GPU kernels are not deterministic by default).
    """
    import tensorflow as tf

    # Thread pools, GPU memory growth, then collective ops: all before any TF op runs in this process.
    cpus = int(loop_config.get("cpus_per_worker", 1))
    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)  # share the card; no up-front grab
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import ray.train

    from lxn_ray.images.preprocess import build_augmenter
    from lxn_ray.model.network import (
        build_lxn,
        make_optimizer,
        optimizer_state,
        precision_policy,
        resolve_precision,
        restore_optimizer_state,
        weighted_bce,
    )

    config = TrainConfig.from_dict(loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    precision = resolve_precision(config.precision, on_gpu=bool(gpus))
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

    history: list[dict[str, Any]] = []
    start_epoch, resumes = 1, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a replaced worker group, or a rerun of an interrupted job
        with checkpoint.as_directory() as folder:
            model.load_weights(Path(folder) / "model.weights.h5")
            with np.load(Path(folder) / "optimizer.npz", allow_pickle=False) as saved, strategy.scope():
                restore_optimizer_state(optimizer, model, {key: saved[key] for key in saved.files})
            state = json.loads((Path(folder) / "state.json").read_text())
        history, start_epoch, resumes = state["history"], state["epoch"] + 1, state.get("resumes", 0) + 1
        if rank == 0:
            print(f"[train] resuming after epoch {state['epoch']}", flush=True)
    crash = loop_config.get("crash_once")  # fault injection for tests: {"epoch", "rank", "marker"}

    def to_model_input(pixels):
        """uint8 ``(n, s, s)`` -> float32 ``(n, s, s, 3)`` in [0, 1]: preprocess_bytes's values exactly."""
        images = tf.cast(pixels, tf.float32) / 255.0
        return tf.repeat(images[..., tf.newaxis], 3, axis=-1)

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

    for epoch in range(start_epoch, config.epochs + 1):
        if crash and (epoch, rank) == (crash["epoch"], crash["rank"]) and not Path(crash["marker"]).exists():
            _wait_until_registered(crash["storage_uri"], crash["run_name"], epoch - 1)
            Path(crash["marker"]).touch()
            os._exit(1)  # the process dies as a lost node would: no exception, no cleanup
        started = time.monotonic()
        reseed(augmenter, config.seed, epoch, rank)
        order = epoch_order(train_cache.labels, train_cache.sources, config.sampling, config.seed, epoch)
        losses, scores, labels = [], [], []
        shard = epoch_shard(train_cache, order, rank, world)
        for batch in shard.iter_batches(batch_size=local_batch, batch_format="numpy"):
            # Every rank holds len(order) // world rows cut into the same batch sizes: the global batch of
            # this step is world times this rank's.
            per_example, probabilities = train_step(
                tf.constant(batch["image"]),
                tf.constant(batch["label"]),
                tf.constant(world * len(batch["label"])),
            )
            losses.append(per_example.numpy())
            scores.append(probabilities.numpy())
            labels.append(batch["label"])
        train_seconds = time.monotonic() - started
        train_losses = np.concatenate(losses)
        train = _epoch_metrics(np.concatenate(labels), np.concatenate(scores), train_losses)
        y, p, val_sources = validate(predict, val_cache)
        val_losses = weighted_bce(y, p, w_pos, w_neg).numpy()
        val = _epoch_metrics(y, p, val_losses)
        collapsed = is_collapsed(p, np.concatenate([train_losses, val_losses]))
        objective = None
        if not collapsed:
            objective, _ = metrics.selection_objective(y.astype(np.int64), p, val_sources.tolist())
        entry = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()},
            "val_objective": objective,
            "collapsed": collapsed,
            "batch_order": hashlib.sha256(order.tobytes()).hexdigest()[:12],  # which images, in which order
            "precision": precision,
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            "train_seconds": train_seconds,
            "epoch_seconds": time.monotonic() - started,
        }
        history.append(entry)
        stop = stop_reason(history, config)
        entry["stop"] = stop
        if rank == 0:
            print(
                f"[train] epoch {epoch}/{config.epochs}: loss {metrics.fmt(train['loss'], 4)} "
                f"val_loss {metrics.fmt(val['loss'], 4)} val_auc {metrics.fmt(val['auc'])} "
                f"val_acc {metrics.fmt(val['accuracy'])} "
                f"({entry['epoch_seconds']:.1f} s, {precision}){f'; stopping: {stop}' if stop else ''}",
                flush=True,
            )
        report = {**entry, "val_auc": 0.5 if val["auc"] is None else val["auc"], "stop": stop or ""}
        # What ranks epochs, checkpoints and trials: a collapsed epoch gets 0 so nothing prefers it over a
        # model that learned something (its val AUC reads exactly 0.5, often above weak real ones).
        report[OBJECTIVE] = 0.0 if collapsed else (0.5 if objective is None else objective)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                model.save_weights(Path(folder) / "model.weights.h5")
                np.savez(Path(folder) / "optimizer.npz", **optimizer_state(optimizer))
                (Path(folder) / "state.json").write_text(
                    json.dumps({"epoch": epoch, "history": history, "resumes": resumes})
                )
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(report, checkpoint=checkpoint)
        if stop:
            break


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
    to (:func:`lxn_ray.infra.resources.point_ray_train_at_this_cluster`).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.tensorflow import TensorflowTrainer

    from lxn_ray.infra import quiet

    point_ray_train_at_this_cluster()
    images = dataset.read_split(storage, version, "train", config.task, config.sources)
    positives = int(sum(images.column("label").to_pylist()))
    negatives = images.num_rows - positives
    from lxn_ray.model.network import class_weights

    w_pos, w_neg = class_weights(positives, negatives)
    train = pixel_cache(storage, version, "train", config)
    val = pixel_cache(storage, version, "val", config)
    scaling = scaling_config(config, ray.cluster_resources(), cpus_per_worker)
    use_gpu, cpus = scaling.use_gpu, int(scaling.resources_per_worker["CPU"])
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": dataclasses.asdict(config),
            "w_pos": w_pos,
            "w_neg": w_neg,
            "cpus_per_worker": cpus,
            "storage_uri": storage.uri,
            "train_cache": train.key,
            "val_cache": val.key,
            "crash_once": crash_once and {**crash_once, "storage_uri": storage.uri, "run_name": run_name},
        },
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.path(RUNS),
            storage_filesystem=storage.filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=OBJECTIVE, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks or None,
            logging_config=LoggingConfig(log_level=quiet.train_log_level()),
        ),
    )
    log(
        f"training {config.workers} worker(s){' on GPU' if use_gpu else ''}: {len(train)} train / "
        f"{len(val)} val images streamed from the uint8 cache {storage.uri_of(train.key.rsplit('/', 1)[0])}"
        f", class weights w+={w_pos:.3f} w-={w_neg:.3f}"
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
    The run is watched (:func:`lxn_ray.infra.resources.run_watched`): when no epoch is registered for
    ``stall_timeout_s`` seconds while the cluster can take on no new work, it is ended, its resources
    are given back, and :class:`lxn_ray.infra.resources.StalledError` says who holds them.
    """
    cluster.connect()
    started = time.monotonic()
    version = dataset.resolve_version(storage, dataset_version)
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
    return publish_model_version(storage, version, config, best, latest, seconds, run_name)


def run_name_of(version: str, config: TrainConfig) -> str:
    """The training run of ``config`` on dataset ``version`` (without ``fresh``): rerunning the same job
    resumes it, and a model card's ``train_run`` names it."""
    return f"train-{version}-{config.digest()}"


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
    The model is evaluated, and saved, in its inference precision (:func:`inference_precision`): the
    saved file carries the dtype policy, so evaluation jobs, promotion and the endpoint compute exactly
    as the threshold and test metrics were validated.
    """
    history = latest["history"]
    from lxn_ray.model.network import save_model

    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / "state.json").read_text())
        best_entry = next((e for e in history if e["epoch"] == state["epoch"]), {})
        trained_in = best_entry.get("precision", "float32")
        model = build_in_precision(config.model, inference_precision(trained_in))
        model.load_weights(Path(folder) / "model.weights.h5")
    task = resolve_task(config.task)
    val_labels, val_scores, val_sources = score_split(
        model, storage, version, "val", config.image_size, config.task, config.sources, config.preprocessing
    )
    test_labels, test_scores, test_sources = score_split(
        model, storage, version, "test", config.image_size, config.task, config.sources, config.preprocessing
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
    about = f"model {model_version}, dataset {version}, {task.name}"
    prevalence = float(np.mean(val_labels)) if len(val_labels) else None
    storage.write_bytes(
        f"{prefix}/plots/training_curves.png", plots.training_curves(history, about, prevalence)
    )
    storage.write_bytes(
        f"{prefix}/plots/roc.png",
        plots.roc(
            {
                "val": (val_labels, val_scores),
                "test": (test_labels, test_scores),
                **plots.within_source_curves(test_labels, test_scores, test_sources, prefix="test, "),
            },
            threshold,
            about,
        ),
    )
    names = (task.negative_name, task.positive_name)
    storage.write_bytes(
        f"{prefix}/plots/confusion_test.png", plots.confusion_matrix(test.confusion, "test", names, about)
    )
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
        precision={
            "training": trained_in,
            "inference": inference_precision(trained_in),
            "note": "threshold and test metrics were computed in the inference precision; the saved "
            "model computes in it wherever it is loaded (evaluation, promotion, serving)",
        },
        collapsed=any(entry.get("collapsed", False) for entry in history),  # the run, not only the best epoch
        epochs_run=len(history),
        stopped=history[-1].get("stop") if history else None,
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
        "collapsed": card["collapsed"],
        "precision": card["precision"],
        "recipe": recipe(config),
        "epochs_run": card["epochs_run"],
        "stopped": card["stopped"],
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


def inference_precision(trained_in: str) -> str:
    """The precision a model is validated and served in: bfloat16 when it trained in bfloat16 (a CPU that
    computes it natively; ~3x float32's inference rate there, see benchmarks/RESULTS.md), else float32 -
    a float16 model trained on GPUs is validated in float32, which every CPU and GPU runs exactly."""
    return "bfloat16" if trained_in == "bfloat16" else "float32"


def build_in_precision(model_config: ModelConfig, precision: str):
    """:func:`lxn_ray.model.network.build_lxn` under ``precision``'s dtype policy (the global policy is
    restored)."""
    import keras

    from lxn_ray.model.network import build_lxn, precision_policy

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision_policy(precision))
    try:
        return build_lxn(model_config)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def recipe(config: TrainConfig) -> str:
    """One line naming every recipe switch of ``config`` (job summaries and the search table)."""
    preprocessing = config.preprocessing
    prep = ["trim"] if preprocessing.trim_borders else []
    if preprocessing.equalization != "none":
        prep.append(preprocessing.equalization)
    schedule = config.schedule + (f"+{config.warmup_epochs} warm-up" if config.schedule == "cosine" else "")
    return (
        f"{config.architecture}, {config.optimizer} lr {config.learning_rate:.2g} {schedule}, "
        f"{config.sampling} sampling, preprocessing {'+'.join(prep) or 'none'}, "
        f"{config.epochs} epochs max" + (f" (patience {config.patience})" if config.patience else "")
    )


def _model_card(
    model_version, dataset_version, config, state, latest, threshold, val, test, seconds, run_name
):
    import keras
    import ray
    import tensorflow as tf

    from lxn_ray import __version__
    from lxn_ray.model.network import build_lxn

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
