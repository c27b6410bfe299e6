"""Serve LxN over HTTP with Ray Serve: ``python jobs/serve.py --storage URI [--model champion|VERSION]``."""

from lxn_ray.cli.main import serve_main

if __name__ == "__main__":
    raise SystemExit(serve_main())
