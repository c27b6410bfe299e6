"""Confirmed duplicate pairs among new images and between new and known ones
(:func:`find_duplicates`, :func:`search_duplicates` with counts and timings): candidate search, then
verification of each candidate pair, in the calling process or through a :data:`ChunkMapper` (Ray tasks).
Grouping pairs into components, choosing which copy to keep and splitting are done by the caller.

Why two stages: a perceptual hash alone cannot separate "the same radiograph, re-encoded" from "another
radiograph of the same patient a day later": serial films share anatomy and positioning, so their hashes
are as close as those of a cropped or padded copy (at phash distance 10 about one reported pair in three is
wrong). So hashes and low-resolution appearance only propose *candidates*: each new image's k nearest
images in several channels (:mod:`lxn_ray.dedupe.index`: two hashes, the 8x8 appearance vector plain and
mirrored, in the other orientations of :mod:`lxn_ray.dedupe.orientation` - quarter and half turns, negative
prints - and sub-windows for heavy crops), a bounded number per image however large the collection. Each
candidate pair is then *verified* on the stored thumbnails (:mod:`lxn_ray.dedupe.verify`), in the orientation
it was proposed in.

Candidate search is cheap and runs here; verification (milliseconds per pair) is split into self-contained
chunks (:class:`~lxn_ray.dedupe.verify.VerifyChunk`: the chunk's thumbnails once, and index pairs) handed
to an optional ``map_chunks(verify_chunk, chunks)``. A fingerprint's ``thumb`` may be inline bytes or a
:class:`~lxn_ray.dedupe.thumbs.ThumbRef` into a stored shard: a chunk carries refs, and the worker running it
reads just those rows' row groups, so no process holds the thumbnails of the whole collection.
``verify_chunk`` is a module-level pure function, so
the result does not depend on where or in which order the chunks run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.fingerprint import hamming
from lxn_ray.dedupe.index import Candidate, CandidateIndex
from lxn_ray.dedupe.orientation import describe, is_mirrored
from lxn_ray.dedupe.thumbs import ThumbRef
from lxn_ray.dedupe.verify import VerifyChunk, verify_chunk

__all__ = [
    "ChunkMapper",
    "DuplicatePair",
    "DuplicateSearch",
    "candidate_pairs",
    "find_duplicates",
    "search_duplicates",
]


T = TypeVar("T")


R = TypeVar("R")


#: ``map_chunks(worker, chunks) -> results``: applies a picklable module-level ``worker`` to every chunk
#: and returns the per-chunk result lists in the order of ``chunks`` (e.g. as Ray tasks).
ChunkMapper = Callable[[Callable[[T], list[R]], list[T]], list[list[R]]]


@dataclass(frozen=True)
class DuplicatePair:
    """One confirmed duplicate pair; ``a < b`` (string order of the keys).

    ``distance`` is the Hamming distance between the two whole-image phashes (for reporting and for
    comparison with plain hash thresholds).  ``score`` is the verification score in [0, 1]: after
    aligning the two thumbnails (scale + shift per axis), the mean rank-interval gap between their blurred
    intensities over the overlap, leaving out pixels in a uniform mass on both sides (``flat_mass``) and
    ignoring the worst ``ignore_fraction`` of the rest, or ``median_weight`` times their median gap where
    that is larger (see :mod:`lxn_ray.dedupe.verify`).
    0 means identical up to crop/pad/resize/brightness/contrast/gamma; pairs are reported when
    ``score <= config.max_residual``.

    ``orientation`` is the code (:mod:`lxn_ray.dedupe.orientation`) in which ``b`` matched ``a``: 0 as stored,
    1 flipped left-right, others turned and/or inverted; ``mirrored`` is whether that orientation swaps left
    and right (the plain mirror, or a mirror with turns).
    """

    a: str
    b: str
    distance: int
    score: float
    mirrored: bool = False  # ``b`` is ``a`` flipped left-right (possibly turned as well)
    orientation: int = 0

    @property
    def orientation_name(self) -> str:
        """``orientation`` in words: "identity", "mirrored", "turned 90", "turned 180+inverted", ..."""
        return describe(self.orientation)


@dataclass(frozen=True)
class DuplicateSearch:
    """What :func:`search_duplicates` found and what it cost (seconds of wall time in this process)."""

    pairs: list[DuplicatePair]
    candidates: int  # pairs verified (a pair checked in two orientations counts twice)
    new_images: int
    index_seconds: float  # building the candidate index from stored vectors
    query_seconds: float  # the k-nearest-neighbour queries
    verify_seconds: float  # verification, wherever ``map_chunks`` ran it


def _candidates(
    known: Mapping[str, Mapping[str, object]],
    new: Mapping[str, Mapping[str, object]],
    config: DedupeConfig,
    within_new: bool = True,
) -> tuple[list[Candidate], CandidateIndex]:
    """Candidate pairs with at least one side in ``new`` (``within_new=False``: the other side in
    ``known``), from a :class:`~lxn_ray.dedupe.index.CandidateIndex` over both; and the index (timings)."""
    index = CandidateIndex.from_fingerprints({**known, **new})
    searchable = None if within_new else [k for k in known if k not in new]
    return index.candidates(sorted(new), searchable, config.search), index


def candidate_pairs(
    known: Mapping[str, Mapping[str, object]],
    new: Mapping[str, Mapping[str, object]],
    config: DedupeConfig = DedupeConfig(),
    within_new: bool = True,
) -> list[tuple[str, str]]:
    """The sorted candidate pairs ``(a, b)``, ``a < b``, that :func:`find_duplicates` verifies."""
    return sorted({(c.a, c.b) for c in _candidates(known, new, config, within_new)[0]})


def _serial_map(worker: Callable[[T], list[R]], chunks: list[T]) -> list[list[R]]:
    return [worker(chunk) for chunk in chunks]


def _thumb_bytes(fp: Mapping[str, object]) -> bytes:
    data = fp["thumb"]
    return data if isinstance(data, bytes) else bytes(data)  # type: ignore[arg-type]


def _chunk(
    part: Sequence[Candidate], fps: Mapping[str, Mapping[str, object]], size: int, config: DedupeConfig
) -> VerifyChunk:
    """The :class:`VerifyChunk` of ``part``: thumbnails computed in this run travel inline, stored ones
    (:class:`~lxn_ray.dedupe.thumbs.ThumbRef`) as refs read by the worker; rows in sorted key order."""
    used = sorted({k for c in part for k in (c.a, c.b)})
    row = {k: i for i, k in enumerate(used)}
    inline, stored, stored_rows = [], [], []
    for i, k in enumerate(used):
        thumb = fps[k]["thumb"]
        if isinstance(thumb, ThumbRef):
            stored.append(thumb)
            stored_rows.append(i)
        else:
            inline.append(np.frombuffer(_thumb_bytes(fps[k]), np.uint8).reshape(size, size))
    return VerifyChunk(
        thumbs=np.stack(inline) if inline else np.zeros((0, size, size), np.uint8),
        pairs=np.array([(row[c.a], row[c.b]) for c in part], dtype=np.int64),
        orientations=np.array([c.orientation for c in part], dtype=np.int64),
        config=config,
        stored=tuple(stored),
        stored_rows=np.array(stored_rows, dtype=np.int64) if stored else None,
    )


def find_duplicates(
    known: Mapping[str, Mapping[str, object]],
    new: Mapping[str, Mapping[str, object]],
    config: DedupeConfig = DedupeConfig(),
    map_chunks: ChunkMapper | None = None,
    chunk_size: int = 256,
    named_pairs: Iterable[tuple[str, str]] = (),
    within_new: bool = True,
) -> list[DuplicatePair]:
    """Confirmed duplicate pairs among ``new`` and between ``new`` and ``known``, sorted by (a, b): the
    ``pairs`` of :func:`search_duplicates` (same arguments)."""
    return search_duplicates(known, new, config, map_chunks, chunk_size, named_pairs, within_new).pairs


def search_duplicates(
    known: Mapping[str, Mapping[str, object]],
    new: Mapping[str, Mapping[str, object]],
    config: DedupeConfig = DedupeConfig(),
    map_chunks: ChunkMapper | None = None,
    chunk_size: int = 256,
    named_pairs: Iterable[tuple[str, str]] = (),
    within_new: bool = True,
) -> DuplicateSearch:
    """Confirmed duplicate pairs among ``new`` and between ``new`` and ``known``, with counts and timings.

    Known-vs-known pairs are never compared.  A key present in both mappings is treated as new.
    ``named_pairs`` are extra candidates the caller has reason to suspect (the same file name in two
    sources); they are verified like the others, against ``config.same_name_max_residual``.
    ``within_new=False`` compares new keys only with known ones (e.g. films under evaluation with a
    model's training images), not with each other. A candidate proposed in another orientation (mirrored,
    turned, inverted) is verified against ``b`` in that orientation; a pair confirmed in several keeps its
    best score.

    Candidate search (:mod:`lxn_ray.dedupe.index`) runs here; the verification of the candidate pairs is
    split into :class:`~lxn_ray.dedupe.verify.VerifyChunk` s of ``chunk_size`` pairs and run as
    ``map_chunks(verify_chunk, chunks)``, which must return one list of scores per chunk, in order
    (``None``: sequentially in this process).  The result is identical whichever mapper runs the chunks.
    Raises ValueError for fingerprints of different ``thumb_size``.
    """
    fps = {**known, **new}
    named = {(a, b) if a < b else (b, a) for a, b in named_pairs if a != b and a in fps and b in fps}
    named = {pair for pair in named if pair[0] in new or pair[1] in new}
    found, index = _candidates(known, new, config, within_new)
    candidates = sorted(set(found) | {Candidate(a, b) for a, b in named})
    if not candidates:
        return DuplicateSearch([], 0, len(new), index.build_seconds, index.query_seconds, 0.0)
    started = time.perf_counter()
    keys = sorted({k for c in candidates for k in (c.a, c.b)})
    sizes = {int(fps[k]["thumb_size"]) for k in keys}  # type: ignore[arg-type]
    if len(sizes) != 1:
        raise ValueError("fingerprints with different thumb_size cannot be compared")
    size = sizes.pop()
    chunks = [
        _chunk(candidates[start : start + chunk_size], fps, size, config)
        for start in range(0, len(candidates), chunk_size)
    ]
    results = (map_chunks or _serial_map)(verify_chunk, chunks)
    scores = [score for chunk_scores in results for score in chunk_scores]
    if len(scores) != len(candidates):
        raise RuntimeError(f"map_chunks returned {len(scores)} scores for {len(candidates)} pairs")
    best: dict[tuple[str, str], DuplicatePair] = {}
    for c, score in zip(candidates, scores, strict=True):
        limit = config.max_residual
        if (c.a, c.b) in named:
            limit = max(config.max_residual, config.same_name_max_residual)
        score = round(float(score), 6)
        if score <= limit and ((c.a, c.b) not in best or score < best[(c.a, c.b)].score):
            distance = hamming(int(str(fps[c.a]["phash"]), 16), int(str(fps[c.b]["phash"]), 16))
            best[(c.a, c.b)] = DuplicatePair(
                c.a, c.b, distance, score, is_mirrored(c.orientation), c.orientation
            )
    return DuplicateSearch(
        pairs=[best[k] for k in sorted(best)],
        candidates=len(candidates),
        new_images=len(new),
        index_seconds=index.build_seconds,
        query_seconds=index.query_seconds,
        verify_seconds=time.perf_counter() - started,
    )
