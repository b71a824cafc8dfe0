"""The TRIPOD+AI items (Collins et al., BMJ 2024) that a run can fill by itself, and those it cannot.

The cohort report lists each item with what the run knows (data, missing data, model, validation,
performance) or, for what only a person can write (objectives, ethics, funding, fairness,
patient involvement, interpretation), says so. It is a draft for the authors, not a claim of compliance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion.cohort import Cohort
from fusion.storage import read_json
from fusion.train.folds import read_fold_table

PERSON = "for a person to write"


def median_follow_up(time: np.ndarray, event: np.ndarray) -> float:
    """Median follow-up by the reverse Kaplan-Meier method (censoring as the event; lifelines)."""
    from lifelines import KaplanMeierFitter

    km = KaplanMeierFitter().fit(np.asarray(time, float), 1 - np.asarray(event, int))
    return float(km.median_survival_time_)


def missing_data(cohort: Cohort) -> dict[str, int]:
    """Patients lacking each modality or clinical value."""
    ids = set(cohort.patients.patient_id)
    out = {"without slides": len(ids - set(cohort.slides.patient_id)),
           "without genomics": len(ids) if cohort.genomics is None else len(ids - set(cohort.genomics.index))}
    for col in cohort.spec.clinical:
        out[f"without {col}"] = int(cohort.patients[col].isna().sum())
    return out


def tripod_items(cohort: Cohort, run: Path, results: list[dict]) -> list[dict]:
    """[{item, topic, status ('filled' or PERSON), text}] for the cohort report."""
    spec, patients = cohort.spec, cohort.patients
    known = patients[patients[spec.outcome.time].notna()]
    time, event = known[spec.outcome.time].to_numpy(float), known[spec.outcome.event].to_numpy(int)
    table = read_fold_table(run)
    survival = [r for r in results if r["task"] == "survival"]
    configs = {}
    for r in survival:
        path = run / "models" / r["model"] / "cv_metrics.json"
        if path.exists():
            summary = read_json(path)
            networks = max(summary.get("networks_per_fold") or [1])  # the seed ensemble's size
            configs[r["model"]] = {**summary.get("config", {}), "networks": networks}
    missing = missing_data(cohort)
    best = max(survival, key=lambda r: r["harrell_c"]) if survival else None

    def item(number: str, topic: str, text: str | None) -> dict:
        return {"item": number, "topic": topic, "status": "filled" if text else PERSON, "text": text or PERSON}

    perf = None
    if best:
        low, high = best["harrell_c_ci"]
        perf = (f"best model {best['model']}: Harrell's C per test fold {best['harrell_c']:.3f} "
                f"[95% CI {low:.3f}-{high:.3f}]" + (f", mean td-AUC {best['td_auc_mean']:.3f}"
                                                     if best.get("td_auc_mean") is not None else "")
                + "; calibration (O/E, slope) and decision curves per model in this report")
    return [
        item("1-3", "title, abstract, background", None),
        item("4", "objectives", f"predict {spec.intended_use.predicts} for {spec.intended_use.population}"
             if cohort.spec.intended_use else None),
        item("5", "data source", spec.description or f"cohort '{spec.name}' ({cohort.root})"),
        item("6", "participants", f"{len(patients)} patients; {len(known)} with a known outcome, "
             f"{int(event.sum())} events; median follow-up {median_follow_up(time, event):.0f} {spec.time_unit} "
             "(reverse Kaplan-Meier)"),
        item("7", "data preparation", "tiles by tissue detection and a grid at a fixed resolution; features by the "
             "named encoders; genes: most variable of each training fold, z-scored on it; clinical: z-scored "
             "numbers, one-hot levels (unseen or missing levels as the training mix), fitted on each training fold"),
        item("8", "outcome", f"time '{spec.outcome.time}' and event '{spec.outcome.event}' in {spec.time_unit}"),
        item("9", "predictors", f"slides; {len(cohort.gene_columns)} genes; clinical: "
             f"{', '.join(spec.clinical) or 'none'}"),
        item("10", "sample size", f"{int(event.sum())} events for {len(spec.clinical)} clinical covariates and "
             "high-dimensional image and gene inputs: internal validation only"),
        item("11", "missing data", "; ".join(f"{v} {k}" for k, v in missing.items()) +
             ". Models mask a missing modality (learned missing-genomics tokens, a learned no-image embedding); "
             "missing clinical values take the training mean or mix"),
        item("12", "analytical methods", "; ".join(
            f"{m}: {c.get('model', m)}, loss {c.get('loss', 'n/a')}, {c.get('epochs', '-')} epochs max, "
            f"lr {c.get('lr', '-')}" + (f", a seed ensemble of {c['networks']} networks per fold" if c["networks"] > 1
                                         else "") for m, c in configs.items()) or None),
        item("13", "class imbalance", f"{100 * event.mean():.0f}% events; Cox losses need no resampling, batches "
             "are stratified by event, biofusion weights event terms by inverse censoring probability"),
        item("14", "fairness", None),
        item("15", "model output", "risk percentile among the training cohort, risk group (training folds' "
             "cut), absolute risk by stated horizons (cross-fitted recalibration) with 95% intervals"),
        item("16", "training versus evaluation", None if table is None else
             f"{table.k}-fold cross-validation on one fold table (seed {table.seed}, stratified by "
             f"{table.stratify}, fingerprint {table.fingerprint}); no external validation"),
        item("17-18", "performance measures and results", perf),
        item("19-21", "model updating, ethics, funding, conflicts", None),
        item("22-23", "protocol, registration, data and code availability", "code: fusion (this run's version "
             "and configuration hashes are in every model folder)"),
        item("24-27", "patient and public involvement, interpretation, limitations, usability", None),
    ]


__all__ = ["tripod_items", "median_follow_up", "missing_data", "PERSON"]
