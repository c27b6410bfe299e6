"""The fingerprint of one decoded grayscale image (:func:`fingerprint`): perceptual hashes, a 128 px
thumbnail of its content and that thumbnail's appearance vectors, a small Parquet-friendly record computed
once per image and stored, so duplicate detection never decodes a published image again; and the Hamming
distance between two hashes (:func:`hamming`).

Before the thumbnail is taken, borders (uniform rows/columns, e.g. black or white padding) are trimmed, and
a film printed inside a figure panel (a page carrying a caption or a scale bar) is cut out of it; the
content is then stretched to a square, so what remains between two copies of one film is an axis-aligned
scale + translation per axis (crop, untrimmed pad, resize), which :mod:`lxn_ray.dedupe.verify` recovers.
"""

from __future__ import annotations

import math

import imagehash
import numpy as np
from PIL import Image

from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.index import vectors_of
from lxn_ray.images.decode import DEFAULT_LIMITS, decode_image, to_grayscale
from lxn_ray.images.types import DecodedImage, ImageLimits

__all__ = [
    "FINGERPRINT_COLUMNS",
    "FINGERPRINT_VERSION",
    "THUMB_SIZE",
    "fingerprint",
    "fingerprint_film",
    "hamming",
]


#: Bump when the meaning of any fingerprint field changes, so cached fingerprints can be invalidated.
#: 3: figure panels cut out when they keep <= figure_max_area; films over max_side reduced first. Since
#: 2026-12-06 a large JPEG's work image comes from a reduced DCT decode (:func:`fingerprint_film`) rather
#: than a whole one: the same area average within rounding, so not a new meaning - the two fingerprints of
#: one film verify at <= 2e-05 and decide every pair alike (benchmarks/ingest.py --film-size 4500), and a
#: store's cached fingerprints stay valid (no re-fingerprinting, no new dataset version).
FINGERPRINT_VERSION = 3


#: Side of the square thumbnail stored in the fingerprint (THUMB_SIZE**2 bytes).
THUMB_SIZE = 128


#: Keys returned by :func:`fingerprint`, in order.
FINGERPRINT_COLUMNS: tuple[str, ...] = (
    "dedupe_version",  # int: FINGERPRINT_VERSION at computation time
    "phash",  # str: 16 hex chars, imagehash.phash of the whole image (the reported distance)
    "phash_trim",  # str: 16 hex chars, phash after border trimming (candidate search)
    "dhash_trim",  # str: 16 hex chars, dhash after border trimming (candidate search)
    "width",  # int: input width in pixels
    "height",  # int: input height in pixels
    "trim_box",  # str: "left,top,right,bottom" of the content box in input pixels
    "thumb_size",  # int: side of the square thumbnail
    "thumb",  # bytes: thumb_size*thumb_size uint8, row-major, trimmed content stretched to a square
    "lowres",  # bytes: 64 float16, the thumbnail's appearance vector (index.vectors_of)
    "windows",  # bytes: N_WINDOWS x 64 float16, its sub-windows' vectors (index.vectors_of)
)


def hamming(x: int, y: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (x ^ y).bit_count()


def _flat_extent(std: np.ndarray, max_std: float, limit: int) -> tuple[int, int]:
    """How many leading / trailing entries of ``std`` are flat (<= max_std), each capped at ``limit``."""
    flat = std <= max_std
    n = len(flat)
    lead = int(np.argmin(flat)) if not flat.all() else n
    trail = int(np.argmin(flat[::-1])) if not flat.all() else n
    return min(lead, limit), min(trail, limit)


def _std_trim_box(arr: np.ndarray, config: DedupeConfig) -> tuple[int, int, int, int]:
    """Content box (left, top, right, bottom) after removing uniform border rows/columns.

    Rows are trimmed first, then columns on the row-trimmed band, then rows again on the column-trimmed
    band, so a white pad on one side and the image's own dark border on another are both removed.
    """
    h, w = arr.shape
    a = arr.astype(np.float32)
    top, bottom, left, right = 0, h, 0, w
    max_y, max_x = int(h * config.trim_max_fraction), int(w * config.trim_max_fraction)
    for _ in range(2):
        t, b = _flat_extent(a[top:bottom, left:right].std(axis=1), config.trim_max_std, max_y)
        top, bottom = max(top, t), min(bottom, h - b)
        l_, r_ = _flat_extent(a[top:bottom, left:right].std(axis=0), config.trim_max_std, max_x)
        left, right = max(left, l_), min(right, w - r_)
    if bottom - top < 8 or right - left < 8:  # (almost) blank image: keep it whole
        return 0, 0, w, h
    return left, top, right, bottom


def _longest_run(mask: np.ndarray, max_gap: int) -> tuple[int, int]:
    """(start, end) of the longest stretch of ``mask`` that is True apart from gaps of <= ``max_gap``."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return 0, len(mask)
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    i = int(np.argmax(ends - starts))
    return int(starts[i]), int(ends[i])


def _figure_box(arr: np.ndarray, config: DedupeConfig) -> tuple[int, int, int, int] | None:
    """Box of a film printed inside a uniform figure panel (a white or black page around it carrying a
    caption, a scale bar or labels), or None when the image's outer frame is not one uniform colour.

    A row (then a column, twice) holds film when at least ``figure_content`` of its pixels differ from the
    frame's colour by more than ``figure_tolerance``; the film is the longest run of such rows, so a
    caption or a scale bar separated from it by a strip of page is left out.
    """
    h, w = arr.shape
    ring = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]).astype(np.int16)
    page = int(np.median(ring))
    if np.mean(np.abs(ring - page) <= config.figure_tolerance) < config.figure_frame_uniform:
        return None
    content = np.abs(arr.astype(np.int16) - page) > config.figure_tolerance
    top, bottom, left, right = 0, h, 0, w
    for _ in range(2):
        rows = content[top:bottom, left:right].mean(axis=1) >= config.figure_content
        t, b = _longest_run(rows, max(1, (bottom - top) // 200))
        top, bottom = top + t, top + b
        cols = content[top:bottom, left:right].mean(axis=0) >= config.figure_content
        l_, r_ = _longest_run(cols, max(1, (right - left) // 200))
        left, right = left + l_, left + r_
    if bottom - top < max(8, h // 4) or right - left < max(8, w // 4):
        return None
    return left, top, right, bottom


def _trim_box(arr: np.ndarray, config: DedupeConfig) -> tuple[int, int, int, int]:
    """Content box (left, top, right, bottom): uniform borders removed (:func:`_std_trim_box`), or the
    film of a figure panel (:func:`_figure_box`) where that leaves out a real part of the border-trimmed
    box: it cuts more than ``trim_max_fraction`` from a side, or keeps at most ``figure_max_area`` of the
    area (a caption below and a scale bar beside a film each stop border trimming short of the film)."""
    box = _std_trim_box(arr, config)
    figure = _figure_box(arr, config)
    if figure is None:
        return box
    h, w = arr.shape
    cut = max(
        (figure[0] - box[0]) / w, (figure[1] - box[1]) / h, (box[2] - figure[2]) / w, (box[3] - figure[3]) / h
    )
    area = (figure[2] - figure[0]) * (figure[3] - figure[1]) / max(1, (box[2] - box[0]) * (box[3] - box[1]))
    return figure if cut > config.trim_max_fraction or area <= config.figure_max_area else box


def fingerprint_film(
    data: bytes, limits: ImageLimits = DEFAULT_LIMITS, config: DedupeConfig = DedupeConfig()
) -> tuple[DecodedImage, dict[str, object]]:
    """Decode a film's bytes as ingest does and :func:`fingerprint` it: (the decoded film, its
    fingerprint). A JPEG is decoded at the smallest DCT scale that keeps ``config.max_side`` on its longer
    side (:func:`lxn_ray.images.decode.decode_image`'s ``min_long_side``: a 4500 px film at 1/4), all the
    fingerprint reads; so the decoded image may be smaller than ``width`` x ``height``. Raises
    :class:`~lxn_ray.images.types.ImageRejected` as :func:`~lxn_ray.images.decode.decode_image` does."""
    decoded = decode_image(data, limits, min_long_side=config.max_side)
    return decoded, fingerprint(to_grayscale(decoded.image), config, size=(decoded.width, decoded.height))


def fingerprint(
    image: Image.Image,
    config: DedupeConfig = DedupeConfig(),
    size: tuple[int, int] | None = None,
) -> dict[str, object]:
    """Fingerprint one decoded image (mode "L"; other modes are converted) for
    :func:`~lxn_ray.dedupe.search.find_duplicates`.

    An image larger than ``config.max_side`` is first reduced by the smallest integer factor that brings it
    within (box averaging, :meth:`PIL.Image.Image.reduce`): every field is computed at most at that size
    (the 32 px hashes and the 128 px thumbnail lose nothing), which makes a 20 MP film cost about what a
    1 MP one does. ``size``: the film's (width, height) in pixels where ``image`` was decoded smaller (a
    reduced JPEG decode, at least that work size); it is then resized to the work size (box averaging).
    ``width``, ``height`` and ``trim_box`` stay in the film's pixels.

    Returns only str/int/bytes values keyed by :data:`FINGERPRINT_COLUMNS`.  Deterministic.
    """
    if image.mode != "L":
        image = image.convert("L")
    width, height = size or image.size
    factor = max(1, math.ceil(max(width, height) / config.max_side))
    work_size = (math.ceil(width / factor), math.ceil(height / factor))  # as Image.reduce(factor) gives
    if image.size == (width, height):
        work = image.reduce(factor) if factor > 1 else image
    else:
        work = image if image.size == work_size else image.resize(work_size, Image.Resampling.BOX)
    box = _trim_box(np.asarray(work), config)
    content = work.crop(box) if box != (0, 0, work.width, work.height) else work
    # BOX = area averaging: antialiased, so a 4x larger copy gives (almost) the same thumbnail.
    thumb = content.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
    lowres, windows = vectors_of(np.asarray(thumb))
    input_box = (box[0] * factor, box[1] * factor, min(box[2] * factor, width), min(box[3] * factor, height))
    return {
        "dedupe_version": FINGERPRINT_VERSION,
        "phash": str(imagehash.phash(work)),
        "phash_trim": str(imagehash.phash(content)),
        "dhash_trim": str(imagehash.dhash(content)),
        "width": int(width),
        "height": int(height),
        "trim_box": ",".join(str(v) for v in input_box),
        "thumb_size": THUMB_SIZE,
        "thumb": thumb.tobytes(),
        "lowres": lowres.tobytes(),
        "windows": windows.tobytes(),
    }
