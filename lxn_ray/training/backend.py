"""Ray Train's TensorFlow set-up without TensorFlow in the processes that only coordinate.

``ray.train.tensorflow.TensorflowTrainer`` is a ``DataParallelTrainer`` with ``TensorflowConfig``, whose
backend gives every worker ``TF_CONFIG`` (the worker group's addresses and its rank) before the training
function runs. Importing ``ray.train.tensorflow`` - which unpickling that config does, in the Train
controller and in whatever process builds the trainer (the training job's step actor, every Tune trial) -
imports TensorFlow itself: 4-5 s of CPU per process on a 2-core machine, in processes that never run a
TF op. :class:`TensorflowBackendConfig` is that backend as Ray 2.60 writes it
(``ray/train/tensorflow/config.py``: the same two variables, set the same way on every worker) defined
here, so only the Train workers, which build the model, import TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    """On worker ``index``: ``TF_CONFIG`` naming every worker's ``host:port`` (rank order) and this one's
    rank, read by ``tf.distribute.MultiWorkerMirroredStrategy``; and ``TF_USE_LEGACY_KERAS=1``, as Ray's
    backend sets it (it only redirects ``tf.keras``, which lxn_ray does not use; ``import keras`` is
    Keras 3 either way)."""
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": worker_addresses}, "task": {"type": "worker", "index": index}}
    )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def _address_and_port() -> str:
    """This node's IP address and a free port on it, as ``host:port`` (``[v6]:port`` for IPv6)."""
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


class _TensorflowBackend(Backend):
    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        import ray

        addresses = worker_group.execute(_address_and_port)
        ray.get(
            [
                worker_group.execute_single_async(i, _set_tf_config, worker_addresses=addresses, index=i)
                for i in range(len(worker_group))
            ]
        )


@dataclass
class TensorflowBackendConfig(BackendConfig):
    """``ray.train.tensorflow.TensorflowConfig`` without importing TensorFlow (see the module)."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _TensorflowBackend

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW  # Ray's run state records the framework

    def to_dict(self) -> dict[str, Any]:
        return {}
