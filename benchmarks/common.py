"""What several benchmarks share: a checkout of the shared data's bundle, a local Ray instance of their own.

Imported as ``common`` by the scripts of this folder (run as ``python benchmarks/NAME.py``, so the folder is
on ``sys.path``).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The shared data's git bundle of the ieee8023 dataset (nine dated snapshots, tags ``snapshot-YYYY-MM-DD``).
BUNDLE = REPO.parent / "shared" / "data" / "ieee8023.bundle"


def checkout(bundle: Path, tag: str, into: Path) -> Path:
    """``into``, a clone of ``bundle`` at tag ``snapshot-{tag}`` (cloned once: an existing checkout is kept).

    Raises SystemExit naming the bundle when it is missing, CalledProcessError when git fails."""
    if (into / "metadata.csv").exists():
        return into
    if not bundle.exists():
        raise SystemExit(f"{bundle}: no such bundle; pass a checkout of the dataset with --source")
    subprocess.run(["git", "clone", "-q", str(bundle), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "-q", f"snapshot-{tag}"], check=True)
    return into


def archive_tree(commit: str, into: Path) -> str | None:
    """``commit``'s ``lxn_ray`` package extracted under ``into`` (``git archive`` of this repository, which
    is not touched): a baseline to time in a process of its own with ``into`` first on its path. Returns
    None, or why it could not (git's message)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "lxn_ray"], capture_output=True
    )
    if archive.returncode != 0:
        return f"git archive {commit} failed: {archive.stderr.decode().strip()}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as files:
        files.extractall(into, filter="data")
    return None


def own_store(work: Path, train: list[str] | None = None) -> str:
    """A store of the benchmark's own under ``work`` (its file:// URI), made with the jobs a user runs: the
    bundle's 2020-06-22 snapshot ingested by ``jobs/ingest.py`` and, with ``train`` (its flags), a model
    trained by ``jobs/train.py`` (MLflow off). Their output goes to this terminal. Raises SystemExit
    naming the bundle when it is missing, CalledProcessError when a job fails."""
    if not BUNDLE.exists():
        raise SystemExit(f"{BUNDLE}: no such bundle; pass --storage with a store of your own instead")
    uri = (work / "store").as_uri()
    jobs = [["ingest.py", "--source", str(BUNDLE), "--ref", "snapshot-2020-06-22"]]
    if train is not None:
        jobs.append(["train.py", *train, "--mlflow-uri", "off"])
    for job, *flags in jobs:
        print(f"# jobs/{job} {' '.join(flags)} --storage {uri}", flush=True)
        subprocess.run([sys.executable, str(REPO / "jobs" / job), *flags, "--storage", uri], check=True)
    return uri


def start_ray(
    temp_dir: Path, niceness: int, num_cpus: int | None = None, object_store_mb: int | None = None
) -> None:
    """A local Ray instance of this process (never another session's cluster), with its own ``temp_dir``,
    ``num_cpus`` CPUs (all when None) and workers at ``niceness`` (Ray's default of 15 would hand most of a
    shared machine's CPU to other work). Retries: a loaded machine can miss Ray's fixed 30 s start-up wait."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_worker_niceness"] = str(niceness)  # noqa: SIM112 (Ray reads this name)
    for attempt in range(5):
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                _temp_dir=str(temp_dir),
                object_store_memory=None if object_store_mb is None else object_store_mb * 2**20,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,  # workers' log lines would land in the printed tables
            )
            return
        except Exception:
            ray.shutdown()
            if attempt == 4:
                raise
