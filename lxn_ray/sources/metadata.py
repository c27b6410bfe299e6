"""Reading upstream ``metadata.csv`` in any of its schema versions into rows with normalised findings.

The upstream file changed shape as it grew: ``Patientid`` became ``patientid``, ``modality`` and
``folder`` appeared, clinical columns were added and renamed, findings went from flat (``COVID-19,
ARDS``) to hierarchical (``Pneumonia/Viral/COVID-19``), and some lines are malformed. This module turns
every version into the same :class:`MetadataRow` records and decides, from metadata alone, which rows
cannot be used (each with a reason). Rows carry findings, not labels: a task
(:mod:`lxn_ray.sources.tasks`) decides the label when rows are read for it. Decisions that need the
image bytes are made in :mod:`lxn_ray.data.ingest`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass, field

from lxn_ray.sources.tasks import category, normalise_finding
from lxn_ray.sources.transports import METADATA_FILE, is_hidden, is_plain_relative

# Exclusion reasons, as they appear in ingest reports.
MALFORMED_ROW = "malformed_row"
UNLABELLED = "unlabelled_finding"
CT = "ct"
NON_FRONTAL = "non_frontal_view"
VOLUMES = "volumes_folder"
UNSAFE_PATH = "unsafe_path"
HIDDEN_FILE = "hidden_file"  # a row naming a hidden or system file (lxn_ray.sources.transports.is_hidden)
UNSUPPORTED_FORMAT = "unsupported_format"  # a class-folder file that is not a film format read here
NOT_IN_CLASS_FOLDER = "not_in_class_folder"  # a class-folder source's file at the root (README, licence)
MISSING_FILE = "missing_file"
UNREADABLE = "unreadable_image"
DUPLICATE = "duplicate"

DEFAULT_FRONTAL_VIEWS = ("PA", "AP", "AP Supine", "AP erect", "AP semi erect")

# Canonical column -> spellings seen upstream (compared after lower-casing and trimming).
COLUMN_ALIASES = {
    "patient_id": ("patientid", "patient_id", "patient id"),
    "finding": ("finding", "findings"),
    "view": ("view",),
    "modality": ("modality",),
    "folder": ("folder",),
    "filename": ("filename", "file_name", "file name"),
    "sex": ("sex",),
    "age": ("age",),
    "offset": ("offset",),
    "date": ("date",),
    "location": ("location",),
}


class MetadataError(ValueError):
    """metadata.csv (or a manifest) cannot be read at all (no header, no filename column); the message names
    the file."""


@dataclass(frozen=True)
class MetadataRow:
    """One data line of metadata.csv (or one file of another layout), normalised."""

    line: int  # 1-based line number of the record's first line in the file (the file's place in a listing)
    filename: str
    folder: str
    patient_id: str
    finding: str  # normalised across sources (lxn_ray.sources.tasks.normalise_finding); tasks label it
    view: str
    modality: str
    extra: dict[str, str] = field(default_factory=dict)  # every other column, by its upstream name
    exclusion: str | None = None  # reason this row is unusable from metadata alone
    detail: str = ""
    source: str = ""  # the name of the source the row came from

    @property
    def key(self) -> tuple[str, int]:
        """Unique among the rows of every source of one ingest."""
        return (self.source, self.line)

    @property
    def image_path(self) -> str:
        """Path of the image relative to the source root, as metadata names it."""
        return f"{self.folder}/{self.filename}" if self.folder else self.filename


def normalise_view(view: str) -> str:
    return " ".join(view.split()).casefold()


def _column_index(header: list[str]) -> dict[str, int]:
    """Map canonical column names to their position in this file's header."""
    normalised = [" ".join(name.split()).casefold() for name in header]
    index: dict[str, int] = {}
    for canonical, spellings in COLUMN_ALIASES.items():
        for position, name in enumerate(normalised):
            if name in spellings:
                index[canonical] = position
                break
    return index


def parse_metadata(
    data: bytes,
    frontal_views: tuple[str, ...] = DEFAULT_FRONTAL_VIEWS,
    source: str = "",
    default_folder: str = "images",
    renames: dict[str, str] | None = None,
    name: str = METADATA_FILE,
) -> list[MetadataRow]:
    """Parse metadata.csv bytes of any upstream schema into rows, each with its exclusion if any.

    ``renames`` maps a column of this file to a canonical one (``{"label": "finding"}``: a manifest's own
    names). A file without a ``view`` column holds frontal films by assumption (a manifest's choice; the
    upstream file always has one). A row naming a hidden or system file (``.ipynb_checkpoints/``,
    ``__MACOSX/._x.png``: :func:`lxn_ray.sources.transports.is_hidden`, the rule listings follow) is
    excluded as ``hidden_file``. ``name`` is the file's name in the source (a manifest's own), used in
    errors. Raises :class:`MetadataError`, naming the file, when it cannot be read at all.
    """
    text = data.decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise MetadataError(f"{name} is empty") from None
    except csv.Error as error:
        raise MetadataError(f"{name} header unreadable: {error}") from None
    columns = _column_index(_apply_renames(header, renames or {}))
    if "filename" not in columns:
        raise MetadataError(f"{name} has no filename column (header: {header[:8]}...)")
    frontal = {normalise_view(view) for view in frontal_views}
    named = [name.strip() for name in header]

    rows: list[MetadataRow] = []
    line = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as error:  # e.g. a NUL byte or an unterminated quote
            rows.append(
                dataclasses.replace(_malformed(line, "", f"unparseable CSV line: {error}"), source=source)
            )
            line = reader.line_num + 1
            continue
        start, line = line, reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue  # blank line
        if len(record) > len(header) and any(cell.strip() for cell in record[len(header) :]):
            value = record[columns["filename"]].strip() if len(record) > columns["filename"] else ""
            detail = f"{len(record)} fields, header has {len(header)}"
            rows.append(dataclasses.replace(_malformed(start, value, detail), source=source))
            continue
        record = record + [""] * (len(header) - len(record))
        row = _row(start, record, columns, named, frontal, default_folder)
        rows.append(dataclasses.replace(row, source=source))
    return rows


def _apply_renames(header: list[str], renames: dict[str, str]) -> list[str]:
    """The header as :func:`_column_index` should see it: each renamed column under its canonical name,
    and a column that merely *spells* a renamed field's name (a manifest's free-text ``finding`` beside the
    ``label`` column it maps to ``finding``) under a neutral one, so the mapping always wins."""
    renamed = {name.strip().casefold(): canonical for name, canonical in renames.items()}
    taken = {
        " ".join(spelling.split())
        for canonical in renamed.values()
        for spelling in COLUMN_ALIASES.get(canonical, ())
    }
    out = []
    for name in header:
        key = name.strip().casefold()
        if key in renamed:
            out.append(renamed[key])
        elif " ".join(key.split()) in taken:
            out.append(f"source column {name.strip()}")
        else:
            out.append(name)
    return out


def _malformed(line: int, filename: str, detail: str) -> MetadataRow:
    return MetadataRow(
        line=line,
        filename=filename or f"<line {line}>",
        folder="",
        patient_id="",
        finding="",
        view="",
        modality="",
        exclusion=MALFORMED_ROW,
        detail=detail,
    )


def _row(
    line: int,
    record: list[str],
    columns: dict[str, int],
    header: list[str],
    frontal: set[str],
    default_folder: str,
) -> MetadataRow:
    def get(column: str) -> str:
        return " ".join(record[columns[column]].split()) if column in columns else ""

    filename = record[columns["filename"]].strip()
    finding, view, modality = normalise_finding(get("finding")), get("view"), get("modality")
    folder = get("folder") or default_folder
    used = set(columns.values())
    extra = {name: record[i].strip() for i, name in enumerate(header) if i not in used and name}
    for canonical in ("sex", "age", "offset", "date", "location"):
        if canonical in columns:
            extra[canonical] = get(canonical)

    is_ct = modality.casefold() == "ct" or normalise_view(view) == "ct" or filename.endswith(".nii.gz")
    if not filename:
        exclusion, detail = MALFORMED_ROW, "no filename"
    elif not is_plain_relative(filename) or (folder and not is_plain_relative(folder)):
        exclusion, detail = UNSAFE_PATH, f"file name leaves the source root: {filename!r}"
    elif is_hidden(f"{folder}/{filename}"):
        exclusion, detail = HIDDEN_FILE, "a hidden or system file (dot-file, __MACOSX, Thumbs.db), not a film"
    elif category(finding) is None:  # no task can use it
        exclusion, detail = UNLABELLED, f"finding {finding!r}"
    elif is_ct:
        exclusion, detail = CT, "CT, not a radiograph"
    elif folder.casefold() == "volumes":
        exclusion, detail = VOLUMES, "volumes folder (CT volumes)"
    elif "view" in columns and normalise_view(view) not in frontal:
        exclusion, detail = NON_FRONTAL, f"view {view!r}"
    else:
        exclusion, detail = None, ""
    return MetadataRow(
        line=line,
        filename=filename,
        folder=folder,
        patient_id=get("patient_id"),
        finding=finding,
        view=view,
        modality=modality or "X-ray",
        extra=extra,
        exclusion=exclusion,
        detail=detail,
    )
