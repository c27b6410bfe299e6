"""Quiet by default: a job prints its own lines and the warnings that matter; ``--verbose`` prints all.

Left alone, a two-minute training job prints ~190 lines for its ~20 own ones, from every process Ray
starts: TensorFlow's C++ start-up lines and CUDA probes (absl logging), Ray Data's execution plans and
progress notices, Ray Train's checkpoint notices. Each is silenced at its source, in the driver and in
every Ray worker of the job:

- the environment (:data:`QUIET_ENV`): TensorFlow's and gRPC's C++ logging above errors, set before
  TensorFlow loads - in the driver by :func:`configure`, in workers through the job's runtime
  environment (:func:`runtime_env`);
- TensorFlow's load itself: its CUDA probes and absl's "before InitializeLog" notice are written to
  file descriptor 2 while the library loads, before any setting applies, so the first import of
  ``tensorflow`` / ``keras`` runs with that descriptor on /dev/null (:class:`_QuietImport`) - Python
  errors still raise as usual;
- Python loggers: Ray Data's console handler, Ray Train's and Ray Tune's loggers at WARNING, set in
  the driver and, through Ray's ``worker_process_setup_hook``, in each worker as it starts
  (:func:`setup_worker`); Ray Data's one-time "progress bars disabled" notice is dropped, since
  disabling them off a terminal is this module's choice; Ray Train's own logging at WARNING through
  its ``LoggingConfig`` (:func:`train_log_level`);
- Ray Data progress bars only when stderr is a terminal, and no execution plan at each start;
- what Ray forwards to the driver from other processes: each line once (no log deduplication, which
  printed lines again), without colour codes off a terminal, and without the notices listed in
  :data:`FORWARDED_NOISE` (:func:`setup_driver`); Ray's token-authentication notice is dropped too.

``--verbose`` (or ``LXN_VERBOSE=1``) leaves every library as it is. Nothing happens at import.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Iterator

VERBOSE_ENV = "LXN_VERBOSE"
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow C++: errors only in verbose runs (absl INFO/WARNING/ERROR off)
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "3",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",  # libraries' deprecation notices, not the user's business
    # Ray Tune's legacy output engine, which verbose=0 silences; the new one prints a configuration box,
    # a results path and a TensorBoard hint whatever the verbosity
    "RAY_AIR_NEW_OUTPUT": "0",
}
QUIET_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.serve", "absl", "tensorflow", "optuna")
# Ray Train's worker context logs each report ("Reporting training result ...") at INFO through a logger
# named after its file, outside the "ray.train" hierarchy its LoggingConfig governs.
RAY_TRAIN_CONTEXT = ("train", "v2", "_internal", "execution", "context.py")
# Ray 2.60 warns on every ray.init that token authentication is on - the setting this project keeps
# (docs/clusters.md); the notice is dropped, a warning that it is OFF is not (it is another message).
AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
NOISE = (
    "Progress bars disabled",
    "Progress bars for operators disabled",
    "Detected that the Ray Train controller actor",  # Ray Train cleaning up after each finished run
    AUTH_NOTICE,
)
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def verbose() -> bool:
    """Whether this process runs verbosely (``LXN_VERBOSE=1``, which ``--verbose`` sets)."""
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def train_log_level() -> str:
    """Ray Train's ``LoggingConfig(log_level=...)`` for this mode."""
    return "INFO" if verbose() else "WARNING"


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs the first import of ``tensorflow`` or ``keras`` with file descriptor 2 on /dev/null."""

    NAMES = frozenset({"tensorflow", "keras"})

    def find_spec(self, name, path, target=None):
        if name not in self.NAMES or name in sys.modules:
            return None
        self.NAMES = self.NAMES - {name}
        if not self.NAMES:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the real finders (this one no longer answers for name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            with _stderr_to_devnull():
                run(module)

        spec.loader.exec_module = exec_module
        return spec


def _quiet_imports() -> None:
    if not any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def configure(be_verbose: bool) -> None:
    """Set this job's mode in its environment (the driver, before TensorFlow or Ray is imported); the
    driver's loggers are quieted when it connects to Ray (:func:`setup_driver`)."""
    os.environ[VERBOSE_ENV] = "1" if be_verbose or verbose() else "0"
    if not sys.stderr.isatty():  # colour codes only on a terminal, not in a saved log (Ray's worker prefix)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if verbose():
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    _quiet_imports()


# Lines Ray forwards to the driver from other processes that say nothing a user can act on in a normal
# run (regular expressions, searched in each line; with --verbose every line is printed, and Ray's session
# logs keep them all):
FORWARDED_NOISE = re.compile(
    "|".join(
        (
            # the raylet's notice at every few worker processes started: a Tune trial is 4-5 actors
            # (trainable, Train controller, Train worker, Ray Data's split coordinator; ray-project/ray#3644)
            r"PYTHON worker processes have been started on node",
            # Ray core's C++ error about Ray Train's own PreemptionWatcher actor (ray-project/ray#53727)
            r"has constructor arguments in the object store and max_restarts > 0",
            # serve.shutdown() killing Serve's controller while its own graceful shutdown call is retried
            r"Task ServeController\.\w+ failed\. .*killed by `ray\.kill`",
            # a trial's helpers (Ray Data's split coordinator, its read tasks) dumping their stacks when
            # Tune ends the trial with SIGTERM: the C++ failure handler's banner and frames
            r"\*\*\* SIGTERM received at time=",
            r"@\s+0x[0-9a-f]{6,}\s",
            # faulthandler's dump of such a helper aborting as it is torn down ("Mutex corrupt: waiting
            # writer with no waiters", then "Fatal Python error: Aborted" and its threads' frames, which
            # read `File "...", line N in f` - no comma, unlike a Python traceback, which is kept)
            r"Mutex corrupt: ",
            r"^Fatal Python error: Aborted",
            r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):",
            r'^\s*File ".*", line \d+ in \S+$',
            r"^Extension modules: ",
        )
    )
)


# A block Python prints when the SIGTERM that ends a trial's worker lands in Ray Data's iterator finaliser:
# "Exception ignored in: <function _ClosingIterator.__del__ ...>", the traceback into Ray's SIGTERM
# handler, then "SystemExit: N" - dropped whole, its indented frames and "Traceback" line included.
SIGTERM_IN_FINALISER = re.compile(r"^Exception ignored in: <function _ClosingIterator\.__del__")
_BLOCK_LINE = re.compile(r"^(\s|Traceback \(most recent call last\):)")
_BLOCK_END = re.compile(r"^SystemExit: ")

_also_dropped: list[re.Pattern[str]] = []


def drop_forwarded(pattern: str) -> None:
    """Also drop forwarded lines that match ``pattern`` (a regular expression) in this process: noise
    only where the caller knows it is (a warning about other nodes on a Ray instance of one machine)."""
    compiled = re.compile(pattern)
    if compiled not in _also_dropped:
        _also_dropped.append(compiled)


def setup_driver() -> None:
    """Quiet the driver's library loggers and the lines Ray forwards to it (called before it connects)."""
    if not verbose():
        _quiet_loggers()
        _filter_forwarded_lines()


def _filter_forwarded_lines() -> None:
    """Drop :data:`FORWARDED_NOISE` from the lines Ray prints on the driver for its workers and raylet,
    and print every forwarded line once (Ray's log deduplication holds similar lines back and prints
    them again, with colour codes, as "[repeated Nx across cluster]").

    Ray has no public filter for forwarded lines (ray-project/ray#63800), so this wraps
    ``ray._private.worker.print_to_stdstream`` - the one function both the log and the error listener
    print through - before ``ray.init`` binds it; where a Ray release lacks it, nothing changes."""
    import ray._private.ray_logging as ray_logging
    import ray._private.worker as ray_worker

    ray_logging.RAY_DEDUP_LOGS = False  # read at each call; the env var only at import
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_lxn_filtered", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        lines = kept_forwarded(data.get("lines", []))
        if lines:
            original({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    print_to_stdstream._lxn_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def kept_forwarded(lines: list[str]) -> list[str]:
    """The forwarded ``lines`` (one process's, in order) worth printing: without :data:`FORWARDED_NOISE`,
    the patterns of :func:`drop_forwarded`, and whole :data:`SIGTERM_IN_FINALISER` blocks (a block ends at
    its ``SystemExit`` line, or before the first line that is not part of a traceback, which is kept)."""
    kept, in_block = [], False
    for line in lines:
        if in_block:
            if _BLOCK_END.search(line):
                in_block = False
                continue
            if _BLOCK_LINE.search(line):
                continue
            in_block = False
        if SIGTERM_IN_FINALISER.search(line):
            in_block = True
        elif not FORWARDED_NOISE.search(line) and not any(p.search(line) for p in _also_dropped):
            kept.append(line)
    return kept


def runtime_env() -> dict:
    """The job-level runtime environment that carries the mode to every worker (empty when verbose)."""
    if verbose():
        return {}
    env = {name: os.environ.get(name, value) for name, value in QUIET_ENV.items()}
    return {
        "env_vars": {**env, VERBOSE_ENV: "0"},
        "worker_process_setup_hook": "lxn_ray.infra.quiet.setup_worker",
    }


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: quiet this worker's Python loggers as it starts."""
    if not verbose():
        _quiet_imports()
        _quiet_loggers()


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(noise) for noise in NOISE)


def _quiet_loggers() -> None:
    """Library loggers' console output at WARNING, without Ray Data's progress-bar notice; their log files
    keep everything.

    Ray Data configures its logger when ``ray.data`` is first imported (a console handler at INFO beside
    a DEBUG file), so it is imported here first and its handlers adjusted after."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.print_on_execution_start = False
    for logger in (logging.getLogger(), logging.getLogger("ray")):  # what propagates there, unfiltered
        for handler in logger.handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
    auth = logging.getLogger(AUTH_LOGGER)
    if not any(isinstance(f, _DropNoise) for f in auth.filters):
        auth.addFilter(_DropNoise())
    ray_root = os.path.dirname(sys.modules["ray"].__file__)
    logging.getLogger(os.path.join(ray_root, *RAY_TRAIN_CONTEXT)).setLevel(logging.WARNING)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        consoles = [
            handler
            for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and type(handler).__name__ != "SessionFileHandler"
        ]
        if name != "ray.data":  # Ray Data's own file log keeps everything; the others are console only
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        for handler in consoles:
            handler.setLevel(max(handler.level, logging.WARNING))
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
