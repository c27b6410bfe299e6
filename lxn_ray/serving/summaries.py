"""What the endpoint saw, kept as summaries: one statistics function for a film (:func:`film_statistics`,
shared by the replicas and the drift job's reference), the per-request summary row, and the bounded store
the replicas write those rows to in small batches (:class:`SummaryWriter`) and the drift job reads the
most recent of (:func:`read_window`).

**No protected health information.** A summary row holds only facts about the pixels and the answer -
the file format told by its magic number, the decoded width and height, the mean grey level, the share of
the image the film covers, the calibrated probability, the label and the model version - never the image,
a file or part name, a DICOM header field, a request's address or key, or the time of one request: rows
carry no timestamp of their own, and a batch file is named by the time it was written, which covers every
request of the batch; its rows are shuffled, so their order does not tell which came last. (A batch of
one row - a quiet endpoint - still dates its request to within ``max_age_s``.)

**Where and how much.** Rows live under ``monitoring/summaries/`` in storage, as JSON files of at most
``rows_per_file`` rows (default 50), each written whole by one replica when its buffer fills or its
oldest row is ``max_age_s`` old (default 60 s): no file is ever appended to, so any number of replicas
and S3 work alike. File names start with the UTC time they were written (then the replica's id and a
sequence number), so sorting names sorts batches by time. After each write a replica prunes the oldest
files past ``max_files`` (default 2,000 files, so at most 100,000 rows, about 15 MB): the store is
bounded whatever the traffic.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from lxn_ray.images.decode import DEFAULT_LIMITS, ImageLimits, decode_image, to_grayscale
from lxn_ray.images.types import DecodedImage
from lxn_ray.infra.storage import Storage

logger = logging.getLogger("ray.serve")

SUMMARIES = "monitoring/summaries"  # storage prefix of the batch files
STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"  # a batch file's name starts with its UTC write time
ROWS_PER_FILE = 50
MAX_AGE_S = 60.0
MAX_FILES = 2000
FORMATS = ("PNG", "JPEG", "DICOM")


@dataclass(frozen=True)
class FilmStatistics:
    """Facts about one film's pixels, with no patient information (:func:`film_statistics`).

    ``format``: ``PNG``, ``JPEG`` or ``DICOM`` (its magic number). ``width``, ``height``: the decoded
    film's size in pixels (int). ``mean_intensity``: the mean grey level of the decoded 8-bit grayscale
    film, 0 (black) to 255 (white), float. ``film_fraction``: the share of the image's area left after
    :func:`lxn_ray.images.preprocess.trim_borders` (uniform frames and burnt-in label margins removed),
    0.25 to 1.0 (trimming keeps at least half of each side), float.
    """

    format: str
    width: int
    height: int
    mean_intensity: float
    film_fraction: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (means and fractions rounded to 3 decimals)."""
        values = asdict(self)
        values["mean_intensity"] = round(float(values["mean_intensity"]), 3)
        values["film_fraction"] = round(float(values["film_fraction"]), 4)
        return values


def film_statistics(
    data: bytes, limits: ImageLimits = DEFAULT_LIMITS, min_side: int | None = None
) -> FilmStatistics:
    """The statistics of one film file (PNG, JPEG or DICOM bytes): the one function the replicas apply to
    every film they score and the drift job to the champion's test split, so both sides are measured
    alike.

    Decodes with :func:`lxn_ray.images.decode.decode_image` (its guards and caps; ``min_side``: a JPEG at
    the reduced scale a model decodes it at, :func:`lxn_ray.images.preprocess.decode_side`, which is how a
    replica measures it), converts to 8-bit grayscale and measures (the border trim is vectorised: ~20 ms
    at 16 megapixels).
    Raises :class:`lxn_ray.images.types.ImageRejected` for bytes that do not decode, nothing else for bad
    input.
    """
    return statistics_of(decode_image(data, limits, min_side))


def statistics_of(decoded: DecodedImage) -> FilmStatistics:
    """:func:`film_statistics` of a film already decoded (the endpoint decodes each film once, for the
    model and for this). Raises nothing for a decoded film."""
    from lxn_ray.images.preprocess import trim_box

    gray = np.asarray(to_grayscale(decoded.image), dtype=np.uint8)
    top, bottom, left, right = trim_box(gray)
    area = gray.shape[0] * gray.shape[1]
    return FilmStatistics(
        format=decoded.source_format if decoded.source_format in FORMATS else "other",
        width=int(decoded.width),
        height=int(decoded.height),
        mean_intensity=float(gray.mean(dtype=np.float64)) if area else 0.0,
        film_fraction=(bottom - top) * (right - left) / area if area else 0.0,
    )


def summary_row(statistics: FilmStatistics, answer: Mapping[str, Any]) -> dict[str, Any]:
    """One request's summary: the film's statistics and the answer's ``probability`` (calibrated, rounded
    to 4 decimals), ``label`` and ``model_version`` - nothing else from the request."""
    return {
        **statistics.as_dict(),
        "probability": round(float(answer["probability"]), 4),
        "label": str(answer["label"]),
        "model_version": str(answer["model_version"]),
    }


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime(STAMP_FORMAT)


def written_at(key: str) -> datetime | None:
    """The UTC write time a batch file's name starts with; None for a name that is not a batch file's."""
    name = key.rsplit("/", 1)[-1]
    try:
        return datetime.strptime(name.split("-", 1)[0], STAMP_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def batch_files(storage: Storage) -> list[str]:
    """Keys of the batch files under :data:`SUMMARIES`, oldest first."""
    return sorted(key for key in storage.list(SUMMARIES) if written_at(key) is not None)


class SummaryWriter:
    """One replica's buffer of summary rows, written to storage as whole batch files (module docstring).

    :meth:`add` is cheap and never touches storage: it returns the rows to write when the buffer is full.
    :meth:`due` returns them when the oldest buffered row is ``max_age_s`` old. :meth:`write` (blocking:
    run it in a thread) writes one batch file, then prunes past ``max_files``. Thread-safe.
    Raises ValueError for ``rows_per_file``, ``max_age_s`` or ``max_files`` below 1.
    """

    def __init__(
        self,
        storage: Storage,
        rows_per_file: int = ROWS_PER_FILE,
        max_age_s: float = MAX_AGE_S,
        max_files: int = MAX_FILES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rows_per_file < 1 or max_age_s <= 0 or max_files < 1:
            raise ValueError("rows_per_file and max_files must be >= 1 and max_age_s > 0")
        self.storage = storage
        self.rows_per_file, self.max_age_s, self.max_files = rows_per_file, max_age_s, max_files
        self.clock = clock
        self.writer_id = uuid.uuid4().hex[:8]  # random: says nothing about the node or the replica
        self._rows: list[dict[str, Any]] = []
        self._oldest: float | None = None
        self._sequence = 0
        self._lock = threading.Lock()

    def add(self, row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """Buffer ``row``; the buffered rows (the buffer emptied) once there are ``rows_per_file``."""
        with self._lock:
            if not self._rows:
                self._oldest = self.clock()
            self._rows.append(dict(row))
            return self._take() if len(self._rows) >= self.rows_per_file else None

    def due(self) -> list[dict[str, Any]] | None:
        """The buffered rows (the buffer emptied) when the oldest is ``max_age_s`` old, else None."""
        with self._lock:
            if self._rows and self._oldest is not None and self.clock() - self._oldest >= self.max_age_s:
                return self._take()
            return None

    def drain(self) -> list[dict[str, Any]] | None:
        """Every buffered row (the buffer emptied), whatever its age; None when empty (at shutdown)."""
        with self._lock:
            return self._take() if self._rows else None

    def _take(self) -> list[dict[str, Any]]:
        rows, self._rows, self._oldest = self._rows, [], None
        return rows

    def write(self, rows: list[dict[str, Any]], now: datetime | None = None) -> str:
        """Write ``rows`` as one new batch file; returns its key. Then prunes the oldest files past
        ``max_files`` (another replica's pruning at the same time is harmless)."""
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
        # Shuffled: a batch written when its last row arrived would otherwise date that row exactly.
        moment = now or datetime.now(timezone.utc)
        key = f"{SUMMARIES}/{_stamp(moment)}-{self.writer_id}-{sequence:06d}.json"
        rows = random.sample(rows, len(rows))
        self.storage.write_bytes(key, json.dumps({"rows": rows}, separators=(",", ":")).encode())
        prune(self.storage, self.max_files)
        return key


def prune(storage: Storage, max_files: int) -> int:
    """Delete the oldest batch files past ``max_files``; returns how many this call deleted (files
    another process deleted first are skipped)."""
    files = batch_files(storage)
    deleted = 0
    for key in files[: max(0, len(files) - max_files)]:
        try:
            storage.filesystem.delete_file(storage.path(key))
            deleted += 1
        except (FileNotFoundError, OSError):
            continue  # pruned by another replica meanwhile
    return deleted


@dataclass(frozen=True)
class Window:
    """The most recent summaries (:func:`read_window`): ``rows`` oldest first, the batch files they came
    from, and the write times of the first and last of those files (None when there are none)."""

    rows: list[dict[str, Any]]
    files: int
    first: datetime | None
    last: datetime | None
    unreadable: int  # files that vanished (pruned) or did not parse between listing and reading


def read_window(
    storage: Storage, rows: int | None = None, hours: float | None = None, now: datetime | None = None
) -> Window:
    """The last ``rows`` summaries (None: every one), from files written in the last ``hours`` (None: any
    age), oldest first. Reads the newest files first and stops once it has ``rows``. Raises ValueError
    for ``rows`` < 1 or ``hours`` <= 0."""
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if hours is not None and hours <= 0:
        raise ValueError(f"hours must be > 0, got {hours}")
    keys = batch_files(storage)
    if hours is not None:
        since = (now or datetime.now(timezone.utc)) - timedelta(hours=hours)
        keys = [key for key in keys if (written_at(key) or since) >= since]
    batches: list[tuple[str, list[dict[str, Any]]]] = []
    count = unreadable = 0
    for key in reversed(keys):
        try:
            found = json.loads(storage.read_bytes(key))["rows"]
        except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        batches.append((key, [row for row in found if isinstance(row, dict)]))
        count += len(batches[-1][1])
        if rows is not None and count >= rows:
            break
    batches.reverse()
    kept = [row for _, found in batches for row in found]
    if rows is not None:
        kept = kept[-rows:]
    times = [written_at(key) for key, _ in batches]
    return Window(kept, len(batches), times[0] if times else None, times[-1] if times else None, unreadable)


def write_rows(
    storage: Storage, rows: Iterable[Mapping[str, Any]], rows_per_file: int = ROWS_PER_FILE
) -> int:
    """Write ``rows`` as batch files, as replicas would (for imports and tests); returns the file count."""
    writer = SummaryWriter(storage, rows_per_file=rows_per_file)
    files = 0
    for row in rows:
        if (batch := writer.add(row)) is not None:
            writer.write(batch)
            files += 1
    if (rest := writer.drain()) is not None:
        writer.write(rest)
        files += 1
    return files
