"""Model registry: ``python jobs/registry.py [--storage URI] list|show VERSION|promote VERSION|rollback``."""

from lxn_ray.cli.registry import main

if __name__ == "__main__":
    raise SystemExit(main())
