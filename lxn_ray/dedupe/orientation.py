"""The orientations in which a film can be republished: the eight symmetries of the square (quarter turns,
each with or without a left-right mirror) times two polarities (as acquired, or grey scale inverted: a
negative print), 16 in all, each named by a small integer code (:data:`ORIENTATIONS`).

A fingerprint's thumbnail is the border-trimmed content stretched to a square
(:mod:`~lxn_ray.dedupe.fingerprint`), so the thumbnail of a copy turned a quarter turn is the original's
thumbnail turned a quarter turn, and the thumbnail of a negative is ``255 - thumbnail``: each orientation is
applied to stored thumbnails (and to their 8x8 appearance grids) without decoding the film again.
Candidate search (:mod:`~lxn_ray.dedupe.index`) queries the transformed appearance vectors; verification
(:mod:`~lxn_ray.dedupe.verify`) compares one thumbnail with the other one transformed.

A code ``c`` is ``mirror | turns << 1 | inverted << 3``: first the left-right mirror (bit 0), then ``turns``
quarter turns counter-clockwise (bits 1-2, :func:`numpy.rot90`), then inversion (bit 3). Code 0 is the
identity and code 1 the plain left-right mirror (the only orientation before issue 24).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "IDENTITY",
    "MIRROR",
    "ORIENTATIONS",
    "describe",
    "inverse",
    "is_inverted",
    "is_mirrored",
    "orient_thumb",
    "orient_vectors",
]

#: The 16 orientation codes (see the module docstring).
ORIENTATIONS: tuple[int, ...] = tuple(range(16))
IDENTITY = 0
MIRROR = 1
_INVERT = 8


def _turns(code: int) -> int:
    return (code >> 1) & 3


def is_mirrored(code: int) -> bool:
    """Whether orientation ``code`` reverses handedness (a mirror, whatever the turns: left and right are
    swapped on the film)."""
    return bool(code & MIRROR)


def is_inverted(code: int) -> bool:
    """Whether orientation ``code`` inverts the grey scale (a negative print)."""
    return bool(code & _INVERT)


def _geometric(arr: np.ndarray, code: int) -> np.ndarray:
    """``arr`` (..., h, w) mirrored and turned as ``code`` says (inversion left to the caller)."""
    if code & MIRROR:
        arr = arr[..., :, ::-1]
    turns = _turns(code)
    if turns:
        arr = np.rot90(arr, turns, axes=(-2, -1))
    return arr


def orient_thumb(thumb: np.ndarray, code: int) -> np.ndarray:
    """A square thumbnail (..., n, n) of gray levels in [0, 255] (uint8 or float) in orientation ``code``:
    mirrored, turned, then inverted as ``255 - value``. Returns a C-contiguous array of the input dtype."""
    out = _geometric(thumb, code)
    if code & _INVERT:
        out = 255 - out
    return np.ascontiguousarray(out)


def orient_vectors(vectors: np.ndarray, side: int) -> np.ndarray:
    """All 16 orientations of zero-mean appearance vectors (m, side * side), each the row-major ravel of a
    ``side`` x ``side`` grid of a rank-equalised thumbnail (:func:`lxn_ray.dedupe.index.vectors_of`).

    Returns (16, m, side * side) of the input dtype, indexed by orientation code. A grid averaged from the
    thumbnail turns with it, and the rank map of a negative is one minus the original's, so an inverted
    vector is the negated one.
    """
    grids = vectors.reshape(-1, side, side)
    out = np.empty((len(ORIENTATIONS), *vectors.shape), dtype=vectors.dtype)
    for code in ORIENTATIONS:
        g = _geometric(grids, code).reshape(vectors.shape)
        out[code] = -g if code & _INVERT else g
    return out


@functools.cache
def _compose_table() -> tuple[tuple[int, ...], ...]:
    """``table[a][b]``: the code of applying ``b`` then ``a``, found by applying them to a probe image."""
    probe = np.arange(9, dtype=np.int64).reshape(3, 3) * 10 + 5
    images = {code: orient_thumb(probe, code).tobytes() for code in ORIENTATIONS}
    code_of = {img: code for code, img in images.items()}
    assert len(code_of) == len(ORIENTATIONS), "orientation codes must act differently"
    return tuple(
        tuple(code_of[orient_thumb(orient_thumb(probe, b), a).tobytes()] for b in ORIENTATIONS)
        for a in ORIENTATIONS
    )


def inverse(code: int) -> int:
    """The orientation that undoes ``code``: ``orient_thumb(orient_thumb(t, code), inverse(code)) == t``."""
    table = _compose_table()
    return next(c for c in ORIENTATIONS if table[c][code] == IDENTITY)


def describe(code: int) -> str:
    """A readable name: "identity", or the parts among "mirrored", "turned 90/180/270" (counter-clockwise)
    and "inverted", joined by "+"."""
    parts = []
    if code & MIRROR:
        parts.append("mirrored")
    if _turns(code):
        parts.append(f"turned {90 * _turns(code)}")
    if code & _INVERT:
        parts.append("inverted")
    return "+".join(parts) or "identity"
