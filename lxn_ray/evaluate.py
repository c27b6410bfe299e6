"""Scoring other data with a model version: how other hospitals' films are judged.

The data is a folder in the upstream layout (``--source``) or the named sources of a sources file
(``--sources``, any layout), labelled by exactly the ingest rules and the model's task, preprocessed by
the same function as training, and scored at the threshold the model chose on its own validation split
(never re-tuned on the data being judged). Images that duplicate the model's training images - found by
the same duplicate detection as ingest - are scored but counted, since they flatter the result. Metrics
are given pooled, per source and within each source holding both classes, with the source-shortcut
check (:func:`lxn_ray.metrics.shortcut_check`), and broken down per view, sex and site.
"""

from __future__ import annotations

import csv
import io
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lxn_ray import dataset, metrics, plots
from lxn_ray.dedupe import FINGERPRINT_VERSION, find_duplicates, fingerprint
from lxn_ray.imaging import ImageLimits, ImageRejected, decode_image, to_grayscale
from lxn_ray.ingest import Exclusion, read_files
from lxn_ray.layouts import SourceSpec, read_rows
from lxn_ray.metadata import UNREADABLE
from lxn_ray.model import predict_probabilities
from lxn_ray.registry import ModelRef, resolve
from lxn_ray.storage import Storage
from lxn_ray.tasks import resolve_task

EVALUATIONS = "evaluations"
SUBGROUP_COLUMNS = ("view", "sex", "location", "source")


def log(message: str) -> None:
    print(f"[evaluate {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def evaluate(
    storage: Storage,
    model_reference: str,
    sources: str | list[SourceSpec],
    limits: ImageLimits | None = None,
    task: str | None = None,
) -> dict:
    """Score ``sources`` (a folder in the upstream layout, or the specs of a sources file) with the model
    named by ``model_reference`` for ``task`` (default: the model's own); returns the report."""
    limits = limits or ImageLimits()
    from lxn_ray.preprocess import preprocess_bytes

    model_ref = resolve(storage, model_reference)
    model = model_ref.load()
    image_size = int(model.input_shape[1])  # the model says what it was trained on
    task_of = resolve_task(task or model_ref.card.get("task") or model_ref.card.get("config", {}).get("task"))
    if isinstance(sources, (str, Path)):
        name = Path(sources).expanduser().resolve().name or "folder"
        sources = [SourceSpec(name=name, uri=str(sources), layout="upstream")]
    exclusions: list[Exclusion] = []
    files = []
    descriptions = []
    for spec in sources:
        snapshot = spec.open().open()
        descriptions.append(snapshot.description)
        rows = read_rows(snapshot, spec).rows
        exclusions += [Exclusion(row, row.exclusion, row.detail) for row in rows if row.exclusion]
        used = [row for row in rows if not row.exclusion and task_of.label_of(row.finding) is not None]
        found, unreadable = read_files(snapshot, used, limits, keep_bytes=True)
        files += found
        exclusions += unreadable

    scored, inputs, fingerprints = [], [], {}
    for item in files:
        try:
            inputs.append(
                preprocess_bytes(item.data, image_size, limits, preprocessing=model_ref.preprocessing)
            )
            fingerprints[item.row.filename] = fingerprint(to_grayscale(decode_image(item.data, limits).image))
            scored.append(item)
        except ImageRejected as error:
            exclusions.append(Exclusion(item.row, UNREADABLE, str(error)))
    if not scored:
        raise ValueError(
            f"{', '.join(descriptions)}: no usable image to score ({len(exclusions)} rows excluded)"
        )
    log(f"scoring {len(scored)} images with model {model_ref.version or model_reference} at {image_size} px")
    probabilities = predict_probabilities(model, inputs)
    labels = np.array([task_of.label_of(item.row.finding) for item in scored], dtype=np.int64)
    groups = [item.row.source for item in scored]
    threshold = model_ref.threshold
    overall = metrics.binary_metrics(labels, probabilities, threshold)
    by_source = metrics.group_metrics(labels, probabilities, groups, threshold)
    shortcut = metrics.shortcut_check(labels, probabilities, groups)
    overlap = _overlap_with_training(storage, model_ref, fingerprints)

    stamp = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    prefix = f"{EVALUATIONS}/{stamp}-{model_ref.version or 'file'}"
    predictions_key = f"{prefix}/predictions.csv"
    storage.write_text(predictions_key, _predictions_csv(scored, labels, probabilities, threshold, overlap))
    curves = {"pooled": (labels, probabilities), **plots.within_source_curves(labels, probabilities, groups)}
    storage.write_bytes(f"{prefix}/roc.png", plots.roc(curves, threshold))
    storage.write_bytes(f"{prefix}/confusion.png", plots.confusion_matrix(overall.confusion, "folder"))
    report = {
        "model_version": model_ref.version,
        "task": task_of.name,
        "source": ", ".join(descriptions),
        "n": int(len(scored)),
        "positives": int(labels.sum()),
        "auc": overall.auc,
        "auc_ci": by_source["pooled"]["auc_ci"],
        "no_better_than_chance": metrics.no_better_than_chance(by_source["pooled"]["auc_ci"]),
        "per_source": by_source["per_source"],
        "within_source": by_source["within_source"],
        "shortcut": shortcut,
        "accuracy": overall.accuracy,
        "sensitivity": overall.sensitivity,
        "specificity": overall.specificity,
        "threshold": threshold,
        "confusion": overall.confusion,
        "overlap_with_training": len(overlap),
        "overlapping_images": sorted(overlap),
        "predictions": _local_or_uri(storage, predictions_key),
        "subgroups": _subgroups(scored, labels, probabilities, threshold),
        "excluded": dict(sorted(Counter(e.reason for e in exclusions).items())),
        "exclusions": [e.as_dict() for e in exclusions],
        "plots": [_local_or_uri(storage, f"{prefix}/{name}") for name in ("roc.png", "confusion.png")],
        "note": "research use only - not a diagnostic device",
    }
    storage.write_json(f"{prefix}/report.json", report)
    return report


def _overlap_with_training(
    storage: Storage, model_ref: ModelRef, fingerprints: dict[str, dict]
) -> dict[str, str]:
    """Folder images that duplicate an image the model was trained on: {folder file: training sha256}."""
    version = model_ref.card.get("dataset_version")
    if not version or not storage.exists(dataset.version_key(version, "manifest.json")):
        log("model's training dataset not in this storage: overlap with training not checked")
        return {}
    train = dataset.read_split(storage, version, "train")
    train_shas = set(train.column("sha256").to_pylist())
    known = {
        row["sha256"]: row
        for row in dataset.read_table(storage, version, "fingerprints").to_pylist()
        if row["sha256"] in train_shas and row.get("dedupe_version") == FINGERPRINT_VERSION
    }
    for sha in train_shas - set(known):  # made by an older dedupe: fingerprint the stored bytes again
        image = decode_image(storage.read_bytes(dataset.blob_key(sha))).image
        known[sha] = fingerprint(to_grayscale(image))
    new = {f"folder:{name}": fp for name, fp in fingerprints.items()}
    overlap: dict[str, str] = {}
    for pair in find_duplicates(known, new):
        a_new, b_new = pair.a.startswith("folder:"), pair.b.startswith("folder:")
        if a_new != b_new:  # one folder image, one training image
            folder_key, train_key = (pair.a, pair.b) if a_new else (pair.b, pair.a)
            overlap.setdefault(folder_key.removeprefix("folder:"), train_key)
    return overlap


def _predictions_csv(scored, labels, probabilities, threshold: float, overlap: dict[str, str]) -> str:
    extra_columns = sorted({name for item in scored for name in item.row.extra})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "source",
            "filename",
            "patient_id",
            "label",
            "finding",
            "view",
            "probability",
            "predicted_label",
            "duplicates_training",
            *extra_columns,
        ]
    )
    for item, label, probability in zip(scored, labels, probabilities, strict=True):
        row = item.row
        writer.writerow(
            [
                row.source,
                row.filename,
                row.patient_id,
                int(label),
                row.finding,
                row.view,
                f"{probability:.6f}",
                int(probability >= threshold),
                int(row.filename in overlap),
                *(row.extra.get(name, "") for name in extra_columns),
            ]
        )
    return buffer.getvalue()


def _subgroups(scored, labels, probabilities, threshold: float) -> dict[str, dict[str, dict]]:
    """Metrics per value of view, sex and site columns (only columns the folder has)."""
    groups: dict[str, dict[str, dict]] = {}
    for column in SUBGROUP_COLUMNS:
        values = [
            item.row.view
            if column == "view"
            else item.row.source
            if column == "source"
            else item.row.extra.get(column)
            for item in scored
        ]
        if all(value is None for value in values):
            continue
        groups[column] = {}
        for value in sorted({v or "" for v in values}):
            mask = np.array([(v or "") == value for v in values])
            result = metrics.binary_metrics(labels[mask], probabilities[mask], threshold)
            groups[column][value or "(empty)"] = {
                "n": int(mask.sum()),
                "positives": int(labels[mask].sum()),
                "auc": result.auc,
                "accuracy": result.accuracy,
                "sensitivity": result.sensitivity,
                "specificity": result.specificity,
            }
    return groups


def _local_or_uri(storage: Storage, key: str) -> str:
    return storage.path(key) if storage.is_local else storage.uri_of(key)
