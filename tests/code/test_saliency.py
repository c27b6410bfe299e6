"""Saliency inside the lungs (lxn_ray.evaluation.saliency): the share of Grad-CAM mass inside the lung
fields, its summary over films with the rule that warns, and the lung outline an explanation draws."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lxn_ray.evaluation import saliency
from lxn_ray.model.gradcam import lung_outline, render_overlay


def lungs(size: int = 120) -> np.ndarray:
    """Two lung fields, the middle of the film, about a third of its area."""
    mask = np.zeros((size, size), dtype=bool)
    mask[20:100, 15:55] = True
    mask[20:100, 65:105] = True
    return mask


def heat(where: str, size: int = 8, seed: int = 0) -> np.ndarray:
    """A coarse Grad-CAM map (last-conv resolution): hot over the lungs, or over a corner marker and the
    film's border, with a little noise everywhere."""
    rng = np.random.default_rng(seed)
    cam = rng.uniform(0.0, 0.05, (size, size)).astype(np.float32)
    if where == "lungs":
        cam[2:6, 1:3] = cam[2:6, 5:7] = 1.0
    else:  # a burnt-in marker in the top-left corner and the bottom border
        cam[0:2, 0:2] = 1.0
        cam[7, :] = 0.8
    return cam


@pytest.mark.parametrize("where", ["lungs", "outside"])
def test_a_map_outside_the_lungs_warns_and_one_inside_does_not(where):
    shares, areas = zip(*(saliency.lung_share(heat(where, seed=s), lungs()) for s in range(20)), strict=True)
    result = saliency.summary(shares, areas, segmenter="lungs-x")
    assert result["measured"] and result["n"] == 20 and result["segmenter"] == "lungs-x"
    assert result["lung_area"] == pytest.approx(lungs().mean())
    assert result["q25"] <= result["median"] <= result["q75"] and result["sd"] >= 0
    assert result["rule"] == saliency.RULE
    if where == "lungs":
        assert result["mean"] > 0.7 and result["warning"] is None
    else:
        assert result["mean"] < 0.2 and "saliency outside the lungs" in result["warning"]


def test_shares_by_hand_and_what_cannot_be_measured():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, :2] = True
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[:, 0], cam[:, 3] = 3.0, 1.0
    share, area = saliency.lung_share(cam, mask)
    assert share == pytest.approx(0.75) and area == 0.5
    assert saliency.lung_share(np.zeros((4, 4)), mask)[0] is None  # an all-zero map places nothing
    assert saliency.summary([None], [0.5], "lungs-x")["measured"] is False
    assert saliency.not_measured("no lung segmenter")["reason"] == "no lung segmenter"


def test_the_explanation_outlines_the_lung_fields():
    film = Image.fromarray(np.full((120, 120), 90, dtype=np.uint8))
    outline = lung_outline(lungs(), (120, 120))
    assert outline[20, 30] and outline[60, 15] and not outline[60, 30] and not outline[5, 5]
    drawn = np.asarray(Image.open(io.BytesIO(render_overlay(film, heat("lungs"), "caption", lungs=lungs()))))
    plain = np.asarray(Image.open(io.BytesIO(render_overlay(film, heat("lungs"), "caption"))))
    changed = np.any(drawn != plain, axis=2)
    assert changed.any() and (drawn[changed] == 255).all()  # only the white outline differs
