"""The settings of a deployment of the endpoint (:class:`ServeSettings`), from flags (jobs/serve.py) or a
Serve config file's args."""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lxn_ray.images.decode import ImageLimits
from lxn_ray.infra.settings import setting

DEPLOYMENT_NAME = "LxnServer"


# -- settings -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """Everything a deployment of the endpoint needs, from flags (jobs/serve.py) or a Serve config file.

    Defaults suit a real CPU node; tests shrink CPUs and the poll period. Checked at construction so a bad
    flag or config file fails before any replica starts.
    """

    storage: str = setting(help="where the models are: the job's --storage URI", flag=False)
    model: str = setting(
        "champion", help="champion (follows promotions) or a model version id / .keras path (pinned)"
    )
    task: str | None = setting(
        None, help="serve only models of this task: a champion trained for another is refused (default: any)"
    )
    # The HTTP proxy's address is jobs/serve.py's only; `serve deploy` takes http_options instead.
    host: str = setting("127.0.0.1", help="HTTP address (0.0.0.0 for all interfaces)")
    port: int = setting(8000, help="HTTP port")
    # Serve's default runs a proxy on every node, for a load balancer in front of the cluster; HeadOnly
    # suits one entry point (and nodes that share a host, as in the cluster tests).
    proxy_location: str = setting(
        "EveryNode",
        choices=("EveryNode", "HeadOnly"),
        help="where Serve runs HTTP proxies: EveryNode (behind a load balancer) or HeadOnly",
    )
    # Serve's HAProxy ingress answered 1.6x the requests/s of its Python proxy on 2 cores (benchmarks/
    # serve.py); it is a property of the Ray instance (lxn_ray.infra.cluster.serve_ingress).
    ingress: str = setting(
        "proxy",
        choices=("haproxy", "proxy"),
        help="HTTP ingress of a Ray instance this job starts: proxy (Serve's Python proxy actor) or haproxy "
        "(HAProxy, forwarding each request straight to a replica: more requests/s; its stats and metrics "
        "ports listen on all interfaces); a running cluster keeps the one it was started with "
        "(RAY_SERVE_ENABLE_HA_PROXY=1: haproxy)",
    )
    app_name: str = setting("lxn", help="Serve application name")
    route_prefix: str = setting("/", help="the path every route sits under")
    min_replicas: int = setting(1, help="fewest replicas autoscaling keeps (0: none while idle)")
    max_replicas: int = setting(4, help="most replicas autoscaling starts")
    # Serve adds replicas when the ongoing requests per replica exceed this; about one full batch.
    target_ongoing_requests: float = setting(16.0, help="autoscaling target: ongoing requests per replica")
    # Enough to fill two batches, so a batch forms while one runs.
    max_ongoing_requests: int = setting(32, help="requests one replica takes at once")
    cpus_per_replica: float = setting(1.0, help="CPUs each replica reserves")
    gpus_per_replica: float = setting(0.0, help="GPUs (or a fraction of one) each replica reserves")
    max_batch_size: int = setting(16, help="most images a replica scores in one batch")
    # Measured on 2 cores with the 200 px model (benchmarks/serve.py): 20 ms gave ~1.35x the requests/s of
    # 5 ms at concurrency 8-32 for +20 ms at concurrency 1; 50 ms gained nothing more.
    batch_wait_timeout_s: float = setting(
        0.02, help="how long the first request of a batch waits for company, seconds"
    )
    poll_seconds: float = setting(5.0, help="champion pointer poll period")
    max_body_bytes: int = setting(20 * 1024 * 1024, help="largest request body, bytes", flag=False)
    max_pixels: int = setting(50_000_000, help="largest decoded image, pixels", flag=False)
    max_batch_images: int = setting(32, help="images in one /predict/batch request", flag=False)
    auth: bool = setting(
        True,
        help="serve without API keys: anyone who can reach the port can call every route (local use only)",
    )  # --no-auth
    # What the endpoint saw, for the drift job (lxn_ray.serving.summaries: no image, name or header kept)
    summaries: bool = setting(
        True, help="keep no per-request summaries in storage (the drift job then has nothing to read)"
    )  # --no-summaries
    summary_rows: int = setting(50, help="summaries per batch file a replica writes")
    summary_seconds: float = setting(
        60.0, help="a replica writes its buffered summaries at the latest this many seconds after the first"
    )
    summary_files: int = setting(
        2000, help="most summary batch files kept in storage; the oldest past it are deleted"
    )
    # SHA-256 digests of the LXN_API_KEYS that jobs/serve.py saw (the keys themselves never leave it)
    api_key_digests: tuple[str, ...] = setting((), help="SHA-256 digests of the accepted keys", flag=False)

    def __post_init__(self) -> None:
        if not self.storage:
            raise ValueError("storage is required")
        if not self.model:
            raise ValueError("model must be champion, a model version id or a .keras path")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1-65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with /, got {self.route_prefix!r}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                f"got {self.min_replicas} and {self.max_replicas}"
            )
        if not 0 < self.target_ongoing_requests <= self.max_ongoing_requests:
            raise ValueError(
                f"need 0 < target_ongoing_requests <= max_ongoing_requests, "
                f"got {self.target_ongoing_requests} and {self.max_ongoing_requests}"
            )
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise ValueError("cpus_per_replica and gpus_per_replica must be >= 0")
        if not 1 <= self.max_batch_size <= self.max_ongoing_requests:
            raise ValueError(f"need 1 <= max_batch_size <= max_ongoing_requests, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0 or self.poll_seconds <= 0:
            raise ValueError("batch_wait_timeout_s must be >= 0 and poll_seconds > 0")
        if self.summary_rows < 1 or self.summary_seconds <= 0 or self.summary_files < 1:
            raise ValueError("summary_rows and summary_files must be >= 1 and summary_seconds > 0")
        if min(self.max_body_bytes, self.max_pixels, self.max_batch_images) < 1:
            raise ValueError("max_body_bytes, max_pixels and max_batch_images must be positive")
        if not isinstance(self.api_key_digests, tuple) or not all(
            isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)
            for d in self.api_key_digests
        ):
            raise ValueError("api_key_digests must be a list of SHA-256 hex digests (64 lower-case hex)")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ServeSettings":
        """Settings from a Serve config file's ``args`` (YAML values may arrive as strings)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        coerced: dict[str, Any] = {}
        for name, value in values.items():
            kind = known[name].type
            if kind is bool:
                value = _boolean(name, value)
            elif kind in (int, float, str):
                value = kind(value)
            elif isinstance(value, list):
                value = tuple(value)
            coerced[name] = value
        return cls(**coerced)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_file_bytes=self.max_body_bytes, max_pixels=self.max_pixels)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``serve.deployment``: autoscaling and per-replica resources."""
        return {
            "name": DEPLOYMENT_NAME,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            # A replica's first health check waits for the model to load (its constructor).
            "health_check_period_s": 10.0,
        }


def _boolean(name: str, value: Any) -> bool:
    """A config file's boolean; anything but a clear yes or no is an error (auth must not fail open)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")
