"""Builders for synthetic test data: radiograph-like images, encoded files, sources on disk."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

METADATA_HEADER = [
    "patientid",
    "offset",
    "sex",
    "age",
    "finding",
    "view",
    "modality",
    "date",
    "location",
    "folder",
    "filename",
    "doi",
    "url",
    "license",
    "clinical notes",
    "",
]


def own_stderr_lines(err: str) -> list[str]:
    """A job's own stderr lines: without the "(Actor pid=...)" lines Ray forwards from its workers."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", err)
    return [line for line in plain.splitlines() if line.strip() and not line.startswith("(")]


# -- what a person sees: a job's printed lines -------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WORKER_PREFIX = re.compile(r"^\([^)]*pid=\d+[^)]*\)\s*")
# A job's own line: its progress lines ([job HH:MM:SS] ...), a warning it gives, an error line, or the
# line it prints on a stop signal.
OWN = re.compile(
    r"^(\[(train|tune|ingest|evaluate|retrain|loso|serve)\b|warning:|WARNING source shortcut|error:"
    r"|SIGTERM: |SIGINT: )"
)


def printed_lines(stdout: str, stderr: str) -> tuple[list[str], list[str]]:
    """(every non-blank line a job printed - stdout's, then stderr's without colour codes and Ray's
    ``(Actor pid=...)`` prefix -, the stderr lines that are not the job's own)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    others = []
    for raw in stderr.splitlines():
        line = WORKER_PREFIX.sub("", ANSI.sub("", raw)).strip()
        if line:
            lines.append(line)
            if not OWN.match(line):
                others.append(line)
    return lines, others


def own_share(stdout: str, stderr: str) -> tuple[float, list[str]]:
    """(share of printed lines that are the job's own, the others)."""
    lines, others = printed_lines(stdout, stderr)
    return (len(lines) - len(others)) / max(1, len(lines)), others


class Background:
    """A Python child process that runs ``code`` until its stdin closes (or it ends by itself); ``ready``
    is the first line it prints. Stopped by this object only - by closing its stdin, then by its pid."""

    def __init__(self, code: str, env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.ready = self.process.stdout.readline().strip()
        assert self.ready, f"background process exited with {self.process.poll()} before it was ready"

    def stop(self) -> None:
        import subprocess

        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# One core kept busy by a bounded loop (15 minutes at most) in a thread; stdin closing ends the process.
BUSY_CORE = """
import sys, threading, time
def spin():
    end = time.monotonic() + 900
    while time.monotonic() < end:
        pass
threading.Thread(target=spin, daemon=True).start()
print("spinning", flush=True)
sys.stdin.read()
"""


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2) -> object:
    """Poll ``condition`` until it is truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)


# Everything an endpoint's summary row may hold (lxn_ray.serving.summaries): statistics and the answer, no
# patient information.
SUMMARY_FIELDS = {"format", "width", "height", "mean_intensity", "film_fraction"}
SUMMARY_FIELDS |= {"probability", "label", "model_version"}


def job_env() -> dict[str, str]:
    """A child job's environment: it joins the test session's Ray cluster, as ``ray job submit`` jobs
    join theirs."""
    import os

    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``mlflow server`` on 127.0.0.1 (its SQLite store and artifacts under ``root``): (its URI, its
    process). Stopped - the process group this started, nothing else - when the block ends."""
    import sys

    from tests.conftest import wait_for_http

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(root / "server.log").open("wb"),
        start_new_session=True,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_http(f"{uri}/health", server, timeout_s=120)
        yield uri, server
    finally:
        stop_group(server)


def stop_group(process: subprocess.Popen) -> None:
    """Stop ``process`` and its children (its own session's process group, started by a test) and wait."""
    import os
    import signal

    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def copy_store(folder: Path, target: Path) -> Path:
    """A writable copy of a shared store (a session or module fixture's) at ``target``, a folder that does
    not exist yet; returns ``target``."""
    shutil.copytree(folder, target)
    return target


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid, tiny-on-disk PNG of ``width`` x ``height`` black pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


def radiograph(seed: int, size: tuple[int, int] = (320, 384)) -> Image.Image:
    """A synthetic chest-X-ray-like grayscale image: anatomy, ribs and texture all differ per seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = 30 + 70 * np.exp(-((x - rng.uniform(0.45, 0.55)) ** 2) / rng.uniform(0.02, 0.1))  # mediastinum
    for side in (-1, 1):  # lungs
        cx, cy = 0.5 + side * rng.uniform(0.15, 0.25), rng.uniform(0.4, 0.6)
        image += rng.uniform(60, 120) * np.exp(
            -(((x - cx) / rng.uniform(0.1, 0.18)) ** 2 + ((y - cy) / rng.uniform(0.2, 0.35)) ** 2)
        )
    image += 25 * np.sin(2 * np.pi * (y * rng.uniform(6, 12) + x * rng.uniform(-2, 2) + rng.uniform(0, 1)))
    coarse = rng.normal(0, 1, (8, 8))  # a smooth random texture, unique to the image
    image += 35 * np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize(size, Image.BICUBIC))
    for _ in range(6):  # opacities
        cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.12)
        image += rng.uniform(-60, 60) * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / r**2))
    image += rng.normal(0, 4, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L")


# Header fields a real film carries that lxn_ray must never store: the PHI tests look for these values.
PHI_FIELDS = {
    "PatientName": "Doe^Jane",
    "PatientBirthDate": "19610203",
    "PatientAddress": "12 Harbour Street",
    "InstitutionName": "St Example Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "AccessionNumber": "ACC7781234",
    "StudyDate": "20200412",
}


def dicom_film(
    image: Image.Image | np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    patient_id: str = "MRN-0001",
    modality: str = "DX",
    view: str = "PA",
    body_part: str | None = "CHEST",
    window: bool = True,
    rescale: tuple[float, float] | None = None,
    frames: int = 1,
    compression: str | None = None,
    extra: dict[str, str] | None = None,
) -> bytes:
    """A DICOM Part 10 file (pydicom) holding ``image``'s pixels as a CR/DX film would.

    8 bits: stored as is (``MONOCHROME1``: inverted). 16 bits: stored as 12-bit values ``16 * v + 8``
    (inverted for ``MONOCHROME1``) with a window over the whole 12-bit range, or none (``window=False``);
    ``rescale=(slope, intercept)`` stores ``(value - intercept) / slope`` instead, as signed CR data can.
    ``compression``: None, ``"rle"`` or ``"jpeg2000"`` (lossless). The header carries :data:`PHI_FIELDS`.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        generate_uid,
    )

    pixels = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image).astype(np.int64)
    if bits == 8:
        stored = 255 - pixels if photometric == "MONOCHROME1" else pixels
    else:
        twelve = pixels * 16 + 8
        stored = 4095 - twelve if photometric == "MONOCHROME1" else twelve
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = modality
    ds.ViewPosition = view
    if body_part is not None:
        ds.BodyPartExamined = body_part
    for keyword, value in {**PHI_FIELDS, **(extra or {})}.items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.PixelRepresentation = 0
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        array = stored.astype(np.uint8)
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        array = stored.astype(np.uint16)
        if window:
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
        if rescale is not None:
            slope, intercept = rescale
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            ds.PixelRepresentation = 1
            ds.BitsStored, ds.HighBit = 16, 15
            array = np.rint((stored - intercept) / slope).astype(np.int16)
            if window:  # the same window in rescaled units: the same display
                ds.WindowCenter, ds.WindowWidth = 2048, 4096
    if frames > 1:
        array = np.stack([array] * frames)
        ds.NumberOfFrames = frames
    ds.PixelData = array.tobytes()
    if compression == "rle":
        ds.compress(RLELossless)
    elif compression == "jpeg2000":
        ds.compress(JPEG2000Lossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class SourceBuilder:
    """Writes a folder in the upstream layout: ``metadata.csv`` plus ``images/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.rows: list[list[str]] = []
        self.raw_lines: list[str] = []

    def add(
        self,
        filename: str,
        patient: str,
        finding: str = "COVID-19",
        view: str = "PA",
        modality: str = "X-ray",
        folder: str = "images",
        image: Image.Image | bytes | None = None,
        **save: object,
    ) -> None:
        """A metadata row, and its image file when ``image`` is given (PIL image or raw bytes)."""
        if isinstance(image, bytes):
            (self.root / folder / filename).write_bytes(image)
        elif image is not None:
            image.save(self.root / folder / filename, **save)
        self.rows.append(
            [
                patient,
                "0",
                "F",
                "50",
                finding,
                view,
                modality,
                "2020",
                "Testville",
                folder,
                filename,
                "",
                "",
                "CC BY",
                "",
                "",
            ]
        )

    def add_raw_line(self, line: str) -> None:
        self.raw_lines.append(line)

    def write(self) -> Path:
        with open(self.root / "metadata.csv", "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(METADATA_HEADER)
            writer.writerows(self.rows)
            for line in self.raw_lines:
                stream.write(line + "\r\n")
        return self.root


def synthetic_film(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A radiograph-like film of a random size (noise and a smooth gradient) with two dark ellipses as the
    lungs: (film uint8 ``(h, w)``, mask bool ``(h, w)``)."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(56, 84)), int(rng.integers(52, 80))
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    film = 150 + 40 * y + rng.normal(0, 12, (height, width))
    mask = np.zeros((height, width), bool)
    for side in (-1, 1):
        cx, cy = 0.5 + side * rng.uniform(0.18, 0.24), rng.uniform(0.45, 0.55)
        rx, ry = rng.uniform(0.12, 0.17), rng.uniform(0.22, 0.3)
        mask |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    film[mask] -= 90
    return np.clip(film, 0, 255).astype(np.uint8), mask


def write_masks_folder(root: Path, films: int = 36, film_column: bool = True) -> Path:
    """A masks folder: ``films/f<i>.png``, ``masks/f<i>.png`` (0/255) and ``masks.csv`` with ``film``,
    ``mask``, ``patient`` (two films per patient) and the sizes."""
    (root / "films").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "masks.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["film" if film_column else "image", "mask", "patient", "width", "height"])
        for i in range(films):
            film, mask = synthetic_film(i)
            Image.fromarray(film).save(root / "films" / f"f{i}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"f{i}.png")
            name = f"films/f{i}.png" if film_column else f"f{i}.png"
            writer.writerow([name, f"masks/f{i}.png", f"patient-{i // 2}", film.shape[1], film.shape[0]])
    return root
