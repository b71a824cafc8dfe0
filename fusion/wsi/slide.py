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
from fusion.wsi.backends import SlideBackend, create_backend

_MPP_HINT = ("pass the slide's resolution explicitly, e.g. `--mpp 0.25` for a 40x scan or "
             "`--mpp 0.5` for 20x (microns per pixel at level 0)")


@dataclass
class Slide:
    """An open slide: a reading backend plus its resolved level-0 mpp."""

    path: Path
    backend: SlideBackend
    mpp: float
    mpp_source: str

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.backend.level_dimensions[0]  # (width, height) at level 0

    @property
    def level_count(self) -> int:
        return len(self.backend.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.backend.level_downsamples

    @property
    def properties(self) -> dict[str, str]:
        return self.backend.properties

    @property
    def vendor(self) -> str:
        return self.backend.properties.get("openslide.vendor", "unknown")

    def best_level(self, downsample: float) -> int:
        """The highest-resolution level not finer than needed (never upsample)."""
        return self.backend.best_level(downsample)

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3]; pixels outside the scanned area are white, not black."""
        try:
            return self.backend.read_rgb(location, level, size)
        except Exception as e:  # a corrupt tile surfaces here, whatever the backend
            raise SlideReadError(self.path, f"reading {size} at {location} level {level}: {e}") from e

    def read_level(self, level: int) -> np.ndarray:
        w, h = self.level_dimensions[level]
        return self.read_rgb((0, 0), level, (w, h))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path: str | Path, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open `path`; raise `SlideReadError` naming the file and the reason.

    With `backend="auto"`, openslide first, with stored tiles decoded directly where the file allows
    (backend `tiles`); a TIFF that openslide refuses is retried with tifffile. `backend="openslide"`
    forces openslide for every read.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideReadError(path, "file not found")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    reader = _open_backend(path, backend)
    if mpp is not None:
        return Slide(path, reader, float(mpp), "user")
    resolved, source = resolve_mpp(reader.properties)
    if resolved is None:
        reader.close()
        raise SlideReadError(path, f"no resolution (mpp) in the slide's metadata; {_MPP_HINT}")
    return Slide(path, reader, resolved, source)


def _open_backend(path: Path, backend: str) -> SlideBackend:
    if backend != "auto":
        try:
            return create_backend(backend, path)
        except ValueError:
            raise
        except Exception as e:
            raise SlideReadError(path, f"{backend} cannot open it: {e}") from None
    try:
        reader = create_backend("tiles", path)
        if not _is_ome(reader):
            return reader
        # openslide reads an OME-TIFF as a flat generic TIFF: no SubIFD pyramid, no OME resolution.
        reader.close()
        first = "OME-TIFF"
    except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError
        first = _openslide_reason(e)
    if not _looks_like_tiff(path):
        raise SlideReadError(path, first)
    try:
        reader = create_backend("tifffile", path)
    except Exception as e:
        raise SlideReadError(path, f"{first}; tifffile cannot read it either: {e}") from None
    try:
        reader.read_rgb((0, 0), len(reader.level_dimensions) - 1, (1, 1))  # can it decode at all?
        return reader
    except Exception as e:
        reader.close()
        raise SlideReadError(path, f"{first}; tifffile cannot read it either: {e}") from None


def _is_ome(reader: SlideBackend) -> bool:
    props = reader.properties
    return props.get("openslide.vendor") == "generic-tiff" and "<OME" in props.get("tiff.ImageDescription", "")


def _openslide_reason(e: Exception) -> str:
    import openslide

    if isinstance(e, openslide.OpenSlideUnsupportedFormatError):
        return "format not supported by openslide (not a whole-slide image, or a format openslide cannot read)"
    return f"file is corrupt, truncated or unsupported: {e}"


def _looks_like_tiff(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


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
