"""Builders for synthetic test data: radiograph-like images, encoded files, sources on disk."""

from __future__ import annotations

import csv
import io
import re
import socket
import struct
import time
import zlib
from collections.abc import Callable
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


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2) -> object:
    """Poll ``condition`` until it is truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)


def job_env() -> dict[str, str]:
    """A child job's environment: it joins the test session's Ray cluster, as ``ray job submit`` jobs
    join theirs."""
    import os

    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
