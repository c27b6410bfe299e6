"""The lung-field segmenter's plots, as PNG bytes: test films with the predicted and the true outline, and
the training curves. Drawn with :func:`lxn_ray.evaluation.plots.new_pyplot` (headless Agg); outlines are
the 0.5 iso-contours of the masks (``skimage.measure.find_contours``, marching squares)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lxn_ray.evaluation.plots import new_pyplot, png_bytes


def outlines(
    films: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    titles: Sequence[str],
    about: str,
) -> bytes:
    """One panel per film (uint8 ``(h, w)``): the film in gray, the true mask's outline in green and the
    predicted one in dashed red (both bool ``(h, w)``, the film's size); ``titles`` label the panels."""
    from skimage.measure import find_contours

    plt = new_pyplot()
    count = max(1, len(films))
    figure, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.6), squeeze=False)
    for axis, film, truth, predicted, title in zip(axes[0], films, truths, predictions, titles, strict=False):
        axis.imshow(film, cmap="gray", vmin=0, vmax=255)
        for mask, style in (
            (truth, {"color": "lime", "linewidth": 1.2}),
            (predicted, {"color": "red", "linestyle": "--", "linewidth": 1.2}),
        ):
            for contour in find_contours(np.pad(mask.astype(np.float32), 1), 0.5):
                axis.plot(contour[:, 1] - 1, contour[:, 0] - 1, **style)
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    figure.suptitle(f"{about}\ngreen: true outline, red dashed: predicted", fontsize=9)
    return png_bytes(figure)


def training_curves(history: Sequence[dict[str, Any]], best_epoch: int, about: str) -> bytes:
    """Train and val loss, val Dice and IoU per epoch; the kept (best) epoch marked."""
    plt = new_pyplot()
    epochs = [entry["epoch"] for entry in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [e["train_loss"] for e in history], label="train loss")
    left.plot(epochs, [e["val_loss"] for e in history], label="val loss")
    left.set_xlabel("epoch")
    left.set_ylabel("Dice + BCE loss")
    left.legend()
    right.plot(epochs, [e["val_dice"] for e in history], label="val Dice")
    right.plot(epochs, [e["val_iou"] for e in history], label="val IoU")
    right.axvline(best_epoch, color="gray", linestyle=":", label=f"kept: epoch {best_epoch}")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend(loc="lower right")
    figure.suptitle(about, fontsize=9)
    return png_bytes(figure)
