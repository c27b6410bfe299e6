"""Scale benchmark: ingest and duplicate detection as the collection grows (1k ... 100k films).

    python benchmarks/scale.py [--sizes 1000,5000,20000] [--source DIR] [--new 1000] [--planted 200]
                               [--workdir DIR] [--seed 0] [--jobs 2] [--budget-minutes M]

What it builds
--------------
Distinct synthetic films, derived from the frontal X-rays of a real ieee8023 checkout (``--source``,
``metadata.csv`` + ``images/``; each real film is fitted to 384x384 once). Film ``i`` is a pure function of
``(--seed, i)``:

1. two real films of different base index, A and B; a random crop of each (62-90% of the side, aspect
   jittered 0.9-1.1x, anywhere in the film) resized to the output size, 256-384 px per side (drawn per film);
2. composited through a smooth random mask (a 4x4 random field, bicubic, through a logistic), so regions
   of one patient's chest sit beside another's;
3. an elastic warp: a 9x9 mesh of vertices displaced by a smooth random field (4-7% of the side), each cell
   mapped bilinearly (PIL ``MESH`` transform);
4. a random gamma (0.75-1.35), Gaussian noise (sigma 2-6 gray levels, from a random window of a fixed noise
   field) and JPEG quality 85-95.

Two films that share a real film share at most a region of it, differently cropped, scaled and warped, with
different noise: no radiologist would call them the same film, and the verifier must not either. This is
checked, not assumed: the duplicates the store-building ingests report among synthetic films are false pairs
and are counted (``false pairs`` below; they also lower the precision of the incremental run if any of the
new distinct films is matched).

The collection grows by chained ingests, as a store does: size 1k is ingested into an empty store, size 5k
is the same store with films 1k..5k added, and so on (``build s`` is that step's ingest; ``cum. build s``
the sum up to this size). Every size is a folder in the upstream layout (``metadata.csv`` + ``images/``, one
patient per film, finding and view drawn at random) read by :class:`lxn_ray.sources.transports.FolderSource`.

At every size N, a copy of the store (blobs hard-linked: they are written once, by content) receives an
incremental ingest of ``--new`` films, of which ``--planted`` are near-duplicates of films already in the
store (originals drawn uniformly from the N; the copies are made by ``benchmarks/dedupe_quality.py``'s
``make_copy`` - resize, JPEG, crop, border, brightness/contrast/gamma, annotations, bit depth - and, where
that module has them, a quarter by ``make_kind_copy``: mirror, crop by an eighth, off-centre crop, figure
panel), under a patient id of their own, and the rest are distinct new synthetic films. Recall and precision
are read from that version's ``duplicates`` table against the planted pairs (a planted copy counts as found
only when paired with its own original).

What is measured
----------------
Ingest goes through the Python API (:func:`lxn_ray.data.ingest.ingest`) on a local Ray instance started once
by
this script, outside the timings (its own temp dir, 2 GB object store, workers at nice 0 like this process
and the baseline - Ray's default of 15 would hand most of a shared machine's CPU to other work;
``--ray-niceness``). Per size: wall seconds of each
ingest and the report's ``stage_seconds``; the report's ``dedupe`` entry (``candidate_pairs``,
``new_images``, ``index_seconds``, ``query_seconds``, ``verify_seconds``; ``-`` where a version of lxn_ray
does not report them); peak memory: the driver's ``ru_maxrss`` (process lifetime, so it only grows) and the
peak of the summed proportional set size (PSS, from ``/proc/PID/smaps_rollup``; shared pages such as the
object store are split among the processes mapping them, not counted twice) of this process and every
descendant (the Ray processes it started: GCS, raylet, workers, object store), sampled every 0.5 s during
each ingest.

Growth exponents are least-squares slopes of log(value) against log(N) over the sizes that ran. Sizes that
do not fit (``--budget-minutes``: a size whose predicted time - the last size's build seconds per added film
times the films to add, plus its incremental run - exceeds what is left is skipped, and a running size is
interrupted at the deadline) and 100k are extrapolated from those fits (two sizes or more), marked so.

The plain baseline, on the same fingerprints (read back from the store's fingerprint cache): today's
radius candidate search done by brute force - every new film's two 64-bit phashes XOR-ed with every stored
film's and popcounted in numpy (``phash_trim`` within 16 bits or ``phash`` within 10, the radii of the
BK-tree search this replaced) - its seconds and candidates per new image; and the plain duplicate decision
"whole-image phash distance <= 6" (the best-precision threshold of the duplicate-quality harness) scored on
the same planted pairs.

Generated films are cached under ``--workdir`` (default: a new temp dir, removed at the end; pass a folder
to keep them for reruns). Every built store is kept there too (blobs hard-linked), with its build
measurements; ``--reuse-stores`` starts from them instead of rebuilding (when their fingerprints are of
the current version - a store built under an older dedupe config is still used, and the log says so),
marks those build rows ``(cached)``, and measures only the incremental runs anew.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import BUNDLE, checkout, start_ray  # noqa: E402 (benchmarks/common.py)

from lxn_ray.data.ingest import ingest  # noqa: E402
from lxn_ray.data.settings import IngestConfig  # noqa: E402
from lxn_ray.dedupe.fingerprint import FINGERPRINT_VERSION  # noqa: E402
from lxn_ray.infra.storage import Storage  # noqa: E402
from lxn_ray.sources.transports import FolderSource  # noqa: E402

SYNTH_VERSION = 1  # bump when the synthesis changes: cached films of another version are not reused
BASE_SIDE = 384
FRONTAL = ("PA", "AP", "AP Supine", "AP erect", "AP semi erect")
FINDINGS = ("COVID-19", "Pneumonia", "No Finding")
HEADER = ("patientid", "offset", "sex", "age", "finding", "view", "modality", "date", "location", "folder")
NOISE_SIDE = 768
TARGET_SIZE = 100_000


# -- synthesis ------------------------------------------------------------------------------------------
def load_bases(source: Path) -> list[Image.Image]:
    """The frontal X-rays of ``source`` (upstream layout), each fitted to BASE_SIDE x BASE_SIDE grayscale."""
    seen, bases = set(), []
    with open(source / "metadata.csv", encoding="utf-8", newline="") as stream:
        for row in csv.DictReader(stream):
            name = row.get("filename", "")
            path = source / "images" / name
            if row.get("modality") != "X-ray" or row.get("view") not in FRONTAL or name in seen:
                continue
            if not path.is_file():
                continue
            seen.add(name)
            with Image.open(path) as image:
                gray = ImageOps.exif_transpose(image).convert("L")
            bases.append(ImageOps.fit(gray, (BASE_SIDE, BASE_SIDE), Image.Resampling.BILINEAR))
    if len(bases) < 2:
        raise SystemExit(f"{source}: fewer than two frontal X-rays to synthesise from")
    return bases


_BASES: list[Image.Image] = []
_NOISE = np.random.default_rng(12345).standard_normal((NOISE_SIDE, NOISE_SIDE), dtype=np.float32)


def _smooth(rng: np.random.Generator, size: tuple[int, int], amplitude: float) -> np.ndarray:
    """A smooth random field of ``size`` (w, h): a 4x4 grid of uniform values, bicubic."""
    coarse = rng.uniform(-amplitude, amplitude, size=(4, 4)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize(size, Image.Resampling.BICUBIC))


def _crop(rng: np.random.Generator, base: Image.Image, w: int, h: int) -> Image.Image:
    side = rng.uniform(0.62, 0.9)
    cw = min(base.width, base.width * side * rng.uniform(0.9, 1.1))
    ch = min(base.height, base.height * side * rng.uniform(0.9, 1.1))
    x0, y0 = rng.uniform(0, base.width - cw), rng.uniform(0, base.height - ch)
    return base.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def _elastic(rng: np.random.Generator, image: Image.Image, amplitude: float, cells: int = 8) -> Image.Image:
    """Piecewise-bilinear elastic warp: the vertices of a cells x cells mesh displaced by a smooth field."""
    w, h = image.size
    n = cells + 1
    xs, ys = np.linspace(0, w, n), np.linspace(0, h, n)
    sx = xs[None, :] + _smooth(rng, (n, n), amplitude)
    sy = ys[:, None] + _smooth(rng, (n, n), amplitude)
    mesh = []
    for j in range(cells):
        for i in range(cells):
            box = (round(xs[i]), round(ys[j]), round(xs[i + 1]), round(ys[j + 1]))
            quad = (
                *(sx[j, i], sy[j, i]),
                *(sx[j + 1, i], sy[j + 1, i]),
                *(sx[j + 1, i + 1], sy[j + 1, i + 1]),
                *(sx[j, i + 1], sy[j, i + 1]),
            )
            mesh.append((box, tuple(float(v) for v in quad)))
    return image.transform((w, h), Image.Transform.MESH, mesh, Image.Resampling.BILINEAR)


def synthesise(seed: int, index: int, bases: Sequence[Image.Image]) -> bytes:
    """Synthetic film ``index`` (JPEG bytes); see the module docstring for the method."""
    rng = np.random.default_rng([seed, SYNTH_VERSION, index])
    w, h = (int(v) for v in rng.integers(256, 385, size=2))
    first, second = (int(v) for v in rng.choice(len(bases), size=2, replace=False))
    a, b = _crop(rng, bases[first], w, h), _crop(rng, bases[second], w, h)
    mask = (255.0 / (1.0 + np.exp(-_smooth(rng, (w, h), 3.0)))).astype(np.uint8)
    image = Image.composite(a, b, Image.fromarray(mask))
    image = _elastic(rng, image, float(rng.uniform(0.04, 0.07)) * min(w, h))
    gamma = rng.uniform(0.75, 1.35)
    image = image.point([round(255 * (v / 255) ** gamma) for v in range(256)])
    oy, ox = (int(v) for v in rng.integers(0, NOISE_SIDE - 384, size=2))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += _NOISE[oy : oy + h, ox : ox + w] * np.float32(rng.uniform(2.0, 6.0))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(rng.integers(85, 96))
    )
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)


def _synthesise_to(job: tuple[int, int, str]) -> None:
    seed, index, path = job
    _write_atomic(Path(path), synthesise(seed, index, _BASES))


def _init_worker(source: str) -> None:
    global _BASES
    _BASES = load_bases(Path(source))


def film_name(index: int) -> str:
    return f"syn-{index:07d}.jpg"


def new_name(index: int) -> str:
    return f"new-{index:05d}.jpg"


def copy_name(size: int, planted: int, index: int) -> str:
    return f"dup-{size}-of{planted}-{index:05d}.jpg"


def plant(size: int, planted: int, seed: int) -> list[int]:
    """The store films (indices < size) that get a planted copy at this size, sorted."""
    return sorted(random.Random(f"{seed}-plant-{size}").sample(range(size), min(planted, size)))


def make_planted(dq: Any, original: Path, seed: int, size: int, index: int) -> tuple[bytes, str]:
    """A near-duplicate of ``original`` by the duplicate-quality harness's transforms: (bytes, how)."""
    rng = random.Random(f"{seed}-copy-{size}-{index}")
    with Image.open(original) as image:
        gray = ImageOps.exif_transpose(image).convert("L")
    kinds = getattr(dq, "KINDS", ())
    if kinds and hasattr(dq, "make_kind_copy") and index % 4 == 3:
        kind = kinds[(index // 4) % len(kinds)]
        copy, ops = dq.make_kind_copy(gray, kind, rng), [kind]
    else:
        copy, ops = dq.make_copy(gray, rng)
    buffer = io.BytesIO()
    if ops[-1] == "png":
        copy.save(buffer, format="PNG")
    else:
        copy.save(buffer, format="JPEG", quality=95)  # make_copy already applied its own JPEG loss
    return buffer.getvalue(), "+".join(ops)


def load_dedupe_quality() -> Any:
    spec = importlib.util.spec_from_file_location("dedupe_quality", REPO / "benchmarks" / "dedupe_quality.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def prepare_films(args: argparse.Namespace, pool: Path, size: int) -> dict[str, str]:
    """The films size ``size`` needs, in ``pool`` (cached): store films, new distinct films and the planted
    copies; returns the planted truth {copy: original}."""
    pool.mkdir(parents=True, exist_ok=True)
    jobs = [
        (args.seed, i, str(pool / film_name(i))) for i in range(size) if not (pool / film_name(i)).exists()
    ]
    # new distinct films: a stream of indices far above any store film's
    jobs += [
        (args.seed, 10_000_000 + j, str(pool / new_name(j)))
        for j in range(args.new - args.planted)
        if not (pool / new_name(j)).exists()
    ]
    started = time.perf_counter()
    if jobs:
        log(f"synthesising {len(jobs)} films with {args.jobs} processes")
        # spawn, not fork: this process may already hold Ray's threads
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.jobs, _init_worker, (str(args.source),)) as workers:
            for _ in workers.imap_unordered(_synthesise_to, jobs, chunksize=64):
                pass
    dq = load_dedupe_quality()
    truth: dict[str, str] = {}
    for j, original in enumerate(plant(size, args.planted, args.seed)):
        name = copy_name(size, args.planted, j)
        how_path = pool / f"{name}.how"
        if not (pool / name).exists() or not how_path.exists():
            data, ops = make_planted(dq, pool / film_name(original), args.seed, size, j)
            _write_atomic(pool / name, data)
            how_path.write_text(ops)
        truth[name] = film_name(original)
        args.copy_ops[name] = how_path.read_text()
    log(f"films for size {size} ready in {time.perf_counter() - started:.1f}s ({len(jobs)} synthesised now)")
    return truth


def write_source(root: Path, pool: Path, names: Sequence[str], seed: int) -> Path:
    """An upstream-layout folder: metadata.csv naming ``names`` (one patient each), images/ hard-linked."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-meta")
    with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow((*HEADER, "filename"))
        for name in names:
            target = images / name
            if not target.exists():
                os.link(pool / name, target)
            patient = "P" + name.rsplit(".", 1)[0]
            finding = FINDINGS[rng.randrange(3)]
            view = ("PA", "AP", "AP Supine")[rng.randrange(3)]
            sex, age = rng.choice("MF"), rng.randint(18, 90)
            writer.writerow(
                (patient, 0, sex, age, finding, view, "X-ray", "2020", "synthetic", "images", name)
            )
    return root


# -- measurement ----------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Peak summed PSS of this process and its descendants, sampled in a thread while active."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(_pss_bytes(pid) for pid in _descendants(os.getpid()))
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[MemorySampler]:
        self.peak = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def driver_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_ingest(root: Path, store: Path, sampler: MemorySampler) -> dict[str, Any]:
    with sampler.measuring():
        started = time.perf_counter()
        report = ingest(FolderSource(root), Storage.open(str(store)), IngestConfig())
        seconds = time.perf_counter() - started
    dedupe = report.get("dedupe") if isinstance(report.get("dedupe"), dict) else {}
    return {
        "seconds": seconds,
        "stages": report.get("stage_seconds", {}),
        "dedupe": dedupe,
        "version": report.get("dataset_version"),
        "hashed": report.get("images_hashed"),
        "usable": report.get("usable"),
        "duplicates": report.get("duplicates", []),
        "peak_pss": sampler.peak,
        "driver_maxrss": driver_maxrss(),
    }


def copy_store(src: Path, dst: Path) -> None:
    """A copy of a local store; blobs and cached fingerprints are hard-linked (written once, never changed:
    lxn_ray's local storage writes a temporary file and renames it into place)."""

    def link_or_copy(a: str, b: str) -> None:
        rel = Path(a).relative_to(src).parts[0]
        if rel in ("blobs", "cache"):
            os.link(a, b)
        else:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def store_stamp(store: Path) -> dict[str, Any]:
    """What a kept store was built with: its fingerprints' version and its latest version's config hash."""
    versions = {
        int(v)
        for path in (store / "cache" / "fingerprints").glob("*.parquet")
        for v in pq.read_table(path, columns=["dedupe_version"]).column(0).to_pylist()
    }
    latest = (store / "datasets" / "LATEST").read_text().strip()
    manifest = json.loads((store / "datasets" / latest / "manifest.json").read_text())
    return {"fingerprint_version": max(versions, default=None), "config": manifest["config_hash"]}


def fingerprints_by_sha(store: Path) -> dict[str, tuple[int, int]]:
    """sha256 -> (phash_trim, phash) as integers, from the store's fingerprint cache."""
    found: dict[str, tuple[int, int]] = {}
    for path in sorted((store / "cache" / "fingerprints").glob("*.parquet")):
        table = pq.read_table(path, columns=["sha256", "phash_trim", "phash"]).to_pydict()
        for sha, trim, whole in zip(table["sha256"], table["phash_trim"], table["phash"], strict=True):
            if trim and whole:
                found[sha] = (int(trim, 16), int(whole, 16))
    return found


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1, dtype=np.int32)


def baseline(
    known: dict[str, tuple[int, int]], new: dict[str, tuple[int, int]], truth: dict[str, str]
) -> dict[str, float]:
    """Brute-force radius search (phash_trim <= 16 or phash <= 10) and the phash <= 6 decision."""
    started = time.perf_counter()
    known_names = list(known)
    kt = np.array([known[k][0] for k in known_names], dtype=np.uint64)
    kw = np.array([known[k][1] for k in known_names], dtype=np.uint64)
    candidates, decided = 0, set()
    for name, (trim, whole) in new.items():
        d_trim = _popcount(np.bitwise_xor(kt, np.uint64(trim)))
        d_whole = _popcount(np.bitwise_xor(kw, np.uint64(whole)))
        candidates += int(np.count_nonzero((d_trim <= 16) | (d_whole <= 10)))
        decided.update((name, known_names[j]) for j in np.nonzero(d_whole <= 6)[0])
    seconds = time.perf_counter() - started
    planted = set(truth.items())
    hits = len(decided & planted)
    return {
        "seconds": seconds,
        "candidates_per_new": candidates / max(len(new), 1),
        "recall": hits / max(len(planted), 1),
        "precision": hits / len(decided) if decided else float("nan"),
        "pairs": len(decided),
    }


def score_duplicates(
    duplicates: list[dict[str, Any]], truth: dict[str, str], new_names: set[str]
) -> dict[str, Any]:
    """Recall/precision of the incremental version's duplicate pairs against the planted ones."""
    found = {(d["dropped"], d["kept"]) for d in duplicates} | {(d["kept"], d["dropped"]) for d in duplicates}
    reported = [
        (d["dropped"], d["kept"]) for d in duplicates if d["dropped"] in new_names or d["kept"] in new_names
    ]
    hits = sum((copy, original) in found for copy, original in truth.items())
    correct = sum(truth.get(a) == b or truth.get(b) == a for a, b in reported)
    return {
        "recall": hits / max(len(truth), 1),
        "precision": correct / len(reported) if reported else float("nan"),
        "reported": len(reported),
        "false": len(reported) - correct,
        "missed": sorted(copy for copy, original in truth.items() if (copy, original) not in found),
    }


def slope(sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(size); None with fewer than two positive points."""
    points = [(math.log(s), math.log(v)) for s, v in zip(sizes, values, strict=True) if v and v > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def extrapolate(sizes: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """value at ``target`` from the least-squares power law over the measured sizes (None below two)."""
    points = [(math.log(s), math.log(v)) for s, v in zip(sizes, values, strict=True) if v and v > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    exponent, intercept = np.polyfit(x, y, 1)
    return float(math.exp(intercept + exponent * math.log(target)))


# -- the run --------------------------------------------------------------------------------------------
class Deadline:
    """Interrupts the main thread (KeyboardInterrupt) when the budget runs out."""

    def __init__(self, minutes: float | None) -> None:
        self.end = time.monotonic() + minutes * 60 if minutes else None
        self._timer: threading.Timer | None = None
        if self.end is not None:
            self._timer = threading.Timer(self.end - time.monotonic(), _thread.interrupt_main)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


def fmt(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def mib(value: int | None) -> str:
    return "-" if not value else f"{value / 2**20:,.0f}"


def run_size(
    args: argparse.Namespace,
    size: int,
    previous: int,
    truth: dict[str, str],
    work: Path,
    sampler: MemorySampler,
) -> dict[str, Any]:
    pool, store = work / "pool", work / "store"
    films = [film_name(i) for i in range(size)]
    cached = args.workdir / f"stores-v{SYNTH_VERSION}-seed{args.seed}" / f"size-{size}"
    build_json = cached / "build.json"
    saved = json.loads(build_json.read_text()) if build_json.exists() else {}
    stamp = store_stamp(cached / "store") if saved else {}
    # fingerprints of another version would all be recomputed: the incremental run would not be incremental
    if args.reuse_stores and stamp.get("fingerprint_version") == FINGERPRINT_VERSION:
        same = "same" if stamp["config"] == IngestConfig().digest() else f"older ({stamp['config']})"
        log(f"size {size}: reusing the store built {saved['when']} ({cached}; {same} ingest config)")
        shutil.rmtree(store, ignore_errors=True)
        copy_store(cached / "store", store)
        build = {**saved["build"], "cached": saved["when"]}
    else:
        log(f"size {size}: building the store (+{size - previous} films)")
        build = timed_ingest(write_source(work / f"src-{size}", pool, films, args.seed), store, sampler)
        shutil.rmtree(cached, ignore_errors=True)
        cached.mkdir(parents=True)
        copy_store(store, cached / "store")
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        build_json.write_text(json.dumps({"when": when, "build": build}, default=str))
    synthetic = [d for d in build["duplicates"] if d["dropped"].startswith("syn-")]
    inc_store = work / f"store-{size}-inc"
    shutil.rmtree(inc_store, ignore_errors=True)
    copy_store(store, inc_store)
    new_names = [new_name(j) for j in range(args.new - args.planted)] + sorted(truth)
    root = write_source(work / f"src-{size}-inc", pool, films + new_names, args.seed)
    log(f"size {size}: incremental ingest of {len(new_names)} films ({len(truth)} planted copies)")
    inc = timed_ingest(root, inc_store, sampler)
    scored = score_duplicates(inc["duplicates"], truth, set(new_names))
    by_sha = fingerprints_by_sha(inc_store)
    sha_of = {name: hashlib.sha256((pool / name).read_bytes()).hexdigest() for name in films + new_names}
    known = {n: by_sha[sha_of[n]] for n in films if sha_of[n] in by_sha}
    new = {n: by_sha[sha_of[n]] for n in new_names if sha_of[n] in by_sha}
    base = baseline(known, new, truth)
    shutil.rmtree(inc_store, ignore_errors=True)
    return {
        "size": size,
        "added": size - previous,
        "build": build,
        "build_false": len(synthetic),
        "inc": inc,
        "scored": scored,
        "baseline": base,
    }


def print_tables(args: argparse.Namespace, results: list[dict[str, Any]], skipped: list[int]) -> None:
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"synthetic films 256-384 px, seed {args.seed}; each size's incremental run adds {args.new} films "
        f"({args.planted} planted near-duplicates of stored films)"
    )
    print()
    print("Growing the store (chained ingests):")
    print(
        "| films in store | films added | build s | cum. build s | s per 1k added | build dedupe s "
        "| false pairs among synthetic films | peak PSS MiB (driver + Ray) | driver maxrss MiB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    cumulative = 0.0
    cum_values = []
    for r in results:
        b = r["build"]
        cumulative += b["seconds"]
        cum_values.append(cumulative)
        print(
            f"| {r['size']:,} | {r['added']:,} | {b['seconds']:.1f}{' (cached)' if b.get('cached') else ''} "
            f"| {cumulative:.1f} | "
            f"{1000 * b['seconds'] / r['added']:.1f} | {fmt(b['stages'].get('dedupe'))} | "
            f"{r['build_false']} | "
            f"{mib(b['peak_pss'])} | {mib(b['driver_maxrss'])} |"
        )
    print()
    print(f"Incremental ingest of {args.new} new films into the store:")
    print(
        "| films in store | ingest s | read / fingerprint / dedupe / publish s | candidate pairs "
        "| candidates per new image | index build s | index query s | verify s | recall | precision "
        "| false pairs | peak PSS MiB | driver maxrss MiB |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        i, d, s = r["inc"], r["inc"]["dedupe"], r["scored"]
        st = i["stages"]
        stages = " / ".join(fmt(st.get(k)) for k in ("read", "fingerprint", "dedupe", "publish"))
        pairs = d.get("candidate_pairs")
        per_new = pairs / d["new_images"] if pairs is not None and d.get("new_images") else None
        print(
            f"| {r['size']:,} | {i['seconds']:.1f} | {stages} | {fmt(pairs)} | {fmt(per_new)} | "
            f"{fmt(d.get('index_seconds'), 2)} | {fmt(d.get('query_seconds'), 2)} | "
            f"{fmt(d.get('verify_seconds'))} | {s['recall']:.3f} | {fmt(s['precision'], 3)} | "
            f"{s['false']} | {mib(i['peak_pss'])} | {mib(i['driver_maxrss'])} |"
        )
    print()
    print(
        "Plain baseline on the same fingerprints: brute-force radius search (numpy XOR + popcount of the "
        "new films against every stored film; phash_trim <= 16 or phash <= 10) and the phash <= 6 decision:"
    )
    print(
        "| films in store | baseline search s | baseline candidates per new image "
        "| lxn_ray candidates per new image | ratio lxn_ray / baseline | phash<=6 recall "
        "| phash<=6 precision | lxn_ray recall | lxn_ray precision |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        b, d, s = r["baseline"], r["inc"]["dedupe"], r["scored"]
        pairs = d.get("candidate_pairs")
        per_new = pairs / d["new_images"] if pairs is not None and d.get("new_images") else None
        ratio = per_new / b["candidates_per_new"] if per_new and b["candidates_per_new"] else None
        print(
            f"| {r['size']:,} | {b['seconds']:.2f} | {b['candidates_per_new']:.1f} | {fmt(per_new)} | "
            f"{fmt(ratio, 2, 'x')} | {b['recall']:.3f} | {fmt(b['precision'], 3)} | {s['recall']:.3f} | "
            f"{fmt(s['precision'], 3)} |"
        )
    sizes = [r["size"] for r in results]
    series = {
        "cumulative build s": cum_values,
        "incremental ingest s": [r["inc"]["seconds"] for r in results],
        "incremental dedupe stage s": [r["inc"]["stages"].get("dedupe") for r in results],
        "verify s": [r["inc"]["dedupe"].get("verify_seconds") for r in results],
        "index query s": [r["inc"]["dedupe"].get("query_seconds") for r in results],
        "candidates per new image": [
            r["inc"]["dedupe"]["candidate_pairs"] / r["inc"]["dedupe"]["new_images"]
            if r["inc"]["dedupe"].get("candidate_pairs") is not None and r["inc"]["dedupe"].get("new_images")
            else None
            for r in results
        ],
        "baseline candidates per new image": [r["baseline"]["candidates_per_new"] for r in results],
        "baseline search s": [r["baseline"]["seconds"] for r in results],
    }
    targets = sorted({*skipped, TARGET_SIZE} - set(sizes))
    print()
    print(
        "Growth exponents (least-squares slope of log value vs log films in store, over "
        f"{', '.join(f'{s:,}' for s in sizes)}) and extrapolations by that power-law fit "
        "(EXTRAPOLATED, not measured):"
    )
    print("| quantity | exponent | " + " | ".join(f"at {t:,} (extrapolated)" for t in targets) + " |")
    print("| --- | ---: |" + " ---: |" * len(targets))
    for name, values in series.items():
        pts = [(s, v) for s, v in zip(sizes, values, strict=True) if v is not None]
        e = slope([p[0] for p in pts], [p[1] for p in pts]) if pts else None
        extra = [extrapolate([p[0] for p in pts], [p[1] for p in pts], t) for t in targets]
        print(f"| {name} | {fmt(e, 2)} | " + " | ".join(fmt(v) for v in extra) + " |")
    if skipped:
        print(f"skipped (predicted not to fit the --budget-minutes, or interrupted): {skipped}")
    inc_values = series["incremental ingest s"]
    at_target = extrapolate(sizes, inc_values, TARGET_SIZE) if TARGET_SIZE not in sizes else None
    measured = next((r["inc"]["seconds"] for r in results if r["size"] == TARGET_SIZE), None)
    print()
    per_1k = 1000 / args.new  # incremental work grows with the new films' number (candidates per new image)
    scaled = "" if args.new == 1000 else f" (measured with {args.new} new films, scaled x{per_1k:.2f})"
    if measured is not None:
        print(
            f"target: 1k new films into a 100k store in < 300 s: measured {measured * per_1k:.0f} s{scaled}"
        )
    elif at_target is None:
        print(
            "target: 1k new films into a 100k store in < 300 s: not measured, and one measured size "
            "cannot be extrapolated"
        )
    else:
        print(
            f"target: 1k new films into a 100k store in < 300 s: EXTRAPOLATED "
            f"{at_target * per_1k:.0f} s{scaled}"
        )
    per_new = [v for v in series["candidates per new image"] if v is not None]
    if len(per_new) >= 2:
        print(
            f"target: candidates per new image flat within 2x from smallest to largest size: "
            f"{per_new[0]:.1f} -> {per_new[-1]:.1f} ({per_new[-1] / per_new[0]:.2f}x over "
            f"{sizes[0]:,} -> {sizes[-1]:,})"
        )
    for r in results:
        if r["scored"]["missed"]:
            missed = r["scored"]["missed"]
            print(
                f"missed planted copies at {r['size']:,}: "
                + ", ".join(f"{m} ({args.copy_ops.get(m, '?')})" for m in missed[:12])
                + (" ..." if len(missed) > 12 else "")
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,5000,20000", help="comma-separated store sizes (films)")
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="ieee8023 checkout (default: the bundle's 2020-06-22 snapshot)",
    )
    parser.add_argument(
        "--bundle", type=Path, default=BUNDLE, help="git bundle of ieee8023 (without --source)"
    )
    parser.add_argument("--new", type=int, default=1000, help="films in each incremental run")
    parser.add_argument("--planted", type=int, default=200, help="of which near-duplicates of stored films")
    parser.add_argument("--workdir", type=Path, default=None, help="cache of films (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="synthesis processes")
    parser.add_argument("--budget-minutes", type=float, default=None, help="skip/stop sizes past this")
    parser.add_argument("--object-store-mb", type=int, default=2000)
    parser.add_argument(
        "--reuse-stores",
        action="store_true",
        help="reuse the stores (and build measurements) an earlier run kept under --workdir for the same "
        "films, fingerprint version and ingest config; only the incremental runs are measured anew",
    )
    parser.add_argument(
        "--ray-niceness",
        type=int,
        default=0,
        help="nice level of Ray's workers (Ray's own default is 15: on a machine shared with other work it "
        "then gets a small share of the CPU, so the Ray path is measured against nice-0 neighbours)",
    )
    args = parser.parse_args()
    args.sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not 0 <= args.planted <= args.new:
        parser.error("--planted must be between 0 and --new")
    deadline = Deadline(args.budget_minutes)

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxn-scale-")))
        args.workdir.mkdir(parents=True, exist_ok=True)
        pool = args.workdir / f"films-v{SYNTH_VERSION}-seed{args.seed}"
        if args.source is None:
            args.source = checkout(args.bundle, "2020-06-22", args.workdir / "snapshot-2020-06-22")
        args.copy_ops = {}
        # per-run state (stores, sources) lives in a fresh folder; the pool is shared
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="run-", dir=args.workdir)))
        (work / "pool").symlink_to(pool)
        ray_tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxnray-", dir="/tmp")))
        import ray

        start_ray(ray_tmp, args.ray_niceness, object_store_mb=args.object_store_mb)
        stack.callback(ray.shutdown)
        sampler = MemorySampler()
        results: list[dict[str, Any]] = []
        skipped: list[int] = []
        previous = 0
        for size in args.sizes:
            if results:
                # build time per added film and the incremental run's time as at the last size (the
                # candidate index bounds the candidates per image); the deadline stops a size that overruns
                last = results[-1]
                per_film = last["build"]["seconds"] / last["added"]
                predicted = per_film * (size - previous) + last["inc"]["seconds"]
                if predicted > deadline.left():
                    log(f"size {size}: predicted {predicted:.0f}s, {deadline.left():.0f}s left: skipped")
                    skipped.append(size)
                    continue
            try:
                truth = prepare_films(args, pool, size)
                results.append(run_size(args, size, previous, truth, work, sampler))
                previous = size
            except KeyboardInterrupt:
                log(f"size {size}: interrupted at the deadline")
                skipped.append(size)
                break
            r = results[-1]
            log(
                f"size {size}: build {r['build']['seconds']:.0f}s, incremental {r['inc']['seconds']:.0f}s, "
                f"recall {r['scored']['recall']:.3f}, precision {fmt(r['scored']['precision'], 3)}"
            )
        skipped += [s for s in args.sizes if s not in skipped and s not in {r["size"] for r in results}]
        deadline.cancel()
        print_tables(args, results, sorted(set(skipped)))


if __name__ == "__main__":
    main()
