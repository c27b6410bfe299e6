"""The settings of one search (:class:`TuneSettings`): which trials run, how many at once, and for how
long."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from lxn_ray.images.preprocess import PreprocessConfig
from lxn_ray.infra.resources import DEFAULT_STALL_TIMEOUT_S
from lxn_ray.infra.settings import help_of, setting
from lxn_ray.model.network import PRECISIONS
from lxn_ray.sources.tasks import DEFAULT_TASK, portable_task
from lxn_ray.training.config import PRECISION_HELP, STALL_TIMEOUT_HELP, TASK_HELP, TrainConfig

SPACES = ("full", "paper")
SEARCHERS = ("optuna", "random")  # optuna falls back to random when it is not installed


@dataclass(frozen=True)
class TuneSettings:
    """One search. Fields that change which trials run are part of the experiment name (see ``digest``)."""

    num_samples: int = setting(8, help="trials to run")
    epochs: int = setting(10, help=help_of(TrainConfig, "epochs"))
    image_size: int = setting(200, help=help_of(TrainConfig, "image_size"))
    image_sizes: tuple[int, ...] = setting((), help="search over these sizes, e.g. 128,200")
    width: float = setting(1.0, help=help_of(TrainConfig, "width"))
    batch_size: int = setting(20, help=help_of(TrainConfig, "batch_size"))
    batch_sizes: tuple[int, ...] = setting((), help="search over these batches, e.g. 16,32")
    workers_per_trial: int = setting(1, help="Ray Train workers in each trial")
    searcher: str = setting(
        "optuna", help="optuna (TPE; random when optuna is not installed) or random", choices=SEARCHERS
    )
    asha: bool = setting(True, help="let every trial run all epochs (FIFO)")  # --no-asha
    seed: int = setting(0, help="seeds the searcher and the trials' training")
    max_concurrent: int | None = setting(None, help="trials at once (default: as many as fit)")
    time_budget_s: float | None = setting(
        None, help="stop the search after this many seconds (resumable with --resume)"
    )
    stall_timeout_s: float = setting(DEFAULT_STALL_TIMEOUT_S, help=STALL_TIMEOUT_HELP)
    task: str = setting(DEFAULT_TASK, help=TASK_HELP)
    precision: str = setting("auto", help=PRECISION_HELP, choices=PRECISIONS)
    patience: int = setting(0, help="early stopping in each trial (0: off; ASHA stops weak trials anyway)")
    space: str = setting(
        "full",
        help="full (default): search the recipe too (optimizer, schedule, architecture, sampling, "
        "preprocessing); paper: the paper's recipe, learning rate and augmentation only",
        choices=SPACES,
    )
    repeats: int = setting(0, help="retrain the best config with N more seeds; report the spread")
    lungs: tuple[str, ...] = setting(
        (),
        help="search the lung preprocessing among these, e.g. none,crop,mask (crop and mask need a lung "
        "segmenter in the store: jobs/lungs.py); default: none",
    )
    segmenter: str = setting("", help=help_of(PreprocessConfig, "segmenter"))

    def __post_init__(self) -> None:
        # A task file becomes its definition (TaskError, a ValueError, when it is invalid): Tune trials run
        # in their own directory and workers may sit on nodes without the file.
        object.__setattr__(self, "task", portable_task(self.task))
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.repeats < 0 or self.num_samples < 1 or self.epochs < 1:
            raise ValueError(f"num_samples and epochs must be >= 1 and repeats >= 0: {self}")
        for mode in self.lungs:
            PreprocessConfig(lungs=mode)  # raises ValueError naming the modes

    def digest(self) -> str:
        """Digest of what decides the trials; concurrency, time budget, watchdog and repeats do not, so
        they may change between a search and its --resume."""
        settings = dataclasses.asdict(self)
        for key in ("max_concurrent", "time_budget_s", "stall_timeout_s", "repeats"):
            settings.pop(key)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
