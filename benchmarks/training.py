"""Training step cost against bag size: time and peak memory of one forward + backward step for
each registered model, at 1k, 10k and 50k tiles per bag (2 patients a batch, 384-D tile features,
as from a ViT-S encoder; genomics 128 genes in 8 groups; 8 clinical features). Growth must be
linear in the number of tiles: the last columns divide by the 1k figures.

    python benchmarks/training.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESET_PEAK, run_isolated, write_results  # noqa: E402

STEP = """
import json, time, torch
from fusion.models import create_model
from fusion.survival import cox_loss
torch.manual_seed(0)
B, N, D = 2, {n}, 384
groups = [list(range(i * 16, (i + 1) * 16)) for i in range(8)]
model = create_model({model!r}, in_dim=D, genomic_dim=128, groups=groups, clinical_dim=8)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(B, N, D); mask = torch.ones(B, N, dtype=torch.bool)
tab = dict(genomics=torch.randn(B, 128), genomics_mask=torch.ones(B, dtype=torch.bool), clinical=torch.randn(B, 8))
time_, event = torch.tensor([3.0, 5.0]), torch.tensor([1.0, 0.0])
def step():
    out = model(x, mask, **tab)
    loss = cox_loss(out["risk"], time_, event) + out.get("aux_loss", 0.0)
    opt.zero_grad(); loss.backward(); opt.step()
""" + RESET_PEAK + """
step()  # warm-up (optimizer state is allocated here: counted in the peak)
times = []
for _ in range(3):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({{"seconds": sorted(times)[1]}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from fusion.models import available_models

    sizes = [1000, 5000] if args.quick else [1000, 10_000, 50_000]
    rows = []
    for model in available_models():
        row = {"model": model}
        for n in sizes:
            r = run_isolated(STEP.format(model=model, n=n))
            row[f"step s @{n // 1000}k"] = r["seconds"]
            row[f"peak MiB @{n // 1000}k"] = r["peak_rss_mib"] - r["base_rss_mib"]
        big = sizes[-1] // 1000
        row[f"time x @{big}k / @1k"] = row[f"step s @{big}k"] / row["step s @1k"]
        row[f"memory x @{big}k / @1k"] = row[f"peak MiB @{big}k"] / max(row["peak MiB @1k"], 1e-3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    notes = (f"CPU, fp32, 2 threads; median of 3 steps after a warm-up, each size in a fresh process; peak memory "
             f"of the steps above the process holding the model and the inputs. Linear growth means the last two "
             f"columns near {sizes[-1] // 1000}.")
    print(write_results("training" + ("-quick" if args.quick else ""), rows, list(rows[0]), notes).read_text())


if __name__ == "__main__":
    main()
