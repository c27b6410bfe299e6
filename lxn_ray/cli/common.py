"""What every command shares: ``--storage``/``--report``/``--verbose`` (:func:`job_parser`), running the job
with its one ``error:`` line and exit code (:func:`run_job`), the source and watchdog flags, and the
per-source lines of a summary.

Each job takes ``--storage URI`` (default ``$LXN_STORAGE``, else ``./lxn-store``) and ``--report PATH``,
writes its JSON report there and under ``reports/<job>/`` in storage, prints a short summary on stdout,
and exits 0 - or prints one ``error:`` line on stderr and exits 1 (130 when interrupted; 2 for a bad flag,
from argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lxn_ray.evaluation.metrics import fmt
from lxn_ray.infra.settings import add_flags
from lxn_ray.infra.storage import Storage, default_storage_uri

# The one error line's length cap: room for a stall diagnosis (who holds what, what waits, the trials).
ERROR_CHARS = 1500


def job_parser(description: str) -> argparse.ArgumentParser:
    """A command's parser with the flags every job takes: ``--storage``, ``--report``, ``--verbose``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--storage",
        default=default_storage_uri(),
        help="where everything persistent lives: a folder, file:// or s3:// URI "
        "(default: $LXN_STORAGE, else ./lxn-store)",
    )
    parser.add_argument(
        "--shared-storage",
        action="store_true",
        help="the local --storage folder is mounted at the same path on every node of the Ray cluster (NFS, "
        "EFS); without it a local folder on a multi-node cluster is refused (use s3://)",
    )
    parser.add_argument("--report", type=Path, help="also write the job's JSON report to this file")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print every library's output too (TensorFlow, Ray Data, Ray Train); default: the job's own "
        "lines and the warnings that matter",
    )
    return parser


def run_job(
    name: str,
    args: argparse.Namespace,
    work: Callable[[Storage], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
    record: bool = True,
    on_ray: bool = True,
) -> int:
    """Run ``work`` against the job's storage, then report; returns the exit code.

    A job ``on_ray`` (all but ``registry``) first refuses a local store on a multi-node cluster
    (:func:`lxn_ray.infra.cluster.require_reachable_storage`), before it touches storage. The report goes
    to ``--report`` and, when ``record``, under ``reports/<name>/`` in storage (False for read-only
    commands, which must leave storage as they found it); then ``summary(report)`` is printed: 0. Any
    exception becomes one ``error: <name> failed: <Type>: <message>`` line on stderr: 1 (a store
    folder the job created and left empty is removed). Ctrl-C: ``error: <name> interrupted``, 130.
    ``--mlflow-uri``, where the job has it, holds while it runs."""
    from lxn_ray.infra import quiet
    from lxn_ray.infra.tracking import TrackingSettings

    quiet.configure(getattr(args, "verbose", False))
    with TrackingSettings(getattr(args, "mlflow_uri", None) or "").applied():
        return _run_job(name, args, work, summary, record, on_ray)


def _run_job(
    name: str,
    args: argparse.Namespace,
    work: Callable[[Storage], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
    record: bool,
    on_ray: bool,
) -> int:
    new_folder = _new_local_folder(args.storage)
    try:
        if on_ray:
            from lxn_ray.infra.cluster import require_reachable_storage

            require_reachable_storage(args.storage, getattr(args, "shared_storage", False))
        storage = Storage.open(args.storage)
        report = work(storage)
        saved = []
        if record:
            saved.append(write_report(storage, name, report))
        if args.report:
            save_report(args.report, report)
            saved.append(str(args.report))
    except KeyboardInterrupt:
        print(f"error: {name} interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the contract: one readable line, not a traceback
        _remove_if_empty(new_folder)  # a job that failed before writing leaves no empty store behind
        cause = getattr(error, "cause", None) or error  # a Ray task's error carries the original
        message = " ".join(str(cause).split())[:ERROR_CHARS] or "no message"
        print(f"error: {name} failed: {type(cause).__name__}: {message}", file=sys.stderr)
        return 1
    text = summary(report)
    if saved and not text.lstrip().startswith(("{", "[")):  # not after JSON (`registry show`)
        text += f"\n  report: {' and '.join(saved)}"
    return print_quietly(text)


def write_report(storage: Storage, name: str, report: dict[str, Any]) -> str:
    """Keep ``report`` as ``reports/<name>/<UTC stamp>.json`` in storage; returns its URI."""
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
    storage.write_json(f"reports/{name}/{stamp}.json", report)
    return storage.uri_of(f"reports/{name}/{stamp}.json")


def save_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as indented JSON to ``path`` (the ``--report`` file), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _new_local_folder(uri: str) -> Path | None:
    """The local folder ``uri`` names when it does not exist yet (the job would create it), else None."""
    if "://" in uri and not uri.startswith("file://"):
        return None
    folder = Path(uri.removeprefix("file://")).expanduser().resolve()
    return None if folder.exists() else folder


def _remove_if_empty(folder: Path | None) -> None:
    """Remove ``folder`` when it holds no file (only empty folders, if any)."""
    if folder is None or not folder.is_dir() or any(path.is_file() for path in folder.rglob("*")):
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rmdir()
    folder.rmdir()


def print_quietly(text: str) -> int:
    """Print ``text`` and flush; returns 0. A reader that went away (``| head``) ends the output quietly:
    the rest goes to /dev/null, as the Python docs advise for SIGPIPE, instead of a BrokenPipeError
    traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


# -- flags more than one command takes ----------------------------------------------------------------
def add_source_flags(parser: argparse.ArgumentParser, default_source: str | None = None) -> None:
    """``--source``/``--ref`` (one source in the upstream layout) or ``--sources FILE`` (several, named)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--source",
        default=default_source,
        help="a folder with metadata.csv + images/, or a git URL, path or bundle; LAYOUT=LOCATION for "
        "another layout, e.g. dicom=DIR (a folder of DICOM films with a manifest.csv or class folders)"
        + (f" (default: {default_source})" if default_source else ""),
    )
    group.add_argument(
        "--sources",
        type=Path,
        help="a YAML file listing several named sources and their layouts (see README: Sources)",
    )
    parser.add_argument("--ref", help="git branch, tag or commit of --source (default: the remote's HEAD)")
    parser.add_argument(
        "--source-name",
        help="the name of a lone --source (default: ieee8023, or the layout's name for LAYOUT=LOCATION)",
    )


def sources_from_args(args: argparse.Namespace) -> list | None:
    """What ``ingest`` takes: the ``SourceSpec`` list of ``--sources``, or ``--source`` as a lone named
    source; None when neither was given. Raises ``ValueError`` for ``--ref`` with ``--sources``, and what
    reading the sources file raises (``SourceError``)."""
    from lxn_ray.sources.layouts import DEFAULT_SOURCE_NAME, LAYOUTS, SourceSpec, read_sources_file

    if args.sources:
        if args.ref:
            raise ValueError("--ref goes with --source; in a sources file give each source its own ref:")
        return read_sources_file(args.sources)
    if args.source:
        layout, uri = "upstream", args.source
        prefix, equals, rest = args.source.partition("=")
        if equals and prefix in LAYOUTS and prefix != "auto" and "/" not in prefix:
            layout, uri = prefix, rest
            if "://" not in uri:
                uri = str(Path(uri).expanduser().resolve())
        name = args.source_name or (DEFAULT_SOURCE_NAME if layout == "upstream" else layout)
        return [SourceSpec(name=name, uri=uri, ref=args.ref, layout=layout)]
    return None


def add_tracking_flag(parser: argparse.ArgumentParser) -> None:
    """``--mlflow-uri``: where a job that trains, publishes or promotes logs to MLflow
    (:class:`lxn_ray.infra.tracking.TrackingSettings`; :func:`run_job` applies it)."""
    from lxn_ray.infra.tracking import TrackingSettings

    add_flags(parser, TrackingSettings)


def add_stall_flag(parser: argparse.ArgumentParser) -> None:
    """``--stall-timeout-s``: the watchdog of a job that trains outside a settings class (train, loso; see
    lxn_ray.infra.resources). Tune and retrain take it as a field of their settings."""
    from lxn_ray.infra.resources import DEFAULT_STALL_TIMEOUT_S
    from lxn_ray.training.config import STALL_TIMEOUT_HELP

    parser.add_argument(
        "--stall-timeout-s", type=float, default=DEFAULT_STALL_TIMEOUT_S, help=STALL_TIMEOUT_HELP
    )


# -- summary lines more than one command prints ------------------------------------------------------
def interval(ci: Sequence[float] | None) -> str:
    """`` (95% CI 0.612-0.804)`` for a two-number interval; "" when there is none."""
    return f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def source_lines(evaluation: dict[str, Any]) -> list[str]:
    """The per-source, within-source and shortcut lines of a model's test split (train and tune)."""
    test = evaluation["test"]
    lines = [f"  objective ({test['objective_basis']}): {fmt(test['objective'])}"]
    for name, row in test["per_source"].items():
        within = "within" if name in test["within_source"] else "one class only"
        lines.append(
            f"    {name}: n={row['n']} ({row['positives']} positive), AUC {fmt(row['auc'])}"
            f"{interval(row['auc_ci'])} [{within}]"
        )
    shortcut = test["shortcut"]
    checked = sum(len(checks) for checks in shortcut["classes"].values())
    if shortcut.get("warning"):
        lines.append(f"  WARNING {shortcut['warning']}")
    elif checked:
        lines.append(f"  source-shortcut check: {checked} comparison(s), none fired")
    return lines


def baseline_lines(report: dict[str, Any]) -> list[str]:
    """The shortcut baselines beside a model's test AUC (train and tune; nothing for a report without)."""
    from lxn_ray.evaluation.baselines import describe

    shortcut = report.get("baselines")
    if not shortcut:
        return []
    beats = (shortcut.get("model") or {}).get("beats_baselines")
    verdict = {True: "; the model beats them", False: "; the model does NOT beat them"}.get(beats, "")
    return [f"  shortcut baselines (test AUC given only): {describe(shortcut)}{verdict}"]


def saliency_lines(report: dict[str, Any]) -> list[str]:
    """The share of the model's Grad-CAM mass inside the lung fields over the test films."""
    looked = report.get("saliency")
    if not looked:
        return []
    if not looked.get("measured"):
        return [f"  saliency inside the lungs: not measured ({looked.get('reason')})"]
    return [
        f"  saliency inside the lungs: {looked['mean']:.0%} of the Grad-CAM mass on average (sd "
        f"{looked['sd']:.0%}, n={looked['n']}; the lungs cover {looked['lung_area']:.0%} of the image)"
    ]


def calibration_lines(report: dict[str, Any]) -> list[str]:
    """How a model's probabilities were calibrated, and Brier and ECE on test before and after."""
    calibrated = report.get("calibration")
    if not calibrated:
        return []
    test = calibrated["test"]
    return [
        f"  calibrated on val (Platt scaling, slope {calibrated['slope']:.2f}, intercept "
        f"{calibrated['intercept']:.2f}): test Brier "
        f"{fmt(test['brier'])} (uncalibrated {fmt(test['brier_uncalibrated'])}), ECE {fmt(test['ece'])} "
        f"(uncalibrated {fmt(test['ece_uncalibrated'])})"
    ]
