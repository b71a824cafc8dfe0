"""Tiling against its limit, reading the segmentation level, and against the ground truth.

For synthetic slides with pen ink and debris (a 40x 24k x 18k px slide as in issue 17, a 20x
32k x 24k px one), side by side in each round, each in a fresh process:
  read     open the slide with openslide and read the pyramid level the tiler segments (~8 um/px):
           the floor any tiler pays;
  tiling   `tile_slide`: open, read, tissue mask, grid, ink check, coords .h5, QC picture.
Ratios are taken within a round and the median over rounds is reported, so a load that other jobs put
on the machine affects both sides alike. The tiles are then scored against the slide's ground-truth
label map on the same grid: a tile is truly tissue when >= 50 % of it is tissue and <= 5 % pen ink.
  recall     truly-tissue tiles kept / truly-tissue tiles        (target >= 0.95)
  precision  kept tiles that are truly tissue / kept tiles      (target >= 0.97)
  ink tiles  kept tiles with > 5 % pen ink                      (target 0)
hs2p and lazyslide tile the same slide at 0.5 um/px, 256 px, with their defaults, when a venv for them
exists (they pin libraries of their own, so not in ours): `python3.11 -m venv benchmarks/out/venv-tilers &&
benchmarks/out/venv-tilers/bin/pip install hs2p lazyslide openslide-bin` (or FUSION_TILERS_PYTHON=...).
Their grids are anchored elsewhere, so their tiles are scored box by box: precision and ink tiles as
above, recall as their truly-tissue tiles over the truly-tissue tiles of our grid (approximate).

    python benchmarks/tiling.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import baseline_arg, load_average, make_slide, median, run_isolated, write_results  # noqa: E402

SLIDES = {"40x-24k": (24_000, 0.25), "20x-32k": (32_000, 0.5)}
QUICK = {"40x-12k": (12_000, 0.25)}
TARGET_RATIO, TARGET_RECALL, TARGET_PRECISION = 1.2, 0.95, 0.97

READ = """
import json, time
import openslide
t = time.perf_counter()
s = openslide.OpenSlide({path!r})
want = 8.0 / float(s.properties["openslide.mpp-x"])
level = s.get_best_level_for_downsample(want + 1e-6)
s.read_region((0, 0), level, s.level_dimensions[level])
print(json.dumps({{"seconds": time.perf_counter() - t, "level": level}}))
"""

TILE = """
import json, time
import h5py, openslide, tifffile  # what tile_slide imports on first use: imports are excluded on both sides
from fusion.wsi import tile_slide, TilingConfig
t = time.perf_counter()
r = tile_slide({path!r}, "bench", {out!r}, TilingConfig(target_mpp=0.5, patch_size=256), force=True)
phases = r.get("phase_seconds", {{}})  # the code before issue 17 (--baseline) did not time its phases
print(json.dumps({{"seconds": time.perf_counter() - t, "n_tiles": r["n_tiles"], "phases": phases}}))
"""

# Other tilers, each in its own process of the tilers' venv; each prints seconds and its tiles' level-0 boxes.
TILERS_PYTHON = os.environ.get("FUSION_TILERS_PYTHON", str(Path(__file__).resolve().parent / "out" / "venv-tilers"
                                                          / "bin" / "python"))
OTHERS = {
    "hs2p": """
import json, time
from pathlib import Path
import hs2p
t = time.perf_counter()
r = hs2p.tile_slide(hs2p.SlideSpec(sample_id="b", image_path=Path({path!r})),
                    tiling=hs2p.TilingConfig(requested_spacing_um=0.5, requested_tile_size_px=256, tolerance=0.05,
                                             overlap=0.0), segmentation=hs2p.SegmentationConfig(method="hsv"))
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "x": r.tiles.x.tolist(), "y": r.tiles.y.tolist(),
                  "size0": int(r.tiles.tile_size_lv0)}}))
""",
    "lazyslide": """
import json, time, warnings
warnings.filterwarnings("ignore")
import lazyslide as zs
from wsidata import open_wsi
t = time.perf_counter()
wsi = open_wsi({path!r})
zs.pp.find_tissues(wsi)
zs.pp.tile_tissues(wsi, 256, mpp=0.5)
seconds = time.perf_counter() - t
b = wsi["tiles"].geometry.bounds
print(json.dumps({{"seconds": seconds, "x": b.minx.astype(int).tolist(), "y": b.miny.astype(int).tolist(),
                  "size0": int(round((b.maxx - b.minx).iloc[0]))}}))
""",
}


def truth_fractions(labels_path: Path, boxes: np.ndarray, size0: int) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, pen) fraction [N] of each level-0 box (x, y, size0 px) in the ground-truth label map
    (0 glass, 1..5 tissue, 6 pen, 7 debris; one label pixel = LABEL_PX level-0 px)."""
    import cv2

    from fusion.synth import LABEL_PX, PEN

    labels = cv2.imread(str(labels_path), cv2.IMREAD_UNCHANGED)
    h, w = labels.shape

    def fraction(mask: np.ndarray) -> np.ndarray:
        integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_32S).astype(np.int64)
        x0, y0 = (np.clip(boxes[:, i] // LABEL_PX, 0, n) for i, n in ((0, w), (1, h)))
        x1, y1 = (np.clip((boxes[:, i] + size0) // LABEL_PX, 0, n) for i, n in ((0, w), (1, h)))
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return inside / np.maximum((x1 - x0) * (y1 - y0), 1)

    return fraction((labels >= 1) & (labels <= 5)), fraction(labels == PEN)


def truth_scores(labels_path: Path, coords: np.ndarray, size0: int, level_dim: tuple[int, int],
                 same_grid: bool = True) -> dict:
    """Recall, precision and ink tiles of tiles `coords` (level-0 top-left, `size0` px) against the truth.
    A tile is truly tissue with >= 50 % tissue and <= 5 % pen. `same_grid`: the tiles lie on our grid, so
    recall is exact; otherwise it is the count of truly-tissue tiles over that of our grid."""
    w, h = level_dim
    xs, ys = np.meshgrid(np.arange(0, w - size0 + 1, size0), np.arange(0, h - size0 + 1, size0))
    grid = np.stack([xs.ravel(), ys.ravel()], 1)
    tissue, pen = truth_fractions(labels_path, grid, size0)
    truth = {tuple(c) for c in grid[(tissue >= 0.5) & (pen <= 0.05)]}
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    tissue, pen = truth_fractions(labels_path, coords, size0) if len(coords) else (np.zeros(0), np.zeros(0))
    good = (tissue >= 0.5) & (pen <= 0.05)
    hit = len(truth & {tuple(c) for c in coords}) if same_grid else int(good.sum())
    precision = float(good.mean()) if len(coords) else 0.0
    return {"truth tiles": len(truth), "recall": hit / max(len(truth), 1), "precision": precision,
            "ink tiles": int((pen > 0.05).sum())}


def other_tilers(path: Path, level_dim: tuple[int, int]) -> list[dict]:
    """Rows for hs2p and lazyslide on `path` (or why they did not run)."""
    rows = []
    for name, code in OTHERS.items():
        if not Path(TILERS_PYTHON).exists():
            rows.append({"tiler": name, "note": "not installed (see the docstring)"})
            continue
        try:
            r = run_isolated(code.format(path=str(path)), python=TILERS_PYTHON)
        except RuntimeError as e:
            rows.append({"tiler": name, "note": f"failed: {str(e).strip().splitlines()[-1][:100]}"})
            continue
        coords = np.stack([r["x"], r["y"]], 1) if r["x"] else np.zeros((0, 2), np.int64)
        scores = truth_scores(path.with_suffix(".labels.png"), coords, r["size0"], level_dim, same_grid=False)
        rows.append({"tiler": name, "seconds": r["seconds"], "tiles": len(coords), **scores})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smaller slide (for a fast check)")
    parser.add_argument("--repeats", type=int, default=5)
    baseline_arg(parser)
    args = parser.parse_args()
    from fusion.wsi import read_coords

    rows, others = [], []
    for name, (px, mpp) in (QUICK if args.quick else SLIDES).items():
        path = make_slide(name, px, mpp)
        out = tempfile.mkdtemp()
        reads, tiles, ratios, loads, base_ratios, no_qc, tiles_phases = [], [], [], [], [], [], []
        for _ in range(args.repeats):
            loads.append(load_average())
            read = run_isolated(READ.format(path=str(path)))["seconds"]
            tile = run_isolated(TILE.format(path=str(path), out=out))
            reads.append(read)
            tiles.append(tile["seconds"])
            tiles_phases.append(tile["phases"])
            ratios.append(tile["seconds"] / read)
            no_qc.append((tile["seconds"] - tile["phases"]["qc"]) / read)
            if args.baseline:
                base = run_isolated(TILE.format(path=str(path), out=tempfile.mkdtemp()), args.baseline)
                base_ratios.append(base["seconds"] / read)
        coords, attrs = read_coords(Path(out) / "bench.h5")
        scores = truth_scores(path.with_suffix(".labels.png"), coords, int(attrs["patch_size_level0"]),
                              tuple(int(v) for v in attrs["level_dim"]))
        ratio = median(ratios)
        rows.append({
            "slide": name, "level-0 px": f"{px:,} x {int(px * 0.75):,}", "mpp": mpp, "tiles": len(coords),
            "read seg level (s)": median(reads), "tiling (s)": median(tiles), "tiling / read": ratio,
            "target ratio": f"<= {TARGET_RATIO}", "without QC picture / read": median(no_qc),
            **{f"{phase} (s)": median([r[phase] for r in tiles_phases]) for phase in ("read", "segment", "grid", "qc")},
            **({"baseline tiling / read": median(base_ratios)} if base_ratios else {}), **scores,
            "meets targets": bool(ratio <= TARGET_RATIO and scores["recall"] >= TARGET_RECALL
                                  and scores["precision"] >= TARGET_PRECISION and scores["ink tiles"] == 0),
            "load avg": f"{min(loads):.1f}-{max(loads):.1f}",
        })
        for other in other_tilers(path, tuple(int(v) for v in attrs["level_dim"])):
            others.append({"slide": name, **other, "tiling / read": other["seconds"] / median(reads)
                           if "seconds" in other else ""})
        print(json.dumps(rows[-1]), flush=True)
    notes = (f"Median of {args.repeats} rounds; in each round the read and the tiling run one after the other, each "
             "in a fresh process (opening the slide included, imports excluded), and the ratio is taken within the "
             "round; 'without QC picture' leaves out the slide's QC picture (`<slide>.tissue.jpg`), and the phase "
             "columns are `tile_slide`'s own timings (read: open the slide and make the segmentation image; grid: "
             "grid, ink check and coords .h5). Tiles of 256 px at 0.5 um/px; tissue at 8 um/px. "
             f"Targets: tiling / read <= {TARGET_RATIO}, "
             f"recall >= {TARGET_RECALL}, precision >= {TARGET_PRECISION}, no tile with > 5 % ink. 'load avg' is "
             "the machine's 1-minute load average during the rounds (other jobs share the 2 cores).")
    if others:
        columns = ["tiler", "tiles", "seconds", "tiling / read", "recall", "precision", "ink tiles", "note"]
        notes += "\n\nOther tilers on the same slides (one run each, their defaults; recall approximate):\n\n"
        notes += "| slide | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1) + "\n"
        notes += "\n".join("| " + " | ".join(_cell(o.get(c, "")) for c in ["slide", *columns]) + " |" for o in others)
    print(write_results("tiling" + ("-quick" if args.quick else ""), rows, list(rows[0]), notes).read_text())


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
