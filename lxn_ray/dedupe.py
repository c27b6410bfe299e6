"""Near-duplicate detection for chest radiographs.

What this module owns
---------------------
* ``fingerprint(image)``: a small, Parquet-friendly summary of one decoded grayscale image (perceptual
  hashes plus a normalized thumbnail).  It is computed once per image and cached, so it carries
  everything the pair decision needs; verification never sees the full image again.
* ``find_duplicates(known, new)``: confirmed duplicate pairs among ``new`` and between ``new`` and
  ``known``.  Grouping pairs into components, choosing which copy to keep and splitting are done by the
  caller.
* ``BKTree``: the Hamming-distance index used for the candidate search.

Why two stages
--------------
A perceptual hash alone cannot separate "the same radiograph, re-encoded" from "another radiograph of the
same patient a day later": serial films share anatomy and positioning, so their hashes are as close as
those of a cropped or padded copy (at phash distance 10 about one reported pair in three is wrong).
So the hashes only propose *candidates*, searched with BK-trees and a deliberately loose radius (crops
and borders move a 64-bit hash by 10-20 bits; two hashes are indexed and their candidates unioned).  A
third channel needs no threshold: each new image's ``lowres_top_k`` nearest neighbours by low-resolution
appearance (cosine similarity of the rank-equalized thumbnail averaged to 8x8, one matrix product).  It
catches copies whose hashes moved too far - heavy white clipping from a brightness change, or crop +
border + strong JPEG together - because the true copy is still among the most alike images.  Each
candidate pair is then *verified* on the stored 128 px thumbnails:

0. borders (uniform rows/columns, e.g. black or white padding) were trimmed before the thumbnail was
   taken, and every thumbnail is stretched to the same square, so what remains between two copies is an
   axis-aligned scale + translation per axis (crop, untrimmed pad, resize);
1. at 64 px, row/column profiles give the best 1-D alignments (stage 0 rejects pairs whose profiles do
   not correlate), alternating x/y searches restricted to the overlap align the pair, and a rank
   residual rejects clearly different pairs (stage 1);
2. at 128 px, blurred and rank-equalized, a coordinate descent polishes the alignment, and the score is
   the mean gap between the two images' rank intervals over the overlap after dropping the worst
   ``ignore_fraction`` of pixels (stage 2).  Ranks make brightness/contrast/gamma (clipping included)
   free; dropping the worst pixels makes drawn arrows, letters and markers free.  Pixels that lie in a
   uniform mass on BOTH sides (a gray level holding more than ``flat_mass`` of the overlap in each image:
   flat black/white background, saturation) are left out of the score: they match for any two films on
   the same background, so counting them would dilute the residual of two different films (e.g. two
   lateral views of one patient on a large black background) down to a duplicate's.

A re-encoded copy leaves only compression/resampling noise; a serial film leaves residual everywhere
(breathing, rotation, tubes, changed opacities), which translation + scale cannot explain.  Known blind
spot: a film that differs ONLY by a local change covering less than ``ignore_fraction`` of the image
(same positioning to the pixel) is indistinguishable from an annotated copy.

Parallel verification
---------------------
Candidate search is cheap and runs in the calling process; verification (milliseconds per pair) is split
into chunks of self-contained tasks - ``(thumb_a, thumb_b, thumb_size, config)`` - and handed to an
optional ``map_chunks(verify_chunk, chunks)`` (e.g. Ray tasks).  ``verify_chunk`` is a module-level pure
function, so the result does not depend on where or in which order the chunks run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import imagehash
import numpy as np
from PIL import Image

__all__ = [
    "BKTree",
    "DedupeConfig",
    "DuplicatePair",
    "FINGERPRINT_COLUMNS",
    "FINGERPRINT_VERSION",
    "find_duplicates",
    "fingerprint",
    "hamming",
    "ChunkMapper",
    "VerifyTask",
    "candidate_pairs",
    "verify_chunk",
    "verify_pair",
]

T = TypeVar("T")
R = TypeVar("R")

#: ``map_chunks(worker, chunks) -> results``: applies a picklable module-level ``worker`` to every chunk
#: (a list) and returns the per-chunk result lists in the order of ``chunks`` (e.g. as Ray tasks).
ChunkMapper = Callable[[Callable[[list[T]], list[R]], list[list[T]]], list[list[R]]]

#: Bump when the meaning of any fingerprint field changes, so cached fingerprints can be invalidated.
FINGERPRINT_VERSION = 1

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
)


@dataclass(frozen=True)
class DedupeConfig:
    """All tunables of fingerprinting, candidate search and verification.

    The defaults were tuned on synthetic near-duplicates of the ieee8023 chest X-rays
    (``benchmarks/dedupe_quality.py``), with same-patient serial films as the hard negatives.
    """

    # --- border trimming (fingerprint) ---
    #: A row/column whose gray-level standard deviation is at most this is treated as border.
    trim_max_std: float = 4.0
    #: Never trim more than this fraction of the width/height from one side.
    trim_max_fraction: float = 0.15

    # --- candidate search ---
    #: BK-tree radius on ``phash_trim`` (bits out of 64).  Loose on purpose: verification decides.
    phash_radius: int = 16
    #: BK-tree radius on the whole-image ``phash`` (catches copies whose border trimming went differently,
    #: e.g. a brightened copy with a clipped-white margin); unioned with the ``phash_trim`` candidates.
    whole_phash_radius: int = 10
    #: Each new image's this many nearest neighbours by low-resolution appearance (cosine similarity of the
    #: rank-equalized 8x8 thumbnail, see ``_lowres_vectors``) are also candidates.  A nearest-neighbour list
    #: has no threshold to fit: it catches copies whose hashes moved too far (heavy clipping from a
    #: brightness change, crop + border + recompression together), because the true copy is still the most
    #: alike image.  0 disables the channel.
    lowres_top_k: int = 4

    # --- verification: alignment search ---
    #: Largest relative scale change per axis between the two content boxes (crop/pad not trimmed).
    max_scale: float = 1.35
    #: Largest offset of one box's origin inside the other, as a fraction of the side.
    max_offset: float = 0.25
    #: Scale steps and offset steps of the coarse 1-D profile search.
    scale_steps: int = 21
    offset_steps: int = 31
    #: Stage 0: both axes' best profile correlations must reach this.
    min_profile_corr: float = 0.9
    #: How many best 1-D x hypotheses are each aligned and scored.
    top_k: int = 2
    #: Minimum fraction of each thumbnail that must lie in the overlap.
    min_overlap: float = 0.55

    #: Stage 1 (64 px): pairs whose trimmed rank residual exceeds this are rejected without stage 2.
    prefilter_residual: float = 0.07
    #: Fraction of the worst pixels ignored by the stage-1 residual.
    prefilter_ignore: float = 0.12

    # --- verification: decision (stage 2, full thumbnail) ---
    #: Gaussian blur (thumbnail pixels) before the final comparison: absorbs resampling/JPEG differences.
    blur_sigma: float = 1.0
    #: Fraction of the worst-matching informative overlap pixels ignored (annotations, text, arrows).
    ignore_fraction: float = 0.25
    #: A pixel whose gray level is shared by more than this fraction of the overlap in BOTH images lies in a
    #: uniform mass (flat background, saturation) on both sides: its rank-interval gap is 0 for any two
    #: images with such a background, so it is evidence of nothing and is left out of the score.  Without
    #: this, a large black background dilutes the score of two different films (lateral views, serial films)
    #: towards a duplicate's.  1.0 disables it.
    flat_mass: float = 0.04
    #: A pair is a duplicate when its score (trimmed mean rank-interval gap) is at most this.
    max_residual: float = 0.012
    #: ... or at most this for a pair the caller proposes because both files carry the same name in two
    #: sources (``find_duplicates(named_pairs=...)``): the name is evidence of its own, so the image test may
    #: be looser. Measured on darkcovidnet's republished ieee8023 films (re-cropped figure panels score
    #: 0.012-0.019; different films of one patient score well above 0.03).
    same_name_max_residual: float = 0.02


@dataclass(frozen=True)
class DuplicatePair:
    """One confirmed duplicate pair; ``a < b`` (string order of the keys).

    ``distance`` is the Hamming distance between the two whole-image phashes (for reporting and for
    comparison with plain hash thresholds).  ``score`` is the verification score in [0, 1]: after
    aligning the two thumbnails (scale + shift per axis), the mean rank-interval gap between their blurred
    intensities over the overlap, leaving out pixels in a uniform mass on both sides (``flat_mass``) and
    ignoring the worst ``ignore_fraction`` of the rest (see ``_gap_residual``).
    0 means identical up to crop/pad/resize/brightness/contrast/gamma; pairs are reported when
    ``score <= config.max_residual``.
    """

    a: str
    b: str
    distance: int
    score: float


# ----------------------------------------------------------------------------------------------------------
# Hashes and the BK-tree index
# ----------------------------------------------------------------------------------------------------------


def hamming(x: int, y: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (x ^ y).bit_count()


class BKTree:
    """Burkhard-Keller tree over integer hashes with the Hamming metric.

    A query with radius ``r`` only descends into children whose edge distance ``d`` satisfies
    ``|d - dist(query, node)| <= r`` (triangle inequality), so it visits far fewer nodes than a scan.
    Several items may share one hash; insertion order is kept for deterministic query results.
    """

    def __init__(self, items: Iterable[tuple[int, str]] = ()) -> None:
        # node = [hash, list_of_keys, {edge_distance: child_node}]
        self._root: list | None = None
        self._size = 0
        for value, key in items:
            self.add(value, key)

    def __len__(self) -> int:
        return self._size

    def add(self, value: int, key: str) -> None:
        """Insert ``key`` with 64-bit hash ``value``."""
        self._size += 1
        if self._root is None:
            self._root = [value, [key], {}]
            return
        node = self._root
        while True:
            d = hamming(value, node[0])
            if d == 0:
                node[1].append(key)
                return
            child = node[2].get(d)
            if child is None:
                node[2][d] = [value, [key], {}]
                return
            node = child

    def query(self, value: int, radius: int) -> list[tuple[int, str]]:
        """All ``(distance, key)`` with ``hamming(value, hash(key)) <= radius``, sorted."""
        found: list[tuple[int, str]] = []
        if self._root is None:
            return found
        stack = [self._root]
        while stack:
            node = stack.pop()
            d = hamming(value, node[0])
            if d <= radius:
                found.extend((d, key) for key in node[1])
            lo, hi = d - radius, d + radius
            stack.extend(child for edge, child in node[2].items() if lo <= edge <= hi)
        found.sort()
        return found


# ----------------------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------------------


def _flat_extent(std: np.ndarray, max_std: float, limit: int) -> tuple[int, int]:
    """How many leading / trailing entries of ``std`` are flat (<= max_std), each capped at ``limit``."""
    flat = std <= max_std
    n = len(flat)
    lead = int(np.argmin(flat)) if not flat.all() else n
    trail = int(np.argmin(flat[::-1])) if not flat.all() else n
    return min(lead, limit), min(trail, limit)


def _trim_box(arr: np.ndarray, config: DedupeConfig) -> tuple[int, int, int, int]:
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


def fingerprint(image: Image.Image, config: DedupeConfig = DedupeConfig()) -> dict[str, object]:
    """Fingerprint one decoded image (mode "L"; other modes are converted) for :func:`find_duplicates`.

    Returns only str/int/bytes values keyed by :data:`FINGERPRINT_COLUMNS`.  Deterministic.
    """
    if image.mode != "L":
        image = image.convert("L")
    arr = np.asarray(image)
    box = _trim_box(arr, config)
    content = image.crop(box) if box != (0, 0, image.width, image.height) else image
    # BOX = area averaging: antialiased, so a 4x larger copy gives (almost) the same thumbnail.
    thumb = content.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
    return {
        "dedupe_version": FINGERPRINT_VERSION,
        "phash": str(imagehash.phash(image)),
        "phash_trim": str(imagehash.phash(content)),
        "dhash_trim": str(imagehash.dhash(content)),
        "width": int(image.width),
        "height": int(image.height),
        "trim_box": ",".join(str(v) for v in box),
        "thumb_size": THUMB_SIZE,
        "thumb": thumb.tobytes(),
    }


# ----------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------


def _thumb_array(fp: Mapping[str, object]) -> np.ndarray:
    size = int(fp["thumb_size"])  # type: ignore[arg-type]
    data = fp["thumb"]
    buf = data if isinstance(data, bytes) else bytes(data)  # bytearray/memoryview after Parquet
    return np.frombuffer(buf, dtype=np.uint8).reshape(size, size).astype(np.float32)


def _equalize(img: np.ndarray) -> np.ndarray:
    """Rank transform (mid-rank of each gray level) to [0, 1]: removes brightness/contrast/gamma changes."""
    levels = np.clip(np.rint(img), 0, 255).astype(np.intp)
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    cdf = np.cumsum(counts)
    mid = (cdf - counts / 2.0) / cdf[-1]
    return mid[levels].astype(np.float32)


# An axis hypothesis (scale, offset) maps B's normalized coordinate u_b in [0, 1] to A's:
#     u_a = 0.5 + offset + scale * (u_b - 0.5)
# (offset between box centres, so scale and shift decouple).  scale < 1: B shows part of A (B is a crop of
# A, or A carries an untrimmed border); scale > 1: the other way round.


def _axis_positions(
    n_src: int, n_dst: int, scale: np.ndarray, offset: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Source pixel positions of the destination pixel centres, and whether they fall inside the source.

    ``scale``/``offset`` broadcast against each other; the output gets a trailing axis of length n_dst.
    """
    ub = (np.arange(n_dst, dtype=np.float32) + 0.5) / n_dst
    ua = 0.5 + offset[..., None] + scale[..., None] * (ub - 0.5)
    pos = ua * n_src - 0.5
    return pos, (pos >= -0.5) & (pos <= n_src - 0.5)


def _profile_grid(n_src: int, n_dst: int, scales: np.ndarray, offsets: np.ndarray, min_overlap: float):
    """Everything about a grid of (scale, offset) hypotheses that does not depend on the profiles.

    Returns (i0, i1, frac, w, cnt_safe, ok): linear-interpolation indices/weights of A's profile at B's
    sample positions, the inside mask as weights, the per-hypothesis sample count and the overlap test.
    """
    pos, inside = _axis_positions(n_src, n_dst, scales, offsets)
    pos = np.clip(pos, 0.0, n_src - 1.0)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_src - 1)
    frac = (pos - i0).astype(np.float32)
    w = inside.astype(np.float32)
    cnt = w.sum(axis=-1)
    # overlap as a fraction of B (samples inside A) and of A (covered length = scale * fraction of B)
    ok = (cnt >= min_overlap * n_dst) & (scales * cnt / n_dst >= min_overlap)
    return i0, i1, frac, w, np.maximum(cnt, 1.0), ok


def _profile_corr_grid(pa: np.ndarray, pb: np.ndarray, grid) -> np.ndarray:
    """Pearson correlation of B's profile with A's profile resampled on a :func:`_profile_grid`."""
    i0, i1, frac, w, cnt_safe, ok = grid
    sampled = pa[i0] + (pa[i1] - pa[i0]) * frac
    ma = (sampled * w).sum(axis=-1) / cnt_safe
    mb = (w @ pb) / cnt_safe
    da = (sampled - ma[..., None]) * w
    db = (pb - mb[..., None]) * w
    corr = (da * db).sum(axis=-1) / np.sqrt((da * da).sum(axis=-1) * (db * db).sum(axis=-1) + 1e-12)
    return np.where(ok, corr, -2.0)


def _profile_corr(
    pa: np.ndarray, pb: np.ndarray, scales: np.ndarray, offsets: np.ndarray, min_overlap: float
):
    """Pearson correlation of B's profile with A's profile resampled at every (scale, offset) hypothesis.

    Returns an array of shape ``scales.shape`` (scales and offsets are broadcast); hypotheses whose overlap
    covers less than ``min_overlap`` of either profile get -2.
    """
    scales, offsets = np.broadcast_arrays(scales, offsets)
    return _profile_corr_grid(pa, pb, _profile_grid(len(pa), len(pb), scales, offsets, min_overlap))


@functools.lru_cache(maxsize=8)
def _coarse_grid(
    n_src: int,
    n_dst: int,
    max_scale: float,
    max_offset: float,
    scale_steps: int,
    offset_steps: int,
    min_overlap: float,
):
    """The coarse (scale, offset) grid and its :func:`_profile_grid`; the same for every pair, so cached."""
    log_s = math.log(max_scale)
    scales = np.exp(np.linspace(-log_s, log_s, scale_steps, dtype=np.float32))
    offsets = np.linspace(-max_offset, max_offset, offset_steps, dtype=np.float32)
    grid_s, grid_o = np.broadcast_arrays(scales[:, None], offsets[None, :])
    return scales, offsets, _profile_grid(n_src, n_dst, grid_s, grid_o, min_overlap)


def _coarse_axis(pa: np.ndarray, pb: np.ndarray, config: DedupeConfig) -> list[tuple[float, float, float]]:
    """The ``top_k`` best, mutually distinct (scale, offset, correlation) hypotheses on a coarse grid."""
    scales, offsets, grid = _coarse_grid(
        len(pa),
        len(pb),
        config.max_scale,
        config.max_offset,
        config.scale_steps,
        config.offset_steps,
        config.min_overlap,
    )
    corr = _profile_corr_grid(pa, pb, grid)
    picks: list[tuple[float, float, float]] = []
    for idx in np.argsort(-corr.ravel(), kind="stable"):
        si, oi = divmod(int(idx), len(offsets))
        if corr[si, oi] < -1.5:
            break
        cand = (float(scales[si]), float(offsets[oi]), float(corr[si, oi]))
        if all(abs(cand[0] - s) > 0.04 or abs(cand[1] - o) > 0.04 for s, o, _ in picks):
            picks.append(cand)
            if len(picks) >= config.top_k:
                break
    return picks


def _refine_axis(pa: np.ndarray, pb: np.ndarray, start: tuple[float, float], config: DedupeConfig):
    """Local coarse-to-fine search around ``start``: 7x7 grids with halving spans."""
    s0, o0 = start[0], start[1]
    span_s, span_o = 0.06, 0.06
    steps = np.linspace(-1.0, 1.0, 7, dtype=np.float32)
    for _ in range(4):
        scales = (s0 * np.exp(steps * span_s))[:, None]
        offsets = (o0 + steps * span_o)[None, :]
        scales, offsets = np.broadcast_arrays(scales, offsets)
        corr = _profile_corr(pa, pb, scales, offsets, config.min_overlap)
        i = int(np.argmax(corr))
        s0, o0 = float(scales.flat[i]), float(offsets.flat[i])
        span_s, span_o = span_s / 3.0, span_o / 3.0
    return s0, o0


def _warp_axis(
    a: np.ndarray, axis: int, n_dst: int, hyp: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``a`` along ``axis`` onto B's grid for one hypothesis; returns values and inside mask."""
    n_src = a.shape[axis]
    pos, inside = _axis_positions(n_src, n_dst, np.float32(hyp[0]), np.float32(hyp[1]))
    pos = np.clip(pos, 0.0, n_src - 1.0)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_src - 1)
    frac = pos - i0
    if axis == 0:
        out = a[i0, :] * (1.0 - frac)[:, None] + a[i1, :] * frac[:, None]
    else:
        out = a[:, i0] * (1.0 - frac)[None, :] + a[:, i1] * frac[None, :]
    return out, inside


def _align(a: np.ndarray, b: np.ndarray, x_start: tuple[float, ...], config: DedupeConfig):
    """Alternate per-axis searches, each using only the rows/columns that overlap on the other axis.

    Profiles of the full thumbnails are polluted where one image extends beyond the other (a crop along y
    changes the column means); restricting them to the current overlap removes that bias.
    """
    x_hyp = (x_start[0], x_start[1])
    y_hyp: tuple[float, float] | None = None
    for _ in range(2):
        ax, inx = _warp_axis(a, 1, b.shape[1], x_hyp)  # A resampled onto B's columns
        pa, pb = ax[:, inx].mean(axis=1), b[:, inx].mean(axis=1)
        if y_hyp is None:
            cands = _coarse_axis(pa, pb, config)
            if not cands:
                return None
            y_hyp = cands[0][:2]
        y_hyp = _refine_axis(pa, pb, y_hyp, config)
        ay, iny = _warp_axis(a, 0, b.shape[0], y_hyp)  # A resampled onto B's rows
        x_hyp = _refine_axis(ay[iny].mean(axis=0), b[iny].mean(axis=0), x_hyp, config)
    return y_hyp, x_hyp


def _overlap_mask(y_hyp, x_hyp, n: int) -> np.ndarray:
    _, iny = _axis_positions(n, n, np.float32(y_hyp[0]), np.float32(y_hyp[1]))
    _, inx = _axis_positions(n, n, np.float32(x_hyp[0]), np.float32(x_hyp[1]))
    return iny[:, None] & inx[None, :]


def _overlap_ok(mask: np.ndarray, y_hyp, x_hyp, config: DedupeConfig) -> bool:
    """Enough of B lies inside A, and enough of A is covered by B."""
    frac_b = float(mask.mean())
    return frac_b >= config.min_overlap and frac_b * y_hyp[0] * x_hyp[0] >= config.min_overlap


def _rank_residual(a: np.ndarray, b: np.ndarray, y_hyp, x_hyp, config: DedupeConfig) -> float:
    """Coarse score: trimmed mean |rank(A) - rank(B)| over the overlap, ranks taken within the overlap."""
    ay, _ = _warp_axis(a, 0, b.shape[0], y_hyp)
    axy, _ = _warp_axis(ay, 1, b.shape[1], x_hyp)
    mask = _overlap_mask(y_hyp, x_hyp, b.shape[0])
    if not _overlap_ok(mask, y_hyp, x_hyp, config):
        return math.inf
    diff = np.sort(np.abs(_equalize(axy[mask] * 255.0) - _equalize(b[mask] * 255.0)))
    keep = max(1, int(round(len(diff) * (1.0 - config.prefilter_ignore))))
    return float(diff[:keep].mean())


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Row-normalized Gaussian blur as an (n, n) matrix: ``M @ img @ M.T`` blurs both axes."""
    idx = np.arange(n, dtype=np.float32)
    m = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def _interp_matrix(n: int, hyp) -> np.ndarray:
    """(n, n) linear-interpolation matrix W with ``W @ a`` = A resampled onto B's grid along one axis."""
    pos, _ = _axis_positions(n, n, np.float32(hyp[0]), np.float32(hyp[1]))
    pos = np.clip(pos, 0.0, n - 1.0)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    frac = (pos - i0).astype(np.float32)
    w = np.zeros((n, n), dtype=np.float32)
    rows = np.arange(n)
    np.add.at(w, (rows, i0), 1.0 - frac)
    np.add.at(w, (rows, i1), frac)
    return w


def _warp2(a: np.ndarray, y_hyp, x_hyp) -> np.ndarray:
    n = a.shape[0]
    return _interp_matrix(n, y_hyp) @ a @ _interp_matrix(n, x_hyp).T


def _refine_2d(a: np.ndarray, b: np.ndarray, y_hyp, x_hyp, config: DedupeConfig):
    """Coordinate descent on (sy, oy, sx, ox) minimizing the mean |A - B| of the equalized, blurred images.

    The profile search is good to about half a pixel at 64 px; this polishes the alignment at full
    thumbnail resolution, where a residual misalignment would otherwise look like a difference.
    """
    n = a.shape[0]
    params = [y_hyp[0], y_hyp[1], x_hyp[0], x_hyp[1]]

    def cost(p: list[float]) -> float:
        yh, xh = (p[0], p[1]), (p[2], p[3])
        mask = _overlap_mask(yh, xh, n)
        if not _overlap_ok(mask, yh, xh, config):
            return math.inf
        return float(np.abs(_warp2(a, yh, xh) - b)[mask].mean())

    best = cost(params)
    for step in (1.0 / n, 0.5 / n, 0.25 / n):
        for _ in range(3):
            improved = False
            for dim in range(4):
                for sign in (-1.0, 1.0):
                    trial = list(params)
                    trial[dim] += sign * step
                    c = cost(trial)
                    if c < best - 1e-7:
                        best, params, improved = c, trial, True
            if not improved:
                break
    return (params[0], params[1]), (params[2], params[3])


def _gap_residual(a_raw: np.ndarray, b_raw: np.ndarray, y_hyp, x_hyp, config: DedupeConfig) -> float:
    """Final score: trimmed mean rank-interval gap between aligned A and B over the overlap.

    Each pixel's gray level occupies an interval of ranks [F(v-), F(v)] within the overlap.  The gap
    between A's and B's intervals is 0 when the ranks agree, and also when one image is clipped (a
    saturated block is one wide interval), so brightness/contrast/gamma changes, clipping included, cost
    nothing.  Pixels in a uniform mass on both sides (``flat_mass``: shared background) carry no evidence
    and are left out; of the rest, the worst ``ignore_fraction`` is dropped (annotations, text, arrows).
    """
    n = b_raw.shape[0]
    mask = _overlap_mask(y_hyp, x_hyp, n)
    if not _overlap_ok(mask, y_hyp, x_hyp, config):
        return math.inf
    return _trimmed_gap(
        _warp2(a_raw, y_hyp, x_hyp)[mask], b_raw[mask], config.ignore_fraction, config.flat_mass
    )


def _rank_interval(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per value, the interval [F(v-), F(v)] of ranks its gray level occupies within ``v`` (in [0, 1])."""
    levels = np.clip(np.rint(v), 0, 255).astype(np.intp)
    counts = np.bincount(levels, minlength=256).astype(np.float64)
    hi = np.cumsum(counts) / len(v)
    lo = hi - counts / len(v)
    return lo[levels], hi[levels]


def _trimmed_gap(av: np.ndarray, bv: np.ndarray, ignore_fraction: float, flat_mass: float = 1.0) -> float:
    """Mean gap between the rank intervals of paired values, after dropping the worst ``ignore_fraction``.

    Pairs where both values belong to a gray level holding more than ``flat_mass`` of the values (a uniform
    background or a saturated block on both sides) are left out first, unless nothing else is left.
    """
    lo_a, hi_a = _rank_interval(av)
    lo_b, hi_b = _rank_interval(bv)
    gap = np.maximum(0.0, np.maximum(lo_a - hi_b, lo_b - hi_a))
    informative = (hi_a - lo_a <= flat_mass) | (hi_b - lo_b <= flat_mass)
    if informative.any():
        gap = gap[informative]
    gap = np.sort(gap)
    keep = max(1, int(round(len(gap) * (1.0 - ignore_fraction))))
    return float(gap[:keep].mean())


def verify_pair(
    fa: Mapping[str, object], fb: Mapping[str, object], config: DedupeConfig = DedupeConfig()
) -> float:
    """Verification score between two fingerprints (see :class:`DuplicatePair`); lower = more alike.

    Stage 1 (64 px, cheap): profile alignment and a rank residual; clearly different pairs stop here.
    Stage 2 (full thumbnail): 2-D refinement of the alignment and the rank-interval gap score.
    Returns ``inf`` when no alignment gives enough overlap.
    """
    a_raw, b_raw = _thumb_array(fa), _thumb_array(fb)
    if a_raw.shape != b_raw.shape:
        raise ValueError("fingerprints with different thumb_size cannot be compared")
    n = a_raw.shape[0]
    half = n // 2
    a = _equalize(a_raw.reshape(half, 2, half, 2).mean(axis=(1, 3)))
    b = _equalize(b_raw.reshape(half, 2, half, 2).mean(axis=(1, 3)))
    # Stage 0: the best 1-D profile correlation per axis; cheap, and rejects most hash candidates.
    x_starts = _coarse_axis(a.mean(axis=0), b.mean(axis=0), config)
    if not x_starts:
        return math.inf
    if x_starts[0][2] < config.min_profile_corr:  # rejected on x alone; y cannot raise the minimum
        return 2.0 - x_starts[0][2]
    y_starts = _coarse_axis(a.mean(axis=1), b.mean(axis=1), config)
    if not y_starts:
        return math.inf
    corr = min(x_starts[0][2], y_starts[0][2])
    if corr < config.min_profile_corr:
        return 2.0 - corr  # clearly not a duplicate; > any stage-1/2 score
    coarse, best = math.inf, None
    for x_start in x_starts:
        aligned = _align(a, b, x_start, config)
        if aligned is not None:
            r = _rank_residual(a, b, aligned[0], aligned[1], config)
            if r < coarse:
                coarse, best = r, aligned
    if best is None:
        return math.inf
    if coarse > config.prefilter_residual:
        return 1.0 + coarse  # clearly not a duplicate
    blur = _blur_matrix(n, config.blur_sigma)
    a_raw, b_raw = blur @ a_raw @ blur.T, blur @ b_raw @ blur.T
    y_hyp, x_hyp = _refine_2d(_equalize(a_raw), _equalize(b_raw), best[0], best[1], config)
    return _gap_residual(a_raw, b_raw, y_hyp, x_hyp, config)


# ----------------------------------------------------------------------------------------------------------
# Pair search
# ----------------------------------------------------------------------------------------------------------


def _lowres_vectors(fps: Sequence[Mapping[str, object]]) -> np.ndarray:
    """Unit-norm, zero-mean 64-vectors: each rank-equalized thumbnail averaged down to 8x8 (one row each).

    16 px blocks of the (border-trimmed, square-stretched) thumbnail barely move under a crop of a few
    percent, and equalization removes brightness/contrast/gamma, so a copy's vector stays close to the
    original's; the cosine similarity is one matrix product for all pairs.
    """
    out = np.empty((len(fps), 64), dtype=np.float64)
    for i, fp in enumerate(fps):
        t = _equalize(_thumb_array(fp))
        k = t.shape[0] // 8
        v = t[: 8 * k, : 8 * k].reshape(8, k, 8, k).mean(axis=(1, 3)).ravel()
        v = v - v.mean()
        out[i] = v / (np.linalg.norm(v) + 1e-9)
    return out


def _candidates(
    known: Mapping[str, Mapping[str, object]],
    new: Mapping[str, Mapping[str, object]],
    config: DedupeConfig,
    within_new: bool = True,
) -> Iterator[tuple[str, str]]:
    """Candidate pairs (a < b) with at least one side in ``new``: BK-tree queries on two hashes, plus each
    new key's ``lowres_top_k`` nearest neighbours by low-resolution appearance. ``within_new=False``:
    only pairs of a new key with a known one."""
    keys = sorted(set(known) | set(new))
    new_keys = sorted(new)
    fps = {**known, **new}
    seen: set[tuple[str, str]] = set()
    for column, radius in (("phash_trim", config.phash_radius), ("phash", config.whole_phash_radius)):
        values = {k: int(str(fps[k][column]), 16) for k in keys}
        tree = BKTree((values[k], k) for k in keys)
        for k in new_keys:
            for _, other in tree.query(values[k], radius):
                if other == k or (not within_new and other in new):
                    continue
                # a new key meets another new key twice; count it once
                pair = (k, other) if k < other else (other, k)
                if pair not in seen:
                    seen.add(pair)
                    yield pair
    top_k = min(config.lowres_top_k, len(keys) - 1)
    if top_k <= 0 or not new_keys:
        return
    vecs = _lowres_vectors([fps[k] for k in keys])
    row = {k: i for i, k in enumerate(keys)}
    for start in range(0, len(new_keys), 256):  # bounded memory for a large known set
        block = new_keys[start : start + 256]
        sims = vecs[[row[k] for k in block]] @ vecs.T
        sims[np.arange(len(block)), [row[k] for k in block]] = -np.inf  # not itself
        if not within_new:
            sims[:, [row[k] for k in new_keys]] = -np.inf
        # stable sort on (-similarity, key index): ties resolve the same way every run
        nearest = np.argsort(-sims, axis=1, kind="stable")[:, :top_k]
        for k, idx in zip(block, nearest, strict=True):
            for j in idx:
                other = keys[int(j)]
                pair = (k, other) if k < other else (other, k)
                if pair not in seen:
                    seen.add(pair)
                    yield pair


def candidate_pairs(
    known: Mapping[str, Mapping[str, object]],
    new: Mapping[str, Mapping[str, object]],
    config: DedupeConfig = DedupeConfig(),
    within_new: bool = True,
) -> list[tuple[str, str]]:
    """The sorted candidate pairs ``(a, b)``, ``a < b``, that :func:`find_duplicates` verifies."""
    return sorted(_candidates(known, new, config, within_new))


#: One verification task: the two thumbnails (bytes), their side, and the config.
VerifyTask = tuple[bytes, bytes, int, DedupeConfig]


def verify_chunk(tasks: list[VerifyTask]) -> list[float]:
    """Chunk worker for ``find_duplicates(map_chunks=...)``: :func:`verify_pair` score of every task.

    Module-level and free of state, so it pickles by reference (Ray tasks, process pools).  A task is
    ``(thumb_a, thumb_b, thumb_size, config)``: only the thumbnails travel, about 32 KiB per pair.
    """
    return [
        verify_pair({"thumb": ta, "thumb_size": n}, {"thumb": tb, "thumb_size": n}, config)
        for ta, tb, n, config in tasks
    ]


def _serial_map(worker: Callable[[list[T]], list[R]], chunks: list[list[T]]) -> list[list[R]]:
    return [worker(chunk) for chunk in chunks]


def _thumb_bytes(fp: Mapping[str, object]) -> bytes:
    data = fp["thumb"]
    return data if isinstance(data, bytes) else bytes(data)  # type: ignore[arg-type]


def find_duplicates(
    known: Mapping[str, Mapping[str, object]],
    new: Mapping[str, Mapping[str, object]],
    config: DedupeConfig = DedupeConfig(),
    map_chunks: ChunkMapper | None = None,
    chunk_size: int = 48,
    named_pairs: Iterable[tuple[str, str]] = (),
    within_new: bool = True,
) -> list[DuplicatePair]:
    """Confirmed duplicate pairs among ``new`` and between ``new`` and ``known``, sorted by (a, b).

    Known-vs-known pairs are never compared.  A key present in both mappings is treated as new.
    ``named_pairs`` are extra candidates the caller has reason to suspect (the same file name in two
    sources); they are verified like the others, against ``config.same_name_max_residual``.
    ``within_new=False`` compares new keys only with known ones (e.g. films under evaluation with a
    model's training images), not with each other.

    Candidate search runs here; the verification of the candidate pairs is split into chunks of
    ``chunk_size`` :data:`VerifyTask` items and run as ``map_chunks(verify_chunk, chunks)``, which must
    return one list of scores per chunk, in order (``None``: sequentially in this process).  The result is
    identical whichever mapper runs the chunks.
    """
    fps = {**known, **new}
    named = {(a, b) if a < b else (b, a) for a, b in named_pairs if a != b and a in fps and b in fps}
    named = {pair for pair in named if pair[0] in new or pair[1] in new}
    candidates = sorted(set(candidate_pairs(known, new, config, within_new)) | named)
    if not candidates:
        return []
    thumbs = {k: _thumb_bytes(fps[k]) for pair in candidates for k in pair}
    sizes = {int(fps[k]["thumb_size"]) for k in thumbs}  # type: ignore[arg-type]
    if len(sizes) != 1:
        raise ValueError("fingerprints with different thumb_size cannot be compared")
    size = sizes.pop()
    tasks: list[VerifyTask] = [(thumbs[a], thumbs[b], size, config) for a, b in candidates]
    chunks = [tasks[i : i + chunk_size] for i in range(0, len(tasks), chunk_size)]
    results = (map_chunks or _serial_map)(verify_chunk, chunks)
    scores = [score for chunk_scores in results for score in chunk_scores]
    if len(scores) != len(candidates):
        raise RuntimeError(f"map_chunks returned {len(scores)} scores for {len(candidates)} pairs")
    pairs: list[DuplicatePair] = []
    for (a, b), score in zip(candidates, scores, strict=True):
        limit = (
            max(config.max_residual, config.same_name_max_residual)
            if (a, b) in named
            else config.max_residual
        )
        if score <= limit:
            distance = hamming(int(str(fps[a]["phash"]), 16), int(str(fps[b]["phash"]), 16))
            pairs.append(DuplicatePair(a=a, b=b, distance=distance, score=round(float(score), 6)))
    return pairs
