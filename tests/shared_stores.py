"""Session-scoped fixtures shared across test modules: stores and trained tiny models that are expensive
to make (loaded by tests/conftest.py as a pytest plugin).

Each is made once per session and is read-only: a test or module that writes works on a copy
(:func:`tests.helpers.copy_store`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from PIL import Image

from tests.helpers import SourceBuilder, copy_store, radiograph, write_masks_folder

# A tiny LxN's training settings (TrainConfig fields): seconds per epoch on the synthetic stores.
TINY = dict(image_size=32, width=0.125, batch_size=8, learning_rate=1e-3)


def labelled_source(builder: SourceBuilder, patients: int = 60, offset: int = 0) -> Path:
    """One 96 x 96 radiograph per patient (``pt<offset>`` .. ``pt<offset + patients - 1>``), written in
    the upstream layout by ``builder``; returns its folder. Even patients are COVID-19 and their images
    carry a bright patch, so there is something to learn; the others are pneumonia. Every third is AP."""
    for i in range(offset, offset + patients):
        image = np.asarray(radiograph(1000 + i, size=(96, 96)), dtype=np.float64)
        positive = i % 2 == 0
        if positive:
            image[30:60, 20:50] = np.minimum(255, image[30:60, 20:50] + 90)
        builder.add(
            f"x{i}.png",
            f"pt{i}",
            finding="COVID-19" if positive else "Pneumonia",
            view="PA" if i % 3 else "AP",
            image=Image.fromarray(image.astype(np.uint8)),
        )
    return builder.write()


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """The folder of a store holding the 60-patient :func:`labelled_source` ingested: one dataset version,
    no model yet. Its source is the folder ``source`` beside it. Read-only; the train, output and watchdog
    tests each work on a copy."""
    from lxn_ray.data.ingest import ingest
    from lxn_ray.infra.storage import Storage
    from lxn_ray.sources.transports import FolderSource

    root = tmp_path_factory.mktemp("labelled")
    ingest(FolderSource(labelled_source(SourceBuilder(root / "source"))), Storage.open(str(root / "store")))
    return root / "store"


class TrainedStore(NamedTuple):
    store: Path  # the store's folder: labelled_store's dataset version, one model, and it is the champion
    source: Path  # the source folder that dataset version was ingested from
    report: dict[str, Any]  # train's report of the model
    stdout: str  # what the train job printed, as a person sees it (tests/model/test_output.py counts it)
    stderr: str


@pytest.fixture(scope="session")
def trained_store(labelled_store: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    """A copy of :func:`labelled_store` with one tiny model trained for one epoch in bfloat16 by
    ``python jobs/train.py`` (its own process, as a person runs it) and promoted to champion. Read-only,
    source included: the bfloat16 and output tests read it, the evaluation and retraining tests work on
    copies."""
    import json
    import subprocess
    import sys

    from lxn_ray import registry
    from lxn_ray.infra.storage import Storage
    from tests.helpers import job_env

    folder = copy_store(labelled_store, tmp_path_factory.mktemp("trained") / "store")
    report_path = folder.parent / "train.json"
    tiny = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items() if key != "learning_rate"]
    flags = [*tiny, f"--lr={TINY['learning_rate']}", "--epochs=1", "--precision=bfloat16"]
    job = Path(__file__).resolve().parents[1] / "jobs" / "train.py"
    command = [sys.executable, str(job), "--storage", str(folder), *flags, "--report", str(report_path)]
    result = subprocess.run(command, env=job_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    storage = Storage.open(str(folder))
    if registry.champion(storage) is None:  # the job's guard kept a no-better-than-chance model out
        registry.promote(storage, report["model_version"], reason="the tests' shared tiny champion")
    return TrainedStore(folder, labelled_store.parent / "source", report, result.stdout, result.stderr)


# One tiny segmenter trained through the lungs job on Ray Train: 3 epochs of 8 steps on 48 synthetic films,
# without augmentation (it slows convergence on so few films; tests/model/test_lungs.py covers it): ~23 s,
# most of it Ray Train starting a worker and TensorFlow (test Dice ~0.93).
TINY_SEGMENTER = ["--image-size", "32", "--filters", "4", "--depth", "2", "--epochs", "3"]
TINY_SEGMENTER += ["--batch-size", "4", "--lr", "3e-2", "--no-augment"]


class Segmenter(NamedTuple):
    store: Path  # a store holding one segmenter version and nothing else
    report: dict[str, Any]  # the lungs job's report

    def copy_into(self, store: Path) -> str:
        """Copy the segmenter version into the local store folder ``store``, as if trained there; returns
        its version."""
        version = self.report["segmenter_version"]
        copy_store(self.store / "segmenters" / version, store / "segmenters" / version)
        return version


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Segmenter:
    """A tiny U-Net trained by ``lxn lungs`` on 48 synthetic films (:func:`tests.helpers.write_masks_folder`)
    in a store of its own. Read-only: the lungs tests read it, the train and serve tests copy the segmenter
    into their stores (:meth:`Segmenter.copy_into`)."""
    import json

    from lxn_ray.cli.lungs import main

    root = tmp_path_factory.mktemp("lungs")
    masks = write_masks_folder(root / "masks", films=48)
    report = root / "report.json"
    arguments = ["--masks", str(masks), "--storage", str(root / "store"), "--report", str(report)]
    assert main(arguments + TINY_SEGMENTER) == 0
    return Segmenter(root / "store", json.loads(report.read_text()))
