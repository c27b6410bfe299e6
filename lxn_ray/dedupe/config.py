"""The tunables of duplicate detection, in one frozen dataclass (:class:`DedupeConfig`): border trimming
and figure panels (:mod:`lxn_ray.dedupe.fingerprint`), the candidate search's k nearest neighbours
(:mod:`lxn_ray.dedupe.index`), and the alignment and decision thresholds of verification
(:mod:`lxn_ray.dedupe.verify`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxn_ray.dedupe.index import SearchConfig

__all__ = ["DedupeConfig"]


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
    #: Figure panels (``fingerprint._figure_box``): the outer frame counts as a page when this share of its
    #: pixels is within ``figure_tolerance`` gray levels of its median; a row or column holds film when at
    #: least ``figure_content`` of its pixels differ from the page.
    figure_frame_uniform: float = 0.95
    figure_tolerance: int = 12
    figure_content: float = 0.25
    #: ... and the film's box replaces the border-trimmed one when it keeps at most this share of its area.
    figure_max_area: float = 0.8
    #: Images with a longer side above this are reduced before fingerprinting (see :func:`fingerprint`).
    max_side: int = 1024

    # --- candidate search ---
    #: How many nearest neighbours each channel of the candidate index proposes per new image
    #: (:mod:`lxn_ray.dedupe.index`): bounded, so candidates per image do not grow with the collection.
    search: SearchConfig = field(default_factory=SearchConfig)

    # --- verification: alignment search ---
    #: Largest relative scale change per axis between the two content boxes (crop/pad not trimmed): an
    #: eighth cut from every side whose new flat margin is then trimmed leaves ~0.66 of the side.
    max_scale: float = 1.5
    #: Largest offset of one box's origin inside the other, as a fraction of the side.
    max_offset: float = 0.25
    #: Scale steps and offset steps of the coarse 1-D profile search (scale steps ~3% apart: coarser
    #: steps let a broad wrong peak of an ambiguous profile win over a narrow right one).
    scale_steps: int = 29
    offset_steps: int = 31
    #: Stage 0: both axes' best profile correlations must reach this.
    min_profile_corr: float = 0.9
    #: How many best 1-D x hypotheses are each aligned and scored.
    top_k: int = 2
    #: Minimum fraction of each thumbnail that must lie in the overlap (that heavy crop covers ~0.5 of
    #: the original's area).
    min_overlap: float = 0.45

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
    #: The score is the larger of that trimmed mean and this times the median rank-interval gap (same
    #: pixels, nothing trimmed), so a duplicate's median gap must also stay below max_residual / 1.2 = 0.01
    #: (0 disables it). Two films of one patient taken minutes apart with the same framing (NIH follow-ups;
    #: issue 24) reach trimmed means of 0.010-0.012 like a heavily re-encoded copy, but their gaps are small
    #: and nonzero nearly everywhere: medians of 0.013 and up, where copies stay at <= 0.008 (most at 0).
    #: Measured with ``benchmarks/dedupe_quality.py`` (its serial-film pool against its copies).
    median_weight: float = 1.2
    #: A pair scoring above max_residual but at most this one way round is also aligned and scored the other
    #: way round (B onto A), and the lower score counts (``verify._verify``): the alignment is asymmetric, and
    #: a shrunk, re-encoded copy can settle a pixel off one way only (seed 0 of the benchmark: 0.015 one way,
    #: 0.007 the other). Serial films of one patient stay above 0.016 both ways. Costs a second alignment for
    #: those pairs only.
    reverse_below: float = 0.05
    #: ... or at most this for a pair the caller proposes because both files carry the same name in two
    #: sources (``find_duplicates(named_pairs=...)``): the name is evidence of its own, so the image test may
    #: be looser. Measured on darkcovidnet's republished ieee8023 films (re-cropped figure panels score
    #: 0.012-0.019; different films of one patient score well above 0.03).
    same_name_max_residual: float = 0.02
