"""Tests for lxn_ray.dedupe on synthetic chest-X-ray-like images made here (no data needed).

Each "radiograph" is a parametric image (body outline, lungs, mediastinum, rib stripes, smooth texture)
drawn from its own seeded RNG, so a different seed is a different patient and the same seed with a
rotated/shifted anatomy plus a new opacity is a serial film of the same patient (a hard negative).
The detector on real films is checked where ingest has already fingerprinted the ieee8023 snapshots:
tests/data/test_bundle.py.
"""

from __future__ import annotations

import io
import math
import pickle
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from lxn_ray.dedupe.config import DedupeConfig
from lxn_ray.dedupe.fingerprint import FINGERPRINT_COLUMNS, fingerprint, hamming
from lxn_ray.dedupe.index import CandidateIndex, SearchConfig
from lxn_ray.dedupe.search import DuplicatePair, find_duplicates
from lxn_ray.dedupe.verify import VerifyChunk, verify_chunk, verify_pair

SIZE = (240, 280)  # width, height


def radiograph(
    seed: int,
    angle_deg: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    opacity: tuple[float, float, float] | None = None,
) -> Image.Image:
    """A chest-X-ray-like 8-bit image; anatomy parameters come from ``seed``.

    ``angle_deg``/``shift`` move the anatomy (patient positioning); ``opacity`` = (x, y, radius) adds a
    consolidation in normalized coordinates.
    """
    rng = np.random.default_rng(seed)
    w, h = SIZE
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    x = (xs / w) * 2 - 1
    y = (ys / h) * 2 - 1
    t = math.radians(angle_deg)
    x, y = (math.cos(t) * x - math.sin(t) * y - shift[0], math.sin(t) * x + math.cos(t) * y - shift[1])

    body_w, body_h = rng.uniform(0.75, 0.95), rng.uniform(0.95, 1.3)
    img = np.where((x / body_w) ** 2 + ((y - 0.2) / body_h) ** 2 < 1, 0.55, 0.08)
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        cx, cy = side * rng.uniform(0.33, 0.45), rng.uniform(-0.2, 0.0)
        rx, ry = rng.uniform(0.22, 0.3), rng.uniform(0.45, 0.6)
        lungs = np.maximum(lungs, ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1)
    img -= 0.3 * lungs
    ribs = 0.5 + 0.5 * np.cos(
        rng.uniform(30, 38) * (y - rng.uniform(0.15, 0.3) * np.abs(x)) + rng.uniform(0, 6.28)
    )
    img += 0.15 * ribs * lungs
    img += np.where(np.abs(x - rng.uniform(-0.05, 0.05)) < rng.uniform(0.1, 0.16), 0.25, 0.0) * (y > -0.7)
    heart = ((x - rng.uniform(0.05, 0.15)) / rng.uniform(0.25, 0.32)) ** 2 + ((y - 0.3) / 0.25) ** 2 < 1
    img += 0.15 * heart
    texture = np.zeros_like(img)
    for _ in range(60):  # random field (vessels, soft tissue), a function of the anatomy coordinates
        f = rng.normal(0, 20, size=2)
        texture += rng.normal(0, 1) * np.cos(f[0] * x + f[1] * y + rng.uniform(0, 6.28))
    img += 0.05 * texture / np.sqrt(60)
    if opacity is not None:
        ox, oy, r = opacity
        img += 0.25 * np.exp(-((x - ox) ** 2 + (y - oy) ** 2) / (2 * r**2))
    img = np.clip(img, 0, 1) ** 0.8
    return Image.fromarray((img * 255).round().astype(np.uint8), mode="L")


def _reencode(img: Image.Image, fmt: str = "JPEG", quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    buf.seek(0)
    return Image.open(buf).convert("L")


def _annotate(img: Image.Image) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), "R", fill=255, font=ImageFont.load_default(size=22))
    draw.text((img.width - 40, img.height - 30), "AP", fill=255, font=ImageFont.load_default(size=16))
    draw.line([(140, 150), (175, 120)], fill=255, width=2)
    draw.line([(140, 150), (150, 136)], fill=255, width=2)
    return img


def _gamma(img: Image.Image, g: float) -> Image.Image:
    return img.point([min(255, round(255 * (i / 255) ** g)) for i in range(256)])


TRANSFORMS = {
    "jpeg_q30": lambda im: _reencode(im, "JPEG", 30),
    "png": lambda im: _reencode(im, "PNG"),
    "resize_0.4": lambda im: _reencode(im.resize((96, 112), Image.Resampling.LANCZOS), "JPEG", 85),
    "upscale_1.7": lambda im: im.resize((408, 476), Image.Resampling.BICUBIC),
    "crop_asym": lambda im: im.crop((12, 3, im.width - 2, im.height - 14)),
    "pad_black": lambda im: ImageOps.expand(im, (20, 10, 5, 25), fill=0),
    "pad_white": lambda im: _reencode(ImageOps.expand(im, 18, fill=255), "JPEG", 60),
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "darker_contrast": lambda im: ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(0.75)).enhance(
        1.3
    ),
    "gamma": lambda im: _gamma(im, 0.65),
    "annotated": _annotate,
    "combo": lambda im: _reencode(
        _annotate(
            _gamma(ImageOps.expand(im.crop((6, 8, im.width - 9, im.height - 4)), 12, fill=0), 1.3)
        ).resize((150, 178), Image.Resampling.LANCZOS),
        "JPEG",
        45,
    ),
}


@pytest.fixture(scope="module")
def originals() -> dict[str, Image.Image]:
    return {f"patient{s}": radiograph(s) for s in range(6)}


@pytest.fixture(scope="module")
def fps(originals: dict[str, Image.Image]) -> dict[str, dict[str, object]]:
    return {k: fingerprint(v) for k, v in originals.items()}


def test_fingerprint_shape_types_and_determinism(originals: dict[str, Image.Image]) -> None:
    fp = fingerprint(originals["patient0"])
    assert tuple(fp) == FINGERPRINT_COLUMNS
    assert all(isinstance(v, (str, int, float, bytes)) for v in fp.values())
    assert len(fp["phash"]) == 16 and int(fp["phash"], 16) >= 0
    assert len(fp["thumb"]) == fp["thumb_size"] ** 2 <= 16384
    assert fingerprint(originals["patient0"]) == fp
    # non-"L" input is converted, not rejected
    assert fingerprint(originals["patient0"].convert("RGB"))["thumb"] == fp["thumb"]


def test_large_film_is_reduced_before_fingerprinting(originals: dict[str, Image.Image], fps) -> None:
    """A film above ``max_side`` is fingerprinted from its integer-reduced copy (so a 20 MP film costs what
    a 1 MP one does), still matches its small original, and reports its size and box in input pixels."""
    film = originals["patient0"]
    big = film.resize((film.width * 5, film.height * 5), Image.Resampling.BICUBIC)
    config = DedupeConfig(max_side=512)
    factor = -(-max(big.size) // 512)
    fp = fingerprint(big, config)
    assert fp == dict(
        fingerprint(big.reduce(factor), config), width=big.width, height=big.height, trim_box=fp["trim_box"]
    )
    left, top, right, bottom = (int(v) for v in str(fp["trim_box"]).split(","))
    assert 0 <= left < right <= big.width and 0 <= top < bottom <= big.height
    assert right - left > big.width // 2 and bottom - top > big.height // 2  # in input pixels
    assert verify_pair(fps["patient0"], fp) <= config.max_residual


def test_border_is_trimmed_before_thumbnail(originals: dict[str, Image.Image]) -> None:
    img = originals["patient1"]
    padded = ImageOps.expand(img, (30, 0, 10, 20), fill=255)
    assert fingerprint(padded)["trim_box"] == f"30,0,{30 + img.width},{img.height}"


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transformed_copy_is_found(name: str, originals: dict[str, Image.Image], fps) -> None:
    copy = fingerprint(TRANSFORMS[name](originals["patient2"]))
    pairs = find_duplicates({}, {**fps, "copy": copy})
    assert [(p.a, p.b) for p in pairs] == [("copy", "patient2")]
    assert 0.0 <= pairs[0].score <= DedupeConfig().max_residual
    assert pairs[0].distance == hamming(int(copy["phash"], 16), int(fps["patient2"]["phash"], 16))


def test_distinct_radiographs_are_not_paired(fps) -> None:
    assert find_duplicates({}, fps) == []


@pytest.mark.parametrize(
    "angle, shift, opacity",
    [
        (3.0, (0.02, 0.01), None),  # repositioned (rotation is not a crop/resize/pad)
        (-2.5, (0.0, 0.03), (-0.4, 0.1, 0.1)),  # repositioned + new consolidation
        (2.0, (-0.03, 0.0), (0.35, -0.1, 0.15)),
    ],
)
def test_serial_film_is_not_a_duplicate(angle, shift, opacity, fps) -> None:
    serial = fingerprint(radiograph(3, angle_deg=angle, shift=shift, opacity=opacity))
    # sanity: it is a hash candidate (the hard case), yet verification must reject it
    assert hamming(int(serial["phash_trim"], 16), int(fps["patient3"]["phash_trim"], 16)) <= 16
    assert find_duplicates({}, {"patient3": fps["patient3"], "serial": serial}) == []


def _on_black(img: Image.Image) -> Image.Image:
    """The film on a wider black canvas with two markers (so the black is not trimmed as a border), like a
    lateral view whose right third is empty background."""
    canvas = Image.new("L", (int(img.width * 1.35), img.height), 0)
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width - 60, 5), "LAT", fill=220, font=ImageFont.load_default(size=18))
    draw.text((canvas.width - 60, canvas.height - 25), "1", fill=220, font=ImageFont.load_default(size=18))
    return canvas


@pytest.mark.parametrize(
    "angle, shift, opacity", [(3.0, (0.02, 0.01), None), (-2.5, (0.0, 0.03), (-0.4, 0.1, 0.1))]
)
def test_serial_film_on_flat_background_is_not_a_duplicate(angle, shift, opacity) -> None:
    first = fingerprint(_on_black(radiograph(3)))
    serial = fingerprint(_on_black(radiograph(3, angle_deg=angle, shift=shift, opacity=opacity)))
    config = DedupeConfig()
    # the shared black background matches trivially; counted, it would pull the score down
    assert verify_pair(first, serial, replace(config, flat_mass=1.0)) < verify_pair(first, serial, config)
    assert find_duplicates({}, {"first": first, "serial": serial}, config) == []
    copy = fingerprint(_reencode(_on_black(radiograph(3)), "JPEG", 40))
    assert [(p.a, p.b) for p in find_duplicates({}, {"first": first, "copy": copy})] == [("copy", "first")]


def test_known_vs_new(originals: dict[str, Image.Image], fps) -> None:
    known = {
        "k0": fps["patient0"],
        "k0_dup": fingerprint(TRANSFORMS["jpeg_q30"](originals["patient0"])),  # known-vs-known: not reported
        "k1": fps["patient1"],
    }
    new = {
        "n0": fingerprint(TRANSFORMS["crop_asym"](originals["patient0"])),
        "n1": fingerprint(TRANSFORMS["pad_black"](originals["patient1"])),
        "n1_again": fingerprint(TRANSFORMS["brighter"](originals["patient1"])),
        "n4": fps["patient4"],
    }
    got = {(p.a, p.b) for p in find_duplicates(known, new)}
    assert got == {("k0", "n0"), ("k0_dup", "n0"), ("k1", "n1"), ("k1", "n1_again"), ("n1", "n1_again")}
    assert find_duplicates(known, {}) == []


def test_parquet_round_trip_gives_same_pairs(originals: dict[str, Image.Image], fps) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    items = {**fps, "copy": fingerprint(TRANSFORMS["combo"](originals["patient5"]))}
    table = pa.Table.from_pylist([{"key": k, **v} for k, v in items.items()])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    back = {row.pop("key"): row for row in pq.read_table(buf).to_pylist()}
    assert find_duplicates({}, back) == find_duplicates({}, items)
    assert [(p.a, p.b) for p in find_duplicates({}, back)] == [("copy", "patient5")]


def test_output_is_sorted_and_deterministic(originals: dict[str, Image.Image], fps) -> None:
    items = dict(fps)
    for name in ("png", "gamma", "pad_white"):
        items[f"{name}_copy"] = fingerprint(TRANSFORMS[name](originals["patient1"]))
    first = find_duplicates({}, items)
    shuffled = list(items.items())
    random.Random(1).shuffle(shuffled)
    assert find_duplicates({}, dict(shuffled)) == first
    assert first == sorted(first, key=lambda p: (p.a, p.b))
    assert all(isinstance(p, DuplicatePair) and p.a < p.b for p in first)
    assert len(first) == 6  # 4 images of patient1, all pairs


def test_map_chunks_gives_identical_output(originals: dict[str, Image.Image], fps) -> None:
    items = dict(fps)
    for name in ("crop_asym", "gamma", "combo"):
        items[f"{name}_copy"] = fingerprint(TRANSFORMS[name](originals["patient4"]))
    expected = find_duplicates({}, items)
    assert len(expected) == 6  # 4 images of patient4
    seen_chunks: list[int] = []

    def reversed_mapper(fn, chunks):
        seen_chunks.extend(len(c.pairs) for c in chunks)
        return [fn(c) for c in reversed(chunks)][::-1]

    def thread_mapper(fn, chunks):
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(fn, chunks))

    assert find_duplicates({}, items, map_chunks=reversed_mapper, chunk_size=5) == expected
    assert len(seen_chunks) > 1 and max(seen_chunks) <= 5
    assert find_duplicates({}, items, map_chunks=thread_mapper, chunk_size=3) == expected
    known = {k: v for k, v in items.items() if not k.endswith("_copy")}
    new = {k: v for k, v in items.items() if k.endswith("_copy")}
    assert find_duplicates(known, new, map_chunks=thread_mapper) == find_duplicates(known, new)


def test_verify_chunk_is_picklable_and_matches_verify_pair(originals, fps) -> None:
    worker = pickle.loads(pickle.dumps(verify_chunk))  # by reference: what Ray/process pools need
    copy = fingerprint(TRANSFORMS["crop_asym"](originals["patient0"]))
    keys = ["patient0", "patient1", "copy"]
    thumbs = np.stack(
        [
            np.frombuffer(f["thumb"], np.uint8).reshape(128, 128)
            for f in (fps["patient0"], fps["patient1"], copy)
        ]
    )
    chunk = VerifyChunk(
        thumbs, np.array([(0, 1), (0, 2), (2, 0), (0, 2)]), np.array([0, 0, 0, 1], bool), DedupeConfig()
    )
    scores = worker(pickle.loads(pickle.dumps(chunk)))
    by_key = {"patient0": fps["patient0"], "patient1": fps["patient1"], "copy": copy}
    mirror = dict(copy, thumb=np.ascontiguousarray(thumbs[2][:, ::-1]).tobytes())
    # stage 0 runs vectorised over the chunk: a rejected pair's score may differ in the last float bits
    assert scores == pytest.approx(
        [
            verify_pair(by_key[keys[0]], by_key[keys[1]]),
            verify_pair(by_key[keys[0]], by_key[keys[2]]),
            verify_pair(by_key[keys[2]], by_key[keys[0]]),
            verify_pair(by_key[keys[0]], mirror),
        ],
        rel=1e-5,
    )
    assert scores[1] <= DedupeConfig().max_residual < scores[0]


def test_stage0_correlation_matches_the_direct_one() -> None:
    """The matrix form of the coarse-grid profile correlation (stages 0 and 1) equals resampling each pair's
    profile per hypothesis and correlating (the form stage 1's refinement uses), to float32 rounding."""
    from lxn_ray.dedupe.profiles import coarse_corr, coarse_hypotheses, profile_corr

    config = DedupeConfig()
    rng = np.random.default_rng(0)
    pa = np.cumsum(rng.normal(size=(40, 64)), axis=1).astype(np.float32)
    pb = pa[rng.permutation(40)] + rng.normal(scale=0.3, size=(40, 64)).astype(np.float32)
    pb[:10] = pa[:10, ::-1]  # some pairs correlate well, some do not
    scales, offsets = (np.tile(h, (40, 1)) for h in coarse_hypotheses(64, config))
    direct = profile_corr(pa, pb, scales, offsets, config.min_overlap)
    assert (direct > 0.9).any() and (direct < 0.5).any()
    assert coarse_corr(pa, pb, config) == pytest.approx(direct, abs=1e-4)


def test_candidates_per_new_image_are_bounded_and_the_nearest(originals, fps) -> None:
    """The index proposes each new image's k nearest (never itself), however large the collection; the
    hash channel's neighbours are exactly the brute-force Hamming nearest."""
    rng = random.Random(0)
    known = {
        f"k{i:03d}": dict(fps[f"patient{i % 6}"], phash_trim=f"{rng.getrandbits(64):016x}")
        for i in range(120)
    }
    new = {"n0": fps["patient0"], "n1": fps["patient1"]}
    index = CandidateIndex.from_fingerprints({**known, **new})
    config = SearchConfig()
    candidates = index.candidates(sorted(new), config=config)
    per_new = {k: sum(k in (c.a, c.b) for c in candidates) for k in new}
    bound = (
        config.phash_trim_k
        + config.phash_k
        + config.lowres_k
        + config.mirror_k
        + 14 * config.orient_k  # the other orientations (lxn_ray.dedupe.orientation), one search each
        + config.crop_of_k
        + config.window_k
    )
    assert all(0 < n <= bound for n in per_new.values())
    assert all(c.a != c.b and c.a < c.b for c in candidates)
    hashes = {k: int(str(v["phash_trim"]), 16) for k, v in {**known, **new}.items()}
    for key in new:
        by_distance = sorted((hamming(hashes[key], h), k) for k, h in hashes.items() if k != key)
        cutoff = by_distance[config.phash_trim_k - 1][0]
        partners = {c.b if c.a == key else c.a for c in candidates if key in (c.a, c.b)}
        assert {k for d, k in by_distance if d < cutoff} <= partners
    only_known = index.candidates(sorted(new), searchable=sorted(known), config=config)
    assert not any({c.a, c.b} == {"n0", "n1"} for c in only_known)
    # the same search over a collection ten times larger proposes as many pairs per new image
    more = {
        f"m{i:04d}": dict(fps[f"patient{i % 6}"], phash_trim=f"{rng.getrandbits(64):016x}")
        for i in range(1200)
    }
    larger = CandidateIndex.from_fingerprints({**known, **more, **new}).candidates(sorted(new))
    assert len(larger) <= bound * len(new)


def test_republication_errors_are_found(originals, fps) -> None:
    """A mirrored figure, an eighth cut from every side, an off-centre crop and the film at 60% inside a
    white figure panel with a caption and a scale bar are each found, and serial films are not."""
    film = originals["patient2"]
    w, h = film.size
    panel = Image.new("L", (w * 5 // 3, h * 3 // 2), 255)
    panel.paste(film, (w // 3, h // 12))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=14)
    draw.text((10, h + h // 12 + 12), "Figure 3. Chest radiograph on day 2", fill=0, font=font)
    draw.rectangle((w // 3 + w + 10, h // 2, w // 3 + w + 50, h // 2 + 5), fill=0)
    draw.text((w // 3 + w + 10, h // 2 + 10), "5 cm", fill=0, font=font)
    copies = {
        "mirror": _reencode(ImageOps.mirror(film), "JPEG", 80),
        "crop_eighth": _reencode(film.crop((w // 8, h // 8, w - w // 8, h - h // 8)), "JPEG", 80),
        "crop_off_centre": _reencode(film.crop((w // 5, h // 8, w, h)), "JPEG", 80),
        "panel": _reencode(panel, "JPEG", 85),  # the film is 60% of the panel's width
        "serial": radiograph(2, angle_deg=3.0, shift=(0.03, -0.02), opacity=(0.3, 0.1, 0.15)),
    }
    new = {name: fingerprint(img) for name, img in copies.items()}
    found = {(p.a, p.b): p for p in find_duplicates(fps, new, within_new=False)}
    for name in ("mirror", "crop_eighth", "crop_off_centre", "panel"):
        assert (name, "patient2") in found, name
    assert found[("mirror", "patient2")].mirrored
    assert not any("serial" in pair for pair in found)
    assert all("patient2" in pair for pair in found)
