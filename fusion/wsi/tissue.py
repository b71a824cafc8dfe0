"""Tissue segmentation on a low-resolution image of the slide (about 8 um/px).

A pixel is tissue when it is stained (HSV saturation above a clamped Otsu threshold) or when it
absorbs light relative to the slide's own glass (optical density above a floor): the second test
keeps pale tissue such as fat, whose thin eosin membranes barely saturate at low resolution.
Pen ink (blue, green: hues H&E never has; black: dark and unsaturated) is removed first, then
closing joins the tissue, small specks (dust, debris) are dropped and small holes are filled.
All sizes are physical (um, um^2), so one setting holds at any magnification.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np


@dataclass(frozen=True)
class TissueConfig:
    """Every parameter of tissue detection; `preset(name)` gives tuned sets."""

    seg_mpp: float = 8.0  # resolution at which tissue is segmented, um/px
    blur_um: float = 24.0  # median blur before thresholds
    close_um: float = 48.0  # morphological closing: joins tissue split by thin gaps
    min_saturation: int = 12  # Otsu threshold on saturation (0..255) never below this ...
    max_saturation_threshold: int = 40  # ... nor above this: pale tissue is still tissue
    min_density: float = 0.04  # optical density above the glass that counts as tissue (0 = off)
    min_tissue_area_um2: float = 0.01e6  # drop pieces smaller than this (0.1 x 0.1 mm): dust, debris
    min_hole_area_um2: float = 0.02e6  # fill holes smaller than this
    remove_pen: bool = True
    pen_margin_um: float = 16.0  # ink edges bleed: tissue this close to ink is dropped
    max_white: int = 235  # unused: glass is what is neither stained nor denser than the glass (kept: configs set it)


PRESETS: dict[str, TissueConfig] = {
    # Large sections with fat and pale stroma: keep pale tissue, fill small holes.
    "resection": TissueConfig(),
    # Needle biopsies: thin, small pieces; keep small fragments, close less.
    "biopsy": TissueConfig(close_um=24.0, min_tissue_area_um2=0.002e6, min_hole_area_um2=0.005e6),
    # Dirty or uneven glass: trust stain saturation only.
    "strict": TissueConfig(min_density=0.0, min_saturation=20),
}


def preset(name: str, **overrides) -> TissueConfig:
    """A named preset with any field overridden, e.g. `preset("biopsy", close_um=32)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown tissue preset '{name}'; available: {', '.join(PRESETS)}")
    try:
        return replace(PRESETS[name], **overrides)
    except TypeError as e:
        raise ValueError(f"bad tissue parameter: {e}") from None


def tissue_mask(rgb: np.ndarray, mpp: float, config: TissueConfig = TissueConfig()) -> np.ndarray:
    """Boolean tissue mask [h, w] of an RGB uint8 image [h, w, 3] whose pixels are `mpp` um."""
    return segment(rgb, mpp, config)[0]


def segment(rgb: np.ndarray, mpp: float, config: TissueConfig = TissueConfig()) -> tuple[np.ndarray, np.ndarray]:
    """(tissue mask, ink mask), both boolean [h, w]. Tissue within `pen_margin_um` of ink is
    dropped from the mask; the ink mask itself is not grown (tiles measure their ink with it)."""
    px = lambda um: max(1, int(round(um / mpp)))  # noqa: E731 - microns to pixels at this level
    smooth = cv2.medianBlur(rgb, _odd(px(config.blur_um)))
    hsv = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1]

    ink = pen_mask(hsv) if config.remove_pen else np.zeros(rgb.shape[:2], bool)
    near_ink = None
    if ink.any():
        k = _odd(2 * px(config.pen_margin_um) + 1)
        near_ink = cv2.dilate(ink.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0

    # Glass needs no test of its own: it is neither stained nor denser than the glass colour.
    otsu, _ = cv2.threshold(sat if near_ink is None else sat[~near_ink].reshape(-1, 1), 0, 255,
                            cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = min(max(otsu, config.min_saturation), config.max_saturation_threshold)
    stained = cv2.compare(sat, threshold, cv2.CMP_GT)  # uint8 0/255: cv2's masks, no bool round trips
    if config.min_density > 0:
        # max_c log(glass_c / pixel_c) > d  <=>  some channel below glass_c * exp(-d): no log, no float image.
        # cv2.inRange is an all-channels test, so "some channel below the floor" is its complement.
        floor = np.ceil(glass_colour(smooth, sat) * np.exp(-config.min_density)).clip(0, 255)
        pale = cv2.bitwise_not(cv2.inRange(smooth, tuple(float(f) for f in floor), (255, 255, 255)))
        # A low density floor also catches the one-pixel rim where stained tissue blends into glass;
        # an opening keeps pale regions (fat) and drops that rim, so borders are not pushed outwards.
        pale = cv2.morphologyEx(cv2.bitwise_and(pale, cv2.bitwise_not(stained)), cv2.MORPH_OPEN,
                                np.ones((3, 3), np.uint8))
        stained = cv2.bitwise_or(stained, pale)
    mask = (stained > 0).view(np.uint8)
    if near_ink is not None:
        mask[near_ink] = 0

    k = _odd(px(config.close_um))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    if near_ink is not None:
        mask[near_ink] = 0
    mask = _filter_areas(mask, config.min_tissue_area_um2 / mpp**2, config.min_hole_area_um2 / mpp**2)
    return mask, ink


def pen_mask(hsv: np.ndarray) -> np.ndarray:
    """Ink in an HSV uint8 image: blue/green hues (OpenCV hue 35..121, i.e. 70-242 degrees; H&E lies
    in 250-360 and 0-30) with real colour, or black (dark and grey). Haematoxylin's darkest purple
    sits at ~255 degrees."""
    coloured = cv2.inRange(hsv, (35, 61, 0), (121, 255, 219))
    black = cv2.inRange(hsv, (0, 0, 0), (180, 89, 79))
    return (coloured | black) > 0


def glass_colour(rgb: np.ndarray, sat: np.ndarray) -> np.ndarray:
    """RGB of the bare glass: median of bright, unsaturated pixels (white if there are too few)."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 60_000)))  # a sample is enough for a median
    rgb, sat = rgb[::step, ::step], sat[::step, ::step]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    candidates = (sat < 20) & (grey > 200)
    if candidates.sum() < 0.01 * candidates.size:
        return np.array([245.0, 245.0, 245.0], np.float32)
    return np.median(rgb[candidates], axis=0).astype(np.float32)


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
