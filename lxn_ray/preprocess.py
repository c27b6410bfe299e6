"""The one preprocessing path from file bytes to model input, and the training-only augmenter.

Training, evaluation and serving all call :func:`preprocess_bytes`, so the model sees the same pixels in
production that it was validated on (no train/serve skew). Decoding and its guards against hostile files
live in :mod:`lxn_ray.imaging`; this module only turns a decoded radiograph into a float32 tensor.

Augmentation (:func:`build_augmenter`) is separate on purpose: it is random, applies to training batches
only, and must never run at evaluation or serving time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lxn_ray.imaging import ImageLimits, ImageRejected, decode_image, to_grayscale

if TYPE_CHECKING:
    import keras

DEFAULT_LIMITS = ImageLimits()
MODEL_CHANNELS = 3  # LxN takes 3 channels; a radiograph is grayscale, so the channel is replicated


@dataclass(frozen=True)
class AugmentConfig:
    """Random training-time transforms; 0 (or False) switches a transform off.

    ``horizontal_flip`` defaults off: chest radiographs have laterality (heart on the left, R/L markers,
    situs), so a mirrored film is not a plausible patient image, and a flip would teach the model that
    anatomy's side carries no information.
    """

    rotation: float = 0.0  # degrees, maximum absolute rotation
    zoom: float = 0.0  # fraction, zoom in or out by up to this much
    shift: float = 0.0  # fraction of the side, translation in each direction
    horizontal_flip: bool = False
    brightness: float = 0.0  # fraction of the [0, 1] range added or subtracted
    contrast: float = 0.0  # fraction; contrast scaled by a factor in [1 - c, 1 + c]

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name != "horizontal_flip" and not value >= 0:
                raise ValueError(f"{field.name} must be >= 0, got {value!r}")
        if self.rotation > 180:
            raise ValueError(f"rotation is in degrees and at most 180, got {self.rotation}")
        if self.zoom >= 1 or self.shift >= 1 or self.contrast > 1 or self.brightness > 1:
            raise ValueError(f"zoom and shift must be < 1, brightness and contrast <= 1: {self}")

    @property
    def is_off(self) -> bool:
        """True when no transform is active (evaluation-equivalent)."""
        return not (
            self.rotation
            or self.zoom
            or self.shift
            or self.horizontal_flip
            or self.brightness
            or self.contrast
        )


# Mild, anatomy-preserving jitter: small rotation/zoom/shift mimic patient positioning, brightness and
# contrast mimic exposure and scanner differences. No flip (laterality, see AugmentConfig).
LIGHT_AUGMENT = AugmentConfig(
    rotation=10.0, zoom=0.1, shift=0.05, horizontal_flip=False, brightness=0.1, contrast=0.1
)


def preprocess_bytes(data: bytes, image_size: int, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """File bytes -> ``(image_size, image_size, 3)`` float32 in [0, 1], channels equal.

    Raises :class:`ImageRejected` for any bad input bytes, never anything else (a bad ``image_size`` is a
    programming error and raises ``ValueError``).

    Plain resize to a square, not an aspect-preserving letterbox: it is what the paper's Keras pipeline
    did (``target_size=(200, 200)``), it spends every input pixel on the radiograph, and it adds no black
    bars whose width would encode each source's typical aspect ratio - a shortcut to telling hospitals
    apart on this multi-source dataset. Most chest films are near-square, so the distortion is small.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    decoded = decode_image(data, limits)
    try:
        gray = to_grayscale(decoded.image)
        # Bilinear with PIL's support scaling is area-aware when shrinking (no aliasing from 20 MP films);
        # reducing_gap first box-reduces very large images, which is much faster and visually identical.
        resized = gray.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        pixels = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    except (OSError, ValueError, MemoryError) as error:
        raise ImageRejected(f"could not resize image: {error}") from None
    return np.repeat(pixels[:, :, np.newaxis], MODEL_CHANNELS, axis=2)


def preprocess_batch(
    images: Iterable[bytes], image_size: int, limits: ImageLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Several files -> ``(n, image_size, image_size, 3)`` float32; one bad file raises ImageRejected."""
    arrays = [preprocess_bytes(data, image_size, limits) for data in images]
    if not arrays:
        return np.zeros((0, image_size, image_size, MODEL_CHANNELS), dtype=np.float32)
    return np.stack(arrays)


def build_augmenter(config: AugmentConfig, seed: int | None = None) -> keras.Sequential | None:
    """Keras 3 preprocessing layers for the active transforms of ``config``; ``None`` when all are off.

    Input and output: float32 ``(batch, s, s, 3)`` in [0, 1]. Geometric transforms fill exposed borders
    with black (0), the background of a radiograph, rather than mirroring anatomy in. Each layer gets its
    own seed derived from ``seed`` so the transforms are not drawn from one correlated stream. Call it with
    ``training=True`` on training batches only.
    """
    import keras  # here, not at import: preprocess_bytes (Ray Data tasks, serving) needs no Keras

    layers: list[keras.layers.Layer] = []

    def next_seed() -> int | None:
        return None if seed is None else seed + len(layers)

    geometry = {"fill_mode": "constant", "fill_value": 0.0, "interpolation": "bilinear"}
    if config.rotation:
        # Keras gives rotation as a fraction of a full turn: factor 10/360 rotates by up to +-10 degrees.
        layers.append(
            keras.layers.RandomRotation(
                config.rotation / 360.0, seed=next_seed(), name="rotation", **geometry
            )
        )
    if config.zoom:
        # One factor for both axes (width_factor=None) keeps the aspect ratio.
        layers.append(keras.layers.RandomZoom(config.zoom, seed=next_seed(), name="zoom", **geometry))
    if config.shift:
        layers.append(
            keras.layers.RandomTranslation(
                config.shift, config.shift, seed=next_seed(), name="shift", **geometry
            )
        )
    if config.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=next_seed(), name="flip"))
    if config.brightness:
        layers.append(
            keras.layers.RandomBrightness(
                config.brightness, value_range=(0.0, 1.0), seed=next_seed(), name="brightness"
            )
        )
    if config.contrast:
        layers.append(
            keras.layers.RandomContrast(
                config.contrast, value_range=(0.0, 1.0), seed=next_seed(), name="contrast"
            )
        )
    if not layers:
        return None
    # Bilinear resampling of [0, 1] values with a 0 fill already stays in range; the clip makes the
    # contract explicit whatever the layer order or Keras version. ReLU capped at 1 is clip(x, 0, 1), a
    # built-in layer (no Lambda), so anything holding it stays safe-mode loadable.
    layers.append(keras.layers.ReLU(max_value=1.0, name="clip"))
    return keras.Sequential(layers, name="augmenter")
