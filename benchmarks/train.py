"""Training benchmark: LxN through the Ray Train path against plain single-process Keras, same data.

    python benchmarks/train.py --storage /tmp/store [--image-size 200] [--width 1.0] [--epochs 2]
                               [--workers 1] [--batch-size 20]

Needs a dataset version in ``--storage`` (run jobs/ingest.py first). In one run it measures:
- training images/s of the last epoch (after tracing/warm-up) through lxn_ray's Ray Train loop,
- the same for plain Keras ``model.fit`` on in-memory arrays in this process (same model, loss weights,
  optimizer, batch size, no augmentation in either),
- their ratio, and GFLOP/s against LxN's forward FLOPs x 3 per training image,
- inference images/s of a compiled forward pass at batch 32.
Append the printed table to benchmarks/RESULTS.md with the machine it came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from lxn_ray import cluster, dataset
from lxn_ray.model import ModelConfig, build_lxn, class_weights, flops_per_image, make_optimizer
from lxn_ray.preprocess import AugmentConfig, preprocess_bytes
from lxn_ray.storage import Storage
from lxn_ray.train import TrainConfig, run_trainer


def load_split(storage: Storage, version: str, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    table = dataset.read_split(storage, version, split)
    images = np.stack(
        [preprocess_bytes(storage.read_bytes(k), image_size) for k in table.column("image_key").to_pylist()]
    )
    return images, np.asarray(table.column("label").to_pylist(), dtype=np.float32)


def plain_keras(images, labels, config: TrainConfig) -> float:
    """Seconds of the last epoch of ``model.fit`` in this process."""
    import keras

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
        verbose=0,
        callbacks=[Timer()],
    )
    return timings[-1]


def inference_rate(images: np.ndarray, config: TrainConfig) -> float:
    import tensorflow as tf

    model = build_lxn(config.model)
    forward = tf.function(lambda x: model(x, training=False), jit_compile=True)
    batch = tf.constant(images[:32] if len(images) >= 32 else np.resize(images, (32, *images.shape[1:])))
    forward(batch)  # compile
    started, runs = time.perf_counter(), 5
    for _ in range(runs):
        forward(batch).numpy()
    return 32 * runs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", required=True)
    parser.add_argument("--image-size", type=int, default=200)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args()

    storage = Storage.open(args.storage)
    version = dataset.resolve_version(storage, "latest")
    config = TrainConfig(
        image_size=args.image_size,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        workers=args.workers,
        augment=AugmentConfig(),
    )
    images, labels = load_split(storage, version, "train", args.image_size)
    n = len(labels)

    plain_seconds = plain_keras(images, labels, config)
    cluster.connect()
    result = run_trainer(storage, version, config, run_name=f"bench-{time.time_ns()}")
    ray_seconds = result.metrics["train_seconds"]  # the training pass of the last epoch, as for fit
    infer = inference_rate(images, config)

    train_flops = 3 * flops_per_image(ModelConfig(image_size=args.image_size, width=args.width))
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(
        f"LxN {args.image_size} px, width {args.width}, batch {args.batch_size}, {n} training images "
        f"(dataset {version}), last of {args.epochs} epochs"
    )
    print("| path | seconds/epoch | images/s | GFLOP/s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in (
        ("plain Keras fit, 1 process", plain_seconds),
        (f"lxn_ray Ray Train, {args.workers} worker(s)", ray_seconds),
    ):
        rate = n / seconds
        print(
            f"| {name} | {seconds:.1f} | {rate:.2f} | {rate * train_flops / 1e9:.1f} | "
            f"{plain_seconds / seconds:.2f}x |"
        )
    print(
        f"| inference, compiled forward, batch 32 | - | {infer:.1f} | "
        f"{infer * train_flops / 3 / 1e9:.1f} | - |"
    )


if __name__ == "__main__":
    main()
