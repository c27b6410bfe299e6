"""Scoring other data with a model version: how other hospitals' films are judged.

The data is a folder in the upstream layout (``--source``) or the named sources of a sources file
(``--sources``, any layout), labelled by exactly the ingest rules and the model's task, preprocessed by
the same function as training, and scored at the threshold the model chose on its own validation split
(never re-tuned on the data being judged). Images that duplicate the model's training images - found by
the same duplicate detection as ingest - are scored but counted, since they flatter the result. Metrics
are given pooled, per source and within each source holding both classes, with the source-shortcut
check (:func:`lxn_ray.evaluation.metrics.shortcut_check`), and broken down per view, sex and site.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lxn_ray.data import dataset
from lxn_ray.data.fetch import Exclusion, SourceFile, read_files
from lxn_ray.dedupe.fingerprint import FINGERPRINT_VERSION, fingerprint_film
from lxn_ray.dedupe.search import ChunkMapper, find_duplicates
from lxn_ray.dedupe.verify import VerifyChunk
from lxn_ray.evaluation import metrics, plots, predict
from lxn_ray.images.decode import ImageLimits, ImageRejected
from lxn_ray.images.preprocess import LungFinder
from lxn_ray.infra import cluster
from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage
from lxn_ray.model.network import predict_probabilities
from lxn_ray.registry import ModelRef
from lxn_ray.sources.layouts import SourceSpec, read_rows
from lxn_ray.sources.metadata import UNREADABLE
from lxn_ray.sources.tasks import resolve_task

EVALUATIONS = "evaluations"
SUBGROUP_COLUMNS = ("view", "sex", "location", "source")
PROGRESS_EVERY_S = 15.0  # at most one "decoded i/n" line this often
#: Candidate pairs from which duplicate verification runs as Ray tasks instead of in this process. A pair
#: costs ~30-45 ms of CPU (measured on the 2020-06-22 snapshot), while starting a local Ray and its workers
#: costs ~10-15 s and, on a 2-core machine, at best halves the verification: Ray pays off from ~1000 pairs
#: (30 s serial); 2000 (about a minute serial) keeps small checks - a folder mostly made of the model's
#: own dataset, a few new films - in this process, where they take seconds.
RAY_VERIFY_MIN_PAIRS = 2000


log = get_logger("evaluate").info  # progress for the person watching; stdout keeps the summary


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
    loaded = predict.load(storage, model_reference)
    model, model_ref, image_size = loaded.model, loaded.reference, loaded.image_size
    task_of = resolve_task(task) if task else loaded.task
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

    training = _training_images(storage, model_ref)
    scored, inputs, fingerprints, rejected = _decode(
        files, image_size, limits, model_ref, training, loaded.lungs
    )
    exclusions += rejected
    if not scored:
        raise ValueError(
            f"{', '.join(descriptions)}: no usable image to score ({len(exclusions)} rows excluded)"
        )
    started = time.monotonic()
    log(f"scoring {len(scored)} images with model {model_ref.version or model_reference} at {image_size} px")
    probabilities = loaded.calibration(predict_probabilities(model, inputs))
    log(f"scored {len(scored)} images in {time.monotonic() - started:.1f} s")
    labels = np.array([task_of.label_of(item.row.finding) for item in scored], dtype=np.int64)
    groups = [item.row.source for item in scored]
    threshold = model_ref.threshold
    overall = metrics.binary_metrics(labels, probabilities, threshold)
    by_source = metrics.group_metrics(labels, probabilities, groups, threshold)
    shortcut = metrics.shortcut_check(labels, probabilities, groups)
    overlap = (
        _overlap_with_training(
            storage, training, {item.row.filename: item.sha256 for item in scored}, fingerprints
        )
        if training is not None
        else {}
    )

    # The same metrics on the films the model never trained on (nor on a copy of): on the model's own
    # source most films may overlap, and a metric over them says little about new patients.
    unseen = np.array([item.row.filename not in overlap for item in scored], dtype=bool)
    not_overlapping = (
        metrics.group_metrics(
            labels[unseen], probabilities[unseen], list(np.asarray(groups, dtype=object)[unseen]), threshold
        )
        if training is not None and unseen.any()
        else None
    )

    stamp = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    prefix = f"{EVALUATIONS}/{stamp}-{model_ref.version or 'file'}"
    predictions_key = f"{prefix}/predictions.csv"
    storage.write_text(predictions_key, _predictions_csv(scored, labels, probabilities, threshold, overlap))
    curves = {"pooled": (labels, probabilities), **plots.within_source_curves(labels, probabilities, groups)}
    about = f"model {model_ref.version or model_reference} on {', '.join(descriptions)}"[:160]
    storage.write_bytes(f"{prefix}/roc.png", plots.roc(curves, threshold, about))
    names = (task_of.negative_name, task_of.positive_name)
    storage.write_bytes(
        f"{prefix}/confusion.png", plots.confusion_matrix(overall.confusion, "evaluated films", names, about)
    )
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
        "overlap_with_training": len(overlap) if training is not None else None,
        # pooled / per_source / within_source over the films that do not overlap training; None when
        # overlap was not checked or every film overlaps
        "not_overlapping": not_overlapping,
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


@dataclass(frozen=True)
class TrainingImages:
    """What the overlap check needs of the dataset version a model was trained on."""

    version: str
    #: sha256 of every content in the version's training split.
    shas: frozenset[str]
    #: sha256 of every image of the version, any split. Ingest publishes a version only after its duplicate
    #: detection judged its images distinct from each other (a confirmed duplicate is dropped; images of
    #: earlier versions were judged when they came), so a folder file with one of these contents that is
    #: not a training image is, by the version's own record, no duplicate of one: it is not checked again.
    published: frozenset[str]
    #: sha256 -> fingerprint ingest stored for the version's images, current
    #: :data:`~lxn_ray.dedupe.fingerprint.FINGERPRINT_VERSION` only: training images are not decoded again.
    fingerprints: dict[str, dict[str, Any]]


def _training_images(storage: Storage, model_ref: ModelRef) -> TrainingImages | None:
    """The model's training images as :class:`TrainingImages`, or None when its dataset version is not in
    ``storage`` (a model file from elsewhere): then overlap with training is not checked."""
    version = model_ref.card.get("dataset_version")
    if not version or not storage.exists(dataset.version_key(version, "manifest.json")):
        log("model's training dataset not in this storage: overlap with training not checked")
        return None
    train = dataset.read_split(storage, version, "train")
    stored = {
        row["sha256"]: row
        for row in dataset.read_table(storage, version, "fingerprints").to_pylist()
        if row.get("dedupe_version") == FINGERPRINT_VERSION
    }
    published = frozenset(dataset.read_table(storage, version, "images").column("sha256").to_pylist())
    return TrainingImages(version, frozenset(train.column("sha256").to_pylist()), published, stored)


def _decode(
    files: list[SourceFile],
    image_size: int,
    limits: ImageLimits,
    model_ref: ModelRef,
    training: TrainingImages | None,
    lungs: LungFinder | None = None,
) -> tuple[list[SourceFile], list[np.ndarray], dict[str, dict[str, Any]], list[Exclusion]]:
    """Each file's model input, and the fingerprints the overlap check needs, decoding each file once (a
    large JPEG that needs a fingerprint twice, at the fingerprint's scale and at the model's): (scored
    files, model inputs, sha256 -> fingerprint, exclusions of undecodable files).

    No fingerprint is needed for a file whose bytes are an image of the model's dataset version (a
    training image, or one ingest judged distinct from them: see :class:`TrainingImages`) nor when there
    is no training set to compare with. Any other is fingerprinted as ingest fingerprints it
    (:func:`~lxn_ray.dedupe.fingerprint.fingerprint_film`), and its model input is made from that same
    decode where it is the whole film and the endpoint would decode the whole film too; else (a large
    JPEG: :func:`lxn_ray.images.decode.reduces`) the input is decoded again at the endpoint's scale, so
    evaluation scores exactly the pixels the endpoint would. ``lungs`` finds the lung fields of a model
    that crops or masks to them.
    """
    from lxn_ray.images.decode import image_format, reduces
    from lxn_ray.images.preprocess import as_model_input, decode_side, preprocess_bytes, preprocess_decoded

    preprocessing = model_ref.preprocessing
    side = decode_side(image_size, preprocessing)
    published = training.published if training is not None else frozenset()
    fingerprints: dict[str, dict[str, Any]] = {}
    scored: list[SourceFile] = []
    inputs: list[np.ndarray] = []
    exclusions: list[Exclusion] = []
    fingerprinted = {item.sha256 for item in files if item.sha256 not in published}
    log(
        f"decoding {len(files)} images at {image_size} px"
        + (
            f"; {len(fingerprinted)} contents not in {training.version} also fingerprinted"
            if training is not None
            else ""
        )
    )
    started = last = time.monotonic()
    for done, item in enumerate(files, 1):
        sha = item.sha256
        needs_fingerprint = training is not None and sha not in published and sha not in fingerprints
        try:
            if needs_fingerprint:
                decoded, fingerprints[sha] = fingerprint_film(item.data, limits)
                whole = decoded.image.size == (decoded.width, decoded.height)  # not decoded reduced
                if not whole or reduces(image_format(item.data) or "", decoded.width, decoded.height, side):
                    model_input = preprocess_bytes(item.data, image_size, limits, preprocessing, lungs)
                else:
                    model_input = as_model_input(
                        preprocess_decoded(decoded, image_size, preprocessing, lungs)
                    )
            else:
                model_input = preprocess_bytes(item.data, image_size, limits, preprocessing, lungs)
        except ImageRejected as error:
            exclusions.append(Exclusion(item.row, UNREADABLE, str(error)))
            continue
        inputs.append(model_input)
        scored.append(item)
        if time.monotonic() - last > PROGRESS_EVERY_S and done < len(files):
            last = time.monotonic()
            log(f"decoded {done}/{len(files)} images")
    log(f"decoded {len(scored)} images in {time.monotonic() - started:.1f} s ({len(exclusions)} undecodable)")
    return scored, inputs, fingerprints, exclusions


def _verification_mapper(worker: Callable[[Any], list], chunks: list[VerifyChunk]) -> list[list]:
    """A :data:`~lxn_ray.dedupe.search.ChunkMapper` that verifies candidate pairs as Ray tasks when there
    are
    enough of them to repay starting Ray, else here."""
    count = sum(len(chunk.pairs) for chunk in chunks)
    pairs = f"{count} candidate pairs ({len(chunks)} chunks)"
    if count < RAY_VERIFY_MIN_PAIRS:
        log(f"verifying {pairs} in this process")
        return [worker(chunk) for chunk in chunks]
    try:
        cluster.connect()
    except Exception as error:  # the result does not depend on where pairs are verified
        log(f"Ray unavailable ({type(error).__name__}: {error}); verifying {pairs} in this process")
        return [worker(chunk) for chunk in chunks]
    log(f"verifying {pairs} as Ray tasks")
    return cluster.map_chunks_on_ray(
        worker, chunks, progress=lambda done, total: log(f"verified {done} of {total} chunks")
    )


def _overlap_with_training(
    storage: Storage,
    training: TrainingImages,
    folder: Mapping[str, str],
    fingerprints: Mapping[str, Mapping[str, Any]],
    map_chunks: ChunkMapper | None = _verification_mapper,
) -> dict[str, str]:
    """Folder images that duplicate an image the model was trained on: {folder file: training sha256}.

    ``folder``: folder file -> sha256 of its bytes; ``fingerprints``: sha256 -> fingerprint of every
    folder content that is not an image of the version. A file with a training image's bytes is that image
    and counts without verification; one with the bytes of another image of the version does not (ingest
    judged it distinct, see :class:`TrainingImages`); the others are compared with the training images
    only (never with each other) by ingest's duplicate detection, verifying candidate pairs through
    ``map_chunks``.
    """
    overlap = {name: sha for name, sha in folder.items() if sha in training.shas}
    judged = {sha for sha in folder.values() if sha in training.published and sha not in training.shas}
    others = sorted({sha for sha in folder.values() if sha not in training.published})
    log(
        f"duplicate check: {len(overlap)} of {len(folder)} files are byte-identical to training images, "
        f"{len(judged)} contents are other images of {training.version} (judged distinct at ingest); "
        f"{len(others)} other contents to compare with {len(training.shas)} training images"
    )
    if not others:
        return overlap
    started = time.monotonic()
    known = {sha: training.fingerprints[sha] for sha in training.shas if sha in training.fingerprints}
    missing = sorted(training.shas - set(known))
    if missing:  # made by an older dedupe: fingerprint the stored bytes again
        log(f"fingerprinting {len(missing)} training images whose stored fingerprints are outdated")
    for sha in missing:
        known[sha] = fingerprint_film(storage.read_bytes(dataset.blob_key(sha)))[1]
    new = {f"folder:{sha}": fingerprints[sha] for sha in others}
    duplicates: dict[str, str] = {}
    pairs = find_duplicates(known, new, map_chunks=map_chunks, within_new=False)
    for pair in pairs:  # sorted, so each folder content keeps its first training match
        folder_key, train_key = (pair.a, pair.b) if pair.a.startswith("folder:") else (pair.b, pair.a)
        duplicates.setdefault(folder_key.removeprefix("folder:"), train_key)
    overlap.update({name: duplicates[sha] for name, sha in folder.items() if sha in duplicates})
    log(
        f"duplicate check: {len(duplicates)} contents near-duplicate training images "
        f"({len(pairs)} confirmed pairs) in {time.monotonic() - started:.1f} s; {len(overlap)} images overlap"
    )
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
