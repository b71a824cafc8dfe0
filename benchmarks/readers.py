"""Slide readers side by side: reads per second on one core, and whether the pixels equal openslide's.

Candidates (each in a fresh process per round; one that is not installed is reported as such):
  openslide     `read_region`, one call per tile: what extraction did before issue 17;
  fusion-tiles  our `tiles` backend: the stored tiles a read touches, decoded directly (tifffile finds
                them, imagecodecs decodes with libjpeg-turbo), openslide for anything else;
  tiffslide     tifffile + zarr behind openslide's API;
  fastslide     a C++ reader with Python bindings;
  cucim         cuCIM's CuImage on the CPU (the reader behind MONAI's `WSIReader(backend="cucim")`).
Slides: synthetic 20x (tiles of 256 px = one stored tile) and 40x (256 px at 0.5 um/px = 512 px at level 0:
four stored tiles) slides; openslide-python's own test slides (Aperio SVS with shared JPEG tables,
a deflate generic TIFF, a DICOM), tiny, read whole many times (pixel equality and format support).

    python benchmarks/readers.py [--quick] [--repeats 5]
    pip install tiffslide fastslide && pip install --no-deps cucim-cu12   # the optional candidates
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, load_average, make_slide, median, run_isolated, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPENSLIDE_FIXTURES = ROOT / ".cache" / "openslide-python"

# Each reader: (setup code defining `read(x, y, level, w, h) -> RGB(A) array`).
READERS = {
    "openslide": "import openslide\ns = openslide.OpenSlide(path)\n"
                 "read = lambda x, y, l, w, h: np.asarray(s.read_region((x, y), l, (w, h)))",
    "fusion-tiles": "from fusion.wsi.backends import create_backend\ns = create_backend('tiles', path)\n"
                    "read = lambda x, y, l, w, h: s.read_rgb((x, y), l, (w, h))",
    "tiffslide": "import tiffslide\ns = tiffslide.TiffSlide(path)\n"
                 "read = lambda x, y, l, w, h: s.read_region((x, y), l, (w, h), as_array=True)",
    "fastslide": "import fastslide\ns = fastslide.FastSlide.from_file_path(path)\n"
                 "read = lambda x, y, l, w, h: s.read_region((x, y), l, (w, h)).numpy()",
    "cucim": "from cucim import CuImage\ns = CuImage(path)\n"
             "read = lambda x, y, l, w, h: np.asarray(s.read_region((x, y), (w, h), l))",
}

SNIPPET = """
import json, os, time, numpy as np
import openslide
path = {path!r}
regions = {regions!r}
{setup}
timed = regions[{checked}:] or regions
read(*timed[0])
c, t = os.times(), time.perf_counter()
n = 0
while n < {reads}:  # synthetic slides: every region once (no reader's cache can serve a repeat)
    for r in timed:
        read(*r)
    n += len(timed)
rate, c2 = n / (time.perf_counter() - t), os.times()
cpu_ms = (c2.user + c2.system - c.user - c.system) / n * 1000
ref = openslide.OpenSlide(path)
same = True
for x, y, l, w, h in regions[:max({checked}, len(regions) if not {checked} else 0)]:
    a, b = np.asarray(read(x, y, l, w, h)), np.asarray(ref.read_region((x, y), l, (w, h)))
    a = a if a.shape[-1] == 3 else np.where(a[..., 3:] == 0, 255, a[..., :3])
    b = np.where(b[..., 3:] == 0, 255, b[..., :3])  # outside the scanned area: white, as fusion reads it
    same &= a.shape == b.shape and bool(np.array_equal(a, b))
print(json.dumps({{"reads_per_s": rate, "cpu_ms": cpu_ms, "same": same}}))
"""


def synthetic_regions(path: Path, n: int) -> list[tuple[int, int, int, int, int]]:
    """The first `n` tissue tiles of fusion's own tiling (256 px at 0.5 um/px), as level-0 reads."""
    import tempfile

    from fusion.wsi import read_coords, tile_slide

    out = Path(tempfile.mkdtemp())
    tile_slide(path, "bench", out)
    coords, attrs = read_coords(out / "bench.h5")
    size = int(attrs["patch_size_level0"])
    return [(int(x), int(y), 0, size, size) for x, y in coords[:n]]


def fixture_regions(path: Path) -> list[tuple[int, int, int, int, int]]:
    """Whole levels of a small slide."""
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        return [(0, 0, level, w, h) for level, (w, h) in enumerate(s.level_dimensions)]


def measure(path: Path, regions: list, reads: int, repeats: int, checked: int = 0) -> dict:
    """Median reads/s of every reader; `checked` regions (first, not timed) compared with openslide's pixels
    (0: the timed regions are compared after timing)."""
    results: dict[str, list] = {name: [] for name in READERS}
    for _ in range(repeats):
        for name, setup in READERS.items():
            if results[name] and isinstance(results[name][0], str):
                continue  # not installed, or cannot read this file: said once
            try:
                results[name].append(run_isolated(SNIPPET.format(path=str(path), regions=regions, setup=setup,
                                                                  reads=reads, checked=checked)))
            except RuntimeError as e:
                last = str(e).strip().splitlines()[-1].replace(str(ROOT) + "/", "")
                results[name] = ["not installed" if "ModuleNotFoundError" in last else f"fails: {last[:70]}"]
    row = {}
    for name, runs in results.items():
        if isinstance(runs[0], str):
            row[name] = runs[0]
            continue
        rate, cpu = median([r["reads_per_s"] for r in runs]), median([r["cpu_ms"] for r in runs])
        row[name] = f"{cpu:.3g} ms, {rate:,.0f}/s" + ("" if all(r["same"] for r in runs) else " (pixels differ)")
        row[f"_{name}"] = cpu
    base = row.get("_openslide")
    fast = row.get("_fusion-tiles")
    row["openslide / fusion-tiles (CPU)"] = round(base / fast, 2) if base and fast else ""
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    slides = {"synthetic 20x (1 stored tile a read)": ("20x-32k", 32_000, 0.5),
              "synthetic 40x (4 stored tiles a read)": ("40x-24k", 24_000, 0.25)}
    if args.quick:
        slides = {"synthetic 40x (4 stored tiles a read)": ("40x-12k", 12_000, 0.25)}
    rows, loads = [], [load_average()]
    for label, (name, px, mpp) in slides.items():
        regions = synthetic_regions(make_slide(name, px, mpp), 1050 if "20x" in name else 450)
        row = measure(OUT / "slides" / f"{name}.tiff", regions, len(regions) - 50, args.repeats, checked=50)
        rows.append({"slide": label, **row})
        loads.append(load_average())
        print(json.dumps(rows[-1]), flush=True)
    fixtures = next(OPENSLIDE_FIXTURES.glob("openslide_python-*/tests/fixtures"), None)
    if fixtures is None:
        print("openslide-python's test slides missing: run `pytest tests/test_backends.py` once to fetch them")
    else:
        for name in ("small.svs", "boxes.tiff", "boxes_0.dcm"):
            path = fixtures / name
            row = measure(path, fixture_regions(path), 2000, args.repeats)
            rows.append({"slide": f"openslide test: {name}", **row})
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        for k in [k for k in r if k.startswith("_")]:
            del r[k]
    notes = (f"CPU time per read (user + system, all the process's threads) and reads/s of wall time; median of "
             f"{args.repeats} rounds, each reader in a fresh process per round, called from one thread (tiffslide's "
             "zarr and fastslide run threads of their own). CPU time is the figure to compare on a shared machine: "
             "wall time follows the load. Reads of the "
             "synthetic slides: fusion's tissue tiles (256 px at 0.5 um/px) in tile order, each read once (1,000 on "
             "the 20x slide, 400 on the 40x one), so no reader's tile cache serves a repeat; 50 other tiles are "
             "compared with openslide's pixels. The test slides are tiny: read whole, every level, "
             "2,000 times (caches help there: those rates say little; the point is support and pixels). "
             "'(pixels differ)': not equal to openslide's (outside the image counted as white). "
             f"Load average during the run: {min(loads):.1f}-{max(loads):.1f} (other jobs share the 2 cores).")
    print(write_results("readers" + ("-quick" if args.quick else ""), rows, list(rows[0]), notes).read_text())


if __name__ == "__main__":
    main()
