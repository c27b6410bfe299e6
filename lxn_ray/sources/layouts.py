"""Named sources and their layouts: how a location becomes rows (file, finding, patient, view, source).

A dataset version draws on one or more :class:`SourceSpec`: a name (the source's identity: patient ids
are qualified by it, metrics are broken down by it), a location (any that :mod:`lxn_ray.sources.transports`
opens:
folder, git, ``s3://``, ``https://``) and a layout:

``upstream``
    ``metadata.csv`` + ``images/`` (ieee8023), parsed by :mod:`lxn_ray.sources.metadata` in any schema
    version.
``class-folders``
    ``<class>/<file>``: the class is the first folder, mapped to a finding (``classes:`` or the folder
    name normalised, so ``No_findings`` is ``No Finding``) - Keras' ``image_dataset_from_directory``
    layout. The patient is the first group of ``patient_id_pattern`` matched on the file name; without
    a pattern each file is its own patient (the report says so). Folders are listed by the transport's
    one rule (hidden and system files are not data: :func:`lxn_ray.sources.transports.visible_files`).
    Every listed file that is not read is named in the report: a film in a format this layout does not
    read (``.tif``, ``.bmp``, ...) or outside any class folder is an excluded row (``unsupported_format``,
    ``not_in_class_folder``); any other file (a README, notes) is named in the source's
    ``files_skipped`` with the reason. A ``classes:`` entry that matches no folder is an error.
``manifest``
    A CSV (``manifest:``, default ``manifest.csv``) naming file, finding and patient columns
    (``columns:`` maps ``filename``/``finding``/``patient_id``/``view`` to this file's own names); paths
    are relative to the source root.
``dicom``
    DICOM films (:mod:`lxn_ray.images.dicom`): the finding from the manifest when there is one, else from
    class
    folders; the patient from the header's Patient ID (a manifest ``patient_id`` column overrides it),
    the view from View Position, the modality from Modality. Only those header fields are read. Objects
    that are not single-frame CR/DX chest films are excluded with the reason. Patient ids are
    pseudonymised (:func:`pseudonymise`) and no other manifest column is kept.

``auto`` (the default) picks upstream when ``metadata.csv`` exists, else manifest when the manifest file
exists, else class folders.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lxn_ray.images.decode import ImageRejected
from lxn_ray.sources.metadata import (
    DEFAULT_FRONTAL_VIEWS,
    MISSING_FILE,
    NON_FRONTAL,
    NOT_IN_CLASS_FOLDER,
    UNLABELLED,
    UNREADABLE,
    UNSAFE_PATH,
    UNSUPPORTED_FORMAT,
    MetadataRow,
    normalise_view,
    parse_metadata,
)
from lxn_ray.sources.tasks import category, normalise_finding
from lxn_ray.sources.transports import (
    METADATA_FILE,
    UPSTREAM,
    Snapshot,
    Source,
    SourceError,
    is_plain_relative,
    open_source,
)
from lxn_ray.sources.yamltext import load_text_yaml, typed_value

LAYOUTS = ("auto", "upstream", "class-folders", "manifest", "dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")  # and files without a suffix, as PACS exports name them
# Films a layout may meet but not read: named in the report as excluded rows, never skipped unseen.
FILM_SUFFIXES = (
    *IMAGE_SUFFIXES,
    *DICOM_SUFFIXES,
    *(".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".j2k", ".jpx", ".jfif", ".jpe", ".heic"),
    *(".pgm", ".pnm", ".ppm", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"),
)
DICOM_HEADER_BYTES = 256 * 1024  # read this much of a DICOM file for its header; the whole file if short
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SPEC_KEYS = frozenset(
    {"name", "uri", "ref", "layout", "patient_id_pattern", "classes", "manifest", "columns"}
    | {"hash_patient_ids"}
)
MANIFEST_COLUMNS = frozenset({"filename", "finding", "patient_id", "view"})


@dataclass(frozen=True)
class SourceSpec:
    """One named source of a dataset (an entry of a ``--sources`` file)."""

    name: str
    uri: str | None = None  # None: the upstream ieee8023 repository
    ref: str | None = None  # git branch, tag or commit
    layout: str = "auto"
    patient_id_pattern: str | None = None  # class folders / manifests: the first group of a match
    classes: dict[str, str] = field(default_factory=dict)  # class folder -> finding
    manifest: str = "manifest.csv"
    columns: dict[str, str] = field(default_factory=dict)  # canonical column -> the manifest's name
    hash_patient_ids: bool | None = None  # None: for the dicom layout only

    @property
    def pseudonymised(self) -> bool:
        """Whether this source's patient ids are stored as salted hashes (:func:`pseudonymise`)."""
        return self.layout == "dicom" if self.hash_patient_ids is None else self.hash_patient_ids

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise SourceError(f"source name {self.name!r}: use letters, digits, '_', '.', '-' (max 64)")
        if self.layout not in LAYOUTS:
            raise SourceError(f"source {self.name}: layout {self.layout!r} is not one of {LAYOUTS}")
        if self.patient_id_pattern is not None:
            try:
                groups = re.compile(self.patient_id_pattern).groups
            except re.error as error:
                raise SourceError(f"source {self.name}: patient_id_pattern: {error}") from None
            if groups < 1:
                raise SourceError(f"source {self.name}: patient_id_pattern needs a (group) for the id")
        unknown = set(self.columns) - MANIFEST_COLUMNS
        if unknown:
            raise SourceError(f"source {self.name}: unknown manifest columns {sorted(unknown)}")
        if not is_plain_relative(self.manifest):
            raise SourceError(f"source {self.name}: manifest must be a path inside the source")

    def open(self, cache_dir: Path | None = None) -> Source:
        """The :class:`lxn_ray.sources.transports.Source` this spec names (nothing is read yet)."""
        marker = {"upstream": METADATA_FILE, "manifest": self.manifest}.get(self.layout)
        if self.layout == "auto" and (self.uri or UPSTREAM).startswith(("http://", "https://")):
            marker = METADATA_FILE  # a raw HTTP mirror cannot be listed: auto means upstream there
        return open_source(self.uri, self.ref, cache_dir, marker=marker)

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value not in (None, {}, "")}


DEFAULT_SOURCE_NAME = "ieee8023"  # a lone --source is the upstream dataset or a copy of it


def read_sources_file(path: str | Path) -> list[SourceSpec]:
    """The sources of a ``--sources`` YAML file, in the order given (the order is the priority when copies
    of one film sit in two sources). Relative locations resolve against the current directory.

    Values are taken as written (:func:`lxn_ray.sources.yamltext.load_text_yaml`): ``ref: 1.10`` is the ref
    ``1.10`` (not the float 1.1), ``ref: 0123`` is ``0123``, and ``classes: {Yes: COVID-19, No: No
    Finding}`` maps the folders ``Yes`` and ``No``. Only ``hash_patient_ids`` is a boolean; an empty or
    ``~`` value of an optional key means the key is absent.

    Raises :class:`lxn_ray.sources.transports.SourceError` for an unreadable file, unknown keys, a value of
    the wrong kind, a duplicate name or a bad pattern.
    """
    import yaml

    path = Path(path)
    try:
        document = load_text_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SourceError(f"{path}: not a readable sources file ({error})") from None
    entries = document.get("sources") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SourceError(f"{path}: expected a top-level 'sources:' list")
    specs: list[SourceSpec] = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "name" not in entry or "uri" not in entry:
            raise SourceError(f"{path}: source {number} needs 'name' and 'uri'")
        unknown = set(entry) - SPEC_KEYS
        if unknown:
            raise SourceError(f"{path}: source {entry['name']}: unknown keys {sorted(unknown)}")
        for key in ("uri", "patient_id_pattern"):
            value = entry.get(key)
            if key == "patient_id_pattern" and typed_value(value) is None:
                continue  # optional
            if not isinstance(value, str) or not value.strip():
                raise SourceError(f"{path}: source {entry['name']}: {key} must be a non-empty string")
        for key in ("classes", "columns"):
            mapping = typed_value(entry.get(key)) or {}
            if not isinstance(mapping, dict):
                raise SourceError(f"{path}: source {entry['name']}: {key} must be a mapping")
            for name, value in mapping.items():
                if not all(isinstance(text, str) and text.strip() for text in (name, value)):
                    raise SourceError(
                        f"{path}: source {entry['name']}: {key} must map names to names ({name!r}: {value!r})"
                    )
        for key in ("ref", "layout", "manifest"):
            if typed_value(entry.get(key)) is not None and not isinstance(entry[key], str):
                raise SourceError(f"{path}: source {entry['name']}: {key} must be a string")
        uri = str(entry["uri"])
        if "://" not in uri and not re.match(r"^[\w.-]+@[\w.-]+:", uri):
            uri = str(Path(uri).expanduser().resolve())
        specs.append(
            SourceSpec(
                name=str(entry["name"]),
                uri=uri,
                ref=_optional_text(entry, "ref"),
                layout=_optional_text(entry, "layout") or "auto",
                patient_id_pattern=_optional_text(entry, "patient_id_pattern"),
                classes={str(k): str(v) for k, v in (typed_value(entry.get("classes")) or {}).items()},
                manifest=_optional_text(entry, "manifest") or "manifest.csv",
                columns={str(k): str(v) for k, v in (typed_value(entry.get("columns")) or {}).items()},
                hash_patient_ids=_optional_bool(entry, "hash_patient_ids", path),
            )
        )
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise SourceError(f"{path}: source names must be unique ({names})")
    return specs


def _optional_text(entry: dict[str, Any], key: str) -> str | None:
    """The key's text as written, or None when it is absent or left empty (``key:``, ``key: ~``)."""
    value = entry.get(key)
    return None if typed_value(value) is None else str(value)


def _optional_bool(entry: dict[str, Any], key: str, path: Path) -> bool | None:
    value = typed_value(entry.get(key))
    if value is not None and not isinstance(value, bool):
        raise SourceError(f"{path}: source {entry['name']}: {key} must be true or false")
    return value


def pseudonymise(patient_id: str, salt: bytes) -> str:
    """The stored form of a patient id: ``p-`` and the first 20 hex digits of HMAC-SHA-256(salt, id).

    A keyed hash (RFC 2104), so ids cannot be recovered by hashing candidate ids without the salt, and
    the same id always maps to the same pseudonym within a store (patient-level splits stay stable). An
    empty id stays empty (the film is then its own patient)."""
    if not patient_id:
        return ""
    return "p-" + hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


@dataclass(frozen=True)
class SourceRows:
    """What a layout read from one snapshot: rows, the bytes that describe them (hashed into the source
    version) and notes for the report."""

    rows: list[MetadataRow]
    listing: bytes
    layout: str
    notes: dict[str, Any]


MAX_LISTING_BYTES = 64 * 1024 * 1024  # metadata.csv or a manifest


def _read_if_present(snapshot: Snapshot, relative_path: str) -> bytes | None:
    """The file's bytes, or None when the source has no such file (any other failure is raised: a network
    error must not pass for a missing file and switch the layout)."""
    try:
        return snapshot.read_file(relative_path, MAX_LISTING_BYTES)
    except FileNotFoundError:
        return None


def _detect(snapshot: Snapshot, spec: SourceSpec) -> tuple[str, bytes | None]:
    """(layout, the bytes of its metadata.csv or manifest - read once - or None for class folders)."""
    if spec.layout == "upstream":
        return "upstream", snapshot.read_metadata()
    if spec.layout == "manifest":
        return "manifest", snapshot.read_file(spec.manifest, MAX_LISTING_BYTES)
    if spec.layout == "auto":
        if (data := _read_if_present(snapshot, METADATA_FILE)) is not None:
            return "upstream", data
        if (data := _read_if_present(snapshot, spec.manifest)) is not None:
            return "manifest", data
    return "class-folders", None


def detect_layout(snapshot: Snapshot, spec: SourceSpec) -> str:
    """The layout ``auto`` resolves to on this snapshot (or the spec's own)."""
    return _detect(snapshot, spec)[0]


def read_rows(
    snapshot: Snapshot,
    spec: SourceSpec,
    frontal_views: tuple[str, ...] = DEFAULT_FRONTAL_VIEWS,
    patient_salt: bytes | None = None,
) -> SourceRows:
    """Every row of ``snapshot`` in the spec's layout, each with its exclusion (if metadata rules it out).

    For a :attr:`SourceSpec.pseudonymised` source the patient ids are replaced by :func:`pseudonymise`
    with ``patient_salt`` before the rows leave this function; raises :class:`SourceError` without one."""
    if spec.pseudonymised and not patient_salt:
        raise SourceError(f"source {spec.name}: pseudonymised patient ids need a salt")
    found = _read_rows(snapshot, spec, frontal_views)
    if spec.pseudonymised:
        rows = [replace(row, patient_id=pseudonymise(row.patient_id, patient_salt)) for row in found.rows]
        found = replace(found, rows=rows, notes={**found.notes, "patient_ids": "salted hashes"})
    return found


def _classes_need_class_folders(spec: SourceSpec, layout: str) -> None:
    """Raise :class:`SourceError` when ``classes:`` is given to a source whose findings come from a
    metadata file (``layout``), where the mapping would be silently ignored."""
    if spec.classes:
        raise SourceError(
            f"source {spec.name}: classes: maps class folders to findings, but its layout is {layout} "
            "(findings come from its metadata file): remove classes:, or point the source at class folders"
        )


def _read_rows(snapshot: Snapshot, spec: SourceSpec, frontal_views: tuple[str, ...]) -> SourceRows:
    if spec.layout == "dicom":
        return _dicom_rows(snapshot, spec, frontal_views)
    layout, data = _detect(snapshot, spec)
    if layout in ("upstream", "manifest"):
        _classes_need_class_folders(spec, layout)
    if layout == "upstream":
        rows = parse_metadata(data, frontal_views, source=spec.name, name=_file_of(spec, METADATA_FILE))
        return SourceRows(rows, data, layout, {})
    if layout == "manifest":
        renames = {theirs: canonical for canonical, theirs in spec.columns.items()}
        rows = parse_metadata(
            data,
            frontal_views,
            source=spec.name,
            default_folder="",
            renames=renames,
            name=_file_of(spec, spec.manifest),
        )
        rows = [_with_patient(row, spec) for row in rows]
        return SourceRows(rows, data, layout, _patient_notes(rows, spec))
    return _class_folder_rows(snapshot, spec)


def _file_of(spec: SourceSpec, relative_path: str) -> str:
    """How errors name a file the layout parses: the source and the file's own name in it."""
    return f"source {spec.name}: {relative_path}"


def _patient_from_name(filename: str, spec: SourceSpec) -> str:
    if not spec.patient_id_pattern:
        return ""
    match = re.search(spec.patient_id_pattern, filename.rsplit("/", 1)[-1])
    return match.group(1) if match and match.group(1) else ""


def _with_patient(row: MetadataRow, spec: SourceSpec) -> MetadataRow:
    if row.patient_id or not spec.patient_id_pattern:
        return row
    from dataclasses import replace

    return replace(row, patient_id=_patient_from_name(row.filename, spec))


def _patient_notes(rows: list[MetadataRow], spec: SourceSpec) -> dict[str, Any]:
    usable = [row for row in rows if not row.exclusion]
    without = sum(not row.patient_id for row in usable)
    if not without:
        return {}
    rule = (
        f"patient_id_pattern {spec.patient_id_pattern!r} did not match"
        if spec.patient_id_pattern
        else "no patient column and no patient_id_pattern"
    )
    return {
        "files_without_patient": without,
        "patients": f"{without} files have no patient id ({rule}): each is its own patient, so a "
        "patient's films may land in two splits",
    }


def _is_image_name(path: str) -> bool:
    return path.casefold().endswith(IMAGE_SUFFIXES)


IMAGE_FORMATS = "PNG or JPEG (.png, .jpg, .jpeg); DICOM films need layout: dicom"


def _class_folder_rows(
    snapshot: Snapshot,
    spec: SourceSpec,
    wanted: Callable[[str], bool] = _is_image_name,
    formats: str = IMAGE_FORMATS,
    layout: str = "class-folders",
) -> SourceRows:
    """Rows of ``<class>/<file>`` for each file ``wanted`` (a name this layout reads); ``formats`` says
    which those are, in the report.

    Every other listed file is named in the report with its reason: a film (:data:`FILM_SUFFIXES`) as an
    excluded row - ``unsupported_format`` in a class folder, ``not_in_class_folder`` at the root - and any
    other file in the notes' ``files_skipped`` (``files_ignored`` counts them). Raises
    :class:`SourceError` when a ``classes:`` entry names no folder of the listing (a mapping that matches
    nothing would leave its films under their folder's own name, silently), or when there is no
    ``<class>/<file>`` at all."""
    files = snapshot.list_files()
    folders = {path.partition("/")[0] for path in files if "/" in path}
    unmatched = sorted(set(spec.classes) - folders)
    if unmatched:
        raise SourceError(
            f"source {spec.name}: classes {unmatched} match no class folder in {snapshot.description} "
            f"(its folders: {sorted(folders)}); class names are matched exactly as written"
        )
    rows, skipped = [], {}
    for line, path in enumerate(files, 1):
        folder, _, filename = path.partition("/")
        if not filename:  # at the root: README, licences, or a film without a class
            folder, filename = "", path
        finding = normalise_finding(spec.classes.get(folder, folder)) if folder else ""
        if not folder or not wanted(path):
            if not path.casefold().endswith(FILM_SUFFIXES):
                skipped[path] = f"not a film: {layout} reads {formats}" if folder else "not in a class folder"
                continue
            if not folder:
                exclusion, detail = NOT_IN_CLASS_FOLDER, "a film at the source root, in no class folder"
            else:
                exclusion = UNSUPPORTED_FORMAT
                detail = f"{Path(filename).suffix} is not read by {layout}: it reads {formats}"
        elif not is_plain_relative(path):
            exclusion, detail = UNSAFE_PATH, f"file name leaves the source root: {path!r}"
        elif category(finding) is None:  # no task can use it
            exclusion, detail = UNLABELLED, f"class folder {folder!r}"
        else:
            exclusion, detail = None, ""
        rows.append(
            MetadataRow(
                line=line,
                filename=filename,
                folder=folder,
                patient_id=_patient_from_name(filename, spec),
                finding=finding,
                view="",  # class folders say nothing of the view: frontal by assumption
                modality="X-ray",
                exclusion=exclusion,
                detail=detail,
                source=spec.name,
            )
        )
    if not rows:
        raise SourceError(f"source {spec.name}: no <class>/<image> files in {snapshot.description}")
    described = {"classes": spec.classes, "pattern": spec.patient_id_pattern, "files": files}
    listing = repr(sorted(described.items())).encode()
    notes: dict[str, Any] = {
        "files_ignored": len(skipped),
        "views": "not recorded by class folders: frontal by assumption",
    }
    if skipped:
        notes["files_skipped"] = skipped
    notes.update(_patient_notes(rows, spec))
    return SourceRows(rows, hashlib.sha256(listing).hexdigest().encode(), "class-folders", notes)


# -- DICOM --------------------------------------------------------------------------------------------
def _read_head(snapshot: Snapshot, relative_path: str) -> bytes:
    """The first :data:`DICOM_HEADER_BYTES` of a file where the snapshot can read a prefix (local
    folders), else the whole file (capped like any image)."""
    from lxn_ray.images.decode import ImageLimits

    read_head = getattr(snapshot, "read_head", None)
    if read_head is not None:
        return read_head(relative_path, DICOM_HEADER_BYTES)
    return snapshot.read_file(relative_path, ImageLimits().max_file_bytes)


def _dicom_header(snapshot: Snapshot, relative_path: str):
    """The file's :class:`lxn_ray.images.dicom.DicomHeader`. A prefix that ends before Pixel Data (a large
    private element first, or no Pixel Data at all) reads as failing or as having no pixels: then the whole
    file is read, and a file without Pixel Data is refused as ``no_pixel_data``."""
    from lxn_ray.images.decode import ImageLimits
    from lxn_ray.images.dicom import read_header

    data = _read_head(snapshot, relative_path)
    if len(data) < DICOM_HEADER_BYTES:  # the whole file
        return read_header(data)
    try:
        header = read_header(data)
        if header.has_pixels:  # Pixel Data starts inside the prefix: the header is complete
            return header
    except ImageRejected:
        pass
    return read_header(snapshot.read_file(relative_path, ImageLimits().max_file_bytes))


DICOM_FORMATS = "DICOM files (.dcm, .dicom, or no suffix)"


def _is_dicom_name(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.casefold().endswith(DICOM_SUFFIXES) or ("." not in name and name.upper() != "DICOMDIR")


def _dicom_listing(snapshot: Snapshot, spec: SourceSpec) -> tuple[list[MetadataRow], bytes, dict[str, Any]]:
    """Rows naming file, finding and (optionally) patient and view, from the manifest or class folders."""
    manifest = _read_if_present(snapshot, spec.manifest)
    if manifest is not None:
        _classes_need_class_folders(spec, f"dicom with a {spec.manifest}")
        renames = {theirs: canonical for canonical, theirs in spec.columns.items()}
        rows = parse_metadata(
            manifest, source=spec.name, default_folder="", renames=renames, name=_file_of(spec, spec.manifest)
        )
        return rows, manifest, {"findings_from": spec.manifest}
    described = _class_folder_rows(snapshot, spec, _is_dicom_name, DICOM_FORMATS, "dicom")
    return described.rows, described.listing, {"findings_from": "class folders"}


def _dicom_rows(snapshot: Snapshot, spec: SourceSpec, frontal_views: tuple[str, ...]) -> SourceRows:
    """The dicom layout: each listed file's header gives patient, view and modality, or its exclusion."""
    from lxn_ray.images.dicom import BURNED_IN, refusal

    listed, listing, notes = _dicom_listing(snapshot, spec)
    frontal = {normalise_view(view) for view in frontal_views}
    rows, views_assumed = [], 0
    for row in listed:
        exclusion, detail, header = row.exclusion, row.detail, None
        if exclusion is None:
            try:
                header = _dicom_header(snapshot, row.image_path)
            except FileNotFoundError:
                exclusion, detail = MISSING_FILE, "no such file in the source"
            except (ImageRejected, ValueError) as error:  # not DICOM, corrupt, over the byte cap
                exclusion, detail = UNREADABLE, str(error)
        if header is not None and (problem := refusal(header)) is not None:
            exclusion, detail = problem.reason, str(problem)
        elif header is not None and header.burned_in_annotation:  # stored pixels must not identify anyone
            exclusion, detail = BURNED_IN, "Burned In Annotation is YES: the pixels may show identifying text"
        view = row.view or (header.view if header else "")
        if exclusion is None and view and normalise_view(view) not in frontal:
            exclusion, detail = NON_FRONTAL, f"view {view!r}"
        views_assumed += exclusion is None and not view
        rows.append(
            MetadataRow(
                line=row.line,
                filename=row.filename,
                folder=row.folder,
                patient_id=row.patient_id or (header.patient_id if header else ""),
                finding=row.finding,
                view=view,
                modality=header.modality if header else "",
                extra={},  # no other manifest column or header field is kept
                exclusion=exclusion,
                detail=detail,
                source=spec.name,
            )
        )
    if views_assumed:
        notes["views"] = f"{views_assumed} films state no View Position: frontal by assumption"
    notes.update(_patient_notes(rows, spec))
    return SourceRows(rows, listing, "dicom", notes)
