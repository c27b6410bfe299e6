"""``python -m lxn_ray COMMAND [flags]``: the same commands as ``lxn`` and ``jobs/*.py``."""

from lxn_ray.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
