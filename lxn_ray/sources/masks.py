"""A folder of lung-field masks named in a manifest: reading it safely and checking each mask.

The layout (``/work/shared/data/lungmasks`` is one; see docs/lungs.md): a folder holding ``masks.csv``
and the mask images. ``masks.csv`` has a ``mask`` column (the mask's path relative to the folder) and
either ``image`` (the film's file name, found in a dataset version or a films location) or ``film`` (the
film's path relative to the folder), optionally both; ``patient`` (a patient id, kept in memory to group
films and never logged), ``width`` and ``height`` (the film's size) are optional.

Every path is read through :class:`lxn_ray.sources.transports.FolderSnapshot`: a path that leaves the
folder, also through a symlink, is refused; file sizes and pixel counts are capped by
:func:`lxn_ray.images.decode.decode_image`'s :class:`~lxn_ray.images.types.ImageLimits`. Each problem with
a row raises :class:`MaskError`, which names the manifest line and the kind of problem, never a patient.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lxn_ray.images.decode import DEFAULT_LIMITS, decode_image, to_grayscale
from lxn_ray.images.types import ImageLimits, ImageRejected
from lxn_ray.sources.transports import FolderSnapshot, FolderSource, SourceError, UnsafePath

MANIFEST = "masks.csv"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

# A mask is "binary-ish" when at most this share of its pixels lies between the two ends (more than
# UNCLEAR_MARGIN from both 0 and 255): nearest-neighbour resizing leaves none, a JPEG-saved mask a thin
# ring at the border; a grayscale photograph or a probability map fails.
UNCLEAR_MARGIN = 25
MAX_UNCLEAR_SHARE = 0.02

# MaskError kinds: what the training job counts when it skips rows.
MISSING_MASK = "missing mask"
NOT_BINARY = "mask not binary"
SIZE_MISMATCH = "mask size differs from the film's"
UNKNOWN_FILM = "unknown film"
UNREADABLE = "unreadable image"
UNSAFE_PATH = "path leaves the masks folder"
BAD_ROW = "bad manifest row"


class MaskError(ValueError):
    """One manifest row cannot be used: ``kind`` (one of the constants above), ``line`` (its line in
    ``masks.csv``, the header being line 1) and a message naming both."""

    def __init__(self, line: int, kind: str, detail: str = "") -> None:
        self.line, self.kind = line, kind
        super().__init__(f"{MANIFEST} line {line}: {kind}{f': {detail}' if detail else ''}")


@dataclass(frozen=True)
class MaskRow:
    """One row of ``masks.csv``."""

    line: int  # its line in masks.csv (the header is line 1)
    image: str  # the film's file name: what a dataset version's ``filename`` is matched against
    mask: str  # the mask's path relative to the folder
    film: str | None = None  # the film's path relative to the folder, when the manifest gives one
    patient: str | None = None  # the manifest's patient id; in memory only, never logged or stored
    width: int | None = None  # the film's size, when the manifest gives it
    height: int | None = None


@dataclass(frozen=True)
class MaskFolder:
    """An opened masks folder: its rows, read through a snapshot that keeps every read inside the root."""

    snapshot: FolderSnapshot
    rows: tuple[MaskRow, ...]
    limits: ImageLimits = DEFAULT_LIMITS

    def describe(self) -> dict[str, Any]:
        """What a model card says about the folder: counts and which columns it had, no path or patient."""
        return {
            "layout": f"{MANIFEST} + mask images",
            "masks": len(self.rows),
            "films_in_folder": sum(row.film is not None for row in self.rows),
            "patient_column": any(row.patient for row in self.rows),
        }

    def read_mask(self, row: MaskRow) -> np.ndarray:
        """The mask of ``row`` as bool ``(height, width)``, True inside the lung fields. Raises
        :class:`MaskError`: missing file, not an image, over the caps, not binary-ish, or (with the
        manifest's ``width``/``height``) of another size than the manifest says."""
        pixels = np.asarray(to_grayscale(self._decode(row, row.mask, MISSING_MASK)))
        if row.width is not None and row.height is not None and pixels.shape != (row.height, row.width):
            raise MaskError(
                row.line,
                SIZE_MISMATCH,
                f"the mask is {pixels.shape[1]}x{pixels.shape[0]}, "
                f"the manifest says {row.width}x{row.height}",
            )
        return binary_mask(pixels, row.line)

    def read_film(self, row: MaskRow) -> np.ndarray:
        """The film a row's ``film`` column names, as uint8 grayscale ``(height, width)``. Raises
        :class:`MaskError` (``unknown film`` when the row names none or the file is absent)."""
        if row.film is None:
            raise MaskError(row.line, UNKNOWN_FILM, "the manifest names no film file for this row")
        return np.asarray(to_grayscale(self._decode(row, row.film, UNKNOWN_FILM)))

    def _decode(self, row: MaskRow, path: str, missing: str):
        try:
            return decode_image(self.snapshot.read_file(path, self.limits.max_file_bytes), self.limits).image
        except FileNotFoundError:
            raise MaskError(row.line, missing, path) from None
        except UnsafePath:
            raise MaskError(row.line, UNSAFE_PATH, path) from None
        except (ImageRejected, ValueError) as error:
            raise MaskError(row.line, UNREADABLE, f"{path}: {error}") from None


def binary_mask(pixels: np.ndarray, line: int) -> np.ndarray:
    """A 2-D uint8 mask as bool: 0/1 masks as they are, 0/255 masks (and JPEG-saved ones, see
    :data:`MAX_UNCLEAR_SHARE`) thresholded at 128. Raises :class:`MaskError` when it is not binary-ish."""
    if pixels.size and int(pixels.max()) <= 1:
        return pixels.astype(bool)
    unclear = (
        float(np.mean((pixels > UNCLEAR_MARGIN) & (pixels < 255 - UNCLEAR_MARGIN))) if pixels.size else 0
    )
    if unclear > MAX_UNCLEAR_SHARE:
        raise MaskError(
            line,
            NOT_BINARY,
            f"{unclear:.1%} of its pixels are neither near 0 nor near 255 (at most "
            f"{MAX_UNCLEAR_SHARE:.0%} allowed)",
        )
    return pixels >= 128


def check_film_size(row: MaskRow, mask: np.ndarray, film: np.ndarray) -> None:
    """Raise :class:`MaskError` when ``mask`` and ``film`` (both 2-D) differ in size: a mask is compared
    with its film pixel for pixel, at the film's own resolution."""
    if mask.shape != film.shape:
        raise MaskError(
            row.line,
            SIZE_MISMATCH,
            f"the mask is {mask.shape[1]}x{mask.shape[0]}, its film {film.shape[1]}x{film.shape[0]}",
        )


def open_masks(folder: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> MaskFolder:
    """Open a masks folder and parse ``masks.csv``. Raises :class:`lxn_ray.sources.transports.SourceError`
    for a missing folder or manifest, ``ValueError`` for a manifest without the needed columns, and
    :class:`MaskError` for a row whose paths leave the folder (also through a symlink), a row without a
    mask or film, a bad width/height or a film listed twice."""
    snapshot = FolderSource(Path(folder), marker=MANIFEST).open()
    try:
        text = snapshot.read_file(MANIFEST, MAX_MANIFEST_BYTES).decode("utf-8-sig")
    except (UnsafePath, UnicodeDecodeError, ValueError) as error:
        raise SourceError(f"{folder}: {MANIFEST} is unreadable: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = {name.strip().lower() for name in reader.fieldnames or ()}
    if "mask" not in columns or not columns & {"image", "film"}:
        raise ValueError(
            f"{folder}/{MANIFEST} needs a 'mask' column and an 'image' or 'film' column; it has "
            f"{sorted(columns) or 'no header'}"
        )
    rows, seen = [], {}
    for index, raw in enumerate(reader):
        if None in raw:  # csv.DictReader keeps a row's fields beyond the header under None
            raise MaskError(index + 2, BAD_ROW, "more fields than the header has columns")
        row = _parse_row({(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}, index + 2)
        for path in (row.mask, row.film):
            if path is not None:
                try:
                    snapshot.resolve(path)
                except UnsafePath:
                    raise MaskError(row.line, UNSAFE_PATH, path) from None
        if row.image in seen:
            raise MaskError(
                row.line, BAD_ROW, f"film {row.image} already has a mask on line {seen[row.image]}"
            )
        seen[row.image] = row.line
        rows.append(row)
    return MaskFolder(snapshot=snapshot, rows=tuple(rows), limits=limits)


def _parse_row(values: dict[str, str], line: int) -> MaskRow:
    mask, film = values.get("mask", ""), values.get("film") or None
    image = values.get("image") or (film.replace("\\", "/").rsplit("/", 1)[-1] if film else "")
    if not mask or not image:
        raise MaskError(line, BAD_ROW, "needs a mask and an image (or film)")
    size = []
    for name in ("width", "height"):
        text = values.get(name, "")
        if text and not (text.isdigit() and int(text) > 0):
            raise MaskError(line, BAD_ROW, f"{name} {text!r} is not a positive integer")
        size.append(int(text) if text else None)
    return MaskRow(line, image, mask, film, values.get("patient") or None, size[0], size[1])
