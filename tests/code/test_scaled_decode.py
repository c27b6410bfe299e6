"""Decoding only what is needed (lxn_ray.images.decode ``min_side``): a JPEG decoded at a reduced DCT
scale for a model input gives the pixels of a full decode within a stated tolerance, whatever its colour
model, coding or orientation; PNG and DICOM films are decoded whole and give exactly today's pixels; the
file's own size is reported either way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lxn_ray.images.decode import decode_image
from lxn_ray.images.preprocess import (
    DEFAULT_PREPROCESSING,
    PreprocessConfig,
    decode_side,
    preprocess_decoded,
    preprocess_pixels,
)
from tests.helpers import dicom_film, encode, radiograph

SIZE = 128  # the model input: films wider than 4 x 256 px decode at 1/4 of their size
FILM = (1200, 1100)  # width, height of the test films
# The tolerance: grey levels (0-255) between the pixels of the reduced and the full decode, after the
# whole preprocessing (trimming, resize to SIZE). Measured on these films (2026-12-06): mean <= 0.23,
# 99th percentile <= 1, largest 2; the bundle's films and a model's predictions: benchmarks/serve.py.
MEAN_LEVELS, P99_LEVELS = 0.5, 2.0


def full_decode_pixels(data: bytes, preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING) -> np.ndarray:
    """Today's path: the whole film decoded, then the same preprocessing."""
    return preprocess_decoded(decode_image(data), SIZE, preprocessing)


def film(seed: int) -> Image.Image:
    return radiograph(seed, size=FILM)


def jpeg(kind: str, seed: int) -> bytes:
    grey = film(seed)
    if kind == "grey":
        return encode(grey, "JPEG", quality=90)
    if kind == "rgb":
        return encode(grey.convert("RGB"), "JPEG", quality=90)
    if kind == "cmyk":
        return encode(grey.convert("RGB").convert("CMYK"), "JPEG", quality=90)
    if kind == "progressive":
        return encode(grey, "JPEG", quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: a viewer rotates it 90 degrees clockwise
    return encode(grey.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif)


@pytest.mark.parametrize("kind", ["grey", "rgb", "cmyk", "progressive", "exif-rotated"])
@pytest.mark.parametrize("trim", [True, False])
def test_a_jpeg_decoded_at_a_reduced_scale_gives_the_full_decode_pixels_within_tolerance(kind, trim):
    preprocessing = PreprocessConfig(trim_borders=trim)
    for seed in range(3):
        data = jpeg(kind, seed)
        whole = decode_image(data)
        reduced = decode_image(data, min_side=decode_side(SIZE, preprocessing))
        assert max(reduced.image.size) * 4 <= max(whole.image.size) + 4  # decoded at 1/4 of the file
        assert (reduced.width, reduced.height) == (whole.width, whole.height) == FILM  # the file's size
        assert reduced.image.size[0] > reduced.image.size[1]  # oriented as a viewer shows it
        difference = np.abs(
            preprocess_pixels(data, SIZE, preprocessing=preprocessing).astype(int)
            - full_decode_pixels(data, preprocessing).astype(int)
        )
        assert difference.mean() <= MEAN_LEVELS and np.percentile(difference, 99) <= P99_LEVELS, (
            kind,
            seed,
            difference.mean(),
            np.percentile(difference, 99),
        )


@pytest.mark.parametrize("kind", ["png", "png16", "dicom"])
def test_png_and_dicom_films_are_decoded_whole_with_today_s_pixels(kind):
    grey = film(7)
    if kind == "png":
        data = encode(grey, "PNG")
    elif kind == "png16":
        data = encode(Image.fromarray(np.asarray(grey, dtype=np.uint16) * 16), "PNG")
    else:
        data = dicom_film(grey)
    decoded = decode_image(data, min_side=decode_side(SIZE))
    assert decoded.image.size == FILM and (decoded.width, decoded.height) == FILM
    assert np.array_equal(preprocess_pixels(data, SIZE), full_decode_pixels(data))


def test_a_small_jpeg_and_lung_preprocessing_decode_the_whole_film():
    small = encode(radiograph(3, size=(300, 280)), "JPEG", quality=90)  # under 2 x decode_side
    assert decode_image(small, min_side=decode_side(SIZE)).image.size == (300, 280)
    assert np.array_equal(preprocess_pixels(small, SIZE), full_decode_pixels(small))
    assert decode_side(SIZE, PreprocessConfig(lungs="crop")) is None


def test_a_near_square_film_turned_by_exif_reports_the_file_s_sides():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter
    turned = radiograph(5, size=(1200, 1197)).transpose(Image.Transpose.ROTATE_90)  # stored 1197 x 1200
    data = encode(turned, "JPEG", quality=90, exif=exif)
    reduced = decode_image(data, min_side=decode_side(SIZE))
    assert reduced.image.size == (300, 300)  # 1/4 scale rounds both sides to 300: sizes cannot tell
    whole = decode_image(data)
    assert (reduced.width, reduced.height) == (whole.width, whole.height) == (1200, 1197)


# -- the fingerprint's decode (lxn_ray.dedupe.fingerprint.fingerprint_film) ------------------------------
BIG = (2600, 2200)  # over 2 x the fingerprint's 1024 px: decoded at 1/2


@pytest.mark.parametrize("kind", ["grey", "rgb", "exif-rotated"])
def test_a_large_jpeg_is_fingerprinted_from_a_reduced_decode_as_from_the_whole_film(kind):
    from lxn_ray.dedupe.fingerprint import THUMB_SIZE, fingerprint, fingerprint_film, hamming
    from lxn_ray.dedupe.verify import verify_pair
    from lxn_ray.images.decode import to_grayscale

    grey = radiograph(11, size=BIG)
    framed = Image.new("L", (BIG[0] + 200, BIG[1]), 0)  # a black band on the left: trim_box is tested
    framed.paste(grey, (200, 0))
    if kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        data = encode(framed.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif)
    else:
        data = encode(framed.convert("RGB") if kind == "rgb" else framed, "JPEG", quality=90)
    decoded, scaled = fingerprint_film(data)
    whole = decode_image(data)
    full = fingerprint(to_grayscale(whole.image))  # how ingest fingerprinted it before: the whole film
    assert decoded.image.size == (1400, 1100)  # 1/2 of the file: keeps the 1024 px the fingerprint reads
    assert (scaled["width"], scaled["height"]) == (full["width"], full["height"]) == framed.size
    left, top, right, bottom = (int(v) for v in str(scaled["trim_box"]).split(","))
    # in the file's pixels, to the work image's 3 px
    assert abs(left - 200) <= 4 and top == 0 and right == framed.width and bottom == framed.height
    thumbs = [np.frombuffer(fp["thumb"], np.uint8).reshape(THUMB_SIZE, THUMB_SIZE) for fp in (scaled, full)]
    assert np.abs(thumbs[0].astype(int) - thumbs[1].astype(int)).mean() <= 1.0
    assert hamming(int(str(scaled["phash"]), 16), int(str(full["phash"]), 16)) <= 4
    assert verify_pair(scaled, full) <= 0.002  # the same film (max_residual: 0.012)


def test_the_fingerprint_of_a_png_or_a_small_jpeg_is_the_whole_film_s():
    from lxn_ray.dedupe.fingerprint import fingerprint, fingerprint_film
    from lxn_ray.images.decode import to_grayscale

    for data in (encode(radiograph(12, size=BIG), "PNG"), encode(radiograph(13, size=(1900, 1500)), "JPEG")):
        decoded, scaled = fingerprint_film(data)
        assert decoded.image.size == (decoded.width, decoded.height)  # decoded whole
        assert scaled == fingerprint(to_grayscale(decode_image(data).image))
