"""The lung-field segmenter: the masks reader's refusals, Dice/IoU and the patient bootstrap on hand-made
arrays, and one tiny U-Net trained through the real ``lungs`` job on Ray Train (shared by the slow tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lxn_ray import registry
from lxn_ray.data.lung_pairs import load_pair, pair_films
from lxn_ray.evaluation.segmentation import cluster_bootstrap_ci, dice_iou, summarize
from lxn_ray.infra.storage import Storage
from lxn_ray.sources import masks as masks_reader
from lxn_ray.sources.masks import MaskError, open_masks
from tests.helpers import synthetic_film, write_masks_folder


# -- the masks reader ---------------------------------------------------------------------------------
def test_masks_reader_refuses_paths_that_leave_the_folder(tmp_path):
    root = write_masks_folder(tmp_path / "m", films=2)
    (tmp_path / "outside.png").write_bytes((root / "masks" / "f0.png").read_bytes())
    text = (root / "masks.csv").read_text()
    (root / "masks.csv").write_text(text.replace("masks/f1.png", "../outside.png"))
    with pytest.raises(MaskError, match=r"masks.csv line 3: path leaves the masks folder"):
        open_masks(root)
    (root / "masks.csv").write_text(text.replace("masks/f1.png", "masks/link.png"))
    (root / "masks" / "link.png").symlink_to(tmp_path / "outside.png")  # a symlink out of the root
    with pytest.raises(MaskError, match=r"line 3: path leaves the masks folder"):
        open_masks(root)


def test_masks_reader_names_the_row_of_a_missing_mask_a_size_mismatch_and_a_non_binary_mask(tmp_path):
    root = write_masks_folder(tmp_path / "m", films=3)
    folder = open_masks(root)
    assert [row.line for row in folder.rows] == [2, 3, 4] and folder.describe()["masks"] == 3
    (root / "masks" / "f0.png").unlink()
    with pytest.raises(MaskError, match=r"line 2: missing mask: masks/f0.png") as missing:
        folder.read_mask(folder.rows[0])
    assert missing.value.kind == masks_reader.MISSING_MASK
    film, _ = synthetic_film(1)  # the mask of row 3 saved at another size than its film
    Image.fromarray(np.zeros((film.shape[0] + 3, film.shape[1]), np.uint8)).save(root / "masks" / "f1.png")
    with pytest.raises(MaskError, match=r"line 3: mask size differs from the film's"):
        folder.read_mask(folder.rows[1])
    gray = np.random.default_rng(0).integers(0, 256, synthetic_film(2)[0].shape, dtype=np.uint8)
    Image.fromarray(gray).save(root / "masks" / "f2.png")  # a photograph, not a mask
    with pytest.raises(MaskError, match=r"line 4: mask not binary"):
        folder.read_mask(folder.rows[2])


def test_mask_and_film_sizes_must_agree_and_unpaired_masks_say_how_to_get_films(tmp_path):
    root = write_masks_folder(tmp_path / "m", films=2, film_column=False)
    storage = Storage.open(str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError, match=r"python jobs/ingest.py --source .*ieee8023.bundle"):
        pair_films(storage, open_masks(root))
    root = write_masks_folder(tmp_path / "m2", films=2)
    film, _ = synthetic_film(0)
    Image.fromarray(film[:-2]).save(root / "films" / "f0.png")
    (root / "masks.csv").write_text("film,mask\nfilms/f0.png,masks/f0.png\n")  # no sizes to check early
    folder = open_masks(root)
    pairing = pair_films(storage, folder)
    with pytest.raises(MaskError, match=r"line 2: mask size differs from the film's: the mask is"):
        load_pair(storage, folder, pairing.films[0])


# -- Dice, IoU and the patient bootstrap --------------------------------------------------------------
def test_dice_and_iou_on_hand_made_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b[:2, :] = True  # 8 pixels, 4 shared
    assert dice_iou(a, b) == pytest.approx((2 * 4 / 12, 4 / 8))
    assert dice_iou(a, a) == (1.0, 1.0) and dice_iou(a, ~a) == (0.0, 0.0)
    assert dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)  # both empty: agreement
    with pytest.raises(ValueError, match="differ in shape"):
        dice_iou(a, np.zeros((4, 5), bool))


def test_the_bootstrap_resamples_patients_not_films():
    # Two patients of ten films each, all 0 for one and 1 for the other: a resample of patients has mean
    # 0, 0.5 or 1, so the interval spans [0, 1]; resampling films would give a narrow interval about 0.5.
    values, groups = [0.0] * 10 + [1.0] * 10, ["a"] * 10 + ["b"] * 10
    assert cluster_bootstrap_ci(values, groups, seed=3) == (0.0, 1.0)
    assert cluster_bootstrap_ci(values, groups, seed=3) == cluster_bootstrap_ci(values, groups, seed=3)
    # One patient: every resample is that patient, the interval is the value itself.
    assert cluster_bootstrap_ci([0.8, 0.9], ["p", "p"]) == pytest.approx((0.85, 0.85))
    summary = summarize([np.ones((2, 2), bool)] * 3, [np.ones((2, 2), bool)] * 3, ["x", "y", "y"])
    assert summary["dice"] == {"value": 1.0, "interval": [1.0, 1.0]} and summary["n_patients"] == 2
    assert cluster_bootstrap_ci([], []) is None


def test_augmentation_moves_about_the_centre_within_its_ranges():
    from lxn_ray.training import segmenter

    size = 64
    transforms, gains, offsets = segmenter.draw_augmentation(np.random.default_rng(0), 200, size)
    assert transforms.shape == (200, 8) and transforms.dtype == np.float32
    linear = transforms[:, [0, 1, 3, 4]].reshape(-1, 2, 2)
    scale = 1 / np.sqrt(np.linalg.det(linear))  # a rotation divided by the zoom
    assert np.all(np.abs(scale - 1) <= segmenter.ZOOM + 1e-5)
    centre = np.array([(size - 1) / 2] * 2)
    mapped = linear @ centre + transforms[:, [2, 5]]  # where the output's centre is read from
    assert np.all(np.abs(mapped - centre) <= segmenter.SHIFT * size + 1e-3)
    assert np.all(np.abs(gains - 1) <= segmenter.CONTRAST) and np.all(np.abs(offsets) <= segmenter.BRIGHTNESS)
    again = segmenter.draw_augmentation(np.random.default_rng(0), 200, size)
    assert all(np.array_equal(a, b) for a, b in zip(again, (transforms, gains, offsets), strict=True))


@pytest.mark.slow
def test_the_lungs_job_trains_registers_and_scores_held_out_patients(tiny_segmenter, capsys):
    store, report = tiny_segmenter.store, tiny_segmenter.report
    storage = Storage.open(str(store))
    for name in ("dice", "iou"):
        low, high = report[name]["interval"]
        assert low <= report[name]["value"] <= high
    assert report["dice"]["value"] > 0.85, report["dice"]  # two dark ellipses: an easy task
    counts = report["split_counts"]
    assert sum(c["films"] for c in counts.values()) == 48 and report["masks"]["skipped"] == 0
    assert report["test"]["n_films"] == counts["test"]["films"] > 0
    card = registry.read_segmenter_card(storage, report["segmenter_version"])
    assert card["unet"] == {"image_size": 32, "filters": 4, "depth": 2}
    assert card["best_epoch"] == max(card["history"], key=lambda e: e["val_dice"])["epoch"]
    assert len(card["history"]) == 3 and card["intended_use"].startswith("Research only")
    assert card["test"]["dice"] == report["dice"] and card["dataset_version"] is None
    assert set(card["versions"]) >= {"lxn_ray", "ray", "tensorflow", "keras"}
    assert card["masks"]["masks"] == 48 and "patient-" not in json.dumps(card)  # counts, no patient ids
    prefix = f"segmenters/{report['segmenter_version']}"
    assert {key.rsplit("/", 1)[-1] for key in storage.list(f"{prefix}/plots")} == {
        "training_curves.png",
        "test_outlines.png",
    }
    assert registry.list_segmenters(storage) == [report["segmenter_version"]]
    from lxn_ray.cli.registry import main as registry_main

    assert registry_main(["--storage", str(store), "list"]) == 0
    listed = capsys.readouterr().out
    assert report["segmenter_version"] in listed and "test Dice" in listed


@pytest.mark.slow
def test_a_resolved_segmenter_masks_films_of_any_size(tiny_segmenter):
    from lxn_ray.model.lungs import LungSegmenter

    store, report = tiny_segmenter.store, tiny_segmenter.report
    reference = registry.resolve_segmenter(Storage.open(str(store)), "latest")
    assert reference.version == report["segmenter_version"] and reference.image_size == 32
    segmenter = LungSegmenter.from_bytes(reference.model_bytes, reference.version)
    films, truths = zip(*(synthetic_film(seed) for seed in range(900, 905)), strict=True)
    masks = segmenter.masks(list(films) + [np.zeros((7, 300), np.uint8)])
    assert [m.shape for m in masks] == [f.shape for f in films] + [(7, 300)]
    assert all(m.dtype == bool for m in masks)
    assert np.mean([dice_iou(m, t)[0] for m, t in zip(masks, truths, strict=False)]) > 0.8
    with pytest.raises(ValueError, match="2-D uint8"):
        segmenter.masks([np.zeros((4, 4, 3), np.uint8)])
