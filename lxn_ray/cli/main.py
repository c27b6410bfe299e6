"""The ``lxn`` command: ``lxn COMMAND [flags]`` runs one job, the same as ``python jobs/COMMAND.py`` and
``python -m lxn_ray COMMAND``; ``lxn --help`` lists the commands. Each command's flags, ``main`` and summary
live in its own module (``lxn_ray.cli.<command>``), imported only when it runs, so ``lxn --help`` is quick.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> one line for `lxn --help`, in the order data flows; lxn_ray.cli.<command> holds its main.
COMMANDS: dict[str, str] = {
    "ingest": "bring sources into a new immutable dataset version (duplicates, splits)",
    "train": "train LxN with Ray Train on a dataset version and register the model",
    "tune": "search learning rate, augmentation and recipe with Ray Tune (the main job)",
    "evaluate": "score a model on a dataset version, pooled and within each source",
    "loso": "leave-one-source-out: train on the other sources, test on the one left out",
    "retrain": "ingest, retrain and promote when the data changed (once or on a schedule)",
    "lungs": "train a lung-field segmenter (U-Net) on a masks folder and register it",
    "registry": "model versions and the champion: list, show, promote, rollback",
    "serve": "serve the champion over HTTP with Ray Serve (page, API keys, DICOM)",
    "monitor": "input drift: recent summaries of the endpoint vs the champion's test split",
}


def usage() -> str:
    """The text of ``lxn --help``: every command with its line."""
    width = max(map(len, COMMANDS))
    lines = ["usage: lxn COMMAND [flags]   (the same jobs as python jobs/COMMAND.py)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, about in COMMANDS.items()]
    lines += ["", "lxn COMMAND --help lists a command's flags. Research use only - not a diagnostic device."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``lxn COMMAND [flags]``: run the command's ``main`` and return its exit code; ``lxn --help``: the
    commands, 0; no or an unknown command: the commands on stderr, 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    command = importlib.import_module(f"lxn_ray.cli.{argv[0]}")
    sys.argv[0] = f"lxn {argv[0]}"  # argparse names the program after it: "usage: lxn train ..."
    return command.main(argv[1:])
