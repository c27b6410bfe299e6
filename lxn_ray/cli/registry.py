"""``lxn registry`` / ``jobs/registry.py``: model versions and the champion - list, show, promote, rollback
(:mod:`lxn_ray.registry`); its subcommands and summary. ``list`` also lists the lung segmenters. ``list``
and ``show`` write nothing."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from lxn_ray import registry
from lxn_ray.cli.common import add_tracking_flag, interval, job_parser, run_job
from lxn_ray.evaluation.metrics import fmt, no_better_than_chance
from lxn_ray.infra.storage import Storage


def make_parser() -> argparse.ArgumentParser:
    """The ``registry`` subcommands: list, show VERSION, promote VERSION, rollback."""
    parser = job_parser("Model versions and the champion: list, show, promote, rollback.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "list", help="every model version with its test AUC (* marks the champion), then every segmenter"
    )
    commands.add_parser("show", help="a version's model card").add_argument("version")
    commands.add_parser("promote", help="make a version the champion").add_argument("version")
    commands.add_parser("rollback", help="return to the previous champion")
    add_tracking_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn registry list|show VERSION|promote VERSION|rollback``; returns the exit code (0, 1 on failure,
    2 for a bad flag)."""
    args = make_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        if args.command == "list":
            from lxn_ray.infra.tracking import Tracker
            from lxn_ray.training.tracking import mirrored_versions

            with Tracker.for_storage(storage, announce=False) as tracker:
                mirrored = mirrored_versions(tracker, storage)
            return {
                "command": "list",
                "champion": registry.champion(storage),
                "models": [
                    {**row, "mlflow": mirrored.get(row["model_version"])}
                    for row in registry.describe(storage)
                ],
                "segmenters": [
                    {
                        "version": v,
                        "test_dice": registry.read_segmenter_card(storage, v).get("test", {}).get("dice"),
                    }
                    for v in registry.list_segmenters(storage)
                ],
            }
        if args.command == "show":
            return {"command": "show", "card": registry.read_card(storage, args.version)}
        from lxn_ray.training.tracking import mirror_now

        if args.command == "promote":
            entry = registry.promote(storage, args.version)
            mirror_now(storage)  # MLflow's champion alias follows, after lxn_ray's pointer
            test = registry.read_card(storage, args.version).get("test", {})
            chance = no_better_than_chance(test.get("auc_ci"))
            return {"command": "promote", **entry, "no_better_than_chance": chance, "test": test}
        entry = registry.rollback(storage)
        mirror_now(storage)
        return {"command": "rollback", **entry}

    read_only = args.command in ("list", "show")
    return run_job("registry", args, work, summary, record=not read_only, on_ray=False)


def summary(report: dict[str, Any]) -> str:
    """``list``: a line per version (* the champion); ``show``: the card as JSON; else the new champion."""
    if report["command"] == "list":
        lines = [f"{len(report['models'])} model versions; champion: {report['champion'] or 'none'}"]
        for row in report["models"]:
            mark = "*" if row["champion"] else " "
            chance = "  no better than chance" if row.get("no_better_than_chance") else ""
            lines.append(
                f" {mark} {row['model_version']}  {row.get('task') or 'covid-vs-rest'}  "
                f"test AUC {fmt(row['test_auc'])}{chance}  dataset {row['dataset_version']}"
                + (f"  MLflow {row['mlflow']}" if row.get("mlflow") else "")
            )
        if report.get("segmenters"):
            lines.append(f"{len(report['segmenters'])} lung segmenters (latest last)")
            for row in report["segmenters"]:
                dice = row["test_dice"] or {}
                lines.append(
                    f"   {row['version']}  test Dice {fmt(dice.get('value'))}{interval(dice.get('interval'))}"
                )
        return "\n".join(lines)
    if report["command"] == "show":
        return json.dumps(report["card"], indent=2)
    line = f"champion is now {report['version']} (was {report['previous'] or 'none'}): {report['reason']}"
    if report.get("no_better_than_chance"):
        test = report.get("test") or {}
        line += (
            f"\n  warning: {report['version']} is no better than chance: test AUC {fmt(test.get('auc'))}"
            f"{interval(test.get('auc_ci'))}; the endpoint flags every answer it gives"
        )
    return line
