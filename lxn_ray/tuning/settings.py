"""The settings of one search (:class:`TuneSettings`): which trials run, how many at once, and for how
long."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from lxn_ray.infra.resources import (
    DEFAULT_STALL_TIMEOUT_S,
)
from lxn_ray.sources.tasks import DEFAULT_TASK

SPACES = ("full", "paper")


@dataclass(frozen=True)
class TuneSettings:
    """One search. Fields that change which trials run are part of the experiment name (see ``digest``)."""

    num_samples: int = 8
    epochs: int = 10
    image_size: int = 200
    image_sizes: tuple[int, ...] = ()  # when given, image size is searched over these
    width: float = 1.0
    batch_size: int = 20
    batch_sizes: tuple[int, ...] = ()  # when given, the global batch is searched over these
    workers_per_trial: int = 1
    searcher: str = "optuna"  # optuna | random (optuna falls back to random when not installed)
    asha: bool = True
    seed: int = 0
    max_concurrent: int | None = None  # None: as many trials as the cluster's CPUs (or GPUs) fit
    time_budget_s: float | None = None  # stop the search after this long (resumable with --resume)
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # end a search stalled this long (0: never)
    task: str = DEFAULT_TASK  # which findings are positive, negative, unused (lxn_ray.sources.tasks)
    precision: str = "auto"  # every trial's training precision (lxn_ray.model.network.resolve_precision)
    patience: int = 0  # early stopping in every trial (0: off; ASHA stops weak trials anyway)
    space: str = "full"  # full: the recipe is searched too; paper: learning rate and augmentation only
    repeats: int = 0  # retrain the best config with this many more seeds and report the spread

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.repeats < 0 or self.num_samples < 1 or self.epochs < 1:
            raise ValueError(f"num_samples and epochs must be >= 1 and repeats >= 0: {self}")

    def digest(self) -> str:
        """Digest of what decides the trials; concurrency, time budget, watchdog and repeats do not, so
        they may change between a search and its --resume."""
        settings = dataclasses.asdict(self)
        for key in ("max_concurrent", "time_budget_s", "stall_timeout_s", "repeats"):
            settings.pop(key)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
