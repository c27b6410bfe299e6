"""The settings of a retraining schedule (:class:`RetrainSettings`): where data comes from, when to train,
how to judge a challenger, how to lock; and the durations its flags take."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from lxn_ray.infra.resources import DEFAULT_STALL_TIMEOUT_S
from lxn_ray.infra.settings import setting
from lxn_ray.training.config import STALL_TIMEOUT_HELP

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
    """Training flags given explicitly on the command line; None keeps the champion's value. The flags
    are :class:`lxn_ray.training.config.TrainConfig`'s own, of the fields named here (``jobs/retrain.py``
    adds them with their defaults set to None)."""

    task: str | None = None
    image_size: int | None = None
    width: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    workers: int | None = None
    use_gpu: bool | None = None

    def given(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass(frozen=True)
class RetrainSettings:
    """One retraining schedule: where data comes from, when to train, how to judge, how to lock."""

    source: str | None = setting(None, help="--source (None: the upstream repository)", flag=False)
    ref: str | None = setting(None, help="--ref: the git branch, tag or commit of source", flag=False)
    sources: tuple = setting(
        (), help="--sources: a layouts.SourceSpec per named source (instead of source)", flag=False
    )
    mode: str = setting("train", help="train: champion's hyperparameters; tune: search again", choices=MODES)
    min_new_images: int = setting(
        25,
        help="train when this many rows of the task changed (default 25); a correction - a row removed, "
        "relabelled, or changed in view or patient - always trains",
        flag=("--min-new-images", "--min-changed-rows"),
    )
    min_growth: float | None = setting(
        None, help="also require new images >= this fraction of the champion's dataset"
    )
    margin: float = setting(0.05, help="non-inferiority margin on the test AUC (default 0.05)")
    # The training flags given (TrainConfig's, their defaults None: keep the champion's value).
    overrides: TrainOverrides = setting(default_factory=TrainOverrides, flag=False)
    num_samples: int = setting(8, help="--mode tune: trials to run")
    stall_timeout_s: float = setting(DEFAULT_STALL_TIMEOUT_S, help=STALL_TIMEOUT_HELP)
    resamples: int = setting(2000, help="paired bootstrap resamples", flag=False)
    bootstrap_seed: int = setting(0, help="seed of the paired bootstrap", flag=False)
    lock_ttl_s: float = setting(
        15 * 60.0,
        help="lease length; the holder renews every third of it, a dead holder's lock expires (default 15m)",
        flag="--lock-ttl",
        parse=parse_duration,
        metavar="DURATION",
    )
    lock_timeout_s: float = setting(
        6 * 3600.0,
        help="how long to wait for another run's lock (default 6h)",
        flag="--lock-timeout",
        parse=parse_duration,
        metavar="DURATION",
    )
    lock_poll_s: float = setting(2.0, help="how often a waiting run looks at the lock, seconds", flag=False)
    wait_for_lock: bool = setting(True, help="exit at once when another run holds the lock", flag="--no-wait")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.min_new_images < 0 or (self.min_growth is not None and self.min_growth < 0):
            raise ValueError("--min-new-images and --min-growth must not be negative")
        if self.margin < 0:
            raise ValueError("--margin must not be negative")
