"""Candidate search for duplicate detection: k-nearest neighbours in faiss indexes.

Verifying a pair of fingerprints costs milliseconds (:func:`lxn_ray.dedupe.verify.verify_pair`), so which
pairs are verified decides how duplicate detection grows with a collection. A fixed Hamming radius
proposes a share of *all* images (at radius 16 of 64 bits, about one in thirty: n^2/34 pairs), so it
grows with the collection. This index proposes each new image's **k nearest** images in several channels
instead, so the candidates per new image stay bounded by the sum of the k's whatever the size of the
collection; a true copy is still among the nearest even when its distance is large, because distances are
compared with other images', not with a threshold.

Channels (each a flat, exact faiss index: every query scans the collection with SIMD popcounts or one
matrix product, ~0.1 ms per 10k images; results do not depend on insertion order beyond ties):

* ``phash_trim`` and ``phash``: Hamming distance of the 64-bit perceptual hashes (``IndexBinaryFlat``).
* ``lowres``: cosine similarity of the rank-equalised thumbnail averaged to 8x8 (``IndexFlatIP``):
  brightness, contrast, gamma, re-encoding and small crops barely move it. Queried a second time with the
  left-right mirrored vector: a mirrored figure (a common publishing error) is proposed as a *mirrored*
  candidate and verified against the mirrored thumbnail.
* ``oriented``: the same vector in each of the 14 other orientations of :mod:`lxn_ray.dedupe.orientation`
  (quarter and half turns, each mirrored or not, and all eight with the grey scale inverted: a negative
  print), like the mirrored one: each hit is proposed in the orientation that matched and verified against
  the thumbnail in that orientation.
* ``windows``: the same 8x8 vector of sub-windows of each thumbnail (:data:`WINDOW_SCALES` x 3x3
  anchors). A new image's whole vector is searched among others' windows (it is a crop of another), and
  its windows among others' whole vectors (another is a crop of it, or it shows another inside a figure).

The vectors are part of the fingerprint (:func:`lxn_ray.dedupe.fingerprint.fingerprint`), so they are
cached in storage with it and an incremental ingest builds the index from stored fingerprints without
decoding or re-fingerprinting a published image. Building a flat index is a copy of the vectors (seconds
at 100k).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from lxn_ray.dedupe.orientation import IDENTITY, MIRROR, ORIENTATIONS, inverse, is_mirrored, orient_vectors

__all__ = ["VECTOR_SIDE", "WINDOW_SCALES", "Candidate", "CandidateIndex", "SearchConfig", "vectors_of"]

#: Side of the low-resolution appearance grid: vectors have VECTOR_SIDE**2 = 64 entries.
VECTOR_SIDE = 8
#: Relative sides of the sub-windows, each placed at 3x3 anchors (left/centre/right x top/middle/bottom).
WINDOW_SCALES = (0.8, 0.65)
#: Anchors of the windows along one axis: touching the start, centred, touching the end.
_ANCHORS = (0.0, 0.5, 1.0)
N_WINDOWS = len(WINDOW_SCALES) * len(_ANCHORS) ** 2


@dataclass(frozen=True)
class SearchConfig:
    """How many nearest neighbours each channel proposes per new image (see the module docstring)."""

    phash_trim_k: int = 6
    phash_k: int = 3
    lowres_k: int = 6
    mirror_k: int = 2
    #: The appearance vector in each of the 14 other orientations (turned, mirrored and turned, inverted):
    #: this many per orientation. Per orientation, not pooled: a film republished in several orientations
    #: matches a query perfectly in each, and a pooled few would be spent on those copies alone.
    orient_k: int = 1
    #: A new image's whole vector among others' windows: this many distinct images.
    crop_of_k: int = 3
    #: The windows of a new image among others' whole vectors: this many distinct images.
    window_k: int = 3


@dataclass(frozen=True, order=True)
class Candidate:
    """A pair to verify: ``a < b``; compare ``a`` with ``b`` in ``orientation`` (a code of
    :mod:`lxn_ray.dedupe.orientation`: 0 as stored, 1 flipped left-right, ...)."""

    a: str
    b: str
    orientation: int = IDENTITY

    @property
    def mirrored(self) -> bool:
        """Whether ``b`` is compared mirrored (left and right swapped, whatever the turns)."""
        return is_mirrored(self.orientation)


def _rank_equalize(img: np.ndarray) -> np.ndarray:
    levels = np.clip(np.rint(img), 0, 255).astype(np.intp)
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    cdf = np.cumsum(counts)
    return ((cdf - counts / 2.0) / cdf[-1])[levels]


def _grid_vector(region: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm VECTOR_SIDE**2 vector of ``region`` (2-D) rank-equalised and area-averaged."""
    eq = Image.fromarray(_rank_equalize(region).astype(np.float32), mode="F")
    v = np.asarray(eq.resize((VECTOR_SIDE, VECTOR_SIDE), Image.Resampling.BOX), dtype=np.float64).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-9)


def vectors_of(thumb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole vector (64,) and the window vectors (N_WINDOWS, 64), float16, of one square thumbnail.

    ``thumb``: (n, n) uint8 or float, the fingerprint's border-trimmed thumbnail. Each window is equalised
    on its own, as a crop of the image would be.
    """
    n = thumb.shape[0]
    whole = _grid_vector(thumb)
    windows = []
    for scale in WINDOW_SCALES:
        side = int(round(n * scale))
        for ay in _ANCHORS:
            for ax in _ANCHORS:
                top, left = int(round((n - side) * ay)), int(round((n - side) * ax))
                windows.append(_grid_vector(thumb[top : top + side, left : left + side]))
    return whole.astype(np.float16), np.stack(windows).astype(np.float16)


def _mirror(vectors: np.ndarray) -> np.ndarray:
    """Vectors of the left-right mirrored images: each 8x8 grid's columns reversed."""
    return np.ascontiguousarray(vectors.reshape(-1, VECTOR_SIDE, VECTOR_SIDE)[:, :, ::-1].reshape(-1, 64))


def _hash_bytes(values: Iterable[str]) -> np.ndarray:
    """(n, 8) uint8, big-endian bytes of 16-hex-digit hashes (faiss binary vectors)."""
    return np.array([list(bytes.fromhex(str(v))) for v in values], dtype=np.uint8).reshape(-1, 8)


def _as_float16(data: object, shape: tuple[int, ...]) -> np.ndarray:
    buf = data if isinstance(data, bytes) else bytes(data)  # type: ignore[arg-type]  # Parquet: bytearray
    return np.frombuffer(buf, dtype=np.float16).reshape(shape)


def _as_array(data: object, shape: tuple[int, ...]) -> np.ndarray:
    return _as_float16(data, shape).astype(np.float32)


#: Rows of float16 windows converted to float32 at a time when they are added to a faiss index.
_ADD_BATCH = 65_536


@dataclass
class CandidateIndex:
    """Exact k-nearest-neighbour indexes over a collection's fingerprints (see the module docstring).

    Build with :meth:`from_fingerprints`; :meth:`candidates` proposes pairs for some keys of the collection.
    """

    keys: list[str]
    phash_trim: np.ndarray  # (n, 8) uint8
    phash: np.ndarray  # (n, 8) uint8
    lowres: np.ndarray  # (n, 64) float32, unit norm
    windows: np.ndarray  # (n * N_WINDOWS, 64) float16, unit norm; rows i*N_WINDOWS.. belong to key i
    build_seconds: float = 0.0
    query_seconds: float = 0.0

    @classmethod
    def from_fingerprints(cls, fingerprints: Mapping[str, Mapping[str, object]]) -> CandidateIndex:
        """Index ``fingerprints`` ({key: fingerprint}); keys are sorted, so the result is deterministic.

        Reads only ``phash_trim``, ``phash``, ``lowres`` and ``windows`` (never ``thumb``): about 2.5 KB per
        image as stored, the windows kept as float16 (converted to float32 only in batches for faiss)."""
        started = time.perf_counter()
        keys = sorted(fingerprints)
        fps = [fingerprints[k] for k in keys]
        lowres = np.zeros((len(fps), 64), np.float32)
        windows = np.zeros((len(fps) * N_WINDOWS, 64), np.float16)
        for i, fp in enumerate(fps):
            lowres[i] = _as_array(fp["lowres"], (64,))
            windows[i * N_WINDOWS : (i + 1) * N_WINDOWS] = _as_float16(fp["windows"], (N_WINDOWS, 64))
        index = cls(
            keys=keys,
            phash_trim=_hash_bytes(fp["phash_trim"] for fp in fps),
            phash=_hash_bytes(fp["phash"] for fp in fps),
            lowres=lowres,
            windows=windows,
        )
        index.build_seconds = time.perf_counter() - started
        return index

    def candidates(
        self,
        new: Sequence[str],
        searchable: Iterable[str] | None = None,
        config: SearchConfig = SearchConfig(),
    ) -> list[Candidate]:
        """Sorted candidate pairs with one side in ``new`` and the other in ``searchable`` (default: the
        whole index), never an image with itself. Every channel of the module docstring contributes its
        k nearest per new key; a pair proposed in several orientations is verified in each.

        Raises KeyError for a key of ``new`` that is not indexed.
        """
        import faiss

        # exact flat scans are cheap single-threaded; threads spinning for cores on a busy host are not
        with threadpool_limits(limits=1):
            return self._candidates(faiss, new, searchable, config)

    def _candidates(
        self, faiss, new: Sequence[str], searchable: Iterable[str] | None, config: SearchConfig
    ) -> list[Candidate]:
        started = time.perf_counter()
        row = {k: i for i, k in enumerate(self.keys)}
        queries = np.array([row[k] for k in sorted(new)], dtype=np.int64)
        allowed = np.ones(len(self.keys), bool)
        if searchable is not None:
            allowed[:] = False
            allowed[[row[k] for k in searchable]] = True
        found: set[Candidate] = set()
        if len(queries) == 0 or not allowed.any():
            return []
        base = np.flatnonzero(allowed)  # rows searched, in key order

        def add(query_rows: np.ndarray, hits: np.ndarray, orientation: int = IDENTITY) -> None:
            """``hits``: (len(query_rows), k) rows of ``self.keys`` (or -1) whose vectors are like the query's
            in ``orientation`` (hit ~ query turned by ``orientation``). The candidate compares the pair's
            ``a`` with its ``b`` turned by ``orientation`` (the query is ``b``) or by its inverse (it is
            ``a``)."""
            for q, row_hits in zip(query_rows, hits, strict=True):
                for h in row_hits:
                    if h < 0 or h == q:
                        continue
                    a, b = self.keys[q], self.keys[h]
                    if a < b:
                        found.add(Candidate(a, b, inverse(orientation)))
                    else:
                        found.add(Candidate(b, a, orientation))

        def add_distinct(query_rows: np.ndarray, sims: np.ndarray, owners: np.ndarray, k: int) -> None:
            """Per query, the k most similar distinct other images among ``owners`` (rows of keys)."""
            for q, row_sims, row_owners in zip(query_rows, sims, owners, strict=True):
                order = np.argsort(-row_sims, kind="stable")
                distinct = [o for o in dict.fromkeys(row_owners[order].tolist()) if o not in (q, -1)]
                add(np.array([q]), np.array([distinct[:k]], dtype=np.int64))

        def nearest(index, data: np.ndarray, k: int) -> np.ndarray:
            """Row numbers (into ``base``) of the k+1 nearest, self included where present."""
            if k <= 0:
                return np.zeros((len(data), 0), np.int64)
            _, ids = index.search(data, min(k + 1, index.ntotal))
            return np.where(ids >= 0, base[np.maximum(ids, 0)], -1)

        for hashes, k in ((self.phash_trim, config.phash_trim_k), (self.phash, config.phash_k)):
            binary = faiss.IndexBinaryFlat(64)
            binary.add(hashes[base])
            add(queries, nearest(binary, hashes[queries], k))
        flat = faiss.IndexFlatIP(64)
        flat.add(self.lowres[base])
        add(queries, nearest(flat, self.lowres[queries], config.lowres_k))
        add(queries, nearest(flat, _mirror(self.lowres[queries]), config.mirror_k), orientation=MIRROR)
        if config.orient_k > 0:  # the 14 other orientations, each searched like the mirrored one
            oriented = orient_vectors(self.lowres[queries], VECTOR_SIDE)  # (16, q, 64)
            for code in ORIENTATIONS:
                if code not in (IDENTITY, MIRROR):
                    add(queries, nearest(flat, oriented[code], config.orient_k), orientation=code)
        if config.window_k > 0:  # the windows of a new image among others' whole vectors
            window_rows = (queries[:, None] * N_WINDOWS + np.arange(N_WINDOWS)).ravel()
            sims, ids = flat.search(
                self.windows[window_rows].astype(np.float32), min(config.window_k + 1, flat.ntotal)
            )
            sims = sims.reshape(len(queries), -1)
            owners = np.where(ids >= 0, base[np.maximum(ids, 0)], -1).reshape(len(queries), -1)
            add_distinct(queries, sims, owners, config.window_k)
        if config.crop_of_k > 0:  # a new image's whole vector among others' windows
            windowed = faiss.IndexFlatIP(64)
            for start in range(0, len(base), _ADD_BATCH // N_WINDOWS):  # float32 a batch at a time
                part = base[start : start + _ADD_BATCH // N_WINDOWS]
                window_rows = (part[:, None] * N_WINDOWS + np.arange(N_WINDOWS)).ravel()
                windowed.add(self.windows[window_rows].astype(np.float32))
            # one image owns N_WINDOWS rows: ask for enough rows to reach crop_of_k distinct other images
            sims, ids = windowed.search(
                self.lowres[queries], min((config.crop_of_k + 1) * 4, windowed.ntotal)
            )
            owners = np.where(ids >= 0, base[np.maximum(ids, 0) // N_WINDOWS], -1)
            add_distinct(queries, sims, owners, config.crop_of_k)
        found = self._best_orientations_only(found, row)
        self.query_seconds += time.perf_counter() - started
        return sorted(found)

    def _best_orientations_only(self, found: set[Candidate], row: Mapping[str, int]) -> set[Candidate]:
        """``found`` without the turned/inverted candidates (codes other than 0 and 1) whose orientation is
        not the one, of all 16, in which the pair's appearance vectors agree best.

        A copy turned or inverted agrees with its original far better in its own orientation than in any
        other, so this loses nothing; and most of what the 14 extra queries propose otherwise is the same
        film in another orientation (a chest film is nearly symmetric left-right, so its mirror-turned
        versions still pass the cheap verification stage and cost a full alignment each) or another film in a
        turned orientation that happened to be nearest (both of which verification would reject).
        """
        oriented = [c for c in found if c.orientation not in (IDENTITY, MIRROR)]
        if not oriented:
            return found
        va = self.lowres[[row[c.a] for c in oriented]]  # (m, 64)
        vb = orient_vectors(self.lowres[[row[c.b] for c in oriented]], VECTOR_SIDE)  # (16, m, 64)
        sims = np.einsum("md,omd->mo", va, vb)  # (m, 16): a against b in every orientation
        best = sims.max(axis=1)
        drop = {c for c, s, top in zip(oriented, sims, best, strict=True) if s[c.orientation] < top - 1e-6}
        return found - drop
