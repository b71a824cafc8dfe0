"""Fusion models beside penalised Cox and RSF on real public cohorts (`fusion example`), same folds.

For each example cohort (clinical only: see fusion/examples.py) a run folder is made, and every
model below is cross-validated on the run's one fold table (5 folds, seed 0). The table reports the
fold-mean Harrell C with its within-fold bootstrap 95% CI, and each model's paired difference to
Coxnet (per-fold mean and paired bootstrap CI). Writes results/real-cohorts.{json,md}.

    python benchmarks/real_cohorts.py [--cohorts gbsg2,whas500] [--models coxnet,rsf,coattn] [--quick]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, RESULTS, machine  # noqa: E402

MODELS = ["clinical_cox", "coxnet", "rsf", "genomics_snn", "coattn", "biofusion"]
COHORTS = ["veterans", "lung", "gbsg2", "whas500", "aids", "flchain"]  # smallest first


def _arg(name: str, default: list[str]) -> list[str]:
    for i, a in enumerate(sys.argv):
        if a == name and i + 1 < len(sys.argv):
            return sys.argv[i + 1].split(",")
    return default


def run_cohort(name: str, models: list[str], quick: bool) -> list[dict]:
    from fusion.examples import write_example
    from fusion.run import init_run, open_run
    from fusion.stages import train_stage
    from fusion.survival.crossval import load_out_of_fold, paired_difference
    from fusion.train.evaluate import evaluate_predictions
    from fusion.train.loop import TrainConfig

    root = OUT / "real" / name
    cohort_dir = write_example(name, root / "cohort")
    layout = init_run(root / "run", cohort_dir)
    layout, cohort = open_run(layout.root)
    rows = []
    for model in models:
        start = time.perf_counter()
        train_stage(layout, cohort, TrainConfig(model=model, epochs=20 if quick else 60))
        result = evaluate_predictions(layout.model_dir(model), cohort, n_boot=500)
        rows.append({"cohort": name, "n": int(len(cohort.patients)), "events": int(cohort.event.sum()),
                     "model": model, "c": result["c_index_mean"], "sd": result["c_index_sd"],
                     "ci": result["c_index_ci"], "pooled": result["pooled_c_index"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    if "coxnet" in models:
        reference = load_out_of_fold(layout.model_dir("coxnet"))
        for r in rows:
            if r["model"] != "coxnet":
                d = paired_difference(reference, load_out_of_fold(layout.model_dir(r["model"])), n_boot=500)
                r["vs_coxnet"] = {"mean": -d["diff_mean"], "sd": d["diff_sd"],
                                  "ci": [-d["diff_ci"][1], -d["diff_ci"][0]]}
    return rows


def main() -> None:
    quick = "--quick" in sys.argv
    models = _arg("--models", MODELS)
    rows = []
    for name in _arg("--cohorts", COHORTS):  # the table is rewritten after each cohort: a long run reports as it goes
        rows += run_cohort(name, models, quick)
        write_table(rows)


def write_table(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "real-cohorts.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    lines = ["## Real public cohorts (clinical only): fusion models beside penalised Cox and RSF", "",
             "5-fold cross-validation on each run's one fold table (seed 0); Harrell's C per test fold, mean ± sd "
             "[95% CI, patients resampled within folds]; Δ Coxnet: paired difference to the penalised Cox "
             "(per-fold mean [paired bootstrap 95% CI]). `benchmarks/real_cohorts.py`.", "",
             "| cohort | n (events) | model | C-index | Δ Coxnet | seconds |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        delta = "" if "vs_coxnet" not in r else (f"{r['vs_coxnet']['mean']:+.3f} [{r['vs_coxnet']['ci'][0]:+.3f}, "
                                                f"{r['vs_coxnet']['ci'][1]:+.3f}]")
        lines.append(f"| {r['cohort']} | {r['n']} ({r['events']}) | {r['model']} | {r['c']:.3f} ± {r['sd']:.3f} "
                     f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {delta} | {r['seconds']:.0f} |")
    (RESULTS / "real-cohorts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
