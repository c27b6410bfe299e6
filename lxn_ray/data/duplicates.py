"""Step 4 of ingest: rows naming identical bytes, then the same radiograph published twice (confirmed by
lxn_ray.dedupe), dropped within and across sources, with the rule for which copy is kept; and the copies
whose findings disagree."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from lxn_ray.data.fetch import SourceFile
from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.search import DuplicatePair, DuplicateSearch, search_duplicates
from lxn_ray.infra import cluster
from lxn_ray.infra.log import get_logger
from lxn_ray.sources.tasks import category

DUPLICATES_SCHEMA = pa.schema(
    [
        ("dropped", pa.string()),
        ("kept", pa.string()),
        ("distance", pa.int64()),
        ("score", pa.float64()),
        ("dropped_line", pa.int64()),
        ("kept_line", pa.int64()),
        ("sha256", pa.string()),
        ("dropped_source", pa.string()),
        ("kept_source", pa.string()),
        ("mirrored", pa.bool_()),  # the dropped film is the kept one flipped left-right
    ]
)
log = get_logger("ingest").info


def drop_identical(
    files: list[SourceFile], published: frozenset[tuple[str, str]] = frozenset()
) -> tuple[list[SourceFile], list[dict[str, Any]]]:
    """Keep one row per content: the row already published (``published``: (source, image path) of the
    parent version's rows), else the first (``files`` come in priority order: sources in the order given,
    then metadata lines); the other rows with the same bytes are exact duplicates.

    Returns (one file per content, drop records of :data:`DUPLICATES_SCHEMA` with distance 0)."""
    first: dict[str, SourceFile] = {}
    duplicates = []
    for item in sorted(files, key=lambda f: (f.source, f.row.image_path) not in published):  # stable
        if item.sha256 in first:
            duplicates.append(_duplicate_entry(item, first[item.sha256], distance=0, score=0.0))
        else:
            first[item.sha256] = item
    return list(first.values()), duplicates


def _duplicate_entry(
    dropped: SourceFile, kept: SourceFile, distance: int, score: float | None, mirrored: bool = False
) -> dict[str, Any]:
    return {
        "dropped": dropped.row.filename,
        "kept": kept.row.filename,
        "distance": int(distance),
        "score": score,
        "dropped_line": dropped.row.line,
        "kept_line": kept.row.line,
        "sha256": dropped.sha256,
        "dropped_source": dropped.source,
        "kept_source": kept.source,
        "mirrored": mirrored,
    }


def dropped_key(entry: Mapping[str, Any]) -> tuple[str, int]:
    """(source, line) of a drop record's dropped row: its row's ``MetadataRow.key``."""
    return (entry["dropped_source"], entry["dropped_line"])


def kept_key(entry: Mapping[str, Any]) -> tuple[str, int]:
    """(source, line) of a drop record's kept row."""
    return (entry["kept_source"], entry["kept_line"])


def drop_near_duplicates(
    items: list[SourceFile],
    fingerprints: Mapping[str, dict[str, Any]],
    previous_shas: frozenset[str],
    config: DedupeConfig,
    priority: Mapping[str, int] | None = None,
) -> tuple[list[SourceFile], list[dict[str, Any]], DuplicateSearch]:
    """Split ``items`` into the kept ones and drop records ``{dropped, kept, distance, ...}``; and the
    duplicate search's counts and timings.

    Confirmed pairs form components. In each, images of the previous version are kept (they were judged
    distinct then); if there are none, the first by :func:`keep_rank` (the keep rule: first-listed source,
    then the original - most pixels, lossless before lossy, most bytes). The kept image's row - its
    finding, patient and metadata - is what survives. Every other member is dropped against the kept
    image it was paired with (or the component's first).
    """
    by_sha = {item.sha256: item for item in items}
    known = {sha: fingerprints[sha] for sha in by_sha if sha in previous_shas}
    new = {sha: fingerprints[sha] for sha in by_sha if sha not in previous_shas}
    search = search_duplicates(
        known,
        new,
        config,
        map_chunks=functools.partial(cluster.map_chunks_on_ray, progress=_verified) if new else None,
        named_pairs=_same_name_pairs(items),
    )
    edges: dict[str, dict[str, DuplicatePair]] = defaultdict(dict)
    for pair in search.pairs:
        edges[pair.a][pair.b] = pair
        edges[pair.b][pair.a] = pair

    def rank(sha: str) -> tuple:
        return keep_rank(by_sha[sha], fingerprints[sha], previous_shas, priority)

    dropped: list[dict[str, Any]] = []
    dropped_shas: set[str] = set()
    for component in _components(edges):
        ordered = sorted(component, key=rank)
        keepers = [sha for sha in ordered if sha in previous_shas] or ordered[:1]
        for sha in ordered:
            if sha in keepers:
                continue
            partners = [edges[sha][k] for k in keepers if k in edges[sha]]
            pair = min(partners, key=lambda p: (p.score, p.distance)) if partners else None
            kept_sha = (pair.b if pair.a == sha else pair.a) if pair else keepers[0]
            distance = (
                pair.distance
                if pair
                else _hamming(fingerprints[sha]["phash"], fingerprints[kept_sha]["phash"])
            )
            dropped_shas.add(sha)
            score = float(pair.score) if pair else None
            mirrored = bool(pair and pair.mirrored)
            dropped.append(_duplicate_entry(by_sha[sha], by_sha[kept_sha], distance, score, mirrored))
    kept = [item for item in items if item.sha256 not in dropped_shas]
    dropped.sort(key=lambda d: (d["kept_source"], d["kept"], d["dropped_source"], d["dropped"]))
    return kept, dropped, search


LOSSY_FORMATS = frozenset({"JPEG"})  # decoded source formats that lose detail when written (PNG, DICOM: not)


def keep_rank(
    item: SourceFile,
    record: Mapping[str, Any],
    previous_shas: frozenset[str] = frozenset(),
    priority: Mapping[str, int] | None = None,
) -> tuple:
    """The keep rule for copies of one film, as a sort key: the copy with the smallest key is kept.

    1. A copy already published in the previous version (it was judged distinct then; keeping it keeps
       dataset versions stable).
    2. The copy from the source listed first (``priority``: source name -> rank; a curated source's
       finding and metadata beat a republished copy's).
    3. The original over a copy made from it: the most pixels (copies are mostly downscaled), then a
       lossless format (PNG, DICOM) before a lossy one (JPEG: a q80 re-encode of a PNG has its pixel count
       but not its detail), then the most bytes (at equal size and format, the less compressed).
    4. The smallest file name, so the choice never depends on listing order.

    ``record`` is the content's fingerprint record (``width``, ``height``, ``source_format``)."""
    return (
        item.sha256 not in previous_shas,
        (priority or {}).get(item.source, 0),
        -(int(record["width"]) * int(record["height"])),
        str(record.get("source_format") or "").upper() in LOSSY_FORMATS,
        -item.size,
        item.row.filename,
    )


def _verified(done: int, total: int) -> None:
    log(f"duplicate check: {done} of {total} chunks of candidate pairs verified")


def search_summary(search: DuplicateSearch) -> dict[str, Any]:
    """The report's ``dedupe`` entry: how many pairs were verified per new image and where time went."""
    return {
        "new_images": search.new_images,
        "candidate_pairs": search.candidates,
        "candidates_per_new_image": round(search.candidates / max(search.new_images, 1), 2),
        "duplicate_pairs": len(search.pairs),
        "index_seconds": round(search.index_seconds, 3),
        "query_seconds": round(search.query_seconds, 3),
        "verify_seconds": round(search.verify_seconds, 3),
    }


def _same_name_pairs(items: list[SourceFile]) -> list[tuple[str, str]]:
    """Content pairs whose files carry the same name (case-insensitive) in two different sources: a
    republished copy often keeps its name, so these are verified as candidates whatever their hashes."""
    by_name: dict[str, list[SourceFile]] = defaultdict(list)
    for item in items:
        by_name[item.row.filename.rsplit("/", 1)[-1].casefold()].append(item)
    return [
        (a.sha256, b.sha256)
        for group in by_name.values()
        for i, a in enumerate(group)
        for b in group[i + 1 :]
        if a.source != b.source and a.sha256 != b.sha256
    ]


def _components(edges: Mapping[str, Mapping[str, Any]]) -> list[set[str]]:
    seen: set[str] = set()
    components = []
    for start in sorted(edges):
        if start in seen:
            continue
        stack, component = [start], set()
        while stack:
            node = stack.pop()
            if node not in component:
                component.add(node)
                stack.extend(edges[node])
        seen |= component
        components.append(component)
    return components


def _hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def label_disagreements(
    duplicates: list[dict[str, Any]], by_key: Mapping[tuple[str, int], SourceFile]
) -> list[dict[str, Any]]:
    """Copies of one film whose findings fall in different categories (covid, normal, pneumonia, other),
    and what was decided: the kept copy's finding stands (see :func:`drop_near_duplicates` for which)."""
    found = []
    for entry in duplicates:
        dropped, kept = by_key[dropped_key(entry)].row, by_key[kept_key(entry)].row
        if category(dropped.finding) != category(kept.finding):
            found.append(
                {
                    "kept": f"{kept.source}:{kept.image_path}",
                    "kept_finding": kept.finding,
                    "dropped": f"{dropped.source}:{dropped.image_path}",
                    "dropped_finding": dropped.finding,
                    "decision": f"kept {kept.source}'s finding {kept.finding!r}; the copy's "
                    f"{dropped.finding!r} was dropped with it",
                }
            )
    return found
