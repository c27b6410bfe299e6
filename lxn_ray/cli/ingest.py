"""``lxn ingest`` / ``jobs/ingest.py``: bring one or more sources into a new immutable, deduplicated, split
dataset version (:func:`lxn_ray.data.ingest.ingest`); its flags and summary."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lxn_ray.cli.common import add_source_flags, job_parser, run_job, sources_from_args
from lxn_ray.data.settings import IngestConfig
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage


def make_parser() -> argparse.ArgumentParser:
    """The ``ingest`` flags: the sources (default: the upstream repository) and IngestConfig's."""
    from lxn_ray.sources.transports import UPSTREAM

    parser = job_parser(
        "Ingest one or more sources into a new immutable, deduplicated, split dataset version."
    )
    add_source_flags(parser, default_source=UPSTREAM)
    add_flags(parser, IngestConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn ingest [flags]``; returns the exit code (0, 1 on failure, 2 for a bad flag)."""
    args = make_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.data.ingest import ingest

        return ingest(sources_from_args(args), storage, from_args(IngestConfig, args))

    return run_job("ingest", args, work, summary)


def _sources_line(report: dict[str, Any]) -> str:
    sources = report.get("sources") or {}
    if not sources:
        return ""
    parts = [f"{name} ({s['layout']}, {s['usable']} usable)" for name, s in sources.items()]
    notes = [f"    {name}: {s['patients']}\n" for name, s in sources.items() if s.get("patients")]
    return f"  sources: {', '.join(parts)}\n" + "".join(notes)


def summary(report: dict[str, Any]) -> str:
    """The new (or unchanged) version, what was excluded and why, duplicates and splits."""
    state = "new version" if report["changed"] else "unchanged"
    excluded = ", ".join(f"{reason} {count}" for reason, count in report["excluded"].items()) or "none"
    splits = ", ".join(
        f"{name} {s['images']} images/{s['patients']} patients" for name, s in report["splits"].items()
    )
    return (
        f"dataset {report['dataset_version']} ({state}) from {report['source_version']}\n"
        f"  {report['rows']} metadata rows -> {report['usable']} usable images "
        f"({report['positives']} COVID-19, {report['negatives']} other findings)\n"
        f"  excluded: {excluded}\n"
        + _sources_line(report)
        + f"  {len(report['duplicates'])} duplicates dropped "
        f"({report.get('cross_source_duplicates', 0)} across sources, "
        f"{len(report.get('label_disagreements', []))} with disagreeing labels); "
        f"{report['images_hashed']} images decoded and hashed in {report.get('seconds', '?')} s\n"
        f"  splits: {splits}"
    )
