"""Ray's start-up waits as long as a loaded host needs, within a bound, and says what it waited for.

Ray gives a new node's raylet a fixed 30 s to register with the GCS (ray._private.node.Node polls
ray._private.services.get_node); on a loaded host ingest gave up there. These tests drive that same loop
against a GCS that answers late or never, on a simulated clock: no Ray is started and nothing sleeps."""

from __future__ import annotations

import os

import pytest
import ray._private.services as services

from lxn_ray.infra import cluster


class Clock:
    """A monotonic clock that moves only when something waits on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def late_gcs(clock: Clock, ready_after_s: float):
    """A node lookup that fails, as Ray's does, until ``ready_after_s`` have passed."""
    started = clock()

    def get_node(gcs_address: str, node_id: str) -> dict:
        clock.sleep(0.05)  # an RPC takes time
        if clock() - started < ready_after_s:
            raise RuntimeError(f"node {node_id} not found")
        return {"node_id": node_id}

    return get_node


def ray_node_start(clock: Clock):
    """What ``ray.init`` does after starting the processes: Ray's own fixed 30 s registration loop."""

    def init() -> None:
        started = clock()
        while True:
            try:
                services.get_node("127.0.0.1:6379", "abc")
                return
            except RuntimeError:
                pass
            if clock() - started > 30:
                raise Exception(
                    "The current node timed out during startup. This could happen because some of the "
                    "raylet failed to startup or the GCS has become overloaded."
                )
            clock.sleep(0.1)

    return init


@pytest.fixture
def clock(monkeypatch) -> Clock:
    monkeypatch.setenv(cluster.GCS_PORT_WAIT_ENV, "30")  # start_ray sets it only when unset
    return Clock()


def test_a_raylet_that_registers_after_30_s_on_a_loaded_host_is_waited_for(clock, monkeypatch):
    monkeypatch.setattr(services, "get_node", late_gcs(clock, ready_after_s=95))
    original = services.get_node
    cluster.start_ray(ray_node_start(clock), timeout_s=300, clock=clock, pause=clock.sleep)
    assert 95 <= clock() - 1000.0 < 97
    assert services.get_node is original  # Ray's lookup is back as it was


def test_start_up_gives_up_at_the_bound_and_says_what_it_waited_for(clock, monkeypatch):
    monkeypatch.setattr(services, "get_node", late_gcs(clock, ready_after_s=10_000))
    with pytest.raises(cluster.RayStartupError) as raised:
        cluster.start_ray(ray_node_start(clock), timeout_s=120, clock=clock, pause=clock.sleep)
    message = str(raised.value)
    assert "raylet to register with the GCS at 127.0.0.1:6379" in message
    assert "waited 120 s" in message and cluster.STARTUP_TIMEOUT_ENV in message and "120 s" in message
    assert 120 <= clock() - 1000.0 < 122  # bounded: it gave up at the bound, not Ray's 30 s, nor later


def test_other_start_up_failures_are_raised_as_they_are(clock):
    def init() -> None:
        raise ValueError("When connecting to an existing cluster, num_cpus must not be provided.")

    with pytest.raises(ValueError, match="num_cpus"):
        cluster.start_ray(init, timeout_s=60, clock=clock, pause=clock.sleep)


def test_the_gcs_port_wait_is_stretched_to_the_bound_unless_set(monkeypatch):
    monkeypatch.setenv(cluster.GCS_PORT_WAIT_ENV, "")  # recorded, so teardown restores the session's
    monkeypatch.delenv(cluster.GCS_PORT_WAIT_ENV)
    cluster.start_ray(lambda: None, timeout_s=240.5)
    assert os.environ[cluster.GCS_PORT_WAIT_ENV] == "241"
    monkeypatch.setenv(cluster.GCS_PORT_WAIT_ENV, "45")
    cluster.start_ray(lambda: None, timeout_s=240)
    assert os.environ[cluster.GCS_PORT_WAIT_ENV] == "45"  # the operator's own setting stands


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, cluster.DEFAULT_STARTUP_TIMEOUT_S), ("", 300.0), ("900", 900.0), (" 45.5 ", 45.5)],
)
def test_the_bound_is_configurable(value, expected):
    environ = {} if value is None else {cluster.STARTUP_TIMEOUT_ENV: value}
    assert cluster.startup_timeout_s(environ) == expected


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf"])
def test_a_bound_that_is_not_a_positive_number_is_refused_naming_the_variable(value):
    with pytest.raises(ValueError, match=cluster.STARTUP_TIMEOUT_ENV):
        cluster.startup_timeout_s({cluster.STARTUP_TIMEOUT_ENV: value})


def test_a_failure_after_the_raylet_registered_is_not_called_a_timeout(clock, monkeypatch):
    monkeypatch.setattr(services, "get_node", late_gcs(clock, ready_after_s=40))
    node_start = ray_node_start(clock)

    def init() -> None:
        node_start()
        raise ConnectionError("the dashboard agent failed")

    with pytest.raises(ConnectionError, match="dashboard agent"):
        cluster.start_ray(init, timeout_s=300, clock=clock, pause=clock.sleep)
