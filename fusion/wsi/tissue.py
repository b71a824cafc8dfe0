"""Tissue segmentation on a low-resolution level: saturation + Otsu, blur, closing, area filter.

H&E tissue is saturated (pink/purple) while glass is grey-white, so the saturation channel
separates them far more robustly than brightness. Holes (fat, lumina) are kept as holes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class TissueConfig:
    """Parameters of tissue detection; areas are physical (um^2) so they hold at any level."""

    seg_mpp: float = 8.0  # resolution at which tissue is segmented
    blur_um: float = 24.0  # median blur size
    close_um: float = 64.0  # morphological closing size
    min_saturation: int = 12  # Otsu threshold is never below this (0..255)
    max_saturation_threshold: int = 40  # ... nor above this: pale tissue is still tissue
    max_white: int = 235  # pixels brighter than this in all channels are glass
    min_tissue_area_um2: float = 0.05e6  # drop tissue pieces smaller than ~0.22 x 0.22 mm
    min_hole_area_um2: float = 0.05e6  # fill holes smaller than this


def tissue_mask(rgb: np.ndarray, mpp: float, config: TissueConfig = TissueConfig()) -> np.ndarray:
    """Boolean tissue mask [h, w] of an RGB uint8 image [h, w, 3] whose pixels are `mpp` um."""
    px = lambda um: max(1, int(round(um / mpp)))  # noqa: E731 - microns to pixels at this level
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], _odd(px(config.blur_um)))
    not_white = (rgb < config.max_white).any(-1)
    if not not_white.any():
        return np.zeros(rgb.shape[:2], bool)
    # Otsu over the whole image splits glass from tissue; the clamp keeps it from splitting two
    # kinds of tissue when there is almost no glass, or from taking glass noise when there is no tissue.
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = min(max(otsu, config.min_saturation), config.max_saturation_threshold)
    mask = ((sat > threshold) & not_white).astype(np.uint8)
    k = _odd(px(config.close_um))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return _filter_areas(mask, config.min_tissue_area_um2 / mpp**2, config.min_hole_area_um2 / mpp**2)


def _filter_areas(mask: np.ndarray, min_tissue_px: float, min_hole_px: float) -> np.ndarray:
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(mask)
    if hierarchy is None:
        return out.astype(bool)
    hierarchy = hierarchy[0]
    for i, c in enumerate(contours):
        if hierarchy[i][3] != -1 or cv2.contourArea(c) < min_tissue_px:
            continue  # a hole, or a speck
        cv2.drawContours(out, contours, i, 1, thickness=cv2.FILLED)
        child = hierarchy[i][2]
        while child != -1:  # keep the holes that are large enough to be real
            if cv2.contourArea(contours[child]) >= min_hole_px:
                cv2.drawContours(out, contours, child, 0, thickness=cv2.FILLED)
            child = hierarchy[child][0]
    return out.astype(bool)


def _odd(n: int) -> int:
    return n if n % 2 else n + 1
