"""What a search explores and what it is called: the search space (learning rate, augmentation, the recipe),
the :class:`~lxn_ray.training.config.TrainConfig` of one trial, the objective trials are ranked by, and the
names of experiments and of trials' training runs in storage."""

from __future__ import annotations

from typing import Any

from lxn_ray.images.preprocess import AugmentConfig, PreprocessConfig
from lxn_ray.infra.storage import Storage
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.runs import OBJECTIVE
from lxn_ray.tuning.settings import TuneSettings

TUNE = "tune"  # under storage: tune/<experiment>/
METRIC, MODE = OBJECTIVE, "max"  # trials rank by the source-aware validation objective (training.runs)

# -- the search space -----------------------------------------------------------------------------------
# The searched augmentation: (config key, upper bound); the lower bound of each is 0 (off).
AUGMENT_RANGES: dict[str, float] = {
    "rotation": 15.0,
    "zoom": 0.15,
    "shift": 0.1,
    "brightness": 0.2,
    "contrast": 0.2,
}
LR_RANGE = (1e-5, 1e-2)
# The recipe's searched switches (space "full"); "paper" fixes each at its first value, the paper's.
RECIPE_CHOICES: dict[str, tuple[Any, ...]] = {
    "optimizer": ("rmsprop", "adam", "adamw"),
    "schedule": ("constant", "cosine"),
    "architecture": ("lxn", "lxn-bn"),
    "sampling": ("weighted", "class-balanced", "source-balanced"),
    "equalization": ("none", "histogram", "clahe"),
    "trim_borders": (False, True),
}
WARMUP_EPOCHS = 1  # of a cosine schedule in a trial


def search_space(settings: TuneSettings) -> dict[str, Any]:
    """Learning rate (log-uniform), augmentation strengths and, in the ``full`` space, the recipe
    (:data:`RECIPE_CHOICES`); batch and image size and the lung preprocessing when choices are given."""
    from ray import tune

    space: dict[str, Any] = {
        "learning_rate": tune.loguniform(*LR_RANGE),
        **{name: tune.uniform(0.0, upper) for name, upper in AUGMENT_RANGES.items()},
        "horizontal_flip": tune.choice([True, False]),
    }
    if settings.space == "full":
        space.update({name: tune.choice(list(choices)) for name, choices in RECIPE_CHOICES.items()})
    if settings.batch_sizes:
        space["batch_size"] = tune.choice(list(settings.batch_sizes))
    if settings.image_sizes:
        space["image_size"] = tune.choice(list(settings.image_sizes))
    if len(settings.lungs) > 1:
        space["lungs"] = tune.choice(list(settings.lungs))
    return space


def trial_train_config(trial: dict[str, Any], settings: TuneSettings) -> TrainConfig:
    """The :class:`TrainConfig` of one trial: the sampled values over the search's fixed settings."""
    augment = AugmentConfig(
        **{name: float(trial[name]) for name in AUGMENT_RANGES},
        horizontal_flip=bool(trial["horizontal_flip"]),
    )
    recipe = {name: trial.get(name, choices[0]) for name, choices in RECIPE_CHOICES.items()}
    return TrainConfig(
        image_size=int(trial.get("image_size", settings.image_size)),
        width=settings.width,
        epochs=settings.epochs,
        batch_size=int(trial.get("batch_size", settings.batch_size)),
        learning_rate=float(trial["learning_rate"]),
        augment=augment,
        workers=settings.workers_per_trial,
        seed=settings.seed,
        task=settings.task,
        precision=settings.precision,
        patience=settings.patience,
        optimizer=recipe["optimizer"],
        schedule=recipe["schedule"],
        warmup_epochs=WARMUP_EPOCHS if recipe["schedule"] == "cosine" else 0,
        sampling=recipe["sampling"],
        architecture=recipe["architecture"],
        preprocessing=PreprocessConfig(
            trim_borders=bool(recipe["trim_borders"]),
            equalization=recipe["equalization"],
            lungs=trial.get("lungs", settings.lungs[0] if settings.lungs else "none"),
            segmenter=settings.segmenter,
        ),
    )


def augment_strength(trial: dict[str, Any]) -> float:
    """0 (no augmentation) .. 1 (every searched transform at its upper bound), flip not counted."""
    return sum(float(trial.get(name, 0.0)) / upper for name, upper in AUGMENT_RANGES.items()) / len(
        AUGMENT_RANGES
    )


# -- names in storage ----------------------------------------------------------------------------------
def experiment_name(version: str, settings: TuneSettings) -> str:
    """Deterministic: the same dataset version and search settings name the same series of experiments
    (``NAME``, then ``NAME-2``, ``NAME-3``, ... for each new search with those settings)."""
    return f"tune-{version}-{settings.digest()}"


def experiment_series(storage: Storage, base: str) -> list[str]:
    """The experiments of one name's series that exist in storage, oldest first."""
    names: list[str] = []
    while True:
        name = base if not names else f"{base}-{len(names) + 1}"
        if not storage.exists(f"{TUNE}/{name}"):
            return names
        names.append(name)


def choose_experiment(storage: Storage, base: str, resume: bool) -> str:
    """``resume``: the newest experiment of the series (the base name when there is none yet);
    otherwise the next free name, so rerunning the same command starts a fresh search."""
    existing = experiment_series(storage, base)
    if resume or not existing:
        return existing[-1] if existing else base
    return f"{base}-{len(existing) + 1}"


def train_run_name(experiment: str, trial_id: str) -> str:
    """A trial's Ray Train run: stable across ``--resume``, so a restarted trial resumes its epochs."""
    return f"{experiment}-{trial_id}"
