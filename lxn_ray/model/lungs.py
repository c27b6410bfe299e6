"""Lung-field masks of films of any size from a trained U-Net (:mod:`lxn_ray.model.unet`).

:func:`preprocess` is the segmenter's input preprocessing, the one definition that training (its uint8
arrays are this function's output times 255, exactly) and inference share. :class:`LungSegmenter` wraps a
loaded U-Net: :meth:`LungSegmenter.masks` resizes films in, predicts in batches, resizes each probability
map back to its film's size (bilinear) and thresholds it at 0.5. Load a registered segmenter with
:meth:`LungSegmenter.load` (``latest`` or a version id; :func:`lxn_ray.registry.resolve_segmenter`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lxn_ray import registry
from lxn_ray.infra.storage import Storage

if TYPE_CHECKING:
    import keras

THRESHOLD = 0.5  # a pixel is lung where the upsampled probability is at least this
BATCH_SIZE = 32


def preprocess(grays: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Films -> the U-Net's input: float32 ``(n, size, size, 1)`` in [0, 1].

    Each film, a 2-D uint8 array of any shape (grayscale), is resized to ``size`` x ``size`` - squared,
    not padded - with PIL's bilinear filter (which widens its support when shrinking, so it also
    anti-aliases), rounded to uint8, and divided by 255. Raises ValueError for a film that is not 2-D
    uint8 or is empty."""
    out = np.empty((len(grays), size, size, 1), np.float32)
    for index, gray in enumerate(grays):
        gray = np.asarray(gray)
        if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
            raise ValueError(
                f"film {index}: expected a non-empty 2-D uint8 array, got {gray.dtype} {gray.shape}"
            )
        resized = Image.fromarray(gray, mode="L").resize((size, size), Image.BILINEAR)
        out[index, ..., 0] = np.asarray(resized, np.float32) / 255.0
    return out


def upsample(probability: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float ``(s, s)`` probability map resized to ``shape`` = (height, width) with PIL's bilinear filter;
    float32."""
    image = Image.fromarray(np.asarray(probability, np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.BILINEAR), np.float32)


class LungSegmenter:
    """A loaded lung-field U-Net and how to apply it to films of any size.

    ``model``: a Keras model ``(n, s, s, 1)`` float32 in [0, 1] -> ``(n, s, s, 1)`` probabilities
    (:func:`lxn_ray.model.unet.build_unet`, or one loaded from the registry). ``version``: the registry
    version it came from, when it did."""

    def __init__(self, model: keras.Model, version: str | None = None, batch_size: int = BATCH_SIZE) -> None:
        import tensorflow as tf

        self.model, self.version, self.batch_size = model, version, max(1, int(batch_size))
        self.image_size = int(model.input_shape[1])
        # A compiled forward pass (much faster than predict() on small batches); after a second batch
        # size it is retraced once for any size.
        self._forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    @classmethod
    def from_bytes(cls, model_bytes: bytes, version: str | None = None) -> LungSegmenter:
        """A segmenter from a ``.keras`` archive's bytes, loaded in Keras safe mode
        (:func:`lxn_ray.model.network.load_model`)."""
        from lxn_ray.model.network import load_model

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.keras"
            path.write_bytes(model_bytes)
            return cls(load_model(path), version)

    @classmethod
    def load(cls, storage: Storage, reference: str = "latest") -> LungSegmenter:
        """The registered segmenter ``reference`` (a version id or ``latest``) of ``storage``. Raises
        FileNotFoundError when there is none."""
        ref = registry.resolve_segmenter(storage, reference)
        return cls.from_bytes(ref.model_bytes, ref.version)

    def probabilities(self, grays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per film, the lung probability at the film's own size: float32 ``(h, w)`` in [0, 1]. ``grays``:
        2-D uint8 films of any sizes (see :func:`preprocess`)."""
        maps: list[np.ndarray] = []
        for start in range(0, len(grays), self.batch_size):
            chunk = grays[start : start + self.batch_size]
            predicted = np.asarray(self._forward(preprocess(chunk, self.image_size)), np.float32)[..., 0]
            maps.extend(upsample(p, np.asarray(g).shape) for p, g in zip(predicted, chunk, strict=True))
        return maps

    def masks(self, grays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per film, its lung-field mask: bool ``(h, w)``, the shape of the film. ``grays``: 2-D uint8
        films of any sizes, predicted :attr:`batch_size` at a time. Raises ValueError for a film that is
        not 2-D uint8."""
        return [probability >= THRESHOLD for probability in self.probabilities(grays)]
