"""Tiling QC pictures: one per slide, and a contact sheet per cohort.

A slide's picture (`<slide_id>.tissue.jpg`) is the slide at 1,024 px on its long side with the
tissue outline, every kept tile, the pen ink that was cut away, and a legend band beneath (slide
id, tile count and size, tissue and ink areas, a scale bar). It is a JPEG (quality 90, colour at
full resolution so 1-px tile outlines keep their colour; CLAM writes its masks as JPEG too): a
slide's texture is photographic, so a PNG costs ~10x the encoding time (~45 ms against ~5, most of
a small slide's tiling time) and 3-4x the bytes on a contact sheet of thousands of slides. The
outline is yellow, a colour no slide-marking pen uses (their inks are black, blue, green and red),
so an outline is never taken for ink. The contact sheet (`qc.html` beside the pictures) shows every
slide's picture on one page, slides that failed or kept few tiles first.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np

from fusion.storage import atomic_path

QC_SUFFIX = ".tissue.jpg"  # RUN/tiles/<slide_id>.tissue.jpg
LEGACY_QC_SUFFIX = ".tissue.png"  # before the pictures were JPEG: removed when a slide is tiled again
QC_LONG_SIDE = 1024  # px: a slide's picture, large enough to judge an outline against the tissue
TISSUE_RGB = (255, 212, 0)  # yellow: no marking pen is yellow
HALO_RGB = (70, 50, 0)  # a dark brown rim keeps the yellow line visible on white glass
TILE_RGB = (0, 200, 255)  # cyan-blue outlines, a quarter of the tissue showing through
INK_HATCH_RGB = (255, 255, 255)  # white hatching over ink that was cut away (ink is dark)
LEGEND_PX = 64
MIN_WIDTH = 900  # legend text needs this much; narrower pictures are padded with white
FEW_TILES = 16  # the contact sheet flags slides that kept fewer tiles than this
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class QCCaption:
    """What the legend of a slide's picture says besides the colour keys."""

    slide_id: str
    n_tiles: int
    patch_size: int  # px at target_mpp
    target_mpp: float
    tissue_mm2: float
    ink_mm2: float


def qc_picture(rgb: np.ndarray, mpp: float, mask: np.ndarray, ink: np.ndarray | None, coords: np.ndarray,
               tile_size: float, caption: QCCaption) -> np.ndarray:
    """The QC picture [H, W, 3] uint8: `rgb` (the slide at `mpp` um/px) resized to QC_LONG_SIDE, the
    tissue `mask` and `ink` mask (any resolution covering the same slide) outlined and hatched, tiles
    (`coords` [N, 2] and `tile_size` in `rgb`'s pixels) outlined, and a legend band below."""
    h, w = rgb.shape[:2]
    scale = QC_LONG_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = _shrink(rgb, size)
    if len(coords):
        lines = _outlines(img.shape[:2], np.asarray(coords, float) * scale, tile_size * scale)
        img[lines] = (img[lines] // 4 + np.array(TILE_RGB, np.uint8) // 4 * 3)
    if ink is not None and ink.any():
        _hatch(img, _resize_mask(ink, size))
    contours, _ = cv2.findContours(_resize_mask(mask, size).astype(np.uint8), cv2.RETR_CCOMP,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, HALO_RGB, 5, cv2.LINE_AA)
    cv2.drawContours(img, contours, -1, TISSUE_RGB, 3, cv2.LINE_AA)
    return _with_legend(img, mpp / scale, caption)


def write_qc_picture(path: Path, picture: np.ndarray) -> None:
    """Write an RGB picture as JPEG (quality 90, no chroma subsampling), atomically."""
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 90,
                             cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    if not ok:
        raise ValueError(f"cannot encode the QC picture {path}")
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(jpeg.tobytes())


def _shrink(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`rgb` at `size` (w, h): halved by area averaging while at least twice too large (OpenCV's fast exact-2x
    path: 5 ms where a 1.95x INTER_AREA takes 27), then bilinear, which at a scale >= 1/2 reads every pixel."""
    while rgb.shape[1] >= 2 * size[0] and rgb.shape[0] >= 2 * size[1]:
        h, w = rgb.shape[0] // 2, rgb.shape[1] // 2
        rgb = cv2.resize(rgb[:2 * h, :2 * w], (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask at `size` (w, h), interpolated so its outline is smooth rather than blocky."""
    soft = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_LINEAR)
    return soft >= 128


def _hatch(img: np.ndarray, ink: np.ndarray, period: int = 8) -> None:
    """Diagonal white hatching over the ink mask (in place): the ink stays visible between the lines.
    Only the ink's bounding box is visited (pen marks cover a small part of a slide)."""
    x, y, w, h = cv2.boundingRect(ink.astype(np.uint8))
    if not w or not h:
        return
    lines = (np.arange(y, y + h)[:, None] + np.arange(x, x + w)[None, :]) % period < 2
    box = img[y:y + h, x:x + w]
    box[ink[y:y + h, x:x + w] & lines] = INK_HATCH_RGB


def _outlines(shape: tuple[int, int], xy: np.ndarray, size: float) -> np.ndarray:
    """Boolean image of every tile's 1-px outline, drawn by one `cv2.polylines` call (a Python loop of
    `cv2.rectangle` costs more than the whole segmentation on large slides; difference arrays cost
    ~25 ms whatever the tile count)."""
    h, w = shape
    x0, y0 = xy[:, 0].astype(np.int32), xy[:, 1].astype(np.int32)
    # a tile flush with the slide's right or bottom edge ends at w or h: drawn on the last pixel, not clipped away
    x1 = np.minimum(xy[:, 0] + size, w - 1).astype(np.int32)
    y1 = np.minimum(xy[:, 1] + size, h - 1).astype(np.int32)
    corners = np.stack([x0, y0, x1, y0, x1, y1, x0, y1], 1).reshape(-1, 4, 1, 2)
    drawn = np.zeros((h, w), np.uint8)
    cv2.polylines(drawn, list(corners), True, 1, 1, cv2.LINE_8)
    return drawn > 0


def _with_legend(img: np.ndarray, mpp: float, caption: QCCaption) -> np.ndarray:
    """`img` on a white canvas at least MIN_WIDTH wide, with the legend band below it."""
    h, w = img.shape[:2]
    width = max(w, MIN_WIDTH)
    canvas = np.full((h + LEGEND_PX, width, 3), 255, np.uint8)
    canvas[:h, :w] = img
    cv2.line(canvas, (0, h), (width, h), (200, 200, 200), 1)
    text = (f"{caption.slide_id}   {caption.n_tiles:,} tiles of {caption.patch_size} px at "
            f"{caption.target_mpp:.2f} um/px   tissue {caption.tissue_mm2:.2f} mm2   ink {caption.ink_mm2:.2f} mm2")
    _text(canvas, text, (10, h + 22), 0.55, 1)
    y = h + 48
    x = 10
    cv2.line(canvas, (x, y - 5), (x + 28, y - 5), HALO_RGB, 5, cv2.LINE_AA)
    cv2.line(canvas, (x, y - 5), (x + 28, y - 5), TISSUE_RGB, 3, cv2.LINE_AA)
    x = _text(canvas, "tissue outline", (x + 36, y), 0.5) + 24
    cv2.rectangle(canvas, (x, y - 14), (x + 16, y + 2), TILE_RGB, 1)
    x = _text(canvas, "tile kept", (x + 24, y), 0.5) + 24
    swatch = np.full((16, 28, 3), (45, 70, 165), np.uint8)
    _hatch(swatch, np.ones((16, 28), bool))
    canvas[y - 14 : y + 2, x : x + 28] = swatch
    x = _text(canvas, "pen ink, cut away", (x + 36, y), 0.5) + 24
    _scale_bar(canvas, mpp, x, y)
    return canvas


def _scale_bar(canvas: np.ndarray, mpp: float, x: int, y: int) -> None:
    """A round length (0.1, 0.2, 0.5, 1, 2, 5 or 10 mm) no longer than 160 px, drawn at (x, y)."""
    mm = next((m for m in (10, 5, 2, 1, 0.5, 0.2, 0.1) if m * 1000 / mpp <= 160), 0.1)
    px = max(1, round(mm * 1000 / mpp))
    cv2.rectangle(canvas, (x, y - 8), (x + px, y - 3), (0, 0, 0), -1)
    _text(canvas, f"{mm:g} mm", (x + px + 8, y), 0.5)


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float, thickness: int = 1) -> int:
    """Draw `text` with its baseline at `org`; return the x where it ends."""
    cv2.putText(canvas, text, org, FONT, scale, (30, 30, 30), thickness, cv2.LINE_AA)
    return org[0] + cv2.getTextSize(text, FONT, scale, thickness)[0][0]


# --- The contact sheet: every slide's picture on one page -------------------------------------------------------

SHEET = "qc.html"


def write_contact_sheet(tiles_dir: str | Path, slides: Sequence[Mapping], table=None) -> Path:
    """`tiles_dir/qc.html`: one card per slide (its QC picture, tiles kept, tissue and ink areas),
    failed slides and slides with fewer than FEW_TILES tiles first; returns its path.

    `slides` are the tile stage's results (`slide_id`, `status`, and `error` when failed); `table`,
    the cohort's slides table (columns `slide_id`, `patient_id`), names each slide's patient. The
    pictures are linked, not embedded: the page stays small for any cohort and is opened beside them
    (directly or through `fusion ui`'s file server).
    """
    tiles_dir = Path(tiles_dir)
    patients = {} if table is None else {str(k): str(v) for k, v in zip(table.slide_id, table.patient_id, strict=True)}
    cards = [_card_data(tiles_dir, s, patients.get(str(s["slide_id"]))) for s in slides]
    cards.sort(key=lambda c: (c["rank"], c["order"]))
    for i, c in enumerate(cards):
        c["order"] = i
    failed = sum(c["rank"] == 0 for c in cards)
    few = sum(c["rank"] == 1 for c in cards)
    inked = sum(c["ink_mm2"] > 0 for c in cards)
    tiles = sum(c["n_tiles"] for c in cards)
    folder = html.escape(str(tiles_dir.resolve()))
    body = "\n".join(_card_html(c) for c in cards)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tiling QC: {folder}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #f4f4f4; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
.summary {{ margin: 0 0 12px; }}
.key span {{ display: inline-block; margin-right: 18px; }}
.sheet {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 10px; }}
.card {{ background: #fff; border: 1px solid #ccc; border-radius: 4px; padding: 6px; }}
.card img {{ width: 100%; height: auto; display: block; }}
.card.failed {{ border: 2px solid #c0392b; }}
.card.few {{ border: 2px solid #e67e22; }}
.id {{ font-weight: 600; }}
.flag {{ color: #c0392b; font-weight: 600; }}
.error {{ color: #c0392b; font-family: monospace; font-size: 12px; word-break: break-word; }}
</style></head><body>
<h1>Tiling QC</h1>
<p class="summary"><code>{folder}</code><br>{len(cards)} slides, {tiles:,} tiles; {failed} failed,
{few} with fewer than {FEW_TILES} tiles, {inked} with pen ink. Click a picture for full size.</p>
<p class="key"><span><b style="color:#d4a800">yellow line</b>: tissue outline</span>
<span><b style="color:#00a0d0">thin blue-cyan squares</b>: tiles kept</span>
<span><b>white hatching</b>: pen ink cut away</span><span>problems first: failed, then few tiles</span></p>
<div class="sheet">
{body}
</div></body></html>
"""
    path = tiles_dir / SHEET
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _card_data(tiles_dir: Path, result: Mapping, patient: str | None) -> dict:
    sid = str(result["slide_id"])
    card = {"slide_id": sid, "patient": patient, "status": result.get("status", "done"),
            "error": result.get("error"), "n_tiles": int(result.get("n_tiles") or 0), "tissue_mm2": None,
            "ink_mm2": 0.0, "picture": None, "order": 0}
    h5 = tiles_dir / f"{sid}.h5"
    if card["status"] == "done" and "tissue_area_mm2" in result and "ink_area_mm2" in result:
        card["tissue_mm2"], card["ink_mm2"] = float(result["tissue_area_mm2"]), float(result["ink_area_mm2"])
    elif card["status"] != "failed" and h5.exists():  # tiled by an earlier run: its .h5 says
        with h5py.File(h5, "r") as f:
            card["n_tiles"] = int(f["coords"].shape[0])
            card["tissue_mm2"] = float(f.attrs.get("tissue_area_mm2", np.nan))
            card["ink_mm2"] = float(f.attrs.get("ink_area_mm2", 0.0))
    if card["status"] != "failed" and (tiles_dir / f"{sid}{QC_SUFFIX}").exists():
        card["picture"] = f"{sid}{QC_SUFFIX}"
    card["rank"] = 0 if card["status"] == "failed" else 1 if card["n_tiles"] < FEW_TILES else 2
    return card


def _card_html(c: dict) -> str:
    sid = html.escape(c["slide_id"])
    who = f" · patient {html.escape(c['patient'])}" if c["patient"] else ""
    if c["rank"] == 0:
        return (f'<div class="card failed" id="{sid}"><div class="id">{sid}{who}</div>'
                f'<div class="flag">failed</div><div class="error">{html.escape(str(c["error"]))}</div></div>')
    src = html.escape(c["picture"] or "")
    img = (f'<a href="{src}"><img src="{src}" loading="lazy" alt="QC picture of {sid}"></a>' if src
           else '<div class="flag">no QC picture</div>')
    few = f' <span class="flag">fewer than {FEW_TILES} tiles</span>' if c["rank"] == 1 else ""
    tissue = "" if c["tissue_mm2"] is None else f", tissue {c['tissue_mm2']:.2f} mm²"
    ink = f", ink {c['ink_mm2']:.2f} mm²" if c["ink_mm2"] > 0 else ""
    klass = "card few" if c["rank"] == 1 else "card"
    return (f'<div class="{klass}" id="{sid}"><div class="id">{sid}{who}</div>{img}'
            f'<div>{c["n_tiles"]:,} tiles{tissue}{ink}{few}</div></div>')
