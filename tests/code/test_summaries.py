"""What a person reads after a job: the shortcut warning, the chance label and per-source lines."""

from lxn_ray.cli.registry import summary as registry_summary
from lxn_ray.cli.train import summary as train_summary


def _report(fired: bool, chance: bool) -> dict:
    shortcut = {
        "rule": "r",
        "fired": fired,
        "classes": {"no finding": [{"source": "a", "versus": ["b"], "auc": 0.9, "fired": fired}]},
        "skipped": [],
        "warning": "source shortcut: inside the no finding class the score tells a from b" if fired else None,
    }
    split = {
        "pooled": {"n": 40, "positives": 10, "auc": 0.7, "auc_ci": [0.5, 0.9]},
        "per_source": {
            "a": {"n": 20, "positives": 10, "auc": 0.6, "auc_ci": [0.4, 0.8]},
            "b": {"n": 20, "positives": 0, "auc": None, "auc_ci": None},
        },
        "within_source": {"a": {"n": 20, "positives": 10, "auc": 0.6, "auc_ci": [0.4, 0.8]}},
        "objective": 0.6,
        "objective_basis": "mean within-source AUC over a",
        "shortcut": shortcut,
    }
    test = {"auc": 0.7, "auc_ci": [0.45, 0.9], "no_better_than_chance": chance, "sensitivity": 0.5}
    return {
        "model_version": "m",
        "dataset_version": "d",
        "task": "covid-vs-normal",
        "best_epoch": 1,
        "seconds": 1.0,
        "threshold": 0.5,
        "val": {"auc": 0.6, "sensitivity": 0.5, "specificity": 0.5},
        "test": {**test, "specificity": 0.5, "n": 40},
        "sources": {"test": split, "warnings": []},
        "warnings": ["the val split holds 3 COVID-19 image(s) (< 20): its metrics are noise"],
        "checkpoint": "x/model.keras",
    }


def test_train_summary_prints_the_shortcut_warning_only_when_it_fires():
    fired = train_summary(_report(fired=True, chance=True))
    assert "WARNING source shortcut" in fired and "NO BETTER THAN CHANCE" in fired
    assert "a: n=20 (10 positive), AUC 0.600" in fired and "[within]" in fired and "[one class only]" in fired
    assert "mean within-source AUC over a" in fired and "(< 20)" in fired
    quiet = train_summary(_report(fired=False, chance=False))
    assert "WARNING" not in quiet and "CHANCE" not in quiet and "none fired" in quiet


def test_registry_listing_labels_chance_models():
    row = {"model_version": "m", "champion": True, "test_auc": 0.5, "dataset_version": "d"}
    listing = registry_summary(
        {"command": "list", "champion": "m", "models": [{**row, "no_better_than_chance": True, "task": "t"}]}
    )
    assert "no better than chance" in listing and " t " in listing
