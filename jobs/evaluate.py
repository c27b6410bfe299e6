"""Score a folder with a model: ``python jobs/evaluate.py --model champion|VERSION|PATH --source DIR``."""

from lxn_ray.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
