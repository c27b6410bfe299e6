"""What decoding produces and refuses: :class:`DecodedImage`, :class:`ImageLimits` and
:class:`ImageRejected`, shared by the PNG/JPEG decoder (:mod:`lxn_ray.images.decode`) and the DICOM
renderer (:mod:`lxn_ray.images.dicom`)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class ImageLimits:
    """Caps applied to every untrusted image."""

    max_file_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 50_000_000  # 50 megapixels; upstream's largest radiographs are ~20 MP


NOT_AN_IMAGE = "not a PNG, JPEG or DICOM file"


class ImageRejected(ValueError):
    """The bytes are not an image lxn_ray accepts; the message says why in a few words."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded radiograph and what it was before decoding."""

    image: Image.Image  # mode "L" or "RGB", 8 bits per channel, orientation applied; a JPEG decoded with
    # decode_image's min_side may be reduced (1/2, 1/4 or 1/8 of the file's size)
    source_format: str  # "PNG", "JPEG" or "DICOM"
    source_mode: str  # PIL mode of the file, e.g. "I;16", "CMYK", "RGBA"
    width: int  # the file's size in pixels, orientation applied (whatever size ``image`` was decoded at)
    height: int
