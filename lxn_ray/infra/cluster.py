"""Connecting to Ray: the running cluster when there is one, else a local one started for this job."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_ENV = "LXN_RAY_STARTUP_TIMEOUT_S"
DEFAULT_STARTUP_TIMEOUT_S = 300.0  # Ray's own fixed waits are 30 s; a loaded 2-core host has needed more
GCS_PORT_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"  # Ray's wait for a new GCS server's port (30 s)
STARTUP_POLL_S = 0.5


class RayStartupError(RuntimeError):
    """Ray did not start, or accept this driver, within the start-up bound; the message says what was
    awaited and how to wait longer."""


def startup_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """How long Ray's start-up may take, in seconds: ``$LXN_RAY_STARTUP_TIMEOUT_S``, default
    :data:`DEFAULT_STARTUP_TIMEOUT_S`. Raises ValueError for a value that is not a positive number."""
    raw = (os.environ if environ is None else environ).get(STARTUP_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_STARTUP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{STARTUP_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds, e.g. 600")
    return value


class PatientNodeLookup:
    """``ray._private.services.get_node`` made to wait until a deadline instead of failing at once.

    Starting a node, Ray polls that lookup until the new raylet has registered with the GCS and gives up
    after a fixed 30 s (``ray._private.node.Node``), which a loaded host exceeds. While :func:`connect`
    starts Ray, the lookup is this object: a lookup that fails (RuntimeError: the node is not registered
    yet) is retried every ``poll_s`` until ``deadline`` (on ``clock``), then the failure is raised and
    ``waited_for`` says what was awaited."""

    def __init__(
        self,
        lookup: Callable[..., Any],
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
        pause: Callable[[float], None] = time.sleep,
        poll_s: float = STARTUP_POLL_S,
    ) -> None:
        self.lookup = lookup
        self.deadline = deadline
        self.clock = clock
        self.pause = pause
        self.poll_s = poll_s
        self.waited_for: str | None = None

    def __call__(self, gcs_address: str, node_id: str) -> Any:
        while True:
            try:
                found = self.lookup(gcs_address, node_id)
                self.waited_for = None  # it came: nothing is awaited any more
                return found
            except RuntimeError:
                self.waited_for = f"this node's raylet to register with the GCS at {gcs_address}"
                if self.clock() >= self.deadline:
                    raise
                self.pause(self.poll_s)


def start_ray(
    init: Callable[[], None],
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> None:
    """``init()`` (a ``ray.init`` call) with Ray's start-up waits stretched to ``timeout_s`` in all.

    Ray's wait for a new GCS server's port is set to ``timeout_s`` unless ``$RAY_gcs_server_port_wait_time_s``
    says otherwise, and its 30 s wait for the raylet to register is stretched by :class:`PatientNodeLookup`.
    Raises :class:`RayStartupError`, naming what it waited for and for how long, when start-up times out;
    any other failure of ``init`` is raised as it is. (Ray's lookup is private API, pinned with Ray's
    version in pyproject.toml; where it is missing only the GCS port wait is stretched.)"""
    from ray._private import services

    os.environ.setdefault(GCS_PORT_WAIT_ENV, str(math.ceil(timeout_s)))
    started = clock()
    ray_lookup = getattr(services, "get_node", None)
    lookup = PatientNodeLookup(ray_lookup or (lambda *_: None), started + timeout_s, clock, pause)
    if ray_lookup is not None:
        services.get_node = lookup
    try:
        init()
    except Exception as error:
        message = str(error)
        if lookup.waited_for:
            waited = f"waited {clock() - started:.0f} s for {lookup.waited_for}"
        elif "timed out waiting for file" in message.casefold():
            waited = (
                f"waited {os.environ[GCS_PORT_WAIT_ENV]} s for the GCS server's port ({GCS_PORT_WAIT_ENV})"
            )
        elif "timed out" in message.casefold() or isinstance(error, TimeoutError):
            waited = f"waited {clock() - started:.0f} s for Ray to start"
        else:
            raise
        raise RayStartupError(
            f"Ray did not start: {waited} ({type(error).__name__}: {message.strip()}). A loaded host may "
            f"need longer: set {STARTUP_TIMEOUT_ENV} (now {timeout_s:g} s)"
        ) from error
    finally:
        if ray_lookup is not None:
            services.get_node = ray_lookup


def connect() -> None:
    """Attach this process to Ray once.

    ``ray.init()`` with no address joins the cluster named by ``$RAY_ADDRESS`` (set by ``ray job submit``)
    or the one ``ray start`` last started on this machine, and otherwise starts a local instance. Ray's
    token authentication stays as the cluster configured it. Start-up may take up to
    :func:`startup_timeout_s` (``$LXN_RAY_STARTUP_TIMEOUT_S``, default 300 s) on a loaded host; past it,
    raises :class:`RayStartupError` naming what it waited for (see :func:`start_ray`).
    """
    import ray

    from lxn_ray.infra import quiet

    if ray.is_initialized():
        return
    timeout_s = startup_timeout_s()
    quiet.setup_driver()
    start_ray(
        lambda: ray.init(
            logging_level=logging.WARNING,
            configure_logging=True,
            log_to_driver=True,
            runtime_env=job_runtime_env(),
        ),
        timeout_s,
    )


#: Environment every process of a job gets (a value already set in the driver's environment wins). Ray
#: Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and only then
#: sees a report or a finished run: a 1-worker run's fit() returned 1.3-1.4 s after its loop ended (0.3-0.6 s
#: at 0.25 s; measured here on a quiet 2-core VM), and a trial queued for those workers waited as long. At
#: 0.5 s a poll costs a few actor calls.
JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def job_runtime_env() -> dict:
    """The runtime environment of a job's ``ray.init``: :data:`JOB_ENV` and the quiet mode's variables
    and worker set-up hook (:func:`lxn_ray.infra.quiet.runtime_env`)."""
    from lxn_ray.infra import quiet

    env = quiet.runtime_env()
    return {
        **env,
        "env_vars": {**{k: os.environ.get(k, v) for k, v in JOB_ENV.items()}, **env.get("env_vars", {})},
    }


#: Ray Serve's HAProxy ingress (Ray >= 2.56; the HAProxy binary comes with ``ray[serve]``): HAProxy listens
#: on Serve's HTTP port and forwards each request straight to a replica's own HTTP server, where Serve's
#: Python proxy hands every request to the replica as an actor call that pulls the body back from the
#: proxy. Read by every Ray process when it starts, so it is set on a Ray instance, not on a deployment.
HAPROXY_INGRESS = "RAY_SERVE_ENABLE_HA_PROXY"


@contextlib.contextmanager
def serve_ingress(kind: str) -> Iterator[None]:
    """While open, the Ray instance this process starts (:func:`connect`) serves HTTP through ``kind``:
    ``"proxy"`` (Serve's Python proxy actor; :data:`HAPROXY_INGRESS` set to 0, whatever the shell exported)
    or ``"haproxy"``, with HAProxy's files in a temporary folder of its own and its metrics and stats
    listeners on free ports - Ray's defaults (``/tmp/haproxy-serve``, ports 9101 and 8404) would collide
    with any other Ray instance on the machine. Ray's processes inherit this process's environment when
    the instance starts; on exit the environment is put back and the folder removed, so shut the
    instance's Serve down first (HAProxy is a process of its own). No effect on a running cluster: set
    :data:`HAPROXY_INGRESS` where it is started. Raises ValueError for another ``kind``.

    HAProxy binds its metrics and stats ports on every interface (Ray's configuration template has no
    address for them), whatever Serve's HTTP host is."""
    if kind not in ("proxy", "haproxy"):
        raise ValueError(f"ingress must be proxy or haproxy, got {kind!r}")
    with contextlib.ExitStack() as stack:
        env = {HAPROXY_INGRESS: "0"}
        if kind == "haproxy":
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxn-haproxy-")))
            env = {
                HAPROXY_INGRESS: "1",
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
                # A stopping replica keeps serving this long so that load balancers stop sending it
                # requests (Ray's default: 30 s, for a cloud balancer); HAProxy marks it down within two
                # health checks (5 s and 0.25 s apart), so 6 s covers the HAProxy of a one-machine instance.
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "6",
            }
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _free_port() -> int:
    """A TCP port free on every interface of this machine now (the system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


class StorageNotShared(RuntimeError):
    """A local storage folder given to a job on a multi-node Ray cluster, whose other nodes cannot
    reach it."""


def joins_running_cluster() -> bool:
    """Whether :func:`connect` would join a running cluster rather than start a local Ray of its own:
    ``$RAY_ADDRESS`` is set (``ray job submit`` sets it) to anything but ``local``, or ``ray start`` left a
    cluster on this machine."""
    import ray
    from ray._private.utils import read_ray_address

    address = os.environ.get("RAY_ADDRESS", "")
    if address == "local":  # ray.init() starts a new local instance, whatever runs here
        return ray.is_initialized()
    return ray.is_initialized() or bool(address) or bool(read_ray_address())


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes (``ray.nodes()`` rows), connecting first."""
    connect()
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def largest_node_cpus() -> int | None:
    """The most CPUs one node can give a new Ray Train worker: the most free now on any alive node, or,
    when no node has a whole CPU free, the most any node has; None without a CPU node.

    A worker lives on one node, so asking for more than that could never be placed, however many CPUs the
    cluster has in all - nor while other work (a Serve replica on every node, say) leaves each node only a
    part of its CPUs (ray-project/ray#37177 is the storage side of the same one-node assumption).
    Per-node free resources come from ``ray._private.state`` (no public API has them in Ray 2.60)."""
    from ray._private import state

    connect()
    free = state.available_resources_per_node()
    alive = alive_nodes()
    totals = [int(node.get("Resources", {}).get("CPU", 0)) for node in alive]
    spare = [int(free.get(node["NodeID"], {}).get("CPU", 0)) for node in alive]
    if max(spare, default=0) >= 1:
        return max(spare)
    return max(totals) if any(totals) else None


def require_reachable_storage(uri: str, shared: bool = False) -> None:
    """Refuse a local storage folder on a multi-node cluster, before the job does any work.

    Ray Train and Tune on more than one node need a ``storage_path`` every node can reach (S3, or a folder
    mounted at the same path everywhere; ray-project/ray#37177), and so do the pixel caches, model files
    and dataset versions every node reads. A local folder (a path or ``file://``) is allowed when this
    process would start its own one-node Ray, when the cluster it joins has one node, or when ``shared``
    says the folder is mounted at the same path on every node (``--shared-storage``). Raises
    :class:`StorageNotShared` otherwise."""
    local = "://" not in uri or uri.startswith("file://")
    if not local or shared or not joins_running_cluster():
        return
    nodes = len(alive_nodes())
    if nodes > 1:
        raise StorageNotShared(
            f"--storage {uri} is a folder on this machine, and the Ray cluster has {nodes} nodes that cannot "
            "all reach it: use --storage s3://BUCKET/PREFIX, or a folder every node mounts at the same path "
            "(NFS, EFS) with --shared-storage"
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
