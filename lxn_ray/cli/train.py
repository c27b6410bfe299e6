"""``lxn train`` / ``jobs/train.py``: train LxN with Ray Train on a dataset version and publish a model
version (:func:`lxn_ray.training.train.train`); the first model of a store becomes its champion. Its flags
(:class:`~lxn_ray.training.config.TrainConfig`'s) and summary."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lxn_ray import registry
from lxn_ray.cli.common import (
    add_stall_flag,
    add_tracking_flag,
    baseline_lines,
    calibration_lines,
    interval,
    job_parser,
    run_job,
    saliency_lines,
    source_lines,
)
from lxn_ray.evaluation.metrics import fmt
from lxn_ray.evaluation.promotion import guard
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.tracking import mirror_now

# TrainConfig's fields that both jobs training one recipe take as flags (train, loso; tune and retrain
# have settings of their own), and the recipe itself, shown in its own group.
MODEL_FIELDS = ("task", "image_size", "width", "epochs", "batch_size", "precision")
RECIPE_FIELDS = (
    "learning_rate",
    "optimizer",
    "schedule",
    "warmup_epochs",
    "weight_decay",
    "patience",
    "sampling",
    "architecture",
    "trim_borders",
    "equalization",
    "lungs",
    "segmenter",
    "augment",
)


def add_train_flags(parser: argparse.ArgumentParser, fields: Sequence[str]) -> None:
    """``--dataset-version``, TrainConfig's ``fields``, its recipe (:data:`RECIPE_FIELDS`, in a group of
    their own) and the watchdog: the flags of a job that trains one recipe (train, loso). Defaults are the
    paper's."""
    parser.add_argument("--dataset-version", default="latest", help="dataset version id, or latest")
    add_flags(parser, TrainConfig, only=fields)
    add_flags(parser.add_argument_group("recipe (defaults: the paper's)"), TrainConfig, only=RECIPE_FIELDS)
    add_stall_flag(parser)


def make_parser() -> argparse.ArgumentParser:
    """The ``train`` flags: TrainConfig's (its ``sources`` aside), the watchdog, ``--fresh``."""
    parser = job_parser(
        "Train LxN data-parallel with Ray Train on a dataset version; publish a model version."
    )
    add_train_flags(parser, (*MODEL_FIELDS, "workers", "use_gpu", "seed"))
    add_tracking_flag(parser)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run; by default a rerun with the same data and settings resumes",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn train [flags]``; returns the exit code (0, 1 on failure, 2 for a bad flag)."""
    args = make_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.training.train import train

        config = from_args(TrainConfig, args)
        report = train(
            storage, args.dataset_version, config, fresh=args.fresh, stall_timeout_s=args.stall_timeout_s
        )
        # The first model of a store becomes its champion (so it can be served at once) when it passes
        # promotion's guard; after that only tune, retrain or `registry promote` replace a champion.
        version = report["model_version"]
        refused = guard(version, report["collapsed"], report["sources"]["test"]["shortcut"], report["test"])
        report["promoted"] = registry.champion(storage) is None and refused is None
        if report["promoted"]:
            registry.promote(storage, version, reason="the store's first model")
            mirror_now(storage)  # MLflow's champion alias follows
        elif refused:
            report["not_promoted_because"] = refused
        return report

    return run_job("train", args, work, summary)


def summary(report: dict[str, Any]) -> str:
    """The model version, its recipe, threshold, val and test metrics, per-source lines and warnings."""
    val, test = report["val"], report["test"]
    chance = (
        "; NO BETTER THAN CHANCE (the interval includes 0.5)" if test.get("no_better_than_chance") else ""
    )
    promoted = ""
    if report.get("promoted"):
        promoted = " (now the champion: the first model in this store)"
    elif report.get("not_promoted_because"):
        promoted = f" (not promoted: {report['not_promoted_because']})"
    lines = [
        f"model {report['model_version']} for {report.get('task', 'covid-vs-rest')} on dataset "
        f"{report['dataset_version']} (best epoch {report['best_epoch']}, {report['seconds']} s)",
        *(
            [
                f"  recipe: {report['recipe']}; trained in {report['precision']['training']} "
                f"(inference {report['precision']['inference']}), "
                f"{report['epochs_run']} epochs run"
                + (f" (stopped: {report['stopped']})" if report["stopped"] else "")
            ]
            if "recipe" in report
            else []
        ),
        *(
            ["  COLLAPSED: the output is one constant (or not finite); lower the learning rate"]
            if report.get("collapsed")
            else []
        ),
        f"  threshold {report['threshold']:.3f} (Youden's J on val)",
        f"  val:  AUC {fmt(val['auc'])}, sensitivity {fmt(val['sensitivity'])}, "
        f"specificity {fmt(val['specificity'])}",
        f"  test: AUC {fmt(test['auc'])}{interval(test.get('auc_ci'))}{chance}, sensitivity "
        f"{fmt(test['sensitivity'])}, specificity {fmt(test['specificity'])}, n={test['n']} "
        "(patient-disjoint)",
        *(source_lines(report["sources"]) if report.get("sources") else []),
        *baseline_lines(report),
        *saliency_lines(report),
        *calibration_lines(report),
        *(f"  warning: {w}" for w in report.get("warnings", []) if not w.startswith("source shortcut")),
        f"  model: {report['checkpoint']}{promoted}",
        "  research use only - not a diagnostic device",
    ]
    return "\n".join(lines)
