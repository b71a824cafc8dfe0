"""Self-supervised augmentations: ours (batched tensor ops, `fusion.features.ssl.augment`) against the same
views built with MONAI's per-sample transforms (random resized crop, flip, 90-degree rotation, contrast and
brightness; MONAI has no H&E stain jitter, so ours does more), on the CPU, one thread, side by side.
This is the measurement behind dropping MONAI from the dependencies (issue 17, item 7).

    python benchmarks/augment.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, median, run_isolated, write_results  # noqa: E402

SETUP = """
import json, time, torch
torch.set_num_threads(1)
torch.manual_seed(0)
tiles = torch.randint(0, 256, (128, 3, 96, 96), dtype=torch.uint8).float()
"""

OURS = SETUP + """
from fusion.features.ssl import augment
augment(tiles[:8], 64)
t = time.perf_counter()
for _ in range(5): augment(tiles, 64)
print(json.dumps({"views_per_s": 5 * len(tiles) / (time.perf_counter() - t)}))
"""

MONAI = SETUP + """
from monai import transforms as T
view = T.Compose([T.RandSpatialCrop((34, 34), max_roi_size=(96, 96), random_size=True), T.Resize((64, 64)),
                  T.RandFlip(prob=0.5, spatial_axis=1), T.RandRotate90(prob=0.75),
                  T.RandAdjustContrast(prob=1.0, gamma=(0.8, 1.2)), T.RandShiftIntensity(offsets=20, prob=1.0)])
view(tiles[0])
t = time.perf_counter()
for _ in range(5): torch.stack([torch.as_tensor(view(x)) for x in tiles])
print(json.dumps({"views_per_s": 5 * len(tiles) / (time.perf_counter() - t)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    ours, monai, ratios, loads = [], [], [], []
    for _ in range(args.repeats):
        loads.append(load_average())
        a = run_isolated(OURS)["views_per_s"]
        try:
            b = run_isolated(MONAI)["views_per_s"]
        except RuntimeError as e:  # MONAI is no dependency any more: measured when installed by hand
            print(f"skipped: MONAI not installed (pip install monai) or failed: {str(e)[-300:]}")
            return
        ours.append(a)
        monai.append(b)
        ratios.append(a / b)
    row = {"views of 64 px from 96 px tiles": "128 a batch", "ours (batched, + HED jitter)": median(ours),
           "MONAI per-sample transforms": median(monai), "ours / MONAI": median(ratios),
           "load avg": f"{min(loads):.1f}-{max(loads):.1f}"}
    print(json.dumps(row))
    notes = (f"views/s on one CPU thread, median of {args.repeats} rounds, each in a fresh process. On a GPU ours stay "
             "batched on the device; MONAI's array transforms run per sample.")
    print(write_results("augment", [row], list(row), notes).read_text())


if __name__ == "__main__":
    main()
