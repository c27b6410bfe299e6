"""Serve LxN over HTTP with Ray Serve: ``python jobs/serve.py --storage URI [--model champion|VERSION]``."""

from lxn_ray.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
