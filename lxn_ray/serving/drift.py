"""Input drift: the films the endpoint saw lately against the films the champion was tested on.

The drift job (``lxn monitor``, ``jobs/monitor.py``) reads the most recent summaries the replicas wrote
(:mod:`lxn_ray.serving.summaries`) and the same statistics of the champion's test split - computed by the
same function, :func:`lxn_ray.serving.summaries.film_statistics`, and cached per model version under
``monitoring/reference/`` - and compares them statistic by statistic (:func:`check_drift`).

**The rule.** For each statistic, the population stability index (PSI) of the window against the
reference::

    PSI = sum over bins of (w_i - r_i) * ln(w_i / r_i)

where ``r_i`` and ``w_i`` are the shares of the reference and of the window in bin ``i``. Numeric
statistics (width, height, mean intensity, film fraction) are binned at the reference's quantiles: deciles
when the reference holds at least 200 films, else one bin per 20 reference films (at least 2), so no
reference bin is expected to hold fewer than 20; edges that coincide (a value most films share) merge
their bins. The format is compared by category. An empty bin's share is taken as 0.0001 so the logarithm
stays finite. A statistic has **drifted when its PSI exceeds 0.25**, the threshold of Siddiqi (2006),
*Credit Risk Scorecards*, Wiley, ch. 8: below 0.1 no significant change, 0.1-0.25 some change, above 0.25
a significant shift. The window has drifted when any statistic has. Beside PSI, the report gives the
two-sample Kolmogorov-Smirnov statistic and p-value of each numeric statistic (``scipy.stats.ks_2samp``),
for reading only: with hundreds of films KS calls tiny, harmless shifts significant, which is why PSI
with a fixed threshold decides.

Windows or references too small to judge (fewer than ``min_rows`` summaries, fewer than
:data:`MIN_REFERENCE` reference films) give a "not enough data" result, not a verdict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from lxn_ray import registry
from lxn_ray.infra.settings import setting
from lxn_ray.infra.storage import Storage
from lxn_ray.serving.summaries import FORMATS, FilmStatistics, Window, film_statistics, read_window

PSI_THRESHOLD = 0.25  # Siddiqi (2006): above 0.25 a significant shift
EMPTY_SHARE = 1e-4  # the share an empty bin counts as, so ln(w / r) stays finite
MAX_BINS = 10  # deciles of the reference
FILMS_PER_BIN = 20  # a smaller reference gets fewer bins: at least this many reference films per bin
MIN_REFERENCE = 2 * FILMS_PER_BIN  # fewer reference films than this: not enough data
NUMERIC = ("width", "height", "mean_intensity", "film_fraction")
CATEGORICAL = ("format",)
STATISTICS = CATEGORICAL + NUMERIC
UNITS = {
    "format": "PNG / JPEG / DICOM",
    "width": "pixels",
    "height": "pixels",
    "mean_intensity": "grey level, 0-255",
    "film_fraction": "share of the image's area",
}
REFERENCE = "monitoring/reference"  # storage prefix of the cached reference statistics, per model version
REFERENCE_SPLIT = "test"

# Exit codes of the drift job (lxn_ray.cli.monitor), here beside the rule they report.
NO_DRIFT, DRIFT, NOT_ENOUGH_DATA = 0, 3, 4


@dataclass(frozen=True)
class MonitorSettings:
    """What the drift job compares (``lxn monitor`` flags). Checked at construction: ValueError for a
    window, minimum or bin count below 1, hours or threshold <= 0."""

    model: str = setting(
        "champion", help="the model whose test split is the reference: champion or a model version id"
    )
    window: int = setting(1000, help="compare the most recent this many summaries (rows; default 1000)")
    hours: float | None = setting(
        None, help="only summaries written in the last this many hours (default: any age)"
    )
    min_rows: int = setting(
        100, help="fewer summaries than this in the window: not enough data to judge, exit 4 (default 100)"
    )
    threshold: float = setting(
        PSI_THRESHOLD, help="PSI above which a statistic has drifted (Siddiqi 2006: 0.25)", flag="--psi"
    )
    max_bins: int = setting(
        MAX_BINS, help="most quantile bins of the reference per numeric statistic (default 10: deciles)"
    )
    refresh_reference: bool = setting(
        False, help="recompute the reference statistics of the test split instead of reading the cache"
    )

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_rows < 1 or self.max_bins < 2:
            raise ValueError("window and min_rows must be >= 1 and max_bins >= 2")
        if self.hours is not None and self.hours <= 0:
            raise ValueError(f"hours must be > 0, got {self.hours}")
        if not self.threshold > 0:
            raise ValueError(f"the PSI threshold must be > 0, got {self.threshold}")


# -- the statistic ------------------------------------------------------------------------------------
def _psi(reference: np.ndarray, window: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """PSI of two count vectors over the same bins: (psi, reference shares, window shares)."""
    r = np.maximum(reference / max(reference.sum(), 1), EMPTY_SHARE)
    w = np.maximum(window / max(window.sum(), 1), EMPTY_SHARE)
    return float(np.sum((w - r) * np.log(w / r))), r, w


def bin_count(reference_size: int, max_bins: int = MAX_BINS) -> int:
    """How many quantile bins a reference of ``reference_size`` films gets: ``max_bins`` (deciles) from
    ``max_bins * 20`` films, else one per 20 films, at least 2."""
    return int(max(2, min(max_bins, reference_size // FILMS_PER_BIN)))


def numeric_psi(
    reference: Sequence[float], window: Sequence[float], max_bins: int = MAX_BINS
) -> dict[str, Any]:
    """PSI of a numeric statistic, binned at the reference's quantiles (module docstring).

    ``reference``, ``window``: 1-D sequences of floats (NaN not allowed), each non-empty. Returns ``psi``
    (float >= 0), ``edges`` (the interior bin edges, ascending; a value equal to an edge falls in the
    bin above it), ``reference`` and ``window`` (shares per bin, summing to ~1, empty bins at 0.0001) and
    ``ks`` / ``ks_p`` (two-sample Kolmogorov-Smirnov statistic and p-value, for reading only). Raises
    ValueError for an empty side."""
    from scipy.stats import ks_2samp

    ref, win = np.asarray(reference, dtype=np.float64), np.asarray(window, dtype=np.float64)
    if ref.size == 0 or win.size == 0:
        raise ValueError("both the reference and the window need at least one value")
    bins = bin_count(ref.size, max_bins)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    slots = len(edges) + 1
    counts_r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=slots)
    counts_w = np.bincount(np.searchsorted(edges, win, side="right"), minlength=slots)
    psi, r, w = _psi(counts_r.astype(np.float64), counts_w.astype(np.float64))
    ks = ks_2samp(ref, win)
    return {
        "psi": psi,
        "edges": [float(edge) for edge in edges],
        "reference": [float(x) for x in r],
        "window": [float(x) for x in w],
        "ks": float(ks.statistic),
        "ks_p": float(ks.pvalue),
    }


def categorical_psi(reference: Sequence[str], window: Sequence[str]) -> dict[str, Any]:
    """PSI of a categorical statistic over the categories either side holds (sorted). Returns ``psi``,
    ``categories``, and the ``reference`` and ``window`` shares per category (empty ones at 0.0001).
    Raises ValueError for an empty side."""
    if not reference or not window:
        raise ValueError("both the reference and the window need at least one value")
    categories = sorted(set(reference) | set(window))
    counts_r = np.array([list(reference).count(c) for c in categories], dtype=np.float64)
    counts_w = np.array([list(window).count(c) for c in categories], dtype=np.float64)
    psi, r, w = _psi(counts_r, counts_w)
    return {
        "psi": psi,
        "categories": categories,
        "reference": [float(x) for x in r],
        "window": [float(x) for x in w],
    }


def compare(
    reference: Sequence[Mapping[str, Any]],
    window: Sequence[Mapping[str, Any]],
    threshold: float = PSI_THRESHOLD,
    max_bins: int = MAX_BINS,
) -> dict[str, dict[str, Any]]:
    """Each of :data:`STATISTICS` compared (:func:`numeric_psi`, :func:`categorical_psi`), with
    ``drifted`` (``psi > threshold``) and ``unit``. ``reference`` and ``window`` are summary rows (dicts
    with the statistics' keys); rows missing a statistic are left out of that statistic."""
    result: dict[str, dict[str, Any]] = {}
    for name in STATISTICS:
        ref = [row[name] for row in reference if row.get(name) is not None]
        win = [row[name] for row in window if row.get(name) is not None]
        if not ref or not win:
            continue
        if name in CATEGORICAL:
            found = categorical_psi([str(v) for v in ref], [str(v) for v in win])
        else:
            found = numeric_psi([float(v) for v in ref], [float(v) for v in win], max_bins)
        found["drifted"] = bool(found["psi"] > threshold)
        found["unit"] = UNITS[name]
        found["reference_mean" if name in NUMERIC else "reference_n"] = (
            float(np.mean(ref)) if name in NUMERIC else len(ref)
        )
        if name in NUMERIC:
            found["window_mean"] = float(np.mean(win))
        result[name] = found
    return result


# -- the reference: the model's test split ------------------------------------------------------------
def reference_key(version: str) -> str:
    return f"{REFERENCE}/{version}.json"


def reference_statistics(
    storage: Storage, reference: str = "champion", refresh: bool = False
) -> dict[str, Any]:
    """The statistics of every film in the test split of the model ``reference`` (``champion`` or a
    model version id) was tested on, for its task: ``model_version``, ``dataset_version``, ``split``,
    ``task``, ``rows`` (one :class:`~lxn_ray.serving.summaries.FilmStatistics` dict per film), ``skipped``
    (films that did not decode) and ``computed_at``.

    A film's format is the one its source held (the images table's ``source_format``: a DICOM film's
    blob is stored as PNG), its other statistics are measured on the stored blob. Read from
    ``monitoring/reference/<version>.json`` when cached (a model version's test split never
    changes), else computed and cached. Raises FileNotFoundError when there is no champion, the model
    version or its dataset version is not published here; ValueError when the card names no dataset
    version.
    """
    from lxn_ray.data import dataset
    from lxn_ray.images.preprocess import decode_side

    version = registry.champion(storage) if reference == "champion" else reference
    if version is None:
        raise FileNotFoundError(f"no champion model in {storage.uri}: train or promote one first")
    card = registry.read_card(storage, version)  # FileNotFoundError for an unknown version
    key = reference_key(version)
    if not refresh and storage.exists(key):
        return storage.read_json(key)
    data_version = card.get("dataset_version")
    if not data_version:
        raise ValueError(f"model {version}'s card names no dataset version: no test split to compare with")
    task = registry.card_task(card)
    table = dataset.read_split(storage, data_version, REFERENCE_SPLIT, task=task)
    keys = table.column("image_key").to_pylist()
    # The format the source held: a DICOM film's blob is the PNG of its film (no header reaches storage),
    # and ingest records the file's own format beside it.
    held = table.column("source_format").to_pylist() if "source_format" in table.column_names else []
    held += [None] * (len(keys) - len(held))

    # Measured on the decode the model's replicas make (a large JPEG at a reduced scale), as served films are.
    model = registry.ModelRef(version, card, b"")  # the card's settings; the weights are not needed
    side = decode_side(model.image_size, model.preprocessing) if model.image_size else None

    def measure(image_key: str, source_format: str | None) -> FilmStatistics | None:
        from lxn_ray.images.types import ImageRejected

        try:
            found = film_statistics(storage.read_bytes(image_key), min_side=side)
        except (ImageRejected, FileNotFoundError):
            return None
        return dataclasses.replace(found, format=source_format) if source_format in FORMATS else found

    with ThreadPoolExecutor(max_workers=4) as pool:  # reading blobs (S3) overlaps with decoding
        measured = list(pool.map(measure, keys, held))
    rows = [found.as_dict() for found in measured if found is not None]
    result = {
        "model_version": version,
        "dataset_version": data_version,
        "split": REFERENCE_SPLIT,
        "task": registry.card_task_name(card),
        "rows": rows,
        "skipped": len(measured) - len(rows),
        "computed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json(key, result)
    return result


# -- the check ----------------------------------------------------------------------------------------
def check_drift(storage: Storage, settings: MonitorSettings = MonitorSettings()) -> dict[str, Any]:
    """Compare the most recent summaries with the reference (module docstring for the rule); returns the
    report: ``status`` (``no drift``, ``drift`` or ``not enough data``), ``exit_code`` (0, 3 or 4),
    ``drifted`` (names of the statistics past the threshold), ``statistics`` (:func:`compare`'s result),
    ``window`` (rows, files, first and last write time), ``reference`` (model and dataset version, split,
    films), ``rule`` (the test, threshold and its source), ``reason`` (why not enough data, else None),
    ``settings`` and ``checked_at``. Raises what :func:`reference_statistics` raises (no champion, ...).
    """
    reference = reference_statistics(storage, settings.model, settings.refresh_reference)
    window: Window = read_window(storage, settings.window, settings.hours)
    report: dict[str, Any] = {
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rule": {
            "test": "population stability index per statistic, quantile bins of the reference "
            "(categories for format)",
            "threshold": settings.threshold,
            "drift_when": f"PSI > {settings.threshold:g} for any statistic",
            "source": "Siddiqi (2006), Credit Risk Scorecards, Wiley: PSI < 0.1 no significant change, "
            "0.1-0.25 some change, > 0.25 a significant shift",
        },
        "window": {
            "rows": len(window.rows),
            "files": window.files,
            "first_written": window.first.isoformat(timespec="seconds") if window.first else None,
            "last_written": window.last.isoformat(timespec="seconds") if window.last else None,
            "unreadable_files": window.unreadable,
            "model_versions": sorted({str(row.get("model_version")) for row in window.rows}),
        },
        "reference": {key: reference[key] for key in ("model_version", "dataset_version", "split", "task")}
        | {"films": len(reference["rows"]), "skipped": reference.get("skipped", 0)},
        "settings": asdict(settings),
        "statistics": {},
        "drifted": [],
        "reason": None,
    }
    short = []
    if len(window.rows) < settings.min_rows:
        hours = f" from the last {settings.hours:g} h" if settings.hours else ""
        short.append(f"{len(window.rows)} summaries{hours} in the window, need at least {settings.min_rows}")
    if len(reference["rows"]) < MIN_REFERENCE:
        short.append(
            f"the reference ({reference['split']} split of {reference['dataset_version']}) has "
            f"{len(reference['rows'])} films, need at least {MIN_REFERENCE}"
        )
    if short:
        report.update(status="not enough data", exit_code=NOT_ENOUGH_DATA, reason="; ".join(short))
        return report
    statistics = compare(reference["rows"], window.rows, settings.threshold, settings.max_bins)
    drifted = [name for name, found in statistics.items() if found["drifted"]]
    report.update(
        statistics=statistics,
        drifted=drifted,
        status="drift" if drifted else "no drift",
        exit_code=DRIFT if drifted else NO_DRIFT,
    )
    return report


def plot_report(report: Mapping[str, Any]) -> bytes:
    """A PNG (matplotlib, Agg): one panel per statistic, the reference's and the window's share per bin
    side by side, titled with its PSI (red past the threshold). Raises ValueError for a report without
    statistics (not enough data)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    statistics = report.get("statistics") or {}
    if not statistics:
        raise ValueError("the report compares no statistics: nothing to plot")
    columns = min(3, len(statistics))
    rows = math.ceil(len(statistics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    threshold = report["rule"]["threshold"]
    for axis, (name, found) in zip(axes.flat, statistics.items(), strict=False):
        if "categories" in found:
            labels = list(found["categories"])
        else:
            edges = [f"{edge:.3g}" for edge in found["edges"]]  # a value on an edge is in the bin above
            labels = [f"<{edges[0]}", *[f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:], strict=True)]]
            labels.append(f">={edges[-1]}")
        positions = np.arange(len(labels))
        axis.bar(positions - 0.2, found["reference"], width=0.4, label="reference (test split)", color="0.6")
        axis.bar(positions + 0.2, found["window"], width=0.4, label="window (served)", color="tab:blue")
        axis.set_xticks(positions, labels, rotation=45, ha="right", fontsize=7)
        axis.set_ylabel("share of films")
        colour = "tab:red" if found["drifted"] else "black"
        verdict = "DRIFT" if found["drifted"] else "ok"
        axis.set_title(
            f"{name} ({found['unit']})\nPSI {found['psi']:.3f} {verdict}", color=colour, fontsize=9
        )
    for axis in list(axes.flat)[len(statistics) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    window, ref = report["window"], report["reference"]
    figure.suptitle(
        f"{report['status']}: last {window['rows']} summaries vs the {ref['split']} split of "
        f"{ref['dataset_version']} ({ref['films']} films, model {ref['model_version']}); "
        f"PSI > {threshold:g} drifts (Siddiqi 2006)",
        fontsize=9,
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
