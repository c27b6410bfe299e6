"""Shared fixtures: a real local Ray instance, the real ieee8023 bundle, and synthetic sources on disk."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import SourceBuilder

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE = REPO_ROOT.parent / "shared" / "data" / "ieee8023.bundle"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One real local Ray instance for the whole test session (2 CPUs, like CI)."""
    import ray

    # A new instance even when `ray start` left a cluster running here ("local"), with its dashboard as
    # `ray start` runs it: Ray Train frees a stopped Tune trial's workers through the dashboard's State API.
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def bundle() -> Path:
    if not BUNDLE.is_file():
        pytest.skip(f"real data absent: {BUNDLE} (only the project's CI checkout has ../shared)")
    return BUNDLE


@pytest.fixture(scope="session")
def bundle_checkout(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``checkout("2020-04-20")`` -> a clone of the bundle with that snapshot checked out (cached)."""
    clones: dict[str, Path] = {}

    def checkout(date: str) -> Path:
        if date not in clones:
            target = tmp_path_factory.mktemp(f"ieee8023-{date}")
            subprocess.run(["git", "clone", "-q", str(bundle), str(target / "src")], check=True)
            subprocess.run(
                ["git", "-C", str(target / "src"), "checkout", "-q", f"snapshot-{date}"], check=True
            )
            clones[date] = target / "src"
        return clones[date]

    return checkout


@pytest.fixture
def source_builder(tmp_path: Path) -> Callable[[str], SourceBuilder]:
    return lambda name="source": SourceBuilder(tmp_path / name)
