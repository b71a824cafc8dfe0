"""Whole-slide images: open, resolve physical resolution, find tissue, tile."""

from fusion.wsi.slide import Slide, open_slide
from fusion.wsi.tiling import TilingConfig, read_coords, tile_slide

__all__ = ["Slide", "open_slide", "TilingConfig", "tile_slide", "read_coords"]
