"""The jobs' own progress lines, through one stdlib logger.

Every module logs through :func:`get_logger` (``logging.getLogger("lxn_ray.<job>")``); the ``lxn_ray``
logger writes each record to standard error as ``[<job> HH:MM:SS] message`` - stdout is kept for a job's
summary. The handler looks ``sys.stderr`` up when it writes, so output lands where the process (or a
test's capture) has put stderr at that moment, in the driver and in Ray workers alike. Library loggers
(Ray, TensorFlow) are quieted separately, by :mod:`lxn_ray.infra.quiet`.
"""

from __future__ import annotations

import logging
import sys

ROOT = "lxn_ray"
FORMAT = "[%(job)s %(asctime)s] %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _StderrHandler(logging.StreamHandler):
    """A stream handler whose stream is whatever ``sys.stderr`` is when a record is written."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


class _JobFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.job = record.name.removeprefix(f"{ROOT}.")
        return super().format(record)


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_JobFormatter(FORMAT, DATE_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # a worker's or an application's root handlers would print it twice
    return root


def get_logger(job: str) -> logging.Logger:
    """The logger of ``job`` (``train``, ``tune``, ``ingest``, ...): its INFO lines and above reach
    stderr as ``[job HH:MM:SS] message``."""
    _root()
    return logging.getLogger(f"{ROOT}.{job}")
