"""Connecting to Ray: the running cluster when there is one, else a local one started for this job."""

from __future__ import annotations

import logging


def connect() -> None:
    """Attach this process to Ray once.

    ``ray.init()`` with no address joins the cluster named by ``$RAY_ADDRESS`` (set by ``ray job submit``)
    or the one ``ray start`` last started on this machine, and otherwise starts a local instance. Ray's
    token authentication stays as the cluster configured it.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
