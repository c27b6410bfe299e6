"""Scheduled retraining: ``python jobs/retrain.py --source SRC --storage URI (--once | --every 6h)``."""

from lxn_ray.cli.main import retrain_main

if __name__ == "__main__":
    raise SystemExit(retrain_main())
