"""Train the lung-field segmenter: ``python jobs/lungs.py --masks FOLDER --storage URI [--films DIR]``."""

from lxn_ray.cli.lungs import main

if __name__ == "__main__":
    raise SystemExit(main())
