"""Near-duplicate detection quality on a synthetic evaluation set built from real chest X-rays.

Usage::

    python benchmarks/dedupe_quality.py [--source DIR] [--seed 0] [--n 300] [--kinds 100] [--dump /tmp/dd-fp]

``DIR`` is a checkout of the ieee8023 covid-chestxray-dataset (``metadata.csv`` + ``images/``; by default
the 2020-06-22 snapshot of the shared data's bundle, cloned into a temp dir), or any folder of images (then
every file is its own patient and there are no hard negatives).

It picks ``n`` X-ray originals (whole patients at a time, so same-patient serial films - the hard
negatives - are plentiful), makes one or two transformed copies of each with random combinations of the
transformations a re-publication does (resize, JPEG recompression, PNG<->JPEG, bit-depth window, crop,
border, brightness/contrast/gamma, drawn arrows/text), and measures on pairs:

* ``find_duplicates(known={}, new=pool)`` (batch mode) and ``find_duplicates(known=originals,
  new=copies)`` (incremental mode): recall, precision, same-patient false positives, per-transformation
  recall;
* the plain whole-image phash threshold baseline at 6/8/10/12.

Distinct files of the dataset that are in fact the same radiograph published twice are listed in
``KNOWN_REAL_DUPLICATES`` and count as positives.
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import BUNDLE, checkout  # noqa: E402 (benchmarks/common.py)

from lxn_ray.dedupe.config import DedupeConfig  # noqa: E402
from lxn_ray.dedupe.fingerprint import fingerprint, hamming  # noqa: E402
from lxn_ray.dedupe.search import candidate_pairs, find_duplicates  # noqa: E402

# Same radiograph published twice in the ieee8023 dataset (snapshot 2020-06-22), confirmed by eye
# (side-by-side images).  Treated as positives, not as false positives.
KNOWN_REAL_DUPLICATES: tuple[tuple[str, str], ...] = (
    ("353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpeg", "case_72_RX-TORACE1.jpg"),
    ("16660_2_1.jpg", "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-admission.jpg"),
    ("16660_3_1.jpg", "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-1.jpg"),
    ("16660_4_1.jpg", "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-2.jpg"),
    ("16660_5_1.jpg", "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-3.jpg"),
    # same film (same arrows, same markers) under the ids of two different case reports
    ("2-chest-filmc.jpg", "7-fatal-covid19.jpg"),
    # same patient id, same film saved twice (one with a "day 1" caption / different window)
    ("35AF5C3B-D04D-4B4B-92B7-CB1F67D83085.jpeg", "D5ACAA93-C779-4E22-ADFA-6A220489F840.jpeg"),
    ("E63574A7-4188-4C8D-8D17-9D67A18A1AFA.jpeg", "F4341CE7-73C9-45C6-99C8-8567A5484B63.jpeg"),
    ("3d4364c0e44859e86017ee1660112e_jumbo-1.jpeg", "81ba2932af55c7663e9d87016776a6_jumbo-1.jpeg"),
    ("A7E260CE-8A00-4C5F-A7F5-27336527A981.jpeg", "case_76_1-3.png"),
    ("AR-1.jpg", "AR-2.jpg"),
    ("AR-1.jpg", "extubation-1.jpg"),
    # same film ("AP ERECT MOBILE", same window caption) under two patient ids; the first is cropped at
    # the sides with a dark band added at the bottom
    ("pneumonia-7.jpg", "streptococcus-pneumoniae-pneumonia-temporal-evolution-1-day1.jpg"),
)

TRANSFORMS = ("resize", "crop", "border", "brightness", "contrast", "gamma", "annotate", "bitdepth")

#: Republication errors the random copies above never make, each tested on its own (``make_kind_copy``):
#: a left-right mirror (a common figure error), an eighth cut from every side, an off-centre crop (a fifth
#: from the left, an eighth from the top), and the film at 60% inside a white figure panel with a caption
#: and a scale bar.
KINDS = ("mirror", "crop-eighth", "crop-off-centre", "panel")


# ----------------------------------------------------------------------------------------------------------
# Source images
# ----------------------------------------------------------------------------------------------------------


def load_sources(source: Path) -> list[tuple[str, str]]:
    """(filename, patient id) of the X-ray images in ``source``, sorted by filename."""
    meta = source / "metadata.csv"
    images = source / "images" if (source / "images").is_dir() else source
    present = {p.name for p in images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}}
    if not meta.exists():
        return sorted((name, name) for name in present)
    import pandas as pd

    df = pd.read_csv(meta)
    df = df[(df["modality"] == "X-ray") & df["filename"].isin(present)]
    rows = df.drop_duplicates("filename")[["filename", "patientid"]]
    return sorted((str(f), str(p)) for f, p in rows.itertuples(index=False))


def open_gray(path: Path) -> Image.Image:
    """Decode as the pipeline does: EXIF orientation applied, 8-bit grayscale."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("L")


def pick_originals(sources: list[tuple[str, str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """About ``n`` images, whole patients at a time (multi-image patients first: hard negatives)."""
    by_patient: dict[str, list[str]] = defaultdict(list)
    for name, pid in sources:
        by_patient[pid].append(name)
    multi = sorted(p for p, names in by_patient.items() if len(names) > 1)
    single = sorted(p for p, names in by_patient.items() if len(names) == 1)
    rng.shuffle(multi)
    rng.shuffle(single)
    chosen: list[tuple[str, str]] = []
    # roughly half of the images from multi-image patients, the rest singletons
    for pid in multi:
        if len(chosen) >= n // 2:
            break
        chosen.extend((name, pid) for name in sorted(by_patient[pid]))
    for pid in single:
        if len(chosen) >= n:
            break
        chosen.extend((name, pid) for name in by_patient[pid])
    return chosen[:n]


# ----------------------------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------------------------


def _annotate(img: Image.Image, rng: random.Random) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("text", "arrow", "line"))
        if kind == "text":
            size = max(8, int(min(w, h) * rng.uniform(0.04, 0.09)))
            font = ImageFont.load_default(size=size)
            xy = (rng.uniform(0.02, 0.85) * w, rng.uniform(0.02, 0.85) * h)
            draw.text(xy, rng.choice(("R", "L", "AP", "PA", "SUPINE", "1")), fill=255, font=font)
        else:
            x0, y0 = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
            ang = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.06, 0.15) * min(w, h)
            x1, y1 = x0 + length * np.cos(ang), y0 + length * np.sin(ang)
            width = max(1, int(min(w, h) * 0.006))
            draw.line([(x0, y0), (x1, y1)], fill=255, width=width)
            if kind == "arrow":
                for da in (2.6, -2.6):
                    hx = x1 + 0.35 * length * np.cos(ang + da)
                    hy = y1 + 0.35 * length * np.sin(ang + da)
                    draw.line([(x1, y1), (hx, hy)], fill=255, width=width)
    return img


def _apply(img: Image.Image, op: str, rng: random.Random) -> Image.Image:
    w, h = img.size
    if op == "resize":
        s = rng.uniform(0.25, 1.0)
        return img.resize((max(16, round(w * s)), max(16, round(h * s))), Image.Resampling.LANCZOS)
    if op == "crop":
        fr = [rng.uniform(0.0, 0.06) for _ in range(4)]
        return img.crop((round(fr[0] * w), round(fr[1] * h), w - round(fr[2] * w), h - round(fr[3] * h)))
    if op == "border":
        fr = [rng.uniform(0.0, 0.10) for _ in range(4)]
        fill = rng.choice((0, 255))
        return ImageOps.expand(
            img, (round(fr[0] * w), round(fr[1] * h), round(fr[2] * w), round(fr[3] * h)), fill
        )
    if op == "brightness":
        return ImageEnhance.Brightness(img).enhance(
            rng.choice((rng.uniform(0.65, 0.9), rng.uniform(1.1, 1.4)))
        )
    if op == "contrast":
        return ImageEnhance.Contrast(img).enhance(rng.choice((rng.uniform(0.6, 0.9), rng.uniform(1.1, 1.5))))
    if op == "gamma":
        g = rng.choice((rng.uniform(0.55, 0.85), rng.uniform(1.2, 1.8)))
        lut = [min(255, round(255 * (i / 255) ** g)) for i in range(256)]
        return img.point(lut)
    if op == "annotate":
        return _annotate(img, rng)
    if op == "bitdepth":  # 16-bit master with a different display window, then back to 8 bits
        a16 = np.asarray(img).astype(np.float64) * 257.0
        lo = np.percentile(a16, rng.uniform(0, 3))
        hi = np.percentile(a16, rng.uniform(97, 100))
        return Image.fromarray(
            np.clip((a16 - lo) / max(hi - lo, 1.0) * 255.0, 0, 255).round().astype(np.uint8)
        )
    raise ValueError(op)


def make_copy(img: Image.Image, rng: random.Random) -> tuple[Image.Image, list[str]]:
    """One transformed copy: 1-4 random transformations, then a random JPEG quality or PNG."""
    ops = rng.sample(TRANSFORMS, rng.randint(1, 4))
    # geometric first, as publishing does (crop/border of the original, then resize), then intensity
    order = {
        op: i
        for i, op in enumerate(
            ("crop", "border", "resize", "bitdepth", "gamma", "brightness", "contrast", "annotate")
        )
    }
    ops.sort(key=order.__getitem__)
    for op in ops:
        img = _apply(img, op, rng)
    buf = io.BytesIO()
    if rng.random() < 0.75:
        q = rng.randint(30, 95)
        img.save(buf, format="JPEG", quality=q)
        ops.append("jpeg" if q >= 60 else "jpeg<60")
    else:
        img.save(buf, format="PNG")
        ops.append("png")
    buf.seek(0)
    return Image.open(buf).convert("L"), ops


def _panel(img: Image.Image, rng: random.Random) -> Image.Image:
    """The film at 60% of a white figure panel's width, placed off-centre, with a caption line below it
    and a scale bar with its label beside it (as journals print figures)."""
    w, h = img.size
    film = img.resize((round(w * 0.6), round(h * 0.6)), Image.Resampling.LANCZOS)
    panel = Image.new("L", (w, round(h * 0.85)), 255)
    x0 = rng.randint(round(0.04 * w), w - film.width - round(0.04 * w))
    y0 = rng.randint(round(0.02 * h), round(0.06 * h))
    panel.paste(film, (x0, y0))
    draw = ImageDraw.Draw(panel)
    size = max(8, round(0.035 * h))
    font = ImageFont.load_default(size=size)
    caption = rng.choice(("Figure 2. Chest radiograph, day 3", "Fig. 1: AP view on admission (arrows)"))
    draw.text((round(0.04 * w), y0 + film.height + size // 2), caption, fill=0, font=font)
    bar_x = x0 + film.width + round(0.02 * w) if x0 < w / 2 else max(2, x0 - round(0.18 * w))
    bar_y = y0 + film.height - 3 * size
    draw.rectangle((bar_x, bar_y, bar_x + round(0.12 * w), bar_y + max(2, size // 3)), fill=0)
    draw.text((bar_x, bar_y + size // 2), "5 cm", fill=0, font=font)
    return panel


def make_kind_copy(img: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """One copy of ``img`` made by one of :data:`KINDS`, saved as JPEG (quality 60-95) as a figure is."""
    w, h = img.size
    if kind == "mirror":
        out = ImageOps.mirror(img)
    elif kind == "crop-eighth":
        out = img.crop((round(w / 8), round(h / 8), w - round(w / 8), h - round(h / 8)))
    elif kind == "crop-off-centre":
        out = img.crop((round(w / 5), round(h / 8), w, h))
    elif kind == "panel":
        out = _panel(img, rng)
    else:
        raise ValueError(kind)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=rng.randint(60, 95))
    buf.seek(0)
    return Image.open(buf).convert("L")


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def positives(groups: dict[str, str]) -> set[tuple[str, str]]:
    """All pairs of keys sharing a group id."""
    members: dict[str, list[str]] = defaultdict(list)
    for key, g in groups.items():
        members[g].append(key)
    return {pair(a, b) for ks in members.values() for a, b in itertools.combinations(sorted(ks), 2)}


def report(
    name: str, found: set[tuple[str, str]], truth: set[tuple[str, str]], patient: dict[str, str]
) -> None:
    tp = len(found & truth)
    fp = found - truth
    hard = sum(1 for a, b in fp if patient[a] == patient[b])
    rec = tp / max(len(truth), 1)
    prec = tp / max(len(found), 1)
    print(
        f"  {name:<34} recall {rec:.4f} ({tp}/{len(truth)})  precision {prec:.4f}  "
        f"FP {len(fp)} (same-patient {hard})"
    )


def dump_pairs(pairs: list[tuple[str, str]], images: dict[str, Image.Image], out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (a, b) in enumerate(pairs):
        ia, ib = (images[k].copy() for k in (a, b))
        ia.thumbnail((384, 384))
        ib.thumbnail((384, 384))
        canvas = Image.new("L", (ia.width + ib.width + 8, max(ia.height, ib.height)), 128)
        canvas.paste(ia, (0, 0))
        canvas.paste(ib, (ia.width + 8, 0))
        canvas.save(out / f"{tag}_{i:02d}.png")


def kinds_run(
    args: argparse.Namespace,
    originals: list[tuple[str, str]],
    images: dict[str, Image.Image],
    patient: dict[str, str],
    group: dict[str, str],
    config: DedupeConfig,
) -> None:
    """Recall per kind of :data:`KINDS` and precision on a pool of the originals and those copies.

    Its own random stream (seed + 1000), so the classic pool above is the same as before the kinds
    existed; ``args.kinds`` originals each get one copy of every kind.
    """
    rng = random.Random(args.seed + 1000)
    chosen = sorted(rng.sample([name for name, _ in originals], min(args.kinds, len(originals))))
    pool = {name: images[name] for name, _ in originals}
    kind_group = {name: group[name] for name, _ in originals}
    kind_patient = dict(patient)
    for name in chosen:
        for kind in KINDS:
            key = f"{kind}:{name}"
            pool[key] = make_kind_copy(images[name], kind, rng)
            kind_group[key], kind_patient[key] = group[name], patient[name]
    truth = positives(kind_group)
    fps = {k: fingerprint(img) for k, img in pool.items()}
    t0 = time.perf_counter()
    found = {pair(p.a, p.b) for p in find_duplicates({}, fps, config)}
    seconds = time.perf_counter() - t0
    known = {k: v for k, v in fps.items() if ":" not in k}
    copies = {k: v for k, v in fps.items() if ":" in k}
    inc = {pair(p.a, p.b) for p in find_duplicates(known, copies, config)}
    print(f"new kinds: {len(chosen)} originals x {len(KINDS)} kinds, pool of {len(fps)} ({seconds:.1f}s)")
    report("kinds batch (all pairs)", found, truth, kind_patient)
    truth_inc = {p for p in truth if ":" in p[0] or ":" in p[1]}
    report("kinds incremental (copies new)", inc, truth_inc, kind_patient)
    candidates = set(candidate_pairs({}, fps, config))
    for kind in KINDS:
        kind_truth = {pair(f"{kind}:{name}", name) for name in chosen}
        print(
            f"  {kind:<16} recall {len(found & kind_truth) / len(kind_truth):.3f} "
            f"(candidates {len(candidates & kind_truth) / len(kind_truth):.3f})"
        )
    if args.dump:
        misses = sorted(truth - found)
        dump_pairs(misses[:30], pool, args.dump, "kinds_miss")
        dump_pairs(sorted(found - truth)[:30], pool, args.dump, "kinds_fp")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source",
        type=Path,
        default=None,
        help="dataset checkout (default: the bundle's 2020-06-22 snapshot)",
    )
    ap.add_argument("--bundle", type=Path, default=BUNDLE, help="git bundle of ieee8023 (without --source)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=300, help="number of originals")
    ap.add_argument("--dump", type=Path, default=None, help="save side-by-side PNGs of errors here")
    ap.add_argument("--real", action="store_true", help="also run on all X-rays of the source and list pairs")
    ap.add_argument(
        "--kinds", type=int, default=100, help="originals given one copy of each of KINDS (0: skip)"
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lxn-dedupe-quality-") as tmp:
        if args.source is None:
            args.source = checkout(args.bundle, "2020-06-22", Path(tmp) / "ieee8023")
        return run(args)


def run(args: argparse.Namespace) -> int:
    config = DedupeConfig()
    rng = random.Random(args.seed)
    image_dir = args.source / "images" if (args.source / "images").is_dir() else args.source

    t0 = time.perf_counter()
    sources = load_sources(args.source)
    originals = pick_originals(sources, args.n, rng)
    patient: dict[str, str] = {}
    group: dict[str, str] = {}
    images: dict[str, Image.Image] = {}
    copy_ops: dict[str, list[str]] = {}
    for name, pid in originals:
        img = open_gray(image_dir / name)
        images[name], patient[name], group[name] = img, pid, name
        for c in range(1 if rng.random() < 0.5 else 2):
            key = f"copy{c}:{name}"
            images[key], copy_ops[key] = make_copy(img, rng)
            patient[key], group[key] = pid, name
    # merge groups of real duplicates present in the pool
    for x, y in KNOWN_REAL_DUPLICATES:
        if x in group and y in group:
            gx, gy = group[x], group[y]
            for k, g in group.items():
                if g == gy:
                    group[k] = gx
    truth = positives(group)
    n_hard = sum(
        1 for a, b in itertools.combinations(sorted(o for o, _ in originals), 2) if patient[a] == patient[b]
    )
    print(
        f"pool: {len(originals)} originals, {len(copy_ops)} copies, {len(truth)} positive pairs, "
        f"{n_hard} same-patient distinct pairs  (build {time.perf_counter() - t0:.1f}s)"
    )

    t0 = time.perf_counter()
    fps = {k: fingerprint(img) for k, img in images.items()}
    t_fp = time.perf_counter() - t0
    print(f"fingerprint: {1000 * t_fp / len(fps):.1f} ms/image")

    # One run with a permissive threshold gives every verified score; the configured threshold is then
    # applied here, which is exactly what find_duplicates(config) returns.
    loose = replace(config, max_residual=1.0)
    t0 = time.perf_counter()
    scored = find_duplicates({}, fps, loose)
    t_batch = time.perf_counter() - t0
    found = {pair(p.a, p.b) for p in scored if p.score <= config.max_residual}
    print(f"find_duplicates batch: {t_batch:.1f}s for {len(fps)} images, {len(scored)} pairs scored")
    print("results:")
    report("batch (known={}, new=pool)", found, truth, patient)

    orig_fps = {k: v for k, v in fps.items() if k in group and not k.startswith("copy")}
    copy_fps = {k: v for k, v in fps.items() if k.startswith("copy")}
    t0 = time.perf_counter()
    inc = {pair(p.a, p.b) for p in find_duplicates(orig_fps, copy_fps, config)}
    t_inc = time.perf_counter() - t0
    truth_inc = {p for p in truth if p[0].startswith("copy") or p[1].startswith("copy")}
    report("incremental (orig known, copies new)", inc, truth_inc, patient)
    print(f"  (incremental run {t_inc:.1f}s)")

    # per-transformation recall of original<->copy pairs (batch mode)
    hit: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, ops in copy_ops.items():
        ok = pair(key, key.split(":", 1)[1]) in found
        for op in ops:
            hit[op][0] += ok
            hit[op][1] += 1
    print("per-transformation recall (original<->copy, batch):")
    print("  " + "  ".join(f"{op} {h / t:.3f} ({t})" for op, (h, t) in sorted(hit.items())))

    # score margins
    pos_scores = sorted(p.score for p in scored if pair(p.a, p.b) in truth)
    neg = sorted((p.score, p.a, p.b) for p in scored if pair(p.a, p.b) not in truth)
    # candidate recall: fraction of the true pairs that the candidate stage proposes at all (batch mode);
    # stage-1 pass: fraction that also survive stages 0-1 (get a stage-2 score <= 1)
    cand_recall = len(set(candidate_pairs({}, fps, config)) & truth) / max(len(truth), 1)
    stage1_pass = len({pair(p.a, p.b) for p in scored} & truth) / max(len(truth), 1)
    print(
        f"candidate recall {cand_recall:.4f}, stage-1 pass {stage1_pass:.4f}; "
        f"positive scores: median {np.median(pos_scores):.4f}, "
        f"p99 {np.percentile(pos_scores, 99):.4f}, max {pos_scores[-1]:.4f}; "
        f"lowest negative scores: {[round(s, 4) for s, _, _ in neg[:5]]}"
    )

    # baseline: plain whole-image phash threshold, all pairs
    keys = sorted(fps)
    ph = np.array([int(str(fps[k]["phash"]), 16) for k in keys], dtype=np.uint64)
    print("baseline phash threshold (whole image, all pairs):")
    dist = {}
    for i in range(len(keys)):
        x = np.bitwise_xor(ph[i], ph[i + 1 :])
        d = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        for j in np.nonzero(d <= 12)[0]:
            dist[(keys[i], keys[i + 1 + j])] = int(d[j])
    for thr in (6, 8, 10, 12):
        report(f"phash <= {thr}", {p for p, d in dist.items() if d <= thr}, truth, patient)

    if args.dump:
        misses = sorted(truth - found)
        fps_ = sorted(found - truth)
        dump_pairs(misses[:30], images, args.dump, "miss")
        dump_pairs(fps_[:30], images, args.dump, "fp")
        dump_pairs([(a, b) for _, a, b in neg[:10]], images, args.dump, "nearneg")
        for a, b in misses[:30]:
            s = next((p.score for p in scored if (p.a, p.b) == (a, b)), None)
            print(
                f"  miss {a} | {b}  ops={copy_ops.get(b, copy_ops.get(a))} score={s} "
                f"d={hamming(int(str(fps[a]['phash']), 16), int(str(fps[b]['phash']), 16))}"
            )
        for s, a, b in neg[:10]:
            print(f"  near-negative {s:.4f} {a} | {b} same-patient={patient[a] == patient[b]}")

    if args.kinds:
        kinds_run(args, originals, images, patient, group, config)

    if args.real:
        real = {name: fingerprint(open_gray(image_dir / name)) for name, _ in sources}
        pid = dict(sources)
        t0 = time.perf_counter()
        pairs = find_duplicates({}, real, config)
        print(f"real data: {len(real)} X-rays, {len(pairs)} pairs in {time.perf_counter() - t0:.1f}s")
        for p in pairs:
            print(f"  {p.score:.4f} d={p.distance:2d} {p.a} [{pid[p.a]}] == {p.b} [{pid[p.b]}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
