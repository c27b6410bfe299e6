"""Search benchmark: ASHA early stopping against letting every trial run to the end, on the same trials.

    python benchmarks/tune.py [--storage /tmp/store] [--trials 4] [--epochs 3] [--image-size 64]
                              [--width 0.25] [--batch-size 16] [--seed 0]

Searches the newest dataset version of ``--storage``; without it, the bundle's 2020-06-22 snapshot is
ingested into a temp store first (``jobs/ingest.py``, about a minute). Both searches evaluate the same
fixed trial configs (learning rates spread log-uniformly over the searched range, augmentation drawn
from a seeded generator), in the same order, with the same epochs budget per trial and the same
concurrency; only the scheduler differs. For each it prints the wall time until the best val AUC of the
search was first reported, that best val AUC, the total search time and the epochs trained, then the
ratios ASHA/FIFO. Then where each trial's seconds went before its first training step (the ``startup_*_s``
phases every Ray Train run reports: :func:`lxn_ray.training.loop.startup_seconds`; and the first epoch's
extra seconds over the later ones: its steps' tracing), for both and for a third, baseline search: ASHA
with every trial started at once, the others queueing for workers (``--max-concurrent`` = the trials: what
every random search did before it started only the trials that fit). Nothing is published or promoted;
the experiments are written under ``<storage>/tune/bench-*``. Append the printed tables to
benchmarks/RESULTS.md with the machine it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from common import own_store  # benchmarks/common.py: this folder is on sys.path

from lxn_ray.data import dataset
from lxn_ray.infra import cluster
from lxn_ray.infra.settings import add_flags, from_args
from lxn_ray.infra.storage import Storage
from lxn_ray.training.loop import STARTUP_PHASES
from lxn_ray.tuning.search import ResourceKeeper, build_tuner, fit_and_give_back
from lxn_ray.tuning.settings import TuneSettings
from lxn_ray.tuning.space import AUGMENT_RANGES, LR_RANGE, METRIC

BEFORE = "ASHA, every trial started at once (before)"


def fixed_points(trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` configs: learning rates evenly spaced in log space, seeded augmentation."""
    rng = np.random.default_rng(seed)
    rates = np.geomspace(LR_RANGE[0], LR_RANGE[1], trials)
    rng.shuffle(rates)
    return [
        {
            "learning_rate": float(rate),
            **{name: float(rng.uniform(0, upper)) for name, upper in AUGMENT_RANGES.items()},
            "horizontal_flip": False,
        }
        for rate in rates
    ]


def run(
    storage: Storage, version: str, settings: TuneSettings, points: list[dict[str, Any]]
) -> dict[str, Any]:
    """One search over ``points``: time to its best val AUC, that AUC, total time, epochs trained."""
    name = f"bench-{'asha' if settings.asha else 'fifo'}-{uuid.uuid4().hex[:6]}"
    keeper = ResourceKeeper(settings.stall_timeout_s, what=f"benchmark search {name}")
    tuner, _, concurrent = build_tuner(storage, version, settings, name, points=points, keeper=keeper)
    started = time.time()
    results, _ = fit_and_give_back(tuner, keeper)
    total = time.time() - started
    best_auc, best_at, epochs = float("-inf"), total, 0
    startups: list[dict[str, float]] = []  # per trial: its start-up phases and first epoch's extra seconds
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or METRIC not in frame:
            continue
        epochs += len(frame)
        first = frame.iloc[0]
        phases = {name: float(first.get(f"startup_{name}_s", np.nan)) for name in STARTUP_PHASES}
        later = frame["epoch_seconds"].iloc[1:]
        phases["first epoch extra"] = float(first["epoch_seconds"] - later.median()) if len(later) else np.nan
        startups.append(phases)
        for auc, stamp in zip(frame[METRIC], frame["timestamp"], strict=True):
            # earliest report of the best value (timestamps are whole seconds)
            if auc > best_auc or (auc == best_auc and stamp - started < best_at):
                best_auc, best_at = float(auc), max(0.0, float(stamp) - started)
    return {
        "time_to_best_s": best_at,
        "best_val_auc": best_auc,
        "total_s": total,
        "epochs": epochs,
        "concurrent": concurrent,
        "startup": startups,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=None, help="a store with a dataset version (default: make one)")
    parser.add_argument("--trials", type=int, default=4, help="fixed trial configs (num_samples)")
    small = {"epochs": 3, "image_size": 64, "width": 0.25, "batch_size": 16}  # TuneSettings' own, smaller
    add_flags(parser, TuneSettings, only=(*small, "seed"), defaults=small)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.storage is None:
            args.storage = own_store(
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxn-tune-")))
            )
        benchmark(args)


def benchmark(args: argparse.Namespace) -> None:
    storage = Storage.open(args.storage)
    cluster.connect()
    version = dataset.resolve_version(storage, "latest")
    points = fixed_points(args.trials, args.seed)
    base = from_args(TuneSettings, args, num_samples=args.trials, searcher="random")
    searches = (
        ("ASHA", True, None),
        ("FIFO (all run)", False, None),
        # the baseline of the start-up table: every trial started at once, the rest queueing for workers -
        # what a random search did before it was limited to the trials that fit (--max-concurrent above
        # what fits still does it)
        (BEFORE, True, args.trials),
    )
    outcomes = {
        label: run(storage, version, dataclasses.replace(base, asha=asha, max_concurrent=at_once), points)
        for label, asha, at_once in searches
    }
    asha, fifo = outcomes["ASHA"], outcomes["FIFO (all run)"]
    print(
        f"\nTune benchmark on {platform.node()} ({platform.processor() or platform.machine()}), dataset "
        f"{version}: {args.trials} fixed trials x {args.epochs} epochs, {args.image_size} px, width "
        f"{args.width}, batch {args.batch_size}, {asha['concurrent']} trial(s) at once\n"
    )
    print("| scheduler | time to best val AUC (s) | best val AUC | search time (s) | epochs trained |")
    print("|---|---|---|---|---|")
    for label, o in outcomes.items():
        print(
            f"| {label} | {o['time_to_best_s']:.1f} | {o['best_val_auc']:.4f} | {o['total_s']:.1f} | "
            f"{o['epochs']} |"
        )
    ratio = asha["time_to_best_s"] / fifo["time_to_best_s"] if fifo["time_to_best_s"] > 0 else float("nan")
    print(
        f"\nASHA/FIFO: time to best {ratio:.2f}x, search time {asha['total_s'] / fifo['total_s']:.2f}x, "
        f"best val AUC {asha['best_val_auc']:.4f} vs {fifo['best_val_auc']:.4f} "
        f"(difference {asha['best_val_auc'] - fifo['best_val_auc']:+.4f})"
    )
    columns = [*STARTUP_PHASES, "first epoch extra"]
    print("\nPer-trial start-up seconds (mean over the search's trials, min-max):\n")
    print("| search | " + " | ".join(columns) + " | total before the first step |")
    print("|---|" + "---|" * (len(columns) + 1))
    totals = {}
    for label, o in outcomes.items():
        cells = []
        for column in [*columns, "total"]:
            values = np.array(
                [sum(t[c] for c in STARTUP_PHASES) if column == "total" else t[column] for t in o["startup"]]
            )
            values = values[np.isfinite(values)]
            cells.append(
                f"{values.mean():.1f} ({values.min():.1f}-{values.max():.1f})" if len(values) else "-"
            )
            if column == "total" and len(values):
                totals[label] = values.mean()
        print(f"| {label} | " + " | ".join(cells) + " |")
    if BEFORE in totals and "ASHA" in totals:
        print(
            f"\nStart-up before the first step, ASHA: {totals[BEFORE]:.1f} s a trial with every trial "
            f"started at once (before), {totals['ASHA']:.1f} s with only the trials that fit: "
            f"{totals[BEFORE] / totals['ASHA']:.2f}x less (a trial waiting for a slot now waits in Tune's "
            f"queue, before its start-up is counted); the whole search {outcomes[BEFORE]['total_s']:.1f} s "
            f"-> {outcomes['ASHA']['total_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
