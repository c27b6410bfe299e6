"""DICOM films: decoded as a viewer shows them, refused with a reason when they are not chest films.

Every file is a real DICOM Part 10 file written by pydicom (tests.helpers.dicom_film) from a synthetic
radiograph, so each can be compared with its PNG twin pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import pytest

from lxn_ray.images import dicom
from lxn_ray.images.decode import ImageLimits, ImageRejected, decode_image, image_format
from tests.helpers import dicom_film, encode, radiograph

FILM = radiograph(3, (96, 112))
TWIN = np.asarray(FILM).astype(int)  # what the PNG twin decodes to


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"photometric": "MONOCHROME1"},
        {"bits": 16},
        {"bits": 16, "photometric": "MONOCHROME1"},
        {"bits": 16, "rescale": (2.0, -1024.0)},
        {"compression": "rle"},
        {"bits": 16, "photometric": "MONOCHROME1", "compression": "jpeg2000"},
    ],
    ids=[
        "8bit-mono2",
        "8bit-mono1",
        "12bit-window",
        "12bit-mono1",
        "signed-rescale",
        "rle",
        "jpeg2000-mono1",
    ],
)
def test_a_film_decodes_to_its_png_twins_pixels(options):
    decoded = decode_image(dicom_film(FILM, **options))
    assert decoded.source_format == "DICOM"
    assert decoded.image.mode == "L" and decoded.image.size == FILM.size
    assert np.abs(np.asarray(decoded.image).astype(int) - TWIN).max() == 0
    assert decode_image(encode(FILM, "PNG")).image.tobytes() == decoded.image.tobytes()


def test_a_film_without_a_window_is_shown_by_its_own_range():
    decoded = np.asarray(decode_image(dicom_film(FILM, bits=16, window=False)).image)
    assert decoded.min() == 0 and decoded.max() == 255  # stretched, as viewers do
    assert np.corrcoef(decoded.ravel(), TWIN.ravel())[0, 1] > 0.999


def test_the_format_is_told_by_the_magic_number_not_the_name():
    assert image_format(encode(FILM, "PNG")) == "PNG"
    assert image_format(encode(FILM, "JPEG")) == "JPEG"
    assert image_format(dicom_film(FILM)) == "DICOM"
    assert image_format(b"%PDF-1.7 ...") is None
    assert image_format(b"\0" * 128 + b"DICX" + b"\0" * 64) is None


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"frames": 2}, dicom.MULTI_FRAME),
        ({"modality": "CT"}, dicom.NOT_RADIOGRAPH),
        ({"body_part": "HAND"}, dicom.NOT_RADIOGRAPH),
    ],
    ids=["multi-frame", "ct", "hand"],
)
def test_objects_that_are_not_chest_films_are_refused_with_a_reason(options, reason):
    with pytest.raises(dicom.UnsupportedDicom) as caught:
        decode_image(dicom_film(FILM, **options))
    assert caught.value.reason == reason


def test_no_pixel_data_truncation_and_caps():
    data = dicom_film(FILM)
    header = dicom.read_header(data[:2048])  # the header alone is enough
    assert (header.patient_id, header.view, header.modality, header.rows) == ("MRN-0001", "PA", "DX", 112)
    with pytest.raises(ImageRejected, match="corrupt"):
        decode_image(data[: len(data) - 500])
    with pytest.raises(ImageRejected, match="pixel cap"):
        decode_image(data, ImageLimits(max_pixels=1000))
    with pytest.raises(ImageRejected, match="byte cap"):
        decode_image(data, ImageLimits(max_file_bytes=1000))


def test_a_dicom_object_without_pixels_is_refused():
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_film(FILM)))
    del ds.PixelData
    for keyword in ("Rows", "Columns"):
        delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(dicom.UnsupportedDicom) as caught:
        decode_image(buffer.getvalue())
    assert caught.value.reason == dicom.NO_PIXELS


def _edited(data: bytes, syntax: str | None = None, **fields) -> bytes:
    """``data`` parsed, given ``fields`` (keyword -> value) and the transfer ``syntax``, written again."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    if syntax:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_hostile_files_are_refused_before_they_cost_memory():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    # Deflate: a small file can inflate without bound before any check, so the syntax is refused
    deflated = _edited(dicom_film(FILM), syntax=DeflatedExplicitVRLittleEndian)  # pydicom deflates it
    with pytest.raises(ImageRejected, match="not decoded here"):
        decode_image(deflated)
    # a JPEG 2000 codestream of 96x112 behind a header claiming 16x16: refused before decoding
    liar = _edited(dicom_film(FILM, bits=16, compression="jpeg2000"), Rows=16, Columns=16)
    with pytest.raises(ImageRejected, match="codestream states"):
        decode_image(liar)


def test_malformed_windows_and_fields_never_leak_values_nor_crash():
    flat_width = decode_image(_edited(dicom_film(FILM, bits=16), WindowWidth=0))  # unusable: own range
    assert np.asarray(flat_width.image).max() == 255
    odd_function = decode_image(_edited(dicom_film(FILM, bits=16), VOILUTFunction="FOO"))  # as LINEAR
    assert np.abs(np.asarray(odd_function.image).astype(int) - TWIN).max() == 0
    inverse = decode_image(_edited(dicom_film(FILM), PresentationLUTShape="INVERSE"))
    assert np.abs(np.asarray(inverse.image).astype(int) - (255 - TWIN)).max() == 0
    # Patient ID re-labelled UL: pydicom's error quotes the bytes; ours names only the error's type
    wrong_vr = dicom_film(FILM, patient_id="MRN123").replace(b"\x10\x00\x20\x00LO", b"\x10\x00\x20\x00UL")
    with pytest.raises(ImageRejected) as caught:
        decode_image(wrong_vr)
    assert "MRN123" not in str(caught.value)


def test_a_header_past_the_first_256_kb_is_read_from_the_whole_file(tmp_path):
    from lxn_ray.sources.layouts import DICOM_HEADER_BYTES, _dicom_header
    from lxn_ray.sources.transports import FolderSource

    big = _edited(dicom_film(FILM), ImageComments="y" * (DICOM_HEADER_BYTES + 1000))  # (0020,4000)
    (tmp_path / "big.dcm").write_bytes(big)
    header = _dicom_header(FolderSource(tmp_path, marker=None).open(), "big.dcm")
    assert (header.rows, header.columns, header.has_pixels) == (112, 96, True)
