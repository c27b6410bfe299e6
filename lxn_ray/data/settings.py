"""The settings of ingest (:class:`IngestConfig`): everything that shapes a dataset version."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from lxn_ray.data import dataset
from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.fingerprint import FINGERPRINT_VERSION
from lxn_ray.images.decode import ImageLimits
from lxn_ray.infra.settings import setting
from lxn_ray.sources.metadata import (
    DEFAULT_FRONTAL_VIEWS,
)


@dataclass(frozen=True)
class IngestConfig:
    """Everything that shapes a dataset version; a change to it makes the next run publish anew."""

    frontal_views: tuple[str, ...] = setting(
        DEFAULT_FRONTAL_VIEWS,
        help=f"comma-separated views counted as frontal (default: {','.join(DEFAULT_FRONTAL_VIEWS)})",
    )
    limits: ImageLimits = field(default_factory=ImageLimits)
    splits: dataset.SplitConfig = field(default_factory=dataset.SplitConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    decode_batch_size: int = 16  # images per Ray Data task batch
    decode_chunk_bytes: int = 256 * 1024 * 1024  # bytes the driver sends at once of files workers cannot read

    def digest(self) -> str:
        """A short hash of the settings that change the result (not the batching knobs)."""
        settings = dataclasses.asdict(self)
        settings.pop("decode_batch_size")
        settings.pop("decode_chunk_bytes")
        settings["fingerprint_version"] = FINGERPRINT_VERSION  # a new dedupe algorithm is a new dataset
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
