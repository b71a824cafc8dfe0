"""A dry run of the orchestration at TCGA scale (issue 17, item 4): ~11,000 slides through the tile
stage's flow with the per-slide work replaced by nothing, so that what is measured is what the
orchestration itself costs: validating the cohort, planning, Prefect task runs, ledger lines.

    python benchmarks/tcga_dry_run.py [--slides 11000] [--single 1000]

Every slide row points to its own (hard-linked, 1 KiB) file, so validation stats 11k files as it
would on shared storage. `--single` slides are also run with one task per slide, for comparison.
Results: benchmarks/results/tcga-dry-run-*.{json,md}; the plan that uses them: docs/tcga-plan.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import OUT, write_results  # noqa: E402


def make_cohort(root: Path, n: int) -> Path:
    """A cohort of `n` slides (2 per patient), every slide file a hard link to one small file."""
    import pandas as pd

    shutil.rmtree(root, ignore_errors=True)
    (root / "slides").mkdir(parents=True)
    blob = root / "blob.bin"
    blob.write_bytes(b"\0" * 1024)
    ids = [f"TCGA-{i:06d}" for i in range(n)]
    for sid in ids:
        os.link(blob, root / "slides" / f"{sid}.svs")
    patients = [f"P{i // 2:06d}" for i in range(n)]
    pd.DataFrame({"slide_id": ids, "patient_id": patients, "path": [f"slides/{s}.svs" for s in ids]}).to_csv(
        root / "slides.csv", index=False)
    unique = sorted(set(patients))
    pd.DataFrame({"patient_id": unique, "time": 10.0, "event": 0}).to_csv(root / "patients.csv", index=False)
    (root / "cohort.yaml").write_text("name: dry-run\noutcome: {time: time, event: event}\n")
    return root


def _fake_tile(path, slide_id, out_dir, config, mpp=None, force=False) -> dict:
    return {"slide_id": slide_id, "n_tiles": 9000, "skipped": False, "inputs_hash": "dry", "outputs": []}


def run_flow(cohort: Path, run: Path, slides_per_task: int | None) -> dict:
    """Validate + plan + tasks through Prefect (2 threads) with no slide work; timings in seconds."""
    from orchestration import _cpu

    import fusion.stages
    from flows.tiling import tile_cohort
    from fusion.cohort import load_cohort
    from fusion.stages import slide_batches

    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    n = len(load_cohort(cohort).slides)
    validate = time.perf_counter() - start
    fusion.stages.tile_slide = _fake_tile  # the dry part: no pixel is read
    start, cpu = time.perf_counter(), _cpu()
    results = tile_cohort(str(cohort), str(run), slides_per_task=slides_per_task)
    total, cpu = time.perf_counter() - start, _cpu() - cpu
    not_done = [r["slide_id"] for r in results if r["status"] != "done"]
    if len(results) != n or not_done:  # a dry run that lost slides measures nothing: say so, even under -O
        raise RuntimeError(f"dry run: {len(results)} results for {n} slides; not done: {not_done[:5]}")
    ledger = run / "ledger.jsonl"
    return {"slides": n, "tasks": len(slide_batches(list(range(n)), slides_per_task)), "validate_s": validate,
            "flow_s": total, "flow_cpu_s": cpu, "overhead_per_slide_ms": 1000 * total / n,
            "cpu_per_slide_ms": 1000 * cpu / n,
            "ledger_mib": ledger.stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=11000)
    parser.add_argument("--single", type=int, default=1000, help="slides also run with one task per slide")
    parser.add_argument("--quick", action="store_true", help="(make bench --quick) 2,000 and 300 slides")
    args = parser.parse_args()
    if args.quick:
        args.slides, args.single = 2000, 300

    from flows.server import prefect_api

    rows = []
    with prefect_api():
        big = make_cohort(OUT / "dry-cohort", args.slides)
        rows.append({"variant": "batched (default)", **run_flow(big, OUT / "dry-run", None)})
        print(rows[-1], flush=True)
        small = make_cohort(OUT / "dry-cohort-single", args.single)
        rows.append({"variant": "1 slide per task", **run_flow(small, OUT / "dry-run-single", 1)})
        print(rows[-1], flush=True)
    columns = ["variant", "slides", "tasks", "validate_s", "flow_s", "flow_cpu_s", "overhead_per_slide_ms",
               "cpu_per_slide_ms", "ledger_mib"]
    notes = ("Tile stage flow, Prefect on a local server, 2 threads, the per-slide work replaced by nothing: "
             "what remains is validation (stat of every slide file), planning, task runs and ledger lines. "
             "Overhead per slide = flow wall time / slides (CPU: of this process and the Prefect server, which a "
             "shared machine's load does not inflate as much).")
    print(write_results("tcga-dry-run", rows, columns, notes).read_text())


if __name__ == "__main__":
    main()
