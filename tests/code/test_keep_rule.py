"""The keep rule for copies of one film (lxn_ray.data.duplicates.keep_rank), on real encoded files: the
lossless, larger original is kept, never a lossy re-encode that merely sorts first by name."""

from __future__ import annotations

import hashlib

from lxn_ray.data.duplicates import keep_rank
from lxn_ray.data.fetch import SourceFile
from lxn_ray.images.decode import decode_image
from lxn_ray.sources.metadata import MetadataRow
from tests.helpers import encode, radiograph

FILM = radiograph(21, size=(96, 112))


def copy(filename: str, data: bytes, source: str = "archive") -> tuple[SourceFile, dict]:
    """A row's file as ingest knows it, and its fingerprint record's image facts (decoded for real)."""
    row = MetadataRow(
        line=1,
        filename=filename,
        folder="",
        patient_id="",
        finding="COVID-19",
        view="",
        modality="X-ray",
        source=source,
    )
    decoded = decode_image(data)
    record = {"width": decoded.width, "height": decoded.height, "source_format": decoded.source_format}
    return SourceFile(row, hashlib.sha256(data).hexdigest(), len(data)), record


def kept(*copies: tuple[SourceFile, dict], **options) -> str:
    return min(copies, key=lambda c: keep_rank(c[0], c[1], **options))[0].row.filename


def test_the_lossless_original_is_kept_over_a_lossy_copy_that_sorts_first():
    original = copy("b-original.png", encode(FILM, "PNG"))
    q80 = copy("a-copy.jpg", encode(FILM, "JPEG", quality=80))
    assert kept(q80, original) == kept(original, q80) == "b-original.png"


def test_more_pixels_then_more_bytes_win_at_equal_standing():
    original = copy("z.jpg", encode(FILM, "JPEG", quality=95))
    downscaled = copy("a.png", encode(FILM.resize((48, 56)), "PNG"))
    assert kept(downscaled, original) == "z.jpg"  # the original's pixels, though lossy
    q95 = copy("z95.jpg", encode(FILM, "JPEG", quality=95))
    q60 = copy("a60.jpg", encode(FILM, "JPEG", quality=60))
    assert kept(q60, q95) == "z95.jpg"  # the less compressed of two JPEGs


def test_a_published_copy_then_the_first_listed_source_come_before_the_original():
    original = copy("b-original.png", encode(FILM, "PNG"), source="republisher")
    q80 = copy("a-copy.jpg", encode(FILM, "JPEG", quality=80), source="curated")
    assert kept(original, q80, priority={"curated": 0, "republisher": 1}) == "a-copy.jpg"
    assert kept(original, q80, previous_shas=frozenset({q80[0].sha256})) == "a-copy.jpg"
