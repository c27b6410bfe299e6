"""What the quiet mode keeps of the lines Ray forwards to a job's driver: a user's own errors, never the
noise of workers being torn down (:func:`lxn_ray.infra.quiet.kept_forwarded`, pure: no Ray started)."""

from __future__ import annotations

from lxn_ray.infra import quiet
from lxn_ray.infra.quiet import kept_forwarded

# As a Ray Train worker printed it when the SIGTERM ending its trial landed in Ray Data's iterator finaliser
# (seen in CI on 2026-12-07: test_main_job_beside_another_ray_instance, two workers at once).
FINALISER_BLOCK = [
    "Exception ignored in: <function _ClosingIterator.__del__ at 0x7f8064f7e160>",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/ray/data/_internal/execution/streaming_executor.py", '
    "line 809, in __del__",
    "    def __del__(self):",
    '  File "/venv/lib/python3.11/site-packages/ray/_private/worker.py", line 1063, in sigterm_handler',
    "    raise_sys_exit_with_custom_error_message(",
    '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message',
    "SystemExit: 1",
]
USER_ERROR = [
    "Traceback (most recent call last):",
    '  File "/job/train.py", line 3, in <module>',
    "    raise ValueError('bad flag')",
    "ValueError: bad flag",
]


def test_a_sigterm_in_ray_datas_finaliser_is_dropped_whole_and_nothing_else():
    lines = ["epoch 1: auc 0.71", *FINALISER_BLOCK, *FINALISER_BLOCK, *USER_ERROR, "epoch 2: auc 0.74"]
    assert kept_forwarded(lines) == ["epoch 1: auc 0.71", *USER_ERROR, "epoch 2: auc 0.74"]


def test_a_finaliser_block_cut_short_keeps_the_line_after_it():
    """A block whose ``SystemExit`` line never comes (another batch of lines, another exception) ends at
    the first line that is not part of a traceback, which is printed."""
    assert kept_forwarded([*FINALISER_BLOCK[:4], "epoch 3: auc 0.75"]) == ["epoch 3: auc 0.75"]


def test_known_noise_and_added_patterns_are_dropped(monkeypatch):
    monkeypatch.setattr(quiet, "_also_dropped", [])  # this process's added patterns, put back after
    quiet.drop_forwarded(r"won't accept connections from HAProxy on other nodes")
    lines = [
        "(raylet) 4 PYTHON worker processes have been started on node abc",
        "WARNING -- HTTPOptions.host='127.0.0.1' won't accept connections from HAProxy on other nodes; ...",
        "serving model lxn-a",
    ]
    assert kept_forwarded(lines) == ["serving model lxn-a"]
