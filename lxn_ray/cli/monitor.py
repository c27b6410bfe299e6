"""``lxn monitor`` / ``jobs/monitor.py``: the drift job - compare the most recent summaries of what the
endpoint saw with the champion's test split (:func:`lxn_ray.serving.drift.check_drift`), write the report
(JSON, under ``reports/monitor/`` in storage) and its plot (PNG, beside it), print a short summary, and
exit by the verdict so cron or the retraining loop can act on it.

Exit codes: 0 no drift; 3 drift (the summary's first line names the statistics); 4 not enough data to
judge (too few summaries in the window, or too few films in the reference); 1 an error, one ``error:``
line (no champion, storage unreachable, ...); 2 a bad flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from lxn_ray.cli.common import job_parser, run_job
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.serving.drift import DRIFT, NO_DRIFT, NOT_ENOUGH_DATA, MonitorSettings

PLOTS = "reports/monitor"  # the plots' storage prefix, beside the reports run_job keeps


def make_parser() -> argparse.ArgumentParser:
    """The ``monitor`` flags: :class:`~lxn_ray.serving.drift.MonitorSettings`' fields and the common ones."""
    parser = job_parser(
        "Input drift: compare the most recent summaries of what the endpoint saw with the champion's test "
        f"split, one population stability index per statistic. Exit {NO_DRIFT}: no drift, {DRIFT}: "
        f"drift, {NOT_ENOUGH_DATA}: not enough data, 1: error."
    )
    add_flags(parser, MonitorSettings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn monitor [flags]``; returns the exit code (module docstring)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        settings = from_args(MonitorSettings, args)
    except ValueError as error:
        parser.error(str(error))  # exits 2, as for any bad flag
    outcome: dict[str, Any] = {}

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.serving.drift import check_drift, plot_report

        report = check_drift(storage, settings)
        if report["statistics"]:
            stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
            key = f"{PLOTS}/{stamp}-drift.png"
            storage.write_bytes(key, plot_report(report))
            report["plot"] = storage.uri_of(key)
        outcome.update(report)
        return report

    code = run_job("monitor", args, work, summary, on_ray=False)
    return outcome.get("exit_code", code) if code == 0 else code


def summary(report: dict[str, Any]) -> str:
    """The verdict first (naming the statistics that drifted), then the window, the reference and every
    statistic's PSI."""
    window, reference = report["window"], report["reference"]
    threshold = report["rule"]["threshold"]
    if report["status"] == "not enough data":
        return f"not enough data to judge drift: {report['reason']}"
    statistics = report["statistics"]
    if report["drifted"]:
        named = ", ".join(f"{name} (PSI {statistics[name]['psi']:.2f})" for name in report["drifted"])
        head = f"DRIFT: {named} past PSI {threshold:g} (Siddiqi 2006)"
    else:
        worst = max(statistics.values(), key=lambda found: found["psi"])["psi"]
        head = f"no drift: every statistic's PSI <= {threshold:g} (largest {worst:.2f})"
    span = (
        f", written {window['first_written']} to {window['last_written']}" if window["first_written"] else ""
    )
    psi = [
        f"{name} {found['psi']:.2f}{' DRIFT' if found['drifted'] else ''}"
        for name, found in statistics.items()
    ]
    lines = [
        head,
        f"  window: the last {window['rows']} summaries ({window['files']} files{span})",
        f"  reference: the {reference['split']} split of {reference['dataset_version']}, "
        f"{reference['films']} films (model {reference['model_version']}, {reference['task']})",
        "  PSI: " + ", ".join(psi),
    ]
    if report.get("plot"):
        lines.append(f"  plot: {report['plot']}")
    return "\n".join(lines)
