"""Grad-CAM for LxN: where in the radiograph the COVID-19 score came from, as a picture a person checks.

A heat map is not a diagnosis and not proof of what the model "looked at"; it is a cheap check for
shortcuts (markers, text, borders, a hospital's collimation) that a pooled AUC hides. The map is for the
COVID-19 class: the gradient of the positive-class *logit* (not the sigmoid output, which saturates to
exactly 0 or 1 in float32 and then has no gradient) with respect to the last convolution's activations
(:data:`lxn_ray.model.network.LAST_CONV_LAYER`), channel-weighted and rectified (Selvaraju et al., 2017).

:class:`GradCam` builds its gradient model once per loaded model (the serving replica does it when it
loads or swaps a model), so a request runs one traced forward/backward pass and nothing is rebuilt.
Rendering (:func:`render_overlay`) needs only numpy and PIL; TensorFlow is imported only by GradCam.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_ALPHA = 0.4  # heat-map opacity: the radiograph keeps 60% of every pixel, so anatomy stays readable
MAX_SIDE = 1024  # overlays of 20-megapixel films are scaled down to this longest side


@dataclass(frozen=True)
class Explanation:
    """A Grad-CAM map in model-input coordinates and the probability the same pass computed."""

    heatmap: np.ndarray  # (h, w) float32 in [0, 1], the last conv layer's resolution: the positive class
    probability: float
    negative_heatmap: np.ndarray | None = None  # the same for the negative class (the negated logit)

    def of_predicted_class(self) -> np.ndarray:
        """The map of the class the output favours (positive when ``probability >= 0.5``): Grad-CAM of the
        predicted class (Selvaraju et al., 2017), which is not empty for a film scored negative."""
        if self.probability >= 0.5 or self.negative_heatmap is None:
            return self.heatmap
        return self.negative_heatmap


class GradCam:
    """Grad-CAM of one loaded LxN model; construct once per model, call per image (thread-safe)."""

    def __init__(self, model, layer: str | None = None) -> None:
        import keras
        import tensorflow as tf

        from lxn_ray.model.network import LAST_CONV_LAYER, OUTPUT_LAYER

        layer = layer or LAST_CONV_LAYER
        head = model.get_layer(OUTPUT_LAYER)
        # One model giving the conv activations and the input to the sigmoid head; the head's own weights
        # turn the latter into the logit, so the gradient never passes through a saturated sigmoid.
        self._features = keras.Model(model.inputs, [model.get_layer(layer).output, head.input])
        kernel, bias = head.kernel, head.bias
        size = int(model.input_shape[1])
        self.image_size = size

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def compute(images):
            with tf.GradientTape() as tape:
                activations, hidden = self._features(images, training=False)
                tape.watch(activations)
                logit = tf.matmul(hidden, tf.cast(kernel, hidden.dtype)) + tf.cast(bias, hidden.dtype)
            gradients = tape.gradient(logit, activations)  # (n, h, w, c)
            weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # channel importance
            evidence = tf.reduce_sum(weights * activations, axis=-1)  # (n, h, w)
            # The negated logit's gradient is the negated gradient: the negative class's map for free.
            positive, negative = tf.nn.relu(evidence), tf.nn.relu(-evidence)
            probability = tf.reshape(tf.sigmoid(tf.cast(logit, tf.float32)), [-1])
            return (
                tf.cast(_normalised(positive), tf.float32),
                probability,
                tf.cast(_normalised(negative), tf.float32),
            )

        def _normalised(cam):
            peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
            return tf.math.divide_no_nan(cam, peak)  # an all-zero map stays zero, never NaN

        self._compute = compute

    def __call__(self, image: np.ndarray) -> Explanation:
        """``image``: one preprocessed ``(s, s, 3)`` float32 array (from ``preprocess_bytes``)."""
        if image.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected a ({self.image_size}, {self.image_size}, 3) image, got {image.shape}")
        cam, probability, negative = self._compute(np.asarray(image, dtype=np.float32)[np.newaxis])
        return Explanation(
            heatmap=np.asarray(cam)[0],
            probability=float(np.asarray(probability)[0]),
            negative_heatmap=np.asarray(negative)[0],
        )


def jet(values: np.ndarray) -> np.ndarray:
    """The classic jet colour map, ``[0, 1]`` -> uint8 RGB (blue-cyan-yellow-red), without matplotlib."""
    v = np.clip(values, 0.0, 1.0)[..., np.newaxis]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue peaks at 3/4, 1/2, 1/4
    return (np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0) * 255).round().astype(np.uint8)


def display_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The overlay's size: the radiograph's own, scaled down (aspect kept) to ``max_side`` at most."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class OverlayLayout:
    """Where :func:`render_overlay` puts things: the caption band on top, the film below it at
    ``(0, caption_height)`` with its own size, the colour bar to the right of the film."""

    film: tuple[int, int]  # (width, height) of the film as drawn
    caption_height: int
    bar_width: int

    @property
    def size(self) -> tuple[int, int]:
        return self.film[0] + self.bar_width, self.caption_height + self.film[1]


def overlay_layout(radiograph_size: tuple[int, int], caption: str, max_side: int = MAX_SIDE) -> OverlayLayout:
    """The :class:`OverlayLayout` of an overlay of a film of ``radiograph_size`` with ``caption``."""
    film = display_size(*radiograph_size, max_side=max_side)
    font = _font(_caption_font_size(film[0], caption))
    lines = caption.count("\n") + 1
    line_height = font.getbbox("Ag")[3] + 3
    return OverlayLayout(film, caption_height=lines * line_height + 8, bar_width=max(48, film[0] // 7))


def render_overlay(
    radiograph: Image.Image,
    heatmap: np.ndarray,
    caption: str,
    alpha: float = DEFAULT_ALPHA,
    max_side: int = MAX_SIDE,
    layout: OverlayLayout | None = None,
    lungs: np.ndarray | None = None,
) -> bytes:
    """PNG: the radiograph in grayscale under a semi-transparent jet heat map; the caption in a band above
    the film (never over it) and a colour bar to its right (Grad-CAM, normalised to the image's peak:
    0 low, 1 high). Layout: :func:`overlay_layout`.

    ``heatmap`` is in model-input coordinates. Preprocessing is a plain resize (no letterbox) of the film
    or, for a model that trims borders, of :func:`lxn_ray.images.preprocess.film_region` - pass that region as
    ``radiograph`` - so stretching the map back to its aspect puts every cell where it belongs. ``lungs``,
    a bool mask of the radiograph's shape ``(height, width)``, is outlined in white over the map: the
    lung fields the segmenter found, where a model should look.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    layout = layout or overlay_layout(radiograph.size, caption, max_side)  # the caller's, when it has one
    size = layout.film
    gray = radiograph.convert("L").resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    base = np.repeat(np.asarray(gray, dtype=np.float32)[..., np.newaxis], 3, axis=2)
    cam = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize(size, Image.BILINEAR)
    colours = jet(np.asarray(cam)).astype(np.float32)
    blended = ((1.0 - alpha) * base + alpha * colours).round().astype(np.uint8)
    if lungs is not None:
        blended[lung_outline(lungs, size)] = 255
    blended = Image.fromarray(blended, "RGB")
    canvas = Image.new("RGB", layout.size, (255, 255, 255))
    canvas.paste(blended, (0, layout.caption_height))
    _draw_caption(canvas, caption, layout)
    _draw_colour_bar(canvas, layout, alpha)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def lung_outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The outline of a bool lung mask drawn at ``size`` = (width, height): bool ``(height, width)``, True
    on the fields' boundary, about 2 px wide (``skimage.segmentation.find_boundaries``, thick mode)."""
    from skimage.segmentation import find_boundaries

    resized = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return find_boundaries(np.asarray(resized) > 127, mode="thick")


def _caption_font_size(width: int, caption: str) -> int:
    """The largest font (from width / 32 down to 8) whose caption lines fit ``width``."""
    size = max(10, width // 32)
    while size > 8:
        font = _font(size)
        if max(font.getlength(line) for line in caption.splitlines() or [""]) + 8 <= width:
            break
        size -= 1
    return size


def _draw_caption(canvas: Image.Image, caption: str, layout: OverlayLayout) -> None:
    """Dark text on the white band above the film."""
    draw = ImageDraw.Draw(canvas)
    font = _font(_caption_font_size(layout.film[0], caption))
    draw.multiline_text((4, 4), caption, fill=(20, 20, 20), font=font, spacing=3)


def _draw_colour_bar(canvas: Image.Image, layout: OverlayLayout, alpha: float) -> None:
    """A vertical jet scale beside the film, at the heat map's opacity over mid-grey, labelled 0 to 1."""
    draw = ImageDraw.Draw(canvas)
    font = _font(max(9, min(14, layout.bar_width // 5)))
    left, width = layout.film[0] + 8, max(8, layout.bar_width // 4)
    top, bottom = layout.caption_height + 30, layout.caption_height + layout.film[1] - 12
    if bottom - top < 20:
        return
    values = np.linspace(1.0, 0.0, bottom - top, dtype=np.float32)  # high at the top
    strip = (1.0 - alpha) * 128.0 + alpha * jet(values).astype(np.float32)
    column = Image.fromarray(np.repeat(strip.round().astype(np.uint8)[:, np.newaxis], width, axis=1), "RGB")
    canvas.paste(column, (left, top))
    ink = (20, 20, 20)
    draw.text((left - 4, layout.caption_height + 4), "Grad-CAM", fill=ink, font=font)
    draw.text((left + width + 4, top - 6), "1", fill=ink, font=font)
    draw.text((left + width + 4, bottom - 8), "0", fill=ink, font=font)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()
