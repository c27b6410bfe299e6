"""The LxN classifier (Umer et al., 2020, Figure (ii)) and the pieces a custom training step needs.

This module owns the architecture, the class-weighted loss of the paper's equation (1), the optimizer,
saving/loading and a FLOP count. It does not own the training loop: Keras 3 ``model.fit`` fails under
``tf.distribute.MultiWorkerMirroredStrategy`` with 2 workers (keras-team/keras#20585), so training uses a
custom step (``strategy.run``, ``tf.GradientTape``, ``optimizer.apply_gradients``). Everything here is
therefore plain functions over tensors, with a per-example loss the loop reduces itself with
``tf.nn.compute_average_loss``.

Keras 3 only (``import keras``, never ``tf.keras``): on Ray workers ``TF_USE_LEGACY_KERAS=1`` makes
``tf.keras`` a different library, and mixing the two in one program is a trap. Importing this module
builds nothing and does not import TensorFlow or Keras (each function does): processes that only need
:class:`ModelConfig` - a Tune trial, a Ray Train controller, a Ray Data task - skip a ~3 s import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

# Figure (ii): four blocks of two 3x3 valid ReLU convolutions and a 2x2 max-pool, then Dense 512, Dense 1.
CONV_BLOCKS: tuple[int, ...] = (32, 64, 128, 256)
CONVS_PER_BLOCK = 2
KERNEL_SIZE = 3
POOL_SIZE = 2
DENSE_UNITS = 512
INPUT_CHANNELS = 3

# Grad-CAM reads the activations of this layer; the name is part of the saved-model contract.
LAST_CONV_LAYER = f"block{len(CONV_BLOCKS)}_conv{CONVS_PER_BLOCK}"
INPUT_NAME = "image"
OUTPUT_LAYER = "covid_probability"

# Probabilities are clipped this far from 0 and 1 before taking logs: a saturated float32 sigmoid returns
# exactly 0.0 or 1.0, and log(0) would turn one confident mistake into an infinite loss and NaN gradients.
PROBABILITY_EPSILON = 1e-7


def _stage_output(size: int) -> int:
    """Spatial side after one block: two valid 3x3 convolutions (-2 each) then a 2x2 pool (floor halve)."""
    return (size - CONVS_PER_BLOCK * (KERNEL_SIZE - 1)) // POOL_SIZE


def min_image_size() -> int:
    """Smallest input side for which every block still has at least one pixel to pool (76 for LxN).

    Worked backwards from a 1x1 map after the last pool: each block needs ``POOL_SIZE * s`` pixels after
    its convolutions, plus ``2 * (KERNEL_SIZE - 1)`` consumed by them.
    """
    size = 1
    for _ in CONV_BLOCKS:
        size = size * POOL_SIZE + CONVS_PER_BLOCK * (KERNEL_SIZE - 1)
    return size


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an LxN network. The defaults are the paper's; small values exist for fast tests."""

    image_size: int = 200
    width: float = 1.0  # multiplies every conv/dense width (min 1 unit); 1.0 is the paper's network
    # "valid" is the paper's. "auto" keeps it wherever it fits (>= 76 px) and pads ("same") below that,
    # so quick runs at e.g. 64 px still have all four blocks; the model card records what was used.
    padding: str = "auto"

    def __post_init__(self) -> None:
        # Checked at construction so a bad Tune/CLI config fails before any worker starts.
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool):
            raise ValueError(f"image_size must be an int, got {self.image_size!r}")
        if self.padding not in ("auto", "valid", "same"):
            raise ValueError(f"padding must be auto, valid or same, got {self.padding!r}")
        smallest = min_image_size() if self.conv_padding == "valid" else POOL_SIZE ** len(CONV_BLOCKS)
        if self.image_size < smallest:
            raise ValueError(
                f"image_size {self.image_size} is too small for LxN with {self.conv_padding} padding: "
                f"four blocks of two 3x3 convolutions and a 2x2 max-pool need at least "
                f"{smallest}x{smallest} pixels"
            )
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width!r}")

    @property
    def conv_padding(self) -> str:
        """The padding the convolutions use: the paper's "valid" unless too small and ``auto``."""
        if self.padding != "auto":
            return self.padding
        return "valid" if self.image_size >= min_image_size() else "same"

    def units(self, base: int) -> int:
        """Scaled layer width, never below one unit."""
        return max(1, round(base * self.width))


def build_lxn(config: ModelConfig = ModelConfig()) -> keras.Model:
    import keras

    """Build LxN: ``(n, image_size, image_size, 3)`` float32 in [0, 1] -> P(COVID-19), shape ``(n, 1)``.

    Only built-in layers, so ``load_model(..., safe_mode=True)`` can rebuild it without executing code.
    """
    inputs = keras.Input(shape=(config.image_size, config.image_size, INPUT_CHANNELS), name=INPUT_NAME)
    x = inputs
    for block, filters in enumerate(CONV_BLOCKS, start=1):
        for conv in range(1, CONVS_PER_BLOCK + 1):
            x = keras.layers.Conv2D(
                config.units(filters),
                KERNEL_SIZE,
                padding=config.conv_padding,
                activation="relu",
                name=f"block{block}_conv{conv}",
            )(x)
        x = keras.layers.MaxPooling2D(POOL_SIZE, name=f"block{block}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(config.units(DENSE_UNITS), activation="relu", name="fc1")(x)
    # float32 output even under a mixed-precision policy: the loss clips and logs these values.
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name="lxn")


def class_weights(positives: int, negatives: int) -> tuple[float, float]:
    """Equation (1): ``(w_pos, w_neg) = (|N| / (|P|+|N|), |P| / (|P|+|N|))``.

    Each class is weighted by the *other* class's share, so the minority class weighs more and both
    classes contribute equally to the summed loss (w_pos * |P| == w_neg * |N|). When positives are the
    majority, w_pos < w_neg.
    """
    if positives < 0 or negatives < 0:
        raise ValueError(
            f"class counts must be non-negative, got positives={positives}, negatives={negatives}"
        )
    if positives == 0 or negatives == 0:
        empty = "positive (COVID-19)" if positives == 0 else "negative"
        raise ValueError(
            f"the {empty} class is empty (positives={positives}, negatives={negatives}); "
            "a binary classifier cannot be trained or class-weighted without both classes"
        )
    total = positives + negatives
    return negatives / total, positives / total


def weighted_bce(labels, probabilities, w_pos: float, w_neg: float) -> tf.Tensor:
    import tensorflow as tf

    """Per-example weighted binary cross-entropy, shape ``[batch]``, float32.

    ``-(w_pos * y * log(p) + w_neg * (1 - y) * log(1 - p))``. Per example (not reduced) so that the
    distributed step can divide by the *global* batch size with ``tf.nn.compute_average_loss``; a mean
    here would be a per-replica mean and scale gradients wrongly across workers. ``labels`` may be
    ``[batch]`` or ``[batch, 1]``, any numeric dtype; ``probabilities`` is the model output.
    """
    probabilities = tf.reshape(tf.cast(probabilities, tf.float32), [-1])
    labels = tf.reshape(tf.cast(labels, tf.float32), [-1])
    probabilities = tf.clip_by_value(probabilities, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
    positive_term = w_pos * labels * tf.math.log(probabilities)
    negative_term = w_neg * (1.0 - labels) * tf.math.log(1.0 - probabilities)
    return -(positive_term + negative_term)


def make_optimizer(learning_rate: float) -> keras.optimizers.Optimizer:
    import keras

    """RMSprop, the paper's optimizer. Create it inside ``strategy.scope()`` so its slots are mirrored."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    return keras.optimizers.RMSprop(learning_rate=learning_rate)


def save_model(model: keras.Model, path: str | Path) -> Path:
    """Save as a native ``.keras`` archive (config JSON + weights; no pickled code)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"models are saved as .keras archives, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def load_model(path: str | Path) -> keras.Model:
    import keras

    """Load a ``.keras`` archive with ``safe_mode=True``.

    Safe mode refuses to deserialize Lambda layers or other embedded bytecode, so loading a model file
    (e.g. a candidate pulled from shared storage into the serving replica) cannot execute code. It also
    keeps us honest: LxN uses built-in layers only. ``compile=False``: the loop supplies its own loss and
    optimizer, and inference needs neither.
    """
    return keras.models.load_model(Path(path), compile=False, safe_mode=True)


def flops_per_image(config: ModelConfig = ModelConfig()) -> float:
    """Forward-pass FLOPs for one image (2 x multiply-accumulates of convolutions and dense layers).

    Bias adds, ReLU and pooling are left out (well under 1%). LxN at 200 px: ~3.18e9; a training step
    (forward + backward) is roughly 3x that.
    """
    size, channels, macs = config.image_size, INPUT_CHANNELS, 0
    for filters in CONV_BLOCKS:
        out_channels = config.units(filters)
        for _ in range(CONVS_PER_BLOCK):
            if config.conv_padding == "valid":
                size -= KERNEL_SIZE - 1
            macs += size * size * KERNEL_SIZE * KERNEL_SIZE * channels * out_channels
            channels = out_channels
        size //= POOL_SIZE
    dense = config.units(DENSE_UNITS)
    macs += size * size * channels * dense + dense * 1
    return 2.0 * macs


def predict_probabilities(model: keras.Model, images, batch_size: int = 32) -> np.ndarray:
    """P(COVID-19) for a sequence of preprocessed ``(s, s, 3)`` arrays, in batches; shape ``(n,)``."""
    scores = [
        np.asarray(model.predict_on_batch(np.stack(images[start : start + batch_size]))).reshape(-1)
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
