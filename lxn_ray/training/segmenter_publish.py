"""Publishing a lung-field segmenter version: the best epoch of a run, rebuilt in float32, is scored on
the validation and the held-out test films at each film's own resolution
(:mod:`lxn_ray.evaluation.segmentation`), and written to ``segmenters/<version>/`` with its plots and its
card (``card.json`` last: the version's commit marker; :mod:`lxn_ray.registry`)."""

from __future__ import annotations

import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxn_ray import registry
from lxn_ray.data.lung_pairs import Pairing
from lxn_ray.evaluation import segmentation, segmentation_plots
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.masks import MaskFolder
from lxn_ray.training.runs import CHECKPOINT_STATE, CHECKPOINT_WEIGHTS

if TYPE_CHECKING:
    import ray.train

log = get_logger("lungs").info

INTENDED_USE = (
    "Research only: lung-field masks to crop or mask chest films for research models. Not a diagnostic "
    "device; not validated for clinical use."
)
PLOTTED_FILMS = 4  # test films drawn with their outlines


def publish_segmenter(
    storage: Storage,
    config: Any,
    checkpoint: ray.train.Checkpoint,
    history: list[dict[str, Any]],
    data: Any,
    pairing: Pairing,
    masks: MaskFolder,
    started: float,
    run_name: str,
) -> dict[str, Any]:
    """Score ``checkpoint`` on val and test (per-film Dice and IoU at the film's size, patient-bootstrap
    95% intervals) and write the segmenter version; returns the job's report. ``started``: the job's
    ``time.monotonic()`` at its start (the card's ``seconds`` run until the card is written). ``config``
    and ``data`` are the run's :class:`lxn_ray.training.segmenter.SegmenterConfig` and
    ``SegmentationData`` (not imported here: that module imports this one)."""
    import keras

    from lxn_ray.model.lungs import LungSegmenter
    from lxn_ray.model.network import save_model
    from lxn_ray.model.unet import build_unet

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # published and scored in float32
    try:
        model = build_unet(config.unet)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    with checkpoint.as_directory() as folder:
        model.load_weights(Path(folder) / CHECKPOINT_WEIGHTS)
        best_epoch = int(json.loads((Path(folder) / CHECKPOINT_STATE).read_text())["epoch"])
    segmenter = LungSegmenter(model)
    scores, predictions = {}, {}
    for split in ("val", "test"):
        films = [film for film, _ in data.full[split]]
        predictions[split] = segmenter.masks(films)
        truths = [mask for _, mask in data.full[split]]
        scores[split] = segmentation.summarize(predictions[split], truths, data.patients[split], config.seed)

    version = f"lungs-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{config.digest()[:6]}"
    prefix = registry.segmenter_key(version, "").rstrip("/")
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(model, Path(folder) / "model.keras")
        storage.write_bytes(f"{prefix}/model.keras", path.read_bytes())
    about = f"segmenter {version}"
    plots = {"training_curves.png": segmentation_plots.training_curves(history, best_epoch, about)}
    chosen = _plotted(scores["test"]["per_film"]["dice"])
    plots["test_outlines.png"] = segmentation_plots.outlines(
        [data.full["test"][i][0] for i in chosen],
        [data.full["test"][i][1] for i in chosen],
        [predictions["test"][i] for i in chosen],
        [f"test film, Dice {scores['test']['per_film']['dice'][i]:.3f}" for i in chosen],
        f"{about}: test films (best, median and worst Dice)",
    )
    for name, png in plots.items():
        storage.write_bytes(f"{prefix}/plots/{name}", png)

    counts = data.counts()
    split_summaries = {split: {k: v for k, v in scores[split].items() if k != "per_film"} for split in scores}
    masks_used = {
        **masks.describe(),
        "used": sum(c["films"] for c in counts.values()),
        "skipped": sum(pairing.skipped.values()),
        "skipped_by_reason": dict(pairing.skipped),
        "film_source": pairing.film_source,
    }
    card = {
        "version": version,
        "model": "U-Net (Ronneberger et al., 2015) lung-field segmenter",
        "intended_use": INTENDED_USE,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "unet": config.unet.as_dict(),
        "training": {**config.as_dict(), "loss": "soft Dice + BCE", "optimizer": "adam, cosine decay"},
        "input": "grayscale film resized square (bilinear) to unet.image_size, /255; lxn_ray.model.lungs",
        "threshold": 0.5,
        "history": history,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "val": split_summaries["val"],
        "test": split_summaries["test"],
        "metrics_note": "mean over films of per-film Dice/IoU at the film's own resolution; 95% percentile "
        "bootstrap interval resampling patients (2000 resamples)",
        "split_counts": counts,
        "masks": masks_used,
        "dataset_version": pairing.dataset_version,
        "train_run": run_name,
        "seconds": round(time.monotonic() - started, 1),
        "versions": _versions(),
    }
    storage.write_json(f"{prefix}/card.json", card)  # written last: the version's commit marker
    test = split_summaries["test"]
    log(
        f"published segmenter {version}: test Dice {test['dice']['value']:.3f}, "
        f"IoU {test['iou']['value']:.3f}"
    )
    return {
        "segmenter_version": version,
        "dataset_version": pairing.dataset_version,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "dice": test["dice"],
        "iou": test["iou"],
        "test": test,
        "val": split_summaries["val"],
        "split_counts": counts,
        "masks": masks_used,
        "skipped_rows": pairing.skipped_rows,
        "unet": config.unet.as_dict(),
        "seconds": card["seconds"],
        "card": storage.uri_of(f"{prefix}/card.json"),
        "model": storage.uri_of(f"{prefix}/model.keras"),
        "plots": [storage.uri_of(f"{prefix}/plots/{name}") for name in plots],
    }


def _plotted(dice: list[float]) -> list[int]:
    """Indices of the test films to draw: the best, two around the median and the worst by Dice."""
    order = sorted(range(len(dice)), key=lambda i: dice[i], reverse=True)
    if len(order) <= PLOTTED_FILMS:
        return order
    middle = len(order) // 2
    return [order[0], order[middle - 1], order[middle], order[-1]]


def _versions() -> dict[str, str]:
    import keras
    import ray
    import tensorflow as tf

    from lxn_ray import __version__

    return {
        "lxn_ray": __version__,
        "ray": ray.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }
