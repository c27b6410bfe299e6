"""The duplicate stage's memory does not grow with the store's thumbnails: stored fingerprints are loaded
without their 16 KB thumbnails (each ``thumb`` a :class:`~lxn_ray.dedupe.thumbs.ThumbRef`), and
verification reads back only the row groups of the films in candidate pairs. Behaviour, not timing: every
thumbnail materialised from storage is counted where it is read (``thumbs._read_group``)."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from lxn_ray.data import fetch
from lxn_ray.dedupe import thumbs
from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.fingerprint import FINGERPRINT_COLUMNS, FINGERPRINT_VERSION, THUMB_SIZE, fingerprint
from lxn_ray.dedupe.index import N_WINDOWS
from lxn_ray.dedupe.search import candidate_pairs, search_duplicates
from lxn_ray.dedupe.thumbs import THUMB_ROWS_PER_GROUP, ThumbRef
from lxn_ray.infra.storage import Storage

from .test_dedupe import radiograph

STORED = 6400  # 200 row groups of 32, in four shards
SHARDS = 4
ORIGINALS = 4  # stored radiographs that get a copy among the new films


def _fillers(n: int) -> list[dict[str, object]]:
    """``n`` cheap stored fingerprints of other films: random hashes, unit vectors and thumbnails (the
    index proposes the k nearest whatever they are, so fillers are candidates too)."""
    rng = np.random.default_rng(0)
    whole = rng.normal(size=(n, 64))
    whole /= np.linalg.norm(whole, axis=1, keepdims=True)
    windows = rng.normal(size=(n, N_WINDOWS, 64))
    windows /= np.linalg.norm(windows, axis=2, keepdims=True)
    hashes = rng.integers(0, 2**63, size=(n, 3))
    thumbs = rng.integers(0, 256, size=(n, THUMB_SIZE * THUMB_SIZE), dtype=np.uint8)
    return [
        {
            "sha256": hashlib.sha256(f"filler-{i}".encode()).hexdigest(),
            "error": None,
            "width": 256,
            "height": 256,
            "source_format": "PNG",
            "source_mode": "L",
            "dedupe_version": FINGERPRINT_VERSION,
            **{
                name: f"{int(h):016x}"
                for name, h in zip(("phash", "phash_trim", "dhash_trim"), hashes[i], strict=True)
            },
            "trim_box": "0,0,256,256",
            "thumb_size": THUMB_SIZE,
            "thumb": thumbs[i].tobytes(),
            "lowres": whole[i].astype(np.float16).tobytes(),
            "windows": windows[i].astype(np.float16).tobytes(),
        }
        for i in range(n)
    ]


def _record(image: Image.Image, key: str) -> dict[str, object]:
    return {
        "sha256": key,
        "error": None,
        "width": image.width,
        "height": image.height,
        "source_format": "PNG",
        "source_mode": "L",
        **fingerprint(image),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Storage, dict[str, dict], dict[str, dict]]:
    """A store whose fingerprint cache holds STORED films in two shards written as ingest writes them, and
    the new films' records: a copy of each of ORIGINALS stored radiographs and two distinct films."""
    storage = Storage.open(str(tmp_path_factory.mktemp("store")))
    records = [_record(radiograph(seed), f"original-{seed}") for seed in range(ORIGINALS)]
    records += _fillers(STORED - ORIGINALS)
    per_shard = STORED // SHARDS
    for shard in range(SHARDS):
        part = records[shard * per_shard : (shard + 1) * per_shard]
        fetch._write_grouped(
            storage, f"{fetch.FINGERPRINT_CACHE}/shard-{shard}.parquet", fetch._records_table(part)
        )
    new_images = [
        ImageEnhance.Brightness(radiograph(seed).crop((8, 6, 230, 270))).enhance(1.2)
        for seed in range(ORIGINALS)
    ]
    new_images += [radiograph(500), radiograph(501)]
    new = {f"new-{i}": _record(image, f"new-{i}") for i, image in enumerate(new_images)}
    return storage, {r["sha256"]: r for r in records}, new  # type: ignore[misc]


def test_cache_shards_have_small_row_groups(store) -> None:
    storage, _, _ = store
    for key in storage.list(fetch.FINGERPRINT_CACHE):
        meta = pq.ParquetFile(storage.path(key)).metadata
        assert meta.num_row_groups == STORED // SHARDS // THUMB_ROWS_PER_GROUP
        assert max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) <= THUMB_ROWS_PER_GROUP


def test_duplicate_stage_reads_only_the_thumbnails_of_candidate_pairs(store, monkeypatch) -> None:
    storage, inline_known, new = store
    known = fetch._load_cache(storage)
    assert set(known) == set(inline_known)
    # loading the cache materialises no thumbnail: each is a ref to its row
    assert all(isinstance(record["thumb"], ThumbRef) for record in known.values())
    assert sum(len(v) for r in known.values() for v in r.values() if isinstance(v, bytes)) < 3000 * STORED

    read: Counter[tuple[str, int]] = Counter()
    rows_decoded = 0
    real_read_group = thumbs._read_group

    def counting(shard, key, row_group):  # type: ignore[no-untyped-def]
        nonlocal rows_decoded
        column = real_read_group(shard, key, row_group)
        read[(key, row_group)] += 1
        rows_decoded += len(column)
        return column

    monkeypatch.setattr(thumbs, "_read_group", counting)
    config = DedupeConfig()
    found = search_duplicates(known, new, config)
    candidates = candidate_pairs(known, new, config)
    in_pairs = {k for pair in candidates for k in pair if k in known}
    groups_needed = {(known[k]["thumb"].key, known[k]["thumb"].row_group) for k in in_pairs}

    assert in_pairs and len(in_pairs) < STORED // 4
    assert set(read) == groups_needed  # only the row groups of stored films in candidate pairs
    print(
        f"{len(in_pairs)} stored films in candidate pairs, {len(read)} row groups, {rows_decoded} rows read"
    )
    assert rows_decoded <= len(groups_needed) * THUMB_ROWS_PER_GROUP < STORED // 2
    # and the decisions are those of the same fingerprints held whole in memory
    monkeypatch.setattr(thumbs, "_read_group", real_read_group)
    assert found.pairs == search_duplicates(inline_known, new, config).pairs
    copies = {(p.a, p.b) if p.a.startswith("new-") else (p.b, p.a) for p in found.pairs}
    assert copies == {(f"new-{i}", f"original-{i}") for i in range(ORIGINALS)}


def test_fingerprints_table_streamed_from_the_cache_equals_the_inline_one(store, tmp_path) -> None:
    storage, inline_known, new = store
    known = fetch._load_cache(storage)
    shas = [*sorted(new), *sorted(known)[::16]]
    records = {**known, **new}
    fetch.write_fingerprint_table(storage, "out/fingerprints.parquet", shas, records)
    streamed = storage.read_table("out/fingerprints.parquet")
    expected = fetch.fingerprint_table(shas, {**inline_known, **new})
    assert streamed.column_names == ["sha256", *FINGERPRINT_COLUMNS]
    assert sorted(streamed.to_pylist(), key=lambda r: r["sha256"]) == sorted(
        expected.to_pylist(), key=lambda r: r["sha256"]
    )


def test_a_shard_of_one_row_group_keeps_its_thumbnails_inline(tmp_path) -> None:
    """A cache shard written before row groups were small (``Storage.write_table``: one row group): a ref
    into it would make every verification chunk decode the whole shard's thumbnails, so they stay inline."""
    storage = Storage.open(str(tmp_path))
    records = _fillers(2 * THUMB_ROWS_PER_GROUP)
    storage.write_table(f"{fetch.FINGERPRINT_CACHE}/old.parquet", fetch._records_table(records))
    known = fetch._load_cache(storage)
    assert {sha: r["thumb"] for sha, r in known.items()} == {r["sha256"]: r["thumb"] for r in records}
