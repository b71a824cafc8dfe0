"""Tiling cost against its limit: reading the segmentation level alone.

For realistic synthetic slides (a 40x 80k x 60k px resection and a 20x 40k x 30k px one), in one
run: (a) open the slide and read the segmentation image (~8 um/px) — the floor any tiler pays;
(b) the whole tiling step without reading tile pixels (tissue mask, grid, ink check, coords .h5,
QC picture). Reports the ratio b/a (target <= 1.5), tiles/s and the peak RSS of each, each
measured in a fresh process.

    python benchmarks/tiling.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, RESET_PEAK, run_isolated, write_results  # noqa: E402

SLIDES = {"40x-80k": (80_000, 0.25), "20x-40k": (40_000, 0.5)}
QUICK = {"40x-20k": (20_000, 0.25), "20x-10k": (10_000, 0.5)}
REPEATS = 3


def make_slide(name: str, px: int, mpp: float) -> Path:
    from fusion.synth import SynthConfig, render_slide

    path = OUT / "slides" / f"{name}.tiff"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    config = SynthConfig(slide_px=px, mpp=mpp, pen_prob=1.0, region_um=300.0)
    render_slide(path, np.array([0.3, 0.3, 0.15, 0.1, 0.15]), seed=1, config=config)
    print(f"rendered {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


READ_SEG = """
import time, json, resource
from fusion.wsi import open_slide
from fusion.wsi.tiling import segmentation_image
""" + RESET_PEAK + """
t = time.perf_counter()
with open_slide({path!r}) as s:
    rgb, d = segmentation_image(s, 8.0)
print(json.dumps({{"seconds": time.perf_counter() - t, "seg_shape": list(rgb.shape[:2])}}))
"""

TILE = """
import time, json, tempfile, resource
from fusion.wsi import tile_slide, TilingConfig
""" + RESET_PEAK + """
out = tempfile.mkdtemp()
t = time.perf_counter()
r = tile_slide({path!r}, "bench", out, TilingConfig(target_mpp=0.5, patch_size=256), force=True)
print(json.dumps({{"seconds": time.perf_counter() - t, "n_tiles": r["n_tiles"]}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller slides (for a fast check)")
    args = parser.parse_args()
    rows = []
    for name, (px, mpp) in (QUICK if args.quick else SLIDES).items():
        path = make_slide(name, px, mpp)
        seg = [run_isolated(READ_SEG.format(path=str(path))) for _ in range(REPEATS)]
        tile = [run_isolated(TILE.format(path=str(path))) for _ in range(REPEATS)]
        seg_s = min(r["seconds"] for r in seg)
        tile_s = min(r["seconds"] for r in tile)
        rows.append({
            "slide": name, "level-0 px": f"{px:,} x {int(px * 0.75):,}", "mpp": mpp,
            "tiles": tile[0]["n_tiles"], "read seg level (s)": seg_s, "tiling (s)": tile_s,
            "tiling / read": tile_s / seg_s, "tiles/s": tile[0]["n_tiles"] / tile_s,
            "peak MiB above imports (read)": max(r["peak_rss_mib"] - r["base_rss_mib"] for r in seg),
            "peak MiB above imports (tiling)": max(r["peak_rss_mib"] - r["base_rss_mib"] for r in tile),
        })
        print(json.dumps(rows[-1]), flush=True)
    columns = ["slide", "level-0 px", "mpp", "tiles", "read seg level (s)", "tiling (s)", "tiling / read",
               "tiles/s", "peak MiB above imports (read)", "peak MiB above imports (tiling)"]
    notes = (f"Best of {REPEATS} runs, each in a fresh process (includes opening the slide). Tiles of 256 px at "
             "0.5 um/px; tissue at 8 um/px; the slides carry pen marks and debris. Target: tiling / read <= 1.5.")
    print(write_results("tiling" + ("-quick" if args.quick else ""), rows, columns, notes).read_text())


if __name__ == "__main__":
    main()
