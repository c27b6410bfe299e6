"""``lxn serve`` / ``jobs/serve.py``: deploy LxN behind Ray Serve and serve until SIGINT/SIGTERM (or return
at once with ``--detach``) (:func:`lxn_ray.serving.serve.deploy`); mint and revoke API keys; its flags
(:class:`~lxn_ray.serving.settings.ServeSettings`') and summary."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lxn_ray.cli.common import job_parser, run_job
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.serving.settings import ServeSettings


def make_parser() -> argparse.ArgumentParser:
    """``serve`` flags: ServeSettings' fields, API key management, ``--detach``."""
    parser = job_parser(
        "Serve LxN over HTTP with Ray Serve: the page at /, /predict, /predict/batch, /explain, /model, "
        "/docs. Prediction, explanation and model routes need an API key (Authorization: Bearer KEY)."
    )
    add_flags(parser, ServeSettings, skip=("auth",))
    keys = parser.add_argument_group("API keys (kept in storage as SHA-256 digests, never logged)")
    keys.add_argument(
        "--mint-key",
        metavar="NAME",
        help="mint a key named NAME, save it to --key-out (mode 600) and exit; running endpoints accept it "
        "within --poll-seconds",
    )
    keys.add_argument(
        "--key-out",
        type=Path,
        help="where --mint-key saves the key (default: "
        "$LXN_CONFIG/api-keys/NAME.key, $LXN_CONFIG defaulting to ~/.config/lxn_ray)",
    )
    keys.add_argument("--revoke-key", metavar="NAME", help="remove the key named NAME and exit")
    add_flags(keys, ServeSettings, only=("auth",))  # --no-auth
    parser.add_argument(
        "--detach",
        action="store_true",
        help="deploy and exit, leaving the app on the running cluster (needs `ray start`: a local Ray "
        "started by this job ends with it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn serve [--model champion|VERSION] [flags]``: deploy, then serve until SIGINT/SIGTERM (or return
    at once with ``--detach``); ``--mint-key``/``--revoke-key`` change the keys and exit. Returns the exit
    code (0, 1 on failure, 2 for a bad flag or setting)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.mint_key or args.revoke_key:
        return _manage_key(args)
    from lxn_ray.serving import auth

    try:
        digests = tuple(auth.env_digests()) if args.auth else ()
        settings = from_args(ServeSettings, args, storage=args.storage, api_key_digests=digests)
    except ValueError as error:
        parser.error(str(error))

    from lxn_ray.infra.cluster import SignalStop

    # Armed once Ray has installed its own handlers, so a Ctrl-C that lands while Serve is still
    # starting up is remembered rather than lost; the server then shuts down as soon as it is up.
    stop = SignalStop(graceful=True, stopping="shutting Serve down")

    from lxn_ray.infra import cluster, quiet

    own_ray = not cluster.joins_running_cluster()  # a running cluster keeps the ingress it started with
    if own_ray and settings.ingress == "haproxy":
        # Serve warns that a loopback --host keeps HAProxy on *other* nodes out: this instance has none
        quiet.drop_forwarded(r"won't accept connections from HAProxy on other nodes")

    def work(storage: Storage) -> dict[str, Any]:
        from lxn_ray.serving.serve import check_model, deploy

        check_model(storage, settings.model)  # no champion / unknown version: fail before Serve starts
        cluster.connect()
        stop.arm()
        report = deploy(dataclasses.replace(settings, storage=storage.uri))
        keys = auth.describe(storage, settings.api_key_digests)
        mint = f"python jobs/serve.py --storage {args.storage} --mint-key NAME"
        access = {"on": settings.auth, "keys": keys, "mint": mint}
        ingress = settings.ingress if own_ray else "the cluster's"
        # --detach leaves the app on a running cluster; a Ray instance this job started ends with it
        ends = args.detach and own_ray
        return {
            **report,
            "ingress": ingress,
            "auth": access,
            "detached": args.detach and not own_ray,
            "ends_with_job": ends,
        }

    shut_down = False
    with cluster.serve_ingress(settings.ingress) if own_ray else contextlib.nullcontext():
        try:
            with stop:
                code = run_job("serve", args, work, summary)
                if code != 0 or args.detach:
                    return code
                from ray import serve

                print("serving until SIGINT (Ctrl-C) or SIGTERM", flush=True)
                stop.arm()
                stop.event.wait()
                started = time.monotonic()
                serve.shutdown()
                shut_down = True
                print(f"{stop.received}: Serve shut down in {time.monotonic() - started:.1f} s", flush=True)
            return 0
        finally:
            if own_ray and not shut_down:
                _stop_own_serve()


def _stop_own_serve() -> None:
    """Shut Serve down on the Ray instance this job started (a failed or detached deployment): its
    HAProxy is a process of its own, which would outlive Ray and keep the port unless Serve stops it
    (a job killed with SIGKILL still leaves it behind)."""
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()


def _manage_key(args: argparse.Namespace) -> int:
    """``--mint-key NAME`` / ``--revoke-key NAME``: change the key file in storage, then exit (0, or 1
    with one ``error:`` line)."""
    from lxn_ray.serving import auth

    try:
        storage = Storage.open(args.storage)
        where = storage.uri_of(auth.KEY_FILE)
        if args.revoke_key:
            if not auth.revoke(storage, args.revoke_key):
                raise auth.ApiKeyError(f"no key named {args.revoke_key!r} in {where}")
            print(f"revoked API key {args.revoke_key!r} ({where}); endpoints refuse it within a poll")
            return 0
        path = args.key_out or auth.default_key_path(args.mint_key)
        if path.expanduser().exists():
            raise auth.ApiKeyError(f"{path} exists: pick another --key-out or key name")
        key = auth.new_key()
        saved = auth.save_key(key, path)  # first the key's own file, so a failure leaves no orphan digest
        try:
            auth.register(storage, args.mint_key, key)
        except BaseException:
            saved.unlink()
            raise
    except (OSError, ValueError) as error:
        print(f"error: serve failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"minted API key {args.mint_key!r}: saved to {saved} (mode 600; it is shown nowhere else)")
    print(f"  its SHA-256 digest is in {where}; running endpoints accept it within a poll")
    print(f'  use it: curl -H "Authorization: Bearer $(cat {saved})" --data-binary @film.dcm URL/predict')
    return 0


def summary(report: dict[str, Any]) -> str:
    """Where it serves which model, the routes, threshold and input size, and how to get in (API keys)."""
    following = "follows the champion" if report["model"] == "champion" else "pinned"
    lines = [
        f"serving model {report['model_version']} ({following}) at {report['url']}",
        f"  page {report['url']}/ ; POST /predict, /predict/batch, /explain (PNG, JPEG or DICOM); "
        f"GET /healthz, /model; docs {report['docs']}",
        f"  threshold {report['threshold']:.3f}, input {report['image_size']} px; HTTP ingress: "
        f"{report.get('ingress', 'proxy')}",
    ]
    if report.get("warning"):
        lines.append(f"  WARNING: {report['warning']}; every answer carries this warning")
    access = report.get("auth") or {}
    if not access.get("on", True):
        lines.append(f"  auth: OFF (--no-auth): anyone who can reach {report['url']} can call every route")
    else:
        lines.append(f"  auth: on - send 'Authorization: Bearer KEY'; keys: {access.get('keys', '?')}")
        lines.append(
            f"  get a key: {access.get('mint')} (or set LXN_API_KEYS before starting); "
            "/healthz and the page need none"
        )
    if report.get("ends_with_job"):
        lines.append(
            "  --detach: this job started its own Ray instance, so the app ends with it (`ray start` one)"
        )
    if report.get("detached"):
        lines.append(f"  detached: stop it with `serve delete {report['app_name']}` or `serve shutdown`")
    lines.append("  research use only - not a diagnostic device")
    return "\n".join(lines)
