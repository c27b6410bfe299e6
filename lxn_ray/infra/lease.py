"""A lease lock in storage: at most one holder at a time across processes and machines sharing a store.

Used by scheduled retraining so that two runs (cron ticks, a Ray job, a manual run) never overlap. The
lock is one object (e.g. ``retrain/LOCK``) holding who holds it and until when. It is created with a
conditional write (:meth:`lxn_ray.infra.storage.Storage.create_exclusive`), renewed by its holder from a
background thread, released at the end, and taken over once stale - expired, or its holder process gone
from this host - by a compare-and-swap (:meth:`lxn_ray.infra.storage.Storage.replace_if_unchanged`), so of
several contenders only one wins. Hosts sharing a store need roughly synchronised clocks (expiry compares
them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from lxn_ray.infra.log import get_logger
from lxn_ray.infra.storage import Storage

log = get_logger("lease").info  # progress for the person watching; stdout keeps the summary


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


class LockLost(RuntimeError):
    """This run's lease was taken over (it failed to renew in time): it must not change anything more."""


class LockTimeout(TimeoutError):
    """Another run held the lock for longer than ``--lock-timeout``."""


def _pid_namespace() -> str | None:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _process_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _process_alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` still runs the process that took the lock (not a zombie, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    stat = _process_start(pid)
    if stat is None:
        return True
    state, start = stat
    return state != "Z" and (started is None or start == started)


@dataclass(frozen=True)
class LeaseInfo:
    """What the lock object says: who holds it, since when, and until when unless renewed."""

    holder: str
    host: str
    pid: int
    acquired_at: str
    renewed_at: str
    expires_at: str
    ttl_s: float
    pid_started: str | None = None
    pid_namespace: str | None = None

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        try:
            raw = json.loads(data)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{key: value for key, value in raw.items() if key in known})
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return (
            f"{self.holder} (pid {self.pid} on {self.host}, since {self.acquired_at}, "
            f"expires {self.expires_at})"
        )


class LeaseLock:
    """A lease on ``key`` in storage. Acquire, then ``with lock.holding():`` renews it every TTL/3 from a
    background thread and releases it at the end - only if it is still this holder's.

    Expiry compares the holder's clock with the contender's: hosts sharing a store need clocks that agree
    to well within the TTL (NTP does). A holder on the same host whose process is gone is detected at once.
    """

    def __init__(
        self,
        storage: Storage,
        key: str,
        ttl_s: float = 15 * 60.0,
        poll_s: float = 2.0,
        holder: str | None = None,
    ) -> None:
        self.storage, self.key, self.ttl_s, self.poll_s = storage, key, ttl_s, poll_s
        self.holder = holder or uuid.uuid4().hex[:12]
        self.acquired_at: datetime | None = None
        self.waited_s = 0.0
        self.took_over: dict[str, Any] | None = None  # the stale lease this holder replaced, and why
        self.blocker: LeaseInfo | None = None  # the live lease that kept this one waiting
        self._token: str | None = None
        self._expires_monotonic = 0.0
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._mutex = threading.Lock()  # a renewal (write, then new token) is atomic to ensure_held

    # -- the object's content ---------------------------------------------------------------------------
    def _content(self, acquired_at: datetime, now: datetime) -> bytes:
        start = _process_start(os.getpid())
        lease = LeaseInfo(
            holder=self.holder,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=_iso(acquired_at),
            renewed_at=_iso(now),
            expires_at=_iso(now + timedelta(seconds=self.ttl_s)),
            ttl_s=self.ttl_s,
            pid_started=start[1] if start else None,
            pid_namespace=_pid_namespace(),
        )
        return json.dumps(dataclasses.asdict(lease), indent=2).encode() + b"\n"

    def read(self) -> LeaseInfo | None:
        """The lease currently in storage (None when free or unreadable)."""
        found = self.storage.read_with_token(self.key)
        return LeaseInfo.parse(found[0]) if found else None

    def stale_reason(self, lease: LeaseInfo | None, age_s: float) -> str | None:
        """Why a lease found in storage may be taken over, or None while it is live."""
        if lease is None:  # unreadable (not written by this module): trust it for one TTL
            return "unreadable lock older than its TTL" if age_s > self.ttl_s else None
        if datetime.fromisoformat(lease.expires_at) <= _now():
            return f"expired at {lease.expires_at} (holder {lease.holder} stopped renewing)"
        same_process_space = lease.host == socket.gethostname() and lease.pid_namespace == _pid_namespace()
        if same_process_space and not _process_alive(lease.pid, lease.pid_started):
            return f"its holder {lease.holder} (pid {lease.pid} on {lease.host}) is gone"
        return None

    # -- acquiring -----------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """One attempt: create the lease, or take over a stale one. Never waits."""
        now = _now()
        content = self._content(now, now)
        if self.storage.create_exclusive(self.key, content):
            return self._confirm(now)
        found = self.storage.read_with_token(self.key)
        if found is None:
            return False  # released just now: the next attempt creates it
        data, token = found
        lease = LeaseInfo.parse(data)
        reason = self.stale_reason(lease, self._age_s() if lease is None else 0.0)
        if reason is None:
            self.blocker = lease
            return False
        if not self.storage.replace_if_unchanged(self.key, content, token):
            return False  # another contender took it over first
        log(f"took over a stale lock: {reason}")
        self.took_over = {**(dataclasses.asdict(lease) if lease else {}), "reason": reason}
        return self._confirm(now)

    def _age_s(self) -> float:
        info = self.storage.filesystem.get_file_info(self.storage.path(self.key))
        mtime = info.mtime
        if mtime is None:
            return 0.0
        if mtime.tzinfo is None:
            mtime = mtime.replace(tzinfo=timezone.utc)
        return (_now() - mtime).total_seconds()

    def _confirm(self, acquired_at: datetime | None = None) -> bool:
        """Read back what was written: the token to renew and release with, and proof it is ours."""
        found = self.storage.read_with_token(self.key)
        lease = LeaseInfo.parse(found[0]) if found else None
        if found is None or lease is None or lease.holder != self.holder:
            return False
        self._token = found[1]
        if acquired_at is not None:
            self.acquired_at = acquired_at
        self._expires_monotonic = time.monotonic() + self.ttl_s
        self._lost.clear()
        return True

    def acquire(self, timeout_s: float, wait: bool = True, stop: threading.Event | None = None) -> bool:
        """Take the lock, polling until ``timeout_s`` when it is held; False when ``wait`` is off (or
        ``stop`` is set) and it is held. Raises :class:`LockTimeout` when the deadline passes."""
        started = time.monotonic()
        deadline = started + timeout_s
        announced = False
        while True:
            if self.try_acquire():
                self.waited_s = round(time.monotonic() - started, 1)
                return True
            if not wait or (stop is not None and stop.is_set()):
                return False
            if not announced and self.blocker is not None:
                log(f"waiting for the retrain lock held by {self.blocker.describe()}")
                announced = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                holder = self.blocker.describe() if self.blocker else "another run"
                raise LockTimeout(
                    f"gave up after {timeout_s:g} s waiting for the retrain lock held by {holder}"
                )
            pause = min(self.poll_s, remaining)
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)

    # -- holding -------------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self._token is not None and not self._lost.is_set()

    def renew(self) -> bool:
        """Push the expiry one TTL ahead; False (and the lock marked lost) when it is no longer ours."""
        with self._mutex:
            if self._token is None:
                return False
            assert self.acquired_at is not None
            content = self._content(self.acquired_at, _now())
            if self.storage.replace_if_unchanged(self.key, content, self._token) and self._confirm():
                return True
            self._lost.set()
            return False

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` unless storage still holds exactly this holder's lease. Called right
        before anything is changed (history, promotion)."""
        with self._mutex:
            found = self.storage.read_with_token(self.key) if self._token else None
            if self._lost.is_set() or found is None or found[1] != self._token:
                self._lost.set()
                raise LockLost(
                    f"the retrain lock is no longer held by {self.holder}: another run took it over"
                )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    log(f"lost the retrain lock ({self.holder}): another run took it over")
                    return
            except Exception as error:  # storage hiccup: retry until the lease would expire
                log(f"could not renew the retrain lock: {type(error).__name__}: {error}")
                if time.monotonic() >= self._expires_monotonic:
                    self._lost.set()
                    return

    @contextlib.contextmanager
    def holding(self) -> Iterator[LeaseLock]:
        """Renew in the background while the body runs; release afterwards (only if still ours)."""
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="retrain-lock-renewer", daemon=True)
        self._renewer.start()
        try:
            yield self
        finally:
            self.release()

    def release(self) -> bool:
        """Stop renewing and delete the lease if it is still this holder's; True when deleted."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=30)
        with self._mutex:
            token, self._token = self._token, None
        if token is None:
            return False
        return self.storage.delete_if_unchanged(self.key, token)
