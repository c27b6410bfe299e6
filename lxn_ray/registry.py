"""Model versions under storage and the champion pointer; lung-field segmenter versions beside them.

A model version is ``models/<version>/`` with ``model.keras``, ``card.json`` (written last: the version
exists once its card does) and ``plots/``. ``models/CHAMPION`` names the version being served; it is
replaced atomically and only by this module. A segmenter version is ``segmenters/<version>/``, laid out
the same way, without a champion (:func:`resolve_segmenter`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lxn_ray.infra.storage import Storage
from lxn_ray.sources.tasks import DEFAULT_TASK

MODELS = "models"
CHAMPION = f"{MODELS}/CHAMPION"


@dataclass(frozen=True)
class ModelRef:
    """A model resolved from a version id, ``champion`` or a local ``.keras`` path: its card and file bytes.

    Everything a caller needs to know about a model version without TensorFlow is read here, from the
    card; :func:`lxn_ray.evaluation.predict.load` turns it into a Keras model ready to score."""

    version: str | None  # None for a file outside the registry
    card: dict[str, Any]
    model_bytes: bytes

    @property
    def threshold(self) -> float:
        """The decision threshold chosen on the model's validation split (0.5 for a bare file)."""
        return float(self.card.get("threshold", 0.5))

    @property
    def task(self) -> str | dict[str, Any]:
        """The task the model was trained for (:func:`card_task`)."""
        return card_task(self.card)

    @property
    def image_size(self) -> int | None:
        """The input side in pixels the model was trained at (its card's config), None when unrecorded:
        :func:`lxn_ray.evaluation.predict.load` then reads it from the model's input shape."""
        size = (self.card.get("config") or {}).get("image_size")
        return int(size) if size else None

    @property
    def preprocessing(self):
        """The :class:`lxn_ray.images.preprocess.PreprocessConfig` the model was trained and validated with
        (its
        card's; a card made before the setting existed used the default)."""
        from lxn_ray.images.preprocess import PreprocessConfig

        return PreprocessConfig.from_mapping((self.card.get("config") or {}).get("preprocessing"))


def card_task(card: dict[str, Any]) -> str | dict[str, Any]:
    """The task a card's model was trained for: the task's dict (cards since tasks exist), else the
    training config's task name, else :data:`~lxn_ray.sources.tasks.DEFAULT_TASK` (cards made before tasks
    existed). :func:`lxn_ray.sources.tasks.resolve_task` turns either into a ``Task``; the one place a
    card's task is read."""
    return card.get("task") or (card.get("config") or {}).get("task") or DEFAULT_TASK


def card_task_name(card: dict[str, Any]) -> str:
    """The name of :func:`card_task`."""
    task = card_task(card)
    return task.get("name", DEFAULT_TASK) if isinstance(task, dict) else task


def model_key(version: str, name: str) -> str:
    return f"{MODELS}/{version}/{name}"


def list_versions(storage: Storage) -> list[str]:
    """Published model versions (those with a card), oldest first."""
    names = [key.rsplit("/", 1)[-1] for key in storage.list(MODELS)]
    return sorted(name for name in names if storage.exists(model_key(name, "card.json")))


def champion(storage: Storage) -> str | None:
    return storage.read_text(CHAMPION).strip() if storage.exists(CHAMPION) else None


def read_card(storage: Storage, version: str) -> dict[str, Any]:
    if not storage.exists(model_key(version, "card.json")):
        raise FileNotFoundError(f"model version {version} is not published in {storage.uri}")
    return storage.read_json(model_key(version, "card.json"))


def resolve(storage: Storage, reference: str) -> ModelRef:
    """``champion``, a model version id, or a path to a ``.keras`` file (its ``card.json`` beside it)."""
    if reference == "champion":
        version = champion(storage)
        if version is None:
            raise FileNotFoundError(f"no champion model in {storage.uri}: train or promote one first")
        reference = version
    path = Path(reference).expanduser()
    if path.suffix == ".keras" and path.is_file():
        card_path = path.with_name("card.json")
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        return ModelRef(version=card.get("model_version"), card=card, model_bytes=path.read_bytes())
    card = read_card(storage, reference)
    return ModelRef(
        version=reference, card=card, model_bytes=storage.read_bytes(model_key(reference, "model.keras"))
    )


# -- champion -----------------------------------------------------------------------------------------
HISTORY = f"{MODELS}/CHAMPION_HISTORY.json"


def promote(
    storage: Storage, version: str, reason: str = "promoted by hand", rollback: bool = False
) -> dict[str, Any]:
    """Make ``version`` the champion. The pointer is one object written atomically; the history of
    champions (for rollback and audit) is appended first, so a crash never leaves an unrecorded champion.
    """
    read_card(storage, version)  # refuses versions that are not published
    history = _history(storage)
    entry = {
        "version": version,
        "previous": champion(storage),
        "rollback": rollback,
        "reason": reason,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json(HISTORY, [*history, entry])
    storage.write_text(CHAMPION, version + "\n")
    return entry


def rollback(storage: Storage) -> dict[str, Any]:
    """Return to the champion that preceded the current one's promotion (repeatable, like a stack)."""
    current = champion(storage)
    if current is None:
        raise FileNotFoundError(f"no champion in {storage.uri} to roll back from")
    promotions = [e for e in _history(storage) if e["version"] == current and not e.get("rollback")]
    previous = promotions[-1]["previous"] if promotions else None
    if previous is None:
        raise ValueError(f"{current} has no earlier champion to roll back to")
    return promote(storage, previous, reason=f"rollback from {current}", rollback=True)


def _history(storage: Storage) -> list[dict[str, Any]]:
    return storage.read_json(HISTORY) if storage.exists(HISTORY) else []


def describe(storage: Storage) -> list[dict[str, Any]]:
    """One line per model version: the numbers a person compares, and which one is champion."""
    current = champion(storage)
    rows = []
    for version in list_versions(storage):
        card = read_card(storage, version)
        test = card.get("test", {})
        rows.append(
            {
                "model_version": version,
                "champion": version == current,
                "dataset_version": card.get("dataset_version"),
                "test_auc": test.get("auc"),
                "test_auc_ci": test.get("auc_ci"),
                "no_better_than_chance": test.get("no_better_than_chance"),
                "task": card_task_name(card),
                "test_objective": test.get("objective"),
                "val_auc": card.get("val", {}).get("auc"),
                "threshold": card.get("threshold"),
                "created_at": card.get("created_at"),
            }
        )
    return rows


# -- lung-field segmenters ------------------------------------------------------------------------------
# A segmenter version is ``segmenters/<version>/`` with ``model.keras``, ``plots/`` and ``card.json``
# (written last: the version exists once its card does). Versions sort by creation (their ids start with
# a UTC stamp); ``latest`` is the newest. lxn_ray.model.lungs.LungSegmenter loads one.
SEGMENTERS = "segmenters"


@dataclass(frozen=True)
class SegmenterRef:
    """A segmenter version resolved from its id or ``latest``: its card and ``model.keras`` bytes."""

    version: str
    card: dict[str, Any]
    model_bytes: bytes

    @property
    def image_size(self) -> int:
        """The U-Net's input side in pixels (its card's ``unet``)."""
        return int(self.card["unet"]["image_size"])


def segmenter_key(version: str, name: str) -> str:
    return f"{SEGMENTERS}/{version}/{name}"


def list_segmenters(storage: Storage) -> list[str]:
    """Published segmenter versions (those with a card), oldest first."""
    names = [key.rsplit("/", 1)[-1] for key in storage.list(SEGMENTERS)]
    return sorted(name for name in names if storage.exists(segmenter_key(name, "card.json")))


def read_segmenter_card(storage: Storage, version: str) -> dict[str, Any]:
    if not storage.exists(segmenter_key(version, "card.json")):
        raise FileNotFoundError(f"segmenter version {version} is not published in {storage.uri}")
    return storage.read_json(segmenter_key(version, "card.json"))


def resolve_segmenter(storage: Storage, reference: str = "latest") -> SegmenterRef:
    """``latest`` (the newest published segmenter) or a segmenter version id. Raises FileNotFoundError
    when there is none (train one with ``jobs/lungs.py``) or the version is not published."""
    if reference == "latest":
        versions = list_segmenters(storage)
        if not versions:
            raise FileNotFoundError(f"no lung segmenter in {storage.uri}: train one with jobs/lungs.py first")
        reference = versions[-1]
    card = read_segmenter_card(storage, reference)
    return SegmenterRef(reference, card, storage.read_bytes(segmenter_key(reference, "model.keras")))
