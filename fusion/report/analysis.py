"""`fusion analyze`: the cohort statistics of every trained model and baseline of a run.

Reads each `RUN/models/<model>/predictions.parquet` (out-of-fold predictions) and writes, under
`RUN/analysis/`: `metrics.json` (everything), `summary.csv` (one row per model), per model
`<model>/hazard_ratios.csv`, `calibration.csv`, KM / calibration / forest / ROC plots (PNG + SVG),
`td_auc.png|svg` across models, and `report.html` (self-contained: images embedded).

Risk groups: a patient's risk is placed among the risks its training fold gave its own training
patients (percentiles stored with each fold), so the cut never looks at the test fold; "median"
splits at the 50th percentile, "tertiles" at the 33rd and 67th.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from fusion import __version__
from fusion.cohort import Cohort
from fusion.report import plots, stats
from fusion.report.html import data_uri, render
from fusion.run import RunLayout
from fusion.storage import write_json, write_table, write_text
from fusion.survival import concordance
from fusion.train.evaluate import true_risk


def fold_percentiles(model_dir: Path, preds: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Each patient's percentile within its training fold's predicted risks, and where the cut came
    from ('training folds', or 'pooled out-of-fold' for models trained before folds stored it)."""
    out = np.full(len(preds), np.nan)
    for fold, idx in preds.groupby("fold").indices.items():
        metrics = model_dir / f"fold-{fold}" / "metrics.json"
        cut = json.loads(metrics.read_text()).get("train_risk_cutoffs") if metrics.exists() else None
        if cut is None or "percentiles" not in cut:
            ranks = preds["risk"].rank(pct=True).to_numpy() * 100
            return ranks, "pooled out-of-fold"
        out[idx] = percentile_of(preds["risk"].to_numpy()[idx], cut["percentiles"])
    return out, "training folds"


def percentile_of(risk, percentiles: list[float]) -> np.ndarray:
    """Percentile (0-100) of `risk` among a training fold's risks, from its stored percentiles."""
    grid = np.asarray(percentiles, float)
    return np.interp(np.asarray(risk, float), grid, np.arange(len(grid), dtype=float))


def _surv_columns(preds: pd.DataFrame) -> dict[float, str]:
    return {float(c[len("surv_"):]): c for c in preds.columns if c.startswith("surv_")}


def analyze_survival(model_dir: Path, preds: pd.DataFrame, cohort: Cohort, scheme: str = "median",
                     n_boot: int = 1000, seed: int = 0, out_dir: Path | None = None) -> dict:
    time, event, risk = preds["time"].to_numpy(float), preds["event"].to_numpy(int), preds["risk"].to_numpy(float)
    n = len(preds)
    per_fold = preds.groupby("fold").apply(lambda p: concordance(p.time, p.event, p.risk), include_groups=False)
    tau = float(np.quantile(time, 0.9))

    def harrell(i: np.ndarray) -> float:
        return concordance(time[i], event[i], risk[i])

    def uno(i: np.ndarray) -> float:
        return stats.uno_c(time[i], event[i], risk[i], tau)

    result = {
        "model": model_dir.name, "task": "survival", "n": n, "events": int(event.sum()),
        "harrell_c": concordance(time, event, risk),
        "harrell_c_ci": list(stats.bootstrap_ci(harrell, n, n_boot, seed)),
        "harrell_c_fold_mean": float(per_fold.mean()), "harrell_c_fold_sd": float(per_fold.std(ddof=1)),
        "uno_c": stats.uno_c(time, event, risk, tau), "uno_tau": tau,
        "uno_c_ci": list(stats.bootstrap_ci(uno, n, n_boot, seed)),
    }
    truth = true_risk(cohort)
    if truth is not None:
        result["oracle_harrell_c"] = concordance(time, event, truth.reindex(preds["patient_id"]).to_numpy(float))

    surv_cols = _surv_columns(preds)
    times = stats.usable_times(time, event, sorted(surv_cols) or np.quantile(time[event == 1], [0.25, 0.5, 0.75]))
    if times:
        result["td_auc_times"] = times
        result["td_auc"], result["td_auc_mean"] = stats.td_auc(time, event, risk, times)
    surv_times = [t for t in times if t in surv_cols]
    calibration = None
    if len(surv_times) >= 2:
        surv = preds[[surv_cols[t] for t in surv_times]].to_numpy(float)
        result["integrated_brier_score"] = stats.integrated_brier(time, event, surv, surv_times)
        horizon = surv_times[len(surv_times) // 2]
        calibration = stats.calibration(time, event, preds[surv_cols[horizon]].to_numpy(float), horizon)
        result["calibration_horizon"] = horizon
        result["calibration"] = calibration.to_dict("records")

    percentile, source = fold_percentiles(model_dir, preds)
    groups = stats.risk_groups(percentile, scheme)
    km = stats.kaplan_meier(time, event, groups)
    result.update(risk_groups=scheme, cutoff_source=source, kaplan_meier=km, logrank_p=km["logrank_p"])

    clinical = cohort.patients.reindex(preds["patient_id"].to_numpy())[list(cohort.spec.clinical)]
    frame = clinical.reset_index(drop=True).assign(risk_group=groups)
    kinds = {"risk_group": "categorical", **dict(cohort.spec.clinical)}
    hr = stats.cox_hazard_ratios(time, event, frame, kinds)
    result["hazard_ratios"] = hr.to_dict("records")
    top = "risk_group=high"
    multi = hr[(hr.analysis == "multivariate") & (hr.term == top)]
    if len(multi):
        result["hr_high_vs_low"] = multi.iloc[0][["hr", "ci_low", "ci_high", "p"]].astype(float).to_dict()

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        unit = cohort.spec.time_unit
        figures = {"km": plots.save(plots.km_figure(km, unit, f"{model_dir.name}: risk groups ({scheme})"),
                                    out_dir / "km")}
        if calibration is not None and len(calibration):
            figures["calibration"] = plots.save(plots.calibration_figure(calibration, horizon, unit),
                                                out_dir / "calibration")
            write_table(out_dir / "calibration.csv", calibration)
        if len(hr):
            write_table(out_dir / "hazard_ratios.csv", hr)
            mv = hr[hr.analysis == "multivariate"]
            if len(mv):
                figures["forest"] = plots.save(plots.forest_figure(mv), out_dir / "forest")
        result["_figures"] = figures
    return result


def analyze_classification(model_dir: Path, preds: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                           out_dir: Path | None = None) -> dict:
    classes = [c[len("prob_"):] for c in preds.columns if c.startswith("prob_")]
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy(float)
    result = {"model": model_dir.name, "task": "classification",
              **stats.classification_metrics(preds["label"].astype(str).to_numpy(), probs, classes, n_boot, seed)}
    if out_dir is not None and len(classes) == 2:
        y = np.array([classes.index(str(v)) for v in preds["label"]])
        result["_figures"] = {"roc": plots.save(plots.roc_figure(y, probs[:, 1], f"{model_dir.name}: {classes[1]}"),
                                                out_dir / "roc")}
    return result


def analyze_run(layout: RunLayout, cohort: Cohort, models: list[str] | None = None, groups: str = "median",
                n_boot: int = 1000, seed: int = 0) -> dict:
    """Statistics of every trained model (or those named) of the run; writes `RUN/analysis/`."""
    root = layout.root / "models"
    dirs = sorted(d for d in root.iterdir() if (d / "predictions.parquet").exists()) if root.exists() else []
    if models:
        unknown = sorted(set(models) - {d.name for d in dirs})
        if unknown:
            raise FileNotFoundError(f"no predictions for model(s) {', '.join(unknown)} in {root}; "
                                    f"trained: {', '.join(d.name for d in dirs) or 'none'}")
        dirs = [d for d in dirs if d.name in models]
    if not dirs:
        raise FileNotFoundError(f"no trained model in {root}: run `fusion train {layout.root}` first")
    out = layout.analysis
    results = []
    for d in dirs:
        preds = pd.read_parquet(d / "predictions.parquet")
        if "risk" in preds.columns:
            results.append(analyze_survival(d, preds, cohort, groups, n_boot, seed, out / d.name))
        else:
            results.append(analyze_classification(d, preds, n_boot, seed, out / d.name))
    figures = {r["model"]: r.pop("_figures", {}) for r in results}
    survival = [r for r in results if r["task"] == "survival"]
    td = {r["model"]: (r["td_auc_times"], r["td_auc"]) for r in survival if "td_auc" in r}
    overview = {}
    if td:
        overview["td_auc"] = plots.save(plots.td_auc_figure(td, cohort.spec.time_unit), out / "td_auc")
    summary = summary_table(results)
    write_table(out / "summary.csv", summary)
    report = {"fusion_version": __version__, "run": str(layout.root), "cohort": str(cohort.root),
              "n_patients": len(cohort.patients), "risk_groups": groups, "bootstrap": n_boot, "models": results}
    write_json(out / "metrics.json", _finite(report))
    rows = summary.to_dict("records")
    html = render("cohort.html.j2", report=report, figures=figures, overview=overview,
                  surv=[r for r in rows if r["task"] == "survival"],
                  clf=[r for r in rows if r["task"] == "classification"],
                  data_uri=data_uri, time_unit=cohort.spec.time_unit, cohort_name=cohort.spec.name)
    write_text(out / "report.html", html)
    return {"analysis": str(out), "report": str(out / "report.html"), "summary": summary.to_dict("records")}


def summary_table(results: list[dict]) -> pd.DataFrame:
    """The headline table: one row per model, survival models by Harrell's C (best first)."""
    rows = []
    for r in results:
        if r["task"] == "survival":
            hr = r.get("hr_high_vs_low", {})
            rows.append({"model": r["model"], "task": "survival", "n": r["n"], "events": r["events"],
                         "harrell_c": r["harrell_c"], "harrell_c_low": r["harrell_c_ci"][0],
                         "harrell_c_high": r["harrell_c_ci"][1], "fold_mean": r["harrell_c_fold_mean"],
                         "fold_sd": r["harrell_c_fold_sd"], "uno_c": r["uno_c"], "uno_c_low": r["uno_c_ci"][0],
                         "uno_c_high": r["uno_c_ci"][1], "td_auc_mean": r.get("td_auc_mean"),
                         "ibs": r.get("integrated_brier_score"), "logrank_p": r["logrank_p"],
                         "hr_high": hr.get("hr"), "hr_low_ci": hr.get("ci_low"), "hr_high_ci": hr.get("ci_high"),
                         "hr_p": hr.get("p")})
        else:
            rows.append({"model": r["model"], "task": "classification", "n": r["n"], "auc": r["auc"],
                         "auc_low": r["auc_ci"][0], "auc_high": r["auc_ci"][1],
                         "balanced_accuracy": r["balanced_accuracy"], "f1": r["f1"]})
    table = pd.DataFrame(rows)
    if "harrell_c" in table:
        table = table.sort_values(["task", "harrell_c"], ascending=[False, False], na_position="last")
    return table.reset_index(drop=True)


def _finite(obj):
    """NaN/inf -> None so that metrics.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
