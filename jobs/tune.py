"""Search hyperparameters with Ray Tune over Ray Train, register the best model, promote it if it wins:
``python jobs/tune.py --storage URI [--num-samples N] [--epochs E] [--resume]`` (``--help`` for all flags)."""

from lxn_ray.cli.tune import main

if __name__ == "__main__":
    raise SystemExit(main())
