"""What a person sees: a default train job prints mostly its own lines. A default tune job's lines are
checked on the soak's ``jobs/tune.py`` run in test_resources.py (one search fewer). ``--verbose``, which
brings the libraries' lines back, is not run here: a second job cost 35 s of the suite's budget.

The jobs run as a person runs them (``python jobs/train.py ...`` at 64 px, tiny width) against the test
session's Ray cluster, and every line they print, on stdout and stderr, is counted. A line is the job's
own when it is its summary (stdout), one of its progress lines (``[train ...]``, ``[tune ...]``,
``[ingest ...]``, forwarded from a worker or not), a warning it gives (``warning:``, ``WARNING source
shortcut``), or an error line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lxn_ray.infra.storage import Storage
from tests.helpers import copy_store, job_env, own_share

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # whole jobs: `-m "not slow"` skips

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(labelled_store, tmp_path_factory) -> Storage:
    """The session's 60-patient store, copied: the jobs publish models into it."""
    return Storage.open(str(copy_store(labelled_store, tmp_path_factory.mktemp("output") / "store")))


def run(job: str, store: Storage, *flags: str) -> subprocess.CompletedProcess:
    tiny = ["--image-size", "64", "--width", "0.125", "--epochs", "1"]
    command = [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--storage", store.uri, *tiny, *flags]
    result = subprocess.run(command, env=job_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_default_run_prints_mostly_its_own_lines(store):
    quiet = run("train", store)
    share, others = own_share(quiet.stdout, quiet.stderr)
    assert share >= 0.9, f"{share:.2f} of the lines are the job's own; the others:\n" + "\n".join(others)
