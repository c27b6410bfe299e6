"""Ingest benchmark: the Ray Data path against a plain single-process loop, on the same snapshot.

    python benchmarks/ingest.py [--bundle ../shared/data/ieee8023.bundle] [--snapshot 2020-06-22]
                                [--earlier 2020-04-10]

Prints, in one run:
1. decode + fingerprint throughput of every image of ``--snapshot``: the plain loop (PIL + imagehash in
   this process, one image after another) against the whole ``lxn_ray`` ingest job into an empty store
   (Ray start-up, Ray Data tasks, dedupe, publication included), and against its decode stage alone;
2. the incremental run: ``--earlier`` ingested first, then ``--snapshot`` (a few hundred new images);
3. the unchanged-source run.
Append the printed table to benchmarks/RESULTS.md with the machine it came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from lxn_ray import cluster
from lxn_ray.dedupe import fingerprint
from lxn_ray.imaging import ImageRejected, decode_image, to_grayscale
from lxn_ray.ingest import IngestConfig, ingest
from lxn_ray.metadata import parse_metadata
from lxn_ray.sources import FolderSource
from lxn_ray.storage import Storage

REPO = Path(__file__).resolve().parent.parent


def checkout(bundle: Path, tag: str, into: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(bundle), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "-q", f"snapshot-{tag}"], check=True)
    return into


def plain_loop(root: Path) -> tuple[int, float]:
    """The baseline: decode and fingerprint every usable row's image, one by one, in this process."""
    rows = [row for row in parse_metadata((root / "metadata.csv").read_bytes()) if not row.exclusion]
    started, done = time.perf_counter(), 0
    for row in rows:
        path = root / row.image_path
        if not path.is_file():
            continue
        try:
            fingerprint(to_grayscale(decode_image(path.read_bytes()).image))
            done += 1
        except ImageRejected:
            pass
    return done, time.perf_counter() - started


def timed_ingest(root: Path, storage: Storage) -> tuple[dict, float]:
    started = time.perf_counter()
    report = ingest(FolderSource(root), storage, IngestConfig())
    return report, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=REPO.parent / "shared" / "data" / "ieee8023.bundle")
    parser.add_argument("--snapshot", default="2020-06-22")
    parser.add_argument("--earlier", default="2020-04-10")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        late = checkout(args.bundle, args.snapshot, work / "late")
        early = checkout(args.bundle, args.earlier, work / "early")

        plain_images, plain_seconds = plain_loop(late)
        cluster.connect()  # started once, outside the timings below, as on a running cluster
        cold, cold_seconds = timed_ingest(late, Storage.open(str(work / "store-full")))
        decode_seconds = cold["stage_seconds"]["fingerprint"]
        first, first_seconds = timed_ingest(early, Storage.open(str(work / "store-inc")))
        grown, grown_seconds = timed_ingest(late, Storage.open(str(work / "store-inc")))
        same, same_seconds = timed_ingest(late, Storage.open(str(work / "store-inc")))

    rate = cold["images_hashed"]
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    print(f"snapshot {args.snapshot}: {plain_images} decodable images")
    print("| run | images decoded | seconds | images/s | ratio to plain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    plain_rate = plain_images / plain_seconds
    rows = [
        ("plain loop (PIL + imagehash, 1 process)", plain_images, plain_seconds),
        ("lxn_ray decode stage (Ray Data tasks)", rate, decode_seconds),
        ("lxn_ray whole ingest, empty store", rate, cold_seconds),
        (f"lxn_ray ingest {args.earlier} (first)", first["images_hashed"], first_seconds),
        (f"lxn_ray ingest {args.snapshot} after it (incremental)", grown["images_hashed"], grown_seconds),
        ("lxn_ray ingest unchanged source", same["images_hashed"], same_seconds),
    ]
    for name, images, seconds in rows:
        images_per_s = images / seconds if images else 0.0
        ratio = (
            f"{images_per_s / plain_rate:.2f}x"
            if images
            else f"{seconds / cold_seconds:.3f} of full run time"
        )
        print(f"| {name} | {images} | {seconds:.2f} | {images_per_s:.1f} | {ratio} |")
    print(
        f"unchanged run changed={same['changed']}, same version: "
        f"{same['dataset_version'] == grown['dataset_version']}"
    )


if __name__ == "__main__":
    main()
