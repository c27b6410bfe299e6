"""``lxn evaluate`` / ``jobs/evaluate.py``: score other data (e.g. another hospital's films) with a model -
pooled, per source, within source, by subgroup (:func:`lxn_ray.evaluation.evaluate.evaluate`); its flags and
summary."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lxn_ray.cli.common import interval, job_parser, run_job
from lxn_ray.evaluation.metrics import fmt, no_better_than_chance
from lxn_ray.infra.storage import Storage

SUMMARY_GROUPS = 6  # subgroup values a summary line shows; the report has them all


def make_parser() -> argparse.ArgumentParser:
    """The ``evaluate`` flags: the model, the data (one folder or a sources file) and the task."""
    parser = job_parser(
        "Score other data (e.g. another hospital's films) with a model: pooled, per source, within source."
    )
    parser.add_argument("--model", default="champion", help="a model version id, champion, or a .keras path")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--source", help="folder with metadata.csv + images/")
    group.add_argument("--sources", type=Path, help="a sources YAML file (any layouts; see README: Sources)")
    parser.add_argument("--task", help="the task to score (default: the model's own)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn evaluate --source DIR | --sources FILE [flags]``; returns the exit code (0, 1 on failure, 2
    for a bad flag)."""
    args = make_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.evaluation.evaluate import evaluate
        from lxn_ray.sources.layouts import read_sources_file

        sources = read_sources_file(args.sources) if args.sources else args.source
        return evaluate(storage, args.model, sources, task=args.task)

    return run_job("evaluate", args, work, summary)


def _metrics_line(label: str, row: dict[str, Any]) -> str:
    chance = "; no better than chance" if no_better_than_chance(row.get("auc_ci")) else ""
    return (
        f"  {label:<22} n={row['n']} ({row['positives']} positive): AUC {fmt(row['auc'])}"
        f"{interval(row.get('auc_ci'))}{chance}, sensitivity {fmt(row['sensitivity'])}, specificity "
        f"{fmt(row['specificity'])}"
    )


def _capped(values: dict[str, dict[str, Any]], limit: int = SUMMARY_GROUPS) -> str:
    """The ``limit`` largest groups by n, then the rest as one "other" entry."""
    ranked = sorted(values.items(), key=lambda item: (-item[1]["n"], item[0]))
    parts = [f"{value} n={m['n']} AUC {fmt(m['auc'])}" for value, m in ranked[:limit]]
    if rest := ranked[limit:]:
        parts.append(f"{len(rest)} other groups n={sum(m['n'] for _, m in rest)}")
    return "; ".join(parts)


def summary(report: dict[str, Any]) -> str:
    """Pooled metrics, the same without films that duplicate training images, per source, subgroups."""
    lines = [
        f"model {report['model_version']} ({report.get('task', 'covid-vs-rest')}) on {report['source']}: "
        f"threshold {report['threshold']:.3f} from the model's validation",
        _metrics_line("all films", report),
    ]
    overlap, unseen = report.get("overlap_with_training"), report.get("not_overlapping")
    if overlap is None:
        lines.append("  overlap with the model's training images: not checked (its dataset is not here)")
    elif unseen is None:
        lines.append(f"  every film ({overlap}) duplicates a training image: no film is new to the model")
    else:
        lines.append(_metrics_line("not in training", unseen["pooled"]))
        lines.append(f"  ({overlap} films duplicate the model's training images; read the second line)")
    for name, row in report.get("per_source", {}).items():
        within = "within" if name in report.get("within_source", {}) else "one class only"
        lines.append(
            f"    {name}: n={row['n']} ({row['positives']} positive), AUC {fmt(row['auc'])}"
            f"{interval(row['auc_ci'])} [{within}]"
        )
    if (report.get("shortcut") or {}).get("warning"):
        lines.append(f"  WARNING {report['shortcut']['warning']}")
    for column, values in report["subgroups"].items():
        lines.append(f"  by {column}: {_capped(values)}")
    lines.append(f"  predictions: {report['predictions']} (every subgroup: the report's subgroups)")
    return "\n".join(lines)
