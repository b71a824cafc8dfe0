"""Clinician reports and cohort analysis for a 200-patient cohort, against the target of 200
reports in under a minute on 2 cores.

The cohort (synthetic, 200 patients) is tiled, featurised with `morph` and a `coattn` model is
cross-validated once (cached in benchmarks/out/reports/; few epochs: the benchmark measures
reporting, not model quality). Each measurement runs in a fresh interpreter:
  context   loading the 5 fold models, every patient's bag and the cohort reference
  html      200 HTML reports (risk, survival curve, heatmaps, top tiles, integrated gradients)
  pdf       printing the 200 reports to A4 PDF in one headless Chromium
  analysis  `fusion analyze` of the run (2 models, 1000 bootstrap resamples)

    python benchmarks/reports.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, RESET_PEAK, run_isolated, write_results  # noqa: E402

TARGET_SECONDS = 60.0

PREPARE = """
import json
from fusion.cohort import load_cohort
from fusion.run import init_run, open_run
from fusion.stages import build_encoders, extract_one, slide_rows, tile_one, train_stage
from fusion.synth import SynthConfig, synthesize_cohort
from fusion.train.loop import TrainConfig
from fusion.wsi import TilingConfig
root = {root!r}
cohort_dir = synthesize_cohort(root + "/cohort", SynthConfig(patients={patients}, seed=3))
layout = init_run(root + "/run", cohort_dir)
cohort = load_cohort(cohort_dir)
encoders = build_encoders(["morph"])
for sid, path in slide_rows(cohort):
    tile_one(layout, sid, path, TilingConfig())
    extract_one(layout, sid, path, encoders)
layout, cohort = open_run(root + "/run")
train_stage(layout, cohort, TrainConfig(model="coattn", epochs=10, patience=5))
train_stage(layout, cohort, TrainConfig(model="clinical_cox"))
print(json.dumps({{"prepared": True}}))
"""

MEASURE = """
import json, time
from fusion.report.analysis import analyze_run
from fusion.report.patient import ReportContext, load_trained, write_reports
from fusion.report.pdf import print_pdfs
from fusion.run import open_run
layout, cohort = open_run({run!r})
""" + RESET_PEAK + """
t = time.perf_counter()
if {what!r} == "context":
    ReportContext.build(layout, cohort, load_trained(layout.model_dir("coattn")), None, "median")
elif {what!r} == "html":
    written = write_reports(layout, cohort, "coattn", pdf=False)
elif {what!r} == "pdf":
    html = sorted(layout.reports.glob("*.html"))
    t = time.perf_counter()
    written = print_pdfs(html)
elif {what!r} == "analysis":
    analyze_run(layout, cohort, n_boot=1000)
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="40 patients instead of 200")
    args = parser.parse_args()
    patients = 40 if args.quick else 200
    root = OUT / f"reports-{patients}"
    if not (root / "run" / "models" / "coattn" / "cv_metrics.json").exists():
        print(f"preparing a {patients}-patient run in {root} (once)", flush=True)
        run_isolated(PREPARE.format(root=str(root), patients=patients))
    run = str(root / "run")
    rows = []
    for what in ("context", "html", "pdf", "analysis"):
        r = run_isolated(MEASURE.format(run=run, what=what))
        row = {"step": what, "patients": patients, "seconds": r["seconds"],
               "peak MiB": r["peak_rss_mib"] - r["base_rss_mib"]}
        if what in ("html", "pdf"):
            row["per patient s"] = r["seconds"] / patients
        rows.append(row)
    total = sum(r["seconds"] for r in rows if r["step"] in ("html", "pdf"))
    rows.append({"step": "reports: html + pdf", "patients": patients, "seconds": total,
                 "per patient s": total / patients, "target s": TARGET_SECONDS * patients / 200,
                 "meets target": total <= TARGET_SECONDS * patients / 200})
    notes = ("`html` includes building the shared context (5 fold models, all bags); `pdf` prints the "
             "already written HTML in one Chromium (peak MiB is the Python process; Chromium's own memory is "
             "not counted). Target: 200 patients (HTML + PDF) in under 60 s.")
    print(json.dumps(rows, indent=1))
    write_results("reports", rows, ["step", "patients", "seconds", "per patient s", "peak MiB", "target s",
                                    "meets target"], notes)


if __name__ == "__main__":
    main()
