"""PNG pictures users look at: training curves, ROC curves, reliability diagrams and confusion matrices
(matplotlib, no display)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from lxn_ray.evaluation.metrics import roc_auc, roc_curve


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


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(axis, **options) -> None:
    """The legend to the right of the axes, where it hides no data point."""
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **options)


def training_curves(
    history: Sequence[Mapping[str, float]], about: str = "", val_prevalence: float | None = None
) -> bytes:
    """Loss, accuracy and AUC per (integer) epoch, train against validation. ``about`` (model id and
    dataset version) heads the figure. AUC is drawn on 0-1 with chance (0.5) marked; accuracy with the
    majority-class accuracy of the validation split (``max(p, 1 - p)`` for its positive share p), which
    a model that always says the larger class reaches."""
    plt = new_pyplot()
    epochs = [entry["epoch"] for entry in history]
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    for axis, metric in zip(axes, ("loss", "accuracy", "auc"), strict=True):
        for split, style in (("train", "-o"), ("val", "--s")):
            values = [entry.get(f"{split}_{metric}") for entry in history]
            values = [np.nan if v is None else v for v in values]
            axis.plot(epochs, values, style, label=split)
        if metric == "auc":
            axis.set_ylim(0.0, 1.0)
            axis.axhline(0.5, color="grey", linestyle=":", linewidth=1.2, label="chance (0.5)")
        if metric == "accuracy":
            axis.set_ylim(0.0, 1.0)
            if val_prevalence is not None:
                majority = max(val_prevalence, 1.0 - val_prevalence)
                axis.axhline(
                    majority,
                    color="tab:red",
                    linestyle=":",
                    linewidth=1.2,
                    label=f"always the larger class (val): {majority:.2f}",
                )
        axis.set_title(metric.upper() if metric == "auc" else metric)
        axis.set_xlabel("epoch")
        _integer_ticks(axis)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower center", bbox_to_anchor=(0.5, -0.42), ncol=2, fontsize=8, frameon=False)
    figure.suptitle(f"training curves - {about}" if about else "training curves", fontsize=10)
    return png_bytes(figure)


def _roc_band(labels, scores, grid: np.ndarray, resamples: int = 200, seed: int = 0) -> tuple | None:
    """Pointwise 95% band of sensitivity at each 1 - specificity in ``grid``, from a stratified bootstrap
    of the images (the resampling of :func:`lxn_ray.evaluation.metrics.bootstrap_auc_ci`); None when too
    small."""
    y, p = np.asarray(labels), np.asarray(scores)
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(positives) < 2 or len(negatives) < 2:
        return None
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(resamples):
        pick = np.concatenate([rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
        fpr, tpr, _ = roc_curve(y[pick], p[pick])
        curves.append(np.interp(grid, fpr, tpr))
    low, high = np.percentile(np.asarray(curves), [2.5, 97.5], axis=0)
    return low, high


def roc(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    threshold: float | None = None,
    about: str = "",
) -> bytes:
    """ROC curves of several label/score sets (e.g. val and test) with a pointwise 95% bootstrap band
    each; the AUC and its 95% interval (:func:`lxn_ray.evaluation.metrics.bootstrap_auc_ci`) in the legend."""
    from lxn_ray.evaluation.metrics import bootstrap_auc_ci

    plt = new_pyplot()
    figure, axis = plt.subplots(figsize=(7.6, 4.8))
    grid = np.linspace(0.0, 1.0, 101)
    for name, (labels, scores) in curves.items():
        auc = roc_auc(labels, scores)
        if auc is None:
            continue
        fpr, tpr, thresholds = roc_curve(labels, scores)
        interval = bootstrap_auc_ci(labels, scores)
        ci = f", 95% CI {interval[0]:.2f}-{interval[1]:.2f}" if interval else ""
        (line,) = axis.plot(fpr, tpr, label=f"{name}: AUC {auc:.3f}{ci}, n={len(labels)}")
        if (band := _roc_band(labels, scores, grid)) is not None:
            axis.fill_between(grid, *band, color=line.get_color(), alpha=0.15, linewidth=0)
        if threshold is not None:
            at = int(np.argmin(np.abs(np.where(np.isfinite(thresholds), thresholds, np.inf) - threshold)))
            axis.plot(fpr[at], tpr[at], "o", color=line.get_color())
    axis.plot([0, 1], [0, 1], ":", color="grey", label="chance (AUC 0.5)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_aspect("equal")
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity")
    dot = f"; dot: threshold {threshold:.3f}" if threshold is not None else ""
    axis.set_title(f"ROC with 95% bands{dot}" + (f"\n{about}" if about else ""), fontsize=9)
    _legend_outside(axis)
    axis.grid(alpha=0.3)
    return png_bytes(figure)


def reliability(calibration: Mapping[str, object], about: str = "") -> bytes:
    """The reliability diagram of a model card's ``calibration`` (:mod:`lxn_ray.evaluation.calibration`):
    per split (val, test), the observed fraction of positives against the mean calibrated probability in
    each bin, markers sized by the bin's films, the diagonal as perfect calibration; Brier and ECE before
    and after calibration in the legend."""
    plt = new_pyplot()
    figure, axis = plt.subplots(figsize=(7.6, 4.8))
    for split in ("val", "test"):
        summary = calibration.get(split) or {}
        points = summary.get("reliability") or []
        if not points:
            continue
        x = [point["mean_probability"] for point in points]
        y = [point["observed"] for point in points]
        sizes = [12 + 4 * point["n"] ** 0.5 for point in points]
        label = (
            f"{split}: ECE {summary['ece']:.3f} (uncalibrated {summary['ece_uncalibrated']:.3f}), "
            f"Brier {summary['brier']:.3f} ({summary['brier_uncalibrated']:.3f}), n={summary['n']}"
        )
        (line,) = axis.plot(x, y, "-", label=label)
        axis.scatter(x, y, s=sizes, color=line.get_color())
    axis.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_aspect("equal")
    axis.set_xlabel("mean calibrated probability in the bin")
    axis.set_ylabel("observed fraction of positives")
    title = "reliability"
    if "slope" in calibration:
        title += (
            f" after Platt scaling (slope {calibration['slope']:.2f}, intercept "
            f"{calibration['intercept']:.2f}, fitted on val)"
        )
    axis.set_title(title + (f"\n{about}" if about else ""), fontsize=9)
    _legend_outside(axis)
    axis.grid(alpha=0.3)
    return png_bytes(figure)


def confusion_matrix(
    confusion: Sequence[Sequence[int]],
    title: str = "test",
    names: Sequence[str] = ("other", "COVID-19"),
    about: str = "",
) -> bytes:
    """A 2x2 confusion matrix, rows truth, columns prediction; ``names`` are the negative and positive
    labels of the model's task."""
    plt = new_pyplot()
    matrix = np.asarray(confusion)
    figure, axis = plt.subplots(figsize=(4.2, 3.8))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks([0, 1], list(names))
    axis.set_yticks([0, 1], list(names))
    axis.set_xlabel("predicted")
    axis.set_ylabel("truth")
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        axis.text(column, row, str(count), ha="center", va="center", color=colour, fontsize=13)
    axis.set_title(f"confusion matrix ({title})" + (f"\n{about}" if about else ""), fontsize=9)
    return png_bytes(figure)


def search_results(
    points: Sequence[Mapping[str, float]], lr_range: tuple[float, float], about: str = ""
) -> bytes:
    """A hyperparameter search: best validation objective (source-aware AUC, on 0-1 with chance marked)
    against learning rate (log scale), coloured by augmentation strength, marker size by epochs run (ASHA
    stops weak trials early); the best trial ringed; whiskers where a point carries its 95% interval
    (``objective_ci``). The legend sits outside the axes, so no point hides under it."""
    plt = new_pyplot()
    figure, axes = plt.subplots(figsize=(8.2, 4.6))
    if points:
        for point in points:
            if point.get("objective_ci"):
                low, high = point["objective_ci"]
                axes.plot([point["learning_rate"]] * 2, [low, high], color="grey", linewidth=1, zorder=1)
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
            zorder=2,
        )
        figure.colorbar(drawn, ax=axes, label="augmentation strength (0 = off, 1 = all at maximum)", pad=0.02)
        best = max(points, key=lambda p: p["objective"])
        axes.scatter(
            [best["learning_rate"]],
            [best["objective"]],
            s=260,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
            label="best trial",
            zorder=3,
        )
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1.2, label="chance (0.5)")
    axes.set_xscale("log")
    axes.set_xlim(*lr_range)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("best val objective (source-aware AUC)")
    heading = f"hyperparameter search: {len(points)} trials (marker size = epochs run)"
    axes.set_title(heading + (f"\n{about}" if about else ""), fontsize=9)
    axes.legend(loc="lower left", bbox_to_anchor=(0.0, 1.12), ncol=2, fontsize=8, frameon=False)
    axes.grid(alpha=0.3)
    return png_bytes(figure)


def retrain_history(
    entries: Sequence[Mapping[str, object]], data_dates: Mapping[str, str | None] | None = None
) -> bytes:
    """Scheduled retraining over the data's own time: test AUC of the champion and of each challenger per
    dataset version, placed at the date of the data it was trained on (``data_dates``: version -> ISO date
    of its sources, e.g. the git commit; the version's ingest time where none is known); promoted
    challengers as green stars, rejected ones as red crosses, both scored on the same (that version's)
    test split; the line is the champion in force after each evaluated tick."""
    import matplotlib.dates as mdates

    plt = new_pyplot()
    figure, axis = plt.subplots(figsize=(8.6, 4.4))
    evaluated = [e for e in entries if e.get("challenger_auc") is not None]
    versions = list(dict.fromkeys(e["dataset_version"] for e in evaluated))
    position = {version: _version_date(version, (data_dates or {}).get(version)) for version in versions}
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
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1.2, label="chance (0.5)")
    axis.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    figure.autofmt_xdate()
    dated = all((data_dates or {}).get(v) for v in versions)
    axis.set_xlabel(
        "date of the data (source commit)" if dated else "date of the data (ingest time where unknown)"
    )
    axis.set_ylabel("test AUC (that version's test split)")
    axis.set_ylim(0, 1.0)
    axis.set_title(f"scheduled retraining: {len(evaluated)} evaluated ticks of {len(entries)}", fontsize=10)
    _legend_outside(axis)
    axis.grid(alpha=0.3)
    return png_bytes(figure)


def _version_date(version: str, data_date: str | None):
    """The datetime to place a dataset version at: its data's date, else the ingest time in its id
    (``ds-YYYYmmdd-HHMMSS-...``)."""
    from datetime import datetime

    if data_date:
        return datetime.fromisoformat(data_date.replace("Z", "+00:00")).replace(tzinfo=None)
    return datetime.strptime(version.removeprefix("ds-")[:15], "%Y%m%d-%H%M%S")


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
