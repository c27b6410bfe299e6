"""What a job holds on the Ray cluster, how it gives it back, and a watchdog against endless waits.

Why this module exists. A Ray Train (V2) run reserves its workers in a placement group that its
controller actor creates. Ray removes a placement group only when both the job and the actor that created
it are dead, so when a controller dies without shutting its worker group down - Tune stopping a trial
(ASHA, ``max_t``, a time budget, the end of the search), a trial erroring, a watchdog ending a run - the
group stays ``CREATED`` for as long as the job lives, holding its CPUs. Ray Train's own
``PlacementGroupCleaner`` removes it through the State API, whose address auto-detection fails whenever
another Ray instance runs on the same machine ("Found multiple active Ray instances"); a 2-CPU search then
waited forever for CPUs its own finished trials still held (issue 11).

So every job keeps its own books:

- :func:`release_orphans` removes each placement group that *this job* created from an actor that has
  since died - the rule Ray applies once the job is dead, applied as soon as the creator is - and never
  touches another job's groups, nor groups created by a driver (Tune's own trial groups) or detached ones.
- :class:`Watchdog` ends endless waits: when nothing made progress for ``stall_timeout_s`` while the
  cluster could take on no new work (demands it cannot place, or CPUs reserved by placement groups that
  nothing uses while none are free), :meth:`Watchdog.check` returns one diagnosis naming who holds the
  resources (placement groups, with their jobs), the pending demands, and what the job was doing.
- :func:`point_ray_train_at_this_cluster` repairs Ray Train's own cleaner on such machines, so it also
  exits instead of idling for the cluster's lifetime (one leaked process per training run).
- :func:`run_watched` runs a driver-side step (a training run) in an actor of this job, so that a stalled
  or interrupted step is ended by killing that actor - everything it started dies with it - and its
  placement groups are released before the caller sees the error.

The GCS placement-group table is read directly: ``ray.util.placement_group_table`` omits the creator,
and the State API needs the dashboard and the address auto-detection that failed above.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lxn_ray.infra.log import get_logger

POLL_S = 2.0  # how often drivers look for orphaned groups and at what the cluster cannot place
DEFAULT_STALL_TIMEOUT_S = 600.0  # --stall-timeout-s: 10 minutes without progress while demands wait


class StalledError(RuntimeError):
    """Nothing made progress for the stated time while the cluster could take on no new work."""


log = get_logger("resources").info  # progress for the person watching; stdout keeps the summary


# -- placement groups ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupInfo:
    """One placement group as the GCS records it. ``resources``: its bundles summed, e.g. {"CPU": 2.0}."""

    id: str  # hex
    state: str  # PENDING | PREPARED | CREATED | RESCHEDULING | REMOVED
    job_id: str  # hex id of the job that created it
    by_actor: bool  # created by an actor (a Ray Train controller), not by a driver
    creator_dead: bool  # that actor has died (always True for a driver-created group)
    detached: bool
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.state != "REMOVED"

    def describe(self, own_job: str | None = None) -> str:
        owner = "this job" if self.job_id == own_job else f"job {self.job_id}"
        creator = ("dead actor" if self.creator_dead else "live actor") if self.by_actor else "driver"
        held = format_resources(self.resources)
        return f"{self.id[:12]} {self.state} {held} ({owner}, created by {creator})"


def placement_groups() -> list[GroupInfo]:
    """Every placement group the cluster's GCS knows, removed ones included (they linger a while)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = table.FromString(raw)
        resources: dict[str, float] = {}
        for bundle in data.bundles:
            for name, amount in bundle.unit_resources.items():
                resources[name] = resources.get(name, 0.0) + amount
        groups.append(
            GroupInfo(
                id=data.placement_group_id.hex(),
                state=table.PlacementGroupState.Name(data.state),
                job_id=data.creator_job_id.hex(),
                by_actor=any(byte != 0xFF for byte in data.creator_actor_id),  # nil id: all 0xff
                creator_dead=bool(data.creator_actor_dead),
                detached=bool(data.is_detached),
                resources=resources,
            )
        )
    return groups


def current_job_id() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


def orphans(job_id: str, groups: list[GroupInfo] | None = None) -> list[GroupInfo]:
    """This job's live groups whose creating actor has died: nobody can use or free them any more."""
    return [
        group
        for group in (placement_groups() if groups is None else groups)
        if group.live
        and group.job_id == job_id
        and group.by_actor
        and group.creator_dead
        and not group.detached
    ]


def release_orphans(job_id: str | None = None) -> list[GroupInfo]:
    """Remove this job's orphaned placement groups (see :func:`orphans`); returns the ones removed.

    Safe to call at any time and from any of the job's drivers: a live actor's group, a driver's group,
    a detached group and every other job's group are left alone.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for group in orphans(job_id or current_job_id()):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group.id))))
            removed.append(group)
        except Exception as error:  # removed meanwhile (by Ray Train's own cleaner): nothing left to do
            log(f"placement group {group.id[:12]} could not be removed: {type(error).__name__}: {error}")
    return removed


def await_release(job_id: str, timeout_s: float = 60.0) -> tuple[list[GroupInfo], list[GroupInfo]]:
    """After a step that started Ray Train runs has ended: wait (bounded) until none of its controllers
    is alive any more, releasing orphans as they appear. Returns (the groups released here, the groups
    still live after the wait - empty when everything was given back)."""
    deadline = time.monotonic() + timeout_s
    released: list[GroupInfo] = []
    while True:
        released += release_orphans(job_id)
        held = [g for g in placement_groups() if g.live and g.job_id == job_id and g.by_actor]
        if not held or time.monotonic() > deadline:
            return released, held
        time.sleep(0.2)


def point_ray_train_at_this_cluster() -> None:
    """Call in the process that runs ``trainer.fit()`` (a Tune trial, a watched step), before it.

    Ray Train's ``PlacementGroupCleaner``, a detached actor its controller starts, finds the cluster by
    address auto-detection, which fails when another Ray instance runs on the same machine ("Found
    multiple active Ray instances ... set RAY_ADDRESS"); its monitor thread then dies and the actor idles
    for the cluster's lifetime. Ray Train passes the variables in ``ENV_VARS_TO_PROPAGATE`` from the
    process calling ``fit`` into its controller's runtime environment, which the cleaner inherits; adding
    ``RAY_ADDRESS``, set to the cluster this process is connected to, lets the cleaner find it.
    """
    import ray
    from ray.train.v2._internal import constants

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")


# -- what waits, and the watchdog --------------------------------------------------------------------
def format_resources(resources: dict[str, float]) -> str:
    shown = {name: amount for name, amount in resources.items() if name in ("CPU", "GPU") and amount}
    if not shown:
        shown = {name: amount for name, amount in resources.items() if not name.startswith("node:")}
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in sorted(shown.items())) + "}"


def pending_demands(status: Any = None) -> list[str]:
    """What the cluster cannot place now, as ``ray status`` shows it: task/actor bundles and pending
    placement groups, e.g. ``["{CPU: 1} x 2 (tasks/actors)"]``. Empty when everything is placed.
    ``status``: an autoscaler ``ClusterStatus`` already fetched (default: fetched here)."""
    demands = (status or cluster_status()).resource_demands
    lines = []
    for demand in demands.ray_task_actor_demand:
        for request in demand.bundles_by_count:
            lines.append(f"{format_resources(request.bundle)} x {request.count} (tasks/actors)")
    for demand in demands.placement_group_demand:
        bundles = " + ".join(
            f"{format_resources(request.bundle)} x {request.count}" for request in demand.bundles_by_count
        )
        lines.append(f"placement group {(demand.pg_id or '?')[:12]} {bundles} ({demand.state or 'PENDING'})")
    return lines


def cluster_status() -> Any:
    """The autoscaler's view of the cluster (``ray status``): nodes, launches, resource demands."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    return get_cluster_status(ray.get_runtime_context().gcs_address)


# "CPU_group_<id>" (no bundle index) is what is still free inside placement group <id>.
IN_GROUP = {unit: re.compile(rf"{unit}_group_[0-9a-f]+") for unit in ("CPU", "GPU")}


def idle_reservations() -> list[str]:
    """CPUs/GPUs that placement groups reserve and nothing uses, when none are free: a group left behind
    (or another job's idle hold) starves everyone, even while nothing is queued - Ray Data, for one,
    holds its tasks back rather than queue them when the cluster has no free CPU."""
    import ray

    available = ray.available_resources()
    lines = []
    for unit in ("CPU", "GPU"):
        idle = sum(amount for name, amount in available.items() if IN_GROUP[unit].fullmatch(name))
        if idle > 0 and available.get(unit, 0.0) < 1:
            lines.append(f"{idle:g} {unit} reserved in placement groups but unused, none free")
    return lines


def blocked_reasons() -> list[str]:
    """Why the cluster cannot take on new work now (empty when it can): its pending demands, and idle
    reservations while nothing is free (:func:`idle_reservations`). A cluster whose autoscaler is
    launching nodes is growing to meet its demands, not blocked (a GPU node can take minutes to boot)."""
    status = cluster_status()
    if status.pending_launches or status.pending_nodes:
        return []
    return pending_demands(status) + idle_reservations()


def cluster_picture(job_id: str, blocked: list[str]) -> str:
    """Who holds what and what waits: cluster CPUs/GPUs, live placement groups with their jobs, and
    ``blocked`` (:func:`blocked_reasons`: pending demands, idle reservations)."""
    import ray

    total, available = ray.cluster_resources(), ray.available_resources()
    capacity = ", ".join(
        f"{available.get(name, 0.0):g}/{total[name]:g} {name} free"
        for name in ("CPU", "GPU")
        if name in total
    )
    held = [group.describe(job_id) for group in placement_groups() if group.live]
    return (
        f"cluster: {capacity}; placement groups holding resources: {'; '.join(held) or 'none'}; "
        f"pending demands and idle reservations: {'; '.join(blocked) or 'none'}"
    )


@dataclass
class Watchdog:
    """Says when a job has stalled: no :meth:`progress` for ``stall_timeout_s`` seconds while the cluster
    could take on no new work for that long (:func:`blocked_reasons`: demands it cannot place, or idle
    reservations while nothing is free). ``stall_timeout_s`` <= 0 turns it off.

    A driver calls :meth:`progress` on every sign of life (a trial's result, an epoch's checkpoint) and
    :meth:`check` as often as it likes; the cluster is polled at most every ``poll_s`` seconds.
    """

    stall_timeout_s: float
    what: str  # names the job in the diagnosis, e.g. "search tune-abc"
    poll_s: float = POLL_S
    clock: Callable[[], float] = time.monotonic
    stalled: str | None = field(default=None, init=False)  # the diagnosis, once stalled
    _last_progress: float = field(default=0.0, init=False, repr=False)
    _pending_since: float | None = field(default=None, init=False, repr=False)
    _last_poll: float = field(default=float("-inf"), init=False, repr=False)

    def __post_init__(self) -> None:
        self._last_progress = self.clock()

    def progress(self) -> None:
        self._last_progress = self.clock()

    def check(self, activity: Callable[[], str] | None = None) -> str | None:
        """The diagnosis once stalled (and on every later call), else None. ``activity``: what the job was
        doing (trials and their states), called only for the diagnosis."""
        if self.stalled is not None or self.stall_timeout_s <= 0:
            return self.stalled
        now = self.clock()
        if now - self._last_poll < self.poll_s:
            return None
        self._last_poll = now
        pending = blocked_reasons()
        if not pending:
            self._pending_since = None
            return None
        if self._pending_since is None:
            self._pending_since = now
        waited = now - max(self._pending_since, self._last_progress)
        if waited < self.stall_timeout_s:
            return None
        doing = activity() if activity is not None else ""
        self.stalled = (
            f"{self.what} made no progress for {waited:.0f} s while the cluster could take on no new work "
            f"(--stall-timeout-s {self.stall_timeout_s:g}). {cluster_picture(current_job_id(), pending)}"
            + (f"; {doing}" if doing else "")
            + ". Free those resources or give the cluster more, then rerun."
        )
        return self.stalled


# -- a watched driver step ----------------------------------------------------------------------------
class _Step:
    """An actor of this job that runs one driver-side step, so the step can be ended from outside."""

    def run(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return function(*args, **kwargs)


def run_watched(
    function: Callable[..., Any],
    *args: Any,
    watchdog: Watchdog,
    progress: Callable[[], Any] = lambda: None,
    activity: Callable[[], str] | None = None,
    **kwargs: Any,
) -> Any:
    """``function(*args, **kwargs)`` in a 0-CPU actor of this job, watched from the driver.

    ``progress()`` is polled every ``watchdog.poll_s``; any change of its value counts as progress. When
    the watchdog says the step stalled, or the driver is interrupted (KeyboardInterrupt), the actor is
    killed - the Ray Train controller it owns, its workers and its Ray Data tasks die with it - and the
    job's orphaned placement groups are released before :class:`StalledError` (or the interrupt) reaches
    the caller. The function's own exceptions are re-raised as Ray delivers them (a ``RayTaskError`` that
    is also an instance of the original exception type).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lxn_ray.infra import cluster

    cluster.connect()
    job_id = current_job_id()
    # On this driver's node, as Ray Train places its controller: local storage paths stay valid.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    step = ray.remote(num_cpus=0, max_restarts=0)(_Step).options(scheduling_strategy=here).remote()
    reference = step.run.remote(function, args, kwargs)
    seen = progress()
    try:
        while True:
            done, _ = ray.wait([reference], timeout=watchdog.poll_s)
            if done:
                return ray.get(reference)
            now = progress()
            if now != seen:
                seen = now
                watchdog.progress()
            diagnosis = watchdog.check(activity)
            if diagnosis is not None:
                raise StalledError(diagnosis)
    finally:
        ray.kill(step, no_restart=True)
        _, left = await_release(job_id, timeout_s=30.0)
        if left:
            log(f"still held after the step ended: {'; '.join(g.describe(job_id) for g in left)}")
