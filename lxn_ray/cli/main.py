"""Command-line conventions every job shares, and the ``lxn`` command.

Each job takes ``--storage URI`` (default ``$LXN_STORAGE``, else ``./lxn-store``) and ``--report PATH``,
writes its JSON report there and under ``reports/<job>/`` in storage, prints a short summary on stdout,
and exits 0 - or prints one ``error:`` line on stderr and exits 1. ``jobs/*.py`` are thin wrappers
around the ``*_main`` functions here, so ``python jobs/ingest.py ...`` and ``lxn ingest ...`` are one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lxn_ray import registry
from lxn_ray.evaluation.metrics import fmt, no_better_than_chance
from lxn_ray.infra.storage import Storage, default_storage_uri

# The one error line's length cap: room for a stall diagnosis (who holds what, what waits, the trials).
ERROR_CHARS = 1500


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--storage",
        default=default_storage_uri(),
        help="where everything persistent lives: a folder, file:// or s3:// URI "
        "(default: $LXN_STORAGE, else ./lxn-store)",
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
) -> int:
    """Run ``work`` against the job's storage, then report; any failure becomes one line and exit 1.

    ``record``: also keep the report under ``reports/<job>/`` in storage (False for read-only commands,
    which must leave storage as they found it)."""
    from lxn_ray.infra import quiet

    quiet.configure(getattr(args, "verbose", False))
    new_folder = _new_local_folder(args.storage)
    try:
        storage = Storage.open(args.storage)
        report = work(storage)
        if record:
            stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
            storage.write_json(f"reports/{name}/{stamp}.json", report)
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
    except KeyboardInterrupt:
        print(f"error: {name} interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the contract: one readable line, not a traceback
        _remove_if_empty(new_folder)  # a job that failed before writing leaves no empty store behind
        cause = getattr(error, "cause", None) or error  # a Ray task's error carries the original
        message = " ".join(str(cause).split())[:ERROR_CHARS] or "no message"
        print(f"error: {name} failed: {type(cause).__name__}: {message}", file=sys.stderr)
        return 1
    return print_quietly(summary(report))


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
    """Print ``text`` and flush; a reader that went away (``| head``) ends the output quietly: the rest
    goes to /dev/null, as the Python docs advise for SIGPIPE, instead of a BrokenPipeError traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


# -- ingest -------------------------------------------------------------------------------------------
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


def sources_from_args(args: argparse.Namespace):
    """What ``ingest`` takes: the specs of ``--sources``, or ``--source`` as a lone named source; None
    when neither was given."""
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


def ingest_main(argv: Sequence[str] | None = None) -> int:
    from lxn_ray.sources.transports import UPSTREAM

    parser = job_parser(
        "Ingest one or more sources into a new immutable, deduplicated, split dataset version."
    )
    add_source_flags(parser, default_source=UPSTREAM)
    parser.add_argument(
        "--frontal-views",
        help="comma-separated views counted as frontal (default: PA,AP,AP Supine,AP erect,AP semi erect)",
    )
    args = parser.parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.data.ingest import ingest
        from lxn_ray.data.settings import IngestConfig

        config = IngestConfig()
        if args.frontal_views:
            views = tuple(v.strip() for v in args.frontal_views.split(",") if v.strip())
            config = IngestConfig(frontal_views=views)
        return ingest(sources_from_args(args), storage, config)

    return run_job("ingest", args, work, ingest_summary)


def _sources_line(report: dict[str, Any]) -> str:
    sources = report.get("sources") or {}
    if not sources:
        return ""
    parts = [f"{name} ({s['layout']}, {s['usable']} usable)" for name, s in sources.items()]
    notes = [f"    {name}: {s['patients']}\n" for name, s in sources.items() if s.get("patients")]
    return f"  sources: {', '.join(parts)}\n" + "".join(notes)


def ingest_summary(report: dict[str, Any]) -> str:
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


# -- train --------------------------------------------------------------------------------------------
def add_task_flag(parser: argparse.ArgumentParser) -> None:
    from lxn_ray.sources.tasks import BUILTIN_TASKS, DEFAULT_TASK

    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        help=f"which findings are positive, negative or unused: {', '.join(BUILTIN_TASKS)}, or a task "
        f"YAML file (default: {DEFAULT_TASK})",
    )


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every job that trains LxN shares (train, tune, retrain); defaults are the paper's."""
    add_task_flag(parser)
    parser.add_argument("--image-size", type=int, default=200, help="input side in pixels (paper: 200)")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (1.0 = the paper's LxN)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per training run (per trial)")
    parser.add_argument("--batch-size", type=int, default=20, help="global batch, split over the workers")


def add_stall_flag(parser: argparse.ArgumentParser) -> None:
    """The watchdog of every job that trains (see lxn_ray.infra.resources)."""
    from lxn_ray.infra.resources import DEFAULT_STALL_TIMEOUT_S

    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=DEFAULT_STALL_TIMEOUT_S,
        help="end the job with an error naming what holds the resources when nothing made progress for "
        "this long while the cluster could take on no new work "
        f"(default {DEFAULT_STALL_TIMEOUT_S:g}; 0: never)",
    )


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    from lxn_ray.model.network import PRECISIONS

    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="training compute precision: auto = float16 on GPUs, bfloat16 on CPUs with AVX512-BF16 or AMX "
        "(read from /proc/cpuinfo), float32 otherwise; weights, output layer and loss stay float32",
    )


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """The training recipe of one run (train, loso); defaults are the paper's
    (lxn_ray.training.train.TrainConfig)."""
    from lxn_ray.images.preprocess import EQUALIZATION_METHODS
    from lxn_ray.model.network import ARCHITECTURES, OPTIMIZERS, SCHEDULES
    from lxn_ray.training.config import SAMPLINGS

    add_precision_flag(parser)
    recipe = parser.add_argument_group("recipe (defaults: the paper's)")
    recipe.add_argument("--lr", type=float, default=1e-4, help="learning rate (peak, with a schedule)")
    recipe.add_argument("--optimizer", choices=OPTIMIZERS, default="rmsprop", help="rmsprop is the paper's")
    recipe.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule")
    recipe.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up before a cosine")
    recipe.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's decoupled weight decay")
    recipe.add_argument(
        "--patience", type=int, default=0, help="stop after this many epochs without a better val objective"
    )
    recipe.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="weighted",
        help="weighted: equation (1)'s loss weights; class-/source-balanced: balanced draws, plain loss",
    )
    recipe.add_argument("--architecture", choices=ARCHITECTURES, default="lxn", help="lxn is the paper's")
    recipe.add_argument("--trim-borders", action="store_true", help="crop uniform borders and margins first")
    recipe.add_argument(
        "--equalization", choices=EQUALIZATION_METHODS, default="none", help="histogram or CLAHE"
    )
    recipe.add_argument("--no-augment", action="store_true", help="train without augmentation")


def train_config_from_args(args: argparse.Namespace):
    """The :class:`lxn_ray.training.train.TrainConfig` of parsed training flags (train, loso); flags a job
    does not
    have keep their defaults."""
    from lxn_ray.images.preprocess import AugmentConfig, PreprocessConfig
    from lxn_ray.training.config import TrainConfig

    return TrainConfig(
        image_size=args.image_size,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        workers=getattr(args, "workers", 1),
        use_gpu=getattr(args, "gpu", False),
        precision=args.precision,
        seed=args.seed,
        task=args.task,
        optimizer=args.optimizer,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay,
        patience=args.patience,
        sampling=args.sampling,
        architecture=args.architecture,
        preprocessing=PreprocessConfig(trim_borders=args.trim_borders, equalization=args.equalization),
        **({"augment": AugmentConfig()} if args.no_augment else {}),
    )


def train_main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser(
        "Train LxN data-parallel with Ray Train on a dataset version; publish a model version."
    )
    parser.add_argument("--dataset-version", default="latest", help="dataset version id, or latest")
    add_model_flags(parser)
    add_recipe_flags(parser)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (data-parallel)")
    parser.add_argument(
        "--gpu", action="store_true", help="one GPU per worker (automatic when the cluster has GPUs)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run; by default a rerun with the same data and settings resumes",
    )
    add_stall_flag(parser)
    args = parser.parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.training.train import train

        config = train_config_from_args(args)
        report = train(
            storage, args.dataset_version, config, fresh=args.fresh, stall_timeout_s=args.stall_timeout_s
        )
        # The first model of a store becomes its champion (so it can be served at once); after that only
        # tune, retrain or `registry promote` replace a champion, by their stated rules.
        fired = report["sources"]["test"]["shortcut"]["fired"]
        report["promoted"] = registry.champion(storage) is None and not fired and not report["collapsed"]
        if report["promoted"]:
            registry.promote(storage, report["model_version"], reason="the store's first model")
        elif report["collapsed"]:
            report["not_promoted_because"] = "the model collapsed to a constant output"
        elif fired:
            report["not_promoted_because"] = "the source-shortcut check fired (registry promote can still)"
        return report

    return run_job("train", args, work, train_summary)


def _interval(ci: Sequence[float] | None) -> str:
    return f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def source_lines(evaluation: dict[str, Any]) -> list[str]:
    """The per-source, within-source and shortcut lines of a model's test split (train and tune)."""
    test = evaluation["test"]
    lines = [f"  objective ({test['objective_basis']}): {fmt(test['objective'])}"]
    for name, row in test["per_source"].items():
        within = "within" if name in test["within_source"] else "one class only"
        lines.append(
            f"    {name}: n={row['n']} ({row['positives']} positive), AUC {fmt(row['auc'])}"
            f"{_interval(row['auc_ci'])} [{within}]"
        )
    shortcut = test["shortcut"]
    checked = sum(len(checks) for checks in shortcut["classes"].values())
    if shortcut.get("warning"):
        lines.append(f"  WARNING {shortcut['warning']}")
    elif checked:
        lines.append(f"  source-shortcut check: {checked} comparison(s), none fired")
    return lines


def train_summary(report: dict[str, Any]) -> str:
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
        f"  test: AUC {fmt(test['auc'])}{_interval(test.get('auc_ci'))}{chance}, sensitivity "
        f"{fmt(test['sensitivity'])}, specificity {fmt(test['specificity'])}, n={test['n']} "
        "(patient-disjoint)",
        *(source_lines(report["sources"]) if report.get("sources") else []),
        *(f"  warning: {w}" for w in report.get("warnings", []) if not w.startswith("source shortcut")),
        f"  model: {report['checkpoint']}{promoted}",
        "  research use only - not a diagnostic device",
    ]
    return "\n".join(lines)


# -- leave-one-source-out -----------------------------------------------------------------------------
def loso_main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser(
        "Leave-one-source-out: for each source, train on the others and score every film of the one left "
        "out; held-out metrics beside internal ones. Models are registered, never promoted."
    )
    parser.add_argument("--dataset-version", default="latest", help="dataset version id, or latest")
    add_model_flags(parser)
    add_recipe_flags(parser)
    parser.add_argument("--seed", type=int, default=0)
    add_stall_flag(parser)
    args = parser.parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.training.loso import leave_one_source_out

        config = train_config_from_args(args)
        return leave_one_source_out(storage, args.dataset_version, config, args.stall_timeout_s)

    return run_job("loso", args, work, loso_summary)


def loso_summary(report: dict[str, Any]) -> str:
    lines = [f"leave-one-source-out on dataset {report['dataset_version']} ({report['task']}):"]
    for fold in report["folds"]:
        held, internal = fold["held_out_metrics"], fold["internal_test"]
        chance = "; no better than chance" if held["no_better_than_chance"] else ""
        lines += [
            f"  held out {fold['held_out']} (model {fold['model_version']}, trained on "
            f"{', '.join(fold['trained_on'])}):",
            f"    held-out: n={held['n']} ({held['positives']} positive), AUC {fmt(held['auc'])}"
            f"{_interval(held['auc_ci'])}{chance}, sensitivity {fmt(held['sensitivity'])}, "
            f"specificity {fmt(held['specificity'])} at threshold {held['threshold']:.3f}",
            f"    internal test: n={internal['n']} ({internal['positives']} positive), AUC "
            f"{fmt(internal['auc'])}{_interval(internal.get('auc_ci'))}",
        ]
    lines.append("  research use only - not a diagnostic device")
    return "\n".join(lines)


# -- evaluate -----------------------------------------------------------------------------------------
def evaluate_main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser(
        "Score other data (e.g. another hospital's films) with a model: pooled, per source, within source."
    )
    parser.add_argument("--model", default="champion", help="a model version id, champion, or a .keras path")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--source", help="folder with metadata.csv + images/")
    group.add_argument("--sources", type=Path, help="a sources YAML file (any layouts; see README: Sources)")
    parser.add_argument("--task", help="the task to score (default: the model's own)")
    args = parser.parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.evaluation.evaluate import evaluate
        from lxn_ray.sources.layouts import read_sources_file

        sources = read_sources_file(args.sources) if args.sources else args.source
        return evaluate(storage, args.model, sources, task=args.task)

    return run_job("evaluate", args, work, evaluate_summary)


SUMMARY_GROUPS = 6  # subgroup values a summary line shows; the report has them all


def _metrics_line(label: str, row: dict[str, Any]) -> str:
    chance = "; no better than chance" if no_better_than_chance(row.get("auc_ci")) else ""
    return (
        f"  {label:<22} n={row['n']} ({row['positives']} positive): AUC {fmt(row['auc'])}"
        f"{_interval(row.get('auc_ci'))}{chance}, sensitivity {fmt(row['sensitivity'])}, specificity "
        f"{fmt(row['specificity'])}"
    )


def _capped(values: dict[str, dict[str, Any]], limit: int = SUMMARY_GROUPS) -> str:
    """The ``limit`` largest groups by n, then the rest as one "other" entry."""
    ranked = sorted(values.items(), key=lambda item: (-item[1]["n"], item[0]))
    parts = [f"{value} n={m['n']} AUC {fmt(m['auc'])}" for value, m in ranked[:limit]]
    if rest := ranked[limit:]:
        parts.append(f"{len(rest)} other groups n={sum(m['n'] for _, m in rest)}")
    return "; ".join(parts)


def evaluate_summary(report: dict[str, Any]) -> str:
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
            f"{_interval(row['auc_ci'])} [{within}]"
        )
    if (report.get("shortcut") or {}).get("warning"):
        lines.append(f"  WARNING {report['shortcut']['warning']}")
    for column, values in report["subgroups"].items():
        lines.append(f"  by {column}: {_capped(values)}")
    lines.append(f"  predictions: {report['predictions']} (every subgroup: the report's subgroups)")
    return "\n".join(lines)


# -- registry -----------------------------------------------------------------------------------------
def registry_main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("Model versions and the champion: list, show, promote, rollback.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every model version with its test AUC; * marks the champion")
    commands.add_parser("show", help="a version's model card").add_argument("version")
    commands.add_parser("promote", help="make a version the champion").add_argument("version")
    commands.add_parser("rollback", help="return to the previous champion")
    args = parser.parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        if args.command == "list":
            return {
                "command": "list",
                "champion": registry.champion(storage),
                "models": registry.describe(storage),
            }
        if args.command == "show":
            return {"command": "show", "card": registry.read_card(storage, args.version)}
        if args.command == "promote":
            return {"command": "promote", **registry.promote(storage, args.version)}
        return {"command": "rollback", **registry.rollback(storage)}

    read_only = args.command in ("list", "show")
    return run_job("registry", args, work, registry_summary, record=not read_only)


def registry_summary(report: dict[str, Any]) -> str:
    if report["command"] == "list":
        lines = [f"{len(report['models'])} model versions; champion: {report['champion'] or 'none'}"]
        for row in report["models"]:
            mark = "*" if row["champion"] else " "
            chance = "  no better than chance" if row.get("no_better_than_chance") else ""
            lines.append(
                f" {mark} {row['model_version']}  {row.get('task') or 'covid-vs-rest'}  "
                f"test AUC {fmt(row['test_auc'])}{chance}  dataset {row['dataset_version']}"
            )
        return "\n".join(lines)
    if report["command"] == "show":
        return json.dumps(report["card"], indent=2)
    return f"champion is now {report['version']} (was {report['previous'] or 'none'}): {report['reason']}"


# -- tune ---------------------------------------------------------------------------------------------
def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def tune_parser() -> argparse.ArgumentParser:
    parser = job_parser(
        "Search learning rate, augmentation and the training recipe with Ray Tune over Ray Train; register "
        "the best model and promote it when it beats the champion on the same test split."
    )
    add_source_flags(parser)  # ingest these first (default: only when the store is empty)
    parser.add_argument("--num-samples", type=int, default=8, help="trials to run")
    add_model_flags(parser)
    parser.add_argument(
        "--image-sizes", type=_sizes, default=(), help="search over these sizes, e.g. 128,200"
    )
    parser.add_argument(
        "--batch-sizes", type=_sizes, default=(), help="search over these batches, e.g. 16,32"
    )
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers in each trial")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as fit)")
    parser.add_argument(
        "--searcher",
        choices=("optuna", "random"),
        default="optuna",
        help="optuna (TPE; random when optuna is not installed) or random",
    )
    add_precision_flag(parser)
    parser.set_defaults(image_size=None, epochs=None)  # the search's own defaults: TUNE_DEFAULTS
    parser.add_argument(
        "--space",
        choices=("full", "paper"),
        help="full (default): search the recipe too (optimizer, schedule, architecture, sampling, "
        "preprocessing); paper: the paper's recipe, learning rate and augmentation only",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's settings: 200 px, 10 epochs, no early stopping, the paper space",
    )
    parser.add_argument("--patience", type=int, help="early stopping in each trial (default 5; 0: off)")
    parser.add_argument(
        "--repeats", type=int, default=0, help="retrain the best config with N more seeds; report the spread"
    )
    parser.add_argument("--no-asha", action="store_true", help="let every trial run all epochs (FIFO)")
    parser.add_argument("--time-budget-s", type=float, help="stop the search after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seeds the searcher and the trials' training")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest search with these settings (default: rerunning starts a new one)",
    )
    add_stall_flag(parser)
    return parser


# What `python jobs/tune.py` with no flags searches - sized to finish on a 2-core laptop within an hour
# (bfloat16 where the CPU has it) - and what --paper searches instead.
TUNE_DEFAULTS = {"image_size": 128, "epochs": 20, "patience": 5, "space": "full"}
PAPER_DEFAULTS = {"image_size": 200, "epochs": 10, "patience": 0, "space": "paper"}


def tune_settings(args: argparse.Namespace):
    """The :class:`lxn_ray.tuning.tune.TuneSettings` of parsed ``tune`` flags (flags given win over the
    defaults of :data:`TUNE_DEFAULTS` or, with ``--paper``, :data:`PAPER_DEFAULTS`)."""
    from lxn_ray.tuning.settings import TuneSettings

    defaults = PAPER_DEFAULTS if args.paper else TUNE_DEFAULTS
    given = {key: getattr(args, key) for key in defaults if getattr(args, key) is not None}
    chosen = {**defaults, **given}
    return TuneSettings(
        num_samples=args.num_samples,
        epochs=chosen["epochs"],
        image_size=chosen["image_size"],
        patience=chosen["patience"],
        space=chosen["space"],
        precision=args.precision,
        repeats=args.repeats,
        image_sizes=args.image_sizes,
        width=args.width,
        batch_size=args.batch_size,
        batch_sizes=args.batch_sizes,
        workers_per_trial=args.workers_per_trial,
        searcher=args.searcher,
        asha=not args.no_asha,
        seed=args.seed,
        max_concurrent=args.max_concurrent,
        time_budget_s=args.time_budget_s,
        stall_timeout_s=args.stall_timeout_s,
        task=args.task,
    )


def tune_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/tune.py`` / ``lxn tune``: the job's flags, work and summary."""
    args = tune_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.tuning.tune import tune_job

        return tune_job(storage, tune_settings(args), sources_from_args(args), args.resume)

    return run_job("tune", args, work, tune_summary)


def tune_summary(report: dict[str, Any]) -> str:
    trials, best, test = report["trials"], report["best"], report["test"]
    interval = _interval(test.get("auc_ci"))
    if test.get("no_better_than_chance"):
        interval += "; NO BETTER THAN CHANCE"
    config = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["config"].items()
    )
    errored = f", {len(trials['errored'])} errored (--resume reruns them)" if trials["errored"] else ""
    if trials.get("collapsed"):
        errored += f", {trials['collapsed']} collapsed to a constant output (never chosen)"
    repeats = ""
    if report.get("repeats"):
        for key, name in (("val_objective", "val objective"), ("test_auc", "test AUC")):
            spread = report["repeats"][key]
            if spread:
                repeats += (
                    f"  over {spread['n']} seeds of the best config: {name} {spread['mean']:.3f} "
                    f"+- {spread['std']:.3f} (sd; {spread['min']:.3f}-{spread['max']:.3f})\n"
                )
    return (
        f"search on dataset {report['dataset_version']}: {trials['count']} trials "
        f"({report['searcher']}, {report['scheduler']}; {trials['completed']} completed, "
        f"{trials['stopped_early']} stopped early{errored}) in {report['seconds']} s\n"
        f"  best trial {best['trial_id']}: val objective {fmt(best['val_objective'])} with {config}\n"
        f"  model {best['model_version']} ({report.get('task', 'covid-vs-rest')}): test AUC "
        f"{fmt(test.get('auc'))}{interval}, sensitivity {fmt(test.get('sensitivity'))}, "
        f"specificity {fmt(test.get('specificity'))}, n={test.get('n')}\n"
        + repeats
        + "".join(f"{line}\n" for line in (source_lines(report["sources"]) if report.get("sources") else []))
        + "".join(
            f"  warning: {w}\n" for w in report.get("warnings", []) if not w.startswith("source shortcut")
        )
        + f"  {'promoted' if report['promoted'] else 'not promoted'}: {report['promotion_reason']}\n"
        f"  champion: {report['champion']}\n"
        f"  trials: {trials['csv']}\n  plot: {trials['plot']}\n"
        "  research use only - not a diagnostic device"
    )


# -- retrain ------------------------------------------------------------------------------------------
def retrain_parser() -> argparse.ArgumentParser:
    """``jobs/retrain.py`` flags: source and schedule, when to train, the rule's margin, the lock, and the
    training flags passed through (given ones override the champion's hyperparameters)."""
    from lxn_ray.retraining.settings import MODES, parse_duration

    def duration(text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    parser = job_parser(
        "Scheduled retraining: ingest the source, train a challenger when enough new images arrived, and "
        "promote it when it is not worse than the champion on the same test images (non-inferiority)."
    )
    add_source_flags(parser)
    schedule = parser.add_mutually_exclusive_group(required=True)
    schedule.add_argument(
        "--once", action="store_true", help="run one tick and exit (cron, Kubernetes CronJob)"
    )
    schedule.add_argument(
        "--every", type=duration, metavar="DURATION", help="tick now and then every DURATION (s, m, h, d: 6h)"
    )
    parser.add_argument(
        "--min-new-images",
        "--min-changed-rows",
        type=int,
        default=25,
        help="train when this many rows of the task changed (default 25); a correction - a row removed, "
        "relabelled, or changed in view or patient - always trains",
    )
    parser.add_argument(
        "--min-growth", type=float, help="also require new images >= this fraction of the champion's dataset"
    )
    parser.add_argument(
        "--mode", choices=MODES, default="train", help="train: champion's hyperparameters; tune: search again"
    )
    parser.add_argument(
        "--margin", type=float, default=0.05, help="non-inferiority margin on the test AUC (default 0.05)"
    )
    parser.add_argument(
        "--lock-timeout",
        type=duration,
        default=6 * 3600.0,
        metavar="DURATION",
        help="how long to wait for another run's lock (default 6h)",
    )
    parser.add_argument(
        "--lock-ttl",
        type=duration,
        default=15 * 60.0,
        metavar="DURATION",
        help="lease length; the holder renews every third of it, a dead holder's lock expires (default 15m)",
    )
    parser.add_argument("--no-wait", action="store_true", help="exit at once when another run holds the lock")
    training = parser.add_argument_group("training (default: the champion's values, else train.py's)")
    training.add_argument("--task", help="the task to train (default: the champion's, else covid-vs-rest)")
    training.add_argument("--image-size", type=int, help="input side in pixels")
    training.add_argument("--width", type=float, help="width multiplier (1.0 = the paper's LxN)")
    training.add_argument("--epochs", type=int)
    training.add_argument("--batch-size", type=int, help="global batch, split over the workers")
    training.add_argument("--lr", type=float, help="RMSprop learning rate")
    training.add_argument("--workers", type=int, help="Ray Train workers (data-parallel)")
    training.add_argument("--gpu", action="store_const", const=True, help="one GPU per worker")
    training.add_argument("--num-samples", type=int, default=8, help="--mode tune: trials to run")
    add_stall_flag(training)
    return parser


def retrain_settings(args: argparse.Namespace):
    """The :class:`lxn_ray.retraining.retrain.RetrainSettings` of parsed ``retrain`` flags."""
    from lxn_ray.retraining.settings import RetrainSettings, TrainOverrides

    sources = sources_from_args(args)
    if sources is None:
        raise ValueError("retrain needs --source or --sources")
    return RetrainSettings(
        source=args.source,
        ref=args.ref,
        sources=tuple(sources),
        mode=args.mode,
        min_new_images=args.min_new_images,
        min_growth=args.min_growth,
        margin=args.margin,
        overrides=TrainOverrides(
            image_size=args.image_size,
            width=args.width,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            workers=args.workers,
            use_gpu=args.gpu,
            task=args.task,
        ),
        num_samples=args.num_samples,
        stall_timeout_s=args.stall_timeout_s,
        lock_ttl_s=args.lock_ttl,
        lock_timeout_s=args.lock_timeout,
        wait_for_lock=not args.no_wait,
    )


def retrain_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/retrain.py`` / ``lxn retrain``: one tick (``--once``) or a schedule (``--every``)."""
    args = retrain_parser().parse_args(argv)

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.infra.cluster import SignalStop
        from lxn_ray.retraining.retrain import run_every, run_once

        settings = retrain_settings(args)
        if args.once:
            with SignalStop(graceful=False):
                return run_once(storage, settings)

        def on_report(report: dict[str, Any]) -> None:  # each tick's report, as it happens
            stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
            storage.write_json(f"reports/retrain/{stamp}.json", report)
            if args.report:
                args.report.parent.mkdir(parents=True, exist_ok=True)
                args.report.write_text(json.dumps(report, indent=2, default=str) + "\n")

        # A long-running loop attaches to Ray once, first: ray.init installs its own SIGTERM handler
        # (exit at once), which the loop's graceful handler must then replace.
        from lxn_ray.infra import cluster

        cluster.connect()
        with SignalStop(graceful=True, stopping="stopping after the current tick") as signals:
            return run_every(storage, settings, args.every, signals.event, on_report, rearm=signals.arm)

    return run_job("retrain", args, work, retrain_summary)


def retrain_summary(report: dict[str, Any]) -> str:
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


# -- serve --------------------------------------------------------------------------------------------
def serve_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/serve.py --storage URI [--model champion|VERSION] ...``: deploy, then serve until
    SIGINT/SIGTERM (or return at once with ``--detach``)."""
    from lxn_ray.serving.settings import ServeSettings

    defaults = ServeSettings(storage="-")
    parser = job_parser(
        "Serve LxN over HTTP with Ray Serve: the page at /, /predict, /predict/batch, /explain, /model, "
        "/docs. Prediction, explanation and model routes need an API key (Authorization: Bearer KEY)."
    )
    parser.add_argument(
        "--model",
        default="champion",
        help="champion (follows promotions) or a model version id / .keras path (pinned)",
    )
    parser.add_argument(
        "--task",
        help="serve only models of this task: a champion trained for another is refused (default: any)",
    )
    parser.add_argument("--host", default=defaults.host, help="HTTP address (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--route-prefix", default=defaults.route_prefix)
    parser.add_argument("--app-name", default=defaults.app_name, help="Serve application name")
    parser.add_argument("--min-replicas", type=int, default=defaults.min_replicas)
    parser.add_argument("--max-replicas", type=int, default=defaults.max_replicas)
    parser.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=defaults.target_ongoing_requests,
        help="autoscaling target: ongoing requests per replica",
    )
    parser.add_argument("--max-ongoing-requests", type=int, default=defaults.max_ongoing_requests)
    parser.add_argument("--cpus-per-replica", type=float, default=defaults.cpus_per_replica)
    parser.add_argument("--gpus-per-replica", type=float, default=defaults.gpus_per_replica)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=defaults.batch_wait_timeout_s)
    parser.add_argument(
        "--poll-seconds", type=float, default=defaults.poll_seconds, help="champion pointer poll period"
    )
    keys = parser.add_argument_group("API keys (kept in storage as SHA-256 digests, never logged)")
    keys.add_argument(
        "--mint-key",
        metavar="NAME",
        help="mint a key named NAME, save it to --key-out (mode 600) and exit; running endpoints accept it "
        "within --poll-seconds",
    )
    keys.add_argument(
        "--key-out",
        type=Path,
        help="where --mint-key saves the key (default: "
        "$LXN_CONFIG/api-keys/NAME.key, $LXN_CONFIG defaulting to ~/.config/lxn_ray)",
    )
    keys.add_argument("--revoke-key", metavar="NAME", help="remove the key named NAME and exit")
    keys.add_argument(
        "--no-auth",
        action="store_true",
        help="serve without API keys: anyone who can reach the port can call every route (local use only)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="deploy and exit, leaving the app on the running cluster (needs `ray start`: a local Ray "
        "started by this job ends with it)",
    )
    args = parser.parse_args(argv)
    if args.mint_key or args.revoke_key:
        return _manage_key(args)
    from lxn_ray.serving import auth

    try:
        digests = tuple(auth.env_digests()) if not args.no_auth else ()
        settings = ServeSettings(
            storage=args.storage,
            model=args.model,
            task=args.task,
            host=args.host,
            port=args.port,
            app_name=args.app_name,
            route_prefix=args.route_prefix,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests,
            max_ongoing_requests=args.max_ongoing_requests,
            cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_timeout_s,
            poll_seconds=args.poll_seconds,
            auth=not args.no_auth,
            api_key_digests=digests,
        )
    except ValueError as error:
        parser.error(str(error))

    from lxn_ray.infra.cluster import SignalStop

    # Armed once Ray has installed its own handlers, so a Ctrl-C that lands while Serve is still
    # starting up is remembered rather than lost; the server then shuts down as soon as it is up.
    stop = SignalStop(graceful=True, stopping="shutting Serve down")

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.infra import cluster
        from lxn_ray.serving.serve import check_model, deploy

        check_model(storage, settings.model)  # no champion / unknown version: fail before Serve starts
        cluster.connect()
        stop.arm()
        report = deploy(dataclasses.replace(settings, storage=storage.uri))
        keys = auth.describe(storage, settings.api_key_digests)
        mint = f"python jobs/serve.py --storage {args.storage} --mint-key NAME"
        access = {"on": settings.auth, "keys": keys, "mint": mint}
        return {**report, "auth": access, "detached": args.detach}

    with stop:
        code = run_job("serve", args, work, serve_summary)
        if code != 0 or args.detach:
            return code
        from ray import serve

        print("serving until SIGINT (Ctrl-C) or SIGTERM", flush=True)
        stop.arm()
        stop.event.wait()
        started = time.monotonic()
        serve.shutdown()
        print(f"{stop.received}: Serve shut down in {time.monotonic() - started:.1f} s", flush=True)
    return 0


def _manage_key(args: argparse.Namespace) -> int:
    """``--mint-key NAME`` / ``--revoke-key NAME``: change the key file in storage, then exit."""
    from lxn_ray.serving import auth

    try:
        storage = Storage.open(args.storage)
        where = storage.uri_of(auth.KEY_FILE)
        if args.revoke_key:
            if not auth.revoke(storage, args.revoke_key):
                raise auth.ApiKeyError(f"no key named {args.revoke_key!r} in {where}")
            print(f"revoked API key {args.revoke_key!r} ({where}); endpoints refuse it within a poll")
            return 0
        path = args.key_out or auth.default_key_path(args.mint_key)
        if path.expanduser().exists():
            raise auth.ApiKeyError(f"{path} exists: pick another --key-out or key name")
        key = auth.new_key()
        saved = auth.save_key(key, path)  # first the key's own file, so a failure leaves no orphan digest
        try:
            auth.register(storage, args.mint_key, key)
        except BaseException:
            saved.unlink()
            raise
    except (OSError, ValueError) as error:
        print(f"error: serve failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"minted API key {args.mint_key!r}: saved to {saved} (mode 600; it is shown nowhere else)")
    print(f"  its SHA-256 digest is in {where}; running endpoints accept it within a poll")
    print(f'  use it: curl -H "Authorization: Bearer $(cat {saved})" --data-binary @film.dcm URL/predict')
    return 0


def serve_summary(report: dict[str, Any]) -> str:
    following = "follows the champion" if report["model"] == "champion" else "pinned"
    lines = [
        f"serving model {report['model_version']} ({following}) at {report['url']}",
        f"  page {report['url']}/ ; POST /predict, /predict/batch, /explain (PNG, JPEG or DICOM); "
        f"GET /healthz, /model; docs {report['docs']}",
        f"  threshold {report['threshold']:.3f}, input {report['image_size']} px",
    ]
    access = report.get("auth") or {}
    if not access.get("on", True):
        lines.append(f"  auth: OFF (--no-auth): anyone who can reach {report['url']} can call every route")
    else:
        lines.append(f"  auth: on - send 'Authorization: Bearer KEY'; keys: {access.get('keys', '?')}")
        lines.append(
            f"  get a key: {access.get('mint')} (or set LXN_API_KEYS before starting); "
            "/healthz and the page need none"
        )
    if report.get("detached"):
        lines.append(f"  detached: stop it with `serve delete {report['app_name']}` or `serve shutdown`")
    lines.append("  research use only - not a diagnostic device")
    return "\n".join(lines)


# command -> (its main, one line for `lxn --help`), in the order data flows
COMMANDS: dict[str, tuple[Callable[[Sequence[str] | None], int], str]] = {
    "ingest": (ingest_main, "bring sources into a new immutable dataset version (duplicates, splits)"),
    "train": (train_main, "train LxN with Ray Train on a dataset version and register the model"),
    "tune": (tune_main, "search learning rate, augmentation and recipe with Ray Tune (the main job)"),
    "evaluate": (evaluate_main, "score a model on a dataset version, pooled and within each source"),
    "loso": (loso_main, "leave-one-source-out: train on the other sources, test on the one left out"),
    "retrain": (retrain_main, "ingest, retrain and promote when the data changed (once or on a schedule)"),
    "registry": (registry_main, "model versions and the champion: list, show, promote, rollback"),
    "serve": (serve_main, "serve the champion over HTTP with Ray Serve (page, API keys, DICOM)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lxn COMMAND [flags]   (the same jobs as python jobs/COMMAND.py)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "lxn COMMAND --help lists a command's flags. Research use only - not a diagnostic device."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn COMMAND [flags]``: the same jobs as ``python jobs/COMMAND.py``; ``lxn --help`` lists them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    command, _ = COMMANDS[argv[0]]
    sys.argv[0] = f"lxn {argv[0]}"  # argparse names the program after it: "usage: lxn train ..."
    return command(argv[1:])
