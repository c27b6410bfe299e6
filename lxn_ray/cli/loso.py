"""``lxn loso`` / ``jobs/loso.py``: leave-one-source-out - for each source, train on the others and score
the one left out (:func:`lxn_ray.training.loso.leave_one_source_out`); its flags and summary."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lxn_ray.cli.common import interval, job_parser, run_job
from lxn_ray.cli.train import MODEL_FIELDS, add_train_flags
from lxn_ray.evaluation.metrics import fmt
from lxn_ray.infra.settings import from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.training.config import TrainConfig


def make_parser() -> argparse.ArgumentParser:
    """The ``loso`` flags: TrainConfig's but ``--workers``/``--gpu`` (one worker per fold), the watchdog."""
    parser = job_parser(
        "Leave-one-source-out: for each source, train on the others and score every film of the one left "
        "out; held-out metrics beside internal ones. Models are registered, never promoted."
    )
    add_train_flags(parser, (*MODEL_FIELDS, "seed"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn loso [flags]``; returns the exit code (0, 1 on failure, 2 for a bad flag)."""
    args = make_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.training.loso import leave_one_source_out

        config = from_args(TrainConfig, args)
        return leave_one_source_out(storage, args.dataset_version, config, args.stall_timeout_s)

    return run_job("loso", args, work, summary)


def summary(report: dict[str, Any]) -> str:
    """Each fold: the held-out source's metrics beside the internal test split's."""
    lines = [f"leave-one-source-out on dataset {report['dataset_version']} ({report['task']}):"]
    for fold in report["folds"]:
        held, internal = fold["held_out_metrics"], fold["internal_test"]
        chance = "; no better than chance" if held["no_better_than_chance"] else ""
        lines += [
            f"  held out {fold['held_out']} (model {fold['model_version']}, trained on "
            f"{', '.join(fold['trained_on'])}):",
            f"    held-out: n={held['n']} ({held['positives']} positive), AUC {fmt(held['auc'])}"
            f"{interval(held['auc_ci'])}{chance}, sensitivity {fmt(held['sensitivity'])}, "
            f"specificity {fmt(held['specificity'])} at threshold {held['threshold']:.3f}",
            f"    internal test: n={internal['n']} ({internal['positives']} positive), AUC "
            f"{fmt(internal['auc'])}{interval(internal.get('auc_ci'))}",
        ]
    lines.append("  research use only - not a diagnostic device")
    return "\n".join(lines)
