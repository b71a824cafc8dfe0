"""The README's demo counts and timings, measured rather than typed.

    readme_numbers.py timed TIMINGS.json STEP -- COMMAND...   run COMMAND, record its wall time as STEP
    readme_numbers.py show RUN --timings TIMINGS.json          print the block for a finished run
    readme_numbers.py update RUN --timings TIMINGS.json [--readme README.md]

`make demo` times its steps with `timed` (into data/demo/timings.json) and prints the numbers with
`show`; `make readme-numbers` rewrites the block of README.md between `<!-- demo-numbers -->` and
`<!-- /demo-numbers -->` with `update`, and the comparison of every model between `<!-- demo-results -->`
and `<!-- /demo-results -->` (from RUN/analysis/comparison.csv), leaving every other line as it was.
Counts come from the run folder (cohort tables, tile files, reports); the pipeline's stages are timed
from its ledger: each stage ends at its last ledger line of that pipeline run, and starts where the
stage before it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

BEGIN, END = "<!-- demo-numbers -->", "<!-- /demo-numbers -->"
RESULTS_BEGIN, RESULTS_END = "<!-- demo-results -->", "<!-- /demo-results -->"
# Pipeline stages in the order they run, as the ledger names them; "tile" includes Prefect's start.
STAGES = (("tile", "tiling (with Prefect's start)"), ("pretrain", "self-supervised pretraining"),
          ("extract", "feature extraction"),
          ("train", "training and evaluation"), ("analyze", "cohort analysis"), ("report", "patient reports"))
PART_OF = {"evaluate": "train"}  # ledger steps timed as part of a stage


def timed(timings: Path, step: str, command: list[str]) -> int:
    """Run `command`; record its wall time, start and the machine's load in `timings` under `step`."""
    start = time.time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    code = subprocess.call(command)
    # A new cohort starts a new demo: timings of steps run on another cohort no longer apply.
    record = json.loads(timings.read_text()) if timings.exists() and step != "synth" else {}
    record[step] = {"seconds": round(time.time() - start, 1), "start": start, "exit_code": code,
                    "load_at_start": load, "cores": os.cpu_count(), "date": date.today().isoformat()}
    timings.parent.mkdir(parents=True, exist_ok=True)
    timings.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return code


def counts(run: Path) -> dict:
    """Patients, events, slides, tiles and patient reports of a finished run folder."""
    from fusion.run import open_run
    from fusion.stages import tile_count

    layout, cohort = open_run(run)
    ids = set(cohort.patients["patient_id"].astype(str))
    reports = layout.root / "reports"
    return {"patients": len(cohort.patients),
            "events": int(cohort.event.sum()),
            "slides": len(cohort.slides),
            "tiles": int(sum(tile_count(layout, str(sid)) for sid in cohort.slides.slide_id)),
            "reports": sum(1 for p in reports.glob("*.html") if p.stem in ids) if reports.is_dir() else 0}


def stage_seconds(run: Path, start: float) -> dict[str, float]:
    """Seconds of each pipeline stage that wrote ledger lines after `start` (the pipeline's start)."""
    last: dict[str, float] = {}
    for line in (run / "ledger.jsonl").read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a torn line
            continue
        step = entry.get("item") if entry.get("step") == "stage" else entry.get("step")
        step = PART_OF.get(step, step)
        if entry.get("time", 0) >= start and step in dict(STAGES):
            last[step] = max(last.get(step, 0.0), entry["time"])
    out, previous = {}, start
    for step, _ in STAGES:
        if step in last:
            out[step] = round(last[step] - previous, 1)
            previous = last[step]
    return out


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def block(run: Path, timings: dict) -> str:
    """The README block (markers included) for a finished demo run."""
    n = counts(run)
    pipeline = timings.get("pipeline", {})
    first = timings.get("synth") or pipeline
    lines = [BEGIN,
             f"Measured by `scripts/readme_numbers.py` from a `make demo` run on {first.get('date', '?')} "
             f"({first.get('cores', '?')} cores, load average {first.get('load_at_start') or 0:.1f} at the start, "
             f"{platform.machine()}): {n['patients']} patients ({n['events']} events), {n['slides']} slides, "
             f"{n['tiles']:,} tiles, {n['reports']} patient reports.", "",
             "| step of `make demo` | wall time |", "|---|---|"]
    total = 0.0
    if "synth" in timings:
        lines.append(f"| synthesise the cohort (`fusion synth`) | {_duration(timings['synth']['seconds'])} |")
        total += timings["synth"]["seconds"]
    if pipeline:
        for step, seconds in stage_seconds(run, pipeline["start"]).items():
            lines.append(f"| {dict(STAGES)[step]} | {_duration(seconds)} |")
        lines.append(f"| `fusion pipeline configs/demo.yaml` in all | {_duration(pipeline['seconds'])} |")
        total += pipeline["seconds"]
    lines += [f"| **total** | **{_duration(total)}** |", END]
    return "\n".join(lines)


def results_block(run: Path) -> str:
    """The README's comparison table (markers included) from the run's `fusion compare` table."""
    import pandas as pd

    from fusion.train.loop import model_inputs

    table = run / "analysis" / "comparison.csv"
    if not table.exists():
        raise ValueError(f"{table} is missing: the run has no comparison yet (`fusion compare {run}`)")
    rows = pd.read_csv(table)
    best = rows.iloc[0]
    lines = [RESULTS_BEGIN,
             f"Written by `scripts/readme_numbers.py` from `{run.name}/analysis/comparison.csv` of the same run: "
             f"{int(best['n_patients'])} patients, {int(best['folds'])} patient-level folds shared by every row. "
             "C: Harrell's C inside each test fold, mean ± sd over folds [95% CI: within-fold bootstrap]; pooled: "
             "every patient on the training-fold percentile scale; Δ vs best: paired per-fold difference to the "
             "best model, mean ± sd [paired bootstrap 95% CI]; % of oracle: (C - 0.5) / (C of the true risk - "
             f"0.5), the true risk's C on the same folds being {best['oracle_c_index_mean']:.3f}.", "",
             "| model | reads | C mean ± sd [95% CI] | pooled C | Δ vs best [95% CI] | % of oracle |",
             "|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        diff = ("best" if r["model"] == best["model"] else
                f"{-r['diff_vs_best_mean']:+.3f} ± {r['diff_vs_best_sd']:.3f} "
                f"[{-r['diff_vs_best_ci_high']:+.3f}, {-r['diff_vs_best_ci_low']:+.3f}]")
        lines.append(f"| `{r['model']}` | {' + '.join(model_inputs(r['model']))} | {r['c_index_mean']:.3f} ± "
                     f"{r['c_index_sd']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['pooled_c_index']:.3f} "
                     f"| {diff} | {100 * r['fraction_of_oracle']:.0f} % |")
    return "\n".join([*lines, RESULTS_END])


def replace_block(text: str, new_block: str, begin: str = BEGIN, end: str = END) -> str:
    """`text` with its block between `begin` and `end` replaced by `new_block`; every other character kept."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"the README must hold one {begin} ... {end} block (found {text.count(begin)} begin "
                         f"and {text.count(end)} end markers)")
    return text[: text.index(begin)] + new_block + text[text.index(end) + len(end):]


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module's docstring."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["timed"]:
        if len(argv) < 5 or argv[3] != "--":
            raise SystemExit("usage: readme_numbers.py timed TIMINGS.json STEP -- COMMAND...")
        return timed(Path(argv[1]), argv[2], argv[4:])
    parser = argparse.ArgumentParser(description="The README's demo numbers, from a finished run.")
    parser.add_argument("action", choices=["show", "update"])
    parser.add_argument("run", type=Path)
    parser.add_argument("--timings", type=Path, required=True)
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    new = block(args.run, json.loads(args.timings.read_text()))
    if args.action == "show":
        print(new)
        return 0
    text = replace_block(args.readme.read_text(), new)
    if RESULTS_BEGIN in text:
        text = replace_block(text, results_block(args.run), RESULTS_BEGIN, RESULTS_END)
    args.readme.write_text(text)
    print(f"{args.readme}: demo numbers rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
