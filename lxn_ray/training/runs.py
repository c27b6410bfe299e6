"""A training run as it lies in storage: its name, the folder Ray Train keeps it in, the metric that ranks
its epochs, the epoch it has registered, its checkpoints' state and the model versions it published.

Everything here reads; the driver (:mod:`lxn_ray.training.train`) and the worker loop
(:mod:`lxn_ray.training.loop`) write runs, :mod:`lxn_ray.training.publish` writes model versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lxn_ray import registry
from lxn_ray.infra.storage import Storage
from lxn_ray.training.config import TrainConfig

RUNS = "runs"  # under storage: runs/<run name>/ is one Ray Train run (its checkpoints and snapshot)

# What picks the best epoch, the best trial and the champion: the source-aware validation metric
# (lxn_ray.evaluation.metrics.source_aware_objective - mean within-source AUC where sources hold both
# classes).
OBJECTIVE = "val_objective"

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # where Ray Train records registered checkpoints
# A checkpoint of a run is a folder of three files, written by rank 0 of the worker loop after every epoch:
CHECKPOINT_WEIGHTS = "model.weights.h5"  # the model's weights (Keras)
CHECKPOINT_OPTIMIZER = "optimizer.npz"  # the optimizer's variables (lxn_ray.model.network.optimizer_state)
CHECKPOINT_STATE = "state.json"  # {"epoch", "history": one dict of metrics per epoch, "resumes"}


def run_config(
    storage: Storage,
    run_name: str,
    max_failures: int,
    callbacks: list | None = None,
    objective: str = OBJECTIVE,
):
    """The ``ray.train.RunConfig`` of a run named ``run_name`` under :data:`RUNS`: the two best checkpoints
    by the reported metric ``objective`` (higher is better) kept, ``max_failures`` restarts from the
    latest one (a lost worker or node)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from lxn_ray.infra import quiet

    return RunConfig(
        name=run_name,
        storage_path=storage.path(RUNS),
        storage_filesystem=storage.filesystem,
        checkpoint_config=CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=objective, checkpoint_score_order="max"
        ),
        failure_config=FailureConfig(max_failures=max_failures),
        callbacks=callbacks or None,
        logging_config=LoggingConfig(log_level=quiet.train_log_level()),
    )


def run_name_of(version: str, config: TrainConfig) -> str:
    """The training run of ``config`` on dataset ``version`` (without ``fresh``): rerunning the same job
    resumes it, and a model card's ``train_run`` names it."""
    return f"train-{version}-{config.digest()}"


def registered_epoch(storage: Storage, run_name: str) -> int:
    """The epoch of the latest checkpoint Ray Train has registered for ``run_name`` (0 while none, or
    while the snapshot is being written) - a rerun of the run resumes after that epoch."""
    try:
        snapshot = storage.read_json(f"{RUNS}/{run_name}/{CHECKPOINT_SNAPSHOT}")
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int((snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("epoch", 0))


def read_checkpoint_state(checkpoint) -> dict[str, Any]:
    """The ``state.json`` of a ``ray.train.Checkpoint`` written by the worker loop: ``epoch`` (int, the
    epoch it was saved after), ``history`` (one dict of metrics per epoch so far) and ``resumes`` (int).
    Raises FileNotFoundError when the checkpoint holds no state."""
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / CHECKPOINT_STATE).read_text())


def latest_history(storage: Storage, run_name: str) -> list[dict[str, Any]]:
    """The history (one dict of metrics per epoch, ``epoch`` from 1) in the latest checkpoint Ray Train
    registered for ``run_name``; empty when the run has none yet. Raises what reading storage raises."""
    import ray.train

    folder = storage.path(f"{RUNS}/{run_name}")
    if not storage.exists(f"{RUNS}/{run_name}/{CHECKPOINT_SNAPSHOT}"):
        return []
    result = ray.train.Result.from_path(folder, storage_filesystem=storage.filesystem)
    return read_checkpoint_state(result.checkpoint)["history"] if result.checkpoint is not None else []


def published_versions(storage: Storage, run_name: str, **card_fields: Any) -> list[str]:
    """The model versions training run ``run_name`` published (their card's ``train_run``), oldest first;
    ``card_fields`` keeps only those whose card holds these values too (``best_epoch=3``,
    ``dataset_version="20200622-..."``). Empty when the run published none. Reads every card once."""
    found = []
    for version in registry.list_versions(storage):
        card = registry.read_card(storage, version)
        if card.get("train_run") == run_name and all(card.get(k) == v for k, v in card_fields.items()):
            found.append(version)
    return found
