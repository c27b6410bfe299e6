"""The settings of one training run (:class:`TrainConfig`): the paper's LxN recipe by default, every
switch recorded in the model card and searched by Tune."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from lxn_ray.images.preprocess import LIGHT_AUGMENT, AugmentConfig, PreprocessConfig
from lxn_ray.model.network import PRECISIONS, ModelConfig, OptimizerConfig
from lxn_ray.sources.tasks import DEFAULT_TASK

SAMPLINGS = ("weighted", "class-balanced", "source-balanced")


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

    image_size: int = 200
    width: float = 1.0
    epochs: int = 10
    batch_size: int = 20  # global: split over the workers
    learning_rate: float = 1e-4
    augment: AugmentConfig = field(default_factory=lambda: LIGHT_AUGMENT)
    workers: int = 1
    use_gpu: bool = False  # also on whenever the cluster has GPUs
    precision: str = "auto"
    seed: int = 0
    task: str = DEFAULT_TASK  # a built-in task name or a task file (lxn_ray.sources.tasks)
    sources: tuple[str, ...] = ()  # train and validate on these sources only (empty: all); see loso.py
    optimizer: str = "rmsprop"
    schedule: str = "constant"
    warmup_epochs: int = 0
    weight_decay: float = 1e-4  # adamw only
    patience: int = 0
    sampling: str = "weighted"
    architecture: str = "lxn"
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        # Checked at construction so a bad flag or Tune config fails before any worker starts.
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
