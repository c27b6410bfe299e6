"""Model registry: ``python jobs/registry.py [--storage URI] list|show VERSION|promote VERSION|rollback``."""

from lxn_ray.cli.main import registry_main

if __name__ == "__main__":
    raise SystemExit(registry_main())
