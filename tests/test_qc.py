"""Tiling QC: a slide's picture (1,024 px, legend, an outline in no ink's colour, ink hatched) and
the cohort's contact sheet written by the tile stage (every slide, problems first)."""

import re
import shutil

import cv2
import numpy as np
import pandas as pd
from typer.testing import CliRunner

from fusion.cli import app
from fusion.synth import INKS, PEN
from fusion.wsi import tile_slide
from fusion.wsi.qc import FEW_TILES, INK_HATCH_RGB, LEGEND_PX, QC_LONG_SIDE, SHEET, TISSUE_RGB, write_contact_sheet


def _rgb(path) -> np.ndarray:
    return cv2.imread(str(path))[..., ::-1]


def _near(img: np.ndarray, rgb, tolerance: int = 40) -> np.ndarray:
    """Pixels within `tolerance` of `rgb` in every channel: the picture is a JPEG (quality 90)."""
    return np.abs(img.astype(int) - np.array(rgb)).max(-1) <= tolerance


def _hue_deg(rgb) -> float:
    return float(cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV_FULL)[0, 0, 0]) * 360 / 256


def test_outline_colour_is_no_pen_colour():
    """Pens are black, blue, green or red: the outline is saturated and far in hue from each."""
    sat = cv2.cvtColor(np.uint8([[TISSUE_RGB]]), cv2.COLOR_RGB2HSV_FULL)[0, 0, 1]
    assert sat > 200  # black ink is unsaturated
    for ink in [INKS["blue"], INKS["green"], (200, 30, 30)]:
        gap = abs(_hue_deg(TISSUE_RGB) - _hue_deg(ink))
        assert min(gap, 360 - gap) > 40, ink


def test_qc_picture_is_large_outlines_the_tissue_and_hatches_the_ink(realistic_slides, tmp_path):
    row = pd.read_csv(realistic_slides / "slides.csv").iloc[0]  # 8192 px wide, pen marks on every slide
    tile_slide(realistic_slides / row.path, row.slide_id, tmp_path)
    img = _rgb(tmp_path / f"{row.slide_id}.tissue.jpg")
    labels = cv2.imread(str(realistic_slides / "truth" / f"{row.slide_id}.labels.png"), cv2.IMREAD_UNCHANGED)
    h, w = img.shape[0] - LEGEND_PX, labels.shape[1] * QC_LONG_SIDE // max(labels.shape)
    assert max(h, w) == QC_LONG_SIDE >= 1024 and img.shape[1] >= w
    body, legend = img[:h, :w], img[h:]
    yellow = _near(body, TISSUE_RGB)
    assert _near(legend, TISSUE_RGB).any()  # the key of the outline colour
    assert (legend.min(-1) < 80).sum() > 500  # and its text

    labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
    tissue = ((labels >= 1) & (labels <= 5)).astype(np.uint8)
    ring = cv2.dilate(tissue, np.ones((15, 15), np.uint8)) - cv2.erode(tissue, np.ones((15, 15), np.uint8))
    assert yellow.sum() > 2000
    assert (yellow & (ring > 0)).sum() > 0.95 * yellow.sum()  # the outline follows the true tissue edge

    ink = cv2.erode((labels == PEN).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert ink.sum() > 1000
    white = _near(body, INK_HATCH_RGB, 20)
    yy, xx = np.indices(white.shape)
    lines = (xx + yy) % 8 < 2  # the hatching: 2 px in every 8, diagonal
    assert (white & ink & lines).sum() > 0.6 * (ink & lines).sum()  # over the ink, on the lines
    assert (white & ink & ~lines).sum() < 0.2 * (ink & ~lines).sum()  # the ink shows between them

    def white_rate(where):
        return (white & where).sum() / where.sum()

    tissue = tissue > 0  # pale tissue has white pixels of its own, but none in the hatching's pattern
    assert white_rate(tissue & lines) < white_rate(tissue & ~lines) + 0.01


def test_tile_stage_writes_a_contact_sheet_problems_first(tiny_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort, ignore=shutil.ignore_patterns("truth"))
    slides = pd.read_csv(cohort / "slides.csv").head(6)
    slides.to_csv(cohort / "slides.csv", index=False)
    bad = slides.iloc[2]
    (cohort / bad.path).write_bytes((cohort / bad.path).read_bytes()[:4000])

    done = CliRunner().invoke(app, ["tile", str(cohort), "--out", str(tmp_path / "run"), "--local"])
    assert done.exit_code == 0, done.output
    page = (tmp_path / "run" / "tiles" / SHEET).read_text()
    cards = re.findall(r'<div class="(card[^"]*)" id="([^"]+)">', page)
    assert sorted(sid for _, sid in cards) == sorted(slides.slide_id)
    assert cards[0] == ("card failed", bad.slide_id) and "failed" in page
    for _, sid in cards[1:]:
        assert f'src="{sid}.tissue.jpg"' in page and (tmp_path / "run" / "tiles" / f"{sid}.tissue.jpg").exists()
        patient = slides.set_index("slide_id").patient_id[sid]
        assert f"patient {patient}" in page

    # a slide that kept few tiles comes after the failed ones, before the rest
    results = [{"slide_id": s, "status": "failed" if s == bad.slide_id else "done"} for s in slides.slide_id]
    results.append({"slide_id": "sparse", "status": "done", "n_tiles": FEW_TILES - 1})
    page = write_contact_sheet(tmp_path / "run" / "tiles", results).read_text()
    cards = re.findall(r'<div class="(card[^"]*)" id="([^"]+)">', page)
    kinds = [k for k, _ in cards]
    assert cards[0] == ("card failed", bad.slide_id) and ("card few", "sparse") in cards
    assert kinds == ["card failed"] + ["card few"] * kinds.count("card few") + ["card"] * kinds.count("card")
