"""Safe decoding: odd but valid formats decode; hostile bytes are rejected with a reason."""

import numpy as np
import pytest
from PIL import Image

from lxn_ray.images.decode import ImageLimits, ImageRejected, decode_image
from tests.helpers import encode, huge_png


def test_sixteen_bit_png_is_scaled_by_its_range():
    pixels = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12 bits used
    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"))
    array = np.asarray(decoded.image)
    assert decoded.image.mode == "L" and decoded.source_mode.startswith("I")
    assert array.min() == 0 and array.max() == 255


def test_cmyk_jpeg_and_rgba_png_decode_to_rgb():
    cmyk = decode_image(encode(Image.new("CMYK", (40, 30), (0, 0, 0, 100)), "JPEG"))
    assert cmyk.image.mode == "RGB" and cmyk.source_mode == "CMYK" and cmyk.image.size == (40, 30)
    rgba = decode_image(encode(Image.new("RGBA", (20, 10), (200, 100, 50, 255)), "PNG"))
    assert rgba.image.mode == "RGB" and rgba.image.getpixel((0, 0)) == (200, 100, 50)


def test_exif_orientation_is_applied():
    image = Image.new("L", (60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif))
    assert decoded.image.size == (20, 60)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is a text file, not a picture\n", "not a PNG, JPEG or DICOM"),
        (encode(Image.new("L", (64, 64), 128), "JPEG")[:300], "corrupt"),
        (encode(Image.new("L", (8, 8)), "GIF"), "not a PNG, JPEG or DICOM"),
    ],
    ids=["empty", "text", "truncated-jpeg", "gif"],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        decode_image(data)


def test_pixel_cap_is_checked_before_decoding():
    with pytest.raises(ImageRejected, match="pixel|bomb"):
        decode_image(huge_png(20000, 20000))
    with pytest.raises(ImageRejected, match="pixel cap"):
        decode_image(encode(Image.new("L", (100, 100)), "PNG"), ImageLimits(max_pixels=5000))


def test_file_size_cap():
    with pytest.raises(ImageRejected, match="byte cap"):
        decode_image(encode(Image.new("L", (100, 100)), "PNG"), ImageLimits(max_file_bytes=10))
