"""Slide reading backends (MONAI-style: one small interface, one class per library).

`openslide` reads what scanners write (SVS, NDPI, MRXS, SCN, BIF, DICOM, generic tiled TIFF, ...).
`tifffile` reads pyramidal TIFFs openslide refuses (OME-TIFF with SubIFD pyramids, stripped or
unusually compressed TIFFs): it decodes only the tiles or strips a region touches, so a level of
100k px is never decoded whole. (MONAI's tifffile reader decodes whole levels and counts an SVS
thumbnail page as a level, hence our own.)
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

_BACKENDS: dict[str, Callable[[Path], SlideBackend]] = {}


class SlideBackend(ABC):
    """A pyramid of RGB levels; level 0 is the full resolution."""

    name: str = ""
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]

    @abstractmethod
    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3] of `size` (w, h) at `level`, top-left `location` in level-0 pixels.
        Outside the image is white."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample`."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample + 1e-6:
                best = i
        return best


def register_backend(name: str):
    def wrap(cls):
        _BACKENDS[name] = cls
        cls.name = name
        return cls

    return wrap


def available_backends() -> list[str]:
    return list(_BACKENDS)


def create_backend(name: str, path: Path) -> SlideBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown slide backend '{name}'; available: {', '.join(_BACKENDS)}")
    return _BACKENDS[name](path)


@register_backend("openslide")
class OpenSlideBackend(SlideBackend):
    def __init__(self, path: Path):
        import openslide

        self.handle = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple(self.handle.level_dimensions)
        self.level_downsamples = tuple(self.handle.level_downsamples)
        self.properties = dict(self.handle.properties)

    def read_rgb(self, location, level, size):
        rgba = np.asarray(self.handle.read_region(location, level, size))
        rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        if rgba[..., 3].min() == 0:  # outside the scanned area: white, not black
            rgb[rgba[..., 3] == 0] = 255
        return rgb

    def best_level(self, downsample: float) -> int:
        return self.handle.get_best_level_for_downsample(downsample + 1e-6)

    def close(self) -> None:
        self.handle.close()


@register_backend("tifffile")
class TiffFileBackend(SlideBackend):
    """Pyramidal or flat TIFF / OME-TIFF via tifffile, decoding only the segments a region needs."""

    def __init__(self, path: Path):
        import tifffile

        self.tif = tifffile.TiffFile(str(path))
        series = max(self.tif.series, key=lambda s: int(np.prod(s.shape[:2])) if len(s.shape) >= 2 else 0)
        pages = [level.keyframe for level in series.levels]
        self.pages = [p for p in pages if _is_rgb(p)]
        if not self.pages:
            raise ValueError(f"no RGB image in {path} (shapes {[p.shape for p in pages]})")
        w0 = self.pages[0].imagewidth
        self.level_dimensions = tuple((p.imagewidth, p.imagelength) for p in self.pages)
        self.level_downsamples = tuple(w0 / p.imagewidth for p in self.pages)
        self.properties = _tiff_properties(self.tif, self.pages[0])

    def read_rgb(self, location, level, size):
        page = self.pages[level]
        d = self.level_downsamples[level]
        x, y = int(round(location[0] / d)), int(round(location[1] / d))
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = page.imagelength, page.imagewidth
        th, tw = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, W)
        th, tw = min(th, H), min(tw, W)
        tiles_across = -(-W // tw)
        fh = self.tif.filehandle
        for ty in range(max(0, y // th), min(-(-H // th), -(-(y + h) // th))):
            for tx in range(max(0, x // tw), min(tiles_across, -(-(x + w) // tw))):
                index = ty * tiles_across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if count == 0:
                    continue
                fh.seek(offset)
                segment, _, _ = page.decode(fh.read(count), index, jpegtables=page.jpegtables)
                seg = np.asarray(segment).reshape(-1, tw, segment.shape[-1] if segment.ndim > 2 else 1)
                seg = seg[..., :3] if seg.shape[-1] >= 3 else np.repeat(seg, 3, -1)
                sy, sx = ty * th, tx * tw
                y0, y1 = max(y, sy), min(y + h, sy + seg.shape[0], H)
                x0, x1 = max(x, sx), min(x + w, sx + tw, W)
                if y1 > y0 and x1 > x0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = seg[y0 - sy : y1 - sy, x0 - sx : x1 - sx, :3]
        return out

    def close(self) -> None:
        self.tif.close()


def _is_rgb(page) -> bool:
    shape = page.shape
    return len(shape) == 3 and shape[-1] in (3, 4) and page.dtype == np.uint8


def _tiff_properties(tif, page) -> dict[str, str]:
    """openslide-style property names, so mpp resolution is one function for every backend."""
    props: dict[str, str] = {"openslide.vendor": "tifffile"}
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = {2: "inch", 3: "centimeter"}.get(int(tags["ResolutionUnit"].value), "none")
        if den:
            props["tiff.XResolution"] = str(num / den)
            props["tiff.ResolutionUnit"] = unit
    description = page.description or ""
    aperio = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if aperio:
        props["openslide.mpp-x"] = aperio.group(1)
    if tif.is_ome and tif.ome_metadata:
        size = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
        if size and factor:
            props["openslide.mpp-x"] = str(float(size.group(1)) * factor)
    power = re.search(r"AppMag\s*=\s*([0-9.]+)", description)
    if power:
        props["openslide.objective-power"] = power.group(1)
    return props
