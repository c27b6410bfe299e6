"""``lxn lungs`` / ``jobs/lungs.py``: train a lung-field segmenter (U-Net) on a masks folder with Ray Train
and register it as a segmenter version (:func:`lxn_ray.training.segmenter.train_segmenter`). Its flags
(:class:`~lxn_ray.training.segmenter.SegmenterConfig`'s and where the masks and films are) and summary."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lxn_ray.cli.common import interval, job_parser, run_job
from lxn_ray.evaluation.metrics import fmt
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.training.segmenter import SegmenterConfig


def make_parser() -> argparse.ArgumentParser:
    """The ``lungs`` flags: the masks folder, where the films are, SegmenterConfig's, ``--strict``,
    ``--fresh``."""
    parser = job_parser(
        "Train a lung-field segmenter (U-Net) with Ray Train on a folder of masks; register it."
    )
    parser.add_argument(
        "--masks", required=True, help="a folder holding masks.csv and the mask images (see docs/lungs.md)"
    )
    parser.add_argument(
        "--dataset-version",
        default="latest",
        help="the dataset version whose films, patients and splits the masks are matched with by file name",
    )
    parser.add_argument(
        "--films",
        help="a folder, git repository or bundle holding the films by file name (at its root or under "
        "images/), instead of the dataset version's copies",
    )
    parser.add_argument("--films-ref", help="git branch, tag or commit of --films")
    add_flags(parser, SegmenterConfig)
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first unusable mask row instead of skipping it"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run; by default a rerun with the same masks and settings resumes",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn lungs --masks FOLDER [flags]``; returns the exit code (0, 1 on failure, 2 for a bad flag)."""
    args = make_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.training.segmenter import train_segmenter

        return train_segmenter(
            storage,
            args.masks,
            from_args(SegmenterConfig, args),
            dataset_version=args.dataset_version,
            films=args.films,
            films_ref=args.films_ref,
            strict=args.strict,
            fresh=args.fresh,
        )

    return run_job("lungs", args, work, summary)


def summary(report: dict[str, Any]) -> str:
    """The segmenter version, films and patients per split, test Dice and IoU with intervals, time, card."""
    counts, masks, test, val = report["split_counts"], report["masks"], report["test"], report["val"]
    skipped = ", ".join(f"{n} {why}" for why, n in masks["skipped_by_reason"].items())
    return "\n".join(
        [
            f"segmenter {report['segmenter_version']} (best epoch {report['best_epoch']} of "
            f"{report['epochs_run']}, {report['seconds']} s)",
            "  films (patients): "
            + ", ".join(f"{split} {c['films']} ({c['patients']})" for split, c in counts.items()),
            f"  masks: {masks['used']} used, {masks['skipped']} skipped"
            + (f" ({skipped})" if skipped else ""),
            f"  val:  Dice {fmt(val['dice']['value'])}{interval(val['dice']['interval'])}, "
            f"IoU {fmt(val['iou']['value'])}{interval(val['iou']['interval'])}",
            f"  test: Dice {fmt(test['dice']['value'])}{interval(test['dice']['interval'])}, "
            f"IoU {fmt(test['iou']['value'])}{interval(test['iou']['interval'])} "
            f"(n={test['n_films']} films of {test['n_patients']} held-out patients; the intervals resample "
            "patients)",
            f"  card: {report['card']}",
            "  research use only - not a diagnostic device",
        ]
    )
