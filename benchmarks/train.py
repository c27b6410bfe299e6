"""Training benchmark: LxN through the Ray Train path against plain Keras ``fit``, in float32 and bfloat16.

    python benchmarks/train.py --storage /tmp/store [--image-size 200] [--width 1.0] [--epochs 3]
                               [--batch-size 20] [--precisions float32,bfloat16]

Needs a dataset version in ``--storage`` (run jobs/ingest.py first). In one run, on the same training
split, it measures for each precision:
- plain Keras ``model.fit`` on in-memory float32 arrays in this process (same model, equation (1)'s loss
  weights, RMSprop, batch, no augmentation) - the baseline is float32 ``fit``;
- lxn_ray's path: ``lxn_ray.training.train.train`` (Ray Data load, Ray Train worker, the custom step, seeded
  shuffling, per-epoch validation and checkpoint), which also publishes a model version whose test AUC
  and 95% interval show whether the precision cost accuracy;
- inference images/s of a compiled forward pass at batch 32.
Training images/s are of the last epoch's training pass (after tracing). Append the printed table to
benchmarks/RESULTS.md with the machine it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import numpy as np

from lxn_ray.data import dataset
from lxn_ray.images.preprocess import AugmentConfig, preprocess_pixels
from lxn_ray.infra import cluster
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.model.network import (
    ModelConfig,
    build_lxn,
    class_weights,
    cpu_supports_bfloat16,
    flops_per_image,
    make_optimizer,
    precision_policy,
)
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.train import train


def load_split(storage: Storage, version: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The training split as the model sees it: float32 ``(n, s, s, 3)`` in [0, 1], labels ``(n,)``."""
    table = dataset.read_split(storage, version, "train")
    pixels = np.stack(
        [preprocess_pixels(storage.read_bytes(k), image_size) for k in table.column("image_key").to_pylist()]
    )
    images = np.repeat((pixels.astype(np.float32) / 255.0)[..., np.newaxis], 3, axis=-1)
    return images, np.asarray(table.column("label").to_pylist(), dtype=np.float32)


def plain_keras(images: np.ndarray, labels: np.ndarray, config: TrainConfig, precision: str) -> float:
    """Seconds of the last epoch of ``model.fit`` in this process, under ``precision``'s policy."""
    import keras

    keras.mixed_precision.set_global_policy(precision_policy(precision))
    try:
        w_pos, w_neg = class_weights(int(labels.sum()), int(len(labels) - labels.sum()))
        model = build_lxn(config.model)
        model.compile(optimizer=make_optimizer(config.learning_rate), loss="binary_crossentropy")
        weights = np.where(labels == 1, w_pos, w_neg).astype(np.float32)
        timings: list[float] = []

        class Timer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                timings.append(time.perf_counter() - self.started)

        model.fit(
            images,
            labels,
            sample_weight=weights,
            batch_size=config.batch_size,
            epochs=config.epochs,
            shuffle=True,
            verbose=0,
            callbacks=[Timer()],
        )
        return timings[-1]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def inference_rate(images: np.ndarray, config: TrainConfig, precision: str) -> float:
    """Images/s of a compiled forward pass at batch 32 under ``precision``'s policy."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(precision_policy(precision))
    try:
        model = build_lxn(config.model)
        forward = tf.function(lambda x: model(x, training=False))
        batch = tf.constant(np.resize(images, (32, *images.shape[1:])))
        forward(batch)  # trace
        started, runs = time.perf_counter(), 5
        for _ in range(runs):
            forward(batch).numpy()
        return 32 * runs / (time.perf_counter() - started)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", required=True)
    recipe = ("image_size", "width", "epochs", "batch_size", "learning_rate")
    add_flags(parser, TrainConfig, only=recipe, defaults={"epochs": 3})
    parser.add_argument("--precisions", default="float32,bfloat16")
    args = parser.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]

    storage = Storage.open(args.storage)
    version = dataset.resolve_version(storage, "latest")
    base = from_args(TrainConfig, args, augment=AugmentConfig(), precision="float32")
    images, labels = load_split(storage, version, args.image_size)
    n = len(labels)

    rows = []  # (path, seconds per epoch, images/s)
    runs = {}
    for precision in precisions:
        rows.append((f"plain Keras fit, {precision}", plain_keras(images, labels, base, precision)))
    cluster.connect()
    for precision in precisions:
        config = dataclasses.replace(base, precision=precision)
        report = train(storage, version, config, fresh=True)
        from lxn_ray import registry

        card = registry.read_card(storage, report["model_version"])
        rows.append((f"lxn_ray Ray Train, 1 worker, {precision}", card["history"][-1]["train_seconds"]))
        runs[precision] = report
    inference = {precision: inference_rate(images, base, precision) for precision in precisions}

    train_flops = 3 * flops_per_image(ModelConfig(image_size=args.image_size, width=args.width))
    baseline = rows[0][1]  # plain Keras float32 fit
    print(
        f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} "
        f"cores, native bfloat16: {cpu_supports_bfloat16()}, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"LxN {base.image_size} px, width {base.width}, batch {base.batch_size}, "
        f"RMSprop {base.learning_rate:g}, {n} training images (dataset {version}), "
        f"last of {base.epochs} epochs timed"
    )
    print("| path | seconds/epoch | train images/s | GFLOP/s | vs plain float32 fit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in rows:
        rate = n / seconds
        print(
            f"| {name} | {seconds:.1f} | {rate:.2f} | {rate * train_flops / 1e9:.1f} | "
            f"{baseline / seconds:.2f}x |"
        )
    print("| inference, traced forward, batch 32 | images/s | ratio |")
    print("| --- | ---: | ---: |")
    for precision, rate in inference.items():
        print(f"| {precision} | {rate:.1f} | {rate / inference[precisions[0]]:.2f}x |")
    print("| lxn_ray run | val AUC | test AUC (95% CI) | n test |")
    print("| --- | ---: | ---: | ---: |")
    for precision, report in runs.items():
        test = report["test"]
        ci = test.get("auc_ci") or [float("nan")] * 2
        print(
            f"| {precision}, {args.epochs} epochs | {report['val']['auc']:.3f} | {test['auc']:.3f} "
            f"({ci[0]:.3f}-{ci[1]:.3f}) | {test['n']} |"
        )


if __name__ == "__main__":
    main()
