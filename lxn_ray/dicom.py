"""DICOM chest radiographs, read with pydicom: the few header fields lxn_ray uses, and the film as a viewer
shows it.

What a film is here: a single-frame CR or DX image (DICOM PS3.3 A.2 and A.26) of the chest, 8-16 bits
per pixel, grayscale (``MONOCHROME1`` or ``MONOCHROME2``) or, for digitised films, RGB. Anything else -
a multi-frame object, a structured report without pixels, a CT slice, a hand - is refused with a reason
(:class:`UnsupportedDicom`), so serving answers a clear 4xx and ingest records an exclusion.

Rendering follows the standard's grayscale pipeline (PS3.4 N.2.1): stored values -> Modality LUT (Rescale
Slope/Intercept or a Modality LUT Sequence) -> VOI LUT (the first VOI LUT Sequence item, else the first
Window Center/Width, with the VOI LUT Function) -> the display range, inverted for ``MONOCHROME1`` (where
low values are white). The VOI output range is mapped onto 0-255: ``[0, 2**n - 1]`` for a VOI LUT of n
bits, the window's output range for a window (PS3.3 C.11.2.1.2). A film with neither is mapped by its
own minimum and maximum, as viewers do - except 8-bit films, which are shown as stored, so an 8-bit film
and its PNG twin give the same pixels.

Protected health information: :func:`read_header` returns only the fields below; nothing else of the
header leaves this module, and no field is ever logged. Compressed transfer syntaxes decode through
pydicom's plugins (pylibjpeg: JPEG, JPEG-LS lossless via libjpeg, JPEG 2000, RLE); a syntax none of them
decodes is refused as unsupported.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lxn_ray.imaging import DecodedImage, ImageLimits, ImageRejected

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DEFAULT_LIMITS = ImageLimits()
PREAMBLE_BYTES = 128  # the magic "DICM" follows a 128-byte preamble (PS3.10 7.1)
MAGIC = b"DICM"
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})  # computed and digital radiography (PS3.3 C.7.3.1.1.1)
# Body Part Examined is optional (type 3); when a film states one it must be the chest. Defined term
# CHEST (PS3.16 CID 4031), plus spellings seen in exports.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "PORT CHEST", "CHEST_LAT", "CHEST PA", "CHEST AP"})
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"})
HEADER_TAGS = (
    "PatientID",
    "ViewPosition",
    "Modality",
    "BodyPartExamined",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
)

# Refusal reasons, as they appear in ingest exclusions and the endpoint's metrics.
NOT_RADIOGRAPH = "not_chest_radiograph"
MULTI_FRAME = "multi_frame"
NO_PIXELS = "no_pixel_data"
UNSUPPORTED_PIXELS = "unsupported_pixels"


class UnsupportedDicom(ImageRejected):
    """A readable DICOM object that is not a film lxn_ray classifies; ``reason`` is one of the constants
    above. The endpoint answers 422 for it, ingest excludes the file with the reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DicomHeader:
    """The only header fields lxn_ray reads (every other field, names and dates included, is ignored).

    ``patient_id`` is the raw Patient ID: ingest replaces it by a salted hash before anything is stored.
    """

    patient_id: str
    view: str  # View Position: PA, AP, LL, ...
    modality: str
    body_part: str
    rows: int
    columns: int
    frames: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    samples_per_pixel: int
    has_pixels: bool


def is_dicom(data: bytes) -> bool:
    """True when ``data`` starts with a DICOM Part 10 preamble and the ``DICM`` magic number."""
    return data[PREAMBLE_BYTES : PREAMBLE_BYTES + len(MAGIC)] == MAGIC


def _dataset(data: bytes, stop_before_pixels: bool) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings can quote header values
    if not is_dicom(data):
        raise ImageRejected("not a DICOM file (no DICM magic number after the 128-byte preamble)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ImageRejected(f"corrupt DICOM file: {type(error).__name__}") from None
    if "SOPClassUID" not in ds:  # type 1 in every IOD: a file cut short in its header lacks it
        raise ImageRejected("corrupt DICOM file: no SOP Class UID (truncated?)")
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return " ".join(str(value).split()) if value is not None else ""


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def header_of(ds: Dataset, has_pixels: bool | None = None) -> DicomHeader:
    """The :class:`DicomHeader` of a parsed dataset."""
    return DicomHeader(
        patient_id=_text(ds, "PatientID"),
        view=_text(ds, "ViewPosition"),
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        frames=_int(ds, "NumberOfFrames", 1),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        bits_allocated=_int(ds, "BitsAllocated", 0),
        bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated", 0)),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        has_pixels=("PixelData" in ds) if has_pixels is None else has_pixels,
    )


def read_header(data: bytes) -> DicomHeader:
    """The header fields of a DICOM file (``data`` may be only its first bytes, as long as they reach the
    pixel data or the end). Raises :class:`ImageRejected` for bytes that are not a readable DICOM file."""
    ds = _dataset(data, stop_before_pixels=True)
    # stop_before_pixels drops Pixel Data itself; its tag is known from the Rows the image module needs
    return header_of(ds, has_pixels=bool(ds.get("Rows")))


def refusal(header: DicomHeader) -> UnsupportedDicom | None:
    """Why this object is not a film lxn_ray classifies, or None when it is one."""
    if not header.has_pixels or header.rows < 1 or header.columns < 1:
        return UnsupportedDicom(NO_PIXELS, "DICOM object without image pixel data")
    if header.frames != 1:
        return UnsupportedDicom(MULTI_FRAME, f"multi-frame DICOM ({header.frames} frames): send one film")
    if header.modality not in RADIOGRAPH_MODALITIES:
        return UnsupportedDicom(
            NOT_RADIOGRAPH,
            f"modality {header.modality or '(none)'}: only CR and DX radiographs are classified",
        )
    if header.body_part and header.body_part not in CHEST_BODY_PARTS:
        return UnsupportedDicom(
            NOT_RADIOGRAPH, f"body part {header.body_part}: only chest films are classified"
        )
    grayscale = header.photometric in GRAYSCALE and header.samples_per_pixel == 1
    colour = header.photometric in COLOUR and header.samples_per_pixel == 3
    if not (grayscale or colour) or header.bits_allocated not in (8, 16) or not 1 <= header.bits_stored <= 16:
        return UnsupportedDicom(
            UNSUPPORTED_PIXELS,
            f"{header.photometric or 'no photometric interpretation'} with {header.bits_allocated}-bit "
            "pixels: films are MONOCHROME1/2 (or RGB) with 8-16 bits",
        )
    return None


def _voi_range(ds: Dataset, values: np.ndarray) -> tuple[float, float, bool]:
    """``(low, high, applied)``: the display range of the VOI stage's output, and whether a VOI applied."""
    from pydicom.pixels import apply_voi_lut

    sequence = ds.get("VOILUTSequence")
    if sequence:
        bits = int(sequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1), True
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # The window's output range depends on bits stored, sign and rescale (PS3.3 C.11.2.1.2): take it
        # from pydicom's own windowing of two extreme inputs, which it clips to that range.
        extremes = apply_voi_lut(np.array([-1e12, 1e12]), ds)
        return float(extremes.min()), float(extremes.max()), True
    return float(values.min()), float(values.max()), False


def decode(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> DecodedImage:
    """The film in ``data`` as an 8-bit image ("L", or "RGB" for colour films), as a viewer shows it.

    Raises :class:`UnsupportedDicom` (a DICOM object that is not a chest film) or :class:`ImageRejected`
    (not DICOM, corrupt, over ``limits``, or compressed in a syntax no installed plugin decodes). The
    pixel cap is checked from Rows x Columns before any pixel is decoded.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if len(data) > limits.max_file_bytes:
        raise ImageRejected(f"file is {len(data)} bytes, over the {limits.max_file_bytes}-byte cap")
    ds = _dataset(data, stop_before_pixels=False)
    header = header_of(ds)
    if (problem := refusal(header)) is not None:
        raise problem
    if header.rows * header.columns > limits.max_pixels:
        raise ImageRejected(
            f"image is {header.columns}x{header.rows} pixels, over the {limits.max_pixels}-pixel cap"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array  # colour films come back as RGB
    except (NotImplementedError, RuntimeError) as error:  # no plugin decodes this transfer syntax
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageRejected(f"DICOM pixel data in {name} cannot be decoded here ({error})"[:300]) from None
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as error:
        raise ImageRejected(f"corrupt DICOM pixel data: {type(error).__name__}") from None
    if stored.shape[:2] != (header.rows, header.columns):
        raise ImageRejected(f"corrupt DICOM pixel data: shape {stored.shape}")
    if header.samples_per_pixel == 3:
        image = np.asarray(stored, dtype=np.uint8) if header.bits_allocated == 8 else None
        if image is None:
            raise UnsupportedDicom(UNSUPPORTED_PIXELS, "colour DICOM with more than 8 bits per sample")
        return DecodedImage(
            image=_pil(image, "RGB"),
            source_format="DICOM",
            source_mode=header.photometric,
            width=header.columns,
            height=header.rows,
        )
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if header.bits_stored <= 8 and "VOILUTSequence" not in ds and "WindowCenter" not in ds:
        low, high = 0.0, float(2**header.bits_stored - 1)  # shown as stored (see the module docstring)
    else:
        low, high, applied = _voi_range(ds, values)
        if applied:
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.clip((values - low) * scale, 0.0, 255.0)
    if header.photometric == "MONOCHROME1":  # low values are white (PS3.3 C.7.6.3.1.2)
        grey = 255.0 - grey
    return DecodedImage(
        image=_pil(np.rint(grey).astype(np.uint8), "L"),
        source_format="DICOM",
        source_mode=f"{header.photometric} {header.bits_stored}-bit",
        width=header.columns,
        height=header.rows,
    )


def _pil(pixels: np.ndarray, mode: str):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)
