"""The lung-field segmenter's network: a small U-Net (Ronneberger et al., 2015) and its loss.

This module owns :class:`UNetConfig`, :func:`build_unet` and the per-example soft Dice + binary
cross-entropy loss (:func:`dice_bce_loss`). Input ``(n, s, s, 1)`` float32 in [0, 1] - the grayscale film
resized square and divided by 255 (:func:`lxn_ray.model.lungs.preprocess`, the one definition); output
``(n, s, s, 1)`` float32, the probability that a pixel lies inside either lung field.

As for LxN (:mod:`lxn_ray.model.network`): built-in layers only, so ``load_model(..., safe_mode=True)``
rebuilds it without running code; the loss is per example so a custom step under
``MultiWorkerMirroredStrategy`` divides by the global batch; importing this module imports neither Keras
nor TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lxn_ray.infra.settings import setting

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

INPUT_NAME = "film"
OUTPUT_LAYER = "lung_probability"
# Soft Dice's smoothing term: a film with no lung in either mask or prediction scores 1, not 0/0.
DICE_SMOOTH = 1.0
BN_MOMENTUM = 0.9
PROBABILITY_EPSILON = 1e-7  # as lxn_ray.model.network's: log(0) of a saturated sigmoid never reaches the loss


@dataclass(frozen=True)
class UNetConfig:
    """The shape of a U-Net: ``depth`` poolings, ``filters`` convolutions at full resolution, doubled at
    each level below (Ronneberger et al., 2015, with "same" padding and batch normalisation)."""

    image_size: int = setting(
        128, help="input side in pixels: films are resized to this square (a multiple of 2**depth)"
    )
    filters: int = setting(16, help="convolutions at full resolution; each level below has twice as many")
    depth: int = setting(4, help="poolings between the input and the bottleneck")

    def __post_init__(self) -> None:
        for name in ("image_size", "filters", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % 2**self.depth:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of 2**depth = {2**self.depth} "
                "(each of the depth poolings halves it)"
            )

    def as_dict(self) -> dict[str, int]:
        return {"image_size": self.image_size, "filters": self.filters, "depth": self.depth}


def _conv_block(x, filters: int, name: str):
    """Two 3x3 "same" convolutions, each unbiased, batch-normalised and rectified."""
    import keras

    for index in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{index}")(x)
        # Synchronized: statistics over the global batch of every Ray Train worker, so all ranks agree.
        # Momentum 0.9, not Keras' 0.99: a run is a few hundred steps (20 an epoch on 300 films), and
        # moving statistics still near their initial values score validation films wrongly.
        x = keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, synchronized=True, name=f"{name}_bn{index}"
        )(x)
        x = keras.layers.ReLU(name=f"{name}_relu{index}")(x)
    return x


def build_unet(config: UNetConfig = UNetConfig()) -> keras.Model:
    """The U-Net of ``config``: ``(n, s, s, 1)`` float32 in [0, 1] -> ``(n, s, s, 1)`` float32 lung-field
    probability (a sigmoid, float32 under any mixed-precision policy). Encoder: ``depth`` blocks, each
    followed by a 2x2 max-pool; decoder: a 2x2 stride-2 transposed convolution, concatenation with the
    encoder block of the same size, a block; a 1x1 convolution to the output."""
    import keras

    size = config.image_size
    inputs = keras.Input(shape=(size, size, 1), name=INPUT_NAME)
    x, skips = inputs, []
    for level in range(config.depth):
        x = _conv_block(x, config.filters * 2**level, f"down{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = _conv_block(x, config.filters * 2**config.depth, "bottom")
    for level in reversed(range(config.depth)):
        filters = config.filters * 2**level
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}_upsample")(x)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, f"up{level}")
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name="lung_unet")


def dice_bce_loss(masks, probabilities) -> tf.Tensor:
    """Per-film loss, float32 ``(n,)``: mean binary cross-entropy over the pixels plus ``1 - soft Dice``.

    Soft Dice (Milletari et al., 2016, with sums rather than squares in the denominator as in Sudre et
    al., 2017): ``(2 sum(p q) + 1) / (sum(p) + sum(q) + 1)`` per film, ``q`` the mask (float in [0, 1]:
    a resized mask's border pixels are fractional). The BCE term keeps gradients useful early, while Dice
    balances the lung against the background. ``masks`` and ``probabilities``: ``(n, s, s[, 1])``.
    Not reduced over the batch: the distributed step divides by the global batch.
    """
    import tensorflow as tf

    q = tf.cast(masks, tf.float32)
    p = tf.cast(probabilities, tf.float32)
    n = tf.shape(p)[0]
    q, p = tf.reshape(q, [n, -1]), tf.reshape(p, [n, -1])
    clipped = tf.clip_by_value(p, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
    bce = -tf.reduce_mean(q * tf.math.log(clipped) + (1.0 - q) * tf.math.log(1.0 - clipped), axis=1)
    overlap = tf.reduce_sum(p * q, axis=1)
    dice = (2.0 * overlap + DICE_SMOOTH) / (tf.reduce_sum(p, axis=1) + tf.reduce_sum(q, axis=1) + DICE_SMOOTH)
    return bce + (1.0 - dice)
