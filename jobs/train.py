"""Train LxN with Ray Train on a dataset version: ``python jobs/train.py --storage URI [--workers N]``."""

from lxn_ray.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
