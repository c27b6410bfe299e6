"""A real multi-node Ray cluster on this one machine, for the cluster tests.

Every node is its own ``ray start --block`` process in its own process group, as on a real cluster: a head
that takes no work (0 CPUs: only the GCS, the dashboard, job drivers and 0-CPU coordinators live there)
and worker nodes with CPUs and a custom resource naming them. Each node gets ports of its own (so it runs
beside any other Ray on the machine), token authentication stays on with a token of this cluster's own,
and a worker node is "lost" the way a spot instance is: its whole process group (raylet, object store,
workers) is killed at once. Jobs go in through ``ray job submit`` from a folder that is not the checkout.

Nothing here stops anything it did not start: :meth:`LocalCluster.stop` kills its own nodes' process
groups by id.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import free_port

RAY = str(Path(sys.executable).with_name("ray"))
NODE_START_TIMEOUT_S = 240.0  # a loaded 2-core host has needed more than Ray's own 30 s per node
JOB_TIMEOUT_S = 900.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _node_ports() -> list[str]:
    """Flags giving a node ports of its own: several nodes share this host, and other Ray instances may run
    beside them (Ray's defaults - 52365, 10001, 8076, ... - would collide)."""
    ports = (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    )
    return [part for name in ports for part in (name, str(free_port()))]


@dataclass
class Node:
    """One ``ray start --block`` process (the leader of its own process group) and its log."""

    name: str
    process: subprocess.Popen
    log: Path
    resource: str | None = None  # the custom resource only this node has (worker nodes)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """Lose the node: SIGKILL to its whole process group (raylet, object store, its workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class JobResult:
    submission_id: str
    status: str
    logs: str

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


@dataclass
class LocalCluster:
    """A head (0 CPUs) and worker nodes (``worker_cpus`` each), all on 127.0.0.1, under ``root``."""

    root: Path
    env: dict[str, str]  # what every node and every `ray job submit` runs with (S3 endpoint, token)
    worker_cpus: int = 2
    object_store_bytes: int = 150_000_000
    nodes: dict[str, Node] = field(default_factory=dict)
    job_seconds: dict[str, float] = field(default_factory=dict)  # what each kind of job took, in all
    # Serve starts its proxy once per cluster, on the port of the first deployment: every test's app uses it
    serve_port: int = field(default_factory=free_port)

    @classmethod
    def start(cls, root: Path, workers: int = 2, worker_cpus: int = 2, extra_env: dict | None = None):
        env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
        env.update(extra_env or {})
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(16),
            PYTHONUNBUFFERED="1",
            # A lost node is declared dead after 5 missed health checks: 5 s instead of the default 15 s.
            RAY_health_check_period_ms="1000",
        )
        root.mkdir(parents=True, exist_ok=True)
        cluster = cls(root=root, env=env, worker_cpus=worker_cpus)
        try:
            cluster._start_head()
            for index in range(workers):
                cluster.add_worker(f"worker{index}")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    # -- nodes ----------------------------------------------------------------------------------------
    def _launch(self, name: str, arguments: list[str], resource: str | None = None) -> Node:
        log = self.root / f"{name}.log"
        process = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", *arguments, *_node_ports()],
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killing it loses exactly this node
        )
        node = self.nodes[name] = Node(name, process, log, resource)
        return node

    def _start_head(self) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.temp_dir = Path(f"/tmp/lxn-cluster-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths
        self._launch(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={free_port()}",
                "--num-cpus=0",  # the head takes no training work: trials, Train workers, tasks go to workers
                f"--object-store-memory={self.object_store_bytes}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=true",
            ],
        )
        self._wait_until(lambda: self._api("/api/version", quiet=True) is not None, "the head's dashboard")
        self._wait_for_nodes(1)

    def add_worker(self, name: str) -> Node:
        """Start a worker node named ``name`` (custom resource ``node_<name>``) and wait until it is alive."""
        resource = f"node_{name}"
        arguments = [
            f"--address=127.0.0.1:{self.gcs_port}",
            f"--num-cpus={self.worker_cpus}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--resources={json.dumps({resource: 1})}",
        ]
        node = self._launch(name, arguments, resource)
        self._wait_until(lambda: self.node_id(name) is not None, f"worker node {name} to join", node)
        return node

    def kill_worker(self, name: str) -> float:
        """Lose worker node ``name`` at once; returns the monotonic time of the kill."""
        killed = time.monotonic()
        self.nodes[name].kill()
        return killed

    def stop(self) -> None:
        """Kill this cluster's own nodes (by their process groups), workers first, then the head."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            self.nodes[name].kill()

    # -- state ----------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _api(self, path: str, quiet: bool = False, data: bytes | None = None) -> Any:
        request = urllib.request.Request(
            self.address + path,
            data=data,
            headers={
                "Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            if quiet:
                return None
            raise AssertionError(f"{path}: HTTP {error.code}: {error.read()[:2000]!r}") from error
        except OSError:
            if quiet:
                return None
            raise
        return json.loads(body) if body.strip().startswith((b"{", b"[")) else body.decode()

    def state(self, kind: str, **filters: str) -> list[dict[str, Any]]:
        """Ray's state API (``/api/v0/<kind>``: nodes, actors, tasks, placement_groups), with details."""
        query = "&".join(
            f"filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items()
        )
        answer = self._api(f"/api/v0/{kind}?detail=1&limit=10000{'&' + query if query else ''}")
        return answer["data"]["result"]["result"]

    def _name_of(self, row: dict[str, Any]) -> str | None:
        if row["is_head_node"]:
            return "head"
        total = row.get("resources_total") or {}
        return next((n for n, node in self.nodes.items() if node.resource and node.resource in total), None)

    def node_id(self, name: str) -> str | None:
        """The Ray node id of ``name`` while it is alive; None before it joins or after it is lost."""
        rows = self.state("nodes", state="ALIVE")
        return next((row["node_id"] for row in rows if self._name_of(row) == name), None)

    def node_names(self, include_dead: bool = False) -> dict[str, str]:
        """{node id: name} of the nodes alive now (and with ``include_dead``, of those lost too)."""
        rows = self.state("nodes") if include_dead else self.state("nodes", state="ALIVE")
        return {row["node_id"]: self._name_of(row) or "?" for row in rows}

    def _wait_for_nodes(self, count: int) -> None:
        self._wait_until(lambda: len(self.state("nodes", state="ALIVE")) >= count, f"{count} node(s)")

    def _wait_until(
        self, condition, what: str, node: Node | None = None, timeout_s: float = NODE_START_TIMEOUT_S
    ):
        deadline = time.monotonic() + timeout_s
        while not condition():
            for watched in [node or self.nodes["head"]]:
                if not watched.alive:
                    raise RuntimeError(
                        f"{watched.name} exited waiting for {what}:\n{watched.log.read_text()[-3000:]}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.25)

    # -- jobs -----------------------------------------------------------------------------------------
    def submit(self, entrypoint: list[str], working_dir: Path, env: dict[str, str] | None = None) -> str:
        """``ray job submit --no-wait --working-dir . -- ENTRYPOINT`` run from ``working_dir``; returns the
        submission id. ``env``: variables the job's processes get (its runtime environment)."""
        submission_id = f"lxn-test-{uuid.uuid4().hex[:10]}"
        command = [RAY, "job", "submit", "--address", self.address, "--no-wait"]
        command += ["--submission-id", submission_id, "--working-dir", "."]
        if env:
            command += ["--runtime-env-json", json.dumps({"env_vars": env})]
        completed = subprocess.run(
            [*command, "--", *entrypoint], cwd=working_dir, env=self.env, capture_output=True, text=True
        )
        assert completed.returncode == 0, f"ray job submit failed:\n{completed.stdout}\n{completed.stderr}"
        return submission_id

    def job_status(self, submission_id: str) -> str:
        return self._api(f"/api/jobs/{submission_id}")["status"]

    def job_logs(self, submission_id: str) -> str:
        return self._api(f"/api/jobs/{submission_id}/logs")["logs"]

    def wait(self, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> JobResult:
        """Block until the job ends (or fail after ``timeout_s``); its status and logs."""
        deadline = time.monotonic() + timeout_s
        while (status := self.job_status(submission_id)) not in TERMINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {submission_id} still {status} after {timeout_s:.0f} s:\n"
                    f"{self.job_logs(submission_id)[-4000:]}"
                )
            time.sleep(0.5)
        return JobResult(submission_id, status, self.job_logs(submission_id))

    def run(self, entrypoint: list[str], working_dir: Path, **options: Any) -> JobResult:
        """Submit and wait; fails the test with the job's logs when it does not succeed."""
        result = self.wait(self.submit(entrypoint, working_dir, options.pop("env", None)), **options)
        assert result.succeeded, f"{' '.join(entrypoint)}: {result.status}\n{result.logs[-6000:]}"
        return result

    def serve_shutdown(self) -> None:
        """``serve shutdown``: delete every Serve application (a test's replicas leave the CPUs they held)."""
        serve = str(Path(sys.executable).with_name("serve"))
        subprocess.run([serve, "shutdown", "--yes", "--address", self.address], env=self.env, check=True)

    def stop_job(self, submission_id: str) -> None:
        self._api(f"/api/jobs/{submission_id}/stop", data=b"{}")

    def job_driver_node(self, submission_id: str) -> str | None:
        """The node id the job's driver ran on."""
        return self._api(f"/api/jobs/{submission_id}").get("driver_node_id")

    def job_id(self, submission_id: str) -> str:
        """The Ray job id (hex) of a submitted job, as the state API's rows name it."""
        return self._api(f"/api/jobs/{submission_id}")["job_id"]
