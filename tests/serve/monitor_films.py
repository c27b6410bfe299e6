"""Films for the monitoring tests, and a dataset version whose test split is the drift job's reference.

"Like" films are what the reference holds: synthetic radiographs (:func:`tests.helpers.radiograph`) of
96-143 px per side, as PNG. "Unlike" films are another hospital's as a model must not meet them unnoticed:
the same kind of radiograph shown inverted (a MONOCHROME1 film read as MONOCHROME2) inside a black frame
an eighth of each side wide - same format and sizes, so only the mean intensity and the film's share of
the image move.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from lxn_ray.data import dataset
from lxn_ray.infra.storage import Storage
from tests.helpers import encode, radiograph

# The statistics the unlike films change; the others (format, width, height) stay the reference's.
UNLIKE_CHANGES = {"mean_intensity", "film_fraction"}


def _size(seed: int) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    return int(rng.integers(96, 144)), int(rng.integers(96, 144))


def like_film(seed: int) -> bytes:
    """A PNG radiograph made as the reference's films are."""
    return encode(radiograph(seed, size=_size(seed)), "PNG")


def unlike_film(seed: int) -> bytes:
    """A PNG radiograph of the same sizes, inverted, inside a black frame (1/8 of each side)."""
    width, height = _size(seed)
    pixels = 255 - np.asarray(radiograph(seed, size=(width, height)))
    frame_x, frame_y = width // 8, height // 8
    pixels[:frame_y], pixels[-frame_y:], pixels[:, :frame_x], pixels[:, -frame_x:] = 0, 0, 0, 0
    return encode(Image.fromarray(pixels), "PNG")


def publish_reference_dataset(
    storage: Storage, films: Sequence[bytes], version: str = "ds-test", source_format: str | None = None
) -> None:
    """A dataset version ``version`` whose test split is ``films`` (covid-vs-normal findings, one patient
    each), plus two training films: the images table and blobs as ingest publishes them, without running
    ingest (the drift job reads only the test split's ``image_key``, ``finding``, ``split`` and, when
    ``source_format`` is given, that column: the format the source held, as ingest records it)."""
    rows = []
    for index, data in enumerate([*films, *films[:2]]):
        sha = hashlib.sha256(data).hexdigest()
        storage.write_bytes(dataset.blob_key(sha), data)
        rows.append(
            {
                "sha256": sha,
                "image_key": dataset.blob_key(sha),
                "patient_id": f"p{index}",
                "finding": "COVID-19" if index % 2 else "No Finding",
                "label": None,
                "split": "test" if index < len(films) else "train",
                "source": "synthetic",
                "source_format": source_format,
            }
        )
    schema = pa.schema(
        [
            ("sha256", pa.string()),
            ("image_key", pa.string()),
            ("patient_id", pa.string()),
            ("finding", pa.string()),
            ("label", pa.int64()),
            ("split", pa.string()),
            ("source", pa.string()),
            ("source_format", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    if source_format is None:
        table = table.drop_columns(["source_format"])
    dataset.publish(storage, version, {"images": table}, {"images": len(rows)}, {"version": version})
