import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from fusion.errors import SlideReadError
from fusion.wsi import TilingConfig, open_slide, read_coords, tile_slide


def _first_slide(cohort):
    row = pd.read_csv(cohort / "slides.csv").iloc[0]
    return row.slide_id, cohort / row.path


def _truth_labels(cohort, sid):
    return cv2.imread(str(cohort / "truth" / f"{sid}.labels.png"), cv2.IMREAD_UNCHANGED)


def test_tiles_fall_on_tissue_and_count_matches_truth(tiny_cohort, tmp_path):
    sid, path = _first_slide(tiny_cohort)
    result = tile_slide(path, sid, tmp_path, TilingConfig(patch_size=256, min_tissue=0.5))
    coords, attrs = read_coords(tmp_path / f"{sid}.h5")
    assert result["n_tiles"] == len(coords) > 10
    assert attrs["patch_size_level0"] == 256 and attrs["level0_mpp"] == 0.5
    assert attrs["patch_level"] == 0 and list(attrs["level_dim"]) == [2048, 1536]
    assert (tmp_path / f"{sid}.tissue.jpg").exists()

    labels = _truth_labels(tiny_cohort, sid) > 0  # one label pixel = 8 level-0 pixels
    frac = lambda x, y: labels[y // 8 : (y + 256) // 8, x // 8 : (x + 256) // 8].mean()  # noqa: E731
    kept = np.array([frac(x, y) for x, y in coords])
    assert kept.mean() > 0.8
    grid = [(x, y) for y in range(0, 1536 - 255, 256) for x in range(0, 2048 - 255, 256)]
    truth_count = sum(frac(x, y) >= 0.5 for x, y in grid)
    assert abs(len(coords) - truth_count) <= max(2, 0.1 * truth_count)


def test_rerun_skips_and_new_parameters_redo(tiny_cohort, tmp_path):
    sid, path = _first_slide(tiny_cohort)
    first = tile_slide(path, sid, tmp_path)
    mtime = (tmp_path / f"{sid}.h5").stat().st_mtime_ns
    again = tile_slide(path, sid, tmp_path)
    assert again["skipped"] and (tmp_path / f"{sid}.h5").stat().st_mtime_ns == mtime
    smaller = tile_slide(path, sid, tmp_path, TilingConfig(patch_size=128))
    assert not smaller["skipped"] and smaller["n_tiles"] > 3 * first["n_tiles"]


def test_a_run_of_the_png_era_is_brought_up_to_date_without_new_tiles(tiny_cohort, tmp_path):
    """Runs made before the QC pictures were JPEG hold `<slide>.tissue.png`: the slide is tiled again for its
    picture (same coordinates, same inputs hash, so its features stay valid) and the PNG goes."""
    sid, path = _first_slide(tiny_cohort)
    first = tile_slide(path, sid, tmp_path)
    (tmp_path / f"{sid}.tissue.jpg").rename(tmp_path / f"{sid}.tissue.png")
    again = tile_slide(path, sid, tmp_path)
    assert not again["skipped"] and again["inputs_hash"] == first["inputs_hash"]
    assert (tmp_path / f"{sid}.tissue.jpg").exists() and not (tmp_path / f"{sid}.tissue.png").exists()


def test_target_resolution_reads_a_coarser_level(tiny_cohort, tmp_path):
    sid, path = _first_slide(tiny_cohort)
    tile_slide(path, sid, tmp_path, TilingConfig(target_mpp=2.0, patch_size=64))
    _, attrs = read_coords(tmp_path / f"{sid}.h5")
    assert attrs["patch_size_level0"] == 256 and attrs["patch_level"] == 1  # 4x level


def test_corrupt_truncated_and_foreign_files_name_the_file(tiny_cohort, tmp_path):
    _, path = _first_slide(tiny_cohort)
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(path.read_bytes()[:5000])
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    for bad in (truncated, text, tmp_path / "missing.tiff"):
        with pytest.raises(SlideReadError) as info:
            tile_slide(bad, "x", tmp_path / "out")
        assert str(bad) in str(info.value)


def test_missing_resolution_says_how_to_pass_mpp(tmp_path):
    path = tmp_path / "nompp.tiff"
    img = np.full((1024, 1024, 3), 240, np.uint8)
    img[200:800, 200:800] = (200, 120, 180)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None)
    with pytest.raises(SlideReadError, match="--mpp"):
        open_slide(path)
    result = tile_slide(path, "nompp", tmp_path / "out", TilingConfig(min_tissue=0.9), mpp=0.5)
    assert result["n_tiles"] == 4  # the 600 px square holds 2 x 2 whole 256 px tiles of the grid
