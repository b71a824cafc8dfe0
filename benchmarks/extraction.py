"""Feature extraction throughput against its two limits, in one run, per encoder:

  decode-only   tiles/s of the DataLoader alone (openslide reads + resize in worker processes);
  model-only    tiles/s of the encoder alone on random uint8 tiles already in memory;
  pipeline      tiles/s of `extract_slide` (reads, encodes, writes the .h5).

The pipeline overlaps the two stages (workers decode while the main process encodes), so its
ceiling is min(decode-only, model-only) when each stage has the cores it has in the pipeline: one
core for decoding (1 worker) and one for the model (1 torch thread) on this 2-core machine. The
figures with both cores given to one stage are reported beside them.

    python benchmarks/extraction.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, run_isolated, write_results  # noqa: E402

SETUP = """
import json, time, tempfile, torch, numpy as np
from pathlib import Path
from torch.utils.data import DataLoader
from fusion.wsi import tile_slide, read_coords
from fusion.features import create_encoder, extract_slide, ExtractConfig
from fusion.features.extract import TileDataset
torch.set_num_threads({threads})
slide = {slide!r}
tiles_dir = Path({tiles!r})
if not (tiles_dir / "bench.h5").exists():
    tile_slide(slide, "bench", tiles_dir)
coords, attrs = read_coords(tiles_dir / "bench.h5")
coords = coords[: {limit}]
enc = create_encoder({encoder!r})
"""

DECODE = SETUP + """
ds = TileDataset(slide, coords, attrs, enc.input_size, mpp=float(attrs["level0_mpp"]))
ctx = "forkserver" if {workers} else None
loader = DataLoader(ds, batch_size=64, num_workers={workers}, multiprocessing_context=ctx)
it = iter(loader); next(it)  # start the workers before timing
t = time.perf_counter(); n = 64
for b in it: n += len(b)
print(json.dumps({{"tiles_per_s": (n - 64) / (time.perf_counter() - t), "n": n}}))
"""

MODEL = SETUP + """
x = torch.randint(0, 256, (64, 3, enc.input_size, enc.input_size), dtype=torch.uint8)
with torch.inference_mode():
    enc.model(x[:8])
    n, t = 0, time.perf_counter()
    while n < len(coords):
        enc.model(x); n += len(x)
print(json.dumps({{"tiles_per_s": n / (time.perf_counter() - t)}}))
"""

PIPELINE = SETUP + """
import h5py
h5 = tiles_dir / "sub.h5"
with h5py.File(tiles_dir / "bench.h5") as src, h5py.File(h5, "w") as dst:
    d = dst.create_dataset("coords", data=coords)
    for k, v in src.attrs.items(): dst.attrs[k] = v
out = tempfile.mkdtemp()
t = time.perf_counter()
r = extract_slide(slide, h5, "bench", out, [enc], ExtractConfig(batch_size=64, num_workers={workers}), force=True)
print(json.dumps({{"tiles_per_s": r["n_tiles"] / (time.perf_counter() - t)}}))
"""

ENCODERS = {"morph": ("morph", 6000), "vit_small_patch16_224": ("timm:vit_small_patch16_224@random", 384)}


def measure(template: str, **kw) -> float:
    return run_isolated(template.format(**kw))["tiles_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    slide = OUT / "slides" / ("20x-10k.tiff" if args.quick else "20x-40k.tiff")
    if not slide.exists():
        sys.exit(f"{slide} missing: run benchmarks/tiling.py first (it renders the slides)")
    rows = []
    for label, (spec, limit) in ENCODERS.items():
        limit = min(limit, 1000) if args.quick else limit
        common = {"slide": str(slide), "tiles": str(OUT / "tiles"), "encoder": spec, "limit": limit}
        decode_1 = measure(DECODE, threads=1, workers=1, **common)
        model_1 = measure(MODEL, threads=1, workers=0, **common)
        pipe = measure(PIPELINE, threads=1, workers=1, **common)
        decode_2 = measure(DECODE, threads=1, workers=2, **common)
        model_2 = measure(MODEL, threads=2, workers=0, **common)
        pipe_0 = measure(PIPELINE, threads=2, workers=0, **common)
        limit_1 = min(decode_1, model_1)
        rows.append({"encoder": label, "tiles": limit, "decode-only (1 worker)": decode_1,
                     "model-only (1 thread)": model_1, "pipeline (1 worker + 1 thread)": pipe,
                     "pipeline / min": pipe / limit_1, "decode-only (2 workers)": decode_2,
                     "model-only (2 threads)": model_2, "pipeline in-process (2 threads)": pipe_0})
        print(json.dumps(rows[-1]), flush=True)
    columns = list(rows[0])
    notes = ("tiles/s; each figure from a fresh process. Tiles: 256 px at 0.5 um/px from a 40k x 30k px synthetic "
             "slide, resized to the encoder's input (128 px for morph, 224 for ViT-S/16). ViT-S/16 is fp32 on CPU "
             "with untrained weights (speed does not depend on them). Target: pipeline / min >= 0.85.")
    print(write_results("extraction" + ("-quick" if args.quick else ""), rows, columns, notes).read_text())


if __name__ == "__main__":
    main()
