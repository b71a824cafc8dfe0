"""Tiling: a grid of tiles at a target resolution over the tissue mask, coordinates to `.h5`.

The `.h5` layout follows CLAM and TRIDENT so their tools read ours and ours read theirs:
`coords` (N, 2) int64, level-0 top-left (x, y), with attributes `patch_size` (pixels at the target
resolution), `patch_level` (the pyramid level to read from), `patch_size_level0`, `target_mpp`,
`target_magnification`, `level0_mpp`, `level0_magnification`, `level_dim`, `overlap`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import h5py
import numpy as np

from fusion.errors import SlideReadError
from fusion.storage import atomic_path, file_fingerprint, hash_config
from fusion.wsi.qc import LEGACY_QC_SUFFIX, QC_LONG_SIDE, QC_SUFFIX, QCCaption, qc_picture, write_qc_picture
from fusion.wsi.slide import Slide, open_slide
from fusion.wsi.tissue import TissueConfig, segment

TILER_VERSION = "1"


@dataclass(frozen=True)
class TilingConfig:
    """Where tiles are cut: target resolution, size, overlap and how much tissue each must hold."""

    target_mpp: float = 0.5  # 0.5 um/px ~ 20x, 0.25 ~ 40x
    patch_size: int = 256  # pixels at target_mpp
    overlap: float = 0.0  # fraction of patch_size shared with the neighbour
    min_tissue: float = 0.5  # fraction of the tile inside the tissue mask
    max_ink: float = 0.05  # fraction of the tile under pen ink above which it is dropped
    tissue: TissueConfig = field(default_factory=TissueConfig)

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"target_mpp must be > 0, got {self.target_mpp}")
        if self.patch_size < 16:
            raise ValueError(f"patch_size must be >= 16 pixels, got {self.patch_size}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if not 0 <= self.min_tissue <= 1:
            raise ValueError(f"min_tissue must be in [0, 1], got {self.min_tissue}")


@dataclass(frozen=True)
class Grid:
    coords: np.ndarray  # [N, 2] int64 level-0 (x, y)
    tissue_fraction: np.ndarray  # [N] float32
    patch_size_level0: int
    patch_level: int


def segmentation_image(slide: Slide, seg_mpp: float, max_band_pixels: int = 1 << 25) -> tuple[np.ndarray, float]:
    """RGB image of the whole slide at about `seg_mpp` and its exact downsample from level 0.

    Reads the pyramid level just finer than needed and shrinks it with area averaging. A level too
    large to hold (a slide with no pyramid, 100k px a side) is read and shrunk in bands, so memory
    stays at `max_band_pixels` of the source level, whatever the slide's size.
    """
    want = max(1.0, seg_mpp / slide.mpp)
    level = slide.best_level(want)
    lw, lh = slide.level_dimensions[level]
    d = slide.level_downsamples[level]
    factor = want / d  # shrink of the read level
    w0, h0 = slide.dimensions
    w, h = max(1, int(round(w0 / want))), max(1, int(round(h0 / want)))
    if factor < 1.25:  # the level is already about right
        return slide.read_level(level), w0 / lw
    if lw * lh <= max_band_pixels:
        rgb = cv2.resize(slide.read_level(level), (w, h), interpolation=cv2.INTER_AREA)
        return rgb, w0 / w
    rows_per_band = max(1, int(max_band_pixels // lw / factor)) * factor  # whole output rows a band
    out = np.empty((h, w, 3), np.uint8)
    for oy in range(0, h, max(1, int(rows_per_band / factor))):
        oy1 = min(h, oy + max(1, int(rows_per_band / factor)))
        y0, y1 = int(round(oy * factor)), min(lh, int(round(oy1 * factor)))
        band = slide.read_rgb((0, int(round(y0 * d))), level, (lw, max(1, y1 - y0)))
        out[oy:oy1] = cv2.resize(band, (w, oy1 - oy), interpolation=cv2.INTER_AREA)
    return out, w0 / w


def tile_grid(mask: np.ndarray, mask_downsample: float, slide: Slide, config: TilingConfig,
              ink: np.ndarray | None = None) -> Grid:
    """Tiles of the grid whose tissue fraction (from `mask`) reaches `config.min_tissue` and whose
    ink fraction (from `ink`) stays at or below `config.max_ink`."""
    w0, h0 = slide.dimensions
    size0 = int(round(config.patch_size * config.target_mpp / slide.mpp))
    step = max(1, int(round(size0 * (1 - config.overlap))))
    xs = np.arange(0, w0 - size0 + 1, step)
    ys = np.arange(0, h0 - size0 + 1, step)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)

    frac = _box_fraction(mask, coords, size0, mask_downsample)
    keep = frac >= max(config.min_tissue, 1e-6)
    if ink is not None and ink.any():
        keep &= _box_fraction(ink, coords, size0, mask_downsample) <= config.max_ink
    level = slide.best_level(config.target_mpp / slide.mpp)
    return Grid(coords[keep], frac[keep], size0, level)


def _box_fraction(mask: np.ndarray, coords: np.ndarray, size0: int, downsample: float) -> np.ndarray:
    """Fraction [N] of each level-0 box (x, y, size0) covered by `mask`, via an integral image."""
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_32S).astype(np.int64)
    mh, mw = mask.shape
    x0 = np.clip(np.round(coords[:, 0] / downsample).astype(int), 0, mw)
    y0 = np.clip(np.round(coords[:, 1] / downsample).astype(int), 0, mh)
    x1 = np.clip(np.round((coords[:, 0] + size0) / downsample).astype(int), 0, mw)
    y1 = np.clip(np.round((coords[:, 1] + size0) / downsample).astype(int), 0, mh)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / np.maximum((x1 - x0) * (y1 - y0), 1)).astype(np.float32)


def tile_slide(
    slide_path: str | Path,
    slide_id: str,
    out_dir: str | Path,
    config: TilingConfig = TilingConfig(),
    *,
    mpp: float | None = None,
    force: bool = False,
) -> dict:
    """Tile one slide into `out_dir/<slide_id>.h5` (+ `.tissue.jpg` QC picture); skip if already done.

    Returns a summary dict (slide_id, n_tiles, outputs, inputs_hash, skipped). The inputs hash
    covers the slide's content fingerprint and every parameter, so a changed slide or setting
    is redone and an unchanged one is not.
    """
    out_dir = Path(out_dir)
    if not Path(slide_path).is_file():
        raise SlideReadError(slide_path, "file not found")
    h5_path = out_dir / f"{slide_id}.h5"
    qc_path = out_dir / f"{slide_id}{QC_SUFFIX}"
    inputs_hash = hash_config({"slide": file_fingerprint(slide_path), "config": asdict(config),
                               "mpp": mpp, "version": TILER_VERSION})
    if not force and h5_path.exists() and qc_path.exists():
        with h5py.File(h5_path, "r") as f:
            if f.attrs.get("inputs_hash") == inputs_hash:
                return {"slide_id": slide_id, "n_tiles": int(f["coords"].shape[0]), "skipped": True,
                        "inputs_hash": inputs_hash, "outputs": [str(h5_path), str(qc_path)]}

    clock = _PhaseClock()
    with open_slide(slide_path, mpp=mpp) as slide, _cv2_threads(1):
        seg_rgb, seg_downsample = segmentation_image(slide, config.tissue.seg_mpp)
        clock.lap("read")
        mask, ink = segment(seg_rgb, slide.mpp * seg_downsample, config.tissue)
        clock.lap("segment")
        grid = tile_grid(mask, seg_downsample, slide, config, ink)
        attrs = {
            "patch_size": config.patch_size,
            "patch_level": grid.patch_level,
            "patch_size_level0": grid.patch_size_level0,
            "target_mpp": config.target_mpp,
            "target_magnification": 10.0 / config.target_mpp,
            "level0_mpp": slide.mpp,
            "level0_magnification": 10.0 / slide.mpp,
            "mpp_source": slide.mpp_source,
            "level_dim": list(slide.dimensions),
            "downsample": slide.level_downsamples[grid.patch_level],
            "overlap": config.overlap,
            "min_tissue": config.min_tissue,
            "ink_area_mm2": float(ink.sum() * (slide.mpp * seg_downsample) ** 2 / 1e6),
            "tissue_area_mm2": float(mask.sum() * (slide.mpp * seg_downsample) ** 2 / 1e6),
            "vendor": slide.vendor,
            "name": slide_id,
            "inputs_hash": inputs_hash,
            "tiler_version": TILER_VERSION,
        }
        write_coords(h5_path, grid.coords, attrs, tissue_fraction=grid.tissue_fraction)
        clock.lap("grid")
        qc_rgb, qc_downsample = qc_image(slide, seg_rgb, seg_downsample)
        caption = QCCaption(slide_id, len(grid.coords), config.patch_size, config.target_mpp,
                            attrs["tissue_area_mm2"], attrs["ink_area_mm2"])
        write_qc_picture(qc_path, qc_picture(qc_rgb, slide.mpp * qc_downsample, mask, ink,
                                             grid.coords / qc_downsample, grid.patch_size_level0 / qc_downsample,
                                             caption))
        clock.lap("qc")
    (out_dir / f"{slide_id}{LEGACY_QC_SUFFIX}").unlink(missing_ok=True)  # a PNG picture of an earlier version
    return {"slide_id": slide_id, "n_tiles": int(len(grid.coords)), "skipped": False,
            "inputs_hash": inputs_hash, "outputs": [str(h5_path), str(qc_path)],
            "tissue_area_mm2": attrs["tissue_area_mm2"], "ink_area_mm2": attrs["ink_area_mm2"],
            "phase_seconds": clock.seconds}


class _PhaseClock:
    """Wall seconds of each phase of one slide's tiling (open + read, segment, grid + coords, QC picture):
    returned with the summary, so a benchmark or a slow slide shows where the time went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 4)
        self._last = now


_CV2_LOCK = threading.Lock()
_cv2_users = 0  # slides being tiled in this process right now
_cv2_before = 0  # OpenCV's thread count before the first of them


@contextmanager
def _cv2_threads(n: int) -> Iterator[None]:
    """OpenCV's own thread pool for the block. Slides are tiled one per task, several tasks at once: on a
    megapixel mask cv2's parallel loops cost more in contention than they gain (2-3x slower morphology
    on a loaded 2-core machine). The setting is process-wide, so it is counted: the first slide to start
    sets it and the last to finish restores it (saving and restoring around each slide let one thread
    restore the full pool while another was still tiling)."""
    global _cv2_users, _cv2_before
    with _CV2_LOCK:
        if _cv2_users == 0:
            _cv2_before = cv2.getNumThreads()
            cv2.setNumThreads(n)
        _cv2_users += 1
    try:
        yield
    finally:
        with _CV2_LOCK:
            _cv2_users -= 1
            if _cv2_users == 0:
                cv2.setNumThreads(_cv2_before)


def write_coords(path: Path, coords: np.ndarray, attrs: dict, **extra: np.ndarray) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        for k, v in attrs.items():
            ds.attrs[k] = v
            f.attrs[k] = v
        for name, arr in extra.items():
            f.create_dataset(name, data=arr)


def read_coords(path: str | Path) -> tuple[np.ndarray, dict]:
    """(coords [N, 2] int64, attrs) from a tiles `.h5` written by us, CLAM or TRIDENT."""
    with h5py.File(path, "r") as f:
        coords = f["coords"][:].astype(np.int64)
        attrs = {**dict(f.attrs), **dict(f["coords"].attrs)}
    return coords, attrs


def qc_image(slide: Slide, seg_rgb: np.ndarray, seg_downsample: float) -> tuple[np.ndarray, float]:
    """The slide at about QC_LONG_SIDE px on its long side and its downsample from level 0: the
    segmentation image when it is at least two thirds as large (big slides: enlarged at most 1.5x, the
    outlines are drawn at full size anyway), else a finer read of the pyramid (a second read that costs
    about as much as the segmentation)."""
    if max(seg_rgb.shape[:2]) * 3 >= QC_LONG_SIDE * 2:
        return seg_rgb, seg_downsample
    return segmentation_image(slide, max(slide.dimensions) * slide.mpp / QC_LONG_SIDE)
