"""PNG pictures users look at: training curves, ROC curves and confusion matrices (matplotlib, no display)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from lxn_ray.metrics import roc_auc, roc_curve


def new_pyplot():
    """pyplot on the Agg backend, imported on first use (keeps ``import lxn_ray`` light)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes; closes it so long jobs do not accumulate figures."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    new_pyplot().close(figure)
    return buffer.getvalue()


def training_curves(history: Sequence[Mapping[str, float]]) -> bytes:
    """Loss, accuracy and AUC per epoch, train against validation."""
    plt = new_pyplot()
    epochs = [entry["epoch"] for entry in history]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, metric in zip(axes, ("loss", "accuracy", "auc"), strict=True):
        for split, style in (("train", "-o"), ("val", "--s")):
            values = [entry.get(f"{split}_{metric}") for entry in history]
            values = [np.nan if v is None else v for v in values]
            axis.plot(epochs, values, style, label=split)
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    return png_bytes(figure)


def roc(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], threshold: float | None = None) -> bytes:
    """ROC curves of several label/score sets (e.g. val and test), with the AUC in the legend."""
    plt = new_pyplot()
    figure, axis = plt.subplots(figsize=(4.8, 4.6))
    for name, (labels, scores) in curves.items():
        auc = roc_auc(labels, scores)
        if auc is None:
            continue
        fpr, tpr, thresholds = roc_curve(labels, scores)
        axis.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f}, n={len(labels)})")
        if threshold is not None:
            at = int(np.argmin(np.abs(np.where(np.isfinite(thresholds), thresholds, np.inf) - threshold)))
            axis.plot(fpr[at], tpr[at], "o", color=axis.lines[-1].get_color())
    axis.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity")
    axis.set_title("ROC" + (f" (dot: threshold {threshold:.3f})" if threshold is not None else ""))
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    return png_bytes(figure)


def confusion_matrix(confusion: Sequence[Sequence[int]], title: str = "test") -> bytes:
    """A 2x2 confusion matrix, rows truth, columns prediction."""
    plt = new_pyplot()
    matrix = np.asarray(confusion)
    figure, axis = plt.subplots(figsize=(3.8, 3.4))
    axis.imshow(matrix, cmap="Blues")
    names = ["other", "COVID-19"]
    axis.set_xticks([0, 1], names)
    axis.set_yticks([0, 1], names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("truth")
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        axis.text(column, row, str(count), ha="center", va="center", color=colour, fontsize=13)
    axis.set_title(f"confusion matrix ({title})")
    return png_bytes(figure)


def search_results(points: Sequence[Mapping[str, float]], lr_range: tuple[float, float]) -> bytes:
    """A hyperparameter search: best validation objective (source-aware AUC) against learning rate (log
    scale), coloured by augmentation
    strength, marker size by epochs run (ASHA stops weak trials early); the best trial ringed."""
    plt = new_pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    if points:
        drawn = axes.scatter(
            [p["learning_rate"] for p in points],
            [p["objective"] for p in points],
            c=[p["augment_strength"] for p in points],
            cmap="viridis",
            vmin=0,
            vmax=1,
            s=[30 + 25 * p["epochs_run"] for p in points],
            edgecolors="black",
            linewidths=0.5,
        )
        figure.colorbar(drawn, ax=axes, label="augmentation strength (0 = off, 1 = all at maximum)")
        best = max(points, key=lambda p: p["objective"])
        axes.scatter(
            [best["learning_rate"]],
            [best["objective"]],
            s=260,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
            label="best trial",
        )
        axes.legend(loc="lower right", fontsize=8)
    axes.set_xscale("log")
    axes.set_xlim(*lr_range)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("best val objective (source-aware AUC)")
    axes.set_title(f"hyperparameter search: {len(points)} trials (marker size = epochs run)")
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes.grid(alpha=0.3)
    return png_bytes(figure)


def retrain_history(entries: Sequence[Mapping[str, object]]) -> bytes:
    """Scheduled retraining over time: test AUC of the champion and of each challenger per dataset version,
    promoted challengers as green stars and rejected ones as red crosses, both scored on the same (that
    version's) test split; the line is the champion in force after each evaluated tick."""
    plt = new_pyplot()
    figure, axis = plt.subplots(figsize=(7.2, 4.2))
    evaluated = [e for e in entries if e.get("challenger_auc") is not None]
    versions = list(dict.fromkeys(e["dataset_version"] for e in evaluated))
    position = {version: i for i, version in enumerate(versions)}
    if evaluated:
        in_force = []
        for e in evaluated:
            auc = e["challenger_auc"] if e["decision"] == "promoted" else e.get("champion_auc")
            if auc is not None:
                in_force.append((position[e["dataset_version"]], auc))
        if in_force:
            axis.plot(*zip(*in_force, strict=True), color="tab:blue", alpha=0.5, label="champion in force")
        incumbents = [e for e in evaluated if e.get("champion_auc") is not None]
        axis.scatter(
            [position[e["dataset_version"]] for e in incumbents],
            [e["champion_auc"] for e in incumbents],
            color="tab:blue",
            label="champion (before the tick)",
            zorder=3,
        )
        for decision, style in (
            ("promoted", {"marker": "*", "s": 160, "color": "tab:green"}),
            ("rejected", {"marker": "x", "s": 70, "color": "tab:red"}),
        ):
            chosen = [e for e in evaluated if e["decision"] == decision]
            axis.scatter(
                [position[e["dataset_version"]] for e in chosen],
                [e["challenger_auc"] for e in chosen],
                label=f"challenger {decision}",
                zorder=4,
                **style,
            )
        axis.legend(loc="lower right", fontsize=8)
    axis.set_xticks(range(len(versions)), [v.removeprefix("ds-")[:15] for v in versions], rotation=30)
    axis.set_xlabel("dataset version (test split of that version)")
    axis.set_ylabel("test AUC")
    axis.set_ylim(0, 1.02)
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_title(f"scheduled retraining: {len(evaluated)} evaluated ticks of {len(entries)}")
    axis.grid(alpha=0.3)
    return png_bytes(figure)


def within_source_curves(labels, scores, sources, prefix: str = "") -> dict[str, tuple]:
    """ROC inputs (``{"<prefix>within NAME": (labels, scores)}``) of each source holding both classes, to
    draw beside the pooled curve with :func:`roc`; empty when all images come from one source."""
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(sources)
    if len(set(groups.tolist())) < 2:
        return {}
    curves = {}
    for name in sorted(set(groups.tolist())):
        mask = groups == name
        if 0 < labels[mask].sum() < mask.sum():
            curves[f"{prefix}within {name}"] = (labels[mask], scores[mask])
    return curves
