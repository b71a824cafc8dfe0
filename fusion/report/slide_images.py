"""Slide pictures for a report: a thumbnail with the model's attention laid over the tiles it
looked at, and the top attended tiles at their working resolution. PNG/JPEG bytes, made with
OpenCV (no matplotlib figure per slide: reports for a whole cohort must be quick)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from matplotlib import colormaps

from fusion.wsi import open_slide

_CMAP = colormaps["inferno"]


def thumbnail(slide, max_side: int) -> tuple[np.ndarray, float]:
    """RGB thumbnail no wider/taller than `max_side`, and level-0 pixels per thumbnail pixel."""
    w0, h0 = slide.dimensions
    scale = max(w0, h0) / max_side
    level = slide.best_level(scale)
    rgb = slide.read_level(level)
    out_w, out_h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
    return cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA), scale


def attention_overlay(rgb: np.ndarray, scale: float, coords: np.ndarray, size0: float, attention: np.ndarray,
                      alpha: float = 0.55) -> np.ndarray:
    """Tiles coloured by their attention rank within the patient (inferno: dark = little, bright = most)."""
    out = rgb.copy()
    if not len(coords):
        return out
    rank = np.argsort(np.argsort(attention)) / max(1, len(attention) - 1)
    heat = np.zeros(rgb.shape[:2], np.float32)
    covered = np.zeros(rgb.shape[:2], bool)
    side = max(1, int(round(size0 / scale)))
    for (x, y), r in zip(np.asarray(coords) / scale, rank, strict=True):
        x0, y0 = int(x), int(y)
        heat[y0:y0 + side, x0:x0 + side] = np.maximum(heat[y0:y0 + side, x0:x0 + side], r)
        covered[y0:y0 + side, x0:x0 + side] = True
    colour = (_CMAP(heat)[..., :3] * 255).astype(np.float32)
    out[covered] = ((1 - alpha) * rgb[covered] + alpha * colour[covered]).astype(np.uint8)
    return out


def top_tiles(slide, coords: np.ndarray, size0: int, order: np.ndarray, out_px: int = 160) -> list[np.ndarray]:
    """The tiles at `order` (indices into coords), read at the level nearest their working size."""
    downsample = size0 / out_px
    level = slide.best_level(downsample)
    d = slide.level_downsamples[level]
    side = max(1, int(round(size0 / d)))
    tiles = []
    for i in order:
        x, y = (int(v) for v in coords[i])
        rgb = slide.read_rgb((x, y), level, (side, side))
        tiles.append(cv2.resize(rgb, (out_px, out_px), interpolation=cv2.INTER_AREA))
    return tiles


def encode(rgb: np.ndarray, fmt: str = ".png", quality: int = 85) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"could not encode an image as {fmt}")
    return buf.tobytes()


def slide_pictures(path: str | Path, coords: np.ndarray, size0: float, attention: np.ndarray, n_top: int,
                   max_side: int = 640, mpp: float | None = None) -> dict:
    """{'heatmap': PNG bytes, 'tiles': [(JPEG bytes, attention)], 'size': (w, h)} for one slide."""
    with open_slide(path, mpp=mpp) as slide:
        rgb, scale = thumbnail(slide, max_side)
        overlay = attention_overlay(rgb, scale, coords, size0, attention)
        order = np.argsort(-attention)[:n_top] if len(attention) else np.zeros(0, int)
        tiles = top_tiles(slide, coords, int(round(size0)), order) if len(order) else []
    return {"heatmap": encode(overlay, ".jpg", 88), "thumbnail_size": rgb.shape[1::-1],
            "tiles": [(encode(t, ".jpg"), float(attention[i]), i) for t, i in zip(tiles, order, strict=True)]}
