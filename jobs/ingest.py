"""Ingest a source into a new dataset version: ``python jobs/ingest.py --source SRC --storage URI``."""

from lxn_ray.cli.ingest import main

if __name__ == "__main__":
    raise SystemExit(main())
