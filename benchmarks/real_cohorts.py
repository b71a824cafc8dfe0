"""Fusion models beside penalised Cox and RSF on real public cohorts (`fusion example`), same folds.

For each example cohort (clinical only: see fusion/examples.py) a run folder is made, and every
model below is cross-validated on the run's one fold table (5 folds, seed 0). The table reports the
fold-mean Harrell C with its within-fold bootstrap 95% CI, and each model's paired difference to
Coxnet (per-fold mean and paired bootstrap CI). Writes results/real-cohorts.{json,md}.

`--skip biofusion@whas500` leaves one model out of one cohort; `--light aids,flchain` runs only the
baselines and `genomics_snn` on those cohorts (the attention models take tens of minutes per cohort on 2
cores). `--cohorts breast_cancer` runs the independent check (scikit-survival's load_breast_cancer, with 76
genes: see `write_independent`), which is never run by default.

Networks train their default seed ensemble (`members` column); `--single` also trains each network
once per fold on the same fold table, to measure what the ensemble adds.

    python benchmarks/real_cohorts.py [--cohorts gbsg2,whas500] [--models coxnet,rsf,coattn] [--quick] [--single]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, RESULTS, machine  # noqa: E402

MODELS = ["clinical_cox", "coxnet", "rsf", "genomics_snn", "coattn", "biofusion"]
NETWORKS = {"genomics_snn", "coattn", "biofusion"}
COHORTS = ["veterans", "lung", "gbsg2", "whas500", "aids", "flchain"]  # smallest first


def _arg(name: str, default: list[str]) -> list[str]:
    for i, a in enumerate(sys.argv):
        if a == name and i + 1 < len(sys.argv):
            return sys.argv[i + 1].split(",")
    return default


INDEPENDENT = "breast_cancer"  # scikit-survival's load_breast_cancer: never an example, never used for tuning


def write_independent(out: Path) -> Path:
    """The independent check: scikit-survival's breast cancer data (198 women, node-negative, no systemic
    treatment; 76 microarray genes + age, ER, grade, tumour size; distant metastasis-free survival in
    days) as a cohort with genomics. Written here, not by `fusion example`: nothing in the package is
    chosen on it, and it is run only after every default is fixed."""
    import pandas as pd
    import yaml
    from sksurv.datasets import load_breast_cancer

    from fusion.storage import write_table, write_text

    x, y = load_breast_cancer()
    ids = [f"BC-{i + 1:04d}" for i in range(len(x))]
    clinical = {"age": "numeric", "er": "categorical", "grade": "categorical", "size": "numeric"}
    patients = pd.DataFrame({"patient_id": ids, "time": y["t.tdm"].astype(float), "event": y["e.tdm"].astype(int)})
    for col in clinical:
        patients[col] = x[col].astype(str).to_numpy() if clinical[col] == "categorical" else x[col].to_numpy()
    genes = x.drop(columns=list(clinical))
    write_table(out / "patients.csv", patients)
    write_table(out / "genomics.csv", pd.concat([pd.DataFrame({"patient_id": ids}), genes.reset_index(drop=True)],
                                                axis=1))
    write_table(out / "slides.csv", pd.DataFrame(columns=["slide_id", "patient_id", "path"]))
    spec = {"name": INDEPENDENT, "time_unit": "days", "outcome": {"time": "time", "event": "event"},
            "tables": {"genomics": "genomics.csv"}, "clinical": clinical,
            "description": "scikit-survival load_breast_cancer (Desmedt et al. 2007): the independent check."}
    write_text(out / "cohort.yaml", yaml.safe_dump(spec, sort_keys=False))
    return out


def run_cohort(name: str, models: list[str], quick: bool, single: bool) -> list[dict]:
    """Every model on the cohort's one fold table; networks train their default seed ensemble (5 under
    500 training patients, 3 under 2,000), and with `single` also one network per fold (a second run
    folder on the same fold table) so that the ensemble's gain is measured, not assumed."""
    from fusion.examples import write_example
    from fusion.run import init_run, open_run
    from fusion.stages import train_stage
    from fusion.storage import read_json
    from fusion.survival.crossval import load_out_of_fold, paired_difference
    from fusion.train.evaluate import evaluate_predictions
    from fusion.train.loop import TrainConfig

    root = OUT / "real" / name
    cohort_dir = write_independent(root / "cohort") if name == INDEPENDENT else write_example(name, root / "cohort")
    runs = {seeds: open_run(init_run(root / ("run" if seeds == 0 else "run-single"), cohort_dir).root)
            for seeds in (0, 1)}
    rows = []
    for model in models:
        for seeds in (0, 1) if single and model in NETWORKS else (0,):
            if seeds == 1 and rows[-1]["members"] == 1:
                continue  # the default already trains one network per fold here: nothing to compare
            layout, cohort = runs[seeds]
            start = time.perf_counter()
            train_stage(layout, cohort, TrainConfig(model=model, epochs=20 if quick else 60, seeds=seeds))
            model_dir = layout.model_dir(model)
            members = int(read_json(model_dir / "fold-0" / "config.json").get("ensemble", 1)) \
                if (model_dir / "fold-0" / "config.json").exists() else 1
            result = evaluate_predictions(model_dir, cohort, n_boot=500)
            rows.append({"cohort": name, "n": int(len(cohort.patients)), "events": int(cohort.event.sum()),
                         "model": model if seeds == 0 else f"{model} (one network)", "members": members,
                         "c": result["c_index_mean"], "sd": result["c_index_sd"], "ci": result["c_index_ci"],
                         "pooled": result["pooled_c_index"], "seconds": round(time.perf_counter() - start, 1),
                         "dir": str(model_dir)})
            print(rows[-1], flush=True)
    if "coxnet" in models:
        reference = load_out_of_fold(runs[0][0].model_dir("coxnet"))
        for r in rows:
            if r["model"] != "coxnet":
                d = paired_difference(reference, load_out_of_fold(Path(r["dir"])), n_boot=500)
                r["vs_coxnet"] = {"mean": -d["diff_mean"], "sd": d["diff_sd"],
                                  "ci": [-d["diff_ci"][1], -d["diff_ci"][0]]}
    return rows


def main() -> None:
    quick, single = "--quick" in sys.argv, "--single" in sys.argv
    models = _arg("--models", MODELS)
    rows = []
    cohorts = _arg("--cohorts", COHORTS)
    light = set(_arg("--light", []))  # cohorts where only the baselines and genomics_snn run (time)
    skip = {tuple(item.split("@")) for item in _arg("--skip", [])}  # MODEL@COHORT pairs not run (time)
    stem = "independent-check" if cohorts == [INDEPENDENT] else "real-cohorts"  # its own file: never mixed in
    for name in cohorts:  # the table is rewritten after each cohort: a long run reports as it goes
        chosen = [m for m in models if (m, name) not in skip and not (name in light and m in ("coattn", "biofusion"))]
        rows += run_cohort(name, chosen, quick, single)
        write_table(rows, stem)


def write_table(rows: list[dict], stem: str = "real-cohorts") -> None:
    from fusion.train.baselines import BASELINES

    RESULTS.mkdir(exist_ok=True)
    public = [{k: v for k, v in r.items() if k != "dir"} for r in rows]  # "dir" is a local path
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": machine(), "rows": public}, indent=2))
    title = ("Independent check (scikit-survival's breast cancer data: 76 genes + clinical)" if stem != "real-cohorts"
             else "Real public cohorts (clinical only)")
    lines = [f"## {title}: fusion models beside penalised Cox and RSF", "",
             "5-fold cross-validation on each run's one fold table (seed 0); Harrell's C per test fold, mean ± sd "
             "[95% CI, patients resampled within folds]; Δ Coxnet: paired difference to the penalised Cox "
             "(per-fold mean [paired bootstrap 95% CI]). `benchmarks/real_cohorts.py`.", "",
             "| cohort | n (events) | model | networks per fold | C-index | Δ Coxnet | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        delta = "" if "vs_coxnet" not in r else (f"{r['vs_coxnet']['mean']:+.3f} [{r['vs_coxnet']['ci'][0]:+.3f}, "
                                                f"{r['vs_coxnet']['ci'][1]:+.3f}]")
        members = "" if r["model"] in BASELINES else r.get("members", 1)
        lines.append(f"| {r['cohort']} | {r['n']} ({r['events']}) | {r['model']} | {members} | "
                     f"{r['c']:.3f} ± {r['sd']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {delta} | "
                     f"{r['seconds']:.0f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
