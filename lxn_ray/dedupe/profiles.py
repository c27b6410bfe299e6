"""1-D alignment of two thumbnails' row and column profiles, the first stages of
:mod:`lxn_ray.dedupe.verify`: an axis hypothesis (scale, offset), the Pearson correlation of two profiles
under many hypotheses at once (a coarse grid for a whole chunk of pairs as one matrix product, local
refinement), and resampling images along an axis under a hypothesis.

Arrays: profiles are float32 ``(J, m)`` rows (one row per pair or band pair), hypotheses ``(J, 2)`` or
``(J, H)`` float32; coordinates are normalized to [0, 1] across each image.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np

from lxn_ray.dedupe.config import DedupeConfig

# An axis hypothesis (scale, offset) maps B's normalized coordinate u_b in [0, 1] to A's:
#     u_a = 0.5 + offset + scale * (u_b - 0.5)
# (offset between box centres, so scale and shift decouple).  scale < 1: B shows part of A (B is a crop of
# A, or A carries an untrimmed border); scale > 1: the other way round.


def axis_positions(
    n_src: int, n_dst: int, scale: np.ndarray, offset: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Source pixel positions of the destination pixel centres, and whether they fall inside the source.

    ``scale``/``offset`` broadcast against each other; the output gets a trailing axis of length n_dst.
    """
    ub = (np.arange(n_dst, dtype=np.float32) + 0.5) / n_dst
    ua = 0.5 + offset[..., None] + scale[..., None] * (ub - 0.5)
    pos = ua * n_src - 0.5
    return pos, (pos >= -0.5) & (pos <= n_src - 0.5)


def interpolation(pos: np.ndarray, n_src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation at source positions ``pos`` (clipped to the source): the two neighbouring
    indices (intp) and the weight of the second (float32), each shaped like ``pos``."""
    pos = np.clip(pos, 0.0, n_src - 1.0)
    i0 = np.floor(pos).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_src - 1), (pos - i0).astype(np.float32)


def _profile_grid(n_src: int, n_dst: int, scales: np.ndarray, offsets: np.ndarray, min_overlap: float):
    """Everything about a grid of (scale, offset) hypotheses that does not depend on the profiles.

    Returns (i0, i1, frac, w, cnt_safe, ok): linear-interpolation indices/weights of A's profile at B's
    sample positions, the inside mask as weights, the per-hypothesis sample count and the overlap test.
    """
    pos, inside = axis_positions(n_src, n_dst, scales, offsets)
    i0, i1, frac = interpolation(pos, n_src)
    w = inside.astype(np.float32)
    cnt = w.sum(axis=-1)
    # overlap as a fraction of B (samples inside A) and of A (covered length = scale * fraction of B)
    ok = (cnt >= min_overlap * n_dst) & (scales * cnt / n_dst >= min_overlap)
    return i0, i1, frac, w, np.maximum(cnt, 1.0), ok


def profile_corr(
    pa: np.ndarray, pb: np.ndarray, scales: np.ndarray, offsets: np.ndarray, min_overlap: float
) -> np.ndarray:
    """Pearson correlation of each B profile with its A profile resampled at each of its hypotheses.

    ``pa``, ``pb``: (J, m) profiles; ``scales``, ``offsets``: (J, H) hypotheses per row. Returns (J, H)
    float32; hypotheses whose overlap covers less than ``min_overlap`` of either profile get -2.
    """
    i0, i1, frac, w, cnt_safe, ok = _profile_grid(pa.shape[1], pb.shape[1], scales, offsets, min_overlap)
    flat, base = pa.ravel(), (np.arange(len(pa)) * pa.shape[1])[:, None, None]  # a flat gather: faster
    lo, hi = flat[i0 + base], flat[i1 + base]  # than take_along_axis, the same values
    sampled = lo + (hi - lo) * frac  # (J, H, m)
    ma = (sampled * w).sum(axis=-1) / cnt_safe
    mb = np.einsum("jhm,jm->jh", w, pb) / cnt_safe
    da = (sampled - ma[..., None]) * w
    db = (pb[:, None, :] - mb[..., None]) * w
    corr = (da * db).sum(axis=-1) / np.sqrt((da * da).sum(axis=-1) * (db * db).sum(axis=-1) + 1e-12)
    return np.where(ok, corr, -2.0)


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


def coarse_hypotheses(m: int, config: DedupeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(H,) scales and (H,) offsets of the coarse grid, in the hypothesis order of :func:`coarse_corr`."""
    scales, offsets, _ = _coarse_grid(
        m, m, config.max_scale, config.max_offset, config.scale_steps, config.offset_steps, config.min_overlap
    )
    grid_s, grid_o = np.broadcast_arrays(scales[:, None], offsets[None, :])
    return grid_s.ravel(), grid_o.ravel()


def distinct_hypotheses(
    ranked: Iterable[tuple[float, float, float]], top_k: int
) -> list[tuple[float, float, float]]:
    """The first ``top_k`` (scale, offset, correlation) hypotheses of ``ranked`` (best first) that differ
    from every earlier pick by more than 0.04 in scale or in offset. Stops reading ``ranked`` there."""
    picks: list[tuple[float, float, float]] = []
    for cand in ranked:
        if all(abs(cand[0] - s) > 0.04 or abs(cand[1] - o) > 0.04 for s, o, _ in picks):
            picks.append(cand)
            if len(picks) >= top_k:
                break
    return picks


def refine_axis(pa: np.ndarray, pb: np.ndarray, start: np.ndarray, config: DedupeConfig) -> np.ndarray:
    """Local coarse-to-fine search around each row's ``start``: 7x7 grids with halving spans.

    ``pa``, ``pb``: (J, m) profiles; ``start``: (J, 2) float32 (scale, offset). Returns (J, 2) float32.
    """
    s0, o0 = start[:, 0], start[:, 1]
    span = 0.06
    steps = np.linspace(-1.0, 1.0, 7, dtype=np.float32)
    rows = np.arange(len(start))
    for _ in range(4):
        scales = np.repeat(s0[:, None] * np.exp(steps * span), 7, axis=1)  # (J, 49): scale-major, as a 7x7
        offsets = np.tile(o0[:, None] + steps * span, 7)
        best = profile_corr(pa, pb, scales, offsets, config.min_overlap).argmax(axis=1)
        s0, o0 = scales[rows, best], offsets[rows, best]
        span /= 3.0
    return np.stack([s0, o0], axis=1)


def warp_axis(a: np.ndarray, axis: int, n_dst: int, hyp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resample each image of ``a`` (J, n, n) along ``axis`` (1: rows, 2: columns) onto B's grid for its
    hypothesis ``hyp`` (J, 2) (scale, offset); returns the values and the inside mask (J, n_dst)."""
    n_src = a.shape[axis]
    pos, inside = axis_positions(n_src, n_dst, hyp[:, 0], hyp[:, 1])
    i0, i1, frac = interpolation(pos, n_src)
    at = (slice(None), slice(None), None) if axis == 1 else (slice(None), None, slice(None))
    lo, hi = np.take_along_axis(a, i0[at], axis=axis), np.take_along_axis(a, i1[at], axis=axis)
    return lo + (hi - lo) * frac[at], inside


def masked_mean(values: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    """Mean of (J, n, n) ``values`` along ``axis`` over the entries where the (J, n) ``mask`` holds."""
    at = (slice(None), None, slice(None)) if axis == 2 else (slice(None), slice(None), None)
    weights = mask.astype(np.float32)
    return (values * weights[at]).sum(axis=axis) / np.maximum(weights.sum(axis=1), 1.0)[:, None]


PROFILE_BANDS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.125, 0.875))


def band_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The profile pairs compared for one axis: A's whole profile with each of B's bands and each of A's
    other bands with B's whole profile; (2 * len(PROFILE_BANDS) - 1, m) each."""
    nb = len(PROFILE_BANDS)
    return np.concatenate([np.repeat(a[:1], nb, axis=0), a[1:]]), np.concatenate(
        [b, np.repeat(b[:1], nb - 1, axis=0)]
    )


@functools.lru_cache(maxsize=8)
def _coarse_sampler(
    m: int, max_scale: float, max_offset: float, scale_steps: int, offset_steps: int, min_overlap: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The coarse grid of :func:`_coarse_grid` as one matrix: ``a @ sampler`` is profile ``a`` (m,)
    resampled at every hypothesis h and B sample j, zero outside A: (m, H * m) float32 (~11 MB at m=64).
    Also the inside weights (H, m), the sample counts (H,) and the overlap test (H,)."""
    _, _, (i0, i1, frac, w, cnt_safe, ok) = _coarse_grid(
        m, m, max_scale, max_offset, scale_steps, offset_steps, min_overlap
    )
    n_hyp = i0.shape[0] * i0.shape[1]
    i0, i1, frac, w = (x.reshape(n_hyp, m) for x in (i0, i1, frac, w))
    hyp, sample = np.meshgrid(np.arange(n_hyp), np.arange(m), indexing="ij")
    sampler = np.zeros((m, n_hyp, m), dtype=np.float32)
    np.add.at(sampler, (i0, hyp, sample), (1.0 - frac) * w)
    np.add.at(sampler, (i1, hyp, sample), frac * w)
    return sampler.reshape(m, n_hyp * m), w, cnt_safe.reshape(n_hyp), ok.reshape(n_hyp)


def coarse_corr(pa: np.ndarray, pb: np.ndarray, config: DedupeConfig) -> np.ndarray:
    """Profile correlation of each row pair at every hypothesis of the coarse grid: (P, m) and (P, m) ->
    (P, H) float32, hypotheses in :func:`coarse_hypotheses` order, -2 where the overlap is too small.
    Vectorised over pairs: one matrix product resamples a block of A profiles at every hypothesis
    (:func:`_coarse_sampler`), and the correlations follow from sums."""
    sampler, w, cnt, ok = _coarse_sampler(
        pa.shape[1],
        config.max_scale,
        config.max_offset,
        config.scale_steps,
        config.offset_steps,
        config.min_overlap,
    )
    # centred first, so the sums below do not cancel in float32
    pa = (pa - pa.mean(axis=1, keepdims=True)).astype(np.float32)
    pb = (pb - pb.mean(axis=1, keepdims=True)).astype(np.float32)
    out = np.empty((len(pa), len(cnt)), dtype=np.float32)
    for start in range(0, len(pa), 64):
        a, b = pa[start : start + 64], pb[start : start + 64]
        sampled = (a @ sampler).reshape(len(a), len(cnt), -1)  # (P, H, m)
        sum_a, sum_b = sampled.sum(axis=-1), b @ w.T
        cov = np.einsum("phj,pj->ph", sampled, b) - sum_a * sum_b / cnt
        var_a = np.einsum("phj,phj->ph", sampled, sampled) - sum_a * sum_a / cnt
        var_b = (b * b) @ w.T - sum_b * sum_b / cnt
        corr = cov / np.sqrt(np.maximum(var_a * var_b, 0.0) + 1e-12)
        out[start : start + 64] = np.where(ok, corr, -2.0)
    return out
