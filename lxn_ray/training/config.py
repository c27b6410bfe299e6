"""The settings of one training run (:class:`TrainConfig`): the paper's LxN recipe by default, every
switch recorded in the model card and searched by Tune."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from lxn_ray.images.preprocess import LIGHT_AUGMENT, AugmentConfig, PreprocessConfig
from lxn_ray.infra.resources import DEFAULT_STALL_TIMEOUT_S
from lxn_ray.infra.settings import setting
from lxn_ray.model.network import (
    ARCHITECTURES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    ModelConfig,
    OptimizerConfig,
)
from lxn_ray.sources.tasks import BUILTIN_TASKS, DEFAULT_TASK, portable_task

SAMPLINGS = ("weighted", "class-balanced", "source-balanced")

# Help texts that several settings share (TrainConfig, TuneSettings, RetrainSettings; the train job's flag).
TASK_HELP = (
    f"which findings are positive, negative or unused: {', '.join(BUILTIN_TASKS)}, or a task YAML file "
    f"(default: {DEFAULT_TASK})"
)
PRECISION_HELP = (
    "training compute precision: auto = float16 on GPUs, bfloat16 on CPUs with AVX512-BF16 or AMX (read "
    "from /proc/cpuinfo), float32 otherwise; weights, output layer and loss stay float32"
)
STALL_TIMEOUT_HELP = (
    "end the job with an error naming what holds the resources when nothing made progress for this long "
    f"while the cluster could take on no new work (default {DEFAULT_STALL_TIMEOUT_S:g}; 0: never)"
)


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults are the paper's network and loss (200 px, batch 20, RMSprop at 1e-4,
    equation (1)'s class weights); every recipe switch below is recorded in the model card and searched by
    Tune (:mod:`lxn_ray.tuning.tune`).

    - ``epochs``: the maximum; ``patience`` > 0 stops a run after that many epochs without a better
      validation objective (early stopping), 0 never stops early.
    - ``optimizer`` rmsprop (the paper's) | adam | adamw; ``schedule`` constant | cosine (with
      ``warmup_epochs`` of linear warm-up); see :class:`lxn_ray.model.network.OptimizerConfig`.
    - ``sampling``: ``weighted`` draws every training image once per epoch in a seeded shuffled order and
      weights the loss by equation (1); ``class-balanced`` draws as many images with replacement so each
      class is half the draws (plain BCE: the sampling balances the classes instead of the weights);
      ``source-balanced`` also gives every source an equal share of each class's draws.
    - ``architecture`` lxn | lxn-bn (:class:`lxn_ray.model.network.ModelConfig`); ``preprocessing``: border
      trimming and histogram equalisation/CLAHE, applied identically in training, evaluation and serving.
    - ``precision`` auto | float32 | bfloat16 | float16 (:func:`lxn_ray.model.network.resolve_precision`): the
      compute precision of training; the card records what ran. The model is validated and served in its
      inference precision (:func:`inference_precision`).
    """

    image_size: int = setting(200, help="input side in pixels (paper: 200)")
    width: float = setting(1.0, help="width multiplier (1.0 = the paper's LxN)")
    epochs: int = setting(10, help="epochs per training run (per trial)")
    batch_size: int = setting(20, help="global batch, split over the workers")
    learning_rate: float = setting(1e-4, help="learning rate (peak, with a schedule)", flag="--lr")
    augment: AugmentConfig = setting(
        default_factory=lambda: LIGHT_AUGMENT,
        help="train without augmentation",
        flag="--no-augment",
        const=AugmentConfig(),  # every transform off
    )
    workers: int = setting(1, help="Ray Train workers (data-parallel)")
    use_gpu: bool = setting(
        False, help="one GPU per worker (automatic when the cluster has GPUs)", flag="--gpu"
    )
    precision: str = setting("auto", help=PRECISION_HELP, choices=PRECISIONS)
    seed: int = setting(0, help="seeds the initial weights, the data order and the augmentation")
    task: str = setting(DEFAULT_TASK, help=TASK_HELP)
    sources: tuple[str, ...] = setting(
        (), help="train and validate on these sources only (empty: all); see loso.py", flag=False
    )
    optimizer: str = setting("rmsprop", help="rmsprop is the paper's", choices=OPTIMIZERS)
    schedule: str = setting("constant", help="learning-rate schedule", choices=SCHEDULES)
    warmup_epochs: int = setting(0, help="linear warm-up before a cosine")
    weight_decay: float = setting(1e-4, help="AdamW's decoupled weight decay")
    patience: int = setting(0, help="stop after this many epochs without a better val objective")
    sampling: str = setting(
        "weighted",
        help="weighted: equation (1)'s loss weights; class-/source-balanced: balanced draws, plain loss",
        choices=SAMPLINGS,
    )
    architecture: str = setting("lxn", help="lxn is the paper's", choices=ARCHITECTURES)
    preprocessing: PreprocessConfig = setting(
        default_factory=PreprocessConfig,
        help="border trimming and equalisation, applied alike in training, evaluation and serving",
    )

    def __post_init__(self) -> None:
        # Checked at construction so a bad flag or Tune config fails before any worker starts.
        # A task file becomes its definition (TaskError, a ValueError, when it is invalid): Tune trials run
        # in their own directory and workers may sit on nodes without the file.
        object.__setattr__(self, "task", portable_task(self.task))
        self.model  # noqa: B018 - validates image size, width and architecture
        self.optimizer_config(steps_per_epoch=1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.epochs < 1 or self.patience < 0 or self.warmup_epochs < 0:
            raise ValueError(f"epochs must be >= 1, patience and warmup_epochs >= 0: {self}")
        if self.batch_size < max(1, self.workers):
            raise ValueError(
                f"batch_size {self.batch_size} is the global batch, split over {self.workers} workers: it "
                "must give every worker at least one image"
            )

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(image_size=self.image_size, width=self.width, architecture=self.architecture)

    def optimizer_config(self, steps_per_epoch: int) -> OptimizerConfig:
        """The optimizer of this run, its schedule laid over ``epochs`` x ``steps_per_epoch`` steps."""
        total = max(1, self.epochs * steps_per_epoch)
        return OptimizerConfig(
            name=self.optimizer,
            learning_rate=self.learning_rate,
            schedule=self.schedule,
            total_steps=total,
            warmup_steps=min(total, self.warmup_epochs * steps_per_epoch) if self.schedule == "cosine" else 0,
            weight_decay=self.weight_decay,
        )

    def digest(self) -> str:
        settings = dataclasses.asdict(self)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> TrainConfig:
        """The config of ``dataclasses.asdict`` output (a model card's ``config``). Cards written before the
        recipe switches existed read as the paper's recipe (``mixed_precision`` -> ``precision``)."""
        settings = dict(settings)
        if isinstance(settings.get("augment"), dict):
            augment_fields = {f.name for f in dataclasses.fields(AugmentConfig)}
            settings["augment"] = AugmentConfig(
                **{key: value for key, value in settings["augment"].items() if key in augment_fields}
            )
        settings["preprocessing"] = PreprocessConfig.from_mapping(settings.get("preprocessing"))
        if "mixed_precision" in settings:
            # float16 then meant "on GPUs": auto still picks it there, and runs on CPUs as they can.
            settings.setdefault("precision", "auto" if settings.pop("mixed_precision") else "float32")
        settings["sources"] = tuple(settings.get("sources", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in settings.items() if key in known})
