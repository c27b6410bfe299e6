"""Ingest benchmark: the Ray Data path against a plain single-process loop, on the same snapshot.

    python benchmarks/ingest.py [--bundle ../shared/data/ieee8023.bundle] [--snapshot 2020-06-22]
                                [--earlier 2020-04-10]
    python benchmarks/ingest.py --film-size 1024,4500 [--film-count 200] [--batch-sizes 16,4]
                                [--ray-cpus 1,2] [--workdir DIR] [--baseline-commit SHA | none]

Prints, in one run:
1. decode + fingerprint throughput of every image of ``--snapshot``: the plain loop (PIL + imagehash in
   this process, one image after another) against the whole ``lxn_ray`` ingest job into an empty store
   (Ray start-up, Ray Data tasks, dedupe, publication included), and against its decode stage alone;
2. the incremental run: ``--earlier`` ingested first, then ``--snapshot`` (a few hundred new images);
3. the unchanged-source run.

With ``--film-size`` it measures full-size films instead (the bundle's images are at most 512 px; the NIH
originals are 1024 px and upstream ieee8023 serves up to ~20 MP): the first ``--film-count`` frontal X-rays
of ``--snapshot`` are upscaled (bicubic) so that their longer side is each given size, given Gaussian noise
of sigma 2 gray levels (detector grain, so that files compress and decode like scans rather than like
smooth upscales), and written once - in the original file's format and mode (JPEG quality 90 stays JPEG,
PNG stays PNG, RGB stays RGB) - with a metadata.csv of their rows, under ``--workdir`` (default: a temp
dir). For each size it times, on the same files:

* the plain loop: ``decode_image`` + ``to_grayscale`` + ``fingerprint`` one file after another in this
  process, files read from disk inside the timing (split into read / decode / grayscale / fingerprint),
  each film decoded whole - the path before issue 28, the baseline of the ratios;
* the same loop decoding as ingest now does (``fingerprint_film``: a large JPEG at the smallest DCT scale
  that keeps the fingerprint's 1024 px);
* the lxn_ray decode stage: the ``fingerprint`` entry of ``stage_seconds`` of a whole ingest of the
  folder into an empty store (Ray Data tasks reading the files themselves, hashing and decoding them;
  Ray started once, outside the timings, its workers started by the run), once per
  ``--batch-sizes`` value (``IngestConfig.decode_batch_size``: images per Ray Data batch) and per
  ``--ray-cpus`` value (Ray restarted with that many CPUs - "faster with more cores"); Ray's workers run at
  nice 0 like the plain loop (``--ray-niceness``; Ray's default of 15 hands a shared machine's CPU to
  everything else);
* the whole ingest's seconds beside it;
* the same decode stage with ``--baseline-commit``'s ``lxn_ray`` (default: the code issue 28 was filed
  against, whose driver sent every film's bytes through the object store to tasks that decoded it whole),
  in a process and Ray instance of its own, per CPU count and batch size: the "before" of the decode
  stage's ratio, printed below the table.

Append the printed table to benchmarks/RESULTS.md with the machine it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    BUNDLE,
    archive_tree,
    checkout,
    start_ray,
)  # benchmarks/common.py: this folder is on sys.path
from PIL import Image, ImageOps

from lxn_ray.data.ingest import ingest
from lxn_ray.data.settings import IngestConfig
from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.fingerprint import fingerprint
from lxn_ray.images.decode import ImageRejected, decode_image, to_grayscale
from lxn_ray.infra import cluster
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.metadata import parse_metadata
from lxn_ray.sources.transports import FolderSource


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


# -- full-size films ---------------------------------------------------------------------------------------
FRONTAL = ("PA", "AP", "AP Supine", "AP erect", "AP semi erect")
FILM_COLUMNS = ("patientid", "finding", "view", "modality", "folder", "filename")


def upscale_films(snapshot: Path, out: Path, side: int, count: int) -> Path:
    """``count`` frontal X-rays of ``snapshot`` upscaled to ``side`` px (longer side) in ``out`` (kept: a
    later run with the same ``out`` reuses them). See the module docstring."""
    marker = out / "metadata.csv"
    if marker.exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    for larger in sorted(out.parent.glob(f"films-{side}-*")):  # the first films of a larger set, linked
        if larger != out and (larger / "metadata.csv").exists():
            with open(larger / "metadata.csv", encoding="utf-8", newline="") as stream:
                rows = list(csv.DictReader(stream))
            if len(rows) >= count:
                for row in rows[:count]:
                    os.link(larger / "images" / row["filename"], out / "images" / row["filename"])
                with open(marker, "w", encoding="utf-8", newline="") as stream:
                    writer = csv.DictWriter(stream, FILM_COLUMNS)
                    writer.writeheader()
                    writer.writerows(rows[:count])
                return out
    rng = np.random.default_rng(side)
    written = []
    with open(snapshot / "metadata.csv", encoding="utf-8", newline="") as stream:
        for row in csv.DictReader(stream):
            name = row.get("filename", "")
            path = snapshot / "images" / name
            if len(written) >= count:
                break
            if row.get("modality") != "X-ray" or row.get("view") not in FRONTAL or not path.is_file():
                continue
            if name in {w["filename"] for w in written}:
                continue
            with Image.open(path) as image:
                fmt = image.format
                mode = "L" if image.mode in ("L", "LA", "I", "I;16", "1") else "RGB"
                image = ImageOps.exif_transpose(image).convert(mode)
            scale = side / max(image.size)
            big = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                Image.Resampling.BICUBIC,
            )
            pixels = np.asarray(big, dtype=np.int16)
            noise = rng.standard_normal(pixels.shape[:2], dtype=np.float32) * 2.0
            if pixels.ndim == 3:
                noise = noise[..., None]
            big = Image.fromarray(np.clip(pixels + noise.round(), 0, 255).astype(np.uint8), mode)
            buffer = io.BytesIO()
            if fmt == "PNG":
                big.save(buffer, format="PNG", compress_level=6)
            else:
                big.save(buffer, format="JPEG", quality=90)
            (out / "images" / name).write_bytes(buffer.getvalue())
            written.append({**{c: row.get(c, "") for c in FILM_COLUMNS}, "folder": "images"})
    with open(marker.with_suffix(".part"), "w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, FILM_COLUMNS)
        writer.writeheader()
        writer.writerows(written)
    marker.with_suffix(".part").replace(marker)
    return out


def plain_loop_split(root: Path, scaled: bool = False, fingerprints: dict | None = None) -> dict[str, float]:
    """The plain loop over ``root``'s films, with its time split into read / decode / grayscale /
    fingerprint: each film decoded whole, or (``scaled``) as ``fingerprint_film`` decodes it. Each film's
    fingerprint is kept in ``fingerprints`` (by image path) when given."""
    long_side = DedupeConfig().max_side if scaled else None
    rows = [row for row in parse_metadata((root / "metadata.csv").read_bytes()) if not row.exclusion]
    split = {"read": 0.0, "decode": 0.0, "grayscale": 0.0, "fingerprint": 0.0}
    done, pixels = 0, 0
    started = time.perf_counter()
    for row in rows:
        t0 = time.perf_counter()
        data = (root / row.image_path).read_bytes()
        t1 = time.perf_counter()
        decoded = decode_image(data, min_long_side=long_side)
        t2 = time.perf_counter()
        gray = to_grayscale(decoded.image)
        t3 = time.perf_counter()
        kept = fingerprint(gray, size=(decoded.width, decoded.height))
        t4 = time.perf_counter()
        if fingerprints is not None:
            fingerprints[row.image_path] = kept
        for key, seconds in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            split[key] += seconds
        done += 1
        pixels += decoded.width * decoded.height
    return {**split, "seconds": time.perf_counter() - started, "images": done, "pixels": pixels}


#: The code issue 28 was filed against (the decode stage decoded every film whole, and the driver sent
#: every file's bytes to the tasks): the default of ``--baseline-commit``.
BASELINE_COMMIT = "9400ddc"

_STAGE_RUNNER = """
import json, sys, time
from pathlib import Path
from common import start_ray
from lxn_ray.data.ingest import ingest
from lxn_ray.data.settings import IngestConfig
from lxn_ray.infra import cluster
from lxn_ray.infra.storage import Storage
from lxn_ray.sources.transports import FolderSource
films, store, ray_tmp = (Path(arg) for arg in sys.argv[1:4])
niceness, cpus, batch = int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
start_ray(ray_tmp, niceness, num_cpus=None if cpus == "all" else int(cpus))
import ray
total = int(ray.cluster_resources().get("CPU", 0))
began = time.perf_counter()
report = ingest(FolderSource(films), Storage.open(str(store)), IngestConfig(decode_batch_size=batch))
whole = time.perf_counter() - began
cluster.shutdown()
stages = report["stage_seconds"]
print(json.dumps({"cpus": total, "images": report["images_hashed"], "whole": whole, "stages": stages}))
"""


def baseline_stage(
    args: argparse.Namespace, films: Path, work: Path, cpus: int | None, batch: int
) -> tuple[str, int, float, float, dict] | None:
    """The decode stage of ``args.baseline_commit``'s ``lxn_ray`` (``git archive``: the repository is not
    touched) on ``films``, in a process of its own with its own Ray instance (``cpus`` CPUs, workers at
    ``--ray-niceness``) and a store of its own, as this tree's stage is run: (row name, films, stage
    seconds, whole ingest seconds, stage seconds by stage), or None when it could not run (said why)."""
    with tempfile.TemporaryDirectory(prefix="lxn-before-", dir=work) as tmp:
        tree = Path(tmp) / "tree"
        if failed := archive_tree(args.baseline_commit, tree):
            print(f"# baseline skipped: {failed}")
            return None
        here = Path(__file__).resolve().parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(here)])}  # Ray's workers too
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _STAGE_RUNNER,
                str(films),
                str(Path(tmp) / "store"),
                str(Path(tmp) / "ray"),
            ]
            + [str(args.ray_niceness), "all" if cpus is None else str(cpus), str(batch)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,  # not the checkout, whose lxn_ray would be found first
        )
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"# baseline skipped: {last}")
            return None
    run = json.loads(out.stdout.strip().splitlines()[-1])
    name = f"lxn_ray decode stage at {args.baseline_commit} (before), {run['cpus']} CPU, batch {batch}"
    return name, run["images"], run["stages"]["fingerprint"], run["whole"], run["stages"]


def fingerprint_agreement(whole: dict, scaled: dict) -> tuple[int, float, bool, int]:
    """Whether the scaled decode's fingerprints decide as the whole decode's: (films, the largest
    verification score between a film's two fingerprints, whether ``find_duplicates`` over each set finds
    the same pairs, how many pairs the whole decode's finds)."""
    from lxn_ray.dedupe.search import find_duplicates
    from lxn_ray.dedupe.verify import verify_pair

    worst = max(verify_pair(scaled[key], whole[key]) for key in whole)
    found = [{(p.a, p.b) for p in find_duplicates({}, prints)} for prints in (whole, scaled)]
    return len(whole), worst, found[0] == found[1], len(found[0])


def full_size(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.film_size.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cpus = [None if c == "all" else int(c) for c in args.ray_cpus.split(",")]
    rows, agreements = [], []
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxn-films-")))
        snapshot = work / f"snapshot-{args.snapshot}"
        checkout(args.bundle, args.snapshot, snapshot)
        ray_tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxnray-", dir="/tmp")))
        stack.callback(cluster.shutdown)
        for side in sizes:
            started = time.perf_counter()
            films = upscale_films(snapshot, work / f"films-{side}-{args.film_count}", side, args.film_count)
            files = sorted((films / "images").iterdir())
            megabytes = sum(f.stat().st_size for f in files) / 2**20
            formats = sorted({f.suffix.lower().lstrip(".").replace("jpeg", "jpg") for f in files})
            print(
                f"# {side} px: {len(files)} films, {megabytes:.0f} MiB ({', '.join(formats)}), "
                f"ready in {time.perf_counter() - started:.0f}s",
                flush=True,
            )
            prints: dict[bool, dict] = {False: {}, True: {}}
            for scaled, name in (
                (False, "plain loop, whole decode (before)"),
                (True, "plain loop, scaled decode"),
            ):
                plain = plain_loop_split(films, scaled, prints[scaled])
                print(f"# {name}: {plain['images']} films in {plain['seconds']:.2f}s", flush=True)
                rows.append((side, f"{name} (1 process)", plain["images"], plain["seconds"], None, plain))
            agreements.append((side, *fingerprint_agreement(prints[False], prints[True])))
            for n_cpus in cpus:
                if args.baseline_commit != "none":
                    cluster.shutdown()  # the baseline's process starts a Ray instance of its own
                    for batch in batch_sizes:
                        before = baseline_stage(args, films, work, n_cpus, batch)
                        if before is not None:
                            rows.append((side, *before))
                            print(
                                f"# {before[0]}: {before[2]:.2f}s (whole ingest {before[3]:.1f}s)", flush=True
                            )
                start_ray(ray_tmp, args.ray_niceness, num_cpus=n_cpus)
                import ray

                total_cpus = int(ray.cluster_resources().get("CPU", 0))
                for batch in batch_sizes:
                    with tempfile.TemporaryDirectory(prefix="store-", dir=work) as store:
                        began = time.perf_counter()
                        report = ingest(
                            FolderSource(films), Storage.open(store), IngestConfig(decode_batch_size=batch)
                        )
                        whole = time.perf_counter() - began
                    name = f"lxn_ray decode stage, {total_cpus} CPU, batch {batch}"
                    stage = report["stage_seconds"]["fingerprint"]
                    print(f"# {name}: {stage:.2f}s (whole ingest {whole:.1f}s)", flush=True)
                    rows.append((side, name, report["images_hashed"], stage, whole, report["stage_seconds"]))
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    print("| film size | run | images | seconds | images/s | ratio to plain | whole ingest s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    plain_rate = {}
    for side, name, images, seconds, whole, _ in rows:
        rate = images / seconds if seconds else 0.0
        plain_rate.setdefault(side, rate)
        whole_text = f"{whole:.1f}" if whole is not None else "-"
        print(
            f"| {side} | {name} | {images} | {seconds:.2f} | {rate:.2f} | {rate / plain_rate[side]:.2f}x "
            f"| {whole_text} |"
        )
    print()
    print("where the time goes (seconds): plain loop read / decode / grayscale / fingerprint; lxn_ray stages")
    for side, name, _, _, _, detail in rows:
        parts = ", ".join(
            f"{k} {v:.2f}" for k, v in detail.items() if k not in ("images", "pixels", "seconds")
        )
        if "pixels" in detail:
            parts += f" (mean {detail['pixels'] / max(detail['images'], 1) / 1e6:.1f} MP per film)"
        print(f"- {side} px, {name}: {parts}")
    stages: dict[tuple[int, str], dict[str, float]] = {}
    for side, name, images, seconds, *_ in rows:
        if name.startswith("lxn_ray decode stage"):
            setting = ", ".join(name.split(", ")[-2:])  # "2 CPU, batch 16"
            when = "before" if "(before)" in name else "now"
            stages.setdefault((side, setting), {})[when] = images / seconds
    for (side, setting), rate in stages.items():
        if len(rate) == 2:
            print(
                f"- {side} px, the decode stage ({setting}): {rate['before']:.2f} films/s before, "
                f"{rate['now']:.2f} now: **{rate['now'] / rate['before']:.2f}x**"
            )
    for side, films, worst, same, pairs in agreements:
        print(
            f"- {side} px, scaled against whole decode: largest verification score between a film's two "
            f"fingerprints {worst:.4f} over {films} films (a duplicate scores <= "
            f"{DedupeConfig().max_residual}); duplicate pairs among the films: "
            f"{'the same' if same else 'DIFFERENT'} ({pairs})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--snapshot", default="2020-06-22")
    parser.add_argument("--earlier", default="2020-04-10")
    parser.add_argument("--film-size", default=None, help="comma-separated longer sides, e.g. 1024,4500")
    parser.add_argument("--film-count", type=int, default=200, help="films per size")
    parser.add_argument("--batch-sizes", default="16", help="IngestConfig.decode_batch_size values")
    parser.add_argument("--ray-cpus", default="all", help="comma-separated Ray CPU counts, e.g. 1,2")
    parser.add_argument("--workdir", type=Path, default=None, help="keep upscaled films here for reruns")
    parser.add_argument(
        "--baseline-commit",
        default=BASELINE_COMMIT,
        help="--film-size: also time this commit's decode stage on the same films (none: do not)",
    )
    parser.add_argument(
        "--ray-niceness",
        type=int,
        default=0,
        help="--film-size: nice level of Ray's workers (Ray's default, 15, yields the CPU to any other work "
        "on a shared machine while the plain loop runs at 0)",
    )
    args = parser.parse_args()
    if args.film_size:
        full_size(args)
        return

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
