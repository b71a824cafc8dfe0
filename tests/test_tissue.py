"""Tissue detection and tiling against the synthetic ground truth (pen, debris, glass, 40x)."""

import cv2
import numpy as np
import pandas as pd
import pytest

from fusion.synth import DEBRIS, PEN
from fusion.wsi import TilingConfig, open_slide, read_coords, tile_slide
from fusion.wsi.tiling import segmentation_image
from fusion.wsi.tissue import preset, segment


def _labels(cohort, sid):
    return cv2.imread(str(cohort / "truth" / f"{sid}.labels.png"), cv2.IMREAD_UNCHANGED)


def _slides(cohort):
    return list(pd.read_csv(cohort / "slides.csv").itertuples(index=False))


def _iou(cohort, sid, path):
    with open_slide(cohort / path) as slide:
        rgb, down = segmentation_image(slide, 8.0)
        mask, ink = segment(rgb, slide.mpp * down)
    labels = _labels(cohort, sid)
    tissue = ((labels >= 1) & (labels <= 5)).astype(np.float32)
    truth = cv2.resize(tissue, mask.shape[::-1], interpolation=cv2.INTER_AREA) >= 0.5
    pen = cv2.resize((labels == PEN).astype(np.float32), mask.shape[::-1], interpolation=cv2.INTER_AREA) >= 0.5
    return (mask & truth).sum() / (mask | truth).sum(), (mask & pen).sum() / max(pen.sum(), 1)


def test_tissue_iou_at_least_095_with_pen_marks(realistic_slides, slide_40x):
    for cohort in (realistic_slides, slide_40x):
        for row in _slides(cohort):
            iou, pen_kept = _iou(cohort, row.slide_id, row.path)
            assert iou >= 0.95, (row.slide_id, iou)
            assert pen_kept < 0.01, (row.slide_id, pen_kept)


def _truth_tiles(cohort, sid, attrs, min_tissue=0.5, max_ink=0.05):
    """Tiles of the same grid chosen from the ground truth (label pixels of 8 level-0 px)."""
    labels = _labels(cohort, sid)
    tissue = ((labels >= 1) & (labels <= 5))
    ps = int(attrs["patch_size_level0"])
    w, h = (int(v) for v in attrs["level_dim"])
    frac = lambda m, x, y: m[y // 8 : (y + ps) // 8, x // 8 : (x + ps) // 8].mean()  # noqa: E731
    return {(x, y) for y in range(0, h - ps + 1, ps) for x in range(0, w - ps + 1, ps)
            if frac(tissue, x, y) >= min_tissue and frac(labels == PEN, x, y) <= max_ink}


@pytest.mark.parametrize("which", ["20x", "40x"])
def test_tile_count_within_2_percent_and_artefacts_excluded(which, realistic_slides, slide_40x, tmp_path):
    cohort = realistic_slides if which == "20x" else slide_40x
    total_ours = total_truth = 0
    for row in _slides(cohort):
        tile_slide(cohort / row.path, row.slide_id, tmp_path, TilingConfig(target_mpp=0.5, patch_size=256))
        coords, attrs = read_coords(tmp_path / f"{row.slide_id}.h5")
        truth = _truth_tiles(cohort, row.slide_id, attrs)
        total_ours, total_truth = total_ours + len(coords), total_truth + len(truth)
        labels = _labels(cohort, row.slide_id)
        ps8 = int(attrs["patch_size_level0"]) // 8
        for x, y in coords // 8:
            patch = labels[y : y + ps8, x : x + ps8]
            assert (patch == PEN).mean() <= 0.15  # no inked tile (at most a sliver at the edge)
            assert ((patch >= 1) & (patch <= 5)).mean() >= 0.3  # no glass or debris tile
        assert attrs["patch_size_level0"] == (512 if which == "40x" else 256)
    assert abs(total_ours - total_truth) <= 0.02 * total_truth, (total_ours, total_truth)


def test_debris_and_dust_are_not_tissue(realistic_slides):
    row = _slides(realistic_slides)[0]
    labels = _labels(realistic_slides, row.slide_id)
    with open_slide(realistic_slides / row.path) as slide:
        rgb, down = segmentation_image(slide, 8.0)
        mask, _ = segment(rgb, slide.mpp * down)
    debris = cv2.resize((labels == DEBRIS).astype(np.uint8), mask.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert debris.sum() > 0 and (mask & debris).sum() / debris.sum() < 0.05


def test_presets_and_overrides():
    assert preset("biopsy").min_tissue_area_um2 < preset("resection").min_tissue_area_um2
    assert preset("resection", close_um=10).close_um == 10
    with pytest.raises(ValueError, match="unknown tissue preset 'fat'; available: resection, biopsy, strict"):
        preset("fat")
    with pytest.raises(ValueError, match="bad tissue parameter"):
        preset("resection", closing=3)


def test_biopsy_preset_keeps_small_fragments():
    img = np.full((400, 400, 3), 243, np.uint8)
    cv2.circle(img, (100, 100), 60, (200, 120, 180), -1)  # a large piece
    cv2.circle(img, (300, 300), 5, (200, 120, 180), -1)  # 80 um across: 0.005 mm^2
    resection = segment(img, 8.0, preset("resection"))[0]
    biopsy = segment(img, 8.0, preset("biopsy"))[0]
    assert resection[300, 300] == 0 and biopsy[300, 300] == 1 and resection[100, 100] == 1
