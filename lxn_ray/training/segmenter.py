"""Training the lung-field segmenter with Ray Train: its settings, the driver and the worker loop.

The driver (:func:`train_segmenter`) opens the masks folder, pairs each mask with its film, patient and
split (:func:`lxn_ray.data.lung_pairs.pair_films`), resizes the pairs once to the U-Net's input
(:func:`lxn_ray.model.lungs.preprocess`; uint8, a few MB, passed to the workers through the Ray object
store), fits :func:`segmenter_loop_per_worker` on a ``DataParallelTrainer`` with TensorFlow's backend
(:mod:`lxn_ray.training.backend`), then publishes the epoch with the best validation Dice
(:func:`lxn_ray.training.segmenter_publish.publish_segmenter`).

The worker loop is the classifier's pattern (:mod:`lxn_ray.training.loop`): Keras 3 ``model.fit`` fails
under ``MultiWorkerMirroredStrategy`` with two workers (keras-team/keras#20585), so each step is
``strategy.run`` over a ``GradientTape`` with the per-film loss divided by the global batch. Seeded: the
epoch order comes from ``(seed, epoch)``, each rank's augmentation from ``(seed, epoch, rank)``; every
epoch is checkpointed (weights, optimizer, history), so a rerun of an interrupted job resumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lxn_ray.data.lung_pairs import Pairing, load_pair, pair_films
from lxn_ray.evaluation.segmentation import dice_iou
from lxn_ray.infra import cluster
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.settings import setting
from lxn_ray.infra.storage import Storage
from lxn_ray.model.lungs import preprocess
from lxn_ray.model.unet import UNetConfig
from lxn_ray.sources.masks import MaskError, MaskFolder, open_masks
from lxn_ray.training.runs import (
    CHECKPOINT_OPTIMIZER,
    CHECKPOINT_STATE,
    CHECKPOINT_WEIGHTS,
    run_config,
)

log = get_logger("lungs").info  # progress for the person watching; stdout keeps the summary

OBJECTIVE = "val_dice"  # what picks the best epoch: mean Dice over the validation films, at the U-Net's size
VAL_BATCH = 32
# Augmentation ranges (film and mask moved together; brightness and contrast on the film only): small,
# as films are taken upright and centred.
ROTATION_DEGREES = 10.0
ZOOM = 0.1  # scale drawn in [1 - ZOOM, 1 + ZOOM]
SHIFT = 0.06  # of the side, each axis
BRIGHTNESS = 0.08  # added, on the [0, 1] scale
CONTRAST = 0.2  # gain drawn in [1 - CONTRAST, 1 + CONTRAST] around the film's mean


@dataclass(frozen=True)
class SegmenterConfig:
    """One segmenter training run; recorded in the card. Defaults: measured on the 417 usable masks of
    ``/work/shared/data/lungmasks`` on a 2-core CPU (docs/lungs.md)."""

    unet: UNetConfig = setting(default_factory=UNetConfig, help="the U-Net's shape")
    epochs: int = setting(30, help="epochs to train; the epoch with the best validation Dice is kept")
    batch_size: int = setting(16, help="films per optimizer step, over all workers")
    learning_rate: float = setting(
        1e-3, flag=("--lr", "--learning-rate"), help="Adam's learning rate, decayed to 0 by a cosine"
    )
    augment: bool = setting(True, help="train without augmentation (shift, rotation, zoom, contrast)")
    precision: str = setting(
        "auto",
        choices=("auto", "float32", "bfloat16"),
        help="training compute precision: auto = bfloat16 on CPUs that have it, float32 elsewhere (GPUs too) "
        "(the published model computes in float32)",
    )
    workers: int = setting(1, help="Ray Train workers (data-parallel)")
    seed: int = setting(0, help="seeds the initial weights, the epoch order and the augmentation")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1 or not self.learning_rate > 0:
            raise ValueError(f"epochs, batch_size, workers and learning_rate must be positive: {self}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegmenterConfig:
        return cls(**{**values, "unet": UNetConfig(**values["unet"])})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class SegmentationData:
    """The paired films, loaded: U-Net-sized uint8 arrays of train and val (``(n, s, s)``; masks are
    soft, 0-255), and the val and test films and masks at their own size with their patients."""

    arrays: dict[str, np.ndarray]
    full: dict[str, list[tuple[np.ndarray, np.ndarray]]]  # "val"/"test": (film uint8, mask bool) pairs
    patients: dict[str, list[str]]  # split -> one patient key per film (in memory only)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {"films": len(p), "patients": len(set(p))} for s, p in self.patients.items()}


def load_data(
    storage: Storage, masks: MaskFolder, pairing: Pairing, films: Any, size: int, strict: bool
) -> SegmentationData:
    """Read, check and resize every paired film and mask; rows that fail (:class:`MaskError`) are skipped
    and counted in ``pairing``, or raise when ``strict``."""
    stacks: dict[str, tuple[list, list]] = {split: ([], []) for split in ("train", "val")}
    data = SegmentationData({}, {"val": [], "test": []}, {"train": [], "val": [], "test": []})
    for paired in pairing.films:
        try:
            film, mask = load_pair(storage, masks, paired, films)
        except MaskError as error:
            if strict:
                raise
            pairing.skip(error)
            continue
        split = paired.split
        data.patients[split].append(paired.patient)
        if split in data.full:
            data.full[split].append((film, mask))
        if split in stacks:  # exactly preprocess's values, as uint8 (it divides uint8 pixels by 255)
            stacks[split][0].append(np.rint(preprocess([film], size)[0, ..., 0] * 255).astype(np.uint8))
            soft = preprocess([mask.astype(np.uint8) * 255], size)[0, ..., 0]
            stacks[split][1].append(np.rint(soft * 255).astype(np.uint8))
    for split, (films_, masks_) in stacks.items():
        empty = np.zeros((0, size, size), np.uint8)
        data.arrays[f"{split}_films"] = np.stack(films_) if films_ else empty
        data.arrays[f"{split}_masks"] = np.stack(masks_) if masks_ else empty
    missing = [split for split, patients in data.patients.items() if not patients]
    if missing:
        raise ValueError(
            f"no usable films in the {' and '.join(missing)} split(s) "
            f"({len(pairing.films)} paired, skipped: {dict(pairing.skipped) or 'none'})"
        )
    return data


def train_segmenter(
    storage: Storage,
    masks_folder: str | Path,
    config: SegmenterConfig = SegmenterConfig(),
    dataset_version: str | None = "latest",
    films: str | None = None,
    films_ref: str | None = None,
    strict: bool = False,
    fresh: bool = False,
) -> dict[str, Any]:
    """The lungs job: pair and load the masks, fit on Ray Train, publish the best epoch as a segmenter
    version; returns the report (see :func:`lxn_ray.training.segmenter_publish.publish_segmenter`).

    ``films``/``films_ref``: a folder or git repository (with its ref) holding the films by file name,
    instead of the dataset version's blobs. ``strict``: fail on the first bad row instead of skipping it.
    The run is named after the config and the films (rerunning an interrupted job resumes it); ``fresh``
    starts a new run. Raises FileNotFoundError (with the ingest command) when nothing gives the films."""
    from lxn_ray.sources.transports import open_source
    from lxn_ray.training.segmenter_publish import publish_segmenter

    started = time.monotonic()
    masks = open_masks(masks_folder)
    snapshot = open_source(films, films_ref, marker=None).open() if films else None
    pairing = pair_films(storage, masks, dataset_version, snapshot)
    log(f"{len(masks.rows)} masks: {len(pairing.films)} paired with films from the {pairing.film_source}")
    data = load_data(storage, masks, pairing, snapshot, config.unet.image_size, strict)
    counts = data.counts()
    log("films (patients): " + ", ".join(f"{s} {c['films']} ({c['patients']})" for s, c in counts.items()))
    cluster.connect()  # after the data checks: a wrong folder fails at once, without starting Ray
    plan = json.dumps([pairing.dataset_version, [[f.row.image, f.split] for f in pairing.films]])
    run_name = f"lungs-{config.digest()}-{hashlib.sha256(plan.encode()).hexdigest()[:8]}"
    if fresh:
        run_name += f"-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    fit_started = time.monotonic()
    result = fit(storage, config, data.arrays, run_name)
    log(f"training run {run_name} ended after {time.monotonic() - fit_started:.1f} s")
    best = result.get_best_checkpoint(metric=OBJECTIVE, mode="max") or result.checkpoint
    if best is None or result.checkpoint is None:
        raise RuntimeError(f"segmenter run {run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / CHECKPOINT_STATE).read_text())["history"]
    return publish_segmenter(storage, config, best, history, data, pairing, masks, started, run_name)


def fit(storage: Storage, config: SegmenterConfig, arrays: dict[str, np.ndarray], run_name: str):
    """Run :func:`segmenter_loop_per_worker` on ``config.workers`` Ray Train workers (each an even share of
    the cluster's CPUs, or a GPU where the cluster has them); returns the ``ray.train.Result``."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from lxn_ray.infra.resources import point_ray_train_at_this_cluster
    from lxn_ray.training.backend import TensorflowBackendConfig

    point_ray_train_at_this_cluster()
    available = ray.cluster_resources()
    use_gpu = available.get("GPU", 0) > 0
    cpus = max(1, min(int(available.get("CPU", 1) // config.workers), cluster.largest_node_cpus() or 1 << 30))
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": cpus}
    trainer = DataParallelTrainer(
        segmenter_loop_per_worker,
        backend_config=TensorflowBackendConfig(),
        train_loop_config={"config": config.as_dict(), "data": ray.put(arrays), "cpus": resources["CPU"]},
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=run_config(storage, run_name, 1, objective=OBJECTIVE),
    )
    n_train, n_val = len(arrays["train_films"]), len(arrays["val_films"])
    log(f"training {config.workers} worker(s): {n_train} train / {n_val} val films, {config.epochs} epochs")
    return trainer.fit()


# -- the worker loop (runs on every Ray Train worker) -------------------------------------------------
def segmenter_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker of a data-parallel segmenter run. ``loop_config``: ``config`` (the
    :class:`SegmenterConfig` as a dict), ``data`` (an object ref of the uint8 arrays of
    :class:`SegmentationData`) and ``cpus`` (this worker's CPUs)."""
    import tensorflow as tf

    cpus = int(loop_config.get("cpus", 1))
    tf.config.threading.set_intra_op_parallelism_threads(cpus)  # before any TF op, as collectives need
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import keras
    import ray
    import ray.train

    from lxn_ray.model.network import (
        OptimizerConfig,
        make_optimizer,
        optimizer_state,
        precision_policy,
        resolve_precision,
        restore_optimizer_state,
    )
    from lxn_ray.model.unet import build_unet

    config = SegmenterConfig.from_dict(loop_config["config"])
    arrays = ray.get(loop_config["data"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    precision = resolve_precision(config.precision, on_gpu=bool(tf.config.list_physical_devices("GPU")))
    if precision == "float16":  # auto on a GPU: this step has no loss scaling, and the U-Net is small
        precision = "float32"
    keras.utils.set_random_seed(config.seed)  # the same initial weights on every rank
    keras.mixed_precision.set_global_policy(precision_policy(precision))
    films, masks = arrays["train_films"], arrays["train_masks"]
    local_batch = max(1, config.batch_size // world)
    steps = -(-(len(films) // world) // local_batch)
    with strategy.scope():
        model = build_unet(config.unet)
        optimizer = make_optimizer(
            OptimizerConfig(
                name="adam",
                learning_rate=config.learning_rate,
                schedule="cosine",
                total_steps=steps * config.epochs,
            )
        )
    train_step, predict = _compile(strategy, model, optimizer, config.augment)

    history, first = [], 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a rerun of an interrupted job, or a replaced worker group
        with checkpoint.as_directory() as folder, strategy.scope():
            model.load_weights(Path(folder) / CHECKPOINT_WEIGHTS)
            with np.load(Path(folder) / CHECKPOINT_OPTIMIZER, allow_pickle=False) as saved:
                restore_optimizer_state(optimizer, model, {key: saved[key] for key in saved.files})
            history = json.loads((Path(folder) / CHECKPOINT_STATE).read_text())["history"]
        first = history[-1]["epoch"] + 1 if history else 1

    for epoch in range(first, config.epochs + 1):
        started = time.monotonic()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(films))
        share = order[: len(order) // world * world][rank::world]
        augment_rng = np.random.default_rng([config.seed, epoch, rank, 1])
        losses = []
        for start in range(0, len(share), local_batch):
            index = np.sort(share[start : start + local_batch])
            transforms, gains, offsets = draw_augmentation(augment_rng, len(index), config.unet.image_size)
            per_film = train_step(
                tf.constant(films[index]),
                tf.constant(masks[index]),
                tf.constant(transforms),
                tf.constant(gains),
                tf.constant(offsets),
                tf.constant(world * len(index)),
            )
            losses.append(strategy.experimental_local_results(per_film)[0].numpy())
        val_loss, val_dice, val_iou = validate(predict, arrays["val_films"], arrays["val_masks"])
        entry = {
            "epoch": epoch,
            "train_loss": float(np.mean(np.concatenate(losses))) if losses else None,
            "val_loss": val_loss,
            OBJECTIVE: val_dice,
            "val_iou": val_iou,
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            "precision": precision,
            "epoch_seconds": round(time.monotonic() - started, 2),
        }
        history.append(entry)
        if rank == 0:
            log(
                f"epoch {epoch}/{config.epochs}: loss {entry['train_loss']:.4f} val_loss {val_loss:.4f} "
                f"val_dice {val_dice:.4f} val_iou {val_iou:.4f} ({entry['epoch_seconds']:.1f} s, {precision})"
            )
        # A checkpoint when the epoch is the best so far (the one to publish) or the last (the full
        # history); the other epochs report metrics only, which costs no upload. Resuming replays from
        # the latest checkpoint, exactly as it ran (seeded).
        best_so_far = val_dice >= max(e[OBJECTIVE] for e in history)
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0 and (best_so_far or epoch == config.epochs):
                model.save_weights(Path(folder) / CHECKPOINT_WEIGHTS)
                np.savez(Path(folder) / CHECKPOINT_OPTIMIZER, **optimizer_state(optimizer))
                (Path(folder) / CHECKPOINT_STATE).write_text(json.dumps({"epoch": epoch, "history": history}))
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(entry, checkpoint=saved)


def draw_augmentation(
    rng: np.random.Generator, n: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random augmentation parameters of ``n`` films of side ``size``: (projective transforms float32
    ``(n, 8)`` in the ``keras.ops.image.affine_transform`` convention - output pixel -> input pixel - a
    rotation, zoom and shift about the centre; contrast gains float32 ``(n,)``; brightness offsets float32
    ``(n,)``). Drawn (from ``rng``) whether or not the run augments, which keeps the stream the same."""
    angle = np.deg2rad(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES, n))
    scale = rng.uniform(1 - ZOOM, 1 + ZOOM, n)
    shift = rng.uniform(-SHIFT, SHIFT, (n, 2)) * size
    gains = rng.uniform(1 - CONTRAST, 1 + CONTRAST, n).astype(np.float32)
    offsets = rng.uniform(-BRIGHTNESS, BRIGHTNESS, n).astype(np.float32)
    centre = (size - 1) / 2.0
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    # input = A (output - c) + c + shift, with A a rotation divided by the zoom
    a2 = centre - cos * centre + sin * centre + shift[:, 0]
    b2 = centre - sin * centre - cos * centre + shift[:, 1]
    zeros = np.zeros(n)
    transforms = np.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=1).astype(np.float32)
    return transforms, gains, offsets


def _compile(strategy, model, optimizer, augment: bool):
    """The worker's compiled ``train_step`` (one synchronous step of every replica: augment, forward,
    Dice + BCE per film over the global batch, apply gradients; returns the per-film losses) and
    ``predict`` (uint8 ``(m, s, s)`` -> float32 probabilities ``(m, s, s)``, inference mode)."""
    import keras
    import tensorflow as tf

    from lxn_ray.model.unet import dice_bce_loss

    def replica_step(films, masks, transforms, gains, offsets, global_batch):
        films = tf.cast(films, tf.float32)[..., tf.newaxis] / 255.0  # preprocess's values
        masks = tf.cast(masks, tf.float32)[..., tf.newaxis] / 255.0
        if augment:
            stacked = keras.ops.image.affine_transform(
                tf.concat([films, masks], axis=-1), transforms, interpolation="bilinear", fill_mode="constant"
            )
            films, masks = stacked[..., :1], stacked[..., 1:]
            mean = tf.reduce_mean(films, axis=[1, 2, 3], keepdims=True)
            gain, offset = gains[:, None, None, None], offsets[:, None, None, None]
            films = tf.clip_by_value((films - mean) * gain + mean + offset, 0.0, 1.0)
        with tf.GradientTape() as tape:
            per_film = dice_bce_loss(masks, model(films, training=True))
            loss = tf.nn.compute_average_loss(per_film, global_batch_size=global_batch)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return per_film

    @tf.function(reduce_retracing=True)
    def train_step(*args):
        return strategy.run(replica_step, args=args)

    @tf.function(reduce_retracing=True)
    def predict(films):
        images = tf.cast(films, tf.float32)[..., tf.newaxis] / 255.0
        return tf.cast(model(images, training=False), tf.float32)[..., 0]

    return train_step, predict


def validate(predict, films: np.ndarray, masks: np.ndarray) -> tuple[float, float, float]:
    """(mean loss, mean Dice, mean IoU) over the validation films at the U-Net's size: the prediction
    thresholded at 0.5 against the resized mask thresholded at 128. Every rank scores every film."""
    import tensorflow as tf

    from lxn_ray.model.unet import dice_bce_loss

    losses, dice, iou = [], [], []
    for start in range(0, len(films), VAL_BATCH):
        truth = masks[start : start + VAL_BATCH]
        probabilities = predict(tf.constant(films[start : start + VAL_BATCH])).numpy()
        losses.append(dice_bce_loss(truth.astype(np.float32) / 255.0, probabilities).numpy())
        for predicted, true in zip(probabilities >= 0.5, truth >= 128, strict=True):
            d, i = dice_iou(predicted, true)
            dice.append(d)
            iou.append(i)
    return float(np.mean(np.concatenate(losses))), float(np.mean(dice)), float(np.mean(iou))
