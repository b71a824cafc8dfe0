"""Slide reading backends (MONAI-style: one small interface, one class per library).

`openslide` reads what scanners write (SVS, NDPI, MRXS, SCN, BIF, DICOM, generic tiled TIFF, ...).
`tiles` is openslide plus a fast path: where a pyramid level of an Aperio or generic TIFF slide is a
tiled TIFF page, a read decodes the stored tiles it touches directly (tifffile finds them,
imagecodecs decodes them with libjpeg-turbo), several times faster than openslide's per-call
overhead allows and with the same pixels; any other level, position or format goes to openslide.
`tifffile` reads pyramidal TIFFs openslide refuses (OME-TIFF with SubIFD pyramids, stripped or
unusually compressed TIFFs): it decodes only the tiles or strips a region touches, so a level of
100k px is never decoded whole. (MONAI's tifffile reader decodes whole levels and counts an SVS
thumbnail page as a level, hence our own.)
"""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
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


# Formats whose openslide levels are plain tiled TIFF pages (other TIFF-based formats overlap, offset or
# sparsify their tiles, which only openslide knows how to paint).
DIRECT_VENDORS = ("generic-tiff", "aperio")


@register_backend("tiles")
class StoredTilesBackend(OpenSlideBackend):
    """openslide, except that reads at a level stored as a tiled TIFF page decode its tiles directly."""

    def __init__(self, path: Path, cache_tiles: int = 64):
        super().__init__(path)
        self.direct: dict[int, StoredSegments] = {}
        self._tif = None
        if self.properties.get("openslide.vendor") not in DIRECT_VENDORS:
            return
        import tifffile

        try:
            self._tif = tifffile.TiffFile(str(path))
        except Exception:  # openslide reads it; the fast path is only an optimisation
            return
        self._fd = os.open(path, os.O_RDONLY)
        pages = {(p.imagewidth, p.imagelength): p for p in self._tif.pages
                 if p.is_tiled and _is_rgb(p) and p.planarconfig == 1}
        for level, dims in enumerate(self.level_dimensions):
            if dims in pages:
                self.direct[level] = StoredSegments(pages[dims], self._fd, cache_tiles)

    def read_rgb(self, location, level, size):
        segments = self.direct.get(level)
        d = self.level_downsamples[level]
        x, y = location[0] / d, location[1] / d
        if segments is None or x != int(x) or y != int(y):  # openslide interpolates fractional positions
            return super().read_rgb(location, level, size)
        return segments.read(int(x), int(y), size[0], size[1])

    def close(self) -> None:
        super().close()
        if self._tif is not None:
            self._tif.close()
            os.close(self._fd)
            self._tif = None


class StoredSegments:
    """Reads regions of one TIFF page by decoding only the tiles (or strips) they touch, with a small
    LRU cache of decoded tiles so neighbouring reads that share a tile decode it once. Thread-safe:
    file reads are positional (`os.pread`) and imagecodecs releases the GIL while it decodes."""

    def __init__(self, page, fd: int, cache_tiles: int = 64):
        self.page, self.fd = page, fd
        self.height, self.width = page.imagelength, page.imagewidth
        # Stored tiles keep their full size at the image's edges; strips are as wide as the image.
        self.th, self.tw = ((page.tilelength, page.tilewidth) if page.is_tiled
                            else (min(page.rowsperstrip, self.height), self.width))
        self.across = -(-self.width // self.tw)
        self.cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self.cache_tiles = cache_tiles
        self.lock = threading.Lock()

    def segment(self, index: int, keep: bool = True) -> np.ndarray | None:
        """Decoded tile `index` as RGB uint8 [th', tw, 3] (None for a tile never written); `keep` caches it.
        A cached array is shared: callers copy out of it, never write into it."""
        with self.lock:
            if index in self.cache:
                self.cache.move_to_end(index)
                return self.cache[index]
        page = self.page
        count = page.databytecounts[index]
        seg = None
        if count:
            data = os.pread(self.fd, count, page.dataoffsets[index])
            decoded = np.asarray(page.decode(data, index, jpegtables=page.jpegtables)[0])
            seg = decoded.reshape(-1, self.tw, decoded.shape[-1] if decoded.ndim > 2 else 1)
            seg = seg[..., :3] if seg.shape[-1] >= 3 else np.repeat(seg, 3, -1)
        if keep and self.cache_tiles:
            with self.lock:
                self.cache[index] = seg
                if len(self.cache) > self.cache_tiles:
                    self.cache.popitem(last=False)
        return seg

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 [h, w, 3] with top-left (x, y) in this page's pixels; white outside the image."""
        th, tw, H, W = self.th, self.tw, self.height, self.width
        ty0, tx0 = max(0, y // th), max(0, x // tw)
        ty1, tx1 = min(-(-H // th), -(-(y + h) // th)), min(self.across, -(-(x + w) // tw))
        if x % tw == 0 and y % th == 0 and (w, h) == (tw, th) and y + h <= H and x + w <= W:
            # Exactly one stored tile (a tile grid aligned with the file's): no neighbour will share it.
            index = ty0 * self.across + tx0
            cached = index in self.cache
            seg = self.segment(index, keep=False)
            if seg is not None and seg.shape[:2] == (h, w):
                return seg.copy() if cached else seg
        out = np.full((h, w, 3), 255, np.uint8)
        for ty in range(ty0, ty1):
            for tx in range(tx0, tx1):
                seg = self.segment(ty * self.across + tx)
                if seg is None:
                    continue
                sy, sx = ty * th, tx * tw
                y0, y1 = max(y, sy), min(y + h, sy + seg.shape[0], H)
                x0, x1 = max(x, sx), min(x + w, sx + tw, W)
                if y1 > y0 and x1 > x0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = seg[y0 - sy : y1 - sy, x0 - sx : x1 - sx]
        return out


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
        self._fd = os.open(path, os.O_RDONLY)
        self.segments = [StoredSegments(p, self._fd) for p in self.pages]

    def read_rgb(self, location, level, size):
        d = self.level_downsamples[level]
        x, y = int(round(location[0] / d)), int(round(location[1] / d))
        return self.segments[level].read(x, y, size[0], size[1])

    def close(self) -> None:
        self.tif.close()
        os.close(self._fd)


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
