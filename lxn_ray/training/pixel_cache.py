"""The uint8 pixel cache of a run's splits, and the streams that read it back: an epoch's plan through Ray
Data's streaming split to the training workers, the validation split in order to every worker.

Each split a run uses is preprocessed once, by Ray Data tasks, with the one
:func:`lxn_ray.images.preprocess.preprocess_pixels` into one uint8 channel per image at the model's size
(a twelfth of float32 RGB) and stored under ``cache/pixels/`` in storage (:class:`PixelCache`), where later
runs and Tune trials with the same task, sources, size and preprocessing find it. Every epoch, rank 0 turns
the epoch's plan (:func:`lxn_ray.training.loop.epoch_order`: row indices from the small label/source
arrays) into a Ray Dataset whose tasks read the planned rows from the cache (:func:`stream_rows`), and
hands it to the workers through Ray Data's ``streaming_split`` (:func:`epoch_shard`); each worker pulls
batches as it trains and expands them to float32 RGB on its device. No split is ever held whole (as
pixels, let alone float32) by a worker, the driver or the object store, so a training set larger than
memory trains. Every worker streams the full validation split from its cache (:func:`iter_cache`) so all
ranks agree on the metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lxn_ray.data import dataset
from lxn_ray.images.preprocess import PreprocessConfig
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.tasks import task_name
from lxn_ray.training.config import TrainConfig

if TYPE_CHECKING:
    import ray.data

PIXEL_CACHE = (
    "cache/pixels"  # under storage: <version>/<digest>/<split>/{chunk-NNNNNN.u8, index.parquet, cache.json}
)
CACHE_FORMAT = 1  # bump when the stored layout changes: older caches are then ignored, not misread
CACHE_CHUNK_ROWS = 64  # images per cache file: one Ray Data task preprocesses and writes one file
STREAM_BLOCK_ROWS = 64  # rows per block of an epoch's stream (what the streaming split hands out)
FETCH_TASKS = 2  # _fetch_pixels tasks at once per stream: ranged reads of a local or S3 cache, I/O bound
VAL_BATCH = 64  # validation images read and scored at a time


@dataclass(frozen=True)
class PixelCache:
    """One split of a dataset version for one run's task, sources, image size and preprocessing, stored once
    as uint8, one channel per image, at the model's size: row ``i`` (rows sorted by ``image_key``) is the
    ``s * s`` bytes at offset ``(i % chunk_rows) * s * s`` of file ``chunk-{i // chunk_rows:06d}.u8``.

    The worker expands a batch to the model's float32 three channels on the device
    (:func:`lxn_ray.training.loop.to_model_input`), so nothing holds a split as float32 - a twelfth of the
    memory and I/O - and reading a row is one ranged read (local file or S3 object), so a split larger
    than memory streams. ``labels`` (float32 ``(n,)``, the task's), ``sources`` (str ``(n,)``) and
    ``image_keys`` (str ``(n,)``) are the small arrays the epoch order is drawn from.
    """

    storage_uri: str
    key: str  # the cache's folder in storage
    image_size: int
    chunk_rows: int
    image_keys: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def without_index(self) -> PixelCache:
        """This cache's location alone (empty arrays): what a reading task needs, whatever the split size."""
        empty = np.empty(0, dtype=str)
        return dataclasses.replace(self, image_keys=empty, labels=np.empty(0, np.float32), sources=empty)

    @classmethod
    def open(cls, storage: Storage, key: str) -> PixelCache:
        """The cache at ``key`` (its ``cache.json`` is the commit marker: written after every other file)."""
        meta = storage.read_json(f"{key}/cache.json")
        index = storage.read_table(f"{key}/index.parquet")
        return cls(
            storage_uri=storage.uri,
            key=key,
            image_size=int(meta["image_size"]),
            chunk_rows=int(meta["chunk_rows"]),
            image_keys=np.asarray(index.column("image_key").to_pylist(), dtype=str),
            labels=np.asarray(index.column("label").to_pylist(), dtype=np.float32),
            sources=np.asarray(index.column("source").to_pylist(), dtype=str),
        )


def cache_key(version: str, split: str, config: TrainConfig) -> str:
    """Where the pixel cache of ``split`` lives for ``config``: runs (and Tune trials) that differ only in
    their recipe share it; a task, source selection, image size or preprocessing of their own gets its own,
    and so does a change to the preprocessing code (the source of the modules that make the pixels)."""
    import inspect

    from lxn_ray.images import decode, preprocess

    code = inspect.getsource(preprocess) + inspect.getsource(decode)  # a change to the pixels: a new cache
    what = {
        "format": CACHE_FORMAT,
        "code": hashlib.sha256(code.encode()).hexdigest(),
        "task": config.task,
        "sources": sorted(config.sources),
        "image_size": config.image_size,
        "preprocessing": dataclasses.asdict(config.preprocessing),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{PIXEL_CACHE}/{version}/{digest}/{split}"


def _write_cache_chunks(
    batch: dict[str, np.ndarray], storage_uri: str, key: str, image_size: int, preprocessing: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Ray Data task: for each chunk (``chunk`` int64, ``image_keys`` a list of str), image bytes from
    storage -> the shared :func:`lxn_ray.images.preprocess.preprocess_pixels` -> uint8 ``(rows, s, s)``
    written as one cache file. Returns the chunks' row counts; no pixel passes through the object store."""
    from lxn_ray.evaluation.predict import lung_finder
    from lxn_ray.images.preprocess import preprocess_pixels

    storage = Storage.open(storage_uri)
    config = PreprocessConfig.from_mapping(preprocessing)
    lungs = lung_finder(storage_uri, config)  # the segmenter, once per worker process, when it is needed
    rows = []
    for chunk, keys in zip(batch["chunk"], batch["image_keys"], strict=True):
        pixels = np.stack(
            [
                preprocess_pixels(storage.read_bytes(str(k)), image_size, preprocessing=config, lungs=lungs)
                for k in keys
            ]
        ).astype(np.uint8)
        storage.write_bytes(f"{key}/chunk-{int(chunk):06d}.u8", np.ascontiguousarray(pixels).tobytes())
        rows.append(len(pixels))
    return {"chunk": batch["chunk"], "rows": np.asarray(rows, dtype=np.int64)}


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Ray Data datasets created inside draw no progress bars (their cursor-moving redraws, forwarded from
    a worker, land in the middle of the job's own lines)."""
    import ray

    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = before


def pixel_cache(storage: Storage, version: str, split: str, config: TrainConfig) -> PixelCache:
    """The uint8 pixel cache of one split (:class:`PixelCache`), built on first use by Ray Data tasks that
    each decode, preprocess and write one chunk of images, in parallel over the cluster; later runs and
    Tune trials with the same task, sources, size and preprocessing read it as it is. Two runs building
    the same cache at once write identical files (each write is atomic)."""
    import ray

    key = cache_key(version, split, config)
    if storage.exists(f"{key}/cache.json"):
        return PixelCache.open(storage, key)
    table = dataset.read_split(storage, version, split, config.task, config.sources)
    if table.num_rows == 0:
        task = task_name(config.task)
        raise ValueError(f"split {split!r} of dataset {version} holds no image of task {task}")
    table = table.select(["image_key", "label", "source"]).sort_by("image_key")
    keys = table.column("image_key").to_pylist()
    chunks = [
        {"chunk": c, "image_keys": keys[start : start + CACHE_CHUNK_ROWS]}
        for c, start in enumerate(range(0, len(keys), CACHE_CHUNK_ROWS))
    ]
    options = {
        "storage_uri": storage.uri,
        "key": key,
        "image_size": config.image_size,
        "preprocessing": dataclasses.asdict(config.preprocessing),
    }
    with _no_progress_bars():  # drawn in a watched actor, they only garble the job's own output
        written = (
            ray.data.from_items(chunks, override_num_blocks=len(chunks))
            .map_batches(_write_cache_chunks, fn_kwargs=options, batch_size=1)
            .take_all()
        )
    if sum(int(row["rows"]) for row in written) != table.num_rows:
        raise RuntimeError(f"pixel cache {key}: {len(written)} chunk(s) do not hold {table.num_rows} images")
    storage.write_table(f"{key}/index.parquet", table)
    meta = {"format": CACHE_FORMAT, "rows": table.num_rows, "image_size": config.image_size}
    storage.write_json(f"{key}/cache.json", {**meta, "chunk_rows": CACHE_CHUNK_ROWS})
    return PixelCache.open(storage, key)


def read_cached_rows(cache: PixelCache, rows: np.ndarray) -> np.ndarray:
    """uint8 ``(len(rows), s, s)``: the cached images of ``rows`` (int64 ``(m,)``, any order, repeats
    allowed), each one ranged read of ``s * s`` bytes; every chunk file is opened once per call."""
    storage = Storage.open(cache.storage_uri)
    size = cache.image_size * cache.image_size
    images = np.empty((len(rows), cache.image_size, cache.image_size), dtype=np.uint8)
    rows = np.asarray(rows, dtype=np.int64)
    for chunk in np.unique(rows // cache.chunk_rows):
        where = np.flatnonzero(rows // cache.chunk_rows == chunk)
        with storage.filesystem.open_input_file(storage.path(f"{cache.key}/chunk-{chunk:06d}.u8")) as file:
            for i in where:
                data = file.read_at(size, int(rows[i] % cache.chunk_rows) * size)
                images[i] = np.frombuffer(data, dtype=np.uint8).reshape(cache.image_size, cache.image_size)
    return images


def _fetch_pixels(batch: dict[str, np.ndarray], cache: PixelCache) -> dict[str, np.ndarray]:
    """Ray Data task: blocks of an epoch's plan (per block ``row`` int64, ``label`` float32 and ``source``
    str lists) -> one row per image: ``row``, ``label``, ``source`` and its cached ``image`` (uint8
    ``(m, s, s)``), in plan order."""
    rows = np.concatenate([np.asarray(part, dtype=np.int64) for part in batch["row"]])
    return {
        "row": rows,
        "label": np.concatenate([np.asarray(part, dtype=np.float32) for part in batch["label"]]),
        "source": np.concatenate([np.asarray(part, dtype=str) for part in batch["source"]]),
        "image": read_cached_rows(cache, rows),
    }


def stream_rows(cache: PixelCache, rows: np.ndarray) -> ray.data.Dataset:
    """A streaming Ray Dataset of ``rows`` of ``cache`` in that order (int64 ``(n,)``; an epoch's plan from
    :func:`lxn_ray.training.loop.epoch_order`): an index dataset built from the small label/source arrays
    (one item per :data:`STREAM_BLOCK_ROWS` rows, put in the object store by this process: no task, so no
    CPU is needed while training workers hold every CPU), mapped to the cached uint8 images by tasks that
    run as the consumers pull, at most :data:`FETCH_TASKS` at once. Never materialised; the reads are I/O
    and reserve no CPU either."""
    import ray

    rows = np.asarray(rows, dtype=np.int64)
    items = [
        {
            "row": part.tolist(),
            "label": cache.labels[part].tolist(),
            "source": cache.sources[part].tolist(),
        }
        for part in (
            rows[start : start + STREAM_BLOCK_ROWS] for start in range(0, len(rows), STREAM_BLOCK_ROWS)
        )
    ]
    with _no_progress_bars():  # a dataset keeps the context it was made in
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _fetch_pixels,
            fn_kwargs={"cache": cache.without_index()},
            batch_size=1,
            num_cpus=0,
            # Tasks that reserve no CPU are otherwise started as fast as blocks arrive - 10+ Python workers
            # per epoch on a 2-core node, and raylet's "worker processes have been started" warnings.
            compute=ray.data.TaskPoolStrategy(size=max(1, min(FETCH_TASKS, len(items)))),
        )


def iter_cache(
    cache: PixelCache, batch_rows: int = VAL_BATCH
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every row of ``cache`` in order, ``batch_rows`` at a time, read in this process: (uint8 ``(m, s, s)``,
    float32 labels ``(m,)``, str sources ``(m,)``) - how every worker streams the validation split."""
    for start in range(0, len(cache), batch_rows):
        rows = np.arange(start, min(start + batch_rows, len(cache)))
        yield read_cached_rows(cache, rows), cache.labels[rows], cache.sources[rows]


def epoch_shard(cache: PixelCache, plan: np.ndarray, rank: int, world: int) -> ray.data.DataIterator:
    """This worker's share of one epoch: rank 0 builds the epoch's stream (:func:`stream_rows` of ``plan``)
    and splits it with Ray Data's ``streaming_split(world, equal=True)``; every rank gets its iterator.
    Each rank receives ``len(plan) // world`` rows (the remainder waits for the next epoch's draw), in plan
    order. With ``preserve_order`` (set in the worker) the split hands the ordered blocks to the
    consumer with the fewest rows so far, so which rank trains on which rows is a function of the plan
    alone - a resumed run sees exactly the uninterrupted run's batches."""
    import logging

    import ray.train.collective

    splits = None
    if rank == 0:
        splits = stream_rows(cache, plan).streaming_split(world, equal=True)
    # The iterators (a handle on the split's coordinator actor each) pickle to a few kB, over the 1 kB the
    # broadcast warns about at every call; they travel through the object store, so the size is harmless.
    broadcast_log = logging.getLogger("ray.train.v2._internal.execution.collective_impl")
    level = broadcast_log.level
    broadcast_log.setLevel(logging.ERROR)
    try:
        return ray.train.collective.broadcast_from_rank_zero(splits)[rank]
    finally:
        broadcast_log.setLevel(level)
