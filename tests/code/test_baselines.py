"""Shortcut baselines (lxn_ray.evaluation.baselines): what knowing the source, the view or the file alone
scores on a task's test split, the confounding warning, and the label of a model that does not beat them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lxn_ray.evaluation import baselines


def rows(n: int = 400, confounded: bool = True, seed: int = 0) -> pa.Table:
    """A task's rows over two sources. Confounded: 90% of the positives come from archive ``a`` (70% of
    its films JPEG) and 90% of the negatives from archive ``b`` (PNG); otherwise both archives hold
    both classes alike. Views are random either way."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    in_a = (
        np.where(label == 1, rng.random(n) < 0.9, rng.random(n) < 0.1) if confounded else rng.random(n) < 0.5
    )
    return pa.table(
        {
            "split": rng.choice(["train", "val", "test"], n, p=[0.6, 0.1, 0.3]).tolist(),
            "label": label.tolist(),
            "source": np.where(in_a, "a", "b").tolist(),
            "view": rng.choice(["PA", "AP"], n).tolist(),
            "source_format": np.where(in_a & (rng.random(n) < 0.7), "JPEG", "PNG").tolist(),
            "width": rng.integers(300, 513, n).tolist(),
            "height": rng.integers(300, 513, n).tolist(),
            "bytes": rng.integers(20_000, 200_000, n).tolist(),
        }
    )


def test_a_confounded_task_warns_before_training_and_labels_a_model_that_does_not_beat_it():
    result = baselines.shortcut_baselines(rows(confounded=True))
    found = result["baselines"]
    assert found["source"]["auc"] > 0.85 and 0.65 < found["format and size"]["auc"] < found["source"]["auc"]
    assert 0.35 < found["view"]["auc"] < 0.65  # the view says nothing here
    assert all(entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1] for entry in found.values())
    assert result["confounded"] and "confounded with source" in result["warning"]
    assert result["fitted_on"] == "train" and result["scored_on"] == "test"
    beaten = baselines.verdict(0.999, result)
    assert beaten == {"beats_baselines": True, "label": None}
    not_beaten = baselines.verdict(0.85, result)
    assert not_beaten["beats_baselines"] is False and "does not beat the" in not_beaten["label"]
    assert baselines.describe(result).startswith("source 0.")


def test_an_unconfounded_task_does_not_warn_and_undefined_baselines_say_why():
    result = baselines.shortcut_baselines(rows(confounded=False, seed=1))
    assert not result["confounded"] and result["warning"] is None
    assert result["baselines"]["source"]["auc"] < 0.65
    assert baselines.verdict(0.8, result)["beats_baselines"] is True
    one_class = rows().filter(pa.compute.equal(rows()["label"], 1))
    undefined = baselines.shortcut_baselines(one_class)
    assert undefined["baselines"]["source"]["auc"] is None
    assert "one class" in undefined["baselines"]["source"]["reason"]
    assert baselines.verdict(0.9, undefined) == {"beats_baselines": None, "label": None}


@pytest.mark.parametrize("missing", ["view", "bytes"])
def test_a_version_without_a_column_names_it(missing):
    result = baselines.shortcut_baselines(rows().drop_columns([missing]))
    name = "view" if missing == "view" else "bits per pixel"
    assert result["baselines"][name]["auc"] is None and missing in result["baselines"][name]["reason"]
    assert result["baselines"]["source"]["auc"] is not None


def test_a_content_statistic_is_shown_but_does_not_decide_the_verdict():
    """One archive, one format and size, but positives compress less well (more texture): the bits per
    pixel baseline finds it; it is a fact about the pixels, not the archive, so the verdict ignores it."""
    table = rows(confounded=False, seed=2)
    labels = np.asarray(table["label"].to_pylist())
    sizes = np.where(labels == 1, 110_000, 90_000) + np.random.default_rng(3).integers(
        -8_000, 8_000, len(labels)
    )
    table = table.set_column(table.column_names.index("bytes"), "bytes", pa.array(sizes.tolist()))
    table = table.set_column(
        table.column_names.index("source_format"), "source_format", pa.array(["PNG"] * len(labels))
    )
    for column in ("width", "height"):
        table = table.set_column(table.column_names.index(column), column, pa.array([512] * len(labels)))
    found = baselines.shortcut_baselines(table)["baselines"]
    assert found["bits per pixel"]["auc"] > 0.9
    assert found["format and size"]["auc"] == pytest.approx(0.5)
    assert baselines.verdict(0.8, baselines.shortcut_baselines(table))["beats_baselines"] is True
