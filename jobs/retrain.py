"""Scheduled retraining: ``python jobs/retrain.py --source SRC --storage URI (--once | --every 6h)``."""

from lxn_ray.cli.retrain import main

if __name__ == "__main__":
    raise SystemExit(main())
