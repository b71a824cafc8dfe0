"""`fusion analyze`: the cohort statistics of every trained model and baseline of a run.

Reads each `RUN/models/<model>/predictions.parquet` (out-of-fold predictions) and writes, under
`RUN/analysis/`: `metrics.json` (everything), `summary.csv` (one row per model), per model
`<model>/hazard_ratios.csv`, `calibration.csv`, KM / calibration / forest / ROC plots (PNG + SVG),
`td_auc.png|svg` across models, and `report.html` (self-contained: images embedded).

Risk groups: a patient's risk is placed among the risks its training fold gave its own training
patients (percentiles stored with each fold), so the cut never looks at the test fold; "median"
splits at the 50th percentile, "tertiles" at the 33rd and 67th. No statistic pools raw risks of
different fold models (see `fusion.survival.crossval`, which also says why the fold-mean Harrell C
is the headline).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fusion import __version__
from fusion.cohort import Cohort
from fusion.errors import RunError
from fusion.report import plots, stats
from fusion.report.html import data_uri, render
from fusion.report.tripod import tripod_items
from fusion.run import RunLayout
from fusion.storage import write_json, write_table, write_text
from fusion.survival import concordance
from fusion.survival.calibration import ALL, cross_fitted_risk, fit_recalibration
from fusion.survival.crossval import (
    OutOfFold,
    common_scale,
    fold_bootstrap,
    fold_mean_c,
    fraction_of_oracle,
    load_out_of_fold,
    oracle_per_fold,
    surv_matrix,
    training_percentile,
)
from fusion.survival.horizons import report_horizons, surv_column
from fusion.train.evaluate import true_risk
from fusion.train.folds import read_fold_table


def analyze_survival(model_dir: Path, oof: OutOfFold, cohort: Cohort, scheme: str = "median",
                     n_boot: int = 1000, seed: int = 0, out_dir: Path | None = None) -> dict:
    """Every survival statistic of one model, none of them mixing fold models' raw scales (see
    `fusion.survival.crossval`): the headline Harrell C per test fold (mean, within-fold bootstrap
    CI); pooled Harrell and Uno C and td-AUC on the training-fold percentile scale; the Brier score
    and calibration from each fold's own predicted survival; risk groups from each training fold's
    percentiles. A statistic that cannot be estimated is listed in `not_estimable` with the reason."""
    preds = oof.preds
    time, event = preds["time"].to_numpy(float), preds["event"].to_numpy(int)
    n = len(preds)
    c = fold_mean_c(oof, n_boot, seed)
    result = {"model": model_dir.name, "task": "survival", "n": n, "events": int(event.sum()),
              "fold_table": oof.fold_table, "harrell_c": c["c_index_mean"], "harrell_c_ci": c["c_index_ci"],
              "harrell_c_sd": c["c_index_sd"], "harrell_c_folds": c["c_index_folds"], "not_estimable": {}}
    missing = result["not_estimable"]
    truth = true_risk(cohort)
    if truth is not None:
        oracle = oracle_per_fold(oof, truth)
        result["oracle_harrell_c"] = float(np.nanmean(list(oracle.values())))
        result["fraction_of_oracle"] = fraction_of_oracle(result["harrell_c"], result["oracle_harrell_c"])
    if not oof.has_cutoffs:
        missing["pooled statistics and risk groups"] = ("the model's folds did not store the risks of their "
                                                        "training patients (trained by an older version): retrain it")
        return result
    scale = common_scale(oof)
    horizons = stats.usable_times(time, event, oof.common_horizons)
    tau = max(horizons) if horizons else float(np.quantile(time, 0.9))

    def harrell(i: np.ndarray) -> float:
        return concordance(time[i], event[i], scale[i])

    def uno(i: np.ndarray) -> float:
        return stats.uno_c(time[i], event[i], scale[i], tau)

    result.update(harrell_c_pooled=harrell(np.arange(n)),
                  harrell_c_pooled_ci=list(stats.bootstrap_ci(harrell, n, n_boot, seed)),
                  uno_c=uno(np.arange(n)), uno_c_ci=list(stats.bootstrap_ci(uno, n, n_boot, seed)), uno_tau=tau,
                  uno_c_fold_mean=_uno_fold_mean(preds, tau), horizons=horizons)
    if horizons:
        result["td_auc_times"] = horizons
        result["td_auc"], result["td_auc_mean"] = stats.td_auc(time, event, scale, horizons)
    else:
        missing["td-AUC, Brier score, calibration"] = "no horizon chosen by every fold lies inside the follow-up"
    if len(horizons) >= 2:
        result["integrated_brier_score"] = stats.integrated_brier(time, event, surv_matrix(oof, horizons), horizons)
    elif horizons:
        missing["integrated Brier score"] = "needs two horizons inside the follow-up; the folds share one"
    calibration = _calibration(oof, horizons, cohort, n_boot, seed, result) if horizons else None

    groups = stats.risk_groups(training_percentile(oof), scheme)
    km = stats.kaplan_meier(time, event, groups, cohort.spec.time_unit)
    result.update(risk_groups=scheme, cutoff_source="training folds", kaplan_meier=km, logrank_p=km["logrank_p"])
    if len(km["groups"]) < 2:
        missing["log-rank test, hazard ratio of the risk group"] = (
            f"every patient falls in the {next(iter(km['groups']), 'same')} risk group")

    clinical = cohort.patients.reindex(preds["patient_id"].to_numpy())[list(cohort.spec.clinical)]
    frame = clinical.reset_index(drop=True).assign(risk_group=groups)
    kinds = {"risk_group": "categorical", **dict(cohort.spec.clinical)}
    hr, skipped = stats.cox_hazard_ratios(time, event, frame, kinds)
    missing.update({f"hazard ratio of {k}": v for k, v in skipped.items()})
    result["hazard_ratios"] = hr.to_dict("records")
    top = "risk_group=high"
    multi = hr[(hr.analysis == "multivariate") & (hr.term == top)] if len(hr) else hr
    if len(multi):
        result["hr_high_vs_low"] = multi.iloc[0][["hr", "ci_low", "ci_high", "p"]].astype(float).to_dict()

    if out_dir is not None:
        result["_figures"] = _survival_figures(model_dir.name, km, calibration, hr, scheme, cohort, out_dir,
                                               result.get("decision_curve"))
    return result


def _calibration(oof: OutOfFold, horizons: list[float], cohort: Cohort, n_boot: int, seed: int,
                 result: dict) -> dict[str, list[dict]]:
    """Calibration at the report horizons of the fold models' own predicted survival (each fold's
    Breslow baseline, fitted on its training patients' in-sample risks) and of the cross-fitted
    recalibration (`fusion.survival.calibration`), plus the decision curve at the middle horizon."""
    time, event = oof.preds["time"].to_numpy(float), oof.preds["event"].to_numpy(int)
    chosen = report_horizons(horizons, cohort.spec.time_unit)
    recal = fit_recalibration(oof, chosen, n_boot=min(n_boot, 200), seed=seed)
    absolute = cross_fitted_risk(oof, recal)
    out = {"recalibrated": [stats.calibration_at(time, event, absolute[:, j], h) for j, h in enumerate(chosen)]}
    if all(surv_column(h) in oof.preds for h in chosen):
        out["model"] = [stats.calibration_at(time, event, 1 - oof.preds[surv_column(h)].to_numpy(float), h)
                        for h in chosen]
    main = chosen[len(chosen) // 2]
    result.update(calibration_horizons=chosen, calibration=out,
                  recalibration={"gamma": recal.gamma[ALL], "n": recal.n[ALL], "events": recal.events[ALL]},
                  decision_curve={"horizon": main, "curve": stats.decision_curve(
                      time, event, absolute[:, chosen.index(main)], main).to_dict("records")})
    return out


def _uno_fold_mean(preds: pd.DataFrame, tau: float) -> float:
    """Uno's C per test fold (censoring distribution from that fold's training patients), averaged."""
    values = []
    for fold, test in preds.groupby("fold"):
        train = preds[preds["fold"] != fold]
        values.append(stats.uno_c(test["time"], test["event"], test["risk"], tau,
                                  train_time=train["time"], train_event=train["event"]))
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _survival_figures(name: str, km: dict, calibration: dict | None, hr: pd.DataFrame, scheme: str,
                      cohort: Cohort, out_dir: Path, decision: dict | None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    unit = cohort.spec.time_unit
    figures = {"km": plots.save(plots.km_figure(km, unit, f"{name}: risk groups ({scheme})"), out_dir / "km")}
    if calibration:
        labels = {"model": "fold models' own survival", "recalibrated": "recalibrated (cross-fitted)"}
        figures["calibration"] = plots.save(plots.calibration_figure(
            {labels[k]: v for k, v in calibration.items()}, unit), out_dir / "calibration")
        write_table(out_dir / "calibration.csv", pd.DataFrame(
            [{"predictions": k, **{f: c[f] for f in c if f != "groups"}} for k, v in calibration.items() for c in v]))
    if decision:
        curve = pd.DataFrame(decision["curve"])
        figures["decision_curve"] = plots.save(plots.decision_curve_figure(
            curve, decision["horizon"], unit, f"{name}: decision curve"), out_dir / "decision_curve")
        write_table(out_dir / "decision_curve.csv", curve)
    if len(hr):
        write_table(out_dir / "hazard_ratios.csv", hr)
        mv = hr[hr.analysis == "multivariate"]
        if len(mv):
            figures["forest"] = plots.save(plots.forest_figure(mv), out_dir / "forest")
    return figures


def analyze_classification(model_dir: Path, preds: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                           out_dir: Path | None = None) -> dict:
    """ROC AUC per test fold (mean, within-fold bootstrap CI: the headline) beside the pooled
    out-of-fold AUC, balanced accuracy, F1 and confusion matrix."""
    classes = [c[len("prob_"):] for c in preds.columns if c.startswith("prob_")]
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy(float)
    pooled = stats.classification_metrics(preds["label"].astype(str).to_numpy(), probs, classes, n_boot, seed)

    def fold_auc(p) -> float:
        return stats.auc_of(np.asarray(p["label"]).astype(str),
                            np.stack([np.asarray(p[f"prob_{c}"], float) for c in classes], 1), classes)

    per_fold = [fold_auc(p) for _, p in preds.groupby("fold")]
    result = {"model": model_dir.name, "task": "classification", **pooled,
              "auc_pooled": pooled["auc"], "auc_pooled_ci": pooled["auc_ci"],
              "auc": float(np.nanmean(per_fold)), "auc_sd": float(np.nanstd(per_fold, ddof=1)),
              "auc_folds": per_fold, "auc_ci": list(fold_bootstrap(preds, fold_auc, n_boot, seed))}
    if out_dir is not None and len(classes) == 2:
        y = np.array([classes.index(str(v)) for v in preds["label"]])
        result["_figures"] = {"roc": plots.save(plots.roc_figure(y, probs[:, 1], f"{model_dir.name}: {classes[1]}"),
                                                out_dir / "roc")}
    return result


def analyze_run(layout: RunLayout, cohort: Cohort, models: list[str] | None = None, groups: str = "median",
                n_boot: int = 1000, seed: int = 0, on_model: Callable[[int, int], None] | None = None) -> dict:
    """Statistics of every trained model (or those named) of the run; writes `RUN/analysis/`.
    `on_model(done, total)` is called as each model's statistics are done (for a progress bar)."""
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
    table = read_fold_table(layout.root)
    results = []
    for i, d in enumerate(dirs):
        oof = load_out_of_fold(d)
        if table is not None and oof.fold_table != table.fingerprint:
            raise RunError(f"{d.name} was trained on another fold table than this run's ({layout.root / 'folds.csv'});"
                           f" retrain it (`fusion train {layout.root} --model {d.name}`) or leave it out with --model")
        if oof.task == "survival":
            results.append(analyze_survival(d, oof, cohort, groups, n_boot, seed, out / d.name))
        else:
            results.append(analyze_classification(d, oof.preds, n_boot, seed, out / d.name))
        if on_model:
            on_model(i + 1, len(dirs))
    figures = {r["model"]: r.pop("_figures", {}) for r in results}
    survival = [r for r in results if r["task"] == "survival"]
    td = {r["model"]: (r["td_auc_times"], r["td_auc"]) for r in survival if "td_auc" in r}
    overview = {}
    if td:
        overview["td_auc"] = plots.save(plots.td_auc_figure(td, cohort.spec.time_unit), out / "td_auc")
    summary = summary_table(results)
    write_table(out / "summary.csv", summary)
    report = {"fusion_version": __version__, "run": str(layout.root), "cohort": str(cohort.root),
              "n_patients": len(cohort.patients), "risk_groups": groups, "bootstrap": n_boot, "models": results,
              "tripod": tripod_items(cohort, layout.root, results)}
    write_json(out / "metrics.json", _finite(report))
    rows = summary.to_dict("records")
    html = render("cohort.html.j2", report=report, figures=figures, overview=overview,
                  surv=[r for r in rows if r["task"] == "survival"],
                  clf=[r for r in rows if r["task"] == "classification"],
                  data_uri=data_uri, time_unit=cohort.spec.time_unit, cohort_name=cohort.spec.name)
    write_text(out / "report.html", html)
    return {"analysis": str(out), "report": str(out / "report.html"), "summary": summary.to_dict("records")}


def summary_table(results: list[dict]) -> pd.DataFrame:
    """The headline table: one row per model, survival models by fold-mean Harrell C (best first)."""
    rows = []
    for r in results:
        if r["task"] == "survival":
            hr = r.get("hr_high_vs_low", {})
            uno_ci = r.get("uno_c_ci", [None, None])
            pooled_ci = r.get("harrell_c_pooled_ci", [None, None])
            rows.append({"model": r["model"], "task": "survival", "n": r["n"], "events": r["events"],
                         "harrell_c": r["harrell_c"], "harrell_c_low": r["harrell_c_ci"][0],
                         "harrell_c_high": r["harrell_c_ci"][1], "fold_sd": r["harrell_c_sd"],
                         "harrell_c_pooled": r.get("harrell_c_pooled"), "harrell_c_pooled_low": pooled_ci[0],
                         "harrell_c_pooled_high": pooled_ci[1], "oracle_c": r.get("oracle_harrell_c"),
                         "fraction_of_oracle": r.get("fraction_of_oracle"),
                         "uno_c": r.get("uno_c"), "uno_c_low": uno_ci[0],
                         "uno_c_high": uno_ci[1], "td_auc_mean": r.get("td_auc_mean"),
                         "ibs": r.get("integrated_brier_score"), "logrank_p": r.get("logrank_p"),
                         "hr_high": hr.get("hr"), "hr_low_ci": hr.get("ci_low"), "hr_high_ci": hr.get("ci_high"),
                         "hr_p": hr.get("p")})
        else:
            rows.append({"model": r["model"], "task": "classification", "n": r["n"], "auc": r["auc"],
                         "auc_low": r["auc_ci"][0], "auc_high": r["auc_ci"][1], "auc_sd": r["auc_sd"],
                         "auc_pooled": r["auc_pooled"],
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
