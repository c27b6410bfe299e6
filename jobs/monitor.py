"""Input drift of the endpoint: ``python jobs/monitor.py [--window N] [--hours H]``; exit 3 on drift."""

from lxn_ray.cli.monitor import main

if __name__ == "__main__":
    raise SystemExit(main())
