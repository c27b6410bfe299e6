"""The streaming training input: a split is cached once as uint8, one channel per image at the model's size,
and each epoch streams to the workers through Ray Data's streaming split of a seeded plan - never
materialised, never float32, and split among ranks the same way in every run (exact resume)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from lxn_ray.data import dataset
from lxn_ray.data.ingest import ingest
from lxn_ray.images.preprocess import PreprocessConfig, preprocess_pixels
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.transports import FolderSource
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.loop import epoch_order
from lxn_ray.training.pixel_cache import (
    STREAM_BLOCK_ROWS,
    iter_cache,
    pixel_cache,
    read_cached_rows,
    stream_rows,
)
from tests.model.test_train import TINY
from tests.shared_stores import labelled_source

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # whole jobs: `-m "not slow"` skips


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Storage:
    from tests.helpers import SourceBuilder

    root = tmp_path_factory.mktemp("streaming")
    storage = Storage.open(str(root / "store"))
    # 200 patients: the train split spans several cache chunks and stream blocks
    ingest(FolderSource(labelled_source(SourceBuilder(root / "source"), patients=200)), storage)
    return storage


CONFIG = TrainConfig(**TINY, preprocessing=PreprocessConfig(equalization="histogram"))


def test_a_split_is_cached_once_as_uint8_one_channel_at_the_model_size(store, monkeypatch):
    version = dataset.latest_version(store)
    cache = pixel_cache(store, version, "train", CONFIG)
    table = dataset.read_split(store, version, "train", CONFIG.task)
    assert len(cache) == table.num_rows > STREAM_BLOCK_ROWS
    assert list(cache.image_keys) == sorted(table.column("image_key").to_pylist())  # a fixed row order
    chunks = [key for key in store.list(cache.key) if key.endswith(".u8")]
    assert len(chunks) == -(-len(cache) // cache.chunk_rows)
    stored = sum(len(store.read_bytes(key)) for key in chunks)
    assert stored == len(cache) * 32 * 32  # one byte per pixel: uint8, one channel, 32 x 32
    # Each row is the shared preprocessing of its image, exactly.
    rows = np.array([len(cache) - 1, 0, 5, 5])
    pixels = read_cached_rows(cache, rows)
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 32, 32)
    for row, image in zip(rows, pixels, strict=True):
        expected = preprocess_pixels(
            store.read_bytes(cache.image_keys[row]), 32, preprocessing=CONFIG.preprocessing
        )
        np.testing.assert_array_equal(image, expected)
    streamed = np.concatenate([images for images, _, _ in iter_cache(cache, 7)])
    assert streamed.shape == (len(cache), 32, 32) and streamed.dtype == np.uint8
    # A second run (a Tune trial, a rerun) reads the cache without decoding anything again.
    import ray.data

    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    again = pixel_cache(
        store,
        version,
        "train",
        dataclasses.replace(CONFIG, seed=3, learning_rate=1e-2, sampling="class-balanced"),
    )
    assert again.key == cache.key and np.array_equal(again.labels, cache.labels)


def _logical_ops(ds) -> list[str]:
    """Names of the operators of ``ds``'s logical plan, source first."""
    names, op = [], ds._logical_plan.dag
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return names[::-1]


def _consume_split(ds, world: int) -> list[dict[str, np.ndarray]]:
    """Every rank's rows of ``ds.streaming_split(world, equal=True)``, consumed concurrently as Ray Train
    workers do; each batch is checked to be uint8 images."""
    shards = ds.streaming_split(world, equal=True)
    got: list[dict[str, list]] = [{"row": [], "image": []} for _ in range(world)]

    def consume(rank: int) -> None:
        for batch in shards[rank].iter_batches(batch_size=4, batch_format="numpy"):
            assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (32, 32)
            got[rank]["row"].append(batch["row"])
            got[rank]["image"].append(batch["image"])

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "the epoch's stream stalled"
    return [{name: np.concatenate(parts) for name, parts in rank.items()} for rank in got]


def test_an_epoch_streams_through_a_deterministic_split_and_is_never_materialised(store):
    import ray
    import ray.data
    from ray.data.dataset import MaterializedDataset

    cache = pixel_cache(store, dataset.latest_version(store), "train", CONFIG)
    plan = epoch_order(cache.labels, cache.sources, "weighted", seed=0, epoch=2)
    context = ray.data.DataContext.get_current()
    previous = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # as every training worker sets it
    # As in training: the workers hold every CPU of the cluster while the epoch streams.
    every_cpu = ray.util.placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    try:
        ray.get(every_cpu.ready(), timeout=120)
        ds = stream_rows(cache, plan)
        # The plan: an index dataset of the epoch's rows mapped to their cached pixels; nothing computed.
        assert not isinstance(ds, MaterializedDataset)
        assert _logical_ops(ds) == ["FromItems", "MapBatches(_fetch_pixels)"]
        first, second = _consume_split(ds, 2), _consume_split(stream_rows(cache, plan), 2)
    finally:
        context.execution_options.preserve_order = previous
        ray.util.remove_placement_group(every_cpu)
    share, positions = len(plan) // 2, np.argsort(plan)  # positions[row]: where the plan draws row
    for rank in range(2):
        rows = first[rank]["row"]
        assert len(rows) == share  # equal shares
        assert np.all(np.diff(positions[rows]) > 0)  # each rank sees its rows in the plan's order
        np.testing.assert_array_equal(first[rank]["image"], read_cached_rows(cache, rows))
        np.testing.assert_array_equal(rows, second[rank]["row"])  # the same split in every run
    assert not set(first[0]["row"]) & set(first[1]["row"])  # a permutation: no row on both ranks
