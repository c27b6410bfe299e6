"""Scale benchmark: one incremental ingest of 1,000 films into stores of 1k ... 100k films.

    python benchmarks/scale.py [--sizes 1000,10000,100000] [--source DIR] [--new 1000] [--planted 200]
                               [--workdir DIR] [--seed 0] [--jobs 2]

What is measured (and what is not)
----------------------------------
At every size N, the **incremental ingest** of ``--new`` films (``--planted`` of them near-duplicates of
stored films) into a store of N films, through the real ingest (:func:`lxn_ray.data.ingest.ingest`, Python
API, on a local Ray instance this script starts once: its own temp dir, 2 GB object store, workers at nice 0
like this process - Ray's default of 15 would hand most of a shared machine's CPU to other work;
``--ray-niceness``). That run reads and hashes every film of the source (N + new), fingerprints the new ones
on Ray Data, loads the store's fingerprint cache, builds the candidate index over all N + new, verifies the
candidate pairs as Ray tasks and publishes the version. Per size: its wall seconds and ``stage_seconds``,
the report's ``dedupe`` entry (candidate pairs, index/query/verify seconds), recall and precision against
the planted pairs (a planted copy counts as found only when paired with its own original), and memory:

* **peak RSS per process** - the kernel's high-water mark (``VmHWM``), reset (``/proc/PID/clear_refs`` = 5)
  for this process and every descendant just before the incremental ingest and read every 0.2 s and at its
  end: the driver's, and the largest of any other process this script started (Ray workers, raylet, GCS,
  ...; a Ray worker's RSS counts the object-store pages it touched);
* the peak of the **summed proportional set size** (PSS, ``/proc/PID/smaps_rollup``; shared pages such as
  the object store split among the processes mapping them) of this process and all its descendants, sampled
  every 0.2 s.

The store: a benchmark-only shortcut (not measured as ingest)
-------------------------------------------------------------
Ingesting 100k films through the job costs ~95 s per 1,000 (2 cores), so the stored films are built
cheaply, and the only measured ingest is the incremental one:

1. **Cheap stored films** ``cheap-NNNNNNN.jpg`` (all but the planted originals): the synthesis below run at
   a third of the resolution (bases fitted to 128 px, films 86-128 px per side; same crops, mask, elastic
   warp, gamma, noise and JPEG 85-95), ~4 KB each, written to the source folder, and fingerprinted by
   ingest's own decode + fingerprint function (:func:`lxn_ray.data.fetch.fingerprint_batch`) in a process
   pool; their records are written **directly into the store's fingerprint cache** (``cache/fingerprints``,
   shards of 1,000 films with ingest's row groups, as 100 chained ingests of 1,000 would leave it). Their
   hashes, appearance vectors, windows and thumbnails are those of real (small) films of this synthesis,
   so the index's neighbours and the candidates per new film are exercised as for full-size films; their
   thumbnails are upsampled from ~100 px, so a little smoother than a full-size film's.
2. **Real stored films** ``syn-NNNNNNN.jpg``: the films that the planted copies are made from (``plant``:
   drawn uniformly from the N), synthesised at full size (below) and fingerprinted by ingest itself.
3. A **store-building ingest** of those N films with candidate search switched off (every ``k`` of
   :class:`~lxn_ray.dedupe.index.SearchConfig` 0, so no pair is verified), which fingerprints the real
   films, stores every film's bytes and publishes a real first version (images, patients, fingerprints
   tables) for the incremental run to grow. Its seconds and memory are printed but are not an ingest's:
   it verified nothing, and the incremental ingest has another config hash (the default one).

Not measured, therefore: building a 100k store through the job (deduplicating 100k films against each
other), chained growth, and duplicate detection *among* stored films (the cheap films were never compared
with each other). Nor is any store that does not fit one machine's disk.

The films
---------
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
different noise: no radiologist would call them the same film, and the verifier must not either (a new
distinct film paired with a stored one lowers the precision).

The incremental run's films: ``--new - --planted`` distinct new films (full size, indices far above any
store film's) and ``--planted`` near-duplicates of stored films (the real originals of 2.), made by
``benchmarks/dedupe_quality.py``'s ``make_copy`` - resize, JPEG, crop, border, brightness/contrast/gamma,
annotations, bit depth - and a quarter by its ``make_kind_copy``: mirror, crop by an eighth, off-centre crop,
figure panel), under patient ids of their own. Every size is a folder in the upstream layout
(``metadata.csv`` + ``images/``, one patient per film, finding and view drawn at random) read by
:class:`lxn_ray.sources.transports.FolderSource`; a copy of the built store (blobs and cache hard-linked)
receives the incremental ingest.

The plain baseline, on the same fingerprints (read back from the store's fingerprint cache): the radius
candidate search of old done by brute force - every new film's two 64-bit phashes XOR-ed with every stored
film's and popcounted in numpy (``phash_trim`` within 16 bits or ``phash`` within 10) - its seconds and
candidates per new image; and the plain duplicate decision "whole-image phash distance <= 6" scored on the
same planted pairs.

Films and cheap cache shards are cached under ``--workdir`` (default: a new temp dir, removed at the end;
pass a folder to keep them for reruns); stores are built anew every run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib.util
import io
import math
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import BUNDLE, checkout, start_ray  # noqa: E402 (benchmarks/common.py)

from lxn_ray.data.fetch import RECORD_COLUMNS, fingerprint_batch  # noqa: E402
from lxn_ray.data.ingest import ingest  # noqa: E402
from lxn_ray.data.settings import IngestConfig  # noqa: E402
from lxn_ray.dedupe.config import DedupeConfig  # noqa: E402
from lxn_ray.dedupe.index import SearchConfig  # noqa: E402
from lxn_ray.dedupe.thumbs import THUMB_ROWS_PER_GROUP, compression_for  # noqa: E402
from lxn_ray.infra.storage import Storage  # noqa: E402
from lxn_ray.sources.transports import FolderSource  # noqa: E402

SYNTH_VERSION = 1  # bump when the synthesis changes: cached films of another version are not reused
BASE_SIDE = 384
FRONTAL = ("PA", "AP", "AP Supine", "AP erect", "AP semi erect")
FINDINGS = ("COVID-19", "Pneumonia", "No Finding")
HEADER = ("patientid", "offset", "sex", "age", "finding", "view", "modality", "date", "location", "folder")
NOISE_SIDE = 768
TARGET_SIZE = 100_000
CHEAP_SCALE = 3  # cheap films: bases and films at a third of the resolution
SHARD = 1000  # cheap films per fingerprint-cache shard (one ingest of 1,000 films writes one)
#: Candidate search switched off: the store-building ingest publishes a version without verifying a pair.
NO_SEARCH = IngestConfig(dedupe=DedupeConfig(search=SearchConfig(0, 0, 0, 0, 0, 0, 0)))


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


def synthesise_cheap(seed: int, index: int, small: Sequence[Image.Image]) -> bytes:
    """Cheap film ``index`` (JPEG bytes): :func:`synthesise` at 1/CHEAP_SCALE resolution from ``small``
    bases (BASE_SIDE / CHEAP_SCALE px), films 86-128 px per side; its own random stream."""
    rng = np.random.default_rng([seed, SYNTH_VERSION, 7, index])
    w, h = (int(v) for v in rng.integers(256 // CHEAP_SCALE, 384 // CHEAP_SCALE + 1, size=2))
    first, second = (int(v) for v in rng.choice(len(small), size=2, replace=False))
    a, b = _crop(rng, small[first], w, h), _crop(rng, small[second], w, h)
    mask = (255.0 / (1.0 + np.exp(-_smooth(rng, (w, h), 3.0)))).astype(np.uint8)
    image = Image.composite(a, b, Image.fromarray(mask))
    image = _elastic(rng, image, float(rng.uniform(0.04, 0.07)) * min(w, h))
    gamma = rng.uniform(0.75, 1.35)
    image = image.point([round(255 * (v / 255) ** gamma) for v in range(256)])
    oy, ox = (int(v) for v in rng.integers(0, NOISE_SIDE - 384 // CHEAP_SCALE, size=2))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += _NOISE[oy : oy + h, ox : ox + w] * np.float32(rng.uniform(2.0, 6.0))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(rng.integers(85, 96))
    )
    return buffer.getvalue()


def cheap_name(index: int) -> str:
    return f"cheap-{index:07d}.jpg"


def shard_path(pool: Path, shard: int) -> Path:
    return pool / "cheap-shards" / f"shard-{shard:05d}.parquet"


def _cheap_shard(job: tuple[int, int, str]) -> None:
    """Worker: cheap films SHARD*shard ... as files in the pool, fingerprinted by ingest's own function,
    and their records as one fingerprint-cache shard (ingest's columns and row groups)."""
    seed, shard, pool_dir = job
    pool = Path(pool_dir)
    shas, datas = [], []
    for index in range(shard * SHARD, (shard + 1) * SHARD):
        data = synthesise_cheap(seed, index, _SMALL)
        _write_atomic(pool / cheap_name(index), data)
        shas.append(hashlib.sha256(data).hexdigest())
        datas.append(data)
    out = fingerprint_batch({"sha256": shas, "data": datas}, IngestConfig().limits)
    if any(out["error"]):
        raise RuntimeError(f"cheap shard {shard}: a film could not be fingerprinted")
    table = pa.table({column: out[column] for column in RECORD_COLUMNS})
    buffer = io.BytesIO()
    pq.write_table(
        table, buffer, compression=compression_for(table.column_names), row_group_size=THUMB_ROWS_PER_GROUP
    )
    _write_atomic(shard_path(pool, shard), buffer.getvalue())


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)


def _synthesise_to(job: tuple[int, int, str]) -> None:
    seed, index, path = job
    _write_atomic(Path(path), synthesise(seed, index, _BASES))


_SMALL: list[Image.Image] = []


def _init_worker(source: str) -> None:
    global _BASES, _SMALL
    _BASES = load_bases(Path(source))
    side = BASE_SIDE // CHEAP_SCALE
    _SMALL = [base.resize((side, side), Image.Resampling.BOX) for base in _BASES]


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
    """The films size ``size`` needs, in ``pool`` (cached): cheap shards (films + cache records), the real
    planted originals, the new distinct films and the planted copies; returns the truth {copy: original}."""
    pool.mkdir(parents=True, exist_ok=True)
    shard_path(pool, 0).parent.mkdir(parents=True, exist_ok=True)
    originals = plant(size, args.planted, args.seed)
    jobs = [(args.seed, i, str(pool / film_name(i))) for i in originals if not (pool / film_name(i)).exists()]
    # new distinct films: a stream of indices far above any store film's
    jobs += [
        (args.seed, 10_000_000 + j, str(pool / new_name(j)))
        for j in range(args.new - args.planted)
        if not (pool / new_name(j)).exists()
    ]
    shards = [
        (args.seed, s, str(pool)) for s in range(math.ceil(size / SHARD)) if not shard_path(pool, s).exists()
    ]
    started = time.perf_counter()
    # spawn, not fork: this process may already hold Ray's threads
    context = multiprocessing.get_context("spawn")
    if jobs or shards:
        log(
            f"synthesising {len(jobs)} full-size films and {len(shards)} cheap shards "
            f"with {args.jobs} processes"
        )
        with context.Pool(args.jobs, _init_worker, (str(args.source),)) as workers:
            for _ in workers.imap_unordered(_synthesise_to, jobs, chunksize=16):
                pass
            for done, _ in enumerate(workers.imap_unordered(_cheap_shard, shards), 1):
                if done % 10 == 0:
                    log(f"cheap shards: {done} of {len(shards)} ({time.perf_counter() - started:.0f}s)")
    dq = load_dedupe_quality()
    truth: dict[str, str] = {}
    for j, original in enumerate(originals):
        name = copy_name(size, args.planted, j)
        how_path = pool / f"{name}.how"
        if not (pool / name).exists() or not how_path.exists():
            data, ops = make_planted(dq, pool / film_name(original), args.seed, size, j)
            _write_atomic(pool / name, data)
            how_path.write_text(ops)
        truth[name] = film_name(original)
        args.copy_ops[name] = how_path.read_text()
    log(f"films for size {size} ready in {time.perf_counter() - started:.1f}s")
    return truth


def store_names(size: int, originals: Sequence[int]) -> list[str]:
    """The stored films of size ``size``: the real planted originals, cheap films for the rest."""
    real = set(originals)
    return [film_name(i) if i in real else cheap_name(i) for i in range(size)]


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


def _hwm_bytes(pid: int) -> int:
    """The process's peak resident set size since start or the last reset (``VmHWM``), bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_hwm(pid: int) -> None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as stream:
        stream.write("5")


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as stream:
            return stream.read().strip()
    except OSError:
        return "?"


class MemorySampler:
    """While active: the peak summed PSS of this process and its descendants, and every process's peak
    RSS (VmHWM, reset for all of them on entry), sampled in a thread every ``interval`` s and at the end."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self.hwm: dict[int, tuple[int, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        pids = _descendants(os.getpid())
        self.peak = max(self.peak, sum(_pss_bytes(pid) for pid in pids))
        for pid in pids:
            hwm = _hwm_bytes(pid)
            if hwm > self.hwm.get(pid, (0, ""))[0]:
                self.hwm[pid] = (hwm, _name(pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[MemorySampler]:
        self.peak, self.hwm = 0, {}
        for pid in _descendants(os.getpid()):
            _reset_hwm(pid)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self._sample()

    def driver_peak(self) -> int:
        return self.hwm.get(os.getpid(), (0, ""))[0]

    def other_peak(self) -> tuple[int, str]:
        """The largest peak RSS of any other process (bytes, its name), (0, "-") when none."""
        others = [value for pid, value in self.hwm.items() if pid != os.getpid()]
        return max(others, default=(0, "-"))


def timed_ingest(root: Path, store: Path, sampler: MemorySampler, config: IngestConfig) -> dict[str, Any]:
    with sampler.measuring():
        started = time.perf_counter()
        report = ingest(FolderSource(root), Storage.open(str(store)), config)
        seconds = time.perf_counter() - started
    dedupe = report.get("dedupe") if isinstance(report.get("dedupe"), dict) else {}
    other, other_name = sampler.other_peak()
    return {
        "seconds": seconds,
        "stages": report.get("stage_seconds", {}),
        "dedupe": dedupe,
        "version": report.get("dataset_version"),
        "hashed": report.get("images_hashed"),
        "usable": report.get("usable"),
        "duplicates": report.get("duplicates", []),
        "peak_pss": sampler.peak,
        "driver_rss": sampler.driver_peak(),
        "other_rss": other,
        "other_name": other_name,
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


def fmt(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def mib(value: int | None) -> str:
    return "-" if not value else f"{value / 2**20:,.0f}"


# -- the run --------------------------------------------------------------------------------------------
def build_store(
    args: argparse.Namespace, size: int, names: Sequence[str], work: Path, sampler: MemorySampler
) -> tuple[Path, dict[str, Any]]:
    """The store of ``size`` films (the shortcut of the module docstring): cheap shards linked into its
    fingerprint cache, then an ingest of the films with candidate search off."""
    pool, store = work / "pool", work / f"store-{size}"
    shutil.rmtree(store, ignore_errors=True)
    cache = store / "cache" / "fingerprints"
    cache.mkdir(parents=True)
    for s in range(math.ceil(size / SHARD)):
        os.link(shard_path(pool, s), cache / f"00000000T000000000000Z-cheap-{s:05d}.parquet")
    log(f"size {size}: store-building ingest (candidate search off) of {len(names)} films")
    build = timed_ingest(
        write_source(work / f"src-{size}", pool, names, args.seed), store, sampler, NO_SEARCH
    )
    return store, build


def run_size(
    args: argparse.Namespace, size: int, truth: dict[str, str], work: Path, sampler: MemorySampler
) -> dict[str, Any]:
    pool = work / "pool"
    names = store_names(size, plant(size, args.planted, args.seed))
    store, build = build_store(args, size, names, work, sampler)
    inc_store = work / f"store-{size}-inc"
    shutil.rmtree(inc_store, ignore_errors=True)
    copy_store(store, inc_store)
    shutil.rmtree(store, ignore_errors=True)
    new_names = [new_name(j) for j in range(args.new - args.planted)] + sorted(truth)
    root = write_source(work / f"src-{size}-inc", pool, names + new_names, args.seed)
    log(f"size {size}: incremental ingest of {len(new_names)} films ({len(truth)} planted copies)")
    inc = timed_ingest(root, inc_store, sampler, IngestConfig())
    scored = score_duplicates(inc["duplicates"], truth, set(new_names))
    by_sha = fingerprints_by_sha(inc_store)
    sha_of = {name: hashlib.sha256((pool / name).read_bytes()).hexdigest() for name in names + new_names}
    known = {n: by_sha[sha_of[n]] for n in names if sha_of[n] in by_sha}
    new = {n: by_sha[sha_of[n]] for n in new_names if sha_of[n] in by_sha}
    base = baseline(known, new, truth)
    shutil.rmtree(inc_store, ignore_errors=True)
    for folder in (work / f"src-{size}", root):
        shutil.rmtree(folder, ignore_errors=True)
    return {"size": size, "build": build, "inc": inc, "scored": scored, "baseline": base}


def print_tables(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"store: cheap synthetic films written into the fingerprint cache + the real originals of the "
        f"planted copies (see the docstring); seed {args.seed}; each incremental run adds {args.new} films "
        f"({args.planted} planted near-duplicates of stored films) through the real ingest"
    )
    print()
    print(f"Incremental ingest of {args.new} new films into the store (measured):")
    print(
        "| films in store | ingest s | read / fingerprint / dedupe / publish s | candidate pairs "
        "| candidates per new film | index build s | index query s | verify s | recall | precision "
        "| false pairs | driver peak RSS MiB | largest other peak RSS MiB | peak summed PSS MiB |"
    )
    print(
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
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
            f"{s['false']} | {mib(i['driver_rss'])} | {mib(i['other_rss'])} ({i['other_name']}) | "
            f"{mib(i['peak_pss'])} |"
        )
    print()
    print(
        "Store-building ingest (the shortcut: cached fingerprints, candidate search off; not an ingest's "
        "cost):"
    )
    print(
        "| films in store | build s | read / fingerprint / dedupe / publish s | driver peak RSS MiB "
        "| largest other peak RSS MiB | peak summed PSS MiB |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for r in results:
        b = r["build"]
        st = b["stages"]
        stages = " / ".join(fmt(st.get(k)) for k in ("read", "fingerprint", "dedupe", "publish"))
        print(
            f"| {r['size']:,} | {b['seconds']:.1f} | {stages} | {mib(b['driver_rss'])} | "
            f"{mib(b['other_rss'])} ({b['other_name']}) | {mib(b['peak_pss'])} |"
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
    print()
    print(
        f"Growth exponents (least-squares slope of log value vs log films in store, over "
        f"{', '.join(f'{s:,}' for s in sizes)}):"
    )
    series = {
        "incremental ingest s": [r["inc"]["seconds"] for r in results],
        "incremental dedupe stage s": [r["inc"]["stages"].get("dedupe") for r in results],
        "verify s": [r["inc"]["dedupe"].get("verify_seconds") for r in results],
        "index query s": [r["inc"]["dedupe"].get("query_seconds") for r in results],
        "driver peak RSS": [r["inc"]["driver_rss"] for r in results],
        "largest other peak RSS": [r["inc"]["other_rss"] for r in results],
    }
    for name, values in series.items():
        print(f"- {name}: {fmt(slope(sizes, values), 2)}")
    per_1k = 1000 / args.new
    for r in results:
        if r["size"] != TARGET_SIZE:
            continue
        i = r["inc"]
        peak = max(i["driver_rss"], i["other_rss"])
        print()
        print(
            f"target: 1k new films into a 100k store in < 300 s: measured {i['seconds'] * per_1k:.0f} s "
            f"({'met' if i['seconds'] * per_1k < 300 else 'NOT met'}); peak RSS of the driver and of any "
            f"worker < 4 GB: {peak / 2**30:.2f} GiB ({'met' if peak < 4 * 10**9 else 'NOT met'})"
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
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated store sizes (films)")
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
    parser.add_argument("--object-store-mb", type=int, default=2000)
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
    if any(size < args.planted for size in args.sizes):
        parser.error("every size must hold at least --planted films")

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
        for size in args.sizes:
            truth = prepare_films(args, pool, size)
            results.append(run_size(args, size, truth, work, sampler))
            r = results[-1]
            log(
                f"size {size}: build {r['build']['seconds']:.0f}s, incremental {r['inc']['seconds']:.0f}s, "
                f"recall {r['scored']['recall']:.3f}, precision {fmt(r['scored']['precision'], 3)}, "
                f"driver peak RSS {mib(r['inc']['driver_rss'])} MiB, other {mib(r['inc']['other_rss'])} MiB"
            )
        print_tables(args, results)


if __name__ == "__main__":
    main()
