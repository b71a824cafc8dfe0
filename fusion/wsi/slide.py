"""Open a whole-slide image with openslide and resolve its microns per pixel (mpp).

mpp is resolved in this order, and the source recorded, because every physical size downstream
(tile size at a target magnification, minimum tissue area) depends on it:
  1. the caller's explicit `mpp` (CLI `--mpp`), for slides whose metadata lies or is missing;
  2. openslide's `openslide.mpp-x` (vendor metadata, Aperio MPP, TIFF resolution in cm or inch);
  3. TIFF resolution tags that openslide exposes but did not convert;
  4. objective power (`openslide.objective-power`): mpp ~= 10 / power, a scanner-typical guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.errors import SlideReadError

_MPP_HINT = ("pass the slide's resolution explicitly, e.g. `--mpp 0.25` for a 40x scan or "
             "`--mpp 0.5` for 20x (microns per pixel at level 0)")


@dataclass
class Slide:
    """An open slide: the openslide handle plus its resolved level-0 mpp."""

    path: Path
    handle: object  # openslide.OpenSlide
    mpp: float
    mpp_source: str

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.handle.dimensions  # (width, height) at level 0

    @property
    def level_count(self) -> int:
        return self.handle.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.handle.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.handle.level_downsamples

    @property
    def vendor(self) -> str:
        return self.handle.properties.get("openslide.vendor", "unknown")

    def best_level(self, downsample: float) -> int:
        """The highest-resolution level not finer than needed (never upsample)."""
        return self.handle.get_best_level_for_downsample(downsample + 1e-6)

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3]; pixels outside the scanned area become white, not black."""
        try:
            rgba = np.asarray(self.handle.read_region(location, level, size))
        except Exception as e:  # openslide raises OpenSlideError on corrupt tiles
            raise SlideReadError(self.path, f"reading {size} at {location} level {level}: {e}") from e
        rgb = rgba[..., :3].copy()
        transparent = rgba[..., 3] == 0
        if transparent.any():
            rgb[transparent] = 255
        return rgb

    def read_level(self, level: int) -> np.ndarray:
        w, h = self.level_dimensions[level]
        return self.read_rgb((0, 0), level, (w, h))

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open `path` with openslide; raise `SlideReadError` naming the file and the reason."""
    import openslide

    path = Path(path)
    if not path.is_file():
        raise SlideReadError(path, "file not found")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideReadError(path, "format not supported by openslide (not a whole-slide image, "
                                   "or a format openslide cannot read)") from None
    except openslide.OpenSlideError as e:
        raise SlideReadError(path, f"file is corrupt or truncated: {e}") from None
    if mpp is not None:
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        return Slide(path, handle, float(mpp), "user")
    resolved, source = resolve_mpp(dict(handle.properties))
    if resolved is None:
        handle.close()
        raise SlideReadError(path, f"no resolution (mpp) in the slide's metadata; {_MPP_HINT}")
    return Slide(path, handle, resolved, source)


def resolve_mpp(props: dict[str, str]) -> tuple[float | None, str]:
    """(mpp, source) from openslide properties, or (None, '') when nothing usable exists."""
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        value = _positive_float(props.get(key))
        if value:
            return value, key
    res = _positive_float(props.get("tiff.XResolution"))
    unit = props.get("tiff.ResolutionUnit", "").lower()
    if res and unit in ("centimeter", "inch"):
        microns_per_unit = 1e4 if unit == "centimeter" else 25400.0
        return microns_per_unit / res, "tiff.XResolution"
    power = _positive_float(props.get("openslide.objective-power"))
    if power:
        return 10.0 / power, "openslide.objective-power"
    return None, ""


def _positive_float(value: str | None) -> float | None:
    try:
        f = float(value) if value is not None else None
    except ValueError:
        return None
    return f if f and np.isfinite(f) and f > 0 else None
