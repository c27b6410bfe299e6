"""Verification of candidate pairs on their stored 128 px thumbnails: the score of one pair
(:func:`verify_pair`) or of a self-contained chunk of pairs (:class:`VerifyChunk`, :func:`verify_chunk`,
run as Ray tasks); lower is more alike (see :class:`~lxn_ray.dedupe.search.DuplicatePair`).

What is left between two copies of one film after the fingerprint's trimming is a scale + translation per
axis (:mod:`lxn_ray.dedupe.fingerprint`). A candidate proposed in another orientation (mirrored, turned,
inverted: :mod:`lxn_ray.dedupe.orientation`) is compared with the other thumbnail in that orientation; the
scores below are all rank-based, so an inverted thumbnail is compared exactly as a plain one.

0. at 64 px, the best 1-D alignment of the row/column profiles must correlate (each axis's profile is also
   taken over the central band of the other axis, so a copy cropped along that axis still correlates);
   vectorised over a whole chunk before any pair is aligned (:func:`_screen`; the profile machinery of
   stages 0 and 1 is :mod:`lxn_ray.dedupe.profiles`);
1. at 64 px, alternating x/y profile searches restricted to the overlap align the pair, and a rank
   residual rejects clearly different pairs;
2. at 128 px, blurred and rank-equalized, two coordinate descents polish the alignment (one on the absolute
   difference, one on the correlation, which also recovers the alignment of a heavy crop), and the score,
   the lower of the two, is the mean gap between the two images' rank intervals over the overlap after
   dropping the worst ``ignore_fraction`` of pixels (or their weighted median gap where that is larger:
   it tells serial films taken minutes apart from copies). Ranks make brightness/contrast/gamma (clipping
   included) free; dropping the worst pixels makes drawn arrows, letters and markers free. Pixels in a
   uniform mass on BOTH sides (a gray level holding more than ``flat_mass`` of the overlap in each image:
   flat background, saturation) are left out: they match for any two films on the same background.

A re-encoded copy leaves only compression/resampling noise; a serial film leaves residual everywhere
(breathing, rotation, tubes, changed opacities), which translation + scale cannot explain. Known blind
spot: a film that differs ONLY by a local change covering less than ``ignore_fraction`` of the image (same
positioning to the pixel) is indistinguishable from an annotated copy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from threadpoolctl import threadpool_limits

from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.orientation import IDENTITY, orient_thumb
from lxn_ray.dedupe.profiles import (
    PROFILE_BANDS,
    axis_positions,
    band_pairs,
    coarse_corr,
    coarse_hypotheses,
    distinct_hypotheses,
    interpolation,
    masked_mean,
    refine_axis,
    warp_axis,
)
from lxn_ray.dedupe.thumbs import ThumbRef, read_thumbs, thumb_array

__all__ = ["VerifyChunk", "verify_chunk", "verify_pair"]


def _thumb_array(fp: Mapping[str, object]) -> np.ndarray:
    return thumb_array(fp).astype(np.float32)  # inline bytes, or read through a stored ThumbRef


def _equalize(img: np.ndarray) -> np.ndarray:
    """Rank transform (mid-rank of each gray level) to [0, 1]: removes brightness/contrast/gamma changes."""
    levels = np.clip(np.rint(img), 0, 255).astype(np.intp)
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    cdf = np.cumsum(counts)
    mid = (cdf - counts / 2.0) / cdf[-1]
    return mid[levels].astype(np.float32)


def _band_corr(pairs: Sequence[tuple[_Thumb, _Thumb]], axis: str, config: DedupeConfig) -> np.ndarray:
    """The coarse correlations (:func:`coarse_corr`) of every pair's :func:`band_pairs` along ``axis``
    ("bands_x" or "bands_y"): (len(pairs) * n_band_pairs, H) float32, a pair's band pairs in adjacent rows."""
    stacked = [band_pairs(getattr(ta, axis), getattr(tb, axis)) for ta, tb in pairs]
    return coarse_corr(
        np.concatenate([a for a, _ in stacked]), np.concatenate([b for _, b in stacked]), config
    )


def _x_starts(
    corr: np.ndarray, n_pairs: int, m: int, config: DedupeConfig
) -> list[list[tuple[float, float]]]:
    """Per pair, the ``top_k`` best mutually distinct coarse x hypotheses (scale, offset) over its
    :func:`band_pairs`, from their correlations ``corr`` (:func:`_band_corr` of profiles of length ``m``):
    each band pair's own ``top_k`` distinct best, merged by correlation."""
    n_bands = len(corr) // n_pairs
    order = np.argsort(-corr, axis=1, kind="stable")
    scales, offsets = coarse_hypotheses(m, config)

    def ranked(row: int) -> Iterable[tuple[float, float, float]]:
        for h in order[row]:
            if corr[row, h] < -1.5:
                return
            yield float(scales[h]), float(offsets[h]), float(corr[row, h])

    starts = []
    for p in range(n_pairs):
        per_band = [
            c
            for row in range(p * n_bands, (p + 1) * n_bands)
            for c in distinct_hypotheses(ranked(row), config.top_k)
        ]
        starts.append(
            [(s, o) for s, o, _ in distinct_hypotheses(sorted(per_band, key=lambda c: -c[2]), config.top_k)]
        )
    return starts


def _align(a: np.ndarray, b: np.ndarray, x_start: np.ndarray, config: DedupeConfig):
    """Stage 1's alignment of J pairs at once: alternate per-axis searches, each using only the rows/columns
    that overlap on the other axis.

    ``a``, ``b``: (J, m, m) float32 half thumbnails; ``x_start``: (J, 2) (scale, offset) of x. Returns
    ``found`` (J,) bool (False: no y hypothesis overlaps enough), ``y_hyp`` and ``x_hyp`` (J, 2) float32.
    Profiles of the full thumbnails are polluted where one image extends beyond the other (a crop along y
    changes the column means); restricting them to the current overlap removes that bias.
    """
    m = b.shape[1]
    x_hyp, y_hyp = x_start.astype(np.float32), None
    found = np.ones(len(a), dtype=bool)
    for _ in range(2):
        ax, inx = warp_axis(a, 2, m, x_hyp)  # A resampled onto B's columns
        pa, pb = masked_mean(ax, inx, 2), masked_mean(b, inx, 2)
        if y_hyp is None:
            corr = coarse_corr(pa, pb, config)
            best = corr.argmax(axis=1)
            found = corr[np.arange(len(a)), best] >= -1.5
            scales, offsets = coarse_hypotheses(m, config)
            y_hyp = np.stack([scales[best], offsets[best]], axis=1)
        y_hyp = refine_axis(pa, pb, y_hyp, config)
        ay, iny = warp_axis(a, 1, m, y_hyp)  # A resampled onto B's rows
        x_hyp = refine_axis(masked_mean(ay, iny, 1), masked_mean(b, iny, 1), x_hyp, config)
    return found, y_hyp, x_hyp


Overlap = tuple[
    tuple[slice, np.ndarray, np.ndarray, np.ndarray], tuple[slice, np.ndarray, np.ndarray, np.ndarray]
]


@functools.lru_cache(maxsize=64)
def _axis_overlap(n: int, scale: float, offset: float) -> tuple[slice, np.ndarray, np.ndarray, np.ndarray]:
    """B's pixels along one axis that fall inside A under the hypothesis (``scale``, ``offset``): a slice
    (positions are monotonic in the pixel index, so the pixels inside are one run), and A's
    linear-interpolation indices and weights at them (:func:`~lxn_ray.dedupe.profiles.axis_positions`).
    Cached: a coordinate descent moves one axis at a time, so the other axis's overlap recurs. Read only."""
    pos, inside = axis_positions(n, n, np.float32(scale), np.float32(offset))
    idx = np.flatnonzero(inside)
    span = slice(int(idx[0]), int(idx[-1]) + 1) if len(idx) else slice(0, 0)
    arrays = interpolation(pos[span], n)
    for array in arrays:
        array.flags.writeable = False  # shared by every caller of the cache
    return (span, *arrays)


def _overlap(y_hyp, x_hyp, n: int, config: DedupeConfig) -> Overlap | None:
    """The overlap of A warped onto B's (n, n) grid as B's rows and columns (:func:`_axis_overlap`), or None
    unless enough of B lies inside A and enough of A is covered by B (``config.min_overlap``)."""
    ys, xs = (
        _axis_overlap(n, float(y_hyp[0]), float(y_hyp[1])),
        _axis_overlap(n, float(x_hyp[0]), float(x_hyp[1])),
    )
    rows, cols = ys[0].stop - ys[0].start, xs[0].stop - xs[0].start
    frac_b = rows * cols / (n * n)
    if frac_b < config.min_overlap or frac_b * y_hyp[0] * x_hyp[0] < config.min_overlap:
        return None
    return ys, xs


def _warp_overlap(a: np.ndarray, b: np.ndarray, overlap: Overlap) -> tuple[np.ndarray, np.ndarray]:
    """A (n, n) resampled (bilinear) onto B's grid over their ``overlap``, and B there: two (rows, cols)
    arrays. Separable gathers: O(n^2) where the two interpolation matrix products were O(n^3)."""
    (ys, y0, y1, fy), (xs, x0, x1, fx) = overlap
    lo, hi = a[y0], a[y1]
    rows = lo + (hi - lo) * fy[:, None]
    lo, hi = rows[:, x0], rows[:, x1]
    return lo + (hi - lo) * fx, b[ys, xs]


def _rank_residual(a: np.ndarray, b: np.ndarray, y_hyp, x_hyp, config: DedupeConfig) -> float:
    """Coarse score: trimmed mean |rank(A) - rank(B)| over the overlap, ranks taken within the overlap."""
    overlap = _overlap(y_hyp, x_hyp, b.shape[0], config)
    if overlap is None:
        return math.inf
    wa, wb = _warp_overlap(a, b, overlap)
    diff = np.sort(np.abs(_equalize(wa.ravel() * 255.0) - _equalize(wb.ravel() * 255.0)))
    keep = max(1, int(round(len(diff) * (1.0 - config.prefilter_ignore))))
    return float(diff[:keep].mean())


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Row-normalized Gaussian blur as an (n, n) matrix: ``M @ img @ M.T`` blurs both axes. Cached for the
    configured ``blur_sigma``, used by every pair (:func:`_match_resolution`'s extra blurs vary); read
    only."""
    idx = np.arange(n, dtype=np.float32)
    m = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    m = (m / m.sum(axis=1, keepdims=True)).astype(np.float32)
    m.flags.writeable = False
    return m


def _refine_2d(
    a: np.ndarray, b: np.ndarray, y_hyp, x_hyp, config: DedupeConfig, criterion: Literal["abs", "corr"]
):
    """Coordinate descent on (sy, oy, sx, ox) over the overlap of the equalised, blurred images A and B.

    ``criterion="abs"``: minimise their mean absolute difference, steps 1 to 1/4 thumbnail pixel. The
    profile search is good to about half a pixel at 64 px; this polishes it at full resolution.
    ``criterion="corr"``: maximise their Pearson correlation, steps 4 to 1/4 pixel. For a heavy crop, the
    two images were equalised over different extents, so their rank maps differ; the profiles' optimum
    then drifts by several pixels and so does the absolute difference's. Correlation is blind to the
    affine part of that difference, and the coarse steps reach the true alignment.
    """
    n = a.shape[0]
    params = [y_hyp[0], y_hyp[1], x_hyp[0], x_hyp[1]]
    steps, rounds = ((4.0, 2.0, 1.0, 0.5, 0.25), 4) if criterion == "corr" else ((1.0, 0.5, 0.25), 3)

    seen: dict[tuple[float, ...], float] = {}  # the descent comes back to points it has scored

    def cost(p: list[float]) -> float:
        key = tuple(p)
        if key not in seen:
            seen[key] = _cost(p)
        return seen[key]

    def _cost(p: list[float]) -> float:
        overlap = _overlap((p[0], p[1]), (p[2], p[3]), n, config)
        if overlap is None:
            return math.inf
        wa, wb = _warp_overlap(a, b, overlap)
        if criterion == "abs":
            return float(np.abs(wa - wb).mean())
        wa, wb = wa - wa.mean(), wb - wb.mean()
        return 1.0 - float((wa * wb).sum() / math.sqrt(float((wa * wa).sum() * (wb * wb).sum()) + 1e-12))

    best = cost(params)
    for step in steps:
        for _ in range(rounds):
            improved = False
            for dim in range(4):
                for sign in (-1.0, 1.0):
                    trial = list(params)
                    trial[dim] += sign * step / n
                    c = cost(trial)
                    if c < best - 1e-9:
                        best, params, improved = c, trial, True
            if not improved:
                break
    return (params[0], params[1]), (params[2], params[3])


def _gap_residual(a_raw: np.ndarray, b_raw: np.ndarray, y_hyp, x_hyp, config: DedupeConfig) -> float:
    """Final score: trimmed mean rank-interval gap between aligned A and B over the overlap, or their
    median gap times ``median_weight`` where that is larger.

    Each pixel's gray level occupies an interval of ranks [F(v-), F(v)] within the overlap.  The gap
    between A's and B's intervals is 0 when the ranks agree, and also when one image is clipped (a
    saturated block is one wide interval), so brightness/contrast/gamma changes, clipping included, cost
    nothing.  Pixels in a uniform mass on both sides (``flat_mass``: shared background) carry no evidence
    and are left out; of the rest, the worst ``ignore_fraction`` is dropped (annotations, text, arrows).

    The median is what separates serial films taken minutes apart from copies: a copy's gaps are 0 at most
    pixels and large at a few (annotations, compression), a serial film's are small but nonzero almost
    everywhere (breathing, a slight turn of the patient, moved leads), so the two can have the same trimmed
    mean while their medians differ several-fold (see ``DedupeConfig.median_weight``).
    """
    overlap = _overlap(y_hyp, x_hyp, b_raw.shape[0], config)
    if overlap is None:
        return math.inf
    a_in, b_in = _warp_overlap(a_raw, b_raw, overlap)
    return _trimmed_gap(
        a_in.ravel(), b_in.ravel(), config.ignore_fraction, config.flat_mass, config.median_weight
    )


def _rank_interval(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per value, the interval [F(v-), F(v)] of ranks its gray level occupies within ``v`` (in [0, 1])."""
    levels = np.clip(np.rint(v), 0, 255).astype(np.intp)
    counts = np.bincount(levels, minlength=256).astype(np.float64)
    hi = np.cumsum(counts) / len(v)
    lo = hi - counts / len(v)
    return lo[levels], hi[levels]


def _trimmed_gap(
    av: np.ndarray,
    bv: np.ndarray,
    ignore_fraction: float,
    flat_mass: float = 1.0,
    median_weight: float = 0.0,
) -> float:
    """Mean gap between the rank intervals of paired values (``av``, ``bv``: (m,) gray levels), after
    dropping the worst ``ignore_fraction``; or ``median_weight`` times their median gap where that is larger.

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
    return max(float(gap[:keep].mean()), median_weight * float(gap[len(gap) // 2]))


#: The spans of the other axis over which a thumbnail's profiles are averaged: whole, and an eighth off both
#: ends. A copy cropped along y has column means over only part of the rows, and its x profile matches the
#: original's over the central band better than over all rows (and likewise for x). Each band costs one
#: more stage-0 correlation per pair and axis.


@dataclass(frozen=True)
class _Thumb:
    """One thumbnail as verification uses it: raw (n, n) float32, its 2x2-averaged rank-equalised half
    (n/2, n/2), and that half's column (x) and row (y) mean profiles, one per band of
    :data:`PROFILE_BANDS`: (len(PROFILE_BANDS), n/2) each, the whole-image profile first."""

    raw: np.ndarray
    half: np.ndarray
    bands_x: np.ndarray
    bands_y: np.ndarray

    @classmethod
    def of(cls, raw: np.ndarray) -> _Thumb:
        n = raw.shape[0]
        half = _equalize(raw.reshape(n // 2, 2, n // 2, 2).mean(axis=(1, 3)))
        spans = [(round(lo * n / 2), round(hi * n / 2)) for lo, hi in PROFILE_BANDS]
        bands_x = np.stack([half[i0:i1].mean(axis=0) for i0, i1 in spans])
        bands_y = np.stack([half[:, i0:i1].mean(axis=1) for i0, i1 in spans])
        return cls(raw, half, bands_x, bands_y)


def _screen(
    pairs: Sequence[tuple[_Thumb, _Thumb]], config: DedupeConfig
) -> tuple[list[float | None], np.ndarray]:
    """Stage 0 for many pairs at once: the score of each pair rejected by its best 1-D profile correlation
    (``2 - corr`` of the failing axis, x first; ``inf`` with no overlapping hypothesis), or None for a pair
    that goes on to stages 1 and 2. An axis's correlation is the best over :func:`band_pairs`, so a copy
    cropped along the other axis is not rejected. Cheap (no alignment), and it rejects most candidates.
    Also returns the x correlations of every pair (:func:`_band_corr`), where stage 1 starts."""
    if not pairs:
        return [], np.empty((0, 0), dtype=np.float32)

    def best_corr(corr: np.ndarray, n_pairs: int) -> np.ndarray:
        return corr.max(axis=1).reshape(n_pairs, -1).max(axis=1)

    band_corr_x = _band_corr(pairs, "bands_x", config)
    corr_x = best_corr(band_corr_x, len(pairs))
    scores: list[float | None] = [
        math.inf if cx < -1.5 else 2.0 - cx if cx < config.min_profile_corr else None
        for cx in corr_x.tolist()
    ]
    passed_x = [i for i, score in enumerate(scores) if score is None]  # y is computed for these only
    if passed_x:
        corr_y = best_corr(_band_corr([pairs[i] for i in passed_x], "bands_y", config), len(passed_x))
        for i, cx, cy in zip(passed_x, corr_x[passed_x].tolist(), corr_y.tolist(), strict=True):
            # the grid is the same on both axes, so y has an overlapping hypothesis where x has one
            if cy < config.min_profile_corr:
                scores[i] = 2.0 - min(cx, cy)  # clearly not a duplicate; > any stage-1/2 score
    return scores, band_corr_x


Alignment = tuple[tuple[float, float], tuple[float, float]]  # ((scale_y, offset_y), (scale_x, offset_x))


def _stage1(
    pairs: Sequence[tuple[_Thumb, _Thumb]], config: DedupeConfig, corr_x: np.ndarray | None = None
) -> list[tuple[float, Alignment | None]]:
    """Stage 1 of pairs that passed :func:`_screen`, all aligned at once (:func:`_align`) from each pair's
    x starts (:func:`_x_starts`; from ``corr_x``, their :func:`_band_corr` along x, where the screen computed
    it): per pair, its lowest rank residual and that alignment, or (inf, None) where no alignment overlaps
    enough."""
    results: list[tuple[float, Alignment | None]] = [(math.inf, None)] * len(pairs)
    if not pairs:
        return results
    if corr_x is None:
        corr_x = _band_corr(pairs, "bands_x", config)
    m = pairs[0][0].half.shape[0]
    jobs = [
        (p, start) for p, starts in enumerate(_x_starts(corr_x, len(pairs), m, config)) for start in starts
    ]
    if not jobs:
        return results
    a = np.stack([pairs[p][0].half for p, _ in jobs])
    b = np.stack([pairs[p][1].half for p, _ in jobs])
    found, y_hyp, x_hyp = _align(a, b, np.asarray([start for _, start in jobs], dtype=np.float32), config)
    for j, (p, _) in enumerate(jobs):  # a pair's starts in rank order; the first of equal residuals wins
        if found[j]:
            y, x = (float(y_hyp[j, 0]), float(y_hyp[j, 1])), (float(x_hyp[j, 0]), float(x_hyp[j, 1]))
            residual = _rank_residual(a[j], b[j], y, x, config)
            if residual < results[p][0]:
                results[p] = (residual, (y, x))
    return results


def _stage2(ta: _Thumb, tb: _Thumb, coarse: float, best: Alignment | None, config: DedupeConfig) -> float:
    """Stage 2 of one pair from its stage-1 residual and alignment (see :func:`verify_pair`)."""
    if best is None:
        return math.inf
    if coarse > config.prefilter_residual:
        return 1.0 + coarse  # clearly not a duplicate
    n = ta.raw.shape[0]
    blur = _blur_matrix(n, config.blur_sigma)
    a_raw, b_raw = blur @ ta.raw @ blur.T, blur @ tb.raw @ blur.T
    a_eq, b_eq = _equalize(a_raw), _equalize(b_raw)
    score = math.inf
    for criterion in ("abs", "corr"):  # each finds alignments the other misses (see _refine_2d)
        y_hyp, x_hyp = _refine_2d(a_eq, b_eq, best[0], best[1], config, criterion)
        a_res, b_res = _match_resolution(a_raw, b_raw, y_hyp[0], x_hyp[0], config.blur_sigma)
        score = min(score, _gap_residual(a_res, b_res, y_hyp, x_hyp, config))
    return score


def _verify(pairs: Sequence[tuple[_Thumb, _Thumb]], config: DedupeConfig) -> list[float]:
    """The score of every pair: stage 0 for all (:func:`_screen`), then stages 1 and 2 for those it passes.

    The alignment is asymmetric (A is resampled onto B's grid, and the search starts from B's profiles), so a
    pair whose score lands between ``max_residual`` and ``reverse_below`` is aligned and scored again with
    the roles swapped, and the lower score counts: a copy shrunk and re-encoded, whose one-way alignment
    settles a pixel off, then scores like its other-way one. Clear pairs and clear rejections pay nothing.
    """
    scores, corr_x = _screen(pairs, config)
    todo = [i for i, score in enumerate(scores) if score is None]
    n_bands = len(corr_x) // max(1, len(pairs))
    rows = [i * n_bands + band for i in todo for band in range(n_bands)]  # the x correlations of todo
    for i, stage1 in zip(todo, _stage1([pairs[i] for i in todo], config, corr_x[rows]), strict=True):
        scores[i] = _stage2(*pairs[i], *stage1, config)
    unsure = [i for i in todo if config.max_residual < scores[i] <= config.reverse_below]
    swapped = [(pairs[i][1], pairs[i][0]) for i in unsure]
    for i, pair, stage1 in zip(unsure, swapped, _stage1(swapped, config), strict=True):
        scores[i] = min(scores[i], _stage2(*pair, *stage1, config))
    return scores  # type: ignore[return-value]  # every None was filled


def verify_pair(
    fa: Mapping[str, object],
    fb: Mapping[str, object],
    config: DedupeConfig = DedupeConfig(),
    orientation: int = IDENTITY,
) -> float:
    """Verification score between two fingerprints (see :class:`~lxn_ray.dedupe.search.DuplicatePair`);
    lower = more alike. ``fb``'s thumbnail is compared in ``orientation`` (a code of
    :mod:`lxn_ray.dedupe.orientation`: 0 as stored).

    Stage 0 (64 px profiles, :func:`_screen`): the best 1-D alignment's correlation per axis; clearly
    different pairs stop here. Stage 1 (64 px): profile alignment and a rank residual. Stage 2 (full
    thumbnail): 2-D refinements of the alignment (:func:`_refine_2d`) and the lower rank-interval gap
    score of the two; near the threshold, the lower of both ways round (:func:`_score`).
    Returns ``inf`` when no alignment gives enough overlap; raises ValueError for thumbnails of different
    sizes.
    """
    a_raw, b_raw = _thumb_array(fa), orient_thumb(_thumb_array(fb), orientation)
    if a_raw.shape != b_raw.shape:
        raise ValueError("fingerprints with different thumb_size cannot be compared")
    with threadpool_limits(limits=1):  # as in verify_chunk: BLAS threads only spin on these small products
        return _verify([(_Thumb.of(a_raw), _Thumb.of(b_raw))], config)[0]


def _match_resolution(
    a: np.ndarray, b: np.ndarray, scale_y: float, scale_x: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Blur the sharper side of each axis so both carry the same detail once A is warped onto B's grid.

    Both thumbnails are ``sigma``-blurred; with scale ``s`` (B pixels per A pixel = 1/s), a crop (s < 1)
    shows its content with 1/s times the pixels of A's thumbnail, so A's blur becomes sigma/s in B's
    pixels and B gets sqrt((sigma/s)^2 - sigma^2) more; s > 1 blurs A the other way. Without this a heavy
    crop (an eighth off every side) scores like a different film from its lost detail alone.
    """
    n = a.shape[0]
    blur_a, blur_b = [np.eye(n, dtype=np.float32)] * 2, [np.eye(n, dtype=np.float32)] * 2
    for axis, s in enumerate((scale_y, scale_x)):
        extra = sigma * math.sqrt(abs(1.0 / (s * s) - 1.0)) if s < 1 else sigma * math.sqrt(s * s - 1.0)
        if extra > 0.1:
            (blur_b if s < 1 else blur_a)[axis] = _blur_matrix(n, extra)
    return blur_a[0] @ a @ blur_a[1].T, blur_b[0] @ b @ blur_b[1].T


@dataclass(frozen=True)
class VerifyChunk:
    """A self-contained batch of pairs for :func:`verify_chunk`: only the thumbnails it uses travel, inline
    or as refs into stored shards that are read where the chunk runs.

    ``thumbs``: (u, n, n) uint8, the chunk's inline thumbnails (u may be 0; n is the thumbnails' side);
    ``pairs``: (P, 2) int64 rows (a, b) of the chunk's thumbnail table; ``orientations``: (P,) integer
    codes of :mod:`lxn_ray.dedupe.orientation`, compare ``a`` with ``b`` in that orientation (a bool array
    reads as "flipped left-right or not": code 1 is the mirror). ``stored``: the thumbnails not carried
    inline, as :class:`~lxn_ray.dedupe.thumbs.ThumbRef` s, and ``stored_rows``: (len(stored),) int64,
    their rows in the table; the table has ``u + len(stored)`` rows, the inline ones filling the rows
    ``stored_rows`` leaves free, in order.
    """

    thumbs: np.ndarray
    pairs: np.ndarray
    orientations: np.ndarray
    config: DedupeConfig
    stored: tuple[ThumbRef, ...] = ()
    stored_rows: np.ndarray | None = None

    def thumbnail_table(self) -> np.ndarray:
        """(u + len(stored), n, n) uint8: the inline thumbnails with the stored ones read into their rows.
        Reads only the row groups of ``stored`` (:func:`~lxn_ray.dedupe.thumbs.read_thumbs`)."""
        if not self.stored:
            return self.thumbs
        n = self.thumbs.shape[1]  # (0, n, n) when every thumbnail is stored
        table = np.empty((len(self.thumbs) + len(self.stored), n, n), dtype=np.uint8)
        rows = np.asarray(self.stored_rows, dtype=np.int64)
        inline = np.ones(len(table), dtype=bool)
        inline[rows] = False
        table[inline] = self.thumbs
        table[rows] = read_thumbs(self.stored, n)
        return table


def verify_chunk(chunk: VerifyChunk) -> list[float]:
    """Chunk worker for ``search_duplicates(map_chunks=...)``: the :func:`verify_pair` score of every pair.

    Module-level and free of state, so it pickles by reference (Ray tasks, process pools). Each thumbnail
    is prepared once per chunk and stage 0 runs vectorised over all pairs before any pair is aligned.
    """
    # 128 px matrix products gain nothing from BLAS threads, and on a busy host threads that spin waiting
    # for cores cost 10-100x; parallelism comes from running chunks side by side (Ray tasks).
    thumbs = chunk.thumbnail_table()  # stored thumbnails are read here, on the worker, by row group
    with threadpool_limits(limits=1):
        cache: dict[tuple[int, int], _Thumb] = {}

        def thumb(row: int, orientation: int) -> _Thumb:
            if (row, orientation) not in cache:
                raw = orient_thumb(thumbs[row].astype(np.float32), orientation)
                cache[(row, orientation)] = _Thumb.of(raw)
            return cache[(row, orientation)]

        pairs = [
            (thumb(int(a), IDENTITY), thumb(int(b), int(o)))
            for (a, b), o in zip(chunk.pairs, np.asarray(chunk.orientations).astype(np.int64), strict=True)
        ]
        return _verify(pairs, chunk.config)
