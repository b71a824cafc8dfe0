"""`make bench`: run every benchmark and collect their tables into benchmarks/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

BENCHMARKS = ["tiling.py", "extraction.py", "training.py"]


def main() -> None:
    here = Path(__file__).resolve().parent
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(here / name), *sys.argv[1:]], check=True)
    m = machine()
    parts = ["# Benchmark results", "", f"Collected on {m['date']}: {m['cpu']}, {m['cores']} cores, "
             f"{m['memory_gib']} GiB, {'CUDA' if m['cuda'] else 'no GPU'}. Regenerate with `make bench`.", ""]
    for md in sorted(RESULTS.glob("*.md")):
        parts += [md.read_text(), ""]
    (here / "RESULTS.md").write_text("\n".join(parts))
    print((here / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
