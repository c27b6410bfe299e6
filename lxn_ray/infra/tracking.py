"""MLflow tracking and registry, written from the job's driver and never in its way.

Where runs go (:func:`tracking_target`), first match wins:

1. ``--mlflow-uri`` of a job, which sets ``LXN_MLFLOW_URI`` for it (``off`` turns tracking off);
2. ``MLFLOW_TRACKING_URI``, MLflow's own variable (a server ``http://HOST:5000``, ``sqlite:///...``, ...);
3. an embedded store with nothing to start: SQLite at ``<storage>/mlflow/mlflow.db`` with artifacts in
   ``<storage>/mlflow/artifacts`` for a local store; for ``s3://`` storage the artifacts go to the bucket
   (``<storage>/mlflow/artifacts``) and the runs to a local SQLite file,
   ``$LXN_CACHE/mlflow/<bucket and prefix>.db`` (default ``~/.cache/lxn_ray``), unless a server is named.

A :class:`Tracker` sends everything from one background thread, in the order it was asked, so logging
never blocks training. The first call that fails - a server that is down, a full disk - becomes one
warning line and the tracker drops everything after it: a job never fails, and never waits, on tracking.
:meth:`Tracker.close` waits at most ``flush_timeout_s`` for what is still queued. Calls to a server retry
once (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 10 s timeout) unless the environment already says otherwise.

Why not Ray Tune's ``MLflowLoggerCallback``: it ignores the tracking URI it is given and writes under
``ray_results`` (ray-project/ray#36257), and it logs from each trial's own process; here only the driver
writes, through this module (:mod:`lxn_ray.tuning.tracking`, :mod:`lxn_ray.training.tracking`).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxn_ray.infra.log import get_logger
from lxn_ray.infra.settings import setting

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lxn_ray.infra.storage import Storage

warn = get_logger("tracking").warning

URI_VARIABLE = "LXN_MLFLOW_URI"  # set by --mlflow-uri; wins over MLFLOW_TRACKING_URI
OFF = "off"
FOLDER = "mlflow"  # under storage: mlflow.db (local stores) and artifacts/
MAX_PARAM_CHARS = 500  # a parameter's value is cut to this (MLflow allows 6000; a table cell needs less)
BATCH = 100  # records per log_batch call (MLflow's limits: 100 parameters, 1000 metrics)


@dataclass(frozen=True)
class TrackingSettings:
    """The ``--mlflow-uri`` flag of the jobs that train, publish or promote (train, tune, retrain,
    registry): it sets :data:`URI_VARIABLE` while the job runs (:meth:`applied`)."""

    mlflow_uri: str = setting(
        "",
        help="where MLflow runs and registered models go: a server (http://HOST:5000), a database URI, or "
        "'off' (default: $MLFLOW_TRACKING_URI, else an SQLite store under --storage; docs/tracking.md)",
        metavar="URI",
    )

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within it, trackers (:func:`tracking_target`) use ``mlflow_uri`` when one is given (the job's
        child processes too); the environment is restored after."""
        previous = os.environ.get(URI_VARIABLE)
        if self.mlflow_uri:
            os.environ[URI_VARIABLE] = self.mlflow_uri
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(URI_VARIABLE, None)
            else:
                os.environ[URI_VARIABLE] = previous


@dataclass(frozen=True)
class Target:
    """Where a job's MLflow records go: the tracking (and registry) URI, and the artifact root given to
    experiments it creates (None: the server's own)."""

    uri: str
    artifact_root: str | None

    def describe(self) -> str:
        """One line for the job's log: where to look (``mlflow ui --backend-store-uri ...`` for a file)."""
        if self.uri.startswith("sqlite:"):
            return f"MLflow runs in {self.uri} (open them with `mlflow ui --backend-store-uri {self.uri}`)"
        return f"MLflow runs at {self.uri}"


def tracking_target(storage: Storage) -> Target | None:
    """The :class:`Target` of a job on ``storage`` (the module's rules), or None when tracking is off."""
    named = os.environ.get(URI_VARIABLE) or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if named.strip().lower() in (OFF, "none", "false", "0"):
        return None
    if named:
        return Target(named, None)
    artifacts = storage.uri_of(f"{FOLDER}/artifacts")
    if storage.uri.startswith("s3://"):
        cache = Path(os.environ.get("LXN_CACHE") or Path.home() / ".cache" / "lxn_ray") / FOLDER
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", storage.uri.removeprefix("s3://")).strip("_")
        return Target(f"sqlite:///{cache / slug}.db", artifacts)
    return Target(f"sqlite:///{Path(storage.path(FOLDER)) / 'mlflow.db'}", artifacts)


class Run:
    """A handle on an MLflow run the :class:`Tracker` creates in its thread: ``id`` is set once it exists
    (None before, or when tracking failed)."""

    def __init__(self) -> None:
        self.id: str | None = None


class Tracker:
    """MLflow calls from the driver, on one background thread, in order; never raises, never blocks.

    ``target`` None makes a tracker that does nothing (tracking off). Build one per job with
    :meth:`for_storage`; :meth:`close` it at the end.
    """

    def __init__(self, target: Target | None, flush_timeout_s: float = 30.0) -> None:
        self.target, self.flush_timeout_s = target, flush_timeout_s
        self.failed = False
        self._calls: queue.Queue = queue.Queue()
        self._experiments: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        if target is not None:
            self._thread = threading.Thread(target=self._work, name="lxn-mlflow", daemon=True)
            self._thread.start()

    @classmethod
    def for_storage(cls, storage: Storage, announce: bool = True) -> Tracker:
        """The tracker of a job on ``storage`` (:func:`tracking_target`); ``announce`` logs where runs go."""
        target = tracking_target(storage)
        if announce and target is not None:
            get_logger("tracking").info(target.describe())
        return cls(target)

    @property
    def enabled(self) -> bool:
        return self.target is not None and not self.failed

    # -- what callers ask for ---------------------------------------------------------------------------
    def submit(self, what: str, call: Callable[[MlflowClient], Any]) -> None:
        """Queue ``call(client)``; ``what`` names it in the warning should it fail."""
        if self.enabled:
            self._calls.put((what, call))

    def start_run(
        self,
        experiment: str,
        name: str,
        tags: Mapping[str, str],
        parent: Run | None = None,
        reuse: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Run:
        """A new run ``name`` in ``experiment`` (created when missing), nested under ``parent``, with
        ``params`` (as :meth:`log_params`); with ``reuse`` (tags), the run that already has those tags is
        taken up again instead (a resumed search or trial), marked running, its parameters as they were
        (MLflow never changes a logged parameter)."""
        run = Run()
        flat = _params(params or {})

        def start(client: MlflowClient) -> None:
            from mlflow.entities import Param

            experiment_id = self.experiment_id(client, experiment)
            if reuse:
                query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in reuse.items())
                found = client.search_runs([experiment_id], query, max_results=1)
                if found:
                    run.id = found[0].info.run_id
                    client.update_run(run.id, status="RUNNING")
                    return
            all_tags = dict(tags)
            if parent is not None and parent.id:
                all_tags["mlflow.parentRunId"] = parent.id
            run.id = client.create_run(experiment_id, tags=all_tags, run_name=name).info.run_id
            for start in range(0, len(flat), BATCH):
                client.log_batch(run.id, params=[Param(*pair) for pair in flat[start : start + BATCH]])

        self.submit(f"start run {name}", start)
        return run

    def log_params(self, run: Run, params: Mapping[str, Any]) -> None:
        """Log ``params`` (nested mappings flattened with dots; values as text, cut to
        :data:`MAX_PARAM_CHARS`)."""
        flat = _params(params)

        def log(client: MlflowClient) -> None:
            from mlflow.entities import Param

            for start in range(0, len(flat), BATCH):
                client.log_batch(run.id, params=[Param(*pair) for pair in flat[start : start + BATCH]])

        if flat:
            self.submit("log parameters", lambda client: run.id and log(client))

    def log_metrics(self, run: Run, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numbers of ``metrics`` (nested mappings flattened with dots; booleans, text and
        non-finite values left out) at ``step`` (an epoch)."""
        numbers = _numbers(metrics)
        if numbers:
            steps = {step or 0: numbers}
            self.submit("log metrics", lambda client: run.id and _log_steps(client, run.id, steps))

    def backfill(
        self, run: Run, key: str, history: Callable[[], Iterable[tuple[int, Mapping[str, Any]]]]
    ) -> None:
        """Log the ``(step, metrics)`` pairs of ``history()`` whose step has no value of metric ``key`` yet:
        what an earlier driver queued but never sent before it was killed. ``history`` is called on the
        tracker's thread (it may read storage)."""

        def log(client: MlflowClient) -> None:
            logged = {metric.step for metric in client.get_metric_history(run.id, key)}
            _log_steps(client, run.id, {step: _numbers(m) for step, m in history() if step not in logged})

        self.submit("backfill metrics", lambda client: run.id and log(client))

    def set_tags(self, run: Run, tags: Mapping[str, Any]) -> None:
        """Set ``tags`` (values as text) on ``run``."""
        pairs = [(key, str(value)) for key, value in tags.items()]

        def log(client: MlflowClient) -> None:
            from mlflow.entities import RunTag

            client.log_batch(run.id, tags=[RunTag(*pair) for pair in pairs])

        self.submit("set tags", lambda client: run.id and log(client))

    def log_files(
        self,
        run: Run,
        files: Mapping[str, bytes] | Callable[[], Mapping[str, bytes]],
        folder: str | None = None,
    ) -> None:
        """Upload ``files`` (name -> bytes, or a function returning them, called on the tracker's thread)
        as artifacts of ``run``, under ``folder``."""

        def upload(client: MlflowClient) -> None:
            import tempfile

            if not run.id:
                return
            with tempfile.TemporaryDirectory() as local:
                for name, data in (files() if callable(files) else files).items():
                    (Path(local) / name).write_bytes(data)
                client.log_artifacts(run.id, local, folder)

        self.submit("upload artifacts", upload)

    def end_run(self, run: Run, status: str = "FINISHED") -> None:
        """End ``run`` as FINISHED, FAILED or KILLED."""
        self.submit("end run", lambda c: run.id and c.set_terminated(run.id, status))

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Work on the caller's thread that only feeds tracking (reading a card to log it, a Tune
        callback): an exception in it becomes the tracker's one warning, never the job's failure."""
        try:
            yield
        except Exception as error:
            self._fail(what, error)

    def query(self, what: str, call: Callable[[MlflowClient], Any], default: Any = None) -> Any:
        """``call(client)`` now, in the caller's thread (a read, such as ``registry list``'s): its result,
        or ``default`` with one warning when tracking is off or the call fails."""
        if not self.enabled:
            return default
        try:
            return call(self._client())
        except Exception as error:  # tracking is never a job's failure
            self._fail(what, error)
            return default

    def close(self) -> None:
        """Send what is queued (waiting at most ``flush_timeout_s``), then stop the thread."""
        if self._thread is None:
            return
        self._calls.put(None)
        self._thread.join(self.flush_timeout_s)
        if self._thread.is_alive() and not self.failed:
            self.failed = True
            warn(
                f"warning: MLflow at {self.target.uri} did not take this job's records within "
                f"{self.flush_timeout_s:.0f} s; the rest are not logged"
            )
        self._thread = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the thread -------------------------------------------------------------------------------------
    def _work(self) -> None:
        client = None
        while (item := self._calls.get()) is not None:
            what, call = item
            if self.failed:
                continue
            try:
                client = client or self._client()
                call(client)
            except Exception as error:
                self._fail(what, error)

    def _client(self) -> MlflowClient:
        if self.target.uri.startswith("sqlite:///"):  # the embedded store's folder, made on first use
            Path(self.target.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if self.target.uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        from lxn_ray.infra import quiet

        if not quiet.verbose():  # "Creating initial MLflow database tables..." and alembic's steps
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
        return MlflowClient(tracking_uri=self.target.uri, registry_uri=self.target.uri)

    def experiment_id(self, client: MlflowClient, name: str) -> str:
        """The id of experiment ``name``, created (with its artifact location) when missing; in the
        tracker's thread."""
        if name not in self._experiments:
            found = client.get_experiment_by_name(name)
            if found is None:
                location = f"{self.target.artifact_root}/{name}" if self.target.artifact_root else None
                try:
                    self._experiments[name] = client.create_experiment(name, artifact_location=location)
                except Exception:  # created meanwhile by another job
                    found = client.get_experiment_by_name(name)
                    if found is None:
                        raise
            if found is not None:
                self._experiments[name] = found.experiment_id
        return self._experiments[name]

    def _fail(self, what: str, error: Exception) -> None:
        if self.failed:
            return
        self.failed = True
        message = " ".join(str(error).split())[:300]
        warn(
            f"warning: MLflow tracking at {self.target.uri} failed ({what}: {type(error).__name__}: "
            f"{message}); the job goes on without it and logs nothing more to MLflow"
        )


def _numbers(metrics: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The finite numbers of ``metrics`` (flattened with dots) as ``(name, value)``."""
    return [
        (key, float(value))
        for key, value in flatten(metrics).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ]


def _log_steps(client: MlflowClient, run_id: str, steps: Mapping[int, list[tuple[str, float]]]) -> None:
    """Log ``steps`` (step -> its ``(name, value)`` numbers) to run ``run_id``, :data:`BATCH` at a time."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for step, numbers in steps.items() for key, value in numbers]
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + BATCH])


def _params(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """MLflow parameters of ``params``: flattened (:func:`flatten`), each value as text cut to
    :data:`MAX_PARAM_CHARS`."""
    return [(key, str(value)[:MAX_PARAM_CHARS]) for key, value in flatten(params).items()]


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}``: nested mappings joined with dots,
    characters MLflow refuses in a key replaced by ``_``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
            continue
        name = re.sub(r"[^\w\-. /]", "_", name)  # the characters MLflow allows in a key
        flat[name] = value
    return flat
