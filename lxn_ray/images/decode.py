"""Safe decoding of untrusted radiograph files into plain 8-bit images.

Every image lxn_ray touches (ingest, training, serving) is decoded here, so the guards live in one place:
size caps checked from the header *before* pixels are decoded (decompression bombs), truncated and
empty files, non-images with image names, and formats outside PNG, JPEG and DICOM. The format is decided
by the file's magic number (:func:`image_format`), never by its name or a declared content type. Decoding
also normalises the many shapes of the data: PNG in L/LA/RGB/RGBA/P and 16-bit, JPEG in L/RGB/CMYK, EXIF
orientation, and DICOM films rendered as a viewer shows them (:mod:`lxn_ray.images.dicom`).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

from lxn_ray.images.types import NOT_AN_IMAGE, DecodedImage, ImageLimits, ImageRejected

# Magic numbers: PNG's 8-byte signature (RFC 2083 3.1), JPEG's SOI marker followed by a marker's 0xFF
# (ITU T.81 B.1.1.2), DICOM's "DICM" after a 128-byte preamble (PS3.10 7.1).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# EXIF's orientation tag (0x0112; EXIF 2.32, 4.6.4 A): values 5-8 turn the image a quarter (sides swap).
EXIF_ORIENTATION, QUARTER_TURNS = 0x0112, frozenset({5, 6, 7, 8})


def image_format(data: bytes) -> str | None:
    """ "PNG", "JPEG" or "DICOM" from the first bytes of ``data`` (its magic number), else None."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(JPEG_SIGNATURE):
        return "JPEG"
    from lxn_ray.images.dicom import is_dicom

    return "DICOM" if is_dicom(data) else None


DEFAULT_LIMITS = ImageLimits()


def decode_image(
    data: bytes,
    limits: ImageLimits = DEFAULT_LIMITS,
    min_side: int | None = None,
    min_long_side: int | None = None,
) -> DecodedImage:
    """Decode ``data`` (PNG, JPEG or DICOM, told by its magic number) or raise :class:`ImageRejected` -
    never anything else for bad input. DICOM objects that are not chest films raise its subclass
    :class:`lxn_ray.images.dicom.UnsupportedDicom`.

    ``min_side`` (pixels): the caller needs no more than this on the shorter side; ``min_long_side``: no
    more than this on the longer side (and the shorter in proportion). A JPEG is then decoded at the
    smallest of libjpeg's DCT scales 1/1, 1/2, 1/4 and 1/8 that keeps that much (:func:`draft_size`;
    Pillow's ``Image.draft``: the inverse DCT computes the reduced image directly, an area average, at a
    fraction of a full decode's cost); ``width`` and ``height`` stay the file's. PNG and DICOM are decoded
    whole (neither format has a reduced decode)."""
    if not data:
        raise ImageRejected("empty file")
    if len(data) > limits.max_file_bytes:
        raise ImageRejected(f"file is {len(data)} bytes, over the {limits.max_file_bytes}-byte cap")
    kind = image_format(data)
    if kind is None:
        raise ImageRejected(NOT_AN_IMAGE)
    if kind == "DICOM":
        from lxn_ray.images.dicom import decode

        return decode(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageRejected(
                    f"image is {width}x{height} pixels, over the {limits.max_pixels}-pixel cap"
                )
            source_format, source_mode = image.format or "?", image.mode
            if reduces(kind, width, height, min_side, min_long_side):
                image.draft(image.mode, draft_size(width, height, min_side, min_long_side))
            image.load()  # truncated files fail here, not later in a training job
            if image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS:  # the file's sides swap too
                width, height = height, width
            image = ImageOps.exif_transpose(image)
    except ImageRejected:
        raise
    except Image.UnidentifiedImageError:
        raise ImageRejected(f"corrupt {kind} file: not decodable") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(f"decompression bomb: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:  # PIL reports truncation and corruption so
        raise ImageRejected(f"corrupt image: {error}") from None
    return DecodedImage(
        image=_to_8bit(image),
        source_format=source_format,
        source_mode=source_mode,
        width=width,
        height=height,
    )


def draft_size(
    width: int, height: int, min_side: int | None = None, min_long_side: int | None = None
) -> tuple[int, int] | None:
    """The least (width, height) in pixels a reduced decode of a ``width`` x ``height`` film must keep: both
    sides at least ``min_side``, the longer at least ``min_long_side`` and the shorter in proportion to it;
    None when neither is asked (the whole film)."""
    need_w = need_h = min_side or 0
    if min_long_side:
        longer = max(width, height)
        need_w = max(need_w, math.ceil(width * min_long_side / longer))
        need_h = max(need_h, math.ceil(height * min_long_side / longer))
    return (need_w, need_h) if need_w and need_h else None


def reduces(
    source_format: str, width: int, height: int, min_side: int | None, min_long_side: int | None = None
) -> bool:
    """Whether :func:`decode_image` decodes a film of ``width`` x ``height`` pixels at a reduced scale for
    ``min_side`` and ``min_long_side``: a JPEG (``source_format`` as :func:`image_format` tells it - Pillow
    calls a multi-picture JPEG "MPO") at least twice its :func:`draft_size` on both sides (libjpeg's
    largest scale is 1/2; Pillow's ``draft`` picks the smallest scale that keeps the size asked)."""
    size = draft_size(width, height, min_side, min_long_side)
    return size is not None and source_format == "JPEG" and width >= 2 * size[0] and height >= 2 * size[1]


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring any decoded mode to "L" or "RGB" with 8 bits per channel.

    16-bit grayscale is scaled by its own range: radiographs stored as 16-bit often use 10-12 bits,
    and a fixed ``>> 8`` would leave them nearly black. Transparency is flattened onto black, the
    background of a radiograph.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((pixels - low) * scale).round().astype(np.uint8), mode="L")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode == "1":
        return image.convert("L")
    has_alpha = image.mode in ("LA", "RGBA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, ...


def to_grayscale(image: Image.Image) -> Image.Image:
    """The single-channel view used for hashing and duplicate checks."""
    return image if image.mode == "L" else image.convert("L")
