"""DICOM chest radiographs, read with pydicom: the few header fields lxn_ray uses, and the film as a viewer
shows it.

What a film is here: a single-frame CR or DX image (DICOM PS3.3 A.2 and A.26) of the chest, 8-16 bits
per pixel, grayscale (``MONOCHROME1`` or ``MONOCHROME2``) or, for digitised films, RGB. Anything else -
a multi-frame object, a structured report without pixels, a CT slice, a hand - is refused with a reason
(:class:`UnsupportedDicom`), so serving answers a clear 4xx and ingest records an exclusion.

Rendering follows the standard's grayscale pipeline (PS3.4 N.2.1): stored values -> Modality LUT (Rescale
Slope/Intercept, or a Modality LUT Sequence through pydicom) -> VOI LUT -> 0-255, inverted for
``MONOCHROME1`` or a Presentation LUT Shape ``INVERSE`` (low values white). The VOI stage is the first VOI
LUT Sequence item (its output range is taken from the LUT's data, as Cornerstone and Horos do: devices
declare 16 bits for 12-bit LUTs), else the first Window Center/Width with its VOI LUT Function (LINEAR,
LINEAR_EXACT or SIGMOID; PS3.3 C.11.2.1.2), applied here rather than by pydicom so that a malformed LUT or
window cannot wrap or overflow. A film with no usable VOI is mapped by its own minimum and maximum, as
viewers do - except unsigned 8-bit films without a rescale, shown as stored, so an 8-bit film and its
PNG twin give the same pixels.

Hostile files: the Deflate transfer syntax (a small file that inflates without bound before any check)
and syntaxes nothing here decodes are refused from the file meta information; a compressed image whose
codestream states another size than Rows x Columns is refused before decoding (the decoders allocate
for the codestream's size); any other failure inside pydicom is an :class:`ImageRejected` naming only
the exception's type, since pydicom's messages can quote header values.

Protected health information: :func:`read_header` returns only the fields below; nothing else of the
header leaves this module, and no field is ever logged. Compressed transfer syntaxes decode through
pydicom's plugins (pylibjpeg: JPEG, JPEG-LS lossless via libjpeg, JPEG 2000, RLE); a syntax none of them
decodes is refused as unsupported.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lxn_ray.images.types import DecodedImage, ImageLimits, ImageRejected

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DEFAULT_LIMITS = ImageLimits()
PREAMBLE_BYTES = 128  # the magic "DICM" follows a 128-byte preamble (PS3.10 7.1)
MAGIC = b"DICM"
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})  # computed and digital radiography (PS3.3 C.7.3.1.1.1)
# Body Part Examined is optional (type 3); when a film states one it must be the chest. Defined term
# CHEST (PS3.16 CID 4031), plus spellings seen in exports.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "PORT CHEST", "CHEST_LAT", "CHEST PA", "CHEST AP"})
# Transfer syntaxes decoded here: uncompressed, and the compressed ones pydicom's pylibjpeg plugins
# decode (PS3.5 Annex A). Deflate and video syntaxes are refused.
UNCOMPRESSED_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
JPEG_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.57",  # JPEG lossless
        "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    }
)
JPEG2000_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
RLE_SYNTAX = "1.2.840.10008.1.2.5"
DECODED_SYNTAXES = UNCOMPRESSED_SYNTAXES | JPEG_SYNTAXES | JPEG2000_SYNTAXES | {RLE_SYNTAX}
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"})
# Refusal reasons, as they appear in ingest exclusions and the endpoint's metrics.
NOT_RADIOGRAPH = "not_chest_radiograph"
MULTI_FRAME = "multi_frame"
NO_PIXELS = "no_pixel_data"
UNSUPPORTED_PIXELS = "unsupported_pixels"
BURNED_IN = "burned_in_annotation"  # ingest only: the pixels may show identifying text
REFUSALS = (NOT_RADIOGRAPH, MULTI_FRAME, NO_PIXELS, UNSUPPORTED_PIXELS, BURNED_IN)


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
    burned_in_annotation: bool = False  # Burned In Annotation YES: text (perhaps identifying) in the pixels


def is_dicom(data: bytes) -> bool:
    """True when ``data`` starts with a DICOM Part 10 preamble and the ``DICM`` magic number."""
    return data[PREAMBLE_BYTES : PREAMBLE_BYTES + len(MAGIC)] == MAGIC


def transfer_syntax(data: bytes) -> str | None:
    """The Transfer Syntax UID (0002,0010) from the file meta information, read without pydicom.

    pydicom's public reader inflates a Deflate dataset whole before anything can be checked, and its
    meta-information reader is private; group 0002 is always explicit VR little endian (PS3.10 7.1),
    so a few lines read it. None when the element is absent or the group is malformed."""
    offset = PREAMBLE_BYTES + len(MAGIC)
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            return None
        if data[offset + 4 : offset + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if offset + 12 > len(data):
                return None
            (length,), start = struct.unpack_from("<I", data, offset + 8), offset + 12
        else:
            (length,), start = struct.unpack_from("<H", data, offset + 6), offset + 8
        if element == 0x0010:
            return data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = start + length
    return None


def _dataset(data: bytes, stop_before_pixels: bool) -> Dataset:
    """``data`` parsed (see :func:`_parse`)."""
    return _parse(data, stop_before_pixels)[0]


def _parse(data: bytes, stop_before_pixels: bool) -> tuple[Dataset, int]:
    """``data`` parsed, and the offset where parsing stopped: Pixel Data's tag with ``stop_before_pixels``,
    else the end. Raises :class:`ImageRejected` for bytes that are not a DICOM file read here."""
    import pydicom

    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings can quote header values
    if not is_dicom(data):
        raise ImageRejected("not a DICOM file (no DICM magic number after the 128-byte preamble)")
    syntax = transfer_syntax(data)
    if syntax is None:
        raise ImageRejected("corrupt DICOM file: no transfer syntax in its file meta information")
    if syntax not in DECODED_SYNTAXES:
        raise ImageRejected(f"DICOM transfer syntax {syntax} is not decoded here")
    stream = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(stream, stop_before_pixels=stop_before_pixels)
    except Exception as error:  # pydicom raises many kinds; the type only: messages can quote values
        raise ImageRejected(f"corrupt DICOM file: {type(error).__name__}") from None
    if "SOPClassUID" not in ds:  # type 1 in every IOD: a file cut short in its header lacks it
        raise ImageRejected("corrupt DICOM file: no SOP Class UID (truncated?)")
    return ds, stream.tell()


PIXEL_DATA_TAG = (0x7FE0, 0x0010)
IMPLICIT_VR_SYNTAX = "1.2.840.10008.1.2"
BIG_ENDIAN_SYNTAX = "1.2.840.10008.1.2.2"


def _pixel_data_at(data: bytes, offset: int, syntax: str | None) -> bool:
    """Whether a Pixel Data element (7FE0,0010) with a value starts at ``offset`` of ``data``: its tag, then
    a length that is not 0 (undefined, 0xFFFFFFFF, for encapsulated pixels). False where ``data`` ends
    first. Element layout from PS3.5 7.1: tag, [VR, 2 reserved bytes,] 4-byte length for OB/OW."""
    order = ">" if syntax == BIG_ENDIAN_SYNTAX else "<"
    start = offset + (4 if syntax == IMPLICIT_VR_SYNTAX else 8)
    if start + 4 > len(data) or struct.unpack_from(f"{order}HH", data, offset) != PIXEL_DATA_TAG:
        return False
    return struct.unpack_from(f"{order}I", data, start)[0] != 0


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return " ".join(str(value).split()) if value is not None else ""


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    return int(value) if value not in (None, "") else default


def _float(ds: Dataset, keyword: str, index: int = 0) -> float | None:
    """The (first) numeric value of ``keyword``; None when absent, empty or not finite."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        value = list(value)[index] if len(value) > index else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def header_of(ds: Dataset, has_pixels: bool | None = None) -> DicomHeader:
    """The :class:`DicomHeader` of a parsed dataset. Raises :class:`ImageRejected` for malformed fields."""
    try:
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
            has_pixels=bool(ds.get("PixelData")) if has_pixels is None else has_pixels,
            burned_in_annotation=_text(ds, "BurnedInAnnotation").upper() == "YES",
        )
    except Exception as error:  # a field of the wrong VR or length: the type only, never the value
        raise ImageRejected(f"corrupt DICOM header: {type(error).__name__}") from None


def read_header(data: bytes) -> DicomHeader:
    """The header fields of a DICOM file, read without its pixels.

    ``has_pixels`` is whether a Pixel Data element with a value follows the header in ``data``: an object
    without one (a header-only export, a structured report) holds no film and is refused as
    ``no_pixel_data`` by :func:`refusal`, whatever its Rows and Columns say. ``data`` may be only the
    file's first bytes: a prefix that ends before Pixel Data reads as having none, so a caller holding a
    prefix reads the whole file when ``has_pixels`` is False. Raises :class:`ImageRejected` for bytes that
    are not a readable DICOM file."""
    ds, stopped_at = _parse(data, stop_before_pixels=True)
    return header_of(ds, has_pixels=_pixel_data_at(data, stopped_at, transfer_syntax(data)))


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
    colour = header.photometric in COLOUR and header.samples_per_pixel == 3 and header.bits_allocated == 8
    if not (grayscale or colour) or header.bits_allocated not in (8, 16) or not 1 <= header.bits_stored <= 16:
        return UnsupportedDicom(
            UNSUPPORTED_PIXELS,
            f"{header.photometric or 'no photometric interpretation'} with {header.bits_allocated}-bit "
            "pixels: films are MONOCHROME1/2 with 8-16 bits, or 8-bit RGB",
        )
    return None


def _codestream_size(fragment: bytes, syntax: str) -> tuple[int, int] | None:
    """(columns, rows) stated by a compressed frame: a JPEG / JPEG-LS start-of-frame marker (ITU T.81
    B.2.2, T.87) or a JPEG 2000 SIZ segment (ITU T.800 A.5.1); None when none is found."""
    if syntax in JPEG2000_SYNTAXES:
        at = fragment.find(b"\xff\x51")  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz
        if at < 0 or at + 22 > len(fragment):
            return None
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", fragment, at + 6)
        return xsiz - xosiz, ysiz - yosiz
    offset = 2  # after SOI
    while offset + 4 <= len(fragment):
        if fragment[offset] != 0xFF:
            return None
        marker = fragment[offset + 1]
        (length,) = struct.unpack_from(">H", fragment, offset + 2)
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            if offset + 9 > len(fragment):
                return None
            rows, columns = struct.unpack_from(">HH", fragment, offset + 5)
            return columns, rows
        offset += 2 + length
    return None


def _check_codestream(ds: Dataset, header: DicomHeader) -> None:
    """Refuse a compressed film whose codestream states another size than the header's Rows x Columns."""
    from pydicom.encaps import get_frame

    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax not in JPEG_SYNTAXES | JPEG2000_SYNTAXES:
        return  # uncompressed and RLE data are sized by the header itself
    size = _codestream_size(get_frame(ds.PixelData, 0, number_of_frames=1)[:65536], syntax)
    if size != (header.columns, header.rows):
        raise ImageRejected(
            f"corrupt DICOM pixel data: its codestream states {size}, "
            f"its header {header.columns}x{header.rows}"
        )


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first window (PS3.3 C.11.2.1.2.1-3) applied, in [0, 1]; None without a usable window."""
    center, width = _float(ds, "WindowCenter"), _float(ds, "WindowWidth")
    function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
    if center is None or width is None:
        return None
    if function == "SIGMOID" and width > 0:
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width >= 1:  # LINEAR, and any function this does not know
        return np.clip((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)
    return None


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first VOI LUT Sequence item applied, in [0, 1] over the LUT data's own range; None without a
    usable one."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    raw = item.LUTData
    lut = np.asarray(
        raw if not isinstance(raw, (bytes, bytearray)) else np.frombuffer(raw, "<u2"), np.float32
    )
    lut = lut.ravel()[:entries]
    if lut.size < 2 or not np.isfinite(lut).all() or lut.max() <= lut.min():
        return None
    index = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.int64)
    return (lut[index] - lut.min()) / (lut.max() - lut.min())


def _modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values through the Modality LUT: Rescale Slope/Intercept, or a Modality LUT Sequence."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    slope, intercept = _float(ds, "RescaleSlope"), _float(ds, "RescaleIntercept")
    values = stored.astype(np.float32)
    if slope is not None and slope != 0:
        values *= slope
    if intercept is not None:
        values += intercept
    return values


def _display(stored: np.ndarray, ds: Dataset, header: DicomHeader) -> np.ndarray:
    """(rows, columns) uint8: the grayscale pipeline of the module docstring."""
    as_stored = (
        header.bits_stored <= 8
        and _int(ds, "PixelRepresentation", 0) == 0
        and _float(ds, "RescaleSlope") in (None, 1.0)
        and _float(ds, "RescaleIntercept") in (None, 0.0)
        and not ds.get("ModalityLUTSequence")
        and not ds.get("VOILUTSequence")
        and "WindowCenter" not in ds
    )
    if as_stored:
        grey = stored.astype(np.float32) / float(2**header.bits_stored - 1)
    else:
        values = _modality(stored, ds)
        grey = _voi_lut(values, ds)
        if grey is None:
            grey = _window(values, ds)
        if grey is None:
            low, high = float(values.min()), float(values.max())
            grey = (values - low) / (high - low) if high > low else np.zeros_like(values)
    inverse = header.photometric == "MONOCHROME1" or _text(ds, "PresentationLUTShape").upper() == "INVERSE"
    if inverse:
        grey = 1.0 - grey
    return np.rint(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)


def decode(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> DecodedImage:
    """The film in ``data`` as an 8-bit image ("L", or "RGB" for colour films), as a viewer shows it.

    Raises :class:`UnsupportedDicom` (a DICOM object that is not a chest film) or :class:`ImageRejected`
    (not DICOM, corrupt, over ``limits``, or in a transfer syntax not decoded here). The pixel cap is
    checked from Rows x Columns, and from a compressed codestream's own size, before any pixel is decoded.
    """
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
        _check_codestream(ds, header)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = np.asarray(ds.pixel_array)  # colour films come back as RGB
        if stored.shape[:2] != (header.rows, header.columns):
            raise ImageRejected(f"corrupt DICOM pixel data: shape {stored.shape}")
        if header.samples_per_pixel == 3:
            image, mode = np.asarray(stored, dtype=np.uint8), "RGB"
        else:
            image, mode = _display(stored, ds, header), "L"
    except ImageRejected:
        raise
    except Exception as error:  # decoders and LUTs fail in many ways; the type only (values are PHI)
        raise ImageRejected(f"corrupt or undecodable DICOM pixel data: {type(error).__name__}") from None
    return DecodedImage(
        image=_pil(image, mode),
        source_format="DICOM",
        source_mode=f"{header.photometric} {header.bits_stored}-bit",
        width=header.columns,
        height=header.rows,
    )


def _pil(pixels: np.ndarray, mode: str):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)
