"""LxN architecture, loss, save/load, preprocessing and augmentation: the pieces of the custom training step.

Tiny networks (76 px, the architecture's minimum, at 1/8 width) keep this fast on a 2-core CPU; only the
parameter-count test builds the paper's full network, and nothing trains it.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from lxn_ray.images.decode import ImageRejected
from lxn_ray.images.preprocess import (
    LIGHT_AUGMENT,
    AugmentConfig,
    build_augmenter,
    preprocess_batch,
    preprocess_bytes,
)
from lxn_ray.model.network import (
    LAST_CONV_LAYER,
    ModelConfig,
    build_lxn,
    class_weights,
    flops_per_image,
    load_model,
    make_optimizer,
    min_image_size,
    save_model,
    weighted_bce,
)
from tests.helpers import encode

TINY = ModelConfig(image_size=76, width=0.125)


def _radiograph(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise, so resizing and augmentation have structure to act on."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, width)[np.newaxis, :] * np.linspace(0.3, 1.0, height)[:, np.newaxis]
    return np.clip(ramp + rng.normal(0.0, 0.05, (height, width)), 0.0, 1.0)


# --- architecture -----------------------------------------------------------------------------------


def test_full_lxn_matches_the_paper() -> None:
    model = build_lxn()
    assert model.count_params() == 9_561_889
    assert model.input_shape == (None, 200, 200, 3)
    assert model.output_shape == (None, 1)
    assert model.get_layer(LAST_CONV_LAYER).output.shape == (None, 17, 17, 256)
    assert flops_per_image() == pytest.approx(3.18e9, rel=0.005)


def test_tiny_model_outputs_probabilities() -> None:
    model = build_lxn(TINY)
    batch = np.random.default_rng(0).random((3, 76, 76, 3), dtype=np.float32)
    probabilities = model(batch, training=False).numpy()
    assert probabilities.shape == (3, 1)
    assert probabilities.dtype == np.float32
    assert np.all((probabilities >= 0.0) & (probabilities <= 1.0))
    assert model.get_layer(LAST_CONV_LAYER).filters == 32


def test_image_size_floor_and_bad_configs() -> None:
    assert min_image_size() == 76
    build_lxn(ModelConfig(image_size=76, width=0.05))  # the smallest valid input builds
    with pytest.raises(ValueError, match="at least 76"):
        build_lxn(ModelConfig(image_size=75, padding="valid"))
    with pytest.raises(ValueError, match="at least 16"):
        ModelConfig(image_size=8, width=0.125)
    with pytest.raises(ValueError, match="padding"):
        ModelConfig(padding="reflect")


def test_small_inputs_pad_instead_of_collapsing() -> None:
    assert ModelConfig(image_size=200).conv_padding == "valid"  # the paper's network, unchanged
    small = ModelConfig(image_size=64, width=0.125)
    assert small.conv_padding == "same"
    model = build_lxn(small)
    assert model.get_layer(LAST_CONV_LAYER).output.shape[1:3] == (8, 8)
    assert model.predict(np.zeros((1, 64, 64, 3), np.float32), verbose=0).shape == (1, 1)
    with pytest.raises(ValueError, match="width"):
        ModelConfig(width=0.0)


# --- loss and optimizer -----------------------------------------------------------------------------


def test_class_weights_follow_equation_1() -> None:
    w_pos, w_neg = class_weights(positives=30, negatives=10)
    assert (w_pos, w_neg) == pytest.approx((0.25, 0.75))  # w+ = |N|/(|P|+|N|)
    assert w_pos < w_neg  # positives are the majority, so each positive weighs less
    assert w_pos * 30 == pytest.approx(w_neg * 10)  # both classes contribute equally in total
    assert class_weights(10, 30) == pytest.approx((0.75, 0.25))
    assert class_weights(5, 5) == pytest.approx((0.5, 0.5))
    for positives, negatives in [(0, 5), (5, 0), (0, 0)]:
        with pytest.raises(ValueError, match="empty"):
            class_weights(positives, negatives)


def test_weighted_bce_against_hand_values() -> None:
    labels = np.array([[1], [0], [1], [0]], dtype=np.int64)
    probabilities = tf.constant([[0.8], [0.3], [1.0], [1.0]], dtype=tf.float32)
    per_example = weighted_bce(labels, probabilities, w_pos=0.25, w_neg=0.75)
    assert per_example.shape == (4,)
    expected = [
        -0.25 * math.log(0.8),
        -0.75 * math.log(0.7),
        -0.25 * math.log(float(np.float32(1.0 - 1e-7))),  # confident and right: ~0
        -0.75 * math.log(1.0 - float(np.float32(1.0 - 1e-7))),  # confident and wrong: finite (~12), not inf
    ]
    np.testing.assert_allclose(per_example.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(per_example.numpy()))
    flat = weighted_bce(labels.ravel(), tf.reshape(probabilities, [-1]), 0.25, 0.75)
    np.testing.assert_allclose(flat.numpy(), per_example.numpy())
    # The custom step divides by the global batch (here two replicas of four): sum / 8.
    average = tf.nn.compute_average_loss(per_example, global_batch_size=8)
    assert float(average) == pytest.approx(sum(expected) / 8, rel=1e-4)


def test_make_optimizer_is_rmsprop() -> None:
    optimizer = make_optimizer(1e-4)
    assert isinstance(optimizer, keras.optimizers.RMSprop)
    assert float(optimizer.learning_rate) == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        make_optimizer(0.0)


def test_custom_gradient_tape_step_reduces_loss() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = np.array([1, 0] * 4, dtype=np.float32)
    # Learnable: positives are brighter.
    images = (rng.random((8, 76, 76, 3)) * 0.5 + labels[:, None, None, None] * 0.5).astype(np.float32)
    model = build_lxn(ModelConfig(image_size=76, width=0.25))  # 1/8 width learns too slowly for a short test
    optimizer = make_optimizer(1e-3)
    w_pos, w_neg = class_weights(positives=4, negatives=4)

    @tf.function
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            per_example = weighted_bce(y, model(x, training=True), w_pos, w_neg)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=8)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    losses = [float(step(images, labels)) for _ in range(15)]
    assert all(math.isfinite(loss) for loss in losses)
    assert min(losses[-3:]) < losses[0] * 0.8, losses


# Keras 3.15's own weight writer trips a NumPy 2 copy-keyword DeprecationWarning; not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_save_load_round_trip_in_safe_mode(tmp_path) -> None:
    model = build_lxn(TINY)
    batch = np.random.default_rng(1).random((2, 76, 76, 3), dtype=np.float32)
    path = save_model(model, tmp_path / "models" / "lxn.keras")
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0))
    assert loaded.get_layer(LAST_CONV_LAYER) is not None
    assert loaded.count_params() == model.count_params()
    with pytest.raises(ValueError, match=".keras"):
        save_model(model, tmp_path / "lxn.h5")


# --- preprocessing ----------------------------------------------------------------------------------


def _png_l() -> bytes:
    return encode(Image.fromarray((_radiograph(90, 70) * 255).astype(np.uint8), mode="L"), "PNG")


def _png_rgba() -> bytes:
    gray = (_radiograph(64, 100) * 255).astype(np.uint8)
    alpha = np.full_like(gray, 255)
    alpha[:10] = 0  # transparent strip, flattened onto black
    return encode(Image.fromarray(np.dstack([gray, gray, gray, alpha]), mode="RGBA"), "PNG")


def _png_16bit() -> bytes:
    pixels = (_radiograph(80, 80) * 4095).astype(np.uint16)  # 12-bit data in a 16-bit container
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def _jpeg_rgb() -> bytes:
    gray = (_radiograph(120, 100) * 255).astype(np.uint8)
    return encode(Image.fromarray(np.dstack([gray, gray, gray]), mode="RGB"), "JPEG", quality=90)


def _jpeg_cmyk() -> bytes:
    gray = (_radiograph(100, 120) * 255).astype(np.uint8)
    return encode(Image.fromarray(np.dstack([gray, gray, gray]), mode="RGB").convert("CMYK"), "JPEG")


@pytest.mark.parametrize("make", [_png_l, _png_rgba, _png_16bit, _jpeg_rgb, _jpeg_cmyk])
def test_preprocess_bytes_gives_model_input(make) -> None:
    array = preprocess_bytes(make(), image_size=32)
    assert array.shape == (32, 32, 3)
    assert array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 1.0
    np.testing.assert_array_equal(array[..., 0], array[..., 1])
    np.testing.assert_array_equal(array[..., 0], array[..., 2])
    assert array.max() - array.min() > 0.3  # the gradient survived decoding (16-bit is not near-black)


def test_preprocess_values_and_batch() -> None:
    flat = encode(Image.new("L", (50, 40), 128), "PNG")
    np.testing.assert_allclose(preprocess_bytes(flat, 16), 128 / 255, rtol=1e-6)
    batch = preprocess_batch([flat, _jpeg_rgb()], 16)
    assert batch.shape == (2, 16, 16, 3) and batch.dtype == np.float32
    assert preprocess_batch([], 16).shape == (0, 16, 16, 3)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", _png_l()[:60], b"GIF89a" + b"\0" * 40],
    ids=["empty", "text", "truncated", "gif"],
)
def test_preprocess_rejects_bad_bytes(data: bytes) -> None:
    with pytest.raises(ImageRejected):
        preprocess_bytes(data, 32)
    with pytest.raises(ImageRejected):
        preprocess_batch([_png_l(), data], 32)


# --- augmentation -----------------------------------------------------------------------------------


def test_augmenter_is_none_when_off() -> None:
    assert AugmentConfig().is_off
    assert build_augmenter(AugmentConfig()) is None
    assert not LIGHT_AUGMENT.is_off
    assert not LIGHT_AUGMENT.horizontal_flip
    with pytest.raises(ValueError):
        AugmentConfig(rotation=-5.0)


def test_augmenter_changes_training_batches_within_range() -> None:
    config = AugmentConfig(
        rotation=10.0, zoom=0.1, shift=0.05, horizontal_flip=True, brightness=0.3, contrast=0.3
    )
    augmenter = build_augmenter(config, seed=7)
    assert augmenter is not None
    assert augmenter.get_layer("rotation").factor == pytest.approx((-10 / 360, 10 / 360))  # degrees / 360
    batch = np.stack([np.repeat(_radiograph(48, 48, seed)[..., None], 3, axis=2) for seed in range(4)])
    batch = batch.astype(np.float32)

    augment = tf.function(lambda images: augmenter(images, training=True))
    first, second = augment(batch).numpy(), augment(batch).numpy()
    for out in (first, second):
        assert out.shape == batch.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert np.abs(out - batch).mean() > 0.01
    assert np.abs(first - second).mean() > 0.01  # a fresh draw each step, not a frozen transform
    np.testing.assert_array_equal(augmenter(batch, training=False).numpy(), batch)

    again = build_augmenter(config, seed=7)(batch, training=True).numpy()
    fresh = build_augmenter(config, seed=7)(batch, training=True).numpy()
    np.testing.assert_array_equal(again, fresh)  # same seed, same first draw
