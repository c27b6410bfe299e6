"""The settings of a retraining schedule (:class:`RetrainSettings`): where data comes from, when to train,
how to judge a challenger, how to lock; and the durations its flags take."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from lxn_ray.infra.resources import DEFAULT_STALL_TIMEOUT_S

MODES = ("train", "tune")


# -- durations ----------------------------------------------------------------------------------------
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``6h``, ``1d``, ``1.5h`` or plain seconds -> seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", str(text).lower())
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number with s, m, h or d, e.g. 6h")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    return seconds


# -- settings -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainOverrides:
    """Training flags given explicitly on the command line; None keeps the champion's value."""

    image_size: int | None = None
    width: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    workers: int | None = None
    use_gpu: bool | None = None
    task: str | None = None

    def given(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass(frozen=True)
class RetrainSettings:
    """One retraining schedule: where data comes from, when to train, how to judge, how to lock."""

    source: str | None = None  # --source (None: the upstream repository)
    ref: str | None = None
    sources: tuple = ()  # --sources: a layouts.SourceSpec per named source (instead of source)
    mode: str = "train"  # train: the champion's hyperparameters; tune: search again
    min_new_images: int = 25
    min_growth: float | None = None  # also require new images >= this fraction of the champion's dataset
    margin: float = 0.05  # non-inferiority margin on the test AUC
    overrides: TrainOverrides = field(default_factory=TrainOverrides)
    num_samples: int = 8  # tune mode: trials
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # end a stalled training run or search (0: never)
    resamples: int = 2000  # paired bootstrap resamples
    bootstrap_seed: int = 0
    lock_ttl_s: float = 15 * 60.0
    lock_timeout_s: float = 6 * 3600.0
    lock_poll_s: float = 2.0
    wait_for_lock: bool = True  # False (--no-wait): leave at once when another run holds the lock

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.min_new_images < 0 or (self.min_growth is not None and self.min_growth < 0):
            raise ValueError("--min-new-images and --min-growth must not be negative")
        if self.margin < 0:
            raise ValueError("--margin must not be negative")
