"""Leave-one-source-out: ``python jobs/loso.py --storage URI --task covid-vs-normal`` trains on all sources
but one, for each source, and reports the held-out source's metrics next to the internal ones."""

from lxn_ray.cli.loso import main

if __name__ == "__main__":
    raise SystemExit(main())
