"""Stored thumbnails read lazily: where one fingerprint's 16 KB thumbnail lies in a Parquet shard
(:class:`ThumbRef`), and the reading of a few of them by row group (:func:`read_thumbs`), so that neither
the driver nor a verification worker ever holds the thumbnails of a whole collection.

A fingerprint record (:func:`lxn_ray.dedupe.fingerprint.fingerprint`) may carry its ``thumb`` inline
(``bytes``: computed in this run) or as a :class:`ThumbRef` (read back from a store's fingerprint cache
without its ``thumb`` column). Verification (:mod:`lxn_ray.dedupe.verify`) resolves refs per chunk, where
the chunk runs; a row group is the unit of reading, so shards are written with small row groups
(:data:`THUMB_ROWS_PER_GROUP`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lxn_ray.infra.storage import Storage

__all__ = [
    "THUMB_ROWS_PER_GROUP",
    "ThumbRef",
    "compression_for",
    "read_thumbs",
    "refs_of_shard",
    "thumb_array",
]

#: Rows per Parquet row group in files that hold thumbnails (the fingerprint cache, a version's
#: ``fingerprints`` table): reading one stored thumbnail decodes its row group's ``thumb`` column, at most
#: this many x 16 KB (512 KB).
THUMB_ROWS_PER_GROUP = 32


def compression_for(columns: Sequence[str]) -> dict[str, str]:
    """Parquet codecs for a table with ``columns``: zstd, but lz4 for ``thumb`` - thumbnails gain ~30%
    from zstd and ~25% from lz4, which decodes a row group ~9x faster (0.2 ms for 32 thumbnails), and a
    verification worker decodes one row group per stored film it verifies."""
    return {name: "lz4" if name == "thumb" else "zstd" for name in columns}


@dataclass(frozen=True)
class ThumbRef:
    """Where one thumbnail is stored: row ``row`` (0-based, within the group) of row group ``row_group`` of
    the Parquet file at key ``key`` of the store ``storage`` (its URI: a local folder, ``file://`` or
    ``s3://``), column ``thumb`` (binary, thumb_size**2 uint8 bytes).

    Plain strings and ints, so a ref pickles small and travels to the Ray worker that verifies the pair,
    which opens the store itself (:meth:`lxn_ray.infra.storage.Storage.open`: its per-process S3
    filesystem, the worker's own endpoint and credentials) and reads only keys inside it."""

    storage: str
    key: str
    row_group: int
    row: int


def refs_of_shard(storage_uri: str, key: str, metadata: pq.FileMetaData) -> list[ThumbRef]:
    """One :class:`ThumbRef` per row of the Parquet file at ``key`` of the store ``storage_uri``
    (``metadata``: its footer), in row order."""
    return [
        ThumbRef(storage_uri, key, group, row)
        for group in range(metadata.num_row_groups)
        for row in range(metadata.row_group(group).num_rows)
    ]


def _read_group(shard: pq.ParquetFile, key: str, row_group: int) -> pa.Array:
    """The ``thumb`` column of one row group of ``shard`` (the store's ``key``, named for accounting):
    the only place stored thumbnails are materialised."""
    return shard.read_row_group(row_group, columns=["thumb"]).column("thumb").combine_chunks()


def read_thumbs(refs: Sequence[ThumbRef], size: int) -> np.ndarray:
    """The thumbnails ``refs`` point at: (len(refs), size, size) uint8, in the order of ``refs``.

    Each row group named is read once (its ``thumb`` column only), whatever the number of refs into it.
    Raises ValueError when a stored thumbnail is not ``size * size`` bytes; OSError/FileNotFoundError when
    a shard cannot be read."""
    out = np.empty((len(refs), size, size), dtype=np.uint8)
    by_shard: dict[tuple[str, str], dict[int, list[int]]] = {}
    for i, ref in enumerate(refs):
        by_shard.setdefault((ref.storage, ref.key), {}).setdefault(ref.row_group, []).append(i)
    stores: dict[str, Storage] = {}
    for (uri, key), groups in by_shard.items():
        if uri not in stores:
            stores[uri] = Storage.open(uri)
        storage = stores[uri]
        with storage.filesystem.open_input_file(storage.path(key)) as stream:  # path(): inside the store
            shard = pq.ParquetFile(stream)  # the footer once per shard
            for group, positions in sorted(groups.items()):
                column = _read_group(shard, key, group)
                for i in positions:
                    data = column[refs[i].row].as_py()
                    if data is None or len(data) != size * size:
                        raise ValueError(
                            f"{storage.uri_of(key)} row group {group} row {refs[i].row}: "
                            f"not a {size}x{size} thumbnail"
                        )
                    out[i] = np.frombuffer(data, dtype=np.uint8).reshape(size, size)
    return out


def thumb_array(fp: Mapping[str, object]) -> np.ndarray:
    """One fingerprint's thumbnail, (thumb_size, thumb_size) uint8, inline bytes or read through its
    :class:`ThumbRef`. Raises ValueError for a thumbnail of the wrong length."""
    size = int(fp["thumb_size"])  # type: ignore[arg-type]
    data = fp["thumb"]
    if isinstance(data, ThumbRef):
        return read_thumbs([data], size)[0]
    buf = data if isinstance(data, bytes) else bytes(data)  # type: ignore[arg-type]  # bytearray/memoryview
    if len(buf) != size * size:
        raise ValueError(f"thumbnail of {len(buf)} bytes, not {size}x{size}")
    return np.frombuffer(buf, dtype=np.uint8).reshape(size, size)
