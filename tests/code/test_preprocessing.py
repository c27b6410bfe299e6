"""Source-harmonising preprocessing: border trimming, equalisation, and the one preprocess path.

Pure unit tests on synthetic films (numpy + PIL): no Ray, no Keras.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from lxn_ray.images.decode import ImageRejected
from lxn_ray.images.preprocess import (
    DEFAULT_PREPROCESSING,
    PreprocessConfig,
    equalize,
    preprocess_batch,
    preprocess_bytes,
    preprocess_pixels,
    trim_borders,
)
from tests.helpers import encode

FILM_HEIGHT, FILM_WIDTH = 300, 260
TOP, LEFT, MARGIN = 40, 30, 90  # black frame on top and left, white label margin on the right


def _film(height: int = FILM_HEIGHT, width: int = FILM_WIDTH, seed: int = 0) -> np.ndarray:
    """A radiograph stand-in: a smooth gradient, grain everywhere, a noisy disc; grey levels 30..225."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    gradient = 60 + 100 * x / width + 40 * y / height
    disc = (y - height / 2) ** 2 + (x - width / 2) ** 2 < (min(height, width) / 3) ** 2
    pixels = gradient + rng.normal(0, 3, (height, width)) + disc * rng.normal(0, 20, (height, width))
    return np.clip(pixels, 30, 225).astype(np.uint8)


def _framed(film: np.ndarray) -> np.ndarray:
    """``film`` with a black frame on top and left and a white margin with burnt-in text on the right."""
    height, width = film.shape
    canvas = np.zeros((TOP + height, LEFT + width + MARGIN), dtype=np.uint8)
    canvas[TOP:, LEFT : LEFT + width] = film
    canvas[:, LEFT + width :] = 255
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    text_x = LEFT + width + 10  # labels sit in the margin, clear of the film's edge
    draw.text((text_x, TOP + 20), "L PA\nERECT", fill=0, font=font)
    draw.text((text_x, TOP + 150), "HOSP 7", fill=40, font=font)
    draw.text((text_x, TOP + height - 40), "2020-03", fill=0, font=font)
    return np.asarray(image).copy()


def _png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")


# --- trim_borders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_trim_recovers_the_film_from_frame_and_labelled_margin(turns: int) -> None:
    film = _film()
    framed = np.rot90(_framed(film), turns)  # every side takes its turn as the labelled margin
    expected = np.rot90(film, turns)

    trimmed = trim_borders(framed)

    assert trimmed.dtype == np.uint8 and trimmed.ndim == 2
    assert np.shares_memory(trimmed, framed)  # a view, no copy
    assert abs(trimmed.shape[0] - expected.shape[0]) <= 3
    assert abs(trimmed.shape[1] - expected.shape[1]) <= 3
    # what is left is the film: no frame or margin pixels, and the film's own pixels
    assert np.mean(trimmed <= 3) < 0.01 and np.mean(trimmed >= 252) < 0.01
    rows, cols = min(trimmed.shape[0], expected.shape[0]), min(trimmed.shape[1], expected.shape[1])
    assert np.abs(trimmed[:rows, :cols].astype(int) - expected[:rows, :cols]).mean() < 5


def test_trim_is_exact_on_a_clean_frame() -> None:
    film = _film()
    np.testing.assert_array_equal(trim_borders(_framed(film)), film)


def test_trim_peels_nested_frames() -> None:
    film = _film(200, 200)
    canvas = np.full((260, 260), 120, dtype=np.uint8)  # a flat grey band ...
    canvas[30:230, 30:230] = film
    framed = np.pad(canvas, 6, constant_values=0)  # ... inside a thin black line
    np.testing.assert_array_equal(trim_borders(framed), film)


def test_trim_never_removes_more_than_half_of_a_side() -> None:
    film = _film(80, 60)
    canvas = np.zeros((400, 500), dtype=np.uint8)
    canvas[160:240, 220:280] = film  # a small film in a huge black border

    trimmed = trim_borders(canvas)

    assert trimmed.shape[0] >= math.ceil(0.5 * 400) and trimmed.shape[1] >= math.ceil(0.5 * 500)
    assert trimmed.shape == (200, 250)  # the cap binds, shared between opposite sides
    assert np.count_nonzero(trimmed) == np.count_nonzero(canvas)  # the film is all still there


def test_trim_cap_holds_for_one_sided_and_uniform_images() -> None:
    canvas = np.full((300, 300), 255, dtype=np.uint8)
    canvas[:, :60] = _film(300, 60)  # film on the left, a 240-px white margin on the right
    trimmed = trim_borders(canvas)
    assert trimmed.shape == (300, 150)
    np.testing.assert_array_equal(trimmed[:, :60], canvas[:, :60])
    assert min(trim_borders(np.full((64, 48), 7, dtype=np.uint8)).shape) >= 24


@pytest.mark.parametrize(
    "image",
    [
        _film(),
        np.random.default_rng(1).integers(0, 256, (120, 90), dtype=np.uint8),
        np.add.outer(np.arange(64), np.arange(190)).astype(np.uint8),  # a diagonal ramp: no flat line
    ],
    ids=["film", "noise", "ramp"],
)
def test_trim_returns_an_image_without_borders_unchanged(image: np.ndarray) -> None:
    assert trim_borders(image) is image


def test_trim_keeps_a_film_that_touches_a_dark_edge() -> None:
    film = _film()
    film[:, :40] = np.random.default_rng(2).integers(0, 30, (FILM_HEIGHT, 40))  # dark but textured
    assert trim_borders(film).shape == film.shape


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), np.zeros(16, np.uint8), [[0, 1]]],
    ids=["rgb", "float", "1d", "list"],
)
def test_trim_rejects_non_grayscale_uint8(bad) -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        trim_borders(bad)


def test_trim_is_fast_on_a_large_film() -> None:
    large = np.zeros((4000, 4000), dtype=np.uint8)
    large[300:, 400:3600] = np.random.default_rng(3).integers(30, 226, (3700, 3200), dtype=np.uint8)
    trim_borders(large)
    start = time.perf_counter()
    trimmed = trim_borders(large)
    elapsed = time.perf_counter() - start
    assert trimmed.shape == (3700, 3200)
    assert elapsed < 1.0  # ~20 ms here; a per-pixel Python loop would take minutes


# --- equalize ----------------------------------------------------------------------------------------


def _low_contrast(seed: int = 4) -> np.ndarray:
    """Grey levels 100..140 only: a flat, under-contrasted film."""
    return (100 + _film(seed=seed).astype(np.float64) * 40 / 255).round().astype(np.uint8)


@pytest.mark.parametrize("method", ["none", "histogram", "clahe"])
def test_equalize_keeps_shape_and_dtype(method: str) -> None:
    image = _low_contrast()
    result = equalize(image, method, 0.01)
    assert result.dtype == np.uint8 and result.shape == image.shape


def test_equalize_none_returns_the_input() -> None:
    image = _low_contrast()
    assert equalize(image, "none", 0.01) is image


def test_histogram_equalisation_spreads_a_low_contrast_image() -> None:
    image = _low_contrast()
    assert image.min() >= 100 and image.max() <= 140
    result = equalize(image, "histogram", 0.01)
    assert result.min() <= 10 and result.max() >= 250


def test_clahe_changes_a_low_contrast_image_deterministically() -> None:
    image = _low_contrast()
    first = equalize(image, "clahe", 0.01)
    assert not np.array_equal(first, image)
    assert int(first.max()) - int(first.min()) > int(image.max()) - int(image.min())
    np.testing.assert_array_equal(first, equalize(image.copy(), "clahe", 0.01))
    stronger = equalize(image, "clahe", 0.05)
    assert stronger.std() > first.std()  # the clip limit is passed through


@pytest.mark.parametrize("method", ["histogram", "clahe"])
def test_equalize_leaves_a_constant_image_alone(method: str) -> None:
    flat = np.full((32, 32), 128, dtype=np.uint8)
    np.testing.assert_array_equal(equalize(flat, method, 0.01), flat)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_equalize_copes_with_tiny_images(size: int) -> None:
    image = np.random.default_rng(size).integers(0, 256, (size, size), dtype=np.uint8)
    for method in ("histogram", "clahe"):
        assert equalize(image, method, 0.01).shape == (size, size)


def test_equalize_rejects_unknown_method_and_bad_input() -> None:
    with pytest.raises(ValueError, match="equalization"):
        equalize(_low_contrast(), "gamma", 0.01)
    with pytest.raises(ValueError, match="2-D uint8"):
        equalize(np.zeros((4, 4), np.float64), "histogram", 0.01)


# --- PreprocessConfig --------------------------------------------------------------------------------


def test_config_defaults_and_mapping_round_trip() -> None:
    assert PreprocessConfig() == DEFAULT_PREPROCESSING
    assert DEFAULT_PREPROCESSING.as_dict() == {
        "trim_borders": False,
        "equalization": "none",
        "clahe_clip_limit": 0.01,
        "lungs": "none",
        "segmenter": "",
        "lung_margin": 0.05,
    }
    assert PreprocessConfig.from_mapping(None) == PreprocessConfig()
    assert PreprocessConfig.from_mapping({}) == PreprocessConfig()
    config = PreprocessConfig(trim_borders=True, equalization="clahe", clahe_clip_limit=0.02)
    assert PreprocessConfig.from_mapping(config.as_dict()) == config
    assert PreprocessConfig.from_mapping({"equalization": "histogram"}).equalization == "histogram"
    assert PreprocessConfig(clahe_clip_limit=1).clahe_clip_limit == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"equalization": "clache"}, "equalization must be one of none, histogram, clahe"),
        ({"equalization": "CLAHE"}, "equalization"),
        ({"equalization": None}, "equalization"),
        ({"clahe_clip_limit": 0.0}, r"clahe_clip_limit must be a number in \(0, 1\]"),
        ({"clahe_clip_limit": -0.1}, "clahe_clip_limit"),
        ({"clahe_clip_limit": 1.5}, "clahe_clip_limit"),
        ({"clahe_clip_limit": float("nan")}, "clahe_clip_limit"),
        ({"clahe_clip_limit": "0.01"}, "clahe_clip_limit"),
        ({"clahe_clip_limit": True}, "clahe_clip_limit"),
        ({"trim_borders": "yes"}, "trim_borders must be true or false"),
        ({"trim_borders": 1}, "trim_borders"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        PreprocessConfig.from_mapping(kwargs)


def test_config_from_mapping_rejects_unknown_keys_and_non_mappings() -> None:
    with pytest.raises(ValueError, match=r"unknown preprocessing setting\(s\) equalisation; known:"):
        PreprocessConfig.from_mapping({"equalisation": "clahe"})
    with pytest.raises(ValueError, match="trim, zzz"):
        PreprocessConfig.from_mapping({"trim_borders": True, "zzz": 1, "trim": True})
    with pytest.raises(ValueError, match="must be a mapping"):
        PreprocessConfig.from_mapping([("equalization", "clahe")])  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        DEFAULT_PREPROCESSING.equalization = "clahe"  # type: ignore[misc]


# --- preprocess_bytes / preprocess_pixels ------------------------------------------------------------


def _plain(data: bytes, size: int) -> np.ndarray:
    """The pipeline as it was before preprocessing options: decode (a JPEG of at least 4 x ``size`` a side
    at the smallest DCT scale that keeps 2 x ``size``: tests/code/test_scaled_decode.py holds it to the
    full decode), grayscale, bilinear resize, /255, 3 channels."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG" and min(image.size) >= 4 * size:
        image.draft(image.mode, (2 * size, 2 * size))
    gray = image.convert("L")
    resized = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    return np.repeat(pixels[:, :, np.newaxis], 3, axis=2)


def _rgb_jpeg(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(np.dstack([pixels] * 3), mode="RGB"), "JPEG", quality=90)


ENCODINGS = {"png": _png, "jpeg": _rgb_jpeg}
CONFIGS = [
    DEFAULT_PREPROCESSING,
    PreprocessConfig(trim_borders=True),
    PreprocessConfig(equalization="histogram"),
    PreprocessConfig(equalization="clahe", clahe_clip_limit=0.02),
    PreprocessConfig(trim_borders=True, equalization="clahe"),
]


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("size", [1, 32, 200])
def test_default_preprocessing_is_the_plain_pipeline_bit_for_bit(encoding: str, size: int) -> None:
    data = ENCODINGS[encoding](_framed(_film()))
    expected = _plain(data, size)
    np.testing.assert_array_equal(preprocess_bytes(data, size), expected)
    np.testing.assert_array_equal(preprocess_bytes(data, size, preprocessing=DEFAULT_PREPROCESSING), expected)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.trim_borders}-{c.equalization}")
def test_preprocess_bytes_is_pixels_over_255_in_three_channels(config: PreprocessConfig) -> None:
    data = _png(_framed(_low_contrast()[:250]))
    pixels = preprocess_pixels(data, 48, preprocessing=config)
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 48)
    model_input = preprocess_bytes(data, 48, preprocessing=config)
    assert model_input.dtype == np.float32 and model_input.shape == (48, 48, 3)
    expanded = np.repeat((pixels.astype(np.float32) / np.float32(255.0))[:, :, np.newaxis], 3, axis=2)
    np.testing.assert_array_equal(model_input, expanded)


def test_equalization_options_change_the_model_input() -> None:
    data = _png(_low_contrast())
    plain = preprocess_pixels(data, 64)
    histogram = preprocess_pixels(data, 64, preprocessing=PreprocessConfig(equalization="histogram"))
    clahe = preprocess_pixels(data, 64, preprocessing=PreprocessConfig(equalization="clahe"))
    assert int(plain.max()) - int(plain.min()) <= 45
    assert histogram.min() <= 10 and histogram.max() >= 245
    assert not np.array_equal(clahe, plain) and not np.array_equal(clahe, histogram)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_trimming_makes_framed_and_unframed_copies_of_a_film_agree(encoding: str) -> None:
    film = _film()
    framed, bare = ENCODINGS[encoding](_framed(film)), ENCODINGS[encoding](film)
    trim = PreprocessConfig(trim_borders=True)

    untrimmed_gap = np.abs(preprocess_bytes(framed, 64) - preprocess_bytes(bare, 64)).mean()
    trimmed_gap = np.abs(
        preprocess_bytes(framed, 64, preprocessing=trim) - preprocess_bytes(bare, 64, preprocessing=trim)
    ).mean()

    assert untrimmed_gap > 0.1  # the frame and margin dominate the plain resize
    assert trimmed_gap < 0.01


def test_preprocess_batch_threads_the_config() -> None:
    config = PreprocessConfig(trim_borders=True, equalization="histogram")
    files = [_png(_framed(_film())), _png(_film(seed=5))]
    batch = preprocess_batch(files, 40, preprocessing=config)
    assert batch.shape == (2, 40, 40, 3) and batch.dtype == np.float32
    for row, data in zip(batch, files, strict=True):
        np.testing.assert_array_equal(row, preprocess_bytes(data, 40, preprocessing=config))
    assert preprocess_batch([], 40, preprocessing=config).shape == (0, 40, 40, 3)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.trim_borders}-{c.equalization}")
@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", _png(_film())[:80], b"GIF89a" + b"\0" * 40],
    ids=["empty", "text", "truncated", "gif"],
)
def test_bad_bytes_are_only_ever_image_rejected(config: PreprocessConfig, data: bytes) -> None:
    with pytest.raises(ImageRejected):
        preprocess_pixels(data, 32, preprocessing=config)
    with pytest.raises(ImageRejected):
        preprocess_bytes(data, 32, preprocessing=config)


def test_programming_errors_are_not_image_rejected() -> None:
    data = _png(_film())
    with pytest.raises(TypeError, match="PreprocessConfig"):
        preprocess_bytes(data, 32, preprocessing={"equalization": "clahe"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size") as caught:
        preprocess_pixels(data, 0)
    assert not isinstance(caught.value, ImageRejected)


def test_scikit_image_is_imported_only_for_equalisation() -> None:
    script = (
        "import sys, numpy as np\n"
        "from lxn_ray.images.preprocess import PreprocessConfig, preprocess_bytes, trim_borders\n"
        "from tests.code.test_preprocessing import _film, _framed, _png\n"
        "data = _png(_framed(_film()))\n"
        "preprocess_bytes(data, 32, preprocessing=PreprocessConfig(trim_borders=True))\n"
        "assert 'skimage' not in sys.modules, 'skimage imported without equalisation'\n"
        "preprocess_bytes(data, 32, preprocessing=PreprocessConfig(equalization='clahe'))\n"
        "assert 'skimage' in sys.modules\n"
    )
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo_root
    )
    assert result.returncode == 0, result.stderr


def test_film_region_is_what_the_model_sees_before_resizing():
    """The Grad-CAM overlay is drawn on this region: the trimmed crop when the model trims, else the film."""
    from PIL import Image

    from lxn_ray.images.preprocess import (
        PreprocessConfig,
        film_region,
        preprocess_bytes,
        preprocess_for_explanation,
        trim_borders,
    )

    film = np.random.default_rng(0).integers(60, 200, (120, 100), dtype=np.uint8)
    framed = np.zeros((160, 140), dtype=np.uint8)
    framed[20:140, 20:120] = film
    image = Image.fromarray(framed, mode="L")
    assert film_region(image) is image
    trimming = PreprocessConfig(trim_borders=True)
    region = film_region(image, trimming)
    assert region.size[::-1] == trim_borders(framed).shape == (120, 100)
    # From one decode: the model input exactly as preprocess_bytes gives it, and the region it shows.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    model_input, shown, lungs = preprocess_for_explanation(buffer.getvalue(), 32, preprocessing=trimming)
    assert lungs is None  # no segmenter given
    np.testing.assert_array_equal(
        model_input, preprocess_bytes(buffer.getvalue(), 32, preprocessing=trimming)
    )
    assert shown.size == region.size


# -- lung fields ----------------------------------------------------------------------------------------
def box_finder(top: int, bottom: int, left: int, right: int):
    """A stand-in lung segmenter (a LungFinder) that finds one rectangle, at the film's own size."""

    def find(gray: np.ndarray) -> np.ndarray:
        mask = np.zeros(gray.shape, dtype=bool)
        mask[top:bottom, left:right] = True
        return mask

    return find


def test_lung_preprocessing_crops_to_the_fields_box_and_masks_outside_them():
    from lxn_ray.images.preprocess import PreprocessConfig, lung_box, lung_fields, preprocess_for_explanation

    film = np.random.default_rng(1).integers(40, 220, (200, 160), dtype=np.uint8)
    mask = box_finder(50, 150, 40, 120)(film)
    mask[50:60, 40:50] = False  # a notch: mask mode blanks it, crop mode keeps it
    assert lung_box(mask, 0.0) == (50, 150, 40, 120)
    assert lung_box(mask, 0.1) == (40, 160, 32, 128)  # 10% of the box's height and width on each side
    assert lung_box(mask, 0.5) == (0, 200, 0, 160)  # clipped to the film
    assert lung_box(np.zeros_like(mask), 0.1) is None
    cropped, cropped_mask = lung_fields(film, mask, "crop", 0.0)
    np.testing.assert_array_equal(cropped, film[50:150, 40:120])
    assert cropped_mask.shape == cropped.shape
    masked, _ = lung_fields(film, mask, "mask", 0.0)
    assert (masked[:10, :10] == 0).all() and (masked[10:, 10:] == film[60:150, 50:120]).all()
    whole, _ = lung_fields(film, np.zeros_like(mask), "mask", 0.1)  # no lungs found: the film stays whole
    assert whole is film
    with pytest.raises(ValueError, match="the lung mask is"):
        lung_fields(film, mask[:10], "crop", 0.0)

    data = encode(Image.fromarray(film, mode="L"), "PNG")
    crop = PreprocessConfig(lungs="crop", lung_margin=0.0)
    with pytest.raises(ValueError, match="needs a lung segmenter"):
        preprocess_bytes(data, 32, preprocessing=crop)
    finder = box_finder(50, 150, 40, 120)
    expected = np.asarray(Image.fromarray(film[50:150, 40:120]).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(
        preprocess_bytes(data, 32, preprocessing=crop, lungs=finder)[..., 0], expected / np.float32(255)
    )
    # the explanation's region is the crop, its mask the crop's; a finder without lung preprocessing only
    # reports the mask (the saliency share) and leaves the model input as it was
    _, region, region_mask = preprocess_for_explanation(data, 32, preprocessing=crop, lungs=finder)
    assert region.size == (80, 100) and region_mask.all()
    plain, whole_region, whole_mask = preprocess_for_explanation(data, 32, lungs=finder)
    np.testing.assert_array_equal(plain, preprocess_bytes(data, 32))
    assert whole_region.size == (160, 200) and whole_mask.sum() == 100 * 80
    with pytest.raises(ValueError, match="lungs must be one of none, crop, mask"):
        PreprocessConfig(lungs="blank")
    assert PreprocessConfig.from_mapping({"trim_borders": True}).lungs == "none"  # cards before lungs
