"""What a person sees: a default train job prints mostly its own lines. A default tune job's lines are
checked on the soak's ``jobs/tune.py`` run in test_resources.py (one search fewer). ``--verbose``, which
brings the libraries' lines back, is not run here: a second job cost 35 s of the suite's budget.

The job is the session's shared tiny model (tests/shared_stores.py ``trained_store``): ``python
jobs/train.py ...`` run as a person runs it against the test session's Ray cluster, with every line it
printed, on stdout and stderr, kept and counted here. A line is the job's own when it is its summary
(stdout), one of its progress lines (``[train ...]``, ``[tune ...]``, ``[ingest ...]``, forwarded from a
worker or not), a warning it gives (``warning:``, ``WARNING source shortcut``), or an error line.
"""

from __future__ import annotations

import pytest

from tests.helpers import own_share

pytestmark = pytest.mark.slow  # a whole job: `-m "not slow"` skips it


def test_a_default_run_prints_mostly_its_own_lines(trained_store):
    share, others = own_share(trained_store.stdout, trained_store.stderr)
    assert share >= 0.9, f"{share:.2f} of the lines are the job's own; the others:\n" + "\n".join(others)
    assert f"model {trained_store.report['model_version']}" in trained_store.stdout  # its summary
