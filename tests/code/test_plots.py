"""The pictures users read: each names what it shows, keeps its scale honest and hides no data.

Each plot function is drawn on synthetic numbers and its matplotlib figure inspected (titles, axis limits,
labelled reference lines, integer epochs, legends outside the data). ``LXN_PICTURES=DIR`` also writes the
PNGs there, for the eye check each change of a picture gets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lxn_ray.evaluation import plots

ABOUT = "model lxn-20261203-091129-c204fe, dataset ds-20261203-090851-227dc75d"


@pytest.fixture
def figures(monkeypatch, request) -> list:
    """The figures the plot functions draw, kept open for inspection (and saved where asked)."""
    drawn: list = []
    real = plots.png_bytes
    folder = os.environ.get("LXN_PICTURES")

    def capture(figure) -> bytes:
        drawn.append(figure)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            name = f"{request.node.name}-{len(drawn)}.png"
            figure.savefig(Path(folder) / name, dpi=120, bbox_inches="tight")
        return b"\x89PNG"

    monkeypatch.setattr(plots, "png_bytes", capture)
    yield drawn
    for figure in drawn:
        real(figure)  # closes it


def titles(figure) -> str:
    parts = [figure._suptitle.get_text() if figure._suptitle else ""]
    return "\n".join(parts + [axis.get_title() for axis in figure.axes])


def labels(axis) -> list[str]:
    return [line.get_label() for line in axis.get_lines()]


def legend_outside(axis) -> bool:
    """True when the axis's legend box lies outside its data area."""
    figure = axis.figure
    figure.canvas.draw()
    legend = axis.get_legend().get_window_extent()
    area = axis.get_window_extent()
    return not legend.overlaps(area) or legend.x0 >= area.x1 or legend.y0 >= area.y1 or legend.y1 <= area.y0


def test_training_curves(figures):
    history = [
        {
            "epoch": e,
            "train_loss": 0.3,
            "val_loss": 0.25,
            "train_accuracy": 0.6,
            "val_accuracy": 0.75,
            "train_auc": 0.55,
            "val_auc": 0.492 + 0.004 * e,
        }
        for e in (1, 2)
    ]
    plots.training_curves(history, ABOUT, val_prevalence=0.254)
    (figure,) = figures
    assert ABOUT in titles(figure)
    loss, accuracy, auc = figure.axes
    figure.canvas.draw()
    for axis in figure.axes:
        assert all(float(t).is_integer() for t in axis.get_xticks()), "epochs are whole numbers"
    assert auc.get_ylim() == (0.0, 1.0)  # 0.492 -> 0.500 must not look like a climb
    assert "chance (0.5)" in labels(auc)
    assert "always the larger class (val): 0.75" in labels(accuracy)  # val accuracy is just prevalence


def test_roc_has_bands_intervals_and_names_its_model(figures):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    plots.roc({"test": (y, np.clip(0.3 * y + rng.random(80) * 0.7, 0, 1))}, 0.5, ABOUT)
    (figure,) = figures
    (axis,) = figure.axes
    assert ABOUT in titles(figure)
    assert axis.collections, "a 95% band around the curve"
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    assert any("95% CI" in text for text in legend) and "chance (AUC 0.5)" in legend
    assert legend_outside(axis)


def test_search_plot_hides_no_trial_and_shows_chance(figures):
    points = [
        {"learning_rate": 1e-4, "objective": 0.47, "augment_strength": 0.3, "epochs_run": 2},
        {"learning_rate": 3e-4, "objective": 0.49, "augment_strength": 0.7, "epochs_run": 2},
    ]
    plots.search_results(points, (1e-5, 1e-2), ABOUT)
    (figure, *_) = figures
    axis = figure.axes[0]
    assert ABOUT in titles(figure)
    assert axis.get_ylim() == (0.0, 1.0)  # every trial at chance must look like it
    assert "chance (0.5)" in labels(axis)
    assert legend_outside(axis)


def test_retraining_history_is_placed_by_the_date_of_the_data(figures):
    entries = [
        {"dataset_version": "ds-20261201-100000-aa", "challenger_auc": 0.6, "decision": "promoted"},
        {
            "dataset_version": "ds-20261201-110000-bb",
            "challenger_auc": 0.55,
            "champion_auc": 0.6,
            "decision": "rejected",
        },
    ]
    dates = {
        "ds-20261201-100000-aa": "2020-04-20T10:00:00+00:00",
        "ds-20261201-110000-bb": "2020-06-22T10:00:00Z",
    }
    plots.retrain_history(entries, dates)
    (figure,) = figures
    (axis,) = figure.axes
    import matplotlib.dates as mdates

    low, high = (mdates.num2date(x).year for x in axis.get_xlim())
    assert (low, high) == (2020, 2020)  # the data's own dates, not the 2026 ingest times
    assert axis.get_xlabel() == "date of the data (source commit)"
    assert legend_outside(axis)


def test_confusion_matrix_uses_the_tasks_names(figures):
    plots.confusion_matrix([[3, 1], [2, 4]], "test", ("no finding", "COVID-19"), ABOUT)
    (figure,) = figures
    assert ABOUT in titles(figure)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["no finding", "COVID-19"]
