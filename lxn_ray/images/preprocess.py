"""The one preprocessing path from file bytes to model input, and the training-only augmenter.

Training, evaluation and serving all call :func:`preprocess_bytes` (or :func:`preprocess_pixels`, the
uint8 array it is built on), so the model sees the same pixels in production that it was validated on (no
train/serve skew). Decoding and its guards against hostile files live in :mod:`lxn_ray.images.decode`; this
module only turns a decoded radiograph into model input. A JPEG much larger than the model input is
decoded at a reduced DCT scale (:func:`decode_side`): the same pixels within a grey level or two, at a
fraction of a full decode's cost.

Optional source harmonisation (:class:`PreprocessConfig`) runs inside that one path: :func:`trim_borders`
crops the uniform frames and burnt-in label margins whose size, colour and position differ per hospital,
:func:`lung_fields` crops the film to its lung fields (and may blank everything outside them), and
:func:`equalize` normalises contrast (global histogram equalisation or CLAHE). All attack shortcuts a
classifier trained on this multi-source dataset could otherwise learn - telling sources apart by their
framing, text, markers or exposure instead of by the lungs. The default config switches all off and
reproduces the plain pipeline (decode, grayscale, resize). The lung fields come from a trained segmenter
that the caller passes in as a :data:`LungFinder` (:mod:`lxn_ray.model.lungs`); this module never loads a
model.

Augmentation (:func:`build_augmenter`) is separate on purpose: it is random, applies to training batches
only, and must never run at evaluation or serving time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from lxn_ray.images.decode import ImageLimits, ImageRejected, decode_image, to_grayscale
from lxn_ray.images.types import DecodedImage
from lxn_ray.infra.settings import setting

if TYPE_CHECKING:
    import keras

DEFAULT_LIMITS = ImageLimits()
MODEL_CHANNELS = 3  # LxN takes 3 channels; a radiograph is grayscale, so the channel is replicated


@dataclass(frozen=True)
class AugmentConfig:
    """Random training-time transforms; 0 (or False) switches a transform off.

    ``horizontal_flip`` defaults off: chest radiographs have laterality (heart on the left, R/L markers,
    situs), so a mirrored film is not a plausible patient image, and a flip would teach the model that
    anatomy's side carries no information.
    """

    rotation: float = setting(0.0, help="maximum absolute rotation, degrees", flag=False)
    zoom: float = setting(0.0, help="zoom in or out by up to this fraction", flag=False)
    shift: float = setting(0.0, help="translation in each direction, a fraction of the side", flag=False)
    horizontal_flip: bool = setting(False, help="mirror left-right at random (off: laterality)", flag=False)
    brightness: float = setting(
        0.0, help="add or subtract up to this fraction of the [0, 1] range", flag=False
    )
    contrast: float = setting(0.0, help="scale contrast by a factor in [1 - c, 1 + c]", flag=False)

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name != "horizontal_flip" and not value >= 0:
                raise ValueError(f"{field.name} must be >= 0, got {value!r}")
        if self.rotation > 180:
            raise ValueError(f"rotation is in degrees and at most 180, got {self.rotation}")
        if self.zoom >= 1 or self.shift >= 1 or self.contrast > 1 or self.brightness > 1:
            raise ValueError(f"zoom and shift must be < 1, brightness and contrast <= 1: {self}")

    @property
    def is_off(self) -> bool:
        """True when no transform is active (evaluation-equivalent)."""
        return not (
            self.rotation
            or self.zoom
            or self.shift
            or self.horizontal_flip
            or self.brightness
            or self.contrast
        )


# Mild, anatomy-preserving jitter: small rotation/zoom/shift mimic patient positioning, brightness and
# contrast mimic exposure and scanner differences. No flip (laterality, see AugmentConfig).
LIGHT_AUGMENT = AugmentConfig(
    rotation=10.0, zoom=0.1, shift=0.05, horizontal_flip=False, brightness=0.1, contrast=0.1
)


EQUALIZATION_METHODS = ("none", "histogram", "clahe")
LUNG_MODES = ("none", "crop", "mask")
# A film's lung fields: 2-D uint8 grayscale (h, w) -> bool (h, w), True inside either lung field.
LungFinder = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PreprocessConfig:
    """Deterministic source harmonisation, applied identically in training, evaluation and serving.

    A model must be served with the config it was trained with: store :meth:`as_dict` with the model and
    rebuild it with :meth:`from_mapping`. The default (everything off) is the plain pipeline.
    """

    trim_borders: bool = setting(False, help="crop uniform borders and burnt-in margins first")
    equalization: str = setting(
        "none", help="histogram equalisation or CLAHE (none: off)", choices=EQUALIZATION_METHODS
    )
    clahe_clip_limit: float = setting(
        0.01, help="CLAHE's clip limit (skimage.exposure.equalize_adapthist clip_limit)", flag=False
    )
    lungs: str = setting(
        "none",
        help="crop each film to its lung fields' box (crop), and also blank outside them (mask), found by "
        "the lung segmenter (jobs/lungs.py); none: the whole film",
        choices=LUNG_MODES,
    )
    segmenter: str = setting(
        "", help="the lung segmenter version --lungs uses (default: the store's newest; the card records it)"
    )
    lung_margin: float = setting(
        0.05, help="margin added on each side of the lung fields' box, a fraction of its side", flag=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.trim_borders, bool):
            raise ValueError(f"trim_borders must be true or false, got {self.trim_borders!r}")
        if self.equalization not in EQUALIZATION_METHODS:
            raise ValueError(
                f"equalization must be one of {', '.join(EQUALIZATION_METHODS)}; got {self.equalization!r}"
            )
        limit = self.clahe_clip_limit
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0.0 < limit <= 1.0:
            raise ValueError(f"clahe_clip_limit must be a number in (0, 1], got {limit!r}")
        if self.lungs not in LUNG_MODES:
            raise ValueError(f"lungs must be one of {', '.join(LUNG_MODES)}; got {self.lungs!r}")
        margin = self.lung_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin <= 0.5:
            raise ValueError(f"lung_margin must be a number in [0, 0.5], got {margin!r}")
        if not isinstance(self.segmenter, str):
            raise ValueError(f"segmenter must be a version id (text), got {self.segmenter!r}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> PreprocessConfig:
        """Build from a config/JSON/YAML mapping; ``None`` or ``{}`` gives the defaults.

        Unknown keys raise ``ValueError`` (a misspelt ``equalisation`` must not silently train without
        equalisation), as do invalid values.
        """
        if settings is None:
            return cls()
        if not isinstance(settings, Mapping):
            raise ValueError(f"preprocessing settings must be a mapping, got {type(settings).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(str(key) for key in settings if key not in known)
        if unknown:
            raise ValueError(
                f"unknown preprocessing setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(settings))

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable fields; ``PreprocessConfig.from_mapping(c.as_dict()) == c``."""
        return asdict(self)


DEFAULT_PREPROCESSING = PreprocessConfig()

# trim_borders tuning. Grey levels within _TRIM_TOLERANCE of a border level count as border (JPEG and
# scanner noise on a flat border). Kept at a few levels on purpose: at +-10, the smooth, near-saturated
# abdomen of many NIH films matched a border level and was cut off. A line is uniform when
# >= _UNIFORM_FRACTION of it is border (room for a few text pixels); lines that are only
# >= _MARGIN_FRACTION border (rows through a line of burnt-in text) are crossed only in runs of at most
# _MAX_GAP_FRACTION of the side, and only when uniform lines lie beyond them.
_TRIM_TOLERANCE = 3
_LEVEL_SHARE = 0.5  # an edge line defines a border level when this share of it is within tolerance of it
_UNIFORM_FRACTION = 0.9
_MARGIN_FRACTION = 0.5
_MAX_GAP_FRACTION = 0.08
_MIN_KEEP_FRACTION = 0.5  # never trim more than half of either dimension
_TRIM_PASSES = 3  # nested frames (a thin black line around a grey band) are peeled one per pass


def _check_gray(gray: np.ndarray) -> None:
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(
            f"expected a 2-D uint8 array, got {getattr(gray, 'dtype', type(gray))} "
            f"with shape {getattr(gray, 'shape', None)}"
        )


def _border_levels(gray: np.ndarray, tolerance: int) -> list[tuple[int, int]]:
    """Grey-level intervals ``[low, high]`` of the borders: one per edge line that is mostly one level."""
    window = np.ones(2 * tolerance + 1, dtype=np.int64)
    covered = np.zeros(256, dtype=bool)
    for line in (gray[0, :], gray[-1, :], gray[:, 0], gray[:, -1]):
        counts = np.convolve(np.bincount(line, minlength=256), window, mode="same")
        level = int(np.argmax(counts))
        if counts[level] >= _LEVEL_SHARE * line.size:
            covered[max(0, level - tolerance) : level + tolerance + 1] = True
    # merge the covered grey levels into intervals, so the mask costs one pass per interval
    edges = np.flatnonzero(np.diff(np.concatenate(([False], covered, [False])).astype(np.int8)))
    return [(int(low), int(high) - 1) for low, high in zip(edges[::2], edges[1::2], strict=True)]


def _edge_depth(fraction: np.ndarray, budget: int, max_gap: int) -> int:
    """How many lines to trim from the start of ``fraction`` (border share of each line, edge first)."""
    fraction = fraction[:budget]
    if fraction.size == 0:
        return 0
    uniform = fraction >= _UNIFORM_FRACTION
    marginal = fraction >= _MARGIN_FRACTION
    stop = fraction.size if marginal.all() else int(np.argmin(marginal))
    # runs of non-uniform lines (text bands) before stop; the first one longer than max_gap is the film
    runs = np.flatnonzero(np.diff(np.concatenate(([False], ~uniform[:stop], [False])).astype(np.int8)))
    starts, ends = runs[::2], runs[1::2]
    too_long = np.flatnonzero(ends - starts > max_gap)
    if too_long.size:
        stop = int(starts[too_long[0]])
    last_uniform = np.flatnonzero(uniform[:stop])
    return int(last_uniform[-1]) + 1 if last_uniform.size else 0


def _share_cap(first: int, second: int, budget: int) -> tuple[int, int]:
    """Scale two edge trims down so that together they stay within ``budget`` lines."""
    if first + second <= budget:
        return first, second
    first_capped = first * budget // (first + second)
    return first_capped, budget - first_capped


def trim_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the part of ``gray`` ((H, W) uint8) that :func:`trim_borders`
    keeps: row and column indices, ends exclusive (``gray[top:bottom, left:right]``)."""
    _check_gray(gray)
    height, width = gray.shape
    top, bottom, left, right = 0, height, 0, width
    row_budget = height - math.ceil(_MIN_KEEP_FRACTION * height)
    col_budget = width - math.ceil(_MIN_KEEP_FRACTION * width)
    for _ in range(_TRIM_PASSES):
        crop = gray[top:bottom, left:right]
        rows_left = row_budget - (top + height - bottom)
        cols_left = col_budget - (left + width - right)
        if rows_left <= 0 and cols_left <= 0:
            break
        levels = _border_levels(crop, _TRIM_TOLERANCE)
        if not levels:
            break
        mask = np.zeros(crop.shape, dtype=bool)
        for low, high in levels:  # uint8 wrap-around: one subtract and one compare per interval
            mask |= np.subtract(crop, np.uint8(low)) <= np.uint8(high - low)
        counts = mask.view(np.uint8)
        row_fraction = counts.sum(axis=1, dtype=np.int64) / crop.shape[1]
        col_fraction = counts.sum(axis=0, dtype=np.int64) / crop.shape[0]
        row_gap = max(2, round(_MAX_GAP_FRACTION * height))
        col_gap = max(2, round(_MAX_GAP_FRACTION * width))
        cut_top, cut_bottom = _share_cap(
            _edge_depth(row_fraction, rows_left, row_gap),
            _edge_depth(row_fraction[::-1], rows_left, row_gap),
            max(rows_left, 0),
        )
        cut_left, cut_right = _share_cap(
            _edge_depth(col_fraction, cols_left, col_gap),
            _edge_depth(col_fraction[::-1], cols_left, col_gap),
            max(cols_left, 0),
        )
        if not (cut_top or cut_bottom or cut_left or cut_right):
            break
        top, bottom = top + cut_top, bottom - cut_bottom
        left, right = left + cut_left, right - cut_right
    return top, bottom, left, right


def trim_borders(gray: np.ndarray) -> np.ndarray:
    """Crop the uniform borders and burnt-in label margins off a full-resolution grayscale radiograph.

    ``gray``: 2-D uint8 ``(height, width)``. Returns a 2-D uint8 view into it (no copy); the input object
    itself when nothing is trimmed.

    The rule. Border grey levels come from the four outermost lines: a line whose most common level
    (within +-3 grey levels) covers at least half of it contributes that level, so a black frame on two
    sides and a white label margin on a third give {black, white}. A pixel is "border" when it lies within
    +-3 levels of any border level (JPEG and scanner noise on a flat border; wider tolerances let smooth,
    near-saturated anatomy pass as border), and each row and column is scored by its share of
    border pixels - over the whole line, so the rows of a black top frame still count as border where they
    cross a white side margin. From each edge inward, lines with >= 90% border are uniform (a few text
    pixels allowed); lines with >= 50% border (rows through a line of burnt-in text) may sit between
    uniform lines in runs of at most 8% of the side. The trim ends after the last uniform line before the
    first line under 50% or the first longer non-uniform run: the film. It repeats (up to 3 passes) so
    nested frames peel off, and is capped so that at least 50% of the height and of the width remain
    (two opposite trims are scaled down together). A flat region of the film itself that reaches the edge
    (black air beside the body, a flat collimator band) looks the same and is trimmed too; it carries no
    anatomy. Fully vectorised: about two uint8 passes over the image per pass, ~20 ms for 4000x4000.
    """
    top, bottom, left, right = trim_box(gray)
    if (top, bottom, left, right) == (0, gray.shape[0], 0, gray.shape[1]):
        return gray
    return gray[top:bottom, left:right]


def equalize(gray: np.ndarray, method: str, clip_limit: float = 0.01) -> np.ndarray:
    """Contrast-normalise a 2-D uint8 image; returns 2-D uint8 of the same shape.

    - ``"none"``: ``gray`` itself.
    - ``"histogram"``: global histogram equalisation, ``skimage.exposure.equalize_hist`` (256 bins).
    - ``"clahe"``: contrast-limited adaptive histogram equalisation (Zuiderveld, "Contrast Limited
      Adaptive Histogram Equalization", Graphics Gems IV, 1994), ``skimage.exposure.equalize_adapthist``
      with its default tiles (1/8 of each side), 256 bins and ``clip_limit`` in (0, 1].

    scikit-image returns floats in [0, 1]; they are rounded to the nearest uint8. A constant image has no
    contrast to spread and is returned unchanged (equalize_hist would turn it white). Deterministic.
    """
    _check_gray(gray)
    if method not in EQUALIZATION_METHODS:
        raise ValueError(f"equalization must be one of {', '.join(EQUALIZATION_METHODS)}; got {method!r}")
    if method == "none" or gray.size == 0 or gray.min() == gray.max():
        return gray
    from skimage import exposure  # here, not at import: no cost when equalization is off

    if method == "histogram":
        result = exposure.equalize_hist(gray, nbins=256)
    else:
        result = exposure.equalize_adapthist(gray, clip_limit=clip_limit, nbins=256)
    return np.clip(np.rint(np.asarray(result, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def film_region(gray: Image.Image, preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING) -> Image.Image:
    """The part of a decoded grayscale film the model sees before resizing: the crop of
    :func:`trim_borders` when ``preprocessing.trim_borders``, else the film itself. A Grad-CAM overlay is
    drawn on this region, so its heat map sits where the model looked."""
    if not preprocessing.trim_borders:
        return gray
    top, bottom, left, right = trim_box(np.asarray(gray, dtype=np.uint8))
    if (top, bottom, left, right) == (0, gray.height, 0, gray.width):
        return gray
    return gray.crop((left, top, right, bottom))


def lung_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` of the lung fields' bounding box in ``mask`` (2-D bool), widened by
    ``margin`` times the box's height (rows) and width (columns) on each side and clipped to the image;
    None when the mask holds no lung pixel."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    dy, dx = round(margin * (bottom - top)), round(margin * (right - left))
    height, width = mask.shape
    return max(0, top - dy), min(height, bottom + dy), max(0, left - dx), min(width, right + dx)


def lung_fields(
    gray: np.ndarray, mask: np.ndarray, mode: str, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """A film reduced to its lung fields: ``(film, mask)`` cropped to :func:`lung_box` (``mode`` crop), and
    with every pixel outside the mask set to 0, black as a radiograph's background (``mode`` mask).

    ``gray``: 2-D uint8 ``(h, w)``; ``mask``: 2-D bool of the same shape (a :data:`LungFinder`'s answer).
    Returns 2-D uint8 and bool arrays of the crop's shape. A mask without any lung pixel (the segmenter
    found none: not a chest film, or a failure) leaves the film whole, so no image is lost; ``mode`` none
    returns both unchanged. Raises ValueError for a mask of another shape."""
    if mask.shape != gray.shape:
        raise ValueError(f"the lung mask is {mask.shape}, the film {gray.shape}")
    box = lung_box(mask, margin) if mode != "none" else None
    if box is None:
        return gray, mask
    top, bottom, left, right = box
    film, mask = gray[top:bottom, left:right], mask[top:bottom, left:right]
    if mode == "mask":
        film = np.where(mask, film, np.uint8(0))
    return film, mask


def _check_arguments(image_size: int, preprocessing: PreprocessConfig) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(preprocessing, PreprocessConfig):
        raise TypeError(f"preprocessing must be a PreprocessConfig, got {type(preprocessing).__name__}")


def preprocess_pixels(
    data: bytes,
    image_size: int,
    limits: ImageLimits = DEFAULT_LIMITS,
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    lungs: LungFinder | None = None,
) -> np.ndarray:
    """File bytes -> ``(image_size, image_size)`` uint8 grayscale: what :func:`preprocess_bytes` is made of.

    Steps: decode (guards in :mod:`lxn_ray.images.decode`; a JPEG at the reduced scale of
    :func:`decode_side`) -> grayscale -> :func:`trim_borders` at the decoded resolution (if
    ``preprocessing.trim_borders``) -> :func:`lung_fields` with the mask ``lungs`` finds
    (if ``preprocessing.lungs`` is crop or mask; ``lungs`` is then required) -> resize -> :func:`equalize`
    (after the resize, where it is cheap). ``preprocess_bytes(...) == np.repeat((pixels.astype(np.float32)
    / np.float32(255))[..., None], 3, axis=2)`` exactly, so training can store this compact array and
    expand it on the device.

    Raises :class:`ImageRejected` for any bad input bytes, never anything else (a bad ``image_size`` is a
    programming error and raises ``ValueError``, as does lung preprocessing without ``lungs``; a bad
    ``preprocessing`` ``TypeError``).

    Plain resize to a square, not an aspect-preserving letterbox: it is what the paper's Keras pipeline
    did (``target_size=(200, 200)``), it spends every input pixel on the radiograph, and it adds no black
    bars whose width would encode each source's typical aspect ratio - a shortcut to telling hospitals
    apart on this multi-source dataset. Most chest films are near-square, so the distortion is small.
    """
    return _pixels_and_region(data, image_size, limits, preprocessing, lungs)[0]


def _pixels_and_region(
    data: bytes,
    image_size: int,
    limits: ImageLimits,
    preprocessing: PreprocessConfig,
    lungs: LungFinder | None,
) -> tuple[np.ndarray, Image.Image, np.ndarray | None]:
    """:func:`preprocess_pixels`, the film region it was resized from (after trimming and the lung crop)
    and that region's lung mask (bool, None without ``lungs``), from one decode."""
    _check_arguments(image_size, preprocessing)  # before decoding: a programming error is not bad bytes
    decoded = decode_image(data, limits, decode_side(image_size, preprocessing))
    return _region_pixels(decoded, image_size, preprocessing, lungs)


def decode_side(image_size: int, preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING) -> int | None:
    """The shorter side (pixels) a film needs when decoded for an ``image_size`` model input
    (:func:`lxn_ray.images.decode.decode_image`'s ``min_side``): ``image_size`` divided by the least share
    of a side border trimming keeps (1/2), so the region the model sees still has at least ``image_size``
    pixels a side and the final resize only shrinks. None - the whole film - with lung preprocessing,
    whose crop can keep less."""
    if preprocessing.lungs != "none":
        return None
    return math.ceil(image_size / _MIN_KEEP_FRACTION)


def preprocess_decoded(
    decoded: DecodedImage,
    image_size: int,
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    lungs: LungFinder | None = None,
) -> np.ndarray:
    """:func:`preprocess_pixels` of a film already decoded by :func:`lxn_ray.images.decode.decode_image`
    (the endpoint measures the same decoded film for monitoring): ``(image_size, image_size)`` uint8.
    Raises as :func:`preprocess_pixels` does."""
    return _region_pixels(decoded, image_size, preprocessing, lungs)[0]


def _region_pixels(
    decoded: DecodedImage,
    image_size: int,
    preprocessing: PreprocessConfig,
    lungs: LungFinder | None,
) -> tuple[np.ndarray, Image.Image, np.ndarray | None]:
    """:func:`_pixels_and_region` after the decode."""
    _check_arguments(image_size, preprocessing)
    if preprocessing.lungs != "none" and lungs is None:
        raise ValueError(f"lungs={preprocessing.lungs} preprocessing needs a lung segmenter (lungs=...)")
    try:
        region = film_region(to_grayscale(decoded.image), preprocessing)
        mask = None
        if lungs is not None:
            gray = np.asarray(region, dtype=np.uint8)
            film, mask = lung_fields(gray, lungs(gray), preprocessing.lungs, preprocessing.lung_margin)
            region = region if film is gray else Image.fromarray(film, mode="L")
        # Bilinear with PIL's support scaling is area-aware when shrinking (no aliasing from 20 MP films);
        # reducing_gap first box-reduces very large images, which is much faster and visually identical.
        resized = region.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        pixels = np.asarray(resized, dtype=np.uint8)
        pixels = equalize(pixels, preprocessing.equalization, preprocessing.clahe_clip_limit)
    except (OSError, ValueError, MemoryError) as error:
        raise ImageRejected(f"could not preprocess image: {error}") from None
    return pixels, region, mask


def as_model_input(pixels: np.ndarray) -> np.ndarray:
    """``(s, s)`` uint8 from :func:`preprocess_pixels` -> ``(s, s, 3)`` float32 in [0, 1], channels equal."""
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    return np.repeat(scaled[:, :, np.newaxis], MODEL_CHANNELS, axis=2)


def preprocess_for_explanation(
    data: bytes,
    image_size: int,
    limits: ImageLimits = DEFAULT_LIMITS,
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    lungs: LungFinder | None = None,
) -> tuple[np.ndarray, Image.Image, np.ndarray | None]:
    """(:func:`preprocess_bytes`'s model input, the grayscale film region it shows, that region's lung
    mask) from one decode: Grad-CAM's heat map, in model-input coordinates, is drawn over that region, and
    the share of its mass inside the lung fields measured on the mask (bool, the region's shape; None
    without ``lungs`` - given one, the mask is found even when ``preprocessing.lungs`` is none)."""
    pixels, region, mask = _pixels_and_region(data, image_size, limits, preprocessing, lungs)
    return as_model_input(pixels), region, mask


def preprocess_bytes(
    data: bytes,
    image_size: int,
    limits: ImageLimits = DEFAULT_LIMITS,
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    lungs: LungFinder | None = None,
) -> np.ndarray:
    """File bytes -> ``(image_size, image_size, 3)`` float32 in [0, 1], channels equal: the model input.

    :func:`preprocess_pixels` divided by 255 and replicated to 3 channels; see it for the steps, the
    errors (only :class:`ImageRejected` for bad bytes) and why the resize is a plain square one. With the
    default ``preprocessing`` the output is the plain decode -> grayscale -> resize -> /255.
    """
    return as_model_input(preprocess_pixels(data, image_size, limits, preprocessing, lungs))


def preprocess_batch(
    images: Iterable[bytes],
    image_size: int,
    limits: ImageLimits = DEFAULT_LIMITS,
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    lungs: LungFinder | None = None,
) -> np.ndarray:
    """Several files -> ``(n, image_size, image_size, 3)`` float32; one bad file raises ImageRejected."""
    arrays = [preprocess_bytes(data, image_size, limits, preprocessing, lungs) for data in images]
    if not arrays:
        _check_arguments(image_size, preprocessing)
        return np.zeros((0, image_size, image_size, MODEL_CHANNELS), dtype=np.float32)
    return np.stack(arrays)


def build_augmenter(config: AugmentConfig, seed: int | None = None) -> keras.Sequential | None:
    """Keras 3 preprocessing layers for the active transforms of ``config``; ``None`` when all are off.

    Input and output: float32 ``(batch, s, s, 3)`` in [0, 1]. Geometric transforms fill exposed borders
    with black (0), the background of a radiograph, rather than mirroring anatomy in. Each layer gets its
    own seed derived from ``seed`` so the transforms are not drawn from one correlated stream. Call it with
    ``training=True`` on training batches only.
    """
    import keras  # here, not at import: preprocess_bytes (Ray Data tasks, serving) needs no Keras

    layers: list[keras.layers.Layer] = []

    def next_seed() -> int | None:
        return None if seed is None else seed + len(layers)

    geometry = {"fill_mode": "constant", "fill_value": 0.0, "interpolation": "bilinear"}
    if config.rotation:
        # Keras gives rotation as a fraction of a full turn: factor 10/360 rotates by up to +-10 degrees.
        layers.append(
            keras.layers.RandomRotation(
                config.rotation / 360.0, seed=next_seed(), name="rotation", **geometry
            )
        )
    if config.zoom:
        # One factor for both axes (width_factor=None) keeps the aspect ratio.
        layers.append(keras.layers.RandomZoom(config.zoom, seed=next_seed(), name="zoom", **geometry))
    if config.shift:
        layers.append(
            keras.layers.RandomTranslation(
                config.shift, config.shift, seed=next_seed(), name="shift", **geometry
            )
        )
    if config.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=next_seed(), name="flip"))
    if config.brightness:
        layers.append(
            keras.layers.RandomBrightness(
                config.brightness, value_range=(0.0, 1.0), seed=next_seed(), name="brightness"
            )
        )
    if config.contrast:
        layers.append(
            keras.layers.RandomContrast(
                config.contrast, value_range=(0.0, 1.0), seed=next_seed(), name="contrast"
            )
        )
    if not layers:
        return None
    # Bilinear resampling of [0, 1] values with a 0 fill already stays in range; the clip makes the
    # contract explicit whatever the layer order or Keras version. ReLU capped at 1 is clip(x, 0, 1), a
    # built-in layer (no Lambda), so anything holding it stays safe-mode loadable.
    layers.append(keras.layers.ReLU(max_value=1.0, name="clip"))
    return keras.Sequential(layers, name="augmenter")
