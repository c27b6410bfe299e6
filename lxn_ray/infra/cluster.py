"""Connecting to Ray: the running cluster when there is one, else a local one started for this job."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def connect() -> None:
    """Attach this process to Ray once.

    ``ray.init()`` with no address joins the cluster named by ``$RAY_ADDRESS`` (set by ``ray job submit``)
    or the one ``ray start`` last started on this machine, and otherwise starts a local instance. Ray's
    token authentication stays as the cluster configured it.
    """
    import ray

    from lxn_ray.infra import quiet

    if ray.is_initialized():
        return
    quiet.setup_driver()
    ray.init(
        logging_level=logging.WARNING,
        configure_logging=True,
        log_to_driver=True,
        runtime_env=quiet.runtime_env() or None,  # quiet workers, unless --verbose
    )


PROGRESS_EVERY_S = 10.0  # how often map_chunks_on_ray reports, at most


def map_chunks_on_ray(
    worker: Callable[[Any], list],
    chunks: list[Any],
    progress: Callable[[int, int], None] | None = None,
) -> list[list]:
    """``worker(chunk)`` for every chunk as one Ray task each (spread over the cluster); results in order.

    ``worker`` must be a picklable module-level function (a :data:`lxn_ray.dedupe.search.ChunkMapper`'s
    worker).
    ``progress(done, total)`` is called as chunks finish, at most every :data:`PROGRESS_EVERY_S` seconds,
    and once at the end.
    """
    connect()
    import ray

    remote_worker = ray.remote(num_cpus=1)(worker)
    references = [remote_worker.remote(chunk) for chunk in chunks]
    pending, reported = list(references), time.monotonic()
    while pending and progress is not None:
        _, pending = ray.wait(pending, num_returns=1, timeout=PROGRESS_EVERY_S)
        if time.monotonic() - reported >= PROGRESS_EVERY_S or not pending:
            progress(len(references) - len(pending), len(references))
            reported = time.monotonic()
    return ray.get(references)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class SignalStop:
    """SIGTERM/SIGINT as a stop request, as a context manager. ``graceful``: the first signal sets
    ``event`` (the caller stops at its next safe point: between retraining ticks, or a foreground server
    shutting down) and a second one interrupts at once. Otherwise a signal interrupts at once as
    KeyboardInterrupt, so ``finally`` blocks (releasing a lock) still run.

    Ray replaces handlers as it goes (``ray.init`` installs its own SIGTERM handler, a Ray Train run its
    SIGINT handler), so callers :meth:`arm` again after such steps; a signal from then on is remembered.
    """

    def __init__(self, graceful: bool, stopping: str = "stopping at the next safe point") -> None:
        self.graceful = graceful
        self.stopping = stopping
        self.event = threading.Event()
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, _frame: Any) -> None:
        if self.graceful and not self.event.is_set():
            self.received = signal.Signals(number).name
            self.event.set()
            print(f"{self.received}: {self.stopping} (signal again to stop now)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    def arm(self) -> None:
        """Install the handlers (again, where something replaced them); main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            current = signal.getsignal(number)
            if current != self._handle:
                self._previous.setdefault(number, current)
                signal.signal(number, self._handle)

    def __enter__(self) -> SignalStop:
        self.arm()
        return self

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
