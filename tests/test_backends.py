"""Reading real slides (openslide-python's test files) and TIFFs that openslide refuses."""

import shutil

import numpy as np
import pytest
import tifffile

from fusion.errors import SlideReadError
from fusion.wsi import open_slide, tile_slide
from fusion.wsi.tiling import segmentation_image

RNG = np.random.default_rng(0)
IMAGE = (RNG.random((1500, 2000, 3)) * 255).astype(np.uint8)


def test_real_aperio_svs_and_dicom(openslide_fixtures):
    with open_slide(openslide_fixtures / "small.svs") as svs:
        assert svs.vendor == "aperio" and svs.mpp == pytest.approx(0.499)
        assert svs.mpp_source == "openslide.mpp-x" and svs.dimensions == (16, 16)
        assert svs.read_rgb((0, 0), 0, (16, 16)).shape == (16, 16, 3)
    with open_slide(openslide_fixtures / "boxes_0.dcm") as dcm:
        assert dcm.vendor == "dicom" and dcm.dimensions == (16, 16)


def test_broken_real_files_name_the_file_and_reason(openslide_fixtures, tmp_path):
    with pytest.raises(SlideReadError) as info:
        open_slide(openslide_fixtures / "unopenable.tiff")
    assert "unopenable.tiff" in str(info.value) and "Unsupported TIFF compression" in str(info.value)
    with open_slide(openslide_fixtures / "unreadable.svs") as slide:  # opens; its tile data is corrupt
        with pytest.raises(SlideReadError, match="unreadable.svs.*reading"):
            slide.read_rgb((0, 0), 0, (16, 16))
    # In tiling, the same corruption is reported for that slide (reading the segmentation level).
    bad = tmp_path / "unreadable.svs"
    shutil.copy(openslide_fixtures / "unreadable.svs", bad)
    with pytest.raises(SlideReadError, match="unreadable.svs"):
        tile_slide(bad, "unreadable", tmp_path / "out")


def _ome(path, compression="zlib"):
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(IMAGE, subifds=2, tile=(256, 256), photometric="rgb", compression=compression,
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        for f in (2, 4):
            tw.write(IMAGE[::f, ::f], subfiletype=1, tile=(256, 256), photometric="rgb", compression=compression)


def test_ome_tiff_pyramid_falls_back_to_tifffile(tmp_path):
    path = tmp_path / "slide.ome.tif"
    _ome(path)
    with open_slide(path) as slide:
        assert slide.backend.name == "tifffile" and slide.mpp == 0.25
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        np.testing.assert_array_equal(slide.read_rgb((300, 700), 0, (513, 300)), IMAGE[700:1000, 300:813])
        np.testing.assert_array_equal(slide.read_rgb((400, 400), 1, (100, 100)), IMAGE[::2, ::2][200:300, 200:300])
        edge = slide.read_rgb((1800, 1400), 0, (400, 300))  # runs off the image: white beyond
        np.testing.assert_array_equal(edge[:100, :200], IMAGE[1400:1500, 1800:2000])
        assert (edge[100:] == 255).all() and (edge[:, 200:] == 255).all()


def test_stripped_tiff_openslide_refuses(tmp_path):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, IMAGE, photometric="rgb", rowsperstrip=64, resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.backend.name == "tifffile" and slide.mpp == 0.5
        np.testing.assert_array_equal(slide.read_rgb((33, 70), 0, (500, 333)), IMAGE[70:403, 33:533])


def test_huge_single_level_is_shrunk_in_bands(tmp_path):
    """A slide with no pyramid: the segmentation image is built band by band, same result."""
    path = tmp_path / "flat.tif"
    img = np.kron(RNG.integers(0, 255, (94, 125, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        whole, d1 = segmentation_image(slide, 8.0)
        banded, d2 = segmentation_image(slide, 8.0, max_band_pixels=2000 * 100)
    assert whole.shape == banded.shape == (94, 125, 3) and d1 == d2 == 16
    np.testing.assert_array_equal(whole, banded)


def _regions(backend, rng, n=12):
    """Random reads at every level: inside, across tile borders and running off the edge (level-0 locations
    that map to whole pixels of the level, as the tiler's grid does)."""
    out = []
    for level, (w, h) in enumerate(backend.level_dimensions):
        d = int(round(backend.level_downsamples[level]))
        for _ in range(n):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            out.append(((x * d, y * d), level, (int(rng.integers(1, 300)), int(rng.integers(1, 300)))))
    return out


@pytest.mark.parametrize("name", ["synthetic", "small.svs", "boxes.tiff"])
def test_stored_tiles_give_openslides_pixels(name, openslide_fixtures, tiny_cohort):
    """The fast path (stored tiles decoded directly) returns exactly openslide's pixels, white outside,
    on our JPEG pyramids, an Aperio SVS (shared JPEG tables) and a deflate generic TIFF; and it really
    decodes the tiles itself: openslide is asked only where a level's downsample is not a whole number
    (there openslide interpolates, so the read is left to it)."""
    from fusion.wsi.backends import create_backend

    path = next((tiny_cohort / "slides").glob("*.tiff")) if name == "synthetic" else openslide_fixtures / name
    reference, fast = create_backend("openslide", path), create_backend("tiles", path)
    assert sorted(fast.direct) == list(range(len(reference.level_dimensions)))
    asked = []
    read_region = fast.handle.read_region
    fast.handle.read_region = lambda *a: asked.append(a[1]) or read_region(*a)
    for r in _regions(reference, np.random.default_rng(1)):
        np.testing.assert_array_equal(fast.read_rgb(*r), reference.read_rgb(*r), err_msg=str(r))
    whole = {lv for lv, d in enumerate(reference.level_downsamples) if d == int(d)}
    assert whole and not whole & set(asked), (whole, set(asked))
    reference.close()
    fast.close()


def test_formats_without_plain_tiled_levels_stay_with_openslide(openslide_fixtures):
    from fusion.wsi.backends import create_backend

    with open_slide(openslide_fixtures / "boxes_0.dcm") as dicom:  # DICOM: openslide reads every pixel
        assert dicom.backend.name == "tiles" and dicom.backend.direct == {}
        np.testing.assert_array_equal(dicom.read_rgb((0, 0), 0, (16, 16)),
                                      create_backend("openslide", openslide_fixtures / "boxes_0.dcm")
                                      .read_rgb((0, 0), 0, (16, 16)))
