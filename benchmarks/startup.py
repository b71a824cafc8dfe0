"""Start-up of the `fusion` command against the 0.25 s target of issue 17, and what the commands import.

`fusion --help` is run N times (a fresh interpreter each time, as a user would); the median wall time and the
median CPU time (user + system: what the start-up costs, whatever else loads the machine) are reported.
`--baseline DIR` runs another version of the code the same way, alternating with this one.

    python benchmarks/startup.py [--repeats 11] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import baseline_arg, load_average, median, timed_python, write_results  # noqa: E402

TARGET_S = 0.25
HELP = "import sys; sys.argv = ['fusion', '--help']; from fusion.cli import app; app()"
HEAVY = "import sys; import fusion.cli, fusion.wsi, fusion.cohort; print(sorted(m for m in {m!r} if m in sys.modules))"


def run(code: str, baseline: str | None) -> tuple[float, float]:
    """(wall s, CPU s) of `python -c code` in a fresh interpreter."""
    wall, cpu, _ = timed_python(code, baseline, check=False)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="5 runs")
    baseline_arg(parser)
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats
    versions = {"this code": None, **({"baseline": args.baseline} if args.baseline else {})}
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in versions}
    loads = []
    for _ in range(repeats):
        loads.append(load_average())
        for label, path in versions.items():
            times[label].append(run(HELP, path))
    heavy = ("torch", "sksurv", "lifelines", "prefect", "timm", "matplotlib")
    rows = []
    for label, path in versions.items():
        done = subprocess.run([sys.executable, "-P", "-c", HEAVY.format(m=heavy)], capture_output=True, text=True,
                              env={**os.environ, **({"PYTHONPATH": path} if path else {})})
        wall, cpu = median([w for w, _ in times[label]]), median([c for _, c in times[label]])
        rows.append({"version": label, "fusion --help wall (s)": wall, "fusion --help CPU (s)": cpu,
                     "target (s)": TARGET_S, "CPU meets target": cpu < TARGET_S,
                     "heavy libraries imported by the CLI and tiling": done.stdout.strip() or done.stderr[-200:],
                     "load avg": f"{min(loads):.1f}-{max(loads):.1f}"})
        print(json.dumps(rows[-1]), flush=True)
    notes = (f"Median of {repeats} runs, each a fresh interpreter (python -P -c: the current directory is not on "
             "the path, as for the `fusion` script; an editable install adds its import hook to every start). CPU "
             "time is user + system of the child: on a shared machine it is the figure to hold against the "
             "target, wall time follows the load.")
    print(write_results("startup", rows, list(rows[0]), notes).read_text())


if __name__ == "__main__":
    main()
