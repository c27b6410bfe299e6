"""``lxn retrain`` / ``jobs/retrain.py``: ingest, train a challenger when the data changed, and promote it
when it is not worse than the champion - once (``--once``) or on a schedule (``--every 6h``)
(:mod:`lxn_ray.retraining.retrain`); its flags (:class:`~lxn_ray.retraining.settings.RetrainSettings`' and
TrainConfig's, the latter defaulting to the champion's values) and summary."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from lxn_ray.cli.common import (
    add_source_flags,
    add_tracking_flag,
    job_parser,
    run_job,
    save_report,
    sources_from_args,
    write_report,
)
from lxn_ray.evaluation.metrics import fmt
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.retraining.settings import RetrainSettings, TrainOverrides, parse_duration
from lxn_ray.training.config import TrainConfig

# TrainConfig's flags that retrain passes through: not given (None) keeps the champion's value.
OVERRIDES = tuple(field.name for field in dataclasses.fields(TrainOverrides))
TRAINING_ONLY = ("num_samples", "stall_timeout_s")  # RetrainSettings' fields shown with the training flags


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def make_parser() -> argparse.ArgumentParser:
    """``retrain`` flags: source and schedule, when to train, the rule's margin, the lock, and the training
    flags passed through (given ones override the champion's hyperparameters)."""
    parser = job_parser(
        "Scheduled retraining: ingest the source, train a challenger when enough new images arrived, and "
        "promote it when it is not worse than the champion on the same test images (non-inferiority)."
    )
    add_source_flags(parser)
    add_tracking_flag(parser)
    schedule = parser.add_mutually_exclusive_group(required=True)
    schedule.add_argument(
        "--once", action="store_true", help="run one tick and exit (cron, Kubernetes CronJob)"
    )
    schedule.add_argument(
        "--every",
        type=_duration,
        metavar="DURATION",
        help="tick now and then every DURATION (s, m, h, d: 6h)",
    )
    add_flags(parser, RetrainSettings, skip=TRAINING_ONLY)
    training = parser.add_argument_group("training (default: the champion's values, else train.py's)")
    add_flags(
        training,
        TrainConfig,
        only=OVERRIDES,
        defaults=dict.fromkeys(OVERRIDES),
        help={"task": "the task to train (default: the champion's, else covid-vs-rest)"},
    )
    add_flags(training, RetrainSettings, only=TRAINING_ONLY)
    return parser


def settings(args: argparse.Namespace) -> RetrainSettings:
    """The :class:`RetrainSettings` of parsed ``retrain`` flags. Raises ``ValueError`` without a source,
    for invalid settings, and what reading a sources file raises."""
    sources = sources_from_args(args)
    if sources is None:
        raise ValueError("retrain needs --source or --sources")
    return from_args(
        RetrainSettings,
        args,
        source=args.source,
        ref=args.ref,
        sources=tuple(sources),
        overrides=from_args(TrainOverrides, args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn retrain (--once | --every DURATION) [flags]``; returns the exit code (0, 1 on failure, 2 for
    a bad flag, 130 when interrupted)."""
    args = make_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.infra.cluster import SignalStop
        from lxn_ray.retraining.retrain import run_every, run_once

        chosen = settings(args)
        if args.once:
            with SignalStop(graceful=False):
                return run_once(storage, chosen)

        def on_report(report: dict[str, Any]) -> None:  # each tick's report, as it happens
            write_report(storage, "retrain", report)
            if args.report:
                save_report(args.report, report)

        # A long-running loop attaches to Ray once, first: ray.init installs its own SIGTERM handler
        # (exit at once), which the loop's graceful handler must then replace.
        from lxn_ray.infra import cluster

        cluster.connect()
        with SignalStop(graceful=True, stopping="stopping after the current tick") as signals:
            return run_every(storage, chosen, args.every, signals.event, on_report, rearm=signals.arm)

    return run_job("retrain", args, work, summary)


def summary(report: dict[str, Any]) -> str:
    """The decision, why, both models' test metrics and the paired difference - what a person checks."""
    changed = report.get("changed_rows")
    lines = [
        f"retrain: {report['decision']} on dataset {report.get('dataset_version') or 'n/a'}"
        + (f" ({changed} changed rows of the task)" if changed is not None else "")
        + f" in {report.get('seconds', '?')} s",
        f"  {report.get('reason', '')}",
    ]
    if report.get("challenger") and report.get("trigger"):
        lines.append(f"  trained because: {report['trigger']}")
    evaluation = report.get("metrics") or {}
    for role in ("challenger", "champion"):
        m = evaluation.get(role)
        if m:
            lines.append(
                f"  {role} {m['model_version']}: objective {fmt(m.get('objective'))}, "
                f"test AUC {fmt(m['auc'])}, "
                f"sensitivity {fmt(m['sensitivity'])}, specificity {fmt(m['specificity'])} "
                f"at its threshold {m['threshold']:.3f}, n={m['n']}"
            )
    lines.append(f"  champion: {report.get('champion') or 'none'}")
    if report.get("history"):
        lines.append(f"  history: {report['history']} (plot: {report['history_plot']})")
    if schedule := report.get("schedule"):
        lines.append(f"  {schedule['ticks']} ticks: {', '.join(schedule['decisions']) or 'none'}")
    lines.append("  research use only - not a diagnostic device")
    return "\n".join(lines)
