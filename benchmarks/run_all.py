"""`make bench`: run every benchmark and collect their tables into benchmarks/RESULTS.md.

    python benchmarks/run_all.py            # run all, then collect
    python benchmarks/run_all.py --collect  # only rebuild RESULTS.md from benchmarks/results/
    python benchmarks/run_all.py --quick    # smaller inputs, for a fast check
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

BENCHMARKS = ["startup.py", "tiling.py", "readers.py", "extraction.py", "augment.py", "training.py", "reports.py",
              "beta_recovery.py", "orchestration.py", "tcga_dry_run.py", "attention.py", "synthesis.py",
              "memory.py"]


def collect(here: Path) -> str:
    m = machine()
    parts = ["# Benchmark results", "", f"Collected on {m['date']}: {m['cpu']}, {m['cores']} cores, "
             f"{m['memory_gib']} GiB, {'CUDA' if m['cuda'] else 'no GPU'}. Regenerate with `make bench`.", ""]
    for md in sorted(RESULTS.glob("*.md")):
        parts += [md.read_text(), ""]
    (here / "RESULTS.md").write_text("\n".join(parts))
    return (here / "RESULTS.md").read_text()


def main() -> None:
    here = Path(__file__).resolve().parent
    args = [a for a in sys.argv[1:] if a != "--collect"]
    if "--collect" not in sys.argv:
        for name in BENCHMARKS:
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, str(here / name), *args], check=True)
    print(collect(here))


if __name__ == "__main__":
    main()
