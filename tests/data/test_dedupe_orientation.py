"""Duplicates in other orientations (issue 24): a copy turned a quarter or a half turn, or printed as a
negative (grey scale inverted), is found like any other copy; serial films of one patient are not merged.

The films are real: NIH chest X-rays of the shared data's darkcovidnet folder (``../shared/data``), where
patient 00003140 has twelve follow-up films, two of them (003 and 004) taken with the same framing and
nearly the same content. Tests that need them skip, with the reason, where the folder is absent (a user's
clone of the project has no ../shared); the orientation algebra is checked on synthetic arrays.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.fingerprint import fingerprint
from lxn_ray.dedupe.index import VECTOR_SIDE, vectors_of
from lxn_ray.dedupe.orientation import (
    IDENTITY,
    MIRROR,
    ORIENTATIONS,
    describe,
    inverse,
    is_inverted,
    is_mirrored,
    orient_thumb,
    orient_vectors,
)
from lxn_ray.dedupe.search import find_duplicates, search_duplicates
from lxn_ray.dedupe.verify import VerifyChunk, verify_chunk, verify_pair

DARKCOVIDNET = Path(__file__).resolve().parents[3] / "shared" / "data" / "darkcovidnet"
#: An NIH patient with twelve follow-up films; the six used here hold its closest pairs (003 and 004: same
#: framing, the monitoring leads and the arm differ; 007 and 008; 005 and 006).
SERIAL_PATIENT = "00003140"
SERIAL_FILMS = tuple(f"{SERIAL_PATIENT}_{n:03d}.png" for n in range(3, 9))


def _nih(name: str) -> Image.Image:
    """A film of the darkcovidnet folder: ``name`` is ``FOLDER/FILE`` or a file of ``No_findings/``."""
    path = DARKCOVIDNET / (name if "/" in name else f"No_findings/{name}")
    if not path.exists():
        pytest.skip(f"real data absent: {path} (only the project's CI checkout has ../shared)")
    with Image.open(path) as im:
        return im.convert("L")


def _jpeg(img: Image.Image, quality: int = 80) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("L")


#: Republished copies in another orientation: (name, how the copy is made from the film, the orientation
#: in which the copy ``b`` matches the film ``a`` when the film's key sorts first).
ORIENTED_COPIES = {
    "quarter_cw": lambda im: _jpeg(im.transpose(Image.Transpose.ROTATE_270)),
    "quarter_ccw": lambda im: _jpeg(
        im.resize((300, 300), Image.Resampling.LANCZOS).transpose(Image.Transpose.ROTATE_90)
    ),
    "half_turn": lambda im: _jpeg(im.transpose(Image.Transpose.ROTATE_180), 60),
    "inverted": lambda im: _jpeg(ImageOps.invert(im)),
    "inverted_quarter": lambda im: _jpeg(ImageOps.invert(im.transpose(Image.Transpose.ROTATE_90))),
    "inverted_cropped": lambda im: _jpeg(ImageOps.invert(im.crop((20, 30, im.width - 10, im.height - 25)))),
}


def test_orientation_codes_form_the_group_of_the_square_with_polarity() -> None:
    thumb = np.random.default_rng(0).integers(0, 200, size=(16, 16), dtype=np.uint8)
    images = {orient_thumb(thumb, c).tobytes() for c in ORIENTATIONS}
    assert len(images) == 16  # all distinct
    for code in ORIENTATIONS:
        assert np.array_equal(orient_thumb(orient_thumb(thumb, code), inverse(code)), thumb)
    assert np.array_equal(orient_thumb(thumb, MIRROR), thumb[:, ::-1])
    assert np.array_equal(orient_thumb(thumb, 2), np.rot90(thumb))  # a quarter turn counter-clockwise
    assert np.array_equal(orient_thumb(thumb, 8), 255 - thumb)
    assert orient_thumb(thumb.astype(np.float32), 8).dtype == np.float32
    assert [c for c in ORIENTATIONS if is_mirrored(c)] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert [c for c in ORIENTATIONS if is_inverted(c)] == list(range(8, 16))
    assert describe(IDENTITY) == "identity"
    assert describe(14) == "turned 270+inverted"


def test_oriented_vectors_are_the_vectors_of_the_oriented_thumbnail() -> None:
    """Candidate search turns and negates the stored 8x8 vectors instead of recomputing them: the result
    must be what the turned/inverted thumbnail itself would give."""
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(128, 128)), axis=0), axis=1)
    thumb = np.clip((smooth - smooth.min()) / np.ptp(smooth) * 255, 0, 255).astype(np.uint8)
    whole, windows = vectors_of(thumb)
    oriented = orient_vectors(whole[None].astype(np.float32), VECTOR_SIDE)
    assert oriented.shape == (16, 1, 64)
    for code in ORIENTATIONS:
        direct = vectors_of(orient_thumb(thumb, code))[0].astype(np.float32)
        assert oriented[code, 0] == pytest.approx(direct, abs=2e-3), describe(code)


@pytest.fixture(scope="module")
def serial_fps() -> dict[str, dict[str, object]]:
    """Fingerprints of :data:`SERIAL_FILMS`, keyed by file name."""
    return {name: fingerprint(_nih(name)) for name in SERIAL_FILMS}


def test_copies_in_other_orientations_are_found(serial_fps) -> None:
    """Each copy is found with its film, in the orientation it was made in, among the patient's other
    serial films (the hard negatives), and the serial films are not merged with it or with each other."""
    film_name = f"{SERIAL_PATIENT}_003.png"
    film = _nih(film_name)
    new = {f"copy_{name}": fingerprint(make(film)) for name, make in ORIENTED_COPIES.items()}
    search = search_duplicates(serial_fps, new, within_new=False)
    found = {(p.a, p.b): p for p in search.pairs}
    assert set(found) == {(film_name, key) for key in new}  # nothing else: no serial film
    expected = {
        "quarter_cw": "turned 90",  # the copy, turned back a quarter turn counter-clockwise, is the film
        "quarter_ccw": "turned 270",
        "half_turn": "turned 180",
        "inverted": "inverted",
        "inverted_quarter": "turned 270+inverted",
        "inverted_cropped": "inverted",
    }
    for name, orientation in expected.items():
        pair = found[(film_name, f"copy_{name}")]
        assert pair.orientation_name == orientation, name
        assert not pair.mirrored
        assert 0.0 <= pair.score <= DedupeConfig().max_residual
    # candidates per new image stay bounded: the 14 extra orientations add at most one each
    config = DedupeConfig().search
    bound = (
        config.phash_trim_k
        + config.phash_k
        + config.lowres_k
        + config.mirror_k
        + 14 * config.orient_k
        + config.crop_of_k
        + config.window_k
    )
    assert search.candidates <= bound * len(new)


def test_serial_films_of_one_patient_are_not_merged(serial_fps) -> None:
    """Six follow-up films of one patient, two of them (003, 004) with the same framing: no pair, in any
    orientation; and the closest pair scores above the threshold in the plain orientation."""
    assert find_duplicates({}, serial_fps) == []
    a, b = serial_fps[f"{SERIAL_PATIENT}_003.png"], serial_fps[f"{SERIAL_PATIENT}_004.png"]
    assert verify_pair(a, b) > DedupeConfig().max_residual
    # a JPEG copy of one of them is still found, so the threshold is not just rejecting everything
    copy = fingerprint(_jpeg(_nih(f"{SERIAL_PATIENT}_004.png"), 50))
    pairs = find_duplicates(serial_fps, {"copy": copy})
    assert [(p.a, p.b) for p in pairs] == [(f"{SERIAL_PATIENT}_004.png", "copy")]


@pytest.mark.parametrize(
    "first, second",
    [
        ("00001543_003.png", "00001543_004.png"),
        ("00002032_003.png", "00002032_006.png"),
        ("Pneumonia/00010384_035.png", "Pneumonia/00010384_036.png"),
    ],
)
def test_serial_films_minutes_apart_are_kept_apart_by_the_median_gap(first: str, second: str) -> None:
    """Follow-up films of one NIH patient, same framing, that the trimmed mean gap alone merged (issue 24):
    their gaps are small but nonzero almost everywhere, so the weighted median gap rejects them; a JPEG
    copy of one, halved in size, is still found."""
    config = DedupeConfig()
    a, b = fingerprint(_nih(first)), fingerprint(_nih(second))
    assert verify_pair(a, b, replace(config, median_weight=0.0)) <= config.max_residual
    assert verify_pair(a, b, config) > config.max_residual
    assert find_duplicates({}, {"first": a, "second": b}, config) == []
    film = _nih(second)
    copy = fingerprint(_jpeg(film.resize((film.width // 2, film.height // 2), Image.Resampling.LANCZOS), 50))
    pairs = find_duplicates({"first": a, "second": b}, {"copy": copy}, config)
    assert [(p.a, p.b) for p in pairs] == [("copy", "second")]


def test_verify_chunk_orientations_match_verify_pair(serial_fps) -> None:
    """A chunk verifies each pair in its orientation code exactly as :func:`verify_pair` does; a bool array
    (the mirrored flags of before) still reads as identity / mirror."""
    film = _nih(f"{SERIAL_PATIENT}_003.png")
    fa = serial_fps[f"{SERIAL_PATIENT}_003.png"]
    fb = fingerprint(_jpeg(film.transpose(Image.Transpose.ROTATE_90)))
    thumbs = np.stack([np.frombuffer(f["thumb"], np.uint8).reshape(128, 128) for f in (fa, fb)])
    codes = np.array([IDENTITY, 6, 2, 14], dtype=np.int64)
    pairs = np.array([(0, 1)] * len(codes), dtype=np.int64)
    scores = verify_chunk(VerifyChunk(thumbs, pairs, codes, DedupeConfig()))
    assert scores == pytest.approx([verify_pair(fa, fb, orientation=int(c)) for c in codes], rel=1e-5)
    assert scores[1] <= DedupeConfig().max_residual < min(scores[0], scores[2])  # 6: turned back
    assert scores[3] > DedupeConfig().max_residual  # right turn, wrong polarity
    as_bool = verify_chunk(VerifyChunk(thumbs, pairs[:2], np.array([False, True]), DedupeConfig()))
    assert as_bool == pytest.approx([verify_pair(fa, fb), verify_pair(fa, fb, orientation=MIRROR)], rel=1e-5)
