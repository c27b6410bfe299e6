"""``lxn tune`` / ``jobs/tune.py``: search learning rate, augmentation and the training recipe with Ray Tune
over Ray Train, register the best model and promote it when it beats the champion
(:func:`lxn_ray.tuning.tune.tune_job`); its flags (:class:`~lxn_ray.tuning.settings.TuneSettings`'s, with
this job's own defaults) and summary."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lxn_ray.cli.common import (
    add_source_flags,
    add_tracking_flag,
    baseline_lines,
    calibration_lines,
    interval,
    job_parser,
    run_job,
    saliency_lines,
    source_lines,
    sources_from_args,
)
from lxn_ray.evaluation.metrics import fmt
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.tuning.settings import TuneSettings

# What `python jobs/tune.py` with no flags searches - sized to finish on a 2-core laptop within an hour
# (bfloat16 where the CPU has it) - and what --paper searches instead. Flags given win over both.
TUNE_DEFAULTS = {"image_size": 128, "epochs": 20, "patience": 5, "space": "full"}
PAPER_DEFAULTS = {"image_size": 200, "epochs": 10, "patience": 0, "space": "paper"}


def make_parser() -> argparse.ArgumentParser:
    """The ``tune`` flags: sources to ingest first, TuneSettings' fields (those of :data:`TUNE_DEFAULTS`
    default to None: not given), ``--paper`` and ``--resume``."""
    parser = job_parser(
        "Search learning rate, augmentation and the training recipe with Ray Tune over Ray Train; register "
        "the best model and promote it when it beats the champion on the same test split."
    )
    add_source_flags(parser)  # ingest these first (default: only when the store is empty)
    add_flags(
        parser,
        TuneSettings,
        defaults=dict.fromkeys(TUNE_DEFAULTS),
        help={"patience": "early stopping in each trial (default 5; 0: off)"},
    )
    add_tracking_flag(parser)
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's settings: 200 px, 10 epochs, no early stopping, the paper space",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest search with these settings (default: rerunning starts a new one)",
    )
    return parser


def settings(args: argparse.Namespace) -> TuneSettings:
    """The :class:`TuneSettings` of parsed ``tune`` flags: flags given win over :data:`TUNE_DEFAULTS` or,
    with ``--paper``, :data:`PAPER_DEFAULTS`. Raises ``ValueError`` for invalid settings."""
    defaults = PAPER_DEFAULTS if args.paper else TUNE_DEFAULTS
    unset = {key: value for key, value in defaults.items() if getattr(args, key) is None}
    return from_args(TuneSettings, args, **unset)


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn tune [flags]``; returns the exit code (0, 1 on failure, 2 for a bad flag)."""
    args = make_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.tuning.tune import tune_job

        return tune_job(storage, settings(args), sources_from_args(args), args.resume)

    return run_job("tune", args, work, summary)


def summary(report: dict[str, Any]) -> str:
    """The trials, the best config and its model's test metrics, repeats, promotion and the files."""
    trials, best, test = report["trials"], report["best"], report["test"]
    spread = interval(test.get("auc_ci"))
    if test.get("no_better_than_chance"):
        spread += "; NO BETTER THAN CHANCE"
    config = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["config"].items()
    )
    errored = f", {len(trials['errored'])} errored (--resume reruns them)" if trials["errored"] else ""
    if trials.get("collapsed"):
        errored += f", {trials['collapsed']} collapsed to a constant output (never chosen)"
    repeats = ""
    if report.get("repeats"):
        for key, name in (("val_objective", "val objective"), ("test_auc", "test AUC")):
            seeds = report["repeats"][key]
            if seeds:
                repeats += (
                    f"  over {seeds['n']} seeds of the best config: {name} {seeds['mean']:.3f} "
                    f"+- {seeds['std']:.3f} (sd; {seeds['min']:.3f}-{seeds['max']:.3f})\n"
                )
    return (
        f"search on dataset {report['dataset_version']}: {trials['count']} trials "
        f"({report['searcher']}, {report['scheduler']}; {trials['completed']} completed, "
        f"{trials['stopped_early']} stopped early{errored}) in {report['seconds']} s\n"
        f"  best trial {best['trial_id']}: val objective {fmt(best['val_objective'])} with {config}\n"
        + _selection_line(report.get("selection"))
        + f"  model {best['model_version']} ({report.get('task', 'covid-vs-rest')}): test AUC "
        f"{fmt(test.get('auc'))}{spread}, sensitivity {fmt(test.get('sensitivity'))}, "
        f"specificity {fmt(test.get('specificity'))}, n={test.get('n')}\n"
        + repeats
        + "".join(f"{line}\n" for line in (source_lines(report["sources"]) if report.get("sources") else []))
        + "".join(
            f"{line}\n"
            for line in (*baseline_lines(report), *saliency_lines(report), *calibration_lines(report))
        )
        + "".join(
            f"  warning: {w}\n" for w in report.get("warnings", []) if not w.startswith("source shortcut")
        )
        + f"  {'promoted' if report['promoted'] else 'not promoted'}: {report['promotion_reason']}\n"
        f"  champion: {report['champion']}\n"
        f"  trials: {trials['csv']}\n  search plot: {trials['plot']}\n"
        + _model_files_line(report.get("model_files"))
        + "  research use only - not a diagnostic device"
    )


def _selection_line(selection: dict[str, Any] | None) -> str:
    """How the best trial was chosen, when the val split was too small to rank trials ("" otherwise)."""
    if not selection or not selection.get("tolerance"):
        return ""
    split = (
        f"a val split of {selection['val_positives']} positive and {selection['val_negatives']} negative "
        f"films ranks trials only {selection['tolerance']:.3f} apart (one standard error)"
    )
    if len(selection["tied"]) == 1:
        return f"  {split}; no other trial came that close to the best\n"
    return (
        f"  {split}: {len(selection['tied'])} trials tied, and the one-standard-error rule published the "
        "one that trained the most epochs\n"
    )


def _model_files_line(files: dict[str, str] | None) -> str:
    """Where the published model's card and plots are ("" for a report without them)."""
    if not files:
        return ""
    plots = f"{files['plots']}/ (training curves, ROC, confusion matrix)"
    return f"  model card: {files['card']}\n  model plots: {plots}\n"
